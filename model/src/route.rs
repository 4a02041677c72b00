//! Routes: a service's default backends (weighted versions), its rules, and the matcher that
//! picks a request's rule. Matches are tried most specific first (fixed at config time, so a
//! request walks a sorted list once): header matches beat none; an exact path beats a prefix,
//! a longer prefix a shorter one, and a prefix a regex; then a method; then more header and
//! query conditions; then list order. A [`Route`] is built from `pb::Route` by `TryFrom`, the
//! one place its rules are checked; which versions exist is checked apart
//! ([`Route::check_versions`]), by the control plane, which knows them.

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use mesh_proto::v1 as pb;
use regex::Regex;
use std::sync::Arc;

/// Longest regex source accepted in a match.
pub const MAX_REGEX_LEN: usize = 1024;
/// Most rules in one route.
pub const MAX_RULES: usize = 100;

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct KeyMatch {
    pub name: String,
    /// None: the key only has to be present.
    pub value: Option<ValueMatch>,
}

/// A request host condition (Gateway API's hostnames), lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name of one or more labels under it.
    Wildcard(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(e) => host.eq_ignore_ascii_case(e),
            HostMatch::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }

    /// Parses `name` or `*.name` (RFC 1123 labels; no IP addresses, no port).
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "host {s:?}: expected a DNS name or *.<DNS name> (letters, digits, '-', '.')"
            ));
        }
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("host {s:?}: an IP address is not a host name"));
        }
        Ok(if wild {
            HostMatch::Wildcard(format!(".{name}"))
        } else {
            HostMatch::Exact(name.to_string())
        })
    }

    /// `2` exact, `1` wildcard; then the length of the name: Gateway API's precedence.
    pub fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(e) => (2, e.len()),
            HostMatch::Wildcard(w) => (1, w.len()),
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(e) => f.write_str(e),
            HostMatch::Wildcard(w) => write!(f, "*{w}"),
        }
    }
}

/// The host part of an authority: port stripped; bracketed IPv6 hosts keep their brackets.
/// (Inlined across crates: every outbound request asks it.)
#[inline]
pub fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// The host a request names: the URI's authority, else the Host header; userinfo and port
/// stripped.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let authority = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(host_of(
        authority.rsplit_once('@').map_or(authority, |(_, h)| h),
    ))
}

/// All conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    /// Any of them (empty: any host).
    pub hosts: Vec<HostMatch>,
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    pub headers: Vec<KeyMatch>,
    pub query: Vec<KeyMatch>,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    pub status: http::StatusCode,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub matches: Vec<Match>,
    /// Empty: the route's default backends.
    pub backends: Vec<(Arc<str>, u32)>,
    pub set_request: Vec<(HeaderName, HeaderValue)>,
    pub remove_request: Vec<HeaderName>,
    pub set_response: Vec<(HeaderName, HeaderValue)>,
    pub remove_response: Vec<HeaderName>,
    pub redirect: Option<Redirect>,
    pub mirror: Option<MirrorConfig>,
    /// The rule's own resilience policy, in place of the service's.
    pub policy: Option<crate::Policy>,
}

/// What the router needs of a rule: its matches. A rule of another kind (a gateway's route,
/// pointing at services rather than versions) is routed by the same matcher.
pub trait Matches {
    fn matches(&self) -> &[Match];
}

impl Matches for Rule {
    fn matches(&self) -> &[Match] {
        &self.matches
    }
}

/// Copies of a share of requests go to a shadow version (fire-and-forget).
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub version: Arc<str>,
    /// 0..=100
    pub percent: f64,
}

/// Compiles a regex that must match the whole value.
pub fn whole(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

fn value_ok(m: &Option<ValueMatch>, v: Option<&str>) -> bool {
    match (m, v) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(ValueMatch::Exact(e)), Some(v)) => e == v,
        (Some(ValueMatch::Regex(r)), Some(v)) => r.is_match(v),
    }
}

