//! Sidecar injection: the same pure function serves the Kubernetes mutating webhook
//! (`review.rs`, a JSONPatch from the difference, served by the control plane) and
//! `meshctl inject -f` (`manifest.rs`, any manifest with pod templates). A crate of its own so
//! that meshctl gets it without the control plane's Kubernetes client and stores.
//!
//! A pod gets, ahead of its own init containers: `mesh-init` (installs the iptables redirect,
//! then exits) and `mesh-proxy` as a native sidecar (an init container with `restartPolicy:
//! Always` whose startup probe on `/ready` holds the app containers back until the proxy has
//! its certificate and first config). Idempotent: a pod that has `mesh-proxy` is left alone.

pub mod gateway;
pub mod manifest;
pub mod probes;
pub mod review;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Annotation (and pod label, for the webhook's object selector) that opts a pod in or out.
pub const INJECT: &str = "mesh.io/inject";
/// Set on injected pods, with the proxy version.
pub const INJECTED: &str = "mesh.io/injected";
pub const PROXY_CONTAINER: &str = "mesh-proxy";
pub const INIT_CONTAINER: &str = "mesh-init";

/// The proxy's admin port's name in the pod (what a PodMonitor selects).
pub const ADMIN_PORT_NAME: &str = "mesh-admin";

/// Prometheus's pod annotations (the convention its Kubernetes example config and most
/// charts relabel on): the injector points them at the proxy's `/metrics`.
pub const SCRAPE: &str = "prometheus.io/scrape";
pub const SCRAPE_PORT: &str = "prometheus.io/port";
pub const SCRAPE_PATH: &str = "prometheus.io/path";

fn scrape_annotations() -> [(&'static str, String); 3] {
    [
        (SCRAPE, "true".into()),
        (SCRAPE_PORT, ADMIN_PORT.to_string()),
        (SCRAPE_PATH, "/metrics".into()),
    ]
}

/// Ports inside the pod; fixed so the iptables rules and the proxy agree.
pub const INBOUND_PORT: i32 = 15006;
pub const OUTBOUND_PORT: i32 = 15001;
pub const ADMIN_PORT: i32 = 15000;
/// The proxy's user id: the redirect skips its own traffic by this uid.
pub const PROXY_UID: i64 = 2102;
const CA_DIR: &str = "/var/run/mesh/ca";
const TOKEN_DIR: &str = "/var/run/secrets/mesh";

/// Mesh-wide settings of injection.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub proxy_image: String,
    /// Address proxies dial, e.g. https://mesh-control-plane.mesh-system.svc:15010.
    pub control_plane: String,
    pub trust_domain: String,
    /// ConfigMap (in the pod's namespace) holding the trust bundle as `bundle.pem`.
    pub ca_config_map: String,
    /// Audience of the projected ServiceAccount token the proxy presents.
    pub token_audience: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: format!("mesh-proxy:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "https://mesh-control-plane.mesh-system.svc:15010".into(),
            trust_domain: "mesh.local".into(),
            ca_config_map: "mesh-ca-bundle".into(),
            token_audience: "mesh".into(),
        }
    }
}

/// Flags shared by the control plane (webhook) and `meshctl inject`.
#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// Image of the injected proxy (and of its init step).
    #[arg(long, env = "MESH_PROXY_IMAGE", default_value = concat!("mesh-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Control-plane address injected proxies dial.
    #[arg(
        long,
        env = "MESH_INJECT_CONTROL_PLANE",
        default_value = "https://mesh-control-plane.mesh-system.svc:15010"
    )]
    pub inject_control_plane: String,
    /// ConfigMap in each namespace holding the trust bundle (key bundle.pem).
    #[arg(long, default_value = "mesh-ca-bundle")]
    pub ca_config_map: String,
}

impl InjectArgs {
    pub fn config(&self) -> InjectConfig {
        InjectConfig {
            proxy_image: self.proxy_image.clone(),
            control_plane: self.inject_control_plane.clone(),
            ca_config_map: self.ca_config_map.clone(),
            ..InjectConfig::default()
        }
    }
}

/// What injection did to a pod.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Injected(Value),
    /// Left as it was, and why.
    Skipped(&'static str),
}

