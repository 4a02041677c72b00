//! Admin credentials and their scopes. Every admin RPC needs one scope, named in one table
//! ([`required`]); a method missing from it is refused to everyone but the root token, so a
//! new RPC is closed until it is placed.

use crate::ca::tokens;
use crate::state::records::now_unix;
use crate::state::registry::Registry;
use std::sync::Arc;
use std::task::{Context, Poll};

/// What an admin credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Lists, gets, top, tap, authorization checks: nothing changes.
    Read,
    /// Routes, policies, authorization rules, mTLS mode, endpoints, canaries.
    Write,
    /// Bootstrap tokens and admin credentials, identity revocation, CA rotation.
    Identity,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Identity];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Identity => "identity",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown scope {s:?}: expected read, write or identity"))
    }
}

/// A set of scopes, as a caller holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub const ALL: Scopes = Scopes(0b111);

    pub fn has(self, s: Scope) -> bool {
        self.0 & (1 << s as u8) != 0
    }

    pub fn with(self, s: Scope) -> Self {
        Scopes(self.0 | (1 << s as u8))
    }

    pub fn covers(self, other: Scopes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parses names, refusing unknown ones and an empty list. `write` and `identity` include
    /// `read`: meshctl reads a route before it changes it, and an operator who may change
    /// something may see it.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        if names.is_empty() {
            return Err("an admin credential needs at least one scope".into());
        }
        names.iter().try_fold(Scopes::default(), |acc, n| {
            Ok(acc.with(Scope::parse(n.as_ref())?).with(Scope::Read))
        })
    }

    pub fn names(self) -> Vec<String> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.has(*s))
            .map(|s| s.name().to_string())
            .collect()
    }
}

/// The scope each admin RPC needs; `None` for a method this table does not know.
pub fn required(method: &str) -> Option<Scope> {
    Some(match method {
        "ListServices" | "ListEndpoints" | "GetRoute" | "ListRoutes" | "RouteHistory"
        | "GetPolicy" | "GetAuthz" | "CheckAuthz" | "GetCanary" | "Top" | "Tap" | "ListProxies"
        | "GetVersion" | "ListTokens" | "GetCa" | "ListExternals" => Scope::Read,
        "AddEndpoint" | "RemoveEndpoint" | "SetRoute" | "RollbackRoute" | "SetPolicy"
        | "SetAuthz" | "SetAuthzDefault" | "SetMtlsMode" | "SetAppProtocols" | "StartCanary"
        | "CanaryAction" | "SetExternal" | "RemoveExternal" | "SetEgressMode" => Scope::Write,
        "CreateToken" | "RevokeToken" | "RevokeIdentity" | "RotateCa" => Scope::Identity,
        _ => return None,
    })
}

/// Prefix of admin credentials, so one is never mistaken for a bootstrap token.
pub use crate::ca::tokens::ADMIN_PREFIX as PREFIX;

/// Creates an admin credential with `scopes`; returns it (once), its expiry and its id.
pub async fn create(
    registry: &Registry,
    scopes: Scopes,
    name: &str,
    ttl_secs: u64,
) -> Result<(String, i64, String), crate::state::registry::RegistryError> {
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(crate::state::registry::RegistryError::Invalid(
            "credential name: at most 128 printable characters".into(),
        ));
    }
    tokens::store(
        registry,
        PREFIX,
        String::new(),
        scopes.names(),
        name,
        ttl_secs,
    )
    .await
}

