//! Gateway API for the mesh (GAMMA): `HTTPRoute` and `GRPCRoute` objects whose parentRef is a
//! Service (group `""`, kind `Service`) become that service's route. Their backendRefs are
//! Services, one per version, the way Flagger's and Argo Rollouts' Gateway API plugins shift
//! traffic, so each becomes a service backend (`state::backends`). Every route attached to
//! one Service is merged, in creation order, into one mesh route; the proxies order its rules
//! by Gateway API's precedence (the most specific match first). A request no rule matches
//! goes to the Service as if no route were attached.
//!
//! What each field becomes: path (Exact, PathPrefix, RegularExpression), header, query and
//! method matches as they are; GRPCRoute's service/method as the `/<service>/<method>` path;
//! RequestHeaderModifier and ResponseHeaderModifier as header changes (`add` sets);
//! RequestRedirect as a redirect (scheme, hostname, ReplaceFullPath, status); RequestMirror
//! as a mirror (percent or fraction); `timeouts.request` and `timeouts.backendRequest` as the
//! rule's request and per-try timeouts; `retry` (attempts, codes, backoff) as its retries.
//! Anything else (URLRewrite, ports of other Services' kinds) refuses the route, saying why.
//!
//! Status: each parentRef gets this controller's `Accepted` and `ResolvedRefs` conditions,
//! with `observedGeneration`; a refused route says why there and changes nothing in force.
//! Only the leader writes, and only what differs.

use crate::replicas::leader::Leadership;
use crate::state::registry::{Registry, RegistryError};
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use mesh_proto::v1 as pb;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const GROUP: &str = "gateway.networking.k8s.io";
pub const VERSION: &str = "v1";
/// This controller's name in the routes' status.
pub const CONTROLLER: &str = "mesh.io/mesh-controller";

/// HTTPRoute or GRPCRoute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl RouteKind {
    fn resource(self) -> ApiResource {
        let (kind, plural) = match self {
            RouteKind::Http => ("HTTPRoute", "httproutes"),
            RouteKind::Grpc => ("GRPCRoute", "grpcroutes"),
        };
        ApiResource {
            group: GROUP.into(),
            version: VERSION.into(),
            api_version: format!("{GROUP}/{VERSION}"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

/// Why a route cannot be used, for its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The condition it fails: `Accepted` or `ResolvedRefs`.
    pub condition: &'static str,
    pub reason: &'static str,
    pub message: String,
}

fn refuse(condition: &'static str, reason: &'static str, message: String) -> Refusal {
    Refusal {
        condition,
        reason,
        message,
    }
}

/// What a parentRef names: a Service (the mesh's east-west route, GAMMA) or a Gateway (an
/// ingress gateway of the mesh, whose service is named after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Parent {
    Service,
    Gateway,
}

/// The Services and Gateways a route object attaches to, as service keys, with each
/// parentRef. A parentRef's kind defaults to Gateway API's (a Gateway), its group to the
/// kind's.
pub fn parents(obj: &Value, ns: &str) -> Vec<(String, Value, Parent)> {
    obj["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            // A Service parent is taken without its (empty) group too, as it was before
            // Gateways were.
            let parent = match (p["group"].as_str(), p["kind"].as_str().unwrap_or("Gateway")) {
                (None | Some(""), "Service") => Parent::Service,
                (None | Some(GROUP), "Gateway") => Parent::Gateway,
                _ => return None,
            };
            let name = p["name"].as_str()?;
            let pns = p["namespace"].as_str().unwrap_or(ns);
            Some((mesh_model::service::absolute(name, pns), p.clone(), parent))
        })
        .collect()
}

/// A Gateway API duration (`1h`, `10s`, `500ms`, `1h30m`: Go's format, which kube parses) in
/// milliseconds; empty and negative ones are not durations here.
fn duration_ms(s: &str) -> Option<u32> {
    let d: kube::core::Duration = s.parse().ok().filter(|_| !s.is_empty())?;
    if d.is_negative() {
        return None;
    }
    u32::try_from(std::time::Duration::from(d).as_millis()).ok()
}