impl Match {
    /// Sort key, most specific first (compared in reverse): the most specific host first (as
    /// Gateway API orders routes across hostnames), then the rest.
    #[allow(clippy::type_complexity)]
    fn rank(&self) -> ((u8, usize), bool, u8, usize, bool, usize, usize) {
        let host = self
            .hosts
            .iter()
            .map(HostMatch::rank)
            .max()
            .unwrap_or((0, 0));
        let (kind, len) = match &self.path {
            Some(PathMatch::Exact(p)) => (3, p.len()),
            Some(PathMatch::Prefix(p)) => (2, p.len()),
            Some(PathMatch::Regex(_)) => (1, 0),
            None => (0, 0),
        };
        (
            host,
            !self.headers.is_empty(),
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    pub fn matches(
        &self,
        method: &Method,
        (host, path, query): (Option<&str>, &str, Option<&str>),
        h: &HeaderMap,
    ) -> bool {
        if !self.hosts.is_empty()
            && !host.is_some_and(|host| self.hosts.iter().any(|m| m.matches(host)))
        {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => {
                let p = p.strip_suffix('/').unwrap_or(p);
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(PathMatch::Regex(r)) => r.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|k| {
                let mut vals = h
                    .get_all(k.name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                match &k.value {
                    None => h.contains_key(k.name.as_str()),
                    Some(_) => vals.any(|v| value_ok(&k.value, Some(v))),
                }
            })
            && self.query.iter().all(|k| {
                query.is_some_and(|q| {
                    q.split('&').any(|pair| {
                        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                        n == k.name && value_ok(&k.value, Some(v))
                    })
                })
            })
    }
}

/// A route's rules in match order.
#[derive(Debug, Clone)]
pub struct Router<R = Rule> {
    pub rules: Vec<R>,
    /// (rule index, match index), most specific first.
    order: Vec<(usize, usize)>,
    /// Some match names hosts (only then is the request's host looked up).
    by_host: bool,
}

impl<R> Default for Router<R> {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            order: Vec::new(),
            by_host: false,
        }
    }
}

impl<R> Router<R> {
    /// The same router over other rules, made from these one by one (the order, computed from
    /// the matches, stays): how a proxy joins each rule to what it sends to.
    pub fn map<T>(&self, f: impl FnMut(&R) -> T) -> Router<T> {
        Router {
            rules: self.rules.iter().map(f).collect(),
            order: self.order.clone(),
            by_host: self.by_host,
        }
    }
}

impl<R: Matches> Router<R> {
    pub fn new(rules: Vec<R>) -> Self {
        let mut order: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..r.matches().len()).map(move |j| (i, j)))
            .collect();
        // Stable: equal ranks keep list order.
        order.sort_by(|a, b| {
            rules[b.0].matches()[b.1]
                .rank()
                .cmp(&rules[a.0].matches()[a.1].rank())
        });
        let by_host = rules
            .iter()
            .any(|r| r.matches().iter().any(|m| !m.hosts.is_empty()));
        Self {
            rules,
            order,
            by_host,
        }
    }

    /// Whether some rule matches on the request's host (a gateway's route).
    pub fn by_host(&self) -> bool {
        self.by_host
    }

    /// The index of the rule this request takes, or None for the default backends.
    pub fn route(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let host = if self.by_host {
            request_host(uri, headers)
        } else {
            None
        };
        let target = (host, uri.path(), uri.query());
        self.order
            .iter()
            .find(|(i, j)| self.rules[*i].matches()[*j].matches(method, target, headers))
            .map(|(i, _)| *i)
    }
}

/// Why a route is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RouteError(pub String);

/// A service's route: default backends, rules, and the default mirror.
#[derive(Debug, Clone, Default)]
pub struct Route {
    /// (version, weight); empty: every endpoint alike.
    pub backends: Vec<(Arc<str>, u32)>,
    pub rules: Vec<Rule>,
    pub mirror: Option<MirrorConfig>,
}

fn regex(what: &str, re: &str) -> Result<Regex, String> {
    if re.len() > MAX_REGEX_LEN {
        return Err(format!("{what}: regex longer than {MAX_REGEX_LEN} bytes"));
    }
    whole(re).map_err(|e| format!("{what}: invalid regex {re:?}: {e}"))
}

