//! `meshctl route set` flags → a route. `--weights` changes the default backends; `--match …
//! --to …` adds (or replaces, by name) a rule; everything else in the route is kept.

use mesh_proto::v1 as pb;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RouteSetArgs {
    pub service: String,
    /// Default split by version, e.g. v1=90,v2=10.
    #[arg(long)]
    pub weights: Option<String>,
    /// A rule condition (repeat: all must hold): header:NAME=VALUE, header:NAME~REGEX,
    /// header:NAME (present), path:/exact, prefix:/api, regex:^/v[0-9]+/, method:GET,
    /// query:NAME=VALUE, host:shop.example.com or host:*.example.com (a gateway's route;
    /// repeat host: for any of several).
    #[arg(long = "match", value_name = "CONDITION")]
    pub matches: Vec<String>,
    /// Where the rule sends: a version (v2), another service (svc/api.shop), or a split
    /// (v1=50,v2=50, svc/api=90,svc/api-canary=10). Default: the route's default backends.
    #[arg(long)]
    pub to: Option<String>,
    /// The rule's name (default: made from its conditions). Setting a rule with an existing
    /// name replaces it.
    #[arg(long)]
    pub name: Option<String>,
    /// Header set on requests the rule matches, NAME=VALUE (repeatable).
    #[arg(long)]
    pub set_request_header: Vec<String>,
    #[arg(long)]
    pub remove_request_header: Vec<String>,
    #[arg(long)]
    pub set_response_header: Vec<String>,
    #[arg(long)]
    pub remove_response_header: Vec<String>,
    /// Redirect matching requests: [scheme://]host[/path], e.g. https://new.example.com.
    #[arg(long)]
    pub redirect: Option<String>,
    /// Redirect status (301, 302, 303, 307, 308; default 302).
    #[arg(long)]
    pub redirect_status: Option<u32>,
    /// Copy a share of the requests to a shadow version, e.g. v2@10%, or another service,
    /// svc/shadow@10% (`off` stops it): for the
    /// rule given with --match, else for the default backends.
    #[arg(long)]
    pub mirror: Option<String>,
}

fn parse_mirror(s: &str) -> Result<Option<pb::Mirror>, String> {
    if s == "off" {
        return Ok(None);
    }
    let (v, p) = s
        .split_once('@')
        .ok_or_else(|| format!("--mirror {s:?}: expected <version>@<percent>, e.g. v2@10%"))?;
    let percent = super::policy::parse_percent(p).map_err(|e| format!("--mirror: {e}"))?;
    // `svc/<name>@10%`: another service as the shadow.
    let (service, version) = match v.trim().strip_prefix("svc/") {
        Some(s) => (s.to_string(), String::new()),
        None => (String::new(), v.trim().to_string()),
    };
    Ok(Some(pb::Mirror {
        version,
        percent,
        service,
    }))
}

/// Parses one `--match` condition into `m`.
pub fn parse_condition(s: &str, m: &mut pb::RouteMatch) -> Result<(), String> {
    let (kind, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected <kind>:<value>, e.g. header:x-canary=true"))?;
    let key = |rest: &str| -> pb::KeyMatch {
        if let Some((n, v)) = rest.split_once('=') {
            pb::KeyMatch {
                name: n.to_string(),
                value: Some(pb::key_match::Value::Exact(v.to_string())),
            }
        } else if let Some((n, r)) = rest.split_once('~') {
            pb::KeyMatch {
                name: n.to_string(),
                value: Some(pb::key_match::Value::Regex(r.to_string())),
            }
        } else {
            pb::KeyMatch {
                name: rest.to_string(),
                value: None,
            }
        }
    };
    let path = |p: pb::route_match::Path, m: &mut pb::RouteMatch| {
        if m.path.is_some() {
            return Err(format!("{s:?}: only one path condition per rule"));
        }
        m.path = Some(p);
        Ok(())
    };
    match kind {
        "header" => {
            let mut k = key(rest);
            k.name = k.name.to_ascii_lowercase();
            m.headers.push(k);
        }
        "query" => m.query.push(key(rest)),
        "path" => path(pb::route_match::Path::Exact(rest.to_string()), m)?,
        "prefix" => path(pb::route_match::Path::Prefix(rest.to_string()), m)?,
        "regex" => path(pb::route_match::Path::Regex(rest.to_string()), m)?,
        "method" => m.method = rest.to_ascii_uppercase(),
        "host" => m.hosts.push(rest.to_ascii_lowercase()),
        _ => {
            return Err(format!(
                "{s:?}: unknown kind {kind:?} (use header, query, path, prefix, regex, method, host)"
            ));
        }
    }
    Ok(())
}

fn header_pairs(v: &[String], flag: &str) -> Result<Vec<pb::HeaderValue>, String> {
    v.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(n, v)| pb::HeaderValue {
                    name: n.trim().to_ascii_lowercase(),
                    value: v.trim().to_string(),
                })
                .ok_or_else(|| format!("--{flag} {p:?}: expected NAME=VALUE"))
        })
        .collect()
}

