//! Outbound: the app's plaintext HTTP/1.1, HTTP/2 (h2c) or gRPC, addressed to a mesh service by
//! Host / :authority (the listener is an HTTP proxy: `http_proxy=http://127.0.0.1:15001`, or
//! h2c prior knowledge straight to it), or to a fixed service on an `--upstream` port. The
//! request goes through the service's policy stack (`outbound::stack`) to an endpoint picked by the
//! route's weights and the balancer, over mTLS HTTP/2 to its sidecar.

pub mod endpoint;
pub mod external;
pub mod pool;
pub mod route;
pub mod stack;
pub mod transparent;

use crate::balance::{Balancer, PickError, Picked, Tried};
use crate::http::errors::ProxyError;
use crate::http::router::Redirect;
use crate::http::{
    Body, ORIG_PROTO, ORIG_PROTO_H1, TRACEPARENT, XFCC, absolute_uri, framing, is_grpc,
    strip_hop_by_hop, upgrade,
};
use crate::snapshot::{ResolveError, Service, Snapshots};
use crate::telemetry::metrics::Direction;
use crate::telemetry::{Counters, Detail, Observation, ObservedBody};
use http::{HeaderName, HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;
use pool::{Dedicated, Pool};
use route::Routed;
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceExt;

/// Most mirror copies in flight per proxy; past it copies are skipped (a slow shadow must not
/// pile up work in the proxy).
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;
pub use route::MIRROR_HEADER;

/// Request header asking the proxy to say how it handled the request (route, backend,
/// endpoint, attempts) in `x-mesh-*` response headers.
pub const DEBUG_HEADER: HeaderName = HeaderName::from_static("x-mesh-debug");

/// What the debug header reports.
#[derive(Debug, Default)]
pub struct Debug {
    route: Option<Arc<str>>,
    tried: Tried,
}

impl Debug {
    fn annotate(&self, h: &mut http::HeaderMap) {
        let attempts = self.tried.attempts();
        let mut set = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(name, v);
            }
        };
        if let Some(r) = &self.route {
            set("x-mesh-route", r);
        }
        set("x-mesh-attempts", &attempts.len().to_string());
        if let Some(a) = attempts.last() {
            set("x-mesh-endpoint", &format!("{} ({})", a.id, a.addr));
            set("x-mesh-backend", a.version.as_deref().unwrap_or(""));
        }
    }
}

/// Where a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// The app's outbound listener.
    App,
    /// A gateway's listener (outside clients).
    Gateway,
}

/// Shared by every outbound connection.
pub struct Outbound {
    pub snapshots: Arc<Snapshots>,
    pub pool: Arc<Pool>,
    pub mirrors: Arc<tokio::sync::Semaphore>,
    /// Destination ports known opaque or HTTP (transparent interception).
    pub ports: transparent::PortKinds,
    /// The proxy's namespace: a bare service name is one of its services
    /// (`mesh_model::service`).
    pub namespace: Arc<str>,
}