fn header_name(what: &str, n: &str) -> Result<HeaderName, String> {
    crate::policy::header_name(n).ok_or_else(|| format!("{what}: {n:?} is not a header name"))
}

fn key(what: &str, k: &pb::KeyMatch, header: bool) -> Result<KeyMatch, String> {
    let name = if header {
        header_name(what, &k.name)?.as_str().to_string()
    } else if k.name.is_empty() {
        return Err(format!("{what}: a query match with an empty name"));
    } else {
        k.name.clone()
    };
    Ok(KeyMatch {
        name,
        value: match &k.value {
            None => None,
            Some(pb::key_match::Value::Exact(v)) => Some(ValueMatch::Exact(v.clone())),
            Some(pb::key_match::Value::Regex(r)) => Some(ValueMatch::Regex(regex(what, r)?)),
        },
    })
}

fn header_pairs(
    what: &str,
    v: &[pb::HeaderValue],
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    v.iter()
        .map(|h| {
            Ok((
                header_name(what, &h.name)?,
                HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("{what}: header value {:?} is not valid", h.value))?,
            ))
        })
        .collect()
}

/// Weighted versions: none empty, none twice, not all zero.
fn backends(what: &str, v: &[pb::WeightedBackend]) -> Result<Vec<(Arc<str>, u32)>, String> {
    let mut out: Vec<(Arc<str>, u32)> = Vec::with_capacity(v.len());
    for b in v {
        if !b.service.is_empty() {
            // Proxies get service backends as versions (`crate::backends::expand`).
            return Err(format!(
                "{what}: backend service {:?} not expanded to a version",
                b.service
            ));
        }
        if b.version.is_empty() {
            return Err(format!("{what}: a backend has an empty version"));
        }
        if out.iter().any(|(v, _)| **v == *b.version) {
            return Err(format!("{what}: version {:?} listed twice", b.version));
        }
        out.push((b.version.as_str().into(), b.weight));
    }
    if !out.is_empty() && out.iter().all(|(_, w)| *w == 0) {
        return Err(format!(
            "{what}: weights sum to 0: at least one must be positive"
        ));
    }
    Ok(out)
}

fn mirror(what: &str, m: &Option<pb::Mirror>) -> Result<Option<MirrorConfig>, String> {
    match m {
        None => Ok(None),
        Some(m) if m.version.is_empty() => Err(format!("{what}: mirror needs a version")),
        Some(m) if !(0.0..=100.0).contains(&m.percent) => Err(format!(
            "{what}: mirror percent {} is not in 0..=100",
            m.percent
        )),
        Some(m) => Ok(Some(MirrorConfig {
            version: m.version.as_str().into(),
            percent: m.percent,
        })),
    }
}

