//! The admin API meshctl calls, behind a bearer credential with scopes (`scope`).

pub mod externals;
pub mod kube_auth;
pub mod scope;

use crate::ca::spiffe::SpiffeId;
use crate::ca::tokens;
use crate::discovery::{ProxyTable, endpoint_from_proto, endpoint_to_proto};
use crate::state::records::RouteVersion;
use crate::state::registry::{Registry, check_name};
use mesh_proto::v1 as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

use externals::{external_info, resolve};
use mesh_proto::NAMESPACE_HEADER;

/// A request naming a service.
trait NamesService {
    fn service_mut(&mut self) -> &mut String;
}

macro_rules! names_service {
    ($($t:ty),*) => {
        $(impl NamesService for $t {
            fn service_mut(&mut self) -> &mut String {
                &mut self.service
            }
        })*
    };
}

names_service!(
    pb::ListEndpointsRequest,
    pb::AddEndpointRequest,
    pb::RemoveEndpointRequest,
    pb::GetRouteRequest,
    pb::SetRouteRequest,
    pb::TapRequest,
    pb::StartCanaryRequest,
    pb::GetCanaryRequest,
    pb::CanaryActionRequest,
    pb::GetPolicyRequest,
    pb::SetPolicyRequest,
    pb::GetAuthzRequest,
    pb::SetAuthzRequest,
    pb::SetMtlsModeRequest,
    pb::SetAppProtocolsRequest,
    pb::CheckAuthzRequest
);

/// The namespace a caller's bare service names are in.
fn caller_namespace<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(NAMESPACE_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or(mesh_model::service::DEFAULT_NAMESPACE)
        .to_string()
}

/// The request with its service name made absolute (`name.namespace`), as the registry keys
/// services: a bare name is in the caller's namespace.
fn qualified<T: NamesService>(req: Request<T>) -> T {
    let ns = caller_namespace(&req);
    let mut m = req.into_inner();
    let s = m.service_mut();
    if !s.is_empty() {
        *s = mesh_model::service::absolute(s, &ns);
    }
    m
}

pub struct AdminService {
    pub registry: Arc<Registry>,
    pub proxies: Arc<ProxyTable>,
    /// Every replica's proxies, their telemetry and tap events (canary status shows the
    /// current step's).
    pub view: Arc<crate::replicas::view::MeshView>,
    /// The CA and what follows its root changes.
    pub rotation: Arc<crate::ca::rotation::Rotation>,
}

impl AdminService {
    /// A canary's info with what its current step has seen on every replica.
    async fn canary_info(&self, rec: &crate::state::records::CanaryRecord) -> pb::CanaryInfo {
        let (edges, _) = self
            .view
            .edges(rec.step_started_ms, Some((&rec.service, Some(&rec.to))))
            .await;
        crate::rollout::info(rec, &edges.window(&rec.service, &rec.to))
    }
}

/// A service's authorization as its proxies apply it, for get/set answers.
fn authz_info(
    st: &crate::state::registry::State,
    service: String,
    revision: u64,
) -> Result<Response<pb::AuthzInfo>, Status> {
    let authz = crate::discovery::effective_authz(st, &service)
        .ok_or_else(|| Status::not_found(format!("unknown service {service:?}")))?;
    Ok(Response::new(pb::AuthzInfo {
        service,
        authz: Some(authz),
        revision,
    }))
}

