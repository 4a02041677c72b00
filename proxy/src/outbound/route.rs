//! The route level of an outbound request: which rule of the service's route it takes, and
//! what that rule says about it (header edits, where it goes, under which policy, whether a
//! copy is mirrored). The request's own path through `Outbound::proxy` reads: resolve the
//! service → route → redirect, upgrade or tunnel → rewrite for the peer → mirror → the policy
//! stack → response edits.

use super::pool::Pool;
use super::stack::{self, Stack};
use crate::balance::Balancer;
use crate::http::body::{ReplayBody, ReqBody, Upload};
use crate::http::router::{MirrorConfig, Rule};
use crate::policy::{Policy, PolicyState};
use crate::snapshot::{DEFAULT_ROUTE, Service, Target};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use std::sync::Arc;

/// Marks a mirror copy.
pub const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-mesh-mirror");

/// A request's service and the rule of its route it took (None: the default backends).
#[derive(Clone, Copy)]
pub(super) struct Routed<'a> {
    pub svc: &'a Service,
    pub rule: Option<(&'a Rule, &'a Target)>,
}

impl<'a> Routed<'a> {
    /// The first rule of `svc`'s route (sorted by precedence) that matches the request.
    pub fn route(svc: &'a Service, parts: &http::request::Parts) -> Self {
        let rule = svc
            .routes
            .route(&parts.method, &parts.uri, &parts.headers)
            .and_then(|i| svc.routes.rules.get(i))
            .map(|r| (&r.rule, &r.target));
        Routed { svc, rule }
    }

    /// The rule's name for logs, spans and `x-mesh-route` (`default` without one).
    pub fn name(&self) -> Arc<str> {
        self.rule
            .map_or_else(|| DEFAULT_ROUTE.into(), |(r, _)| r.name.clone())
    }

    /// The request counters of the rule, or the service's default route.
    pub fn metrics(&self) -> &'a Arc<crate::telemetry::metrics::TargetMetrics> {
        self.rule.map_or(&self.svc.metrics, |(_, t)| &t.metrics)
    }

    /// Where the request goes: the rule's backends, or the service's default ones.
    pub fn balancer(&self) -> &'a Arc<Balancer> {
        self.rule.map_or(&self.svc.balancer, |(_, t)| &t.balancer)
    }

    /// The rule's own policy, or the service's.
    pub fn policy(&self) -> (&'a Policy, &'a PolicyState) {
        self.svc.policy_for(self.rule)
    }

    /// The policy stack to the rule's backends (built when the push was applied).
    pub fn stack(&self) -> Stack {
        self.rule.map_or(&self.svc.stack, |(_, t)| &t.stack).clone()
    }

    /// The rule's request header edits.
    pub fn edit_request(&self, h: &mut HeaderMap) {
        if let Some((r, _)) = self.rule {
            for n in &r.remove_request {
                h.remove(n);
            }
            for (n, v) in &r.set_request {
                h.insert(n.clone(), v.clone());
            }
        }
    }

    /// The rule's response header edits.
    pub fn edit_response(&self, h: &mut HeaderMap) {
        if let Some((r, _)) = self.rule {
            for n in &r.remove_response {
                h.remove(n);
            }
            for (n, v) in &r.set_response {
                h.insert(n.clone(), v.clone());
            }
        }
    }

    /// Where a copy of this request goes, if the rule (or the service) mirrors and this request
    /// is in the mirrored share; None as well when `room` has no permit left (a slow shadow
    /// must not pile up copies in the proxy).
    /// Boxed: few requests are mirrored, and a copy's head kept inline across the call would
    /// enlarge every request's future.
    pub fn mirror(&self, room: &Arc<tokio::sync::Semaphore>) -> Option<Box<Mirror>> {
        let (cfg, to): (Option<&MirrorConfig>, _) = match self.rule {
            Some((r, t)) => (r.mirror.as_ref(), t.mirror_balancer.as_ref()),
            None => (self.svc.mirror.as_ref(), self.svc.mirror_balancer.as_ref()),
        };
        match (cfg, to) {
            (Some(m), Some(to)) if m.percent > 0.0 && fastrand::f64() * 100.0 < m.percent => {
                let permit = room.clone().try_acquire_owned().ok()?;
                Some(Box::new(Mirror {
                    to: to.clone(),
                    permit,
                    copy: Request::new(()),
                    kept: None,
                }))
            }
            _ => None,
        }
    }
}

/// A mirror copy on its way: its head, the shadow's balancer, and a replay of the body.
pub(super) struct Mirror {
    to: Arc<Balancer>,
    permit: tokio::sync::OwnedSemaphorePermit,
    copy: Request<()>,
    kept: Option<ReplayBody>,
}

/// The body to send, and (when mirrored) the copy a mirror replays once the body is complete.
/// `counted`: where the request's size is counted when its head did not say.
pub(super) fn request_body(
    body: hyper::body::Incoming,
    idle: Option<std::time::Duration>,
    mirror: Option<&mut Mirror>,
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
) -> ReqBody {
    use http_body::Body as _;
    if body.is_end_stream() {
        return ReqBody::Empty;
    }
    let upload = Upload::new(body, idle).counting(counted);
    match mirror {
        None => ReqBody::Incoming(upload),
        Some(m) => {
            let kept = ReplayBody::new(upload);
            let primary = kept.replay().map_or(ReqBody::Empty, ReqBody::Replay);
            m.kept = Some(kept);
            primary
        }
    }
}

impl Mirror {
    /// Copies the head of the request as it goes to the peer, marked as a mirror copy.
    pub fn copy_head(&mut self, parts: &http::request::Parts) {
        let c = &mut self.copy;
        *c.method_mut() = parts.method.clone();
        *c.uri_mut() = parts.uri.clone();
        *c.version_mut() = parts.version;
        *c.headers_mut() = parts.headers.clone();
        c.headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("true"));
    }

    /// Sends the copy to the shadow on a task of its own (no policies, no retries), once the
    /// primary's body was read whole; a body that outgrew the replay buffer is not mirrored.
    pub fn send(self: Box<Self>, svc: &Service, policy: &Policy, pool: &Arc<Pool>) {
        let body = match self.kept {
            None => Some(ReqBody::Empty),
            Some(k) => k
                .complete()
                .then(|| k.replay())
                .flatten()
                .map(ReqBody::Replay),
        };
        let Some(body) = body else { return };
        let Mirror {
            to, permit, copy, ..
        } = *self;
        let shadow = stack::endpoint((&svc.name, &svc.identity, &svc.external), &to, policy, pool);
        let req = copy.map(|()| body);
        tokio::spawn(async move {
            use tower::ServiceExt;
            let r = shadow.oneshot(req).await;
            tracing::debug!(ok = r.is_ok(), "mirror copy done");
            drop(permit);
        });
    }
}
