//! A stand-in for the Kubernetes API server: Pods, EndpointSlices, Services and Namespaces to list and watch
//! over plain HTTP, as kube-rs's watcher uses them. The test drives it with recorded objects
//! and watch events; a watch replays the events after the resourceVersion it asks from, so
//! none is lost between a list and the watch that follows it.

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// The resources served for list and watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    EndpointSlice,
    Namespace,
    Service,
    MeshRoute,
    MeshPolicy,
    MeshAuthorization,
    /// Cluster-scoped: stored under namespace `default`.
    MeshExternal,
    ConfigMap,
    HttpRoute,
    GrpcRoute,
    Gateway,
}

impl Kind {
    fn of_path(path: &str) -> Option<Self> {
        if path.starts_with("/api/v1/namespaces/") && path.ends_with("/configmaps") {
            return Some(Kind::ConfigMap);
        }
        match path {
            "/api/v1/pods" => Some(Kind::Pod),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/namespaces" => Some(Kind::Namespace),
            "/api/v1/services" => Some(Kind::Service),
            "/apis/mesh.io/v1alpha1/meshroutes" => Some(Kind::MeshRoute),
            "/apis/mesh.io/v1alpha1/meshpolicies" => Some(Kind::MeshPolicy),
            "/apis/mesh.io/v1alpha1/meshauthorizations" => Some(Kind::MeshAuthorization),
            "/apis/mesh.io/v1alpha1/meshexternals" => Some(Kind::MeshExternal),
            "/apis/gateway.networking.k8s.io/v1/httproutes" => Some(Kind::HttpRoute),
            "/apis/gateway.networking.k8s.io/v1/grpcroutes" => Some(Kind::GrpcRoute),
            "/apis/gateway.networking.k8s.io/v1/gateways" => Some(Kind::Gateway),
            _ => None,
        }
    }
    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("v1", "PodList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::Namespace => ("v1", "NamespaceList"),
            Kind::Service => ("v1", "ServiceList"),
            Kind::MeshRoute => ("mesh.io/v1alpha1", "MeshRouteList"),
            Kind::MeshPolicy => ("mesh.io/v1alpha1", "MeshPolicyList"),
            Kind::MeshAuthorization => ("mesh.io/v1alpha1", "MeshAuthorizationList"),
            Kind::MeshExternal => ("mesh.io/v1alpha1", "MeshExternalList"),
            Kind::ConfigMap => ("v1", "ConfigMapList"),
            Kind::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRouteList"),
            Kind::GrpcRoute => ("gateway.networking.k8s.io/v1", "GRPCRouteList"),
            Kind::Gateway => ("gateway.networking.k8s.io/v1", "GatewayList"),
        }
    }
}

#[derive(Default)]
struct State {
    /// ServiceAccount tokens the TokenReview API accepts: token → (namespace, account).
    tokens: BTreeMap<String, (String, String)>,
    /// ServiceAccounts deleted since their token was added (GET answers 404, TokenReview
    /// refuses their tokens).
    deleted_accounts: std::collections::BTreeSet<(String, String)>,
    /// ConfigMaps written by server-side apply: (namespace, name) → object.
    config_maps: BTreeMap<(String, String), Value>,
    /// MutatingWebhookConfigurations by name (GET, JSON-patch PATCH).
    webhook_configs: BTreeMap<String, Value>,
    /// coordination.k8s.io Leases: (namespace, name) → object (GET, POST, PUT with
    /// resourceVersion preconditions).
    leases: BTreeMap<(String, String), Value>,
    rv: u64,
    objects: BTreeMap<(u8, String, String), Value>,
    /// Other objects served as they are for GET at their path (CRDs, Deployments, single
    /// Namespaces: what `meshctl check` reads).
    by_path: BTreeMap<String, Value>,
    /// Resources a SelfSubjectAccessReview is refused for (all others are allowed).
    denied: std::collections::BTreeSet<String>,
    /// What SubjectAccessReviews allow: (user, verb) on the mesh's `admin` resource.
    grants: std::collections::BTreeSet<(String, String)>,
    /// Port-forwards: (namespace, pod, port) → where the bytes go.
    forwards: BTreeMap<(String, String, u16), std::net::SocketAddr>,
    /// (resourceVersion, kind, watch event line)
    log: Vec<(u64, Kind, String)>,
}