/// A pod's annotation that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{annotation}: {reason}")]
pub struct InjectError {
    pub annotation: String,
    pub reason: String,
}

fn bad(annotation: &str, reason: impl Into<String>) -> InjectError {
    InjectError {
        annotation: annotation.into(),
        reason: reason.into(),
    }
}

/// Injects into a pod (or pod template): `pod` has `metadata` and `spec`.
pub fn inject_pod(pod: &Value, cfg: &InjectConfig) -> Result<Outcome, InjectError> {
    let meta = &pod["metadata"];
    let spec = &pod["spec"];
    let annotations = |k: &str| meta["annotations"][k].as_str();
    let label = |k: &str| meta["labels"][k].as_str();
    if !spec.is_object() {
        return Err(bad("spec", "the pod has no spec"));
    }
    if annotations(INJECT) == Some("disabled") || label(INJECT) == Some("disabled") {
        return Ok(Outcome::Skipped("opted out (mesh.io/inject: disabled)"));
    }
    let has = |list: &str, name: &str| {
        spec[list]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
    };
    if has("initContainers", PROXY_CONTAINER) || has("containers", PROXY_CONTAINER) {
        return Ok(Outcome::Skipped("already injected"));
    }
    if spec["hostNetwork"] == true {
        return Ok(Outcome::Skipped(
            "hostNetwork pods share the node's network; not injected",
        ));
    }
    let mut opts = PodOptions::read(pod)?;
    let mut out = pod.clone();
    let rewritten = match (
        annotations(probes::REWRITE_PROBES),
        out["spec"]["containers"].as_array_mut(),
    ) {
        (Some("false"), _) | (_, None) => probes::Rewritten::default(),
        (_, Some(containers)) => probes::rewrite(containers)?,
    };
    if !rewritten.proxy_env.is_empty() {
        opts.app_probes = Some(Value::Object(rewritten.proxy_env).to_string());
    }
    let spec = out["spec"]
        .as_object_mut()
        .ok_or_else(|| bad("spec", "not an object"))?;
    let mut inits = vec![
        to_value(init_container(cfg, &opts))?,
        to_value(proxy_container(cfg, &opts))?,
    ];
    if let Some(Value::Array(existing)) = spec.remove("initContainers") {
        inits.extend(existing);
    }
    spec.insert("initContainers".into(), Value::Array(inits));
    let volumes = spec
        .entry("volumes")
        .or_insert_with(|| Value::Array(vec![]));
    let Value::Array(volumes) = volumes else {
        return Err(bad("spec.volumes", "not a list"));
    };
    volumes.extend([to_value(ca_volume(cfg))?, to_value(token_volume(cfg))?]);
    let meta = out
        .as_object_mut()
        .ok_or_else(|| bad("pod", "not an object"))?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let Value::Object(meta) = meta else {
        return Err(bad("metadata", "not an object"));
    };
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(annotations) = annotations else {
        return Err(bad("metadata.annotations", "not an object"));
    };
    annotations.insert(INJECTED.into(), json!(env!("CARGO_PKG_VERSION")));
    // Prometheus's usual pod annotations, pointing at the proxy's /metrics, unless the pod
    // already asks to be scraped itself (its own metrics keep the annotations).
    if !annotations.contains_key(SCRAPE) {
        for (k, v) in scrape_annotations() {
            annotations.insert(k.into(), json!(v));
        }
    }
    if !rewritten.originals.is_empty() {
        annotations.insert(
            probes::ORIGINAL_PROBES.into(),
            json!(Value::Object(rewritten.originals).to_string()),
        );
    }
    Ok(Outcome::Injected(out))
}

