//! Kubernetes credentials as admin credentials: on Kubernetes a caller may present the bearer
//! token of its kubeconfig instead of a mesh credential, so no shared token is handed around.
//! The API server says who it is (TokenReview) and what it may do (SubjectAccessReview on the
//! virtual resource `admin` of group `mesh.io`, verbs `read`, `write`, `identity`: the
//! ClusterRoles `mesh-viewer`, `mesh-editor` and `mesh-admin` that `meshctl install` makes
//! grant them). Answers are kept for a short while, so a burst of calls costs the API server
//! two or four requests, and a revoked binding takes effect within that while.

use super::scope::{Scope, Scopes};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an answer of the API server is kept.
const CACHE_FOR: Duration = Duration::from_secs(30);
/// Answers kept at most (distinct tokens).
const CACHE_MAX: usize = 1024;

/// The group and resource RBAC rules name to grant mesh scopes.
pub const GROUP: &str = "mesh.io";
pub const RESOURCE: &str = "admin";

/// An answer: the scopes (None: not authenticated, or no scope), and when it was given.
type Answer = (Option<Scopes>, Instant);

pub struct KubeAuth {
    client: kube::Client,
    /// Answers by the SHA-256 of the token.
    cache: Mutex<HashMap<[u8; 32], Answer>>,
    /// Reviews in flight at most: a flood of made-up tokens cannot turn into a flood of
    /// requests to the API server.
    in_flight: tokio::sync::Semaphore,
}

/// Reviews of uncached tokens at once, at most; callers past it are refused for now.
const MAX_IN_FLIGHT: usize = 8;

impl KubeAuth {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// The scopes Kubernetes grants the holder of `token` (None: unknown token, or none).
    pub async fn scopes(&self, token: &str) -> Option<Scopes> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Ok(c) = self.cache.lock()
            && let Some((s, at)) = c.get(&key)
            && at.elapsed() < CACHE_FOR
        {
            return *s;
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            tracing::warn!("too many Kubernetes credentials under review at once; one refused");
            return None;
        };
        let scopes = self.ask(token).await;
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_MAX {
                c.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
                if c.len() >= CACHE_MAX {
                    c.clear();
                }
            }
            c.insert(key, (scopes, Instant::now()));
        }
        scopes
    }

    async fn ask(&self, token: &str) -> Option<Scopes> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| tracing::warn!(error = %e, "TokenReview of an admin caller failed"))
            .ok()?;
        let status = reviewed.status?;
        if status.authenticated != Some(true) {
            return None;
        }
        let user = status.user?;
        let sars = Api::<SubjectAccessReview>::all(self.client.clone());
        let mut held = Scopes::default();
        for scope in Scope::ALL {
            let sar = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username.clone(),
                    groups: user.groups.clone(),
                    uid: user.uid.clone(),
                    extra: user.extra.clone(),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(GROUP.into()),
                        resource: Some(RESOURCE.into()),
                        verb: Some(scope.name().into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = sars
                .create(&PostParams::default(), &sar)
                .await
                .map_err(|e| tracing::warn!(error = %e, "SubjectAccessReview failed"))
                .ok()
                .and_then(|r| r.status)
                .is_some_and(|s| s.allowed);
            if allowed {
                // As for mesh credentials: who may change something may see it.
                held = held.with(scope).with(Scope::Read);
            }
        }
        tracing::debug!(user = ?user.username, scopes = ?held.names(), "Kubernetes caller");
        (held != Scopes::default()).then_some(held)
    }
}