pub struct FakeKubeApi {
    pub url: String,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(Kind, String)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn key(kind: Kind, obj: &Value) -> (u8, String, String) {
    (
        kind as u8,
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

impl FakeKubeApi {
    pub async fn start(objects: Vec<(Kind, Value)>) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        Self::start_on(listener, objects).await
    }

    /// Serves on `listener` (e.g. one bound inside a network namespace the test made).
    pub async fn start_on(
        listener: std::net::TcpListener,
        objects: Vec<(Kind, Value)>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (events, _) = broadcast::channel(256);
        let mut api = Self {
            url,
            state: Arc::new(Mutex::new(State::default())),
            events,
            stop: None,
        };
        for (k, o) in objects {
            api.apply(k, "ADDED", o);
        }
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
        let (state, events) = (api.state.clone(), api.events.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
                    _ = &mut stop_rx => return,
                };
                let (state, events) = (state.clone(), events.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, events) = (state.clone(), events.clone());
                        async move {
                            if req.method() == hyper::Method::POST
                                && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews"
                            {
                                return Ok::<_, Infallible>(token_review(req, &state).await);
                            }
                            if req.uri().path().ends_with("/portforward") {
                                return Ok::<_, Infallible>(port_forward(req, &state));
                            }
                            if let Some(r) = cluster_info(&req, &state) {
                                return Ok::<_, Infallible>(r);
                            }
                            if req.method() == hyper::Method::POST
                                && req.uri().path()
                                    == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
                            {
                                return Ok::<_, Infallible>(access_review(req, &state).await);
                            }
                            if req.method() == hyper::Method::POST
                                && req.uri().path()
                                    == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
                            {
                                return Ok::<_, Infallible>(subject_review(req, &state).await);
                            }
                            if let Some(r) = service_account(&req, &state) {
                                return Ok::<_, Infallible>(r);
                            }
                            if req.uri().path().starts_with(LEASES) {
                                return Ok::<_, Infallible>(lease(req, &state).await);
                            }
                            if req.uri().path().starts_with(WEBHOOK_CONFIGS) {
                                return Ok::<_, Infallible>(
                                    webhook_configuration(req, &state).await,
                                );
                            }
                            if req.method() == hyper::Method::PATCH
                                && req.uri().path().starts_with(GATEWAY_ROUTES)
                            {
                                return Ok::<_, Infallible>(
                                    patch_route_status(req, &state, &events).await,
                                );
                            }
                            if req.method() == hyper::Method::PATCH
                                && req.uri().path().starts_with("/apis/mesh.io/")
                            {
                                return Ok::<_, Infallible>(
                                    apply_mesh_object(req, &state, &events).await,
                                );
                            }
                            if req.method() == hyper::Method::PATCH {
                                return Ok::<_, Infallible>(
                                    apply_object(req, &state, &events).await,
                                );
                            }
                            if let Some(r) = config_map_object(&req) {
                                return Ok::<_, Infallible>(
                                    stored_config_map(req, r, &state, &events).await,
                                );
                            }
                            Ok::<_, Infallible>(serve(req, &state, &events))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        api.stop = Some(stop_tx);
        Ok(api)
    }

    /// Serves `obj` for GET at `path` (replacing what was there; None removes it).
    pub fn put_at(&self, path: &str, obj: Option<Value>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match obj {
            Some(o) => st.by_path.insert(path.to_string(), o),
            None => st.by_path.remove(path),
        };
    }

    /// A port-forward to `port` of pod `ns/pod` reaches `to` (what the kubelet would dial).
    pub fn forward(&self, ns: &str, pod: &str, port: u16, to: std::net::SocketAddr) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.forwards
            .insert((ns.to_string(), pod.to_string(), port), to);
    }

    /// SubjectAccessReviews of `user` for `verbs` on `mesh.io/admin` are allowed (as a
    /// ClusterRoleBinding to mesh-viewer, -editor or -admin would).
    pub fn grant(&self, user: &str, verbs: &[&str]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for v in verbs {
            st.grants.insert((user.to_string(), v.to_string()));
        }
    }

    /// SelfSubjectAccessReviews for `resource` (e.g. `customresourcedefinitions`) are refused.
    pub fn deny(&self, resource: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.denied.insert(resource.to_string());
    }

    /// A Lease as the API server holds it now.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.leases.get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Creates (or replaces) a MutatingWebhookConfiguration.
    pub fn put_webhook_configuration(&self, obj: Value) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        st.webhook_configs.insert(name, obj);
    }

    /// A MutatingWebhookConfiguration as it is now.
    pub fn webhook_configuration(&self, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.webhook_configs.get(name).cloned()
    }

    /// An object the control plane applied that is served at `path` (a Deployment or a
    /// ServiceAccount).
    pub fn applied(&self, path: &str) -> Option<Value> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.by_path.get(path).cloned()
    }