/// Undoes [`inject_pod`]: the mesh's init containers, volumes and annotations go, and the app
/// containers get their original probes back (from `mesh.io/original-probes`).
pub fn uninject_pod(pod: &Value) -> Result<Outcome, InjectError> {
    let is_mesh = |c: &Value| c["name"] == PROXY_CONTAINER || c["name"] == INIT_CONTAINER;
    let injected = pod["spec"]["initContainers"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(is_mesh));
    if !injected {
        return Ok(Outcome::Skipped("not injected"));
    }
    let mut out = pod.clone();
    let originals: Option<Map<String, Value>> = pod["metadata"]["annotations"]
        [probes::ORIGINAL_PROBES]
        .as_str()
        .map(|s| {
            serde_json::from_str(s)
                .map_err(|e| bad(probes::ORIGINAL_PROBES, format!("not a JSON object: {e}")))
        })
        .transpose()?;
    if let Some(cs) = out["spec"]["initContainers"].as_array_mut() {
        cs.retain(|c| !is_mesh(c));
        if cs.is_empty()
            && let Some(spec) = out["spec"].as_object_mut()
        {
            spec.remove("initContainers");
        }
    }
    if let Some(vs) = out["spec"]["volumes"].as_array_mut() {
        vs.retain(|v| v["name"] != "mesh-ca" && v["name"] != "mesh-token");
        if vs.is_empty()
            && let Some(spec) = out["spec"].as_object_mut()
        {
            spec.remove("volumes");
        }
    }
    if let (Some(o), Some(cs)) = (&originals, out["spec"]["containers"].as_array_mut()) {
        probes::restore(cs, o);
    }
    if let Some(a) = out["metadata"]["annotations"].as_object_mut() {
        a.remove(INJECTED);
        a.remove(probes::ORIGINAL_PROBES);
        // Only the scrape annotations that point at the proxy are ours.
        if a.get(SCRAPE_PORT).and_then(Value::as_str) == Some(&ADMIN_PORT.to_string()) {
            for (k, _) in scrape_annotations() {
                a.remove(k);
            }
        }
        if a.is_empty()
            && let Some(m) = out["metadata"].as_object_mut()
        {
            m.remove("annotations");
        }
    }
    Ok(Outcome::Injected(out))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| bad("(internal)", e.to_string()))
}

/// What a pod's labels and `mesh.io/*` annotations ask for.
#[derive(Debug, Default)]
struct PodOptions {
    service: Option<String>,
    version: Option<String>,
    /// The app's port: inbound traffic goes there. None: a client-only pod.
    app_port: Option<i32>,
    skip_inbound_ports: Vec<i32>,
    skip_outbound_ports: Vec<i32>,
    skip_outbound_cidrs: Vec<String>,
    image: Option<String>,
    resources: ResourceRequirements,
    /// What the app speaks on its port (`MESH_APP_PROTOCOL`): the `mesh.io/app-protocol`
    /// annotation, else the app port's name by Kubernetes' and Istio's convention
    /// (`grpc…`, `h2c…`, `http2…`: http2; `http…`: http1); None: the proxy detects.
    app_protocol: Option<&'static str>,
    /// Destination ports served opaque without detection (`MESH_OPAQUE_PORTS`).
    opaque_ports: Vec<i32>,
    /// The app containers' rewritten probes, for the proxy (`MESH_APP_PROBES`, `probes`).
    app_probes: Option<String>,
}

/// The HTTP protocol a port name names by Istio's convention (the model's reading of
/// Kubernetes ports); an opaque or unknown one is left to the proxy's detection.
fn app_protocol_of(name: &str) -> Option<&'static str> {
    use mesh_model::AppProtocol as A;
    match A::of_kubernetes_port(None, Some(name))? {
        a @ (A::Http1 | A::Http2) => Some(a.as_str()),
        A::Opaque => None,
    }
}