impl Outbound {
    /// hyper service entry point: never fails; errors become responses. (A plain fn returning
    /// `respond`'s future: an async wrapper would nest it in one more future, moved per poll.)
    pub fn handle(
        self: Arc<Self>,
        fixed: Option<Arc<str>>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ObservedBody>, Infallible>> + Send {
        self.respond(fixed, Entry::App, req)
    }

    /// As [`Outbound::handle`], for a gateway's request: routed by the route of the gateway's
    /// own `service` (its rules name hosts and other services); a request no rule takes, when
    /// the route has no default backends, gets 404 `no-route`.
    pub fn gateway(
        self: Arc<Self>,
        service: Arc<str>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ObservedBody>, Infallible>> + Send {
        self.respond(Some(service), Entry::Gateway, req)
    }

    async fn respond(
        self: Arc<Self>,
        fixed: Option<Arc<str>>,
        entry: Entry,
        req: Request<Incoming>,
    ) -> Result<Response<ObservedBody>, Infallible> {
        let grpc = is_grpc(req.headers());
        if let Some(why) = framing::malformed(&req) {
            let obs = Observation::start(None, None);
            return Ok(obs.finish(ProxyError::Malformed(why).to_response(grpc)));
        }
        let mut debug = req
            .headers()
            .contains_key(DEBUG_HEADER)
            .then(Debug::default);
        let detail = Detail::wanted().then(|| Detail::of(Direction::Outbound, &req));
        let mut obs = Observation::start(None, detail);
        let mut resp = match self.proxy(fixed, entry, req, &mut debug, &mut obs).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "outbound request failed");
                e.to_response(grpc)
            }
        };
        if let Some(d) = debug {
            d.annotate(resp.headers_mut());
        }
        Ok(obs.finish(resp))
    }

    async fn proxy(
        &self,
        fixed: Option<Arc<str>>,
        entry: Entry,
        req: Request<Incoming>,
        debug: &mut Option<Debug>,
        obs: &mut Observation,
    ) -> Result<Response<Body>, ProxyError> {
        let authority = framing::authority(req.uri(), req.headers())
            .ok_or(ProxyError::NoAuthority)?
            .to_ascii_lowercase();
        // Borrowed: an owned copy is made only for an error message.
        let name: &str = match &fixed {
            Some(f) => f,
            None => mesh_model::service::host_key(
                mesh_model::route::host_of(&authority),
                &self.namespace,
            ),
        };
        let svc = self.snapshots.resolve(name).await.map_err(|e| match e {
            ResolveError::Unknown if self.snapshots.load().registry_only => {
                ProxyError::EgressDenied(name.to_string())
            }
            ResolveError::Unknown => ProxyError::UnknownService(name.to_string()),
            ResolveError::Unavailable => ProxyError::DiscoveryUnavailable(name.to_string()),
            ResolveError::TooMany => ProxyError::TooManyServices,
        })?;
        let (mut parts, body) = req.into_parts();
        // An HTTP/2 caller's WebSocket (RFC 8441) goes on as an HTTP/1.1 upgrade request.
        let extended = if parts.method == Method::CONNECT {
            let up = upgrade::from_extended_connect(&mut parts);
            if up.is_none() {
                // Boxed, like the upgrade below: rare, and inline they would enlarge every
                // request's future (a handshake's state), which is moved on each poll.
                return Box::pin(self.tunnel(&svc, &authority, parts)).await;
            }
            up
        } else {
            None
        };
        let routed = Routed::route(&svc, &parts);
        if entry == Entry::Gateway {
            crate::gateway::admit(&svc, &parts)?;
            if routed.rule.is_none() && svc.backends.is_empty() {
                let path = parts.uri.path();
                return Err(ProxyError::NoRoute(format!("{authority}{path}")));
            }
        }
        obs.set_counters(Counters::Target(routed.metrics().clone()));
        if let Some(d) = obs.detail.as_mut() {
            d.service = svc.name.clone();
            d.peer = svc.identity.clone();
            d.route = routed.name();
        }
        if let Some(d) = debug.as_mut() {
            d.route = Some(routed.name());
        }
        if let Some(rd) = routed.rule.and_then(|(r, _)| r.redirect.as_ref()) {
            return Ok(redirect(rd, &authority, &parts.uri));
        }
        let up = if parts.version < Version::HTTP_2 {
            upgrade::requested(&parts.headers).map(|u| (u, upgrade::Asked::Upgrade))
        } else {
            extended
        };
        for_peer(&mut parts, &authority)?;
        routed.edit_request(&mut parts.headers);
        if let Some(up) = up {
            let (to, policy) = (routed.balancer(), routed.policy().0);
            return Box::pin(self.upgrade(&svc, to, policy, parts, body, up)).await;
        }
        let mut mirror = routed.mirror(&self.mirrors);
        let idle = routed.policy().0.stream_idle_timeout;
        obs.set_stream_idle(idle);
        let counted = obs.count_request(&body);
        let body = route::request_body(body, idle, mirror.as_deref_mut(), counted);
        if let Some(m) = mirror.as_mut() {
            m.copy_head(&parts);
        }
        if let Some(d) = debug.as_ref() {
            parts.extensions.insert(d.tried.clone());
        }
        propagate_trace(obs, &mut parts);
        let stack = routed.stack();
        let mut resp = stack.oneshot(Request::from_parts(parts, body)).await?;
        if let Some(m) = mirror {
            m.send(&svc, routed.policy().0, &self.pool);
        }
        routed.edit_response(resp.headers_mut());
        Ok(resp.map(Body::Left))
    }
}

impl Outbound {
    /// One endpoint of `svc` for a dedicated connection (an upgrade or a tunnel).
    fn pick_one(
        svc: &Service,
        balancer: &Balancer,
        lb: &crate::balance::LbConfig,
    ) -> Result<Picked, ProxyError> {
        balancer.pick(lb, None, &[]).map_err(|e| match e {
            PickError::NoEndpoints => ProxyError::NoEndpoints(svc.name.to_string()),
            PickError::AllEjected => {
                ProxyError::CircuitOpen(format!("every endpoint of {:?} is ejected", svc.name))
            }
        })
    }