    /// A ConfigMap as the control plane last applied it.
    pub fn config_map(&self, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.config_maps.get(&(ns.into(), name.into())).cloned()
    }

    /// Makes `token` a valid ServiceAccount token (audience `mesh`) for `ns/sa`.
    pub fn add_token(&self, token: &str, ns: &str, sa: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tokens.insert(token.into(), (ns.into(), sa.into()));
    }

    /// Deletes a ServiceAccount: GET answers 404 and its tokens stop authenticating.
    pub fn delete_service_account(&self, ns: &str, sa: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.deleted_accounts.insert((ns.into(), sa.into()));
    }

    /// Records a change (`ADDED`, `MODIFIED`, `DELETED`) and sends it to the watches.
    pub fn apply(&self, kind: Kind, event: &str, obj: Value) {
        record(&self.state, &self.events, kind, event, obj);
    }

    /// An object as the API server holds it now.
    pub fn object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.objects
            .get(&(kind as u8, ns.to_string(), name.to_string()))
            .cloned()
    }
}

/// Stores (or deletes) an object at a new resourceVersion and tells the watches.
fn record(
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
    kind: Kind,
    event: &str,
    mut obj: Value,
) -> Value {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = rv.to_string().into();
    let k = key(kind, &obj);
    if event == "DELETED" {
        st.objects.remove(&k);
    } else {
        st.objects.insert(k, obj.clone());
    }
    let line = format!("{}\n", json!({"type": event, "object": obj}));
    st.log.push((rv, kind, line.clone()));
    let _ = events.send((kind, line));
    obj
}

/// Server-side apply of a mesh.io object
/// (`PATCH /apis/mesh.io/v1alpha1/namespaces/<ns>/<plural>/<name>`): the applied object
/// replaces the stored one, and watches see it.
async fn apply_mesh_object(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let body = body_of(req).await;
    let obj: Value = serde_json::from_slice(&body).unwrap_or_default();
    // A merge patch of the status subresource:
    // /apis/mesh.io/v1alpha1/namespaces/<ns>/<plural>/<name>/status.
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // ... or of a cluster-scoped one: /apis/mesh.io/v1alpha1/meshexternals/<name>/status.
    if let [
        "apis",
        "mesh.io",
        "v1alpha1",
        "meshexternals",
        name,
        "status",
    ] = parts.as_slice()
    {
        let k = (
            Kind::MeshExternal as u8,
            "default".to_string(),
            name.to_string(),
        );
        let current = {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.objects.get(&k).cloned()
        };
        let Some(mut stored) = current else {
            let (code, v) = status(404, "NotFound", "no such object");
            return json_response(code, &v);
        };
        stored["status"] = obj["status"].clone();
        let stored = record(state, events, Kind::MeshExternal, "MODIFIED", stored);
        return json_response(hyper::StatusCode::OK, &stored);
    }
    if let [
        "apis",
        "mesh.io",
        "v1alpha1",
        "namespaces",
        ns,
        plural,
        name,
        "status",
    ] = parts.as_slice()
    {
        let kind = match *plural {
            "meshroutes" => Kind::MeshRoute,
            "meshpolicies" => Kind::MeshPolicy,
            _ => Kind::MeshAuthorization,
        };
        let current = {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.objects
                .get(&(kind as u8, ns.to_string(), name.to_string()))
                .cloned()
        };
        let Some(mut stored) = current else {
            let (code, v) = status(404, "NotFound", "no such object");
            return json_response(code, &v);
        };
        stored["status"] = obj["status"].clone();
        let stored = record(state, events, kind, "MODIFIED", stored);
        return json_response(hyper::StatusCode::OK, &stored);
    }
    let kind = match obj["kind"].as_str() {
        Some("MeshRoute") => Kind::MeshRoute,
        Some("MeshPolicy") => Kind::MeshPolicy,
        Some("MeshAuthorization") => Kind::MeshAuthorization,
        _ => {
            return json_response(
                hyper::StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422}),
            );
        }
    };
    let exists = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.objects.contains_key(&key(kind, &obj))
    };
    let event = if exists { "MODIFIED" } else { "ADDED" };
    let stored = record(state, events, kind, event, obj);
    json_response(hyper::StatusCode::OK, &stored)
}

