//! Stored domain records: what the store holds under each key, as JSON.
//!
//! Under which key each is stored: `state::keys`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many earlier versions of a route are kept for `meshctl route history`.
pub const ROUTE_HISTORY_LEN: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: String,
    pub namespace: String,
    /// SPIFFE identity all endpoints of this service present (empty for an external one).
    pub identity: String,
    /// Set for a service outside the mesh (`meshctl external add`), keyed by its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRecord>,
}

/// A service outside the mesh: where it is and how callers' proxies connect to it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExternalRecord {
    pub port: u16,
    pub tls: bool,
    #[serde(default)]
    pub ca_pem: String,
    #[serde(default)]
    pub sni: String,
    #[serde(default)]
    pub client_cert_pem: String,
    #[serde(default)]
    pub client_key_pem: String,
    /// ip:port each.
    pub addresses: Vec<String>,
    /// The addresses were resolved from the host (none were given): resolved again every
    /// `api::admin::RESOLVE_INTERVAL`.
    #[serde(default)]
    pub resolved: bool,
}

/// A service's virtual IPs (Kubernetes ClusterIPs) and their ports, each with the app port it
/// reaches on the endpoints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct VipRecord {
    pub ips: Vec<String>,
    /// (service port, target app port)
    pub ports: Vec<(u16, u16)>,
    /// Target app port → protocol (`http1`, `http2`, `opaque`) the Service declares.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub protocols: BTreeMap<u16, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: String,
    /// ip:port of the endpoint's sidecar inbound listener.
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Registered by its proxy (whose node id is `id`): removed once that proxy has been gone
    /// longer than the endpoint lease (a lost machine never deregisters). Endpoints added
    /// with meshctl are not leased.
    #[serde(default)]
    pub leased: bool,
    /// The app's port on the endpoint's IP (0: not known).
    #[serde(default)]
    pub app_port: u16,
    /// Comes from a Kubernetes EndpointSlice (kept in step with it by `kubernetes`).
    #[serde(default)]
    pub kubernetes: bool,
    /// The endpoint's SPIFFE id when it differs from its service's (a Service whose pods run
    /// under several service accounts).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

impl EndpointRecord {
    /// The endpoint's `version` label, if any.
    pub fn version(&self) -> Option<&str> {
        self.labels.get("version").map(String::as_str)
    }
}

/// A route is the API message itself (plain data with serde): default backends plus rules.
pub type Route = mesh_proto::v1::Route;

/// One version of a route as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteVersion {
    pub route: Route,
    pub revision: u64,
    pub updated_at_unix: i64,
}

/// The current route of a service and the versions before it (newest first).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteRecord {
    pub current: RouteVersion,
    #[serde(default)]
    pub history: Vec<RouteVersion>,
}

/// A service's resilience policy (the API message itself: it is plain data with serde).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub policy: mesh_proto::v1::Policy,
    pub revision: u64,
    pub updated_at_unix: i64,
}

/// A service's authorization rules as stored (the namespace default is kept apart).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuthzRecord {
    pub authz: mesh_proto::v1::Authz,
    pub revision: u64,
    pub updated_at_unix: i64,
}

/// An automated canary: where it stands, kept in the store so a restart resumes it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CanaryRecord {
    pub service: String,
    pub from: String,
    pub to: String,
    /// Weight percentages of `to`, ascending, ending at 100.
    pub steps: Vec<u32>,
    pub step_index: usize,
    /// running, paused, promoted, rolled-back, aborted
    pub state: String,
    #[serde(default)]
    pub reason: String,
    pub interval_ms: u32,
    pub max_error_percent: f64,
    pub max_p99_ms: u32,
    pub min_requests: u32,
    /// When the current step began (unix ms): its judgement window starts there.
    pub step_started_ms: i64,
    pub updated_at_unix: i64,
}

/// Which proxies one control-plane replica has connected, refreshed while it lives (shared
/// stores only): the endpoint-lease sweeper runs on one replica and must know them all, and
/// the other replicas find it at `address` to ask for its proxies' telemetry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PresenceRecord {
    pub nodes: Vec<String>,
    pub at_unix_ms: i64,
    /// `host:port` of its proxies' port, where the other replicas reach it (empty: they
    /// cannot).
    #[serde(default)]
    pub address: String,
}

/// A revoked grant (`ca::grant`): a bootstrap token (`token:<id>`) or an identity
/// (`identity:<ns>:<sa>`). Renewals of certificates descending from it are refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRecord {
    /// When it was revoked, Unix milliseconds: an identity's certificates whose grant began
    /// before this are refused; a token issued after it starts a new, valid line.
    pub revoked_at_ms: i64,
}

/// A bootstrap token or a scoped admin credential, stored by its SHA-256 only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// SPIFFE identity this token may obtain a certificate for (empty for an admin credential).
    pub identity: String,
    pub expires_at_unix: i64,
    pub created_at_unix: i64,
    /// An admin credential's scopes (`admin::scope`); records written before scopes existed
    /// are bootstrap tokens and read back unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// The trust bundle proxies verify peers against, pushed as resource "trust/bundle". Stored
/// (not only derived from the CA files) so every replica pushes the same bundle.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrustRecord {
    pub bundle_pem: String,
    /// Fingerprint of the root that signs new certificates.
    pub signer: String,
}

/// Seconds since the Unix epoch.
/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