impl PodOptions {
    fn read(pod: &Value) -> Result<Self, InjectError> {
        let meta = &pod["metadata"];
        let ann = |k: &str| meta["annotations"][k].as_str().map(str::trim);
        let label = |k: &str| meta["labels"][k].as_str().map(str::to_string);
        let port = |key: &str, s: &str| -> Result<i32, InjectError> {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .map(i32::from)
                .ok_or_else(|| bad(key, format!("{s:?} is not a port (1-65535)")))
        };
        let ports = |key: &str| -> Result<Vec<i32>, InjectError> {
            ann(key)
                .filter(|s| !s.is_empty())
                .map(|s| s.split(',').map(|p| port(key, p)).collect())
                .unwrap_or(Ok(vec![]))
        };
        let tcp_ports = || {
            pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .filter(|p| p["protocol"].as_str().is_none_or(|x| x == "TCP"))
        };
        let app_port = match ann("mesh.io/app-port") {
            Some(p) => Some(port("mesh.io/app-port", p)?),
            None => tcp_ports()
                .next()
                .and_then(|p| p["containerPort"].as_i64())
                .and_then(|p| i32::try_from(p).ok()),
        };
        let app_protocol = match ann("mesh.io/app-protocol") {
            Some(v) => Some(match v {
                "http1" => "http1",
                "http2" => "http2",
                "detect" => "detect",
                other => {
                    return Err(bad(
                        "mesh.io/app-protocol",
                        format!("{other:?} is not http1, http2 or detect"),
                    ));
                }
            }),
            None => tcp_ports()
                .find(|p| p["containerPort"].as_i64().map(|x| x as i32) == app_port)
                .and_then(|p| p["name"].as_str())
                .and_then(app_protocol_of),
        };
        let mut skip_outbound_cidrs = Vec::new();
        if let Some(list) = ann("mesh.io/skip-outbound-cidrs").filter(|s| !s.is_empty()) {
            for c in list.split(',').map(str::trim) {
                if !valid_cidr(c) {
                    return Err(bad(
                        "mesh.io/skip-outbound-cidrs",
                        format!("{c:?} is not a CIDR (e.g. 10.0.0.0/8)"),
                    ));
                }
                skip_outbound_cidrs.push(c.to_string());
            }
        }
        let mut requests = BTreeMap::new();
        let mut limits = BTreeMap::new();
        for (key, is_limit, res, default) in [
            ("mesh.io/proxy-cpu-request", false, "cpu", Some("50m")),
            (
                "mesh.io/proxy-memory-request",
                false,
                "memory",
                Some("32Mi"),
            ),
            ("mesh.io/proxy-cpu-limit", true, "cpu", None),
            ("mesh.io/proxy-memory-limit", true, "memory", Some("256Mi")),
        ] {
            let map = if is_limit { &mut limits } else { &mut requests };
            match ann(key).or(default) {
                Some(q) if valid_quantity(q) => {
                    map.insert(res.to_string(), Quantity(q.to_string()));
                }
                Some(q) => {
                    return Err(bad(
                        key,
                        format!("{q:?} is not a quantity (e.g. 100m, 64Mi)"),
                    ));
                }
                None => {}
            }
        }
        Ok(Self {
            service: label("app.kubernetes.io/name").or_else(|| label("app")),
            version: label("app.kubernetes.io/version").or_else(|| label("version")),
            app_port,
            app_protocol,
            opaque_ports: ports("mesh.io/opaque-ports")?,
            skip_inbound_ports: ports("mesh.io/skip-inbound-ports")?,
            skip_outbound_ports: ports("mesh.io/skip-outbound-ports")?,
            skip_outbound_cidrs,
            image: ann("mesh.io/proxy-image")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            resources: ResourceRequirements {
                requests: Some(requests),
                limits: (!limits.is_empty()).then_some(limits),
                ..Default::default()
            },
            app_probes: None,
        })
    }
}

