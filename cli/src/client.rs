//! The admin API client: TLS to the control plane plus the bearer token.

use super::Cli;
use anyhow::Context;
use mesh_proto::v1::admin_client::AdminClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

type Ascii = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// Adds `authorization: Bearer <token>` to every call, and the namespace of bare service
/// names (`-n`) when one is given.
#[derive(Clone)]
pub struct BearerToken(Ascii, Option<Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        if let Some(ns) = &self.1 {
            req.metadata_mut()
                .insert(mesh_proto::NAMESPACE_HEADER, ns.clone());
        }
        Ok(req)
    }
}

/// Creates a bootstrap token for `<namespace>/<service-account>`; `ttl_seconds` 0 is the default.
pub async fn bootstrap_token(
    admin: &mut Admin,
    identity: &str,
    ttl_seconds: u64,
) -> anyhow::Result<String> {
    let r = admin
        .create_token(mesh_proto::v1::CreateTokenRequest {
            identity: identity.to_string(),
            ttl_seconds,
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().token)
}

/// Connects to an admin API (bare service names are in namespace `default`).
pub async fn connect_with(server: &str, token: &str, ca_pem: &str) -> anyhow::Result<Admin> {
    connect_in(server, token, ca_pem, None).await
}

/// Connects to an admin API; bare service names are in `namespace` when given.
pub async fn connect_in(
    server: &str,
    token: &str,
    ca_pem: &str,
    namespace: Option<&str>,
) -> anyhow::Result<Admin> {
    let channel = Endpoint::from_shared(server.to_string())
        .with_context(|| format!("invalid --server {server:?}"))?
        .tls_config(tls(ca_pem))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {server}"))?;
    admin_over(channel, token, namespace)
}

/// TLS to the control plane, verified as its server name against `ca_pem`.
fn tls(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(mesh_proto::CONTROL_PLANE_SERVER_NAME)
}

/// The admin client on `channel`, presenting `token` (and `namespace` for bare names).
fn admin_over(channel: Channel, token: &str, namespace: Option<&str>) -> anyhow::Result<Admin> {
    let value = format!("Bearer {token}")
        .parse()
        .context("admin token has invalid characters")?;
    let ns = namespace
        .map(|n| n.parse().context("namespace has invalid characters"))
        .transpose()?;
    Ok(AdminClient::new(InterceptedService::new(
        channel,
        BearerToken(value, ns),
    )))
}

/// Connects using the CLI's flags, falling back to the local data dir for token and CA.
pub async fn connect(cli: &Cli) -> anyhow::Result<Admin> {
    if let Some(ns) = cli.server.strip_prefix("kube://") {
        return connect_through_kube(cli, ns).await;
    }
    let token = match &cli.token {
        Some(t) => t.clone(),
        None => {
            let p = cli.data_dir.join("admin-token");
            match std::fs::read_to_string(&p) {
                Ok(t) => t.trim().to_string(),
                Err(e) => async { kube_token(&kube_config(cli.context.as_deref()).await?) }
                    .await
                    .with_context(|| {
                        format!(
                            "no --token given, cannot read {} ({e}), and no token in a kubeconfig",
                            p.display()
                        )
                    })?,
            }
        }
    };
    let ca_path = cli
        .ca_file
        .clone()
        .unwrap_or_else(|| cli.data_dir.join("ca").join("bundle.pem"));
    let ca = std::fs::read_to_string(&ca_path).with_context(|| {
        format!(
            "cannot read the CA certificate {} (set --ca-file)",
            ca_path.display()
        )
    })?;
    connect_in(&cli.server, &token, &ca, Some(&cli.namespace)).await
}

/// The kubeconfig's configuration (of `context`, or the current one), or in a pod the
/// in-cluster one when no kubeconfig and no context are given.
pub async fn kube_config(context: Option<&str>) -> anyhow::Result<kube::Config> {
    let opts = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    match kube::Config::from_kubeconfig(&opts).await {
        Ok(c) => Ok(c),
        Err(e) if context.is_none() => {
            kube::Config::incluster().map_err(|_| anyhow::anyhow!("{e}"))
        }
        Err(e) => Err(e.into()),
    }
}

/// The bearer token of a kubeconfig's user: on Kubernetes the control plane maps it to mesh
/// scopes through RBAC. Users that authenticate otherwise (client certificates, exec plugins)
/// give a mesh credential with --token instead.
fn kube_token(config: &kube::Config) -> anyhow::Result<String> {
    use secrecy::ExposeSecret;
    if let Some(t) = &config.auth_info.token {
        return Ok(t.expose_secret().trim().to_string());
    }
    if let Some(f) = &config.auth_info.token_file {
        return Ok(std::fs::read_to_string(f)
            .with_context(|| format!("the kubeconfig's token file {f}"))?
            .trim()
            .to_string());
    }
    anyhow::bail!("the kubeconfig's user has no bearer token")
}

/// The admin port of a control-plane pod.
const ADMIN_PORT: u16 = 15011;

/// `--server kube://<namespace>`: the admin API of a ready control-plane pod of that
/// namespace, through the API server's port-forward (as `kubectl port-forward` does), with the
/// kubeconfig's credentials, verified against the trust bundle the control plane publishes
/// there (ConfigMap `mesh-ca-bundle`) unless --ca-file names one.
async fn connect_through_kube(cli: &Cli, ns: &str) -> anyhow::Result<Admin> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::Api;
    // One kubeconfig read: the API client and the token both come from it.
    let config = kube_config(cli.context.as_deref()).await?;
    let token = match &cli.token {
        Some(t) => t.clone(),
        None => kube_token(&config)?,
    };
    let kube = kube::Client::try_from(config)?;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), ns);
    let pod = control_plane_pod(&pods, ns).await?;
    let ca = match &cli.ca_file {
        Some(p) => std::fs::read_to_string(p).with_context(|| p.display().to_string())?,
        None => Api::<ConfigMap>::namespaced(kube.clone(), ns)
            .get("mesh-ca-bundle")
            .await
            .ok()
            .and_then(|c| c.data?.get("bundle.pem").cloned())
            .ok_or_else(|| {
                anyhow::anyhow!("no trust bundle in ConfigMap {ns}/mesh-ca-bundle: give --ca-file")
            })?,
    };
    let connector = tower::service_fn(move |_: http::Uri| {
        let (pods, pod) = (pods.clone(), pod.clone());
        async move {
            let stream = port_forward(&pods, &pod, ADMIN_PORT).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_static("https://mesh-control-plane:15011")
        .tls_config(tls(&ca))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .with_context(|| {
            format!("cannot reach the control plane through a port-forward to {ns}")
        })?;
    admin_over(channel, &token, Some(&cli.namespace))
}

/// A running control-plane pod of namespace `ns`.
pub(crate) async fn control_plane_pod(
    pods: &kube::api::Api<k8s_openapi::api::core::v1::Pod>,
    ns: &str,
) -> anyhow::Result<String> {
    let list = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=mesh-control-plane"))
        .await
        .with_context(|| format!("control-plane pods in namespace {ns}"))?;
    list.items
        .iter()
        .find(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.phase.as_deref() == Some("Running"))
        })
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no running control-plane pod in namespace {ns}"))
}

/// A connection to `port` of `pod` through the API server's port-forward.
pub(crate) async fn port_forward(
    pods: &kube::api::Api<k8s_openapi::api::core::v1::Pod>,
    pod: &str,
    port: u16,
) -> std::io::Result<tokio::io::DuplexStream> {
    let mut forward = pods
        .portforward(pod, &[port])
        .await
        .map_err(std::io::Error::other)?;
    let stream = forward
        .take_stream(port)
        .ok_or_else(|| std::io::Error::other("port-forward gave no stream"))?;
    tokio::spawn(async move {
        if let Err(e) = forward.join().await {
            tracing::debug!(error = %e, "port-forward ended");
        }
    });
    Ok(stream)
}