/// `GET /version` (Kubernetes 1.33) and GETs of objects put with `put_at`. None: not such a
/// request.
fn cluster_info(
    req: &hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> Option<hyper::Response<Body>> {
    if req.method() != hyper::Method::GET {
        return None;
    }
    let path = req.uri().path();
    if path == "/version" {
        return Some(json_response(
            hyper::StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.2", "platform": "linux/amd64"}),
        ));
    }
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(o) = st.by_path.get(path) {
        return Some(json_response(hyper::StatusCode::OK, o));
    }
    // A single Namespace, CRD or Deployment nobody put: not found.
    let known = path.starts_with("/api/v1/namespaces/") && path.matches('/').count() == 4
        || path.starts_with("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/")
        || path.starts_with("/apis/apps/v1/namespaces/");
    known.then(|| {
        let (code, v) = status(404, "NotFound", "not found");
        json_response(code, &v)
    })
}

/// `GET /api/v1/namespaces/<ns>/pods/<pod>/portforward?ports=<port>` as a WebSocket with
/// the `v4.channel.k8s.io` protocol, as kubectl and kube-rs use it: after the upgrade, the
/// data (channel 0) and error (channel 1) channels each open with the port number, then
/// binary messages carry the channel byte and the bytes of a TCP connection to where
/// `forward` said the pod's port is.
fn port_forward(
    mut req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let port: Option<u16> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ports="))
        .and_then(|p| p.parse().ok());
    let target = match (parts.as_slice(), port) {
        (["api", "v1", "namespaces", ns, "pods", pod, "portforward"], Some(port)) => {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.forwards
                .get(&(ns.to_string(), pod.to_string(), port))
                .copied()
                .map(|t| (t, port))
        }
        _ => None,
    };
    let Some((target, port)) = target else {
        let (code, v) = status(404, "NotFound", "no such pod port");
        return json_response(code, &v);
    };
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let (code, v) = status(400, "BadRequest", "not a WebSocket upgrade");
        return json_response(code, &v);
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut sink, mut from_client) = ws.split();
        let [lo, hi] = port.to_le_bytes();
        for ch in [0u8, 1] {
            if sink
                .send(Message::Binary(vec![ch, lo, hi].into()))
                .await
                .is_err()
            {
                return;
            }
        }
        let Ok(tcp) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        let (mut rd, mut wr) = tcp.into_split();
        let up = async move {
            while let Some(Ok(m)) = from_client.next().await {
                let data = match &m {
                    Message::Binary(b) if b.first() == Some(&0) => &b[1..],
                    Message::Close(_) => break,
                    _ => continue,
                };
                if wr.write_all(data).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let down = async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut m = Vec::with_capacity(n + 1);
                        m.push(0);
                        m.extend_from_slice(&buf[..n]);
                        if sink.send(Message::Binary(m.into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        tokio::join!(up, down);
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = hyper::Response::new(Full::new(Bytes::new()).boxed_unsync());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    h.insert(
        "sec-websocket-protocol",
        hyper::header::HeaderValue::from_static("v4.channel.k8s.io"),
    );
    r
}

/// A SubjectAccessReview: allowed for a (user, verb) granted on `mesh.io/admin`.
async fn subject_review(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    let review: Value = serde_json::from_slice(&body_of(req).await).unwrap_or_default();
    let spec = &review["spec"];
    let attrs = &spec["resourceAttributes"];
    let on_admin = attrs["group"] == "mesh.io" && attrs["resource"] == "admin";
    let user = spec["user"].as_str().unwrap_or("").to_string();
    let verb = attrs["verb"].as_str().unwrap_or("").to_string();
    let allowed = on_admin && {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.grants.contains(&(user, verb))
    };
    let mut out = review.clone();
    out["status"] = json!({"allowed": allowed});
    json_response(hyper::StatusCode::CREATED, &out)
}

/// A SelfSubjectAccessReview: allowed unless its resource was denied.
async fn access_review(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    let review: Value = serde_json::from_slice(&body_of(req).await).unwrap_or_default();
    let resource = review["spec"]["resourceAttributes"]["resource"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let allowed = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        !st.denied.contains(&resource)
    };
    let mut out = review.clone();
    out["status"] = json!({"allowed": allowed});
    json_response(hyper::StatusCode::CREATED, &out)
}

const GATEWAY_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/";

/// A merge patch of a Gateway API route's status
/// (`PATCH /apis/gateway.networking.k8s.io/v1/namespaces/<ns>/<plural>/<name>/status`): the
/// patch's `status` replaces the stored one, and watches see the object modified.
async fn patch_route_status(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches(GATEWAY_ROUTES).split('/').collect();
    let patch: Value = serde_json::from_slice(&body_of(req).await).unwrap_or_default();
    let (kind, ns, name) = match parts.as_slice() {
        [ns, "httproutes", name, "status"] => (Kind::HttpRoute, *ns, *name),
        [ns, "grpcroutes", name, "status"] => (Kind::GrpcRoute, *ns, *name),
        [ns, "gateways", name, "status"] => (Kind::Gateway, *ns, *name),
        _ => {
            let (code, v) = status(404, "NotFound", "no such route status");
            return json_response(code, &v);
        }
    };
    let current = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.objects
            .get(&(kind as u8, ns.to_string(), name.to_string()))
            .cloned()
    };
    let Some(mut obj) = current else {
        let (code, v) = status(404, "NotFound", "route not found");
        return json_response(code, &v);
    };
    obj["status"] = patch["status"].clone();
    let stored = record(state, events, kind, "MODIFIED", obj);
    json_response(hyper::StatusCode::OK, &stored)
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

async fn body_of(req: hyper::Request<hyper::body::Incoming>) -> Bytes {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

fn json_response(status: hyper::StatusCode, v: &Value) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed_unsync());
    *r.status_mut() = status;
    r
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";

fn status(code: u16, reason: &str, message: &str) -> (hyper::StatusCode, Value) {
    (
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code}),
    )
}

/// Leases as the API server keeps them: create fails if one exists, and a replace whose
/// resourceVersion is not the current one fails with 409 Conflict.
async fn lease(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<String> = path
        .trim_start_matches(LEASES)
        .split('/')
        .map(String::from)
        .collect();
    let body = body_of(req).await;
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let (code, out) = match (method, parts.as_slice()) {
        (hyper::Method::GET, [ns, kind, name]) if kind == "leases" => {
            match st.leases.get(&(ns.clone(), name.clone())) {
                Some(l) => (hyper::StatusCode::OK, l.clone()),
                None => status(404, "NotFound", "lease not found"),
            }
        }
        (hyper::Method::POST, [ns, kind]) if kind == "leases" => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or_default();
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if st.leases.contains_key(&(ns.clone(), name.clone())) {
                status(409, "AlreadyExists", "lease exists")
            } else {
                st.rv += 1;
                obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
                obj["metadata"]["namespace"] = ns.clone().into();
                st.leases.insert((ns.clone(), name), obj.clone());
                (hyper::StatusCode::CREATED, obj)
            }
        }
        (hyper::Method::PUT, [ns, kind, name]) if kind == "leases" => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or_default();
            let key = (ns.clone(), name.clone());
            let current = st
                .leases
                .get(&key)
                .map(|l| l["metadata"]["resourceVersion"].clone());
            match current {
                None => status(404, "NotFound", "lease not found"),
                Some(rv) if rv != obj["metadata"]["resourceVersion"] => {
                    status(409, "Conflict", "the object has been modified")
                }
                Some(_) => {
                    st.rv += 1;
                    obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
                    st.leases.insert(key, obj.clone());
                    (hyper::StatusCode::OK, obj)
                }
            }
        }
        _ => status(404, "NotFound", "no such lease path"),
    };
    json_response(code, &out)
}

