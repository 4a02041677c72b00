//! SPIFFE identities `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// A workload identity inside one trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a mesh SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid SPIFFE identity {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct InvalidSpiffeId(pub String);

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl SpiffeId {
    /// Builds an identity, checking each part is a DNS-like label.
    pub fn new(trust_domain: &str, namespace: &str, sa: &str) -> Result<Self, InvalidSpiffeId> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: sa.to_string(),
        };
        if [trust_domain, namespace, sa].iter().all(|p| valid_label(p)) {
            Ok(id)
        } else {
            Err(InvalidSpiffeId(id.to_string()))
        }
    }

    /// Parses `spiffe://td/ns/<ns>/sa/<sa>`.
    pub fn parse(s: &str) -> Result<Self, InvalidSpiffeId> {
        let err = || InvalidSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::new(td, ns, sa).map_err(|_| err())
            }
            _ => Err(err()),
        }
    }

    /// Parses `<namespace>/<service-account>` within `trust_domain`.
    pub fn from_ns_sa(trust_domain: &str, ns_sa: &str) -> Result<Self, InvalidSpiffeId> {
        match ns_sa.split_once('/') {
            Some((ns, sa)) if !sa.contains('/') => Self::new(trust_domain, ns, sa),
            _ => Err(InvalidSpiffeId(ns_sa.to_string())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The SPIFFE identities (URI SANs starting `spiffe://`) of a DER certificate.
pub fn uri_sans_of_cert(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::parse("spiffe://mesh.local/ns/default/sa/web").unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "web");
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/default/sa/web");
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "spiffe://mesh.local/ns/default",
            "http://mesh.local/ns/a/sa/b",
            "spiffe://mesh.local/ns/a/sa/b/c",
            "spiffe://mesh.local/ns//sa/b",
            "spiffe://mesh.local/ns/a b/sa/b",
        ] {
            assert!(SpiffeId::parse(s).is_err(), "{s}");
        }
        assert!(SpiffeId::from_ns_sa("td", "default").is_err());
        assert!(SpiffeId::from_ns_sa("td", "default/web").is_ok());
    }
}
