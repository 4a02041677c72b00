//! Route matching as pure data: which rule of a service's route a request takes. Matches are
//! tried most specific first (fixed at config time, so a request walks a sorted list once):
//! header matches beat none; an exact path beats a prefix, a longer prefix a shorter one, and
//! a prefix a regex; then a method; then more header and query conditions; then list order.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use std::sync::Arc;

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

/// All conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
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
    pub policy: Option<crate::policy::Policy>,
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
    /// Sort key, most specific first (compared in reverse).
    fn rank(&self) -> (bool, u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            Some(PathMatch::Exact(p)) => (3, p.len()),
            Some(PathMatch::Prefix(p)) => (2, p.len()),
            Some(PathMatch::Regex(_)) => (1, 0),
            None => (0, 0),
        };
        (
            !self.headers.is_empty(),
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    pub fn matches(&self, method: &Method, path: &str, query: Option<&str>, h: &HeaderMap) -> bool {
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
#[derive(Debug, Clone, Default)]
pub struct Router {
    pub rules: Vec<Rule>,
    /// (rule index, match index), most specific first.
    order: Vec<(usize, usize)>,
}

impl Router {
    pub fn new(rules: Vec<Rule>) -> Self {
        let mut order: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..r.matches.len()).map(move |j| (i, j)))
            .collect();
        // Stable: equal ranks keep list order.
        order.sort_by(|a, b| {
            rules[b.0].matches[b.1]
                .rank()
                .cmp(&rules[a.0].matches[a.1].rank())
        });
        Self { rules, order }
    }

    /// The index of the rule this request takes, or None for the default backends.
    pub fn route(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let (path, query) = (uri.path(), uri.query());
        self.order
            .iter()
            .find(|(i, j)| self.rules[*i].matches[*j].matches(method, path, query, headers))
            .map(|(i, _)| *i)
    }
}

#[cfg(test)]
mod tests;
