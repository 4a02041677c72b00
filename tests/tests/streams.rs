//! End-to-end tests of streams of every shape through the sidecar pair: gRPC unary, server,
//! client and bidirectional streaming (grpcurl and tonic as callers), trailers end to end,
//! 100 MB uploads and downloads with the sidecars' memory flat (curl and a Node.js app), and a
//! route's stream idle timeout ending a stalled body.

use mesh_proto::example::{EchoRequest, echo_client::EchoClient};
use mesh_tests::peers::{self, grpcurl};
use mesh_tests::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Issue 24 item 6: every gRPC call shape crosses the pair, with trailers end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_shape_cross_the_pair() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (app, _) = mesh.workload_app("backend", "v1").await?;
    let c = mesh.client("web").await?;
    mesh.wait_endpoints("backend", 1).await?;

    let (ok, out, err) = grpcurl(c.outbound, "backend", "Unary", r#"{"message":"hi"}"#).await?;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["message"], "hi");
    assert_eq!(v["servedBy"], "backend/v1");
    assert_eq!(v["peerIdentity"], "spiffe://mesh.local/ns/default/sa/web");

    let (ok, out, err) = grpcurl(
        c.outbound,
        "backend",
        "ServerStream",
        r#"{"message":"s","count":3}"#,
    )
    .await?;
    assert!(ok, "{err}");
    for i in 0..3 {
        assert!(out.contains(&format!("\"s {i}\"")), "{out}");
    }

    let (ok, out, err) = grpcurl(
        c.outbound,
        "backend",
        "ClientStream",
        r#"{"message":"a"} {"message":"b"} {"message":"c"}"#,
    )
    .await?;
    assert!(ok, "{err}");
    assert!(out.contains("\"a b c (3)\""), "{out}");

    let (ok, out, err) = grpcurl(
        c.outbound,
        "backend",
        "BidiStream",
        r#"{"message":"x"} {"message":"y"}"#,
    )
    .await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("\"echo x\"") && out.contains("\"echo y\""),
        "{out}"
    );

    // Bidirectional for real: each answer arrives before the next message is sent, so neither
    // sidecar may hold a direction until the other ends.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.outbound))?
        .origin("http://backend".parse()?)
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut echo = EchoClient::new(channel);
    let send = |m: &str| EchoRequest {
        message: m.into(),
        ..Default::default()
    };
    tx.send(send("one")).await?;
    let mut answers = echo
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for next in ["two", "three", ""] {
        let got = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .map_err(|_| anyhow::anyhow!("no answer before the next message was sent"))??
            .ok_or_else(|| anyhow::anyhow!("stream ended early"))?;
        assert!(got.message.starts_with("echo "), "{got:?}");
        if next.is_empty() {
            break;
        }
        tx.send(send(next)).await?;
    }
    drop(tx);
    assert!(
        answers.message().await?.is_none(),
        "ends when the client's side ends"
    );

    // Trailers end to end: a sick app's stream ends with UNAVAILABLE after its items, and
    // grpcurl, behind two sidecars, reports both.
    admin_get(app, "/admin/sick/100").await?;
    let (ok, out, err) = grpcurl(
        c.outbound,
        "backend",
        "ServerStream",
        r#"{"message":"s","count":2}"#,
    )
    .await?;
    assert!(!ok);
    assert!(out.contains("\"s 1\""), "{out}");
    assert!(
        err.contains("Code: Unavailable") && err.contains("sick on purpose"),
        "{err}"
    );
    Ok(())
}

/// A Node.js app behind a sidecar, and a client sidecar serving it on a fixed port.
async fn bulk(mesh: &mut Mesh) -> anyhow::Result<(Sidecar, Sidecar, SocketAddr)> {
    let node = peers::node_app(mesh).await?;
    let server = mesh.front("bulk", node, &[]).await?;
    let (client, fixed) = mesh.client_with_upstream("bulk").await?;
    mesh.wait_endpoints("bulk", 1).await?;
    Ok((server, client, fixed))
}

/// Runs curl with `args`, returning stdout; fails with its stderr.
async fn curl_out(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "100"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Issue 24 item 6: 100 MB up and 100 MB down through the pair; neither sidecar's peak
/// resident memory grows by 16 MB (bodies stream under flow control, nothing buffers them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_keep_sidecar_memory_flat() -> anyhow::Result<()> {
    const SIZE: u64 = 100 * 1024 * 1024;
    const GROWTH: u64 = 16 * 1024 * 1024;
    peers::require("curl")?;
    let mut mesh = Mesh::start().await?;
    let (server, client, fixed) = bulk(&mut mesh).await?;
    let pids = [server.proc_index, client.proc_index].map(|i| mesh.procs[i].pid());
    // Warm: connections, certificates and config are in place before the first reading.
    assert!(
        !curl_out(&[&format!("http://{fixed}/hello")])
            .await?
            .is_empty()
    );
    let before: Vec<u64> = pids
        .iter()
        .map(|p| peers::vm_hwm(p.unwrap_or_default()))
        .collect::<anyhow::Result<_>>()?;

    let file = mesh.dir.path().join("upload.bin");
    std::fs::File::create(&file)?.set_len(SIZE)?;
    let up = curl_out(&[
        "-X",
        "POST",
        "-T",
        &file.to_string_lossy(),
        &format!("http://{fixed}/sink"),
    ])
    .await?;
    assert_eq!(up.trim(), SIZE.to_string(), "the app read every byte");
    let down = curl_out(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{fixed}/bytes/{SIZE}"),
    ])
    .await?;
    assert_eq!(down.trim(), SIZE.to_string(), "every byte came back");

    for (who, (pid, was)) in ["server sidecar", "client sidecar"]
        .iter()
        .zip(pids.iter().zip(&before))
    {
        let now = peers::vm_hwm(pid.unwrap_or_default())?;
        eprintln!("{who}: VmHWM {was} → {now} bytes");
        assert!(
            now.saturating_sub(*was) < GROWTH,
            "{who}: VmHWM {} → {} MiB",
            was / (1 << 20),
            now / (1 << 20)
        );
    }
    Ok(())
}

/// Issue 24 item 6: a route's stream idle timeout ends an answer whose body stalls; without
/// it the stalled body is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_ended_by_the_stream_idle_timeout() -> anyhow::Result<()> {
    let mut mesh = Mesh::start().await?;
    let (_server, client, fixed) = bulk(&mut mesh).await?;
    let url = format!("http://{fixed}/stall/3000");
    // No timeout: the whole body arrives, three seconds late.
    let t = Instant::now();
    let (status, body) = peers::curl(&[&url]).await?;
    assert_eq!(status, 200);
    assert_eq!(body, "first chunk\nlate chunk\n");
    assert!(t.elapsed() >= Duration::from_millis(2900));

    mesh.set_policy(
        client.admin,
        "bulk",
        &["--stream-idle-timeout", "500ms"],
        &["stream_idle_timeout: Some(500ms)"],
    )
    .await?;
    let t = Instant::now();
    let (status, body) = peers::curl(&[&url]).await?;
    let took = t.elapsed();
    assert_eq!(status, 200, "the head had come");
    assert_eq!(body, "first chunk\n", "ended before the late chunk");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "ended after {took:?}"
    );
    Ok(())
}