/// A rule name the mesh accepts: letters, digits and '-'.
fn rule_name(route: &str, rule: &Value, i: usize) -> String {
    let base = match rule["name"].as_str() {
        Some(n) => format!("{route}-{n}"),
        None => format!("{route}-{}", i + 1),
    };
    base.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn key_match(m: &Value, what: &str) -> Result<pb::KeyMatch, Refusal> {
    let name = m["name"].as_str().unwrap_or("").to_string();
    let value = m["value"].as_str().unwrap_or("").to_string();
    let value = match m["type"].as_str().unwrap_or("Exact") {
        "Exact" => pb::key_match::Value::Exact(value),
        "RegularExpression" => pb::key_match::Value::Regex(value),
        other => {
            return Err(refuse(
                "Accepted",
                "UnsupportedValue",
                format!("{what} match type {other:?}"),
            ));
        }
    };
    Ok(pb::KeyMatch {
        name,
        value: Some(value),
    })
}

fn http_match(m: &Value) -> Result<pb::RouteMatch, Refusal> {
    let path = &m["path"];
    let value = path["value"].as_str().unwrap_or("/").to_string();
    let path = match path["type"].as_str().unwrap_or("PathPrefix") {
        "Exact" => pb::route_match::Path::Exact(value),
        "PathPrefix" => pb::route_match::Path::Prefix(value),
        "RegularExpression" => pb::route_match::Path::Regex(value),
        other => {
            return Err(refuse(
                "Accepted",
                "UnsupportedValue",
                format!("path match type {other:?}"),
            ));
        }
    };
    Ok(pb::RouteMatch {
        hosts: Vec::new(),
        path: Some(path),
        method: m["method"].as_str().unwrap_or("").to_string(),
        headers: list(&m["headers"])
            .map(|h| key_match(h, "header"))
            .collect::<Result<_, _>>()?,
        query: list(&m["queryParams"])
            .map(|q| key_match(q, "query"))
            .collect::<Result<_, _>>()?,
    })
}

fn grpc_match(m: &Value) -> Result<pb::RouteMatch, Refusal> {
    let method = &m["method"];
    let (service, name) = (method["service"].as_str(), method["method"].as_str());
    let regex = method["type"].as_str() == Some("RegularExpression");
    let path = match (service, name) {
        (Some(s), Some(n)) if regex => pb::route_match::Path::Regex(format!("/{s}/{n}")),
        (Some(s), Some(n)) => pb::route_match::Path::Exact(format!("/{s}/{n}")),
        (Some(s), None) if regex => pb::route_match::Path::Regex(format!("/{s}/.+")),
        (Some(s), None) => pb::route_match::Path::Prefix(format!("/{s}/")),
        (None, Some(n)) if regex => pb::route_match::Path::Regex(format!("/.+/{n}")),
        (None, Some(n)) => pb::route_match::Path::Regex(format!("/[^/]+/{}", regex::escape(n))),
        (None, None) => pb::route_match::Path::Prefix("/".into()),
    };
    Ok(pb::RouteMatch {
        hosts: Vec::new(),
        path: Some(path),
        method: String::new(),
        headers: list(&m["headers"])
            .map(|h| key_match(h, "header"))
            .collect::<Result<_, _>>()?,
        query: Vec::new(),
    })
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// A backendRef (or a mirror's) as a service backend of a route in namespace `ns`.
fn backend_service(b: &Value, ns: &str) -> Result<String, Refusal> {
    let group = b["group"].as_str().unwrap_or("");
    let kind = b["kind"].as_str().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Err(refuse(
            "ResolvedRefs",
            "InvalidKind",
            format!("backendRef of kind {group}/{kind}: only Services"),
        ));
    }
    let name = b["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            refuse(
                "ResolvedRefs",
                "BackendNotFound",
                "a backendRef without a name".into(),
            )
        })?;
    Ok(match b["namespace"].as_str() {
        Some(other) if other != ns => format!("{name}.{other}"),
        _ => name.to_string(),
    })
}