/// The scopes a presented credential holds right now (`None`: unknown, expired or malformed).
pub fn lookup(registry: &Registry, root: &[u8], given: &str) -> Option<Scopes> {
    if constant_time_eq(given.as_bytes(), root) {
        return Some(Scopes::ALL);
    }
    let rest = given.strip_prefix(PREFIX)?;
    if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let st = registry.state();
    let rec = st.tokens.get(&tokens::hash(given))?;
    if rec.expires_at_unix <= now_unix() || !rec.identity.is_empty() {
        return None;
    }
    Scopes::parse(&rec.scopes).ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin API's gate: resolves the bearer credential to its scopes (a mesh credential, or
/// on Kubernetes the caller's own Kubernetes token: `kube_auth`), refuses the call unless they
/// hold the method's scope, and hands the scopes to the handler (request extension).
#[derive(Clone)]
pub struct AdminAuth<S> {
    inner: S,
    registry: Arc<Registry>,
    root: Arc<str>,
    kube: Option<Arc<super::kube_auth::KubeAuth>>,
}

impl<S> AdminAuth<S> {
    pub fn layer(
        registry: Arc<Registry>,
        root: &str,
        kube: Option<Arc<super::kube_auth::KubeAuth>>,
    ) -> impl tower::Layer<S, Service = AdminAuth<S>> + Clone {
        let root: Arc<str> = root.into();
        tower::layer::layer_fn(move |inner| AdminAuth {
            inner,
            registry: registry.clone(),
            root: root.clone(),
            kube: kube.clone(),
        })
    }
}

/// The bearer credential of a request ("" if none).
fn bearer<B>(req: &http::Request<B>) -> &str {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// Whether scopes `held` may call `method`.
fn authorize(held: Scopes, method: &str) -> Result<Scopes, tonic::Status> {
    match required(method) {
        Some(s) if held.has(s) => Ok(held),
        None if held == Scopes::ALL => Ok(held),
        Some(s) => Err(tonic::Status::permission_denied(format!(
            "{method} needs the {:?} scope; this credential has {:?}",
            s.name(),
            held.names()
        ))),
        None => Err(tonic::Status::permission_denied(format!(
            "{method} is open to the root admin token only"
        ))),
    }
}

fn unauthenticated() -> tonic::Status {
    tonic::Status::unauthenticated("missing, wrong or expired admin credential")
}

impl<S, B> tower::Service<http::Request<B>> for AdminAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let given = bearer(&req);
        let refused =
            |s: tonic::Status| -> Self::Future { Box::pin(std::future::ready(Ok(s.into_http()))) };
        if let Some(held) = lookup(&self.registry, self.root.as_bytes(), given) {
            return match authorize(held, &method) {
                Ok(held) => {
                    req.extensions_mut().insert(held);
                    Box::pin(self.inner.call(req))
                }
                Err(s) => refused(s),
            };
        }
        // Not a mesh credential: perhaps the caller's Kubernetes token.
        let Some(kube) = self
            .kube
            .clone()
            .filter(|_| !given.is_empty() && !given.starts_with(PREFIX))
        else {
            return refused(unauthenticated());
        };
        let token = given.to_string();
        // The ready service goes with the call; a clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let held = match kube.scopes(&token).await {
                Some(h) => h,
                None => return Ok(unauthenticated().into_http()),
            };
            match authorize(held, &method) {
                Ok(held) => {
                    req.extensions_mut().insert(held);
                    inner.call(req).await
                }
                Err(s) => Ok(s.into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_cover() {
        let rw = Scopes::parse(&["write"]).unwrap();
        assert!(rw.has(Scope::Read) && rw.has(Scope::Write) && !rw.has(Scope::Identity));
        assert!(Scopes::ALL.covers(rw) && !rw.covers(Scopes::ALL));
        assert_eq!(rw.names(), ["read", "write"]);
        let r = Scopes::parse(&["read"]).unwrap();
        assert!(rw.covers(r) && !r.covers(rw) && !r.has(Scope::Write));
        assert!(Scopes::parse(&["admin"]).is_err());
        assert!(Scopes::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn every_admin_rpc_has_a_scope() {
        let proto = include_str!("../../../../proto/mesh/v1/admin.proto");
        let body = proto
            .split("service Admin {")
            .nth(1)
            .and_then(|s| s.split("\n}").next())
            .unwrap();
        let methods: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert!(methods.len() > 20, "{methods:?}");
        for m in methods {
            assert!(required(m).is_some(), "admin RPC {m} has no scope");
        }
    }
}
