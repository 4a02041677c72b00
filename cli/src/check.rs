//! `meshctl check [--pre]`: what `linkerd check` does, for this mesh. Each check prints ✔ or
//! ✖ with what to do about it, and meshctl exits 1 if any failed. Kubernetes is reached with
//! the kubeconfig (`--context`); the control plane with the usual admin connection
//! (`--server`, a token, `--ca-file`). Without a kubeconfig only the control-plane checks run
//! (VMs).

use crate::client::Admin;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use mesh_proto::v1 as pb;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Before an install: the cluster can take it.
    #[arg(long)]
    pub pre: bool,
    /// The namespace the mesh is (or will be) installed in.
    #[arg(long, default_value = "mesh-system")]
    pub mesh_namespace: String,
    /// A certificate expiring sooner than this fails (e.g. 1h).
    #[arg(long, default_value = "1h")]
    pub cert_margin: String,
    /// Largest clock difference with the API server, seconds.
    #[arg(long, default_value_t = 5)]
    pub max_clock_skew_secs: u64,
}

/// The oldest Kubernetes the install is written for.
const MIN_MINOR: u32 = 33;

/// What the checks found.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: impl std::fmt::Display) {
        println!("✔ {what}");
    }
    fn fail(&mut self, what: impl std::fmt::Display, fix: impl std::fmt::Display) {
        println!("✖ {what}\n    → {fix}");
        self.failed += 1;
    }
    fn note(&mut self, what: impl std::fmt::Display) {
        println!("· {what}");
    }
    fn check(&mut self, pass: bool, what: impl std::fmt::Display, fix: impl std::fmt::Display) {
        if pass {
            self.ok(what)
        } else {
            self.fail(what, fix)
        }
    }
}

/// Runs the checks; an error when any failed.
pub async fn run(cli: &crate::Cli, args: &CheckArgs) -> anyhow::Result<()> {
    let mut r = Report::default();
    let kube = kube_client(cli.context.as_deref()).await;
    match &kube {
        Ok(k) => kubernetes(&mut r, k, args).await,
        Err(e) if args.pre => r.fail(
            format!("Kubernetes API: {e}"),
            "give a kubeconfig (KUBECONFIG, ~/.kube/config) and --context",
        ),
        Err(e) => r.note(format!(
            "no Kubernetes API ({e}): only the control plane is checked"
        )),
    }
    if !args.pre {
        control_plane(&mut r, cli, args, kube.as_ref().ok()).await;
    }
    if r.failed > 0 {
        anyhow::bail!("{} check(s) failed", r.failed);
    }
    println!("all checks passed");
    Ok(())
}

async fn kube_client(context: Option<&str>) -> anyhow::Result<kube::Client> {
    Ok(kube::Client::try_from(
        crate::client::kube_config(context).await?,
    )?)
}

/// The API server's version and clock, then `--pre`'s or the install's checks.
async fn kubernetes(r: &mut Report, client: &kube::Client, args: &CheckArgs) {
    let req = match http::Request::get("/version").body(Vec::new()) {
        Ok(req) => req,
        Err(e) => return r.fail(format!("Kubernetes API: {e}"), "report a bug"),
    };
    let (version, date) = match client.send(req.map(kube::client::Body::from)).await {
        Ok(resp) => {
            let date = resp
                .headers()
                .get(http::header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(http_date_unix);
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (v, date)
        }
        Err(e) => {
            return r.fail(
                format!("Kubernetes API reachable: {e}"),
                "check the kubeconfig's cluster address and credentials (kubectl version)",
            );
        }
    };
    let minor: u32 = version["minor"]
        .as_str()
        .map(|m| m.trim_end_matches('+'))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let major = version["major"].as_str().unwrap_or("?");
    r.check(
        major == "1" && minor >= MIN_MINOR,
        format!("Kubernetes API reachable, version {major}.{minor} (needs 1.{MIN_MINOR} or later)"),
        "upgrade the cluster, or use a meshctl whose install targets it",
    );
    if let Some(server) = date {
        let skew = (server - now_unix()).unsigned_abs();
        r.check(
            skew <= args.max_clock_skew_secs,
            format!(
                "clock within {} s of the API server's ({skew} s apart)",
                args.max_clock_skew_secs
            ),
            "synchronise this machine's clock (NTP): certificates and leases depend on it",
        );
    }
    if args.pre {
        pre(r, client, args).await;
    } else {
        installed(r, client, args).await;
    }
}

/// Before an install: the namespace is free and the caller may create what install makes.
async fn pre(r: &mut Report, client: &kube::Client, args: &CheckArgs) {
    let ns = args.mesh_namespace.as_str();
    match Api::<Namespace>::all(client.clone()).get_opt(ns).await {
        Ok(None) => r.ok(format!("namespace {ns} is free")),
        Ok(Some(_)) => r.fail(
            format!("namespace {ns} exists"),
            "the mesh may be installed already (meshctl check), or install elsewhere (--set namespace=…)",
        ),
        Err(e) => r.fail(format!("namespace {ns}: {e}"), "check your permissions"),
    }
    let needs: [(&str, &str, Option<&str>); 9] = [
        ("", "namespaces", None),
        ("apiextensions.k8s.io", "customresourcedefinitions", None),
        ("rbac.authorization.k8s.io", "clusterroles", None),
        ("rbac.authorization.k8s.io", "clusterrolebindings", None),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
        ),
        ("", "serviceaccounts", Some(ns)),
        ("", "secrets", Some(ns)),
        ("", "services", Some(ns)),
        ("apps", "deployments", Some(ns)),
    ];
    let api = Api::<SelfSubjectAccessReview>::all(client.clone());
    for (group, resource, namespace) in needs {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    verb: Some("create".into()),
                    namespace: namespace.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = api
            .create(&PostParams::default(), &review)
            .await
            .ok()
            .and_then(|a| a.status)
            .is_some_and(|s| s.allowed);
        r.check(
            allowed,
            format!("may create {resource}"),
            format!("ask a cluster admin for create on {resource} (or to run the install)"),
        );
    }
}