fn header_changes(f: &Value) -> (Vec<pb::HeaderValue>, Vec<String>) {
    let set = list(&f["set"])
        .chain(list(&f["add"]))
        .map(|h| pb::HeaderValue {
            name: h["name"].as_str().unwrap_or("").to_ascii_lowercase(),
            value: h["value"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    let remove = list(&f["remove"])
        .filter_map(|h| h.as_str())
        .map(str::to_ascii_lowercase)
        .collect();
    (set, remove)
}

/// One rule of a route object.
fn rule(
    kind: RouteKind,
    route: &str,
    ns: &str,
    r: &Value,
    i: usize,
) -> Result<pb::RouteRule, Refusal> {
    let mut out = pb::RouteRule {
        name: rule_name(route, r, i),
        ..Default::default()
    };
    out.matches = list(&r["matches"])
        .map(|m| match kind {
            RouteKind::Http => http_match(m),
            RouteKind::Grpc => grpc_match(m),
        })
        .collect::<Result<_, _>>()?;
    if out.matches.is_empty() {
        // No match: every request (Gateway API's default, a `/` prefix).
        out.matches.push(pb::RouteMatch {
            path: Some(pb::route_match::Path::Prefix("/".into())),
            ..Default::default()
        });
    }
    for b in list(&r["backendRefs"]) {
        if list(&b["filters"]).next().is_some() {
            return Err(refuse(
                "Accepted",
                "UnsupportedValue",
                "filters on a backendRef".into(),
            ));
        }
        out.backends.push(pb::WeightedBackend {
            service: backend_service(b, ns)?,
            version: String::new(),
            weight: b["weight"]
                .as_u64()
                .map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX)),
        });
    }
    if !out.backends.is_empty() && out.backends.iter().all(|b| b.weight == 0) {
        // Gateway API answers such requests with 500; the mesh refuses a split that sends
        // nowhere, so the route is refused, saying so.
        return Err(refuse(
            "Accepted",
            "UnsupportedValue",
            "every backendRef has weight 0".into(),
        ));
    }
    for f in list(&r["filters"]) {
        match f["type"].as_str().unwrap_or("") {
            "RequestHeaderModifier" => {
                let (set, remove) = header_changes(&f["requestHeaderModifier"]);
                out.set_request_headers.extend(set);
                out.remove_request_headers.extend(remove);
            }
            "ResponseHeaderModifier" => {
                let (set, remove) = header_changes(&f["responseHeaderModifier"]);
                out.set_response_headers.extend(set);
                out.remove_response_headers.extend(remove);
            }
            "RequestRedirect" if kind == RouteKind::Http => {
                let rr = &f["requestRedirect"];
                let path = match rr["path"]["type"].as_str() {
                    None => String::new(),
                    Some("ReplaceFullPath") => rr["path"]["replaceFullPath"]
                        .as_str()
                        .unwrap_or("/")
                        .to_string(),
                    Some(other) => {
                        return Err(refuse(
                            "Accepted",
                            "UnsupportedValue",
                            format!("redirect path type {other:?}"),
                        ));
                    }
                };
                if rr["port"].is_number() {
                    return Err(refuse(
                        "Accepted",
                        "UnsupportedValue",
                        "redirect port".into(),
                    ));
                }
                out.redirect = Some(pb::Redirect {
                    scheme: rr["scheme"].as_str().unwrap_or("").to_string(),
                    host: rr["hostname"].as_str().unwrap_or("").to_string(),
                    path,
                    status: rr["statusCode"].as_u64().map_or(302, |c| c as u32),
                });
            }
            "RequestMirror" => {
                let m = &f["requestMirror"];
                let percent = match (m["percent"].as_f64(), &m["fraction"]) {
                    (Some(p), _) => p,
                    (None, fr) if fr.is_object() => {
                        let num = fr["numerator"].as_f64().unwrap_or(0.0);
                        let den = fr["denominator"].as_f64().unwrap_or(100.0);
                        if den > 0.0 { num * 100.0 / den } else { 0.0 }
                    }
                    _ => 100.0,
                };
                out.mirror = Some(pb::Mirror {
                    service: backend_service(&m["backendRef"], ns)?,
                    version: String::new(),
                    percent,
                });
            }
            other => {
                return Err(refuse(
                    "Accepted",
                    "UnsupportedValue",
                    format!(
                        "filter {other:?} (supported: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, RequestMirror)"
                    ),
                ));
            }
        }
    }
    let mut policy = pb::Policy::default();
    let timeout = |field: &str| -> Result<u32, Refusal> {
        match r["timeouts"][field].as_str() {
            None => Ok(0),
            Some(s) => duration_ms(s).ok_or_else(|| {
                refuse(
                    "Accepted",
                    "UnsupportedValue",
                    format!("timeouts.{field} {s:?}"),
                )
            }),
        }
    };
    let (request, backend) = (timeout("request")?, timeout("backendRequest")?);
    if request > 0 || backend > 0 {
        policy.timeouts = Some(pb::Timeouts {
            request_ms: request,
            per_try_ms: backend,
            ..Default::default()
        });
    }
    let retry = &r["retry"];
    if retry.is_object() {
        let backoff = match retry["backoff"].as_str() {
            None => 0,
            Some(s) => duration_ms(s).ok_or_else(|| {
                refuse(
                    "Accepted",
                    "UnsupportedValue",
                    format!("retry.backoff {s:?}"),
                )
            })?,
        };
        let mut on: Vec<String> = list(&retry["codes"])
            .filter_map(Value::as_u64)
            .map(|c| c.to_string())
            .collect();
        // Gateway API retries the listed codes; connection failures are always retried.
        on.push("connect-failure".into());
        policy.retry = Some(pb::Retry {
            max_retries: retry["attempts"].as_u64().map_or(1, |a| a as u32),
            retry_on: on,
            backoff_base_ms: backoff,
            ..Default::default()
        });
    }
    if policy != pb::Policy::default() {
        out.policy = Some(policy);
    }
    Ok(out)
}

/// The mesh route of one Service (or a Gateway's service) from the route objects attached to
/// it, in creation order. Attached to a Gateway, a route's `hostnames` become a host condition
/// of each of its matches (a Service's route has one host, and Gateway API ignores them there).
/// `listeners`: the hostnames the parent Gateway's listeners take, which bound the routes'
/// (None: any host, or no Gateway object).
pub fn translate(
    routes: &[(RouteKind, &Value)],
    parent: Parent,
    listeners: Option<&Vec<String>>,
) -> Result<pb::Route, (usize, Refusal)> {
    let mut out = pb::Route::default();
    for (i, (kind, obj)) in routes.iter().enumerate() {
        let name = obj["metadata"]["name"].as_str().unwrap_or("route");
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        let hosts: Vec<String> = match parent {
            Parent::Gateway => list(&obj["spec"]["hostnames"])
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect(),
            Parent::Service => Vec::new(),
        };
        for h in &hosts {
            mesh_model::route::HostMatch::parse(h)
                .map_err(|m| (i, refuse("Accepted", "UnsupportedValue", m)))?;
        }
        let hosts = match parent {
            Parent::Gateway => super::listeners::effective(&hosts, listeners)
                .map_err(|m| (i, refuse("Accepted", "NoMatchingListenerHostname", m)))?,
            Parent::Service => hosts,
        };
        for (j, r) in list(&obj["spec"]["rules"]).enumerate() {
            let mut r = rule(*kind, name, ns, r, j).map_err(|e| (i, e))?;
            for m in &mut r.matches {
                m.hosts.clone_from(&hosts);
            }
            out.rules.push(r);
        }
    }
    // The first rule that takes every request as it is (a `/` prefix and nothing else, as
    // Flagger writes) is the route's default split, which `meshctl route get`, the dashboard
    // and canaries read as such.
    let catch_all = |r: &pb::RouteRule| {
        let everything = pb::RouteRule {
            name: r.name.clone(),
            matches: vec![pb::RouteMatch {
                path: Some(pb::route_match::Path::Prefix("/".into())),
                ..Default::default()
            }],
            backends: r.backends.clone(),
            ..Default::default()
        };
        !r.backends.is_empty() && *r == everything
    };
    if let Some(i) = out.rules.iter().position(catch_all) {
        out.backends = out.rules.remove(i).backends;
    }
    Ok(out)
}

/// One route object as this controller sees it.
struct Object {
    kind: RouteKind,
    obj: Value,
}

/// Keeps the registry's routes equal to the Gateway API routes attached to Services, and their
/// status current; runs until the process ends.
pub async fn sync(
    client: Client,
    registry: Arc<Registry>,
    leader: Leadership,
    inject: Arc<mesh_inject::InjectConfig>,
) {
    let (http, http_events) = super::objects::reflect(&client, &RouteKind::Http.resource());
    let (grpc, grpc_events) = super::objects::reflect(&client, &RouteKind::Grpc.resource());
    let (gateways, gateway_events) =
        super::objects::reflect(&client, &super::listeners::resource());
    let events = futures_util::stream::select(
        futures_util::stream::select(http_events, grpc_events),
        gateway_events,
    );
    let mut events = std::pin::pin!(events);
    let mut changes = registry.watch();
    // Services whose route this controller set, so a route removed resets its Service.
    let mut managed: BTreeSet<String> = BTreeSet::new();
    // The Gateways' objects as last applied, so an unchanged one is not applied again.
    let mut applied: BTreeMap<String, Value> = BTreeMap::new();
    loop {
        tokio::select! {
            e = events.next() => if e.is_none() { return },
            r = changes.changed() => if r.is_err() { return },
        }
        if !crate::k8s::settle(&mut events).await {
            return;
        }
        if leader.is_leader() {
            let gateway_objects = GatewayObjects {
                inject: &inject,
                applied: &mut applied,
            };
            sync_once(
                &client,
                &registry,
                [&http, &grpc],
                &gateways,
                &mut managed,
                gateway_objects,
            )
            .await;
        }
    }
}

/// What the Gateways' own objects are made with, and what was applied of them.
struct GatewayObjects<'a> {
    inject: &'a mesh_inject::InjectConfig,
    applied: &'a mut BTreeMap<String, Value>,
}