fn route_info(service: &str, v: RouteVersion) -> pb::RouteInfo {
    pb::RouteInfo {
        service: service.to_string(),
        route: Some(v.route),
        revision: v.revision,
        updated_at_unix: v.updated_at_unix,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let st = self.registry.state();
        let services = st
            .services
            .iter()
            .map(|(key, s)| {
                let eps = st.endpoints.get(key);
                pb::ServiceInfo {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    identity: s.identity.clone(),
                    endpoints: eps.map_or(0, |m| m.len() as u32),
                    ready_endpoints: eps
                        .map_or(0, |m| m.values().filter(|e| e.ready).count() as u32),
                    versions: st.versions_of(key),
                    mtls_mode: Registry::mtls_mode(&st, key).to_string(),
                    app_protocols: Registry::app_protocols(&st, key),
                }
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn set_external(
        &self,
        req: Request<pb::SetExternalRequest>,
    ) -> Result<Response<pb::ExternalInfo>, Status> {
        let x = req
            .into_inner()
            .external
            .ok_or_else(|| Status::invalid_argument("external is required"))?;
        let host = x.host.to_ascii_lowercase();
        let port = u16::try_from(x.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("port {} is not a port", x.port)))?;
        let resolved = x.addresses.is_empty();
        let addresses = if resolved {
            resolve(&host, port)
                .await
                .map_err(Status::invalid_argument)?
        } else {
            x.addresses
        };
        let rec = crate::state::records::ExternalRecord {
            port,
            tls: x.tls,
            ca_pem: x.ca_pem,
            sni: x.sni,
            client_cert_pem: x.client_cert_pem,
            client_key_pem: x.client_key_pem,
            addresses,
            resolved,
        };
        self.registry.set_external(&host, rec.clone()).await?;
        tracing::info!(%host, port, tls = rec.tls, addresses = ?rec.addresses, "external service set");
        Ok(Response::new(external_info(&host, &rec)))
    }

    async fn remove_external(
        &self,
        req: Request<pb::RemoveExternalRequest>,
    ) -> Result<Response<pb::RemoveExternalResponse>, Status> {
        let host = req.into_inner().host.to_ascii_lowercase();
        self.registry.remove_external(&host).await?;
        tracing::info!(%host, "external service removed");
        Ok(Response::new(pb::RemoveExternalResponse {}))
    }

    async fn list_externals(
        &self,
        _: Request<pb::ListExternalsRequest>,
    ) -> Result<Response<pb::ListExternalsResponse>, Status> {
        let st = self.registry.state();
        let externals = st
            .services
            .iter()
            .filter_map(|(k, s)| s.external.as_ref().map(|x| external_info(k, x)))
            .collect();
        Ok(Response::new(pb::ListExternalsResponse { externals }))
    }

    async fn set_egress_mode(
        &self,
        req: Request<pb::SetEgressModeRequest>,
    ) -> Result<Response<pb::SetEgressModeResponse>, Status> {
        let m = req.into_inner();
        let revision = self.registry.set_egress_mode(&m.namespace, &m.mode).await?;
        tracing::info!(namespace = %m.namespace, mode = %m.mode, revision, "egress mode set");
        Ok(Response::new(pb::SetEgressModeResponse { revision }))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let filter = qualified(req).service;
        let st = self.registry.state();
        if !filter.is_empty() && !st.services.contains_key(&filter) {
            return Err(Status::not_found(format!("unknown service {filter:?}")));
        }
        let endpoints = st
            .endpoints
            .iter()
            .filter(|(s, _)| filter.is_empty() || **s == filter)
            .flat_map(|(s, m)| {
                m.values().map(move |e| pb::EndpointInfo {
                    service: s.clone(),
                    endpoint: Some(endpoint_to_proto(e)),
                })
            })
            .collect();
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn add_endpoint(
        &self,
        req: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::AddEndpointResponse>, Status> {
        let m = qualified(req);
        let ep = m
            .endpoint
            .ok_or_else(|| Status::invalid_argument("endpoint is required"))?;
        // The identity's namespace is the service's unless given; its account the service's
        // name unless given.
        let (name, service_ns) = mesh_model::service::split(&m.service);
        let ns = if m.namespace.is_empty() {
            service_ns
        } else {
            &m.namespace
        };
        let sa = if m.service_account.is_empty() {
            name
        } else {
            &m.service_account
        };
        let id = SpiffeId::new(&self.registry.trust_domain, ns, sa)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.registry
            .upsert_endpoint(&m.service, &id, endpoint_from_proto(ep))
            .await?;
        Ok(Response::new(pb::AddEndpointResponse {}))
    }

    async fn remove_endpoint(
        &self,
        req: Request<pb::RemoveEndpointRequest>,
    ) -> Result<Response<pb::RemoveEndpointResponse>, Status> {
        let m = qualified(req);
        self.registry
            .remove_endpoint(&m.service, &m.endpoint_id, None)
            .await?;
        Ok(Response::new(pb::RemoveEndpointResponse {}))
    }

    async fn get_route(
        &self,
        req: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::RouteInfo>, Status> {
        let service = qualified(req).service;
        let st = self.registry.state();
        if !st.services.contains_key(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        Ok(Response::new(route_info(&service, st.route_of(&service))))
    }

    async fn set_route(
        &self,
        req: Request<pb::SetRouteRequest>,
    ) -> Result<Response<pb::RouteInfo>, Status> {
        let m = qualified(req);
        check_name("service", &m.service)?;
        let route = m.route.unwrap_or_default();
        let v = self
            .registry
            .set_route(&m.service, route, !m.skip_validation, m.expected_revision)
            .await?;
        tracing::info!(service = %m.service, revision = v.revision, raw = m.skip_validation, "route set");
        Ok(Response::new(route_info(&m.service, v)))
    }

    async fn top(&self, req: Request<pb::TopRequest>) -> Result<Response<pb::TopResponse>, Status> {
        let secs = match req.into_inner().window_seconds {
            0 => 10,
            s => s.min(300),
        };
        let since = crate::observe::telemetry::now_ms() - i64::from(secs) * 1000;
        let (edges, unreachable_replicas) = self.view.edges(since, None).await;
        let rows = edges
            .by_version()
            .into_iter()
            .map(|(service, version, w)| pb::TopRow {
                service,
                version,
                requests: w.requests,
                rps: w.requests as f64 / f64::from(secs),
                success_percent: 100.0 - w.error_percent(),
                p50_ms: w.quantile_ms(50).unwrap_or(0),
                p99_ms: w.p99_ms().unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::TopResponse {
            window_seconds: secs,
            rows,
            unreachable_replicas,
        }))
    }

    type TapStream = crate::replicas::view::TapStream;

    async fn tap(&self, req: Request<pb::TapRequest>) -> Result<Response<Self::TapStream>, Status> {
        let r = qualified(req);
        if !self.registry.state().services.contains_key(&r.service) {
            return Err(Status::not_found(format!(
                "unknown service {:?}",
                r.service
            )));
        }
        Ok(Response::new(self.view.tap(r).await))
    }

    async fn start_canary(
        &self,
        req: Request<pb::StartCanaryRequest>,
    ) -> Result<Response<pb::CanaryInfo>, Status> {
        let rec = crate::rollout::start(&self.registry, &qualified(req)).await?;
        Ok(Response::new(self.canary_info(&rec).await))
    }

    async fn get_canary(
        &self,
        req: Request<pb::GetCanaryRequest>,
    ) -> Result<Response<pb::CanaryInfo>, Status> {
        let service = qualified(req).service;
        let rec = self
            .registry
            .state()
            .canaries
            .get(&service)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no canary for {service:?}")))?;
        Ok(Response::new(self.canary_info(&rec).await))
    }

    async fn canary_action(
        &self,
        req: Request<pb::CanaryActionRequest>,
    ) -> Result<Response<pb::CanaryInfo>, Status> {
        let m = qualified(req);
        let rec = crate::rollout::act(&self.registry, &m.service, &m.action).await?;
        Ok(Response::new(self.canary_info(&rec).await))
    }

    async fn rollback_route(
        &self,
        req: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::RouteInfo>, Status> {
        let service = qualified(req).service;
        let v = self.registry.rollback_route(&service).await?;
        tracing::info!(%service, revision = v.revision, "route rolled back");
        Ok(Response::new(route_info(&service, v)))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let service = qualified(req).service;
        let st = self.registry.state();
        if !st.services.contains_key(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let rec = st.policies.get(&service);
        Ok(Response::new(pb::PolicyInfo {
            service,
            policy: Some(rec.map(|r| r.policy.clone()).unwrap_or_default()),
            revision: rec.map_or(0, |r| r.revision),
        }))
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let m = qualified(req);
        check_name("service", &m.service)?;
        let policy = m.policy.unwrap_or_default();
        let rev = self
            .registry
            .set_policy(&m.service, policy.clone(), !m.skip_validation)
            .await?;
        tracing::info!(service = %m.service, revision = rev, raw = m.skip_validation, "policy set");
        Ok(Response::new(pb::PolicyInfo {
            service: m.service,
            policy: Some(policy),
            revision: rev,
        }))
    }

    async fn get_authz(
        &self,
        req: Request<pb::GetAuthzRequest>,
    ) -> Result<Response<pb::AuthzInfo>, Status> {
        let service = qualified(req).service;
        let st = self.registry.state();
        let revision = st.authz.get(&service).map_or(0, |r| r.revision);
        authz_info(&st, service, revision)
    }

    async fn set_authz(
        &self,
        req: Request<pb::SetAuthzRequest>,
    ) -> Result<Response<pb::AuthzInfo>, Status> {
        let m = qualified(req);
        check_name("service", &m.service)?;
        let rev = self
            .registry
            .set_authz(&m.service, m.authz.unwrap_or_default())
            .await?;
        tracing::info!(service = %m.service, revision = rev, "authorization set");
        authz_info(&self.registry.state(), m.service, rev)
    }

    async fn set_authz_default(
        &self,
        req: Request<pb::SetAuthzDefaultRequest>,
    ) -> Result<Response<pb::SetAuthzDefaultResponse>, Status> {
        let m = req.into_inner();
        let revision = self
            .registry
            .set_authz_default(&m.namespace, &m.default_action)
            .await?;
        tracing::info!(namespace = %m.namespace, default = %m.default_action, revision, "authorization default set");
        Ok(Response::new(pb::SetAuthzDefaultResponse { revision }))
    }

    async fn set_mtls_mode(
        &self,
        req: Request<pb::SetMtlsModeRequest>,
    ) -> Result<Response<pb::SetMtlsModeResponse>, Status> {
        let m = qualified(req);
        check_name("service", &m.service)?;
        let revision = self.registry.set_mtls_mode(&m.service, &m.mode).await?;
        tracing::info!(service = %m.service, mode = %m.mode, revision, "mTLS mode set");
        Ok(Response::new(pb::SetMtlsModeResponse { revision }))
    }

    async fn set_app_protocols(
        &self,
        req: Request<pb::SetAppProtocolsRequest>,
    ) -> Result<Response<pb::SetAppProtocolsResponse>, Status> {
        let m = qualified(req);
        check_name("service", &m.service)?;
        let revision = self
            .registry
            .set_app_protocols(&m.service, &m.ports)
            .await?;
        tracing::info!(service = %m.service, ports = m.ports.len(), revision, "app protocols set");
        Ok(Response::new(pb::SetAppProtocolsResponse { revision }))
    }

    /// Decides one request offline with the same code the proxies run.
    async fn check_authz(
        &self,
        req: Request<pb::CheckAuthzRequest>,
    ) -> Result<Response<pb::CheckAuthzResponse>, Status> {
        let m = qualified(req);
        let st = self.registry.state();
        let a = crate::discovery::effective_authz(&st, &m.service)
            .ok_or_else(|| Status::not_found(format!("unknown service {:?}", m.service)))?;
        let authz = mesh_authz::Authz::try_from(&a).map_err(|e| Status::internal(e.to_string()))?;
        let caller = mesh_authz::caller_id(&m.from, &st.trust_domain)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let method = if m.method.is_empty() {
            "GET"
        } else {
            m.method.as_str()
        };
        let path = if m.path.is_empty() {
            "/"
        } else {
            m.path.as_str()
        };
        // The path as the proxy decides on it: normalised, or refused before any rule.
        let path = match mesh_authz::path::normalize(path, authz.matches_paths()) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Response::new(pb::CheckAuthzResponse {
                    allowed: false,
                    decided_by: format!("refused before authorization (400): {e}"),
                    audit: false,
                }));
            }
        };
        let d = authz.decide(caller.as_deref(), method, &path);
        Ok(Response::new(pb::CheckAuthzResponse {
            allowed: d.allowed,
            decided_by: d.by.to_string(),
            audit: authz.audit && !d.allowed,
        }))
    }

    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let st = self.registry.state();
        let routes = st
            .services
            .keys()
            .map(|s| route_info(s, st.route_of(s)))
            .collect();
        Ok(Response::new(pb::ListRoutesResponse { routes }))
    }

    async fn route_history(
        &self,
        req: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::RouteHistoryResponse>, Status> {
        let service = qualified(req).service;
        let st = self.registry.state();
        if !st.services.contains_key(&service) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        let history = st
            .routes
            .get(&service)
            .map(|r| {
                std::iter::once(&r.current)
                    .chain(&r.history)
                    .map(|v| route_info(&service, v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::RouteHistoryResponse { history }))
    }

    async fn get_version(
        &self,
        _: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::VersionInfo>, Status> {
        let (proxies, _) = self.view.proxies().await;
        let mut by_version = std::collections::HashMap::new();
        for p in proxies {
            let v = if p.proxy_version.is_empty() {
                "unknown".to_string()
            } else {
                p.proxy_version
            };
            *by_version.entry(v).or_insert(0u32) += 1;
        }
        Ok(Response::new(pb::VersionInfo {
            control_plane: env!("CARGO_PKG_VERSION").to_string(),
            proxies: by_version,
        }))
    }

    async fn list_proxies(
        &self,
        _: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        let (proxies, unreachable_replicas) = self.view.proxies().await;
        Ok(Response::new(pb::ListProxiesResponse {
            proxies,
            unreachable_replicas,
        }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let held = req
            .extensions()
            .get::<scope::Scopes>()
            .copied()
            .unwrap_or_default();
        let m = req.into_inner();
        if !m.scopes.is_empty() {
            if !m.identity.is_empty() {
                return Err(Status::invalid_argument(
                    "give either an identity (bootstrap token) or scopes (admin credential)",
                ));
            }
            let want = scope::Scopes::parse(&m.scopes).map_err(Status::invalid_argument)?;
            if !held.covers(want) {
                return Err(Status::permission_denied(format!(
                    "a credential with {:?} cannot grant {:?}",
                    held.names(),
                    want.names()
                )));
            }
            let (token, expires, id) =
                scope::create(&self.registry, want, &m.name, m.ttl_seconds).await?;
            tracing::info!(token_id = %id, scopes = ?want.names(), name = %m.name, "admin credential created");
            return Ok(Response::new(pb::CreateTokenResponse {
                token,
                identity: String::new(),
                scopes: want.names(),
                expires_at_unix: expires,
                id,
            }));
        }
        let id = SpiffeId::from_ns_sa(&self.registry.trust_domain, &m.identity).map_err(|e| {
            Status::invalid_argument(format!("{e}; expected <namespace>/<service-account>"))
        })?;
        let (token, expires) = tokens::create(&self.registry, &id, m.ttl_seconds).await?;
        let token_id = tokens::id_of(&tokens::hash(&token)).to_string();
        tracing::info!(identity = %id, token_id = %token_id, "bootstrap token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            identity: id.to_string(),
            scopes: Vec::new(),
            expires_at_unix: expires,
            id: token_id,
        }))
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let st = self.registry.state();
        let tokens = st
            .tokens
            .iter()
            .map(|(h, r)| pb::TokenInfo {
                id: tokens::id_of(h).to_string(),
                identity: r.identity.clone(),
                expires_at_unix: r.expires_at_unix,
                created_at_unix: r.created_at_unix,
                scopes: r.scopes.clone(),
                name: r.name.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let (hash, identity) = tokens::revoke(&self.registry, &req.into_inner().id).await?;
        let id = tokens::id_of(&hash).to_string();
        if identity.is_empty() {
            tracing::info!(token_id = %id, "admin credential revoked");
        } else {
            tracing::info!(token_id = %id, %identity, "bootstrap token revoked");
        }
        Ok(Response::new(pb::RevokeTokenResponse { id, identity }))
    }

    async fn revoke_identity(
        &self,
        req: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        let m = req.into_inner();
        let id = SpiffeId::from_ns_sa(&self.registry.trust_domain, &m.identity).map_err(|e| {
            Status::invalid_argument(format!("{e}; expected <namespace>/<service-account>"))
        })?;
        let (at, deleted) = self.registry.revoke_identity(&id).await?;
        tracing::info!(identity = %id, tokens_deleted = deleted, "identity revoked");
        Ok(Response::new(pb::RevokeIdentityResponse {
            identity: id.to_string(),
            revoked_at_unix_ms: at,
            tokens_deleted: deleted as u32,
        }))
    }

    async fn get_ca(&self, _: Request<pb::GetCaRequest>) -> Result<Response<pb::CaInfo>, Status> {
        Ok(Response::new(self.rotation.info(&self.proxies)))
    }

    async fn rotate_ca(
        &self,
        req: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaInfo>, Status> {
        let r = req.into_inner();
        self.rotation.step(&r.step, r.force, &self.proxies).await?;
        Ok(Response::new(self.rotation.info(&self.proxies)))
    }
}
