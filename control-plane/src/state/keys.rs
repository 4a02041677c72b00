//! Store keys, typed. Every key the registry writes is made by [`Key`]'s `Display` and every
//! stored key is read back by [`Key::parse`], so the spelling lives in one place and a key no
//! kind knows is a corrupt store, not a silently ignored entry.
//!
//! Layout: `<kind>/<service key>` for what belongs to a service (`routes/catalog.shop`),
//! `endpoints/<service key>/<endpoint id>`, `authz-defaults/<namespace>`, `presence/<replica>`,
//! `tokens/<sha256>`, `revocations/<grant key>` and `trust/bundle`.

use std::fmt;

/// What a service-keyed entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Service,
    Route,
    Policy,
    Canary,
    Authz,
    Mtls,
    Vips,
    Protocols,
}

impl ServiceKind {
    const ALL: [ServiceKind; 8] = [
        ServiceKind::Service,
        ServiceKind::Route,
        ServiceKind::Policy,
        ServiceKind::Canary,
        ServiceKind::Authz,
        ServiceKind::Mtls,
        ServiceKind::Vips,
        ServiceKind::Protocols,
    ];

    fn prefix(self) -> &'static str {
        match self {
            ServiceKind::Service => "services",
            ServiceKind::Route => "routes",
            ServiceKind::Policy => "policies",
            ServiceKind::Canary => "canaries",
            ServiceKind::Authz => "authz",
            ServiceKind::Mtls => "mtls",
            ServiceKind::Vips => "vips",
            ServiceKind::Protocols => "protocols",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// One record of a service (`kind`, service key).
    Of(ServiceKind, &'a str),
    /// An endpoint (service key, endpoint id).
    Endpoint(&'a str, &'a str),
    /// A namespace's default authorization action.
    AuthzDefault(&'a str),
    /// A namespace's egress mode.
    Egress(&'a str),
    /// The proxies connected to one control-plane replica.
    Presence(&'a str),
    /// A bootstrap token, by the SHA-256 of its secret.
    Token(&'a str),
    /// A revoked token or identity (`ca::grant`'s key).
    Revocation(&'a str),
    TrustBundle,
}

impl<'a> Key<'a> {
    /// The key `s` spells; None: no kind has that shape.
    pub fn parse(s: &'a str) -> Option<Key<'a>> {
        let mut parts = s.splitn(3, '/');
        let (kind, a, b) = (parts.next()?, parts.next()?, parts.next());
        if a.is_empty() {
            return None;
        }
        Some(match (kind, b) {
            ("endpoints", Some(id)) if !id.is_empty() => Key::Endpoint(a, id),
            ("authz-defaults", None) => Key::AuthzDefault(a),
            ("egress", None) => Key::Egress(a),
            ("presence", None) => Key::Presence(a),
            ("tokens", None) => Key::Token(a),
            ("revocations", None) => Key::Revocation(a),
            ("trust", None) if a == "bundle" => Key::TrustBundle,
            (k, None) => Key::Of(*ServiceKind::ALL.iter().find(|sk| sk.prefix() == k)?, a),
            _ => return None,
        })
    }

    /// The service this key belongs to, if any (its changes bump the service's version).
    pub fn service(&self) -> Option<&'a str> {
        match *self {
            Key::Of(_, s) | Key::Endpoint(s, _) => Some(s),
            _ => None,
        }
    }

    /// The same key for service `to` (a service-keyed one; others unchanged).
    pub fn with_service(self, to: &'a str) -> Key<'a> {
        match self {
            Key::Of(k, _) => Key::Of(k, to),
            Key::Endpoint(_, id) => Key::Endpoint(to, id),
            other => other,
        }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Of(k, s) => write!(f, "{}/{s}", k.prefix()),
            Key::Endpoint(s, id) => write!(f, "endpoints/{s}/{id}"),
            Key::AuthzDefault(ns) => write!(f, "authz-defaults/{ns}"),
            Key::Egress(ns) => write!(f, "egress/{ns}"),
            Key::Presence(r) => write!(f, "presence/{r}"),
            Key::Token(h) => write!(f, "tokens/{h}"),
            Key::Revocation(k) => write!(f, "revocations/{k}"),
            Key::TrustBundle => f.write_str("trust/bundle"),
        }
    }
}

/// The name under which a revoked token's record is kept (`Key::Revocation`).
pub fn token_key(id: &str) -> String {
    format!("token:{id}")
}

/// The name under which a revoked identity's record is kept (`identity:<ns>:<sa>`).
pub fn identity_key(id: &crate::ca::spiffe::SpiffeId) -> String {
    format!("identity:{}:{}", id.namespace, id.service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reads_back_as_written() {
        let keys = [
            Key::Of(ServiceKind::Service, "catalog.shop"),
            Key::Of(ServiceKind::Route, "catalog.shop"),
            Key::Of(ServiceKind::Policy, "a.b"),
            Key::Of(ServiceKind::Canary, "a.b"),
            Key::Of(ServiceKind::Authz, "a.b"),
            Key::Of(ServiceKind::Mtls, "a.b"),
            Key::Of(ServiceKind::Vips, "a.b"),
            Key::Of(ServiceKind::Protocols, "a.b"),
            Key::Endpoint("a.b", "pod-1.b"),
            Key::AuthzDefault("shop"),
            Key::Egress("shop"),
            Key::Presence("replica-1"),
            Key::Token("ab12"),
            Key::Revocation("identity:shop:catalog"),
            Key::TrustBundle,
        ];
        for k in keys {
            let s = k.to_string();
            assert_eq!(Key::parse(&s), Some(k), "{s}");
        }
        assert_eq!(Key::parse("routes/a").and_then(|k| k.service()), Some("a"));
        for bad in [
            "",
            "routes",
            "routes/",
            "nope/a",
            "endpoints/a",
            "trust/other",
            "routes/a/b",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
        }
    }
}