const WEBHOOK_CONFIGS: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/";

/// GET, or JSON-patch PATCH, of one MutatingWebhookConfiguration.
async fn webhook_configuration(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    let name = req
        .uri()
        .path()
        .trim_start_matches(WEBHOOK_CONFIGS)
        .to_string();
    let patch = req.method() == hyper::Method::PATCH;
    let body = body_of(req).await;
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let (status, out) = match st.webhook_configs.get_mut(&name) {
        None => (
            hyper::StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        ),
        Some(obj) if patch => match serde_json::from_slice::<json_patch::Patch>(&body)
            .map_err(|e| e.to_string())
            .and_then(|p| json_patch::patch(obj, &p).map_err(|e| e.to_string()))
        {
            Ok(()) => (hyper::StatusCode::OK, obj.clone()),
            Err(e) => (
                hyper::StatusCode::UNPROCESSABLE_ENTITY,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": e, "code": 422}),
            ),
        },
        Some(obj) => (hyper::StatusCode::OK, obj.clone()),
    };
    json_response(status, &out)
}

/// `GET`/`PUT` of `/api/v1/namespaces/<ns>/configmaps/<name>` or `POST` to
/// `/api/v1/namespaces/<ns>/configmaps`: (namespace, name when in the path).
fn config_map_object(
    req: &hyper::Request<hyper::body::Incoming>,
) -> Option<(String, Option<String>)> {
    let parts: Vec<&str> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    match (req.method(), parts.as_slice()) {
        (
            &hyper::Method::GET | &hyper::Method::PUT,
            ["api", "v1", "namespaces", ns, "configmaps", name],
        ) => Some((ns.to_string(), Some(name.to_string()))),
        (&hyper::Method::POST, ["api", "v1", "namespaces", ns, "configmaps"]) => {
            Some((ns.to_string(), None))
        }
        _ => None,
    }
}

