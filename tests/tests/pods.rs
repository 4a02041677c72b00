//! Pods in a real container runtime (podman; `mesh_tests::pods`): the images built FROM
//! scratch by scripts/build-images.sh, the control plane in a container, and pod specs that
//! `meshctl inject` (the webhook's function) produced, run as Kubernetes runs them. Needs root
//! and podman (scripts/install-test-deps.sh installs and configures it); it fails, not skips,
//! when they are missing, so CI always runs it.

use anyhow::Context;
use mesh_tests::pods::{self, Net, PodRef, Volumes};
use mesh_tests::*;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// A pod manifest of the example app in `ns`, with a readiness probe on its own port.
fn manifest(name: &str, ns: &str, sa: &str, service: &str, version: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: {service}, version: {version}}}
spec:
  serviceAccountName: {sa}
  containers:
    - name: app
      image: mesh-example:{tag}
      args: [serve, --service, {service}, --version, {version}, --listen, "0.0.0.0:8080"]
      ports: [{{name: http, containerPort: 8080}}]
      readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
"#,
        tag = pods::version()
    )
}

/// `meshctl inject` of a manifest, pointing proxies at the control plane's container.
async fn inject(dir: &Path, yaml: &str, cp: Ipv4Addr) -> anyhow::Result<serde_json::Value> {
    let path = dir.join(format!("pod-{}.yaml", yaml.len()));
    std::fs::write(&path, yaml)?;
    let cp = format!("https://{cp}:15010");
    meshctl_manifest(&["inject", "-f"], &path, &["--inject-control-plane", &cp]).await
}

