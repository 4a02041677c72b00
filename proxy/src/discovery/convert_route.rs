//! proto → domain for route rules (part of `convert`: the only other place proto is seen).

use crate::http::router::{
    self, KeyMatch, Match, MirrorConfig, PathMatch, Redirect, Rule, ValueMatch,
};
use http::{HeaderName, HeaderValue, StatusCode};
use mesh_proto::v1 as pb;
use std::sync::Arc;

fn regex(what: &str, re: &str) -> Result<regex::Regex, String> {
    router::whole(re).map_err(|e| format!("{what}: invalid regex {re:?}: {e}"))
}

fn key(what: &str, k: &pb::KeyMatch, header: bool) -> Result<KeyMatch, String> {
    if header {
        HeaderName::from_bytes(k.name.as_bytes())
            .map_err(|_| format!("{what}: {:?} is not a header name", k.name))?;
    }
    Ok(KeyMatch {
        name: if header {
            k.name.to_ascii_lowercase()
        } else {
            k.name.clone()
        },
        value: match &k.value {
            None => None,
            Some(pb::key_match::Value::Exact(v)) => Some(ValueMatch::Exact(v.clone())),
            Some(pb::key_match::Value::Regex(r)) => Some(ValueMatch::Regex(regex(what, r)?)),
        },
    })
}

fn header_name(what: &str, n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{what}: {n:?} is not a header name"))
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

fn backends(what: &str, v: &[pb::WeightedBackend]) -> Result<Vec<(Arc<str>, u32)>, String> {
    let out: Vec<(Arc<str>, u32)> = v
        .iter()
        .map(|b| (b.version.as_str().into(), b.weight))
        .collect();
    if !out.is_empty() && out.iter().all(|(_, w)| *w == 0) {
        return Err(format!("{what}: weights sum to 0"));
    }
    if out.iter().any(|(v, _)| v.is_empty()) {
        return Err(format!("{what}: backend with an empty version"));
    }
    Ok(out)
}

/// A mirror, checked.
pub fn mirror(what: &str, m: &Option<pb::Mirror>) -> Result<Option<MirrorConfig>, String> {
    match m {
        None => Ok(None),
        Some(m) if m.version.is_empty() || !(0.0..=100.0).contains(&m.percent) => Err(format!(
            "{what}: mirror needs a version and a percentage in 0..=100"
        )),
        Some(m) => Ok(Some(MirrorConfig {
            version: m.version.as_str().into(),
            percent: m.percent,
        })),
    }
}

/// The route's rules; anything the proxy cannot apply is an error (NACK).
pub fn rules(route: &pb::Route) -> Result<Vec<Rule>, String> {
    let mut out: Vec<Rule> = Vec::with_capacity(route.rules.len());
    for r in &route.rules {
        let what = format!("rule {:?}", r.name);
        if r.name.is_empty() || out.iter().any(|o| *o.name == *r.name) {
            return Err(format!("{what}: empty or repeated name"));
        }
        if r.matches.is_empty() {
            return Err(format!("{what}: no match"));
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for m in &r.matches {
            matches.push(Match {
                path: match &m.path {
                    None => None,
                    Some(pb::route_match::Path::Exact(p)) => Some(PathMatch::Exact(p.clone())),
                    Some(pb::route_match::Path::Prefix(p)) => Some(PathMatch::Prefix(p.clone())),
                    Some(pb::route_match::Path::Regex(re)) => {
                        Some(PathMatch::Regex(regex(&what, re)?))
                    }
                },
                method: match m.method.as_str() {
                    "" => None,
                    s => Some(
                        s.parse()
                            .map_err(|_| format!("{what}: {s:?} is not a method"))?,
                    ),
                },
                headers: m
                    .headers
                    .iter()
                    .map(|k| key(&what, k, true))
                    .collect::<Result<_, _>>()?,
                query: m
                    .query
                    .iter()
                    .map(|k| key(&what, k, false))
                    .collect::<Result<_, _>>()?,
            });
        }
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
                    s => return Err(format!("{what}: redirect status {s}")),
                },
            }),
        };
        out.push(Rule {
            name: r.name.as_str().into(),
            matches,
            backends: backends(&what, &r.backends)?,
            set_request: header_pairs(&what, &r.set_request_headers)?,
            remove_request: r
                .remove_request_headers
                .iter()
                .map(|n| header_name(&what, n))
                .collect::<Result<_, _>>()?,
            set_response: header_pairs(&what, &r.set_response_headers)?,
            remove_response: r
                .remove_response_headers
                .iter()
                .map(|n| header_name(&what, n))
                .collect::<Result<_, _>>()?,
            redirect,
            mirror: mirror(&what, &r.mirror)?,
            policy: r
                .policy
                .as_ref()
                .map(super::convert::policy)
                .transpose()
                .map_err(|e| format!("{what}: {e}"))?,
        });
    }
    Ok(out)
}
