//! What a workload certificate's right to exist rests on, carried from certificate to
//! certificate so that revoking it ends the line.
//!
//! The first certificate of a workload is issued against a credential: a bootstrap token, or a
//! Kubernetes ServiceAccount token. Every renewal (authenticated by the certificate it renews)
//! copies that grant into the new certificate, in a private extension. A renewal is refused
//! when its grant was revoked since: the token it started from was revoked, the identity was
//! revoked after the grant began (`meshctl identity revoke`), or, on Kubernetes, its
//! ServiceAccount is gone. The proxy then keeps its certificate until it expires: the leaf
//! lifetime (`--cert-ttl-secs`) bounds how long a revoked workload can still talk.

use crate::ca::spiffe::SpiffeId;
use crate::state::records::now_unix_ms;
use crate::state::registry::State;

/// Prefix of the subject's organizational unit that carries the grant.
const OU_PREFIX: &str = "mesh-grant=";

/// The credential a line of certificates started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bootstrap token, by its id (the first 16 hex digits of its hash).
    Token(String),
    /// A Kubernetes ServiceAccount token (TokenReview).
    Kubernetes,
    /// A certificate issued before grants were recorded: only identity revocation applies.
    Unrecorded,
}

/// A certificate's grant: where it started, and when (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub source: Source,
    pub since_ms: i64,
}

pub use crate::state::keys::{identity_key, token_key};

impl Grant {
    /// A grant starting now from `source`.
    pub fn new(source: Source) -> Self {
        Self {
            source,
            since_ms: now_unix_ms(),
        }
    }

    fn encode(&self) -> String {
        let source = match &self.source {
            Source::Token(id) => format!("token:{id}"),
            Source::Kubernetes => "kubernetes".into(),
            Source::Unrecorded => "unrecorded".into(),
        };
        format!("{source}@{}", self.since_ms)
    }

    fn parse(s: &str) -> Option<Self> {
        let (source, since) = s.rsplit_once('@')?;
        let source = match source {
            "kubernetes" => Source::Kubernetes,
            "unrecorded" => Source::Unrecorded,
            s => Source::Token(s.strip_prefix("token:")?.to_string()),
        };
        Some(Self {
            source,
            since_ms: since.parse().ok()?,
        })
    }

    /// The certificate subject that carries it.
    pub fn subject(&self) -> rcgen::DistinguishedName {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::OrganizationalUnitName,
            format!("{OU_PREFIX}{}", self.encode()),
        );
        dn
    }

    /// The grant a DER certificate carries (None: it carries none).
    pub fn of_cert(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let ou = cert
            .subject()
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok())
            .find_map(|v| v.strip_prefix(OU_PREFIX))?;
        Self::parse(ou)
    }

    /// Why a renewal under this grant is refused, if it is.
    pub fn revoked(&self, st: &State, identity: &SpiffeId) -> Option<String> {
        if let Some(r) = st.revocations.get(&identity_key(identity))
            && self.since_ms <= r.revoked_at_ms
        {
            return Some(format!("identity {identity} was revoked"));
        }
        match &self.source {
            Source::Token(id) if st.revocations.contains_key(&token_key(id)) => Some(format!(
                "the bootstrap token {id} this certificate descends from was revoked"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_survives_the_round_trip_through_a_certificate() {
        let g = Grant::new(Source::Token("0123456789abcdef".into()));
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.distinguished_name = g.subject();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(Grant::of_cert(cert.der()), Some(g));
        let plain = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(Grant::of_cert(plain.der()), None);
        for s in ["kubernetes@5", "unrecorded@7", "token:ab@9"] {
            assert_eq!(Grant::parse(s).map(|g| g.encode()).as_deref(), Some(s));
        }
        assert_eq!(Grant::parse("token@x"), None);
    }
}