fn one_match(what: &str, m: &pb::RouteMatch) -> Result<Match, String> {
    if m.path.is_none()
        && m.method.is_empty()
        && m.headers.is_empty()
        && m.query.is_empty()
        && m.hosts.is_empty()
    {
        return Err(format!("{what}: a match with no condition"));
    }
    let path = match &m.path {
        None => None,
        Some(pb::route_match::Path::Exact(p) | pb::route_match::Path::Prefix(p))
            if !p.starts_with('/') =>
        {
            return Err(format!("{what}: path {p:?} must start with '/'"));
        }
        Some(pb::route_match::Path::Exact(p)) => Some(PathMatch::Exact(p.clone())),
        Some(pb::route_match::Path::Prefix(p)) => Some(PathMatch::Prefix(p.clone())),
        Some(pb::route_match::Path::Regex(re)) => Some(PathMatch::Regex(regex(what, re)?)),
    };
    let method = match m.method.as_str() {
        "" => None,
        s if s.bytes().all(|b| b.is_ascii_uppercase()) => Some(
            s.parse::<Method>()
                .map_err(|_| format!("{what}: {s:?} is not a method"))?,
        ),
        s => return Err(format!("{what}: method {s:?} must be upper case")),
    };
    let hosts = m
        .hosts
        .iter()
        .map(|h| HostMatch::parse(h).map_err(|e| format!("{what}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Match {
        hosts,
        path,
        method,
        headers: m
            .headers
            .iter()
            .map(|k| key(what, k, true))
            .collect::<Result<_, _>>()?,
        query: m
            .query
            .iter()
            .map(|k| key(what, k, false))
            .collect::<Result<_, _>>()?,
    })
}

fn rule(r: &pb::RouteRule) -> Result<Rule, String> {
    let what = format!("rule {:?}", r.name);
    if r.name.is_empty()
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!("{what}: name must be letters, digits and '-'"));
    }
    if r.matches.is_empty() {
        return Err(format!("{what}: needs at least one match"));
    }
    let matches = r
        .matches
        .iter()
        .map(|m| one_match(&what, m))
        .collect::<Result<_, _>>()?;
    let redirect = match &r.redirect {
        None => None,
        Some(rd) => Some(Redirect {
            scheme: Some(rd.scheme.clone()).filter(|s| !s.is_empty()),
            host: Some(rd.host.clone()).filter(|s| !s.is_empty()),
            path: Some(rd.path.clone()).filter(|s| !s.is_empty()),
            status: match rd.status {
                0 => StatusCode::FOUND,
                s @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(s as u16)
                    .map_err(|_| format!("{what}: bad redirect status"))?,
                s => {
                    return Err(format!(
                        "{what}: redirect status {s} (use 301, 302, 303, 307, 308)"
                    ));
                }
            },
        }),
    };
    let names = |v: &[String]| -> Result<Vec<HeaderName>, String> {
        v.iter().map(|n| header_name(&what, n)).collect()
    };
    Ok(Rule {
        name: r.name.as_str().into(),
        matches,
        backends: backends(&what, &r.backends)?,
        set_request: header_pairs(&what, &r.set_request_headers)?,
        remove_request: names(&r.remove_request_headers)?,
        set_response: header_pairs(&what, &r.set_response_headers)?,
        remove_response: names(&r.remove_response_headers)?,
        redirect,
        mirror: mirror(&what, &r.mirror)?,
        policy: r
            .policy
            .as_ref()
            .map(crate::Policy::try_from)
            .transpose()
            .map_err(|e| format!("{what}: policy {e}"))?,
    })
}

impl TryFrom<&pb::Route> for Route {
    type Error = RouteError;

    fn try_from(route: &pb::Route) -> Result<Self, RouteError> {
        if route.rules.len() > MAX_RULES {
            return Err(RouteError(format!("more than {MAX_RULES} rules")));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(route.rules.len());
        for r in &route.rules {
            let r = rule(r).map_err(RouteError)?;
            if rules.iter().any(|o| o.name == r.name) {
                return Err(RouteError(format!("rule {:?}: name used twice", &*r.name)));
            }
            rules.push(r);
        }
        Ok(Route {
            backends: backends("route", &route.backends).map_err(RouteError)?,
            rules,
            mirror: mirror("route", &route.mirror).map_err(RouteError)?,
        })
    }
}

impl Route {
    /// Every version the route names (backends, mirrors, rules') is one `service` has.
    pub fn check_versions(&self, service: &str, versions: &[String]) -> Result<(), RouteError> {
        let known = || {
            if versions.is_empty() {
                "none".to_string()
            } else {
                versions.join(", ")
            }
        };
        let unknown = |what: &str, v: &str| {
            RouteError(format!(
                "{what}: unknown version {v:?} of service {service:?} (known: {})",
                known()
            ))
        };
        let has = |v: &str| versions.iter().any(|k| k == v);
        for (v, _) in &self.backends {
            if !has(v) {
                return Err(unknown("route", v));
            }
        }
        if let Some(m) = &self.mirror
            && !has(&m.version)
        {
            return Err(unknown("route mirror", &m.version));
        }
        for r in &self.rules {
            let what = format!("rule {:?}", &*r.name);
            for (v, _) in &r.backends {
                if !has(v) {
                    return Err(unknown(&what, v));
                }
            }
            if let Some(m) = &r.mirror
                && !has(&m.version)
            {
                return Err(unknown(&format!("{what} mirror"), &m.version));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