/// A rule name from its conditions: `header-x-canary-true` and the like.
fn default_name(conds: &[String]) -> String {
    let mut n: String = conds
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while n.contains("--") {
        n = n.replace("--", "-");
    }
    n.trim_matches('-').chars().take(60).collect()
}

/// Applies `a` to `route`. Errors name the flag.
pub fn apply(a: &RouteSetArgs, route: &mut pb::Route) -> Result<(), String> {
    let rule_flags = a.to.is_some()
        || a.name.is_some()
        || a.redirect.is_some()
        || !a.set_request_header.is_empty()
        || !a.remove_request_header.is_empty()
        || !a.set_response_header.is_empty()
        || !a.remove_response_header.is_empty();
    if let Some(w) = &a.weights {
        route.backends = super::parse_weights(w).map_err(|e| format!("--weights: {e}"))?;
    }
    let mirror = a.mirror.as_deref().map(parse_mirror).transpose()?;
    if a.matches.is_empty() {
        if let Some(m) = mirror {
            route.mirror = m;
            return Ok(());
        }
        if rule_flags {
            return Err("--to, --name, header and redirect flags need at least one --match".into());
        }
        if a.weights.is_none() {
            return Err("nothing to set: give --weights, or --match with --to".into());
        }
        return Ok(());
    }
    let mut m = pb::RouteMatch::default();
    for c in &a.matches {
        parse_condition(c, &mut m).map_err(|e| format!("--match {e}"))?;
    }
    let backends = match &a.to {
        None => Vec::new(),
        Some(t) if t.contains('=') => super::parse_weights(t).map_err(|e| format!("--to: {e}"))?,
        Some(t) if t.starts_with("svc/") => {
            super::parse_weights(&format!("{t}=100")).map_err(|e| format!("--to: {e}"))?
        }
        Some(t) => vec![pb::WeightedBackend {
            version: t.trim().to_string(),
            weight: 100,
            ..Default::default()
        }],
    };
    let redirect = a.redirect.as_ref().map(|r| {
        let (scheme, rest) = r.split_once("://").unwrap_or(("", r));
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        pb::Redirect {
            scheme: scheme.to_string(),
            host: host.to_string(),
            path: path.to_string(),
            status: a.redirect_status.unwrap_or(0),
        }
    });
    let rule = pb::RouteRule {
        name: a.name.clone().unwrap_or_else(|| default_name(&a.matches)),
        matches: vec![m],
        backends,
        set_request_headers: header_pairs(&a.set_request_header, "set-request-header")?,
        remove_request_headers: a
            .remove_request_header
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        set_response_headers: header_pairs(&a.set_response_header, "set-response-header")?,
        remove_response_headers: a
            .remove_response_header
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        redirect,
        mirror: mirror.flatten(),
        policy: None,
    };
    match route.rules.iter_mut().find(|r| r.name == rule.name) {
        // A rule set again keeps the policy given to it with `policy set --route`.
        Some(r) => {
            let policy = r.policy.take();
            *r = pb::RouteRule { policy, ..rule };
        }
        None => route.rules.push(rule),
    }
    Ok(())
}