/// After an install: CRDs established, control plane ready, webhook configured.
async fn installed(r: &mut Report, client: &kube::Client, args: &CheckArgs) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in mesh_crds::all() {
        let name = crd.metadata.name.unwrap_or_default();
        let established = match crds.get_opt(&name).await {
            Ok(Some(c)) => c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True"),
            _ => false,
        };
        r.check(
            established,
            format!("CRD {name} established"),
            "meshctl install | kubectl apply -f -",
        );
    }
    let ns = args.mesh_namespace.as_str();
    let deploys = Api::<Deployment>::namespaced(client.clone(), ns);
    match deploys.get_opt("mesh-control-plane").await {
        Ok(Some(d)) => {
            let want = d.spec.and_then(|s| s.replicas).unwrap_or(1);
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            r.check(
                ready >= 1 && ready >= want,
                format!("control plane ready ({ready}/{want} replicas)"),
                format!("kubectl -n {ns} describe deployment mesh-control-plane; kubectl -n {ns} logs deploy/mesh-control-plane"),
            );
        }
        _ => r.fail(
            format!("control plane Deployment {ns}/mesh-control-plane exists"),
            "meshctl install | kubectl apply -f -",
        ),
    }
}

/// The control plane's own view: its version and its proxies; the webhook's CA against the
/// mesh's roots.
async fn control_plane(
    r: &mut Report,
    cli: &crate::Cli,
    args: &CheckArgs,
    kube: Option<&kube::Client>,
) {
    let fix = format!(
        "reach the admin API: kubectl -n {} port-forward svc/mesh-control-plane 15011, then \
         --server https://127.0.0.1:15011 with a token (MESH_ADMIN_TOKEN) and --ca-file",
        args.mesh_namespace
    );
    let mut c: Admin = match crate::client::connect(cli).await {
        Ok(c) => c,
        Err(e) => return r.fail(format!("control plane's admin API: {e:#}"), fix),
    };
    let client_version = env!("CARGO_PKG_VERSION");
    let v = match c.get_version(pb::GetVersionRequest {}).await {
        Ok(v) => v.into_inner(),
        Err(e) => return r.fail(format!("control plane's admin API: {}", e.message()), fix),
    };
    r.check(
        v.control_plane == client_version,
        format!("control plane version {} (meshctl {client_version})", v.control_plane),
        "use the meshctl of the installed version, or upgrade: meshctl install --no-secrets | kubectl apply -f -",
    );
    if let (Some(k), Ok(ca)) = (kube, c.get_ca(pb::GetCaRequest {}).await) {
        webhook(r, k, &ca.into_inner()).await;
    }
    let proxies = match c.list_proxies(pb::ListProxiesRequest {}).await {
        Ok(p) => p.into_inner(),
        Err(e) => return r.fail(format!("proxies: {}", e.message()), fix),
    };
    crate::output::unreachable_replicas(&proxies.unreachable_replicas);
    r.check(
        proxies.unreachable_replicas.is_empty(),
        "every control-plane replica answered",
        "see the replicas' logs; their proxies are not checked",
    );
    let margin = crate::parse_duration_secs(&args.cert_margin).unwrap_or(3600) as i64;
    let now = now_unix();
    let n = proxies.proxies.len();
    let not_acked: Vec<&str> = proxies
        .proxies
        .iter()
        .filter(|p| p.acked_version == 0 || p.nacked_version > p.acked_version)
        .map(|p| p.id.as_str())
        .collect();
    r.check(
        not_acked.is_empty(),
        format!("{} of {n} proxies run an ACKed config", n - not_acked.len()),
        format!(
            "meshctl proxies shows each NACK's reason; these have none ACKed or a later NACK: {}",
            not_acked.join(", ")
        ),
    );
    let expiring: Vec<String> = proxies
        .proxies
        .iter()
        .filter(|p| p.cert_expires_unix > 0 && p.cert_expires_unix < now + margin)
        .map(|p| p.id.clone())
        .collect();
    r.check(
        expiring.is_empty(),
        format!("no proxy certificate expires within {}", args.cert_margin),
        format!(
            "these proxies cannot renew (their logs say why; meshctl ca status): {}",
            expiring.join(", ")
        ),
    );
    let other: Vec<String> = proxies
        .proxies
        .iter()
        .filter(|p| !p.proxy_version.is_empty() && p.proxy_version != v.control_plane)
        .map(|p| format!("{} ({})", p.id, p.proxy_version))
        .collect();
    r.check(
        other.is_empty(),
        format!(
            "proxies run the control plane's version {}",
            v.control_plane
        ),
        format!(
            "restart these workloads to inject the current proxy: {}",
            other.join(", ")
        ),
    );
}