/// ConfigMaps kept as the API server keeps objects: create fails if one exists, a replace
/// whose resourceVersion is not the current one fails with 409, and watches see each change.
async fn stored_config_map(
    req: hyper::Request<hyper::body::Incoming>,
    (ns, name): (String, Option<String>),
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
) -> hyper::Response<Body> {
    let method = req.method().clone();
    let body = body_of(req).await;
    let mut obj: Value = serde_json::from_slice(&body).unwrap_or_default();
    let name = name.unwrap_or_else(|| {
        obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    obj["metadata"]["namespace"] = ns.clone().into();
    let current = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.objects
            .get(&(Kind::ConfigMap as u8, ns.clone(), name.clone()))
            .cloned()
    };
    // One the control plane wrote by server-side apply (the trust bundle) reads back too.
    let applied = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.config_maps.get(&(ns.clone(), name.clone())).cloned()
    };
    let (code, out) = match (method, current) {
        (hyper::Method::GET, Some(c)) => (hyper::StatusCode::OK, c),
        (hyper::Method::GET, None) if applied.is_some() => {
            (hyper::StatusCode::OK, applied.unwrap_or_default())
        }
        (hyper::Method::POST, Some(_)) => status(409, "AlreadyExists", "configmap exists"),
        (hyper::Method::POST, None) => {
            obj["apiVersion"] = "v1".into();
            obj["kind"] = "ConfigMap".into();
            (
                hyper::StatusCode::CREATED,
                record(state, events, Kind::ConfigMap, "ADDED", obj),
            )
        }
        (_, None) => status(404, "NotFound", "configmap not found"),
        (_, Some(c)) if c["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] => {
            status(409, "Conflict", "the object has been modified")
        }
        (_, Some(_)) => {
            obj["apiVersion"] = "v1".into();
            obj["kind"] = "ConfigMap".into();
            (
                hyper::StatusCode::OK,
                record(state, events, Kind::ConfigMap, "MODIFIED", obj),
            )
        }
    };
    json_response(code, &out)
}

/// Server-side apply of a ConfigMap (`PATCH /api/v1/namespaces/<ns>/configmaps/<name>`), or of
/// a Gateway's Deployment, ServiceAccount or Service: the first two then answer GET at their
/// path, and the Service is recorded as a change the watches see.
async fn apply_object(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
) -> hyper::Response<Body> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let body = body_of(req).await;
    let obj: Value = serde_json::from_slice(&body).unwrap_or_default();
    let (status, out) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "configmaps", name] if obj["kind"] == "ConfigMap" => {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.config_maps
                .insert((ns.to_string(), name.to_string()), obj.clone());
            (hyper::StatusCode::OK, obj)
        }
        ["apis", "apps", "v1", "namespaces", _, "deployments", _]
            if obj["kind"] == "Deployment" =>
        {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.by_path.insert(path.clone(), obj.clone());
            (hyper::StatusCode::OK, obj)
        }
        ["api", "v1", "namespaces", _, "serviceaccounts", _] if obj["kind"] == "ServiceAccount" => {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            st.by_path.insert(path.clone(), obj.clone());
            (hyper::StatusCode::OK, obj)
        }
        ["api", "v1", "namespaces", ns, "services", name] if obj["kind"] == "Service" => {
            let event = {
                let st = state.lock().unwrap_or_else(|p| p.into_inner());
                let k = (Kind::Service as u8, ns.to_string(), name.to_string());
                if st.objects.contains_key(&k) {
                    "MODIFIED"
                } else {
                    "ADDED"
                }
            };
            let out = record(state, events, Kind::Service, event, obj);
            (hyper::StatusCode::OK, out)
        }
        _ => (
            hyper::StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
        ),
    };
    json_response(status, &out)
}