/// One line per setting of a route, for `route get` and `route diff`.
pub fn lines(r: &pb::Route) -> Vec<String> {
    let mirror = r
        .mirror
        .as_ref()
        .map(|m| format!(" mirror {}@{}%", m.version, m.percent))
        .unwrap_or_default();
    let mut out = vec![format!(
        "default: {}{mirror}",
        super::fmt_weights(&Some(r.clone()))
    )];
    for rule in &r.rules {
        let v = serde_json::to_value(rule).unwrap_or_default();
        out.push(format!("rule {}: {}", rule.name, v));
    }
    out
}

/// What a route without weights does, for the load-balancing algorithm `lb` ("": the
/// default): versions are not split evenly, each request goes where the balancer sends it.
pub fn no_split(lb: &str) -> String {
    let how = match lb {
        "round-robin" => {
            "in turn over every ready endpoint, so each version gets a share \
                          proportional to its endpoint count"
        }
        "consistent-hash" => {
            "by the hash of the request's header, so a version's share \
                              follows the hashes"
        }
        _ => {
            "to the less loaded of two endpoints picked at random (p2c-ewma: latency and \
              requests in flight), whatever their version, so the share of each version follows \
              their latency and can swing between 0% and 100%"
        }
    };
    format!(
        "no split: each request goes {how}. For a fixed split: meshctl route set <service> \
         --weights v1=50,v2=50"
    )
}

/// A line diff of two routes: `-` lines only in `old`, `+` lines only in `new`.
pub fn diff(old: &pb::Route, new: &pb::Route) -> Vec<String> {
    let (a, b) = (lines(old), lines(new));
    let mut out: Vec<String> = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        b.iter()
            .filter(|l| !a.contains(l))
            .map(|l| format!("+ {l}")),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_is_added_then_replaced_by_name_and_weights_kept() {
        let mut r = pb::Route::default();
        let mut a = RouteSetArgs {
            service: "web".into(),
            weights: Some("v1=100".into()),
            ..Default::default()
        };
        apply(&a, &mut r).unwrap();
        a.weights = None;
        a.matches = vec!["header:X-Canary=true".into()];
        a.to = Some("v2".into());
        apply(&a, &mut r).unwrap();
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].name, "header-x-canary-true");
        assert_eq!(r.rules[0].matches[0].headers[0].name, "x-canary");
        assert_eq!(r.rules[0].backends[0].version, "v2");
        a.to = Some("v1=50,v2=50".into());
        apply(&a, &mut r).unwrap();
        assert_eq!((r.rules.len(), r.rules[0].backends.len()), (1, 2));
        assert_eq!(r.backends[0].version, "v1");
        let d = diff(&pb::Route::default(), &r);
        assert!(
            d.iter()
                .any(|l| l.starts_with("+ rule header-x-canary-true")),
            "{d:?}"
        );
    }

    #[test]
    fn conditions_parse_and_bad_ones_are_named() {
        let mut m = pb::RouteMatch::default();
        parse_condition("prefix:/api", &mut m).unwrap();
        parse_condition("method:get", &mut m).unwrap();
        parse_condition("query:debug", &mut m).unwrap();
        parse_condition("header:x-user~^a.*", &mut m).unwrap();
        assert_eq!(m.method, "GET");
        assert!(matches!(m.path, Some(pb::route_match::Path::Prefix(_))));
        assert!(m.query[0].value.is_none());
        assert!(matches!(
            m.headers[0].value,
            Some(pb::key_match::Value::Regex(_))
        ));
        assert!(
            parse_condition("path:/x", &mut m)
                .unwrap_err()
                .contains("one path")
        );
        assert!(parse_condition("cookie:a=b", &mut m).is_err());
        let a = RouteSetArgs {
            service: "web".into(),
            to: Some("v2".into()),
            ..Default::default()
        };
        assert!(
            apply(&a, &mut pb::Route::default())
                .unwrap_err()
                .contains("--match")
        );
    }
}