/// The injection webhook's caBundle holds the mesh's roots, so the API server trusts the
/// control plane's webhook certificate.
async fn webhook(r: &mut Report, client: &kube::Client, ca: &pb::CaInfo) {
    use rustls_pki_types::pem::PemObject;
    use sha2::Digest as _;
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let Ok(Some(h)) = hooks.get_opt("mesh-sidecar-injector").await else {
        return r.fail(
            "webhook configuration mesh-sidecar-injector exists",
            "meshctl install | kubectl apply -f -",
        );
    };
    let roots: Vec<&str> = ca.roots.iter().map(|r| r.fingerprint.as_str()).collect();
    let ok = h.webhooks.iter().flatten().all(|w| {
        // k8s-openapi has decoded the base64 already: these are the PEM bytes.
        let pem = w
            .client_config
            .ca_bundle
            .as_ref()
            .map_or(&[][..], |b| &b.0[..]);
        let found: Vec<String> = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .filter_map(Result::ok)
            .map(|d| hex::encode(sha2::Sha256::digest(d.as_ref())))
            .collect();
        !roots.is_empty() && roots.iter().all(|r| found.iter().any(|f| f == r))
    });
    r.check(
        ok,
        "webhook caBundle holds the mesh's roots",
        "the control plane keeps it in step: is it running with --kubernetes? (kubectl get mutatingwebhookconfiguration mesh-sidecar-injector -o yaml)",
    );
    // What the API server does at each admission: reach the webhook's Service and verify its
    // certificate against the caBundle. Here through a port-forward to a control-plane pod.
    let Some(hook) = h.webhooks.as_ref().and_then(|w| w.first()) else {
        return;
    };
    let Some(svc) = hook.client_config.service.as_ref() else {
        return r.note("the webhook calls a URL, not a Service: not probed");
    };
    let pem = hook
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let name = format!("{}.{}.svc", svc.name, svc.namespace);
    let reached = match webhook_handshake(client, &svc.namespace, &pem, &name).await {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("{e:#}")),
    };
    r.check(
        reached.is_ok(),
        format!(
            "webhook {name} answers TLS with a certificate the caBundle verifies{}",
            reached.as_ref().err().map(|e| format!(": {e}")).unwrap_or_default()
        ),
        "the webhook's serving certificate must name the Service (--server-name); see the control plane's log",
    );
}

/// The port the control plane serves the injection webhook on, in its pod.
const WEBHOOK_PORT: u16 = 15017;

/// A TLS handshake with the webhook port of a control-plane pod, verifying its certificate
/// as `name` against `ca_pem`.
async fn webhook_handshake(
    client: &kube::Client,
    ns: &str,
    ca_pem: &[u8],
    name: &str,
) -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns);
    let pod = crate::client::control_plane_pod(&pods, ns).await?;
    let io = crate::client::port_forward(&pods, &pod, WEBHOOK_PORT).await?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        connector.connect(server, io),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no handshake within 10 s"))??;
    Ok(())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An HTTP date (`Sun, 06 Dec 2026 22:01:05 GMT`) as Unix seconds.
fn http_date_unix(s: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(s).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates_parse() {
        assert_eq!(
            super::http_date_unix("Sun, 06 Dec 2026 22:01:05 GMT"),
            Some(1_796_594_465)
        );
        assert_eq!(super::http_date_unix("yesterday"), None);
    }
}