/// Kubernetes quantities: a decimal number with an optional suffix.
fn valid_quantity(q: &str) -> bool {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &q[digits.len()..];
    let number_ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && !digits.starts_with('.')
        && !digits.ends_with('.');
    number_ok
        && [
            "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ]
        .contains(&suffix)
}

fn valid_cidr(c: &str) -> bool {
    let Some((ip, len)) = c.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}

fn join(ports: &[i32]) -> String {
    ports
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The native sidecar. Configured through the environment (every proxy flag has a variable).
/// What every mesh proxy in a pod is told: who it is (from the pod), where the control plane
/// is, its trust bundle and token, and its outbound and admin listeners.
fn proxy_env(cfg: &InjectConfig) -> Vec<EnvVar> {
    vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("MESH_NAMESPACE", "metadata.namespace"),
        env_field("MESH_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_field("POD_IP", "status.podIP"),
        env("MESH_NODE_ID", "$(POD_NAME).$(MESH_NAMESPACE)"),
        env("MESH_CONTROL_PLANE", &cfg.control_plane),
        env("MESH_TRUST_DOMAIN", &cfg.trust_domain),
        env("MESH_CA_FILE", format!("{CA_DIR}/bundle.pem")),
        env("MESH_TOKEN_FILE", format!("{TOKEN_DIR}/token")),
        env("MESH_OUTBOUND_ADDR", format!("127.0.0.1:{OUTBOUND_PORT}")),
        env("MESH_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")),
    ]
}

/// The proxy's user, no privilege, read-only root.
fn proxy_security() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(PROXY_UID),
        run_as_group: Some(PROXY_UID),
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The trust bundle and the token, mounted where [`proxy_env`] says.
fn proxy_mounts() -> Vec<VolumeMount> {
    vec![
        VolumeMount {
            name: "mesh-ca".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "mesh-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ]
}

fn proxy_container(cfg: &InjectConfig, o: &PodOptions) -> Container {
    let mut vars = proxy_env(cfg);
    // mesh-init redirects the pod's traffic to the listeners.
    vars.push(env("MESH_TRANSPARENT", "true"));
    if let Some(p) = o.app_port {
        vars.extend([
            env("MESH_APP_PORT", p.to_string()),
            env("MESH_INBOUND_ADDR", format!("0.0.0.0:{INBOUND_PORT}")),
            env("MESH_ADVERTISE_ADDR", format!("$(POD_IP):{INBOUND_PORT}")),
        ]);
    }
    if let Some(p) = o.app_protocol {
        vars.push(env("MESH_APP_PROTOCOL", p));
    }
    if !o.opaque_ports.is_empty() {
        vars.push(env("MESH_OPAQUE_PORTS", join(&o.opaque_ports)));
    }
    if let Some(p) = &o.app_probes {
        vars.push(env("MESH_APP_PROBES", p));
    }
    if let Some(s) = &o.service {
        vars.push(env("MESH_SERVICE", s));
    }
    if let Some(v) = &o.version {
        vars.push(env("MESH_SERVICE_VERSION", v));
    }
    let mut ports = vec![ContainerPort {
        name: Some(ADMIN_PORT_NAME.into()),
        container_port: ADMIN_PORT,
        ..Default::default()
    }];
    if o.app_port.is_some() {
        ports.push(ContainerPort {
            name: Some("mesh-inbound".into()),
            container_port: INBOUND_PORT,
            ..Default::default()
        });
    }
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(o.image.clone().unwrap_or_else(|| cfg.proxy_image.clone())),
        restart_policy: Some("Always".into()),
        env: Some(vars),
        ports: Some(ports),
        resources: Some(o.resources.clone()),
        // Up to 2 minutes for the certificate and the first config; the app waits for it.
        startup_probe: Some(http_probe("/ready", 1, 120)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        security_context: Some(proxy_security()),
        volume_mounts: Some(proxy_mounts()),
        ..Default::default()
    }
}

/// Installs the redirect (`mesh-proxy init`) and exits; the only container with NET_ADMIN.
fn init_container(cfg: &InjectConfig, o: &PodOptions) -> Container {
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
    ];
    // The proxy's admin port is never redirected (probes reach it directly).
    let mut skip_in = vec![ADMIN_PORT];
    skip_in.extend(&o.skip_inbound_ports);
    args.extend(["--skip-inbound-ports".into(), join(&skip_in)]);
    if o.app_port.is_none() {
        args.push("--no-inbound".into());
    }
    if !o.skip_outbound_ports.is_empty() {
        args.extend(["--skip-outbound-ports".into(), join(&o.skip_outbound_ports)]);
    }
    if !o.skip_outbound_cidrs.is_empty() {
        args.extend([
            "--skip-outbound-cidrs".into(),
            o.skip_outbound_cidrs.join(","),
        ]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(o.image.clone().unwrap_or_else(|| cfg.proxy_image.clone())),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ca_volume(cfg: &InjectConfig) -> Volume {
    Volume {
        name: "mesh-ca".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: cfg.ca_config_map.clone(),
            items: Some(vec![KeyToPath {
                key: "bundle.pem".into(),
                path: "bundle.pem".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A short-lived token for the proxy's ServiceAccount, for the mesh's audience only.
fn token_volume(cfg: &InjectConfig) -> Volume {
    Volume {
        name: "mesh-token".into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(cfg.token_audience.clone()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