    /// An HTTP/1.1 request that asks to switch protocols (WebSocket, …): sent over a dedicated
    /// mTLS connection that speaks HTTP/1.1 to one endpoint's sidecar; once it answers 101,
    /// the caller's connection and that one are spliced (see `http::upgrade`).
    async fn upgrade(
        &self,
        svc: &Service,
        balancer: &Arc<Balancer>,
        policy: &crate::policy::Policy,
        mut parts: http::request::Parts,
        body: Incoming,
        (up, asked): (HeaderValue, upgrade::Asked),
    ) -> Result<Response<Body>, ProxyError> {
        let caller = upgrade::prepare(&mut parts, up)?;
        let picked = Self::pick_one(svc, balancer, &policy.lb)?;
        let addr = picked.addr;
        let sent = async {
            let io = self
                .pool
                .dedicated(
                    addr,
                    picked.answered.identity_or(&svc.identity),
                    Dedicated::Http1,
                    policy.connect_timeout,
                )
                .await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .map_err(|e| ProxyError::Upstream(format!("{addr}: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %e, "peer connection of an upgrade closed");
                }
            });
            sender
                .send_request(Request::from_parts(parts, body))
                .await
                .map_err(|e| ProxyError::Upstream(format!("{addr}: {e}")))
        }
        .await;
        let ok = sent.as_ref().is_ok_and(|r| !r.status().is_server_error());
        picked.finish(ok, balancer, policy.outlier.as_ref());
        Ok(upgrade::answer(sent?, caller, asked))
    }

    /// `CONNECT service:port`: an opaque TCP stream to that port of one endpoint's app, over
    /// mTLS to its sidecar (as transparent interception carries a protocol that is not HTTP),
    /// so a process that can use an HTTP proxy gets opaque TCP into the mesh without iptables.
    async fn tunnel(
        &self,
        svc: &Service,
        authority: &str,
        mut parts: http::request::Parts,
    ) -> Result<Response<Body>, ProxyError> {
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| ProxyError::BadRequest(format!("CONNECT {authority:?}: no port")))?;
        let caller = upgrade::take(&mut parts)?;
        let picked = Self::pick_one(svc, &svc.balancer, &svc.policy.lb)?;
        let identity = picked.answered.identity_or(&svc.identity).clone();
        let opened = self
            .pool
            .dedicated(
                picked.addr,
                &identity,
                Dedicated::Opaque { app_port: port },
                svc.policy.connect_timeout,
            )
            .await;
        picked.finish(opened.is_ok(), &svc.balancer, svc.policy.outlier.as_ref());
        let io = opened?;
        // Counted as transparent interception counts an opaque stream.
        use crate::telemetry::metrics::{TcpStream, metrics};
        let counted = TcpStream::open(metrics().tcp(
            Direction::Outbound,
            &Arc::from(""),
            &svc.name,
            &identity,
        ));
        tokio::spawn(upgrade::splice(caller, io, Some(counted)));
        Ok(Response::new(crate::http::full("")))
    }
}

/// Rewrites a request for the HTTP/2 hop to the peer sidecar: absolute URI, hop-by-hop and
/// Host fields removed, no caller identity (only the inbound proxy may say who the caller is),
/// and `x-mesh-orig-proto` telling the peer the app spoke HTTP/1.
fn for_peer(parts: &mut http::request::Parts, authority: &str) -> Result<(), ProxyError> {
    let h1 = parts.version < Version::HTTP_2;
    parts.uri = absolute_uri(Some(authority), std::mem::take(&mut parts.uri))
        .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    parts.version = Version::HTTP_2;
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    h.remove(http::header::HOST);
    h.remove(XFCC);
    if h1 {
        h.insert(ORIG_PROTO, HeaderValue::from_static(ORIG_PROTO_H1));
    } else {
        h.remove(ORIG_PROTO);
    }
    Ok(())
}

/// With tracing on, this hop's span becomes the next hop's parent (`traceparent`), and the
/// attempts the request makes are recorded on it.
fn propagate_trace(obs: &mut Observation, parts: &mut http::request::Parts) {
    let Some(d) = obs.detail.as_mut() else { return };
    let Some(span) = &d.span else { return };
    if let Ok(v) = HeaderValue::from_str(&span.context.header()) {
        parts.headers.insert(TRACEPARENT, v);
    }
    let tried = parts.extensions.get::<Tried>().cloned().unwrap_or_default();
    parts.extensions.insert(tried.clone());
    d.tried = Some(tried);
}

/// The redirect a rule answers with: each part the rule leaves empty keeps the request's.
fn redirect(rd: &Redirect, authority: &str, uri: &http::Uri) -> Response<Body> {
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let host = rd.host.as_deref().unwrap_or(authority);
    let path = rd.path.as_deref().unwrap_or(uri.path());
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut r = Response::new(crate::http::full(""));
    *r.status_mut() = rd.status;
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{path}{query}")) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}