/// `GET /api/v1/namespaces/<ns>/serviceaccounts/<name>`: a ServiceAccount exists while a
/// token of it is known and it was not deleted. None: not such a request.
fn service_account(
    req: &hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> Option<hyper::Response<Body>> {
    let rest = req.uri().path().strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let name = rest.strip_prefix("serviceaccounts/")?;
    if req.method() != hyper::Method::GET || name.contains('/') {
        return None;
    }
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    let id = (ns.to_string(), name.to_string());
    let exists = st.tokens.values().any(|t| *t == id) && !st.deleted_accounts.contains(&id);
    Some(if exists {
        json_response(
            hyper::StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": ns, "uid": format!("sa-{ns}-{name}")}}),
        )
    } else {
        json_response(
            hyper::StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404,
                    "message": format!("serviceaccounts \"{name}\" not found")}),
        )
    })
}

/// TokenReview: authenticated as `system:serviceaccount:<ns>:<sa>` when the token is known and
/// the review asks for audience `mesh`.
async fn token_review(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> hyper::Response<Body> {
    let body = body_of(req).await;
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    // No audiences: the API server's own (a kubeconfig's token), accepted as well.
    let wants_mesh = review["spec"]["audiences"]
        .as_array()
        .is_none_or(|a| a.is_empty())
        || review["spec"]["audiences"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "mesh"));
    let known = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.tokens
            .get(token)
            .filter(|id| !st.deleted_accounts.contains(*id))
            .cloned()
    };
    let status = match known {
        Some((ns, sa)) if wants_mesh => json!({
            "authenticated": true,
            "user": {"username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "u-1",
                     "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}")]},
            "audiences": ["mesh"]
        }),
        _ => {
            json!({"authenticated": false, "error": "[invalid bearer token, token lookup failed]"})
        }
    };
    let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status});
    json_response(hyper::StatusCode::CREATED, &out)
}

fn serve(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    events: &broadcast::Sender<(Kind, String)>,
) -> hyper::Response<Body> {
    // Pods of one namespace (`/api/v1/namespaces/<ns>/pods`), for lists only.
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (kind, only_ns) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods"] => (Some(Kind::Pod), Some(ns.to_string())),
        _ => (Kind::of_path(path), None),
    };
    let Some(kind) = kind else {
        return json_response(
            hyper::StatusCode::NOT_FOUND,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        );
    };
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    if query.get("watch").map(String::as_str) != Some("true") {
        let (api_version, list_kind) = kind.list();
        let items: Vec<&Value> = st
            .objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind as u8 && only_ns.as_ref().is_none_or(|o| o == ns))
            .map(|(_, v)| v)
            .collect();
        return json_response(
            hyper::StatusCode::OK,
            &json!({"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let replay: Vec<String> = st
        .log
        .iter()
        .filter(|(rv, k, _)| *k == kind && *rv > from)
        .map(|(_, _, l)| l.clone())
        .collect();
    // Subscribed before the lock is released: nothing falls between replay and live.
    let live = tokio_stream::wrappers::BroadcastStream::new(events.subscribe());
    drop(st);
    let live = live.filter_map(move |e| async move {
        match e {
            Ok((k, line)) if k == kind => Some(line),
            _ => None,
        }
    });
    let lines = futures_util::stream::iter(replay).chain(live);
    let body = StreamBody::new(lines.map(|l| Ok::<_, Infallible>(Frame::data(Bytes::from(l)))));
    hyper::Response::new(body.boxed_unsync())
}