/// meshctl against the control plane's container (token and CA from its data dir).
async fn meshctl(data: &Path, cp: Ipv4Addr, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--server", &format!("https://{cp}:15011")])
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "meshctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The pod's volumes: the trust bundle and a bootstrap token for `ns/sa`.
async fn volumes(
    dir: &Path,
    data: &Path,
    cp: Ipv4Addr,
    ns: &str,
    sa: &str,
) -> anyhow::Result<Volumes> {
    let v = Volumes {
        ca_dir: dir.join(format!("{ns}-{sa}-ca")),
        token_dir: dir.join(format!("{ns}-{sa}-token")),
    };
    std::fs::create_dir_all(&v.ca_dir)?;
    std::fs::create_dir_all(&v.token_dir)?;
    std::fs::copy(data.join("ca/bundle.pem"), v.ca_dir.join("bundle.pem"))?;
    let token = meshctl(
        data,
        cp,
        &["token", "create", "--identity", &format!("{ns}/{sa}")],
    )
    .await?;
    std::fs::write(v.token_dir.join("token"), token.trim())?;
    // Readable by the proxy's uid, as the kubelet's volumes are.
    for d in [&v.ca_dir, &v.token_dir] {
        let _ = std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(d)
            .output();
    }
    Ok(v)
}

/// `curl` from inside a pod, as its app would call: status and body.
async fn call_from(pod: &PodRef, url: &str) -> anyhow::Result<(String, String)> {
    let out = pod
        .exec("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", url])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.to_string(), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pods_talk_mtls_become_ready_and_drain_in_podman() -> anyhow::Result<()> {
    if let Some(why) = pods::missing() {
        anyhow::bail!("cannot run pods: {why}");
    }
    pods::build_images().await?;
    let dir = tempfile::tempdir()?;
    let mut net = Net::create("pods").await?;

    // The control plane in its own container, its data dir a volume the test reads.
    let data = dir.path().join("cp");
    std::fs::create_dir_all(&data)?;
    std::process::Command::new("chown")
        .args(["65532:65532"])
        .arg(&data)
        .output()?;
    let mount = format!("{}:/data", data.display());
    let image = format!("mesh-control-plane:{}", pods::version());
    let (_, cp) = net
        .container(
            "control-plane",
            &[
                "-v",
                &mount,
                &image,
                "--data-dir",
                "/data",
                "--grpc-addr",
                "0.0.0.0:15010",
                "--admin-addr",
                "0.0.0.0:15011",
                "--http-addr",
                "0.0.0.0:15014",
            ],
        )
        .await?;
    pods::probe_until_ok(&format!("http://{cp}:15014/ready"), Duration::from_secs(30)).await?;

    // The server in namespace team-b (two replicas), the client in team-a: injected specs.
    let mut server_pods = Vec::new();
    for (i, name) in ["server-a", "server-b"].into_iter().enumerate() {
        let spec = inject(
            dir.path(),
            &manifest(name, "team-b", "server", "server", "v1"),
            cp,
        )
        .await?;
        let probe = &spec["spec"]["containers"][0]["readinessProbe"]["httpGet"];
        assert_eq!(probe["port"], 15000, "probe rewritten: {probe}");
        let vols = volumes(dir.path(), &data, cp, "team-b", "server").await?;
        let pod = pods::run_injected(&mut net, &spec, &vols).await?;
        // The kubelet's readiness probe, rewritten: Ready through the sidecar.
        pods::probe_until_ok(
            &pods::readiness_url(&spec, 0, pod.ip)?,
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("server pod {i} never became ready"))?;
        server_pods.push(pod);
    }
    let spec = inject(
        dir.path(),
        &manifest("client", "team-a", "client", "client", "v1"),
        cp,
    )
    .await?;
    let vols = volumes(dir.path(), &data, cp, "team-a", "client").await?;
    let client = pods::run_injected(&mut net, &spec, &vols).await?;
    pods::probe_until_ok(
        &pods::readiness_url(&spec, 0, client.ip)?,
        Duration::from_secs(30),
    )
    .await?;

    // Plain HTTP from the client app to a server pod's address: the server app sees the
    // client's SPIFFE identity, so it crossed both sidecars over mesh mTLS.
    let a = &server_pods[0];
    let url = format!("http://{}:8080/", a.ip);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (code, body) = call_from(&client, &url).await?;
        if code == "200" {
            break body;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "client → server: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).context(body.clone())?;
    assert_eq!(
        v["peer"], "spiffe://mesh.local/ns/team-a/sa/client",
        "{body}"
    );

    // On the wire (captured where it leaves the client pod, to either server's inbound port):
    // TLS records, no plaintext request.
    let mut dump = client
        .exec("tcpdump")
        .args([
            "-i",
            "eth0",
            "--immediate-mode",
            "-U",
            "-w",
            "-",
            "tcp port 15006",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    {
        use tokio::io::AsyncBufReadExt;
        let err = dump.stderr.take().context("tcpdump stderr")?;
        let mut lines = tokio::io::BufReader::new(err).lines();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(l) = lines.next_line().await? {
                if l.contains("listening on") {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("tcpdump ended")
        })
        .await??;
    }
    for _ in 0..5 {
        let (code, _) = call_from(&client, &format!("http://{}:8080/hello", a.ip)).await?;
        assert_eq!(code, "200");
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dump.id().context("tcpdump pid")? as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let out = dump.wait_with_output().await?;
    let pcap = out.stdout;
    let has = |needle: &[u8]| pcap.windows(needle.len()).any(|w| w == needle);
    assert!(pcap.len() > 200, "capture too small: {} bytes", pcap.len());
    assert!(
        has(&[0x17, 0x03, 0x03]),
        "no TLS application data in the capture"
    );
    assert!(!has(b"GET /hello"), "a plaintext request crossed the wire");

    // Deleting a server pod drains: its sidecar is told first (SIGTERM: deregister, finish
    // what is in flight), then the pod goes; a steady load from the client fails nothing.
    let load = client
        .exec("sh")
        .args([
            "-c",
            &format!(
                "for i in $(seq 1 150); do curl -s -o /dev/null -m 5 -w '%{{http_code}}\\n' {url}; done"
            ),
        ])
        .output();
    let stop = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let b = &server_pods[1];
        pods::podman(&["stop", "-t", "15", &format!("{}-mesh-proxy", b.name)]).await?;
        pods::podman(&["pod", "rm", "-f", "-t", "0", &b.name]).await?;
        anyhow::Ok(())
    };
    let (out, stopped) = tokio::join!(load, stop);
    stopped?;
    let codes = String::from_utf8_lossy(&out?.stdout).to_string();
    let total = codes.lines().count();
    let failed: Vec<&str> = codes.lines().filter(|c| *c != "200").collect();
    assert_eq!(total, 150, "{codes}");
    assert!(
        failed.is_empty(),
        "{} of {total} failed: {failed:?}",
        failed.len()
    );
    let eps = meshctl(
        &data,
        cp,
        &[
            "-n",
            "team-b",
            "-o",
            "json",
            "endpoints",
            "--service",
            "server",
        ],
    )
    .await?;
    assert!(!eps.contains(&server_pods[1].ip.to_string()), "{eps}");
    Ok(())
}