async fn sync_once(
    client: &Client,
    registry: &Registry,
    stores: [&Store<DynamicObject>; 2],
    gateways: &Store<DynamicObject>,
    managed: &mut BTreeSet<String>,
    objects_of: GatewayObjects<'_>,
) {
    let gateways: Vec<Value> = gateways
        .state()
        .iter()
        .filter_map(|g| serde_json::to_value(&**g).ok())
        .collect();
    let listener_hosts = super::listeners::hostnames(&gateways);
    let mut objects: Vec<Object> = Vec::new();
    for (kind, store) in [RouteKind::Http, RouteKind::Grpc].into_iter().zip(stores) {
        for o in store.state() {
            match serde_json::to_value(&*o) {
                Ok(obj) => objects.push(Object { kind, obj }),
                Err(e) => tracing::warn!(error = %e, "a route object does not serialize"),
            }
        }
    }
    // Creation order, then name: the order Gateway API breaks ties in.
    objects.sort_by(|a, b| {
        let key = |o: &Value| {
            (
                o["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                o["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        };
        key(&a.obj).cmp(&key(&b.obj))
    });
    let mut by_service: BTreeMap<(String, Parent), Vec<usize>> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        let ns = o.obj["metadata"]["namespace"].as_str().unwrap_or("default");
        for (service, _, parent) in parents(&o.obj, ns) {
            by_service.entry((service, parent)).or_default().push(i);
        }
    }
    // Per object and parent service: the outcome for its status.
    let mut outcomes: BTreeMap<(usize, String), Result<(), Refusal>> = BTreeMap::new();
    let state = registry.state();
    for ((service, parent), idx) in &by_service {
        if !state.services.contains_key(service) {
            let message = match parent {
                Parent::Service => format!("Service {service} is not a service of the mesh"),
                Parent::Gateway => format!(
                    "Gateway {service} has no gateway proxy yet (its proxies declare it when they start)"
                ),
            };
            for i in idx {
                outcomes.insert(
                    (*i, service.clone()),
                    Err(refuse("Accepted", "BackendNotFound", message.clone())),
                );
            }
            continue;
        }
        let routes: Vec<(RouteKind, &Value)> = idx
            .iter()
            .map(|i| (objects[*i].kind, &objects[*i].obj))
            .collect();
        let listeners = match parent {
            Parent::Gateway => listener_hosts.get(service).and_then(Option::as_ref),
            Parent::Service => None,
        };
        let result = match translate(&routes, *parent, listeners) {
            Err((bad, why)) => {
                // The object that cannot be translated is refused; the others stand as they are.
                for (k, i) in idx.iter().enumerate() {
                    let r = if k == bad {
                        Err(why.clone())
                    } else {
                        Err(refuse(
                            "Accepted",
                            "Pending",
                            "another route of this Service is refused".into(),
                        ))
                    };
                    outcomes.insert((*i, service.clone()), r);
                }
                continue;
            }
            Ok(route) => apply(registry, service, route).await,
        };
        if result.is_ok() {
            managed.insert(service.clone());
        }
        for i in idx {
            outcomes.insert((*i, service.clone()), result.clone());
        }
    }
    // A Service this controller routed whose routes are gone: back to the default.
    let gone: Vec<String> = managed
        .iter()
        .filter(|s| !by_service.keys().any(|(k, _)| k == *s))
        .cloned()
        .collect();
    for service in gone {
        managed.remove(&service);
        if let Err(e) = registry
            .set_route(&service, pb::Route::default(), true, 0)
            .await
        {
            tracing::warn!(%service, error = %e, "cannot reset a route whose Gateway API routes are gone");
        }
    }
    for (i, o) in objects.iter().enumerate() {
        let ns = o.obj["metadata"]["namespace"].as_str().unwrap_or("default");
        let ours: Vec<(Value, &Result<(), Refusal>)> = parents(&o.obj, ns)
            .into_iter()
            .filter_map(|(service, p, _)| outcomes.get(&(i, service)).map(|r| (p, r)))
            .collect();
        if !ours.is_empty() {
            write_status(client, o, &ours).await;
        }
    }
    // The mesh's Gateways: their Deployment, Service and ServiceAccount applied; programmed
    // once a proxy of theirs declared their service, with the routes attached to them that
    // were taken, and what of their listeners cannot be served.
    let state = registry.state();
    for g in gateways
        .iter()
        .filter(|g| g["spec"]["gatewayClassName"] == super::listeners::CLASS)
    {
        let key = mesh_model::service::absolute(
            g["metadata"]["name"].as_str().unwrap_or(""),
            g["metadata"]["namespace"].as_str().unwrap_or("default"),
        );
        let attached = outcomes
            .iter()
            .filter(|((_, s), r)| *s == key && r.is_ok())
            .count();
        let programmed = state.services.contains_key(&key);
        let plan = mesh_inject::gateway::plan(g, objects_of.inject);
        super::listeners::apply_objects(client, &plan.objects, objects_of.applied).await;
        super::listeners::write_status(client, g, programmed, attached, &plan.issues).await;
    }
}

/// Sets `route` for `service` unless it is in force already.
async fn apply(registry: &Registry, service: &str, route: pb::Route) -> Result<(), Refusal> {
    if registry.state().route_of(service).route == route {
        return Ok(());
    }
    match registry.set_route(service, route, true, 0).await {
        Ok(v) => {
            tracing::info!(%service, revision = v.revision, "route set from Gateway API routes");
            Ok(())
        }
        Err(RegistryError::Invalid(m)) if m.contains("backend service") => {
            Err(refuse("ResolvedRefs", "BackendNotFound", m))
        }
        Err(e) => Err(refuse("Accepted", "Invalid", e.to_string())),
    }
}

/// The conditions of one parent: Accepted and ResolvedRefs.
fn conditions(result: &Result<(), Refusal>, generation: &Value) -> Vec<Value> {
    let cond = |t: &str, ok: bool, reason: &str, message: &str| {
        json!({"type": t, "status": if ok { "True" } else { "False" }, "reason": reason,
               "message": message, "observedGeneration": generation})
    };
    match result {
        Ok(()) => vec![
            cond(
                "Accepted",
                true,
                "Accepted",
                "the mesh routes this parent's traffic by it",
            ),
            cond(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "every backendRef is a mesh service",
            ),
        ],
        Err(r) if r.condition == "ResolvedRefs" => vec![
            cond("Accepted", false, "BackendNotFound", &r.message),
            cond("ResolvedRefs", false, r.reason, &r.message),
        ],
        Err(r) => vec![
            cond("Accepted", false, r.reason, &r.message),
            cond("ResolvedRefs", true, "ResolvedRefs", ""),
        ],
    }
}

/// Writes this controller's entries of `status.parents`, keeping other controllers', when
/// they differ from what is there (timestamps aside).
async fn write_status(client: &Client, o: &Object, outcomes: &[(Value, &Result<(), Refusal>)]) {
    let generation = o.obj["metadata"]["generation"].clone();
    let current: Vec<Value> = list(&o.obj["status"]["parents"]).cloned().collect();
    let mut parents: Vec<Value> = current
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER)
        .cloned()
        .collect();
    for (parent, result) in outcomes {
        let mut conds = conditions(result, &generation);
        // Keep the transition time of a condition whose status did not change.
        let before = current
            .iter()
            .find(|p| p["controllerName"] == CONTROLLER && p["parentRef"] == *parent);
        let old = before.map_or(Value::Null, |b| b["conditions"].clone());
        for c in &mut conds {
            let since = super::transition_time(
                &old,
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
            );
            c["lastTransitionTime"] = serde_json::to_value(since).unwrap_or_default();
        }
        parents
            .push(json!({"parentRef": parent, "controllerName": CONTROLLER, "conditions": conds}));
    }
    if parents == current {
        return;
    }
    let ns = o.obj["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = o.obj["metadata"]["name"].as_str().unwrap_or("");
    let ar = o.kind.resource();
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar);
    let patch = json!({"status": {"parents": parents}});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(route = %name, namespace = %ns, error = %e, "cannot write a route's status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTPRoute exactly as Flagger's Gateway API provider writes it for a mesh (GAMMA)
    /// canary of `podinfo` at 10%.
    fn flagger() -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "podinfo", "namespace": "test", "generation": 3},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "podinfo", "port": 9898}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {"group": "", "kind": "Service", "name": "podinfo-primary", "port": 9898, "weight": 90},
                        {"group": "", "kind": "Service", "name": "podinfo-canary", "port": 9898, "weight": 10}
                    ]
                }]
            }
        })
    }

    #[test]
    fn flaggers_httproute_becomes_weights_on_two_services() {
        let obj = flagger();
        assert_eq!(parents(&obj, "test")[0].0, "podinfo.test");
        let route = translate(&[(RouteKind::Http, &obj)], Parent::Service, None).unwrap();
        assert!(
            route.rules.is_empty(),
            "a catch-all rule is the default split"
        );
        let b: Vec<_> = route
            .backends
            .iter()
            .map(|b| (b.service.as_str(), b.weight))
            .collect();
        assert_eq!(b, [("podinfo-primary", 90), ("podinfo-canary", 10)]);
        // The mesh model accepts it once the backends are versions.
        let (expanded, _) = crate::state::backends::expand("podinfo.test", &route);
        mesh_model::Route::try_from(&expanded).unwrap();
    }

    #[test]
    fn fields_translate_or_refuse_naming_them() {
        let obj = json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"rules": [{
                "name": "beta",
                "matches": [{"path": {"type": "Exact", "value": "/v2"}, "method": "GET",
                             "headers": [{"name": "x-beta", "value": "1"}],
                             "queryParams": [{"type": "RegularExpression", "name": "q", "value": "a.*"}]}],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-A", "value": "1"}], "remove": ["x-b"]}},
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "namespace": "qa"}, "fraction": {"numerator": 1, "denominator": 4}}}
                ],
                "backendRefs": [{"name": "api-v2"}],
                "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
                "retry": {"attempts": 3, "codes": [503], "backoff": "100ms"}
            }]}
        });
        let route = translate(&[(RouteKind::Http, &obj)], Parent::Service, None).unwrap();
        let r = &route.rules[0];
        assert_eq!(r.name, "api-beta");
        assert_eq!(r.matches[0].method, "GET");
        assert_eq!(
            r.matches[0].path,
            Some(pb::route_match::Path::Exact("/v2".into()))
        );
        assert_eq!(r.set_request_headers[0].name, "x-a");
        assert_eq!(r.remove_request_headers, ["x-b"]);
        let m = r.mirror.as_ref().unwrap();
        assert_eq!((m.service.as_str(), m.percent), ("shadow.qa", 25.0));
        assert_eq!(r.backends[0].weight, 1, "weight defaults to 1");
        let p = r.policy.as_ref().unwrap();
        let t = p.timeouts.as_ref().unwrap();
        assert_eq!((t.request_ms, t.per_try_ms), (90_000, 500));
        let retry = p.retry.as_ref().unwrap();
        assert_eq!(retry.max_retries, 3);
        assert!(retry.retry_on.contains(&"503".to_string()));
        assert_eq!(retry.backoff_base_ms, 100);

        let mut bad = obj.clone();
        bad["spec"]["rules"][0]["filters"] = json!([{"type": "URLRewrite"}]);
        let (_, why) = translate(&[(RouteKind::Http, &bad)], Parent::Service, None).unwrap_err();
        assert_eq!(
            (why.condition, why.reason),
            ("Accepted", "UnsupportedValue")
        );
        assert!(why.message.contains("URLRewrite"), "{}", why.message);
        bad["spec"]["rules"][0]["filters"] = json!([]);
        bad["spec"]["rules"][0]["backendRefs"] = json!([{"kind": "ServiceImport", "name": "x"}]);
        let (_, why) = translate(&[(RouteKind::Http, &bad)], Parent::Service, None).unwrap_err();
        assert_eq!((why.condition, why.reason), ("ResolvedRefs", "InvalidKind"));
    }

    #[test]
    fn a_route_on_a_gateway_matches_its_hostnames() {
        let obj = json!({
            "metadata": {"name": "shop", "namespace": "edge"},
            "spec": {
                "parentRefs": [{"name": "public"}, {"kind": "Service", "group": "", "name": "web"},
                               {"kind": "Gateway", "group": "other.io", "name": "x"}],
                "hostnames": ["shop.example.com", "*.Shop.example.com"],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                           "backendRefs": [{"name": "api", "namespace": "shop"}]},
                          {"backendRefs": [{"name": "web"}]}]
            }
        });
        let p: Vec<_> = parents(&obj, "edge")
            .into_iter()
            .map(|(k, _, p)| (k, p))
            .collect();
        assert_eq!(
            p,
            [
                ("public.edge".to_string(), Parent::Gateway),
                ("web.edge".to_string(), Parent::Service)
            ]
        );
        let route = translate(&[(RouteKind::Http, &obj)], Parent::Gateway, None).unwrap();
        assert!(
            route.backends.is_empty(),
            "a host-bound catch-all is a rule"
        );
        assert_eq!(route.rules.len(), 2);
        for r in &route.rules {
            assert_eq!(
                r.matches[0].hosts,
                ["shop.example.com", "*.shop.example.com"]
            );
        }
        assert_eq!(route.rules[0].backends[0].service, "api.shop");
        // The same object on a Service ignores hostnames (GAMMA).
        let route = translate(&[(RouteKind::Http, &obj)], Parent::Service, None).unwrap();
        assert!(route.rules[0].matches[0].hosts.is_empty());
        let mut bad = obj.clone();
        bad["spec"]["hostnames"] = json!(["10.0.0.1"]);
        let (_, why) = translate(&[(RouteKind::Http, &bad)], Parent::Gateway, None).unwrap_err();
        assert!(why.message.contains("IP address"), "{}", why.message);
    }

    #[test]
    fn grpc_methods_are_paths() {
        let obj = json!({
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"rules": [{
                "matches": [{"method": {"service": "mesh.example.v1.Echo", "method": "Say"}},
                            {"method": {"service": "grpc.health.v1.Health"}}],
                "backendRefs": [{"name": "echo-v2"}]
            }]}
        });
        let route = translate(&[(RouteKind::Grpc, &obj)], Parent::Service, None).unwrap();
        let paths: Vec<_> = route.rules[0]
            .matches
            .iter()
            .map(|m| m.path.clone())
            .collect();
        assert_eq!(
            paths,
            [
                Some(pb::route_match::Path::Exact(
                    "/mesh.example.v1.Echo/Say".into()
                )),
                Some(pb::route_match::Path::Prefix(
                    "/grpc.health.v1.Health/".into()
                )),
            ]
        );
    }

    #[test]
    fn durations_parse_as_gateway_api_writes_them() {
        for (s, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
        ] {
            assert_eq!(duration_ms(s), Some(ms), "{s}");
        }
        for s in ["", "10", "1x", "s"] {
            assert_eq!(duration_ms(s), None, "{s}");
        }
    }
}
