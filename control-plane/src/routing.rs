//! Checks on route rules before they are stored (the proxy checks again and NACKs what it
//! cannot apply; this is so a user gets a clear refusal from `meshctl` instead).

use mesh_proto::v1 as pb;

/// Longest regex source accepted in a match.
pub const MAX_REGEX_LEN: usize = 1024;
/// Most rules in one route.
pub const MAX_RULES: usize = 100;

fn header_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn regex_ok(what: &str, r: &str) -> Result<(), String> {
    if r.len() > MAX_REGEX_LEN {
        return Err(format!("{what}: regex longer than {MAX_REGEX_LEN} bytes"));
    }
    regex::Regex::new(r)
        .map(|_| ())
        .map_err(|e| format!("{what}: invalid regex {r:?}: {e}"))
}

fn key_match(what: &str, k: &pb::KeyMatch, header: bool) -> Result<(), String> {
    if header && !header_name_ok(&k.name) || k.name.is_empty() {
        return Err(format!("{what}: invalid name {:?}", k.name));
    }
    if let Some(pb::key_match::Value::Regex(r)) = &k.value {
        regex_ok(what, r)?;
    }
    Ok(())
}

fn mirror(what: &str, m: &Option<pb::Mirror>, versions: &[String]) -> Result<(), String> {
    if let Some(m) = m {
        if !versions.contains(&m.version) {
            return Err(format!("{what}: mirror to unknown version {:?}", m.version));
        }
        if !(0.0..=100.0).contains(&m.percent) {
            return Err(format!(
                "{what}: mirror percent {} is not in 0..=100",
                m.percent
            ));
        }
    }
    Ok(())
}

/// Checks rules: unique names, at least one match each, every condition well formed, backends
/// among `versions`, header edits and redirects valid.
pub fn validate_rules(route: &pb::Route, versions: &[String]) -> Result<(), String> {
    if route.rules.len() > MAX_RULES {
        return Err(format!("more than {MAX_RULES} rules"));
    }
    mirror("default backends", &route.mirror, versions)?;
    let mut names = Vec::new();
    for r in &route.rules {
        let what = format!("rule {:?}", r.name);
        if r.name.is_empty()
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!("{what}: name must be letters, digits and '-'"));
        }
        if names.contains(&r.name) {
            return Err(format!("{what}: name used twice"));
        }
        names.push(r.name.clone());
        if r.matches.is_empty() {
            return Err(format!("{what}: needs at least one match"));
        }
        for m in &r.matches {
            if m.path.is_none() && m.method.is_empty() && m.headers.is_empty() && m.query.is_empty()
            {
                return Err(format!("{what}: a match with no condition"));
            }
            match &m.path {
                Some(pb::route_match::Path::Exact(p) | pb::route_match::Path::Prefix(p))
                    if !p.starts_with('/') =>
                {
                    return Err(format!("{what}: path {p:?} must start with '/'"));
                }
                Some(pb::route_match::Path::Regex(re)) => regex_ok(&what, re)?,
                _ => {}
            }
            if !m.method.is_empty() && !m.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("{what}: method {:?} must be upper case", m.method));
            }
            for h in &m.headers {
                key_match(&what, h, true)?;
            }
            for q in &m.query {
                key_match(&what, q, false)?;
            }
        }
        for b in &r.backends {
            if !versions.contains(&b.version) {
                return Err(format!(
                    "{what}: unknown version {:?} (known: {})",
                    b.version,
                    versions.join(", ")
                ));
            }
        }
        if !r.backends.is_empty() && r.backends.iter().all(|b| b.weight == 0) {
            return Err(format!("{what}: weights sum to 0"));
        }
        let edits = r
            .set_request_headers
            .iter()
            .chain(&r.set_response_headers)
            .map(|h| &h.name)
            .chain(
                r.remove_request_headers
                    .iter()
                    .chain(&r.remove_response_headers),
            );
        for n in edits {
            if !header_name_ok(n) {
                return Err(format!("{what}: invalid header name {n:?}"));
            }
        }
        mirror(&what, &r.mirror, versions)?;
        if let Some(p) = &r.policy {
            crate::policy::validate(p).map_err(|e| format!("{what}: policy {e}"))?;
        }
        if let Some(rd) = &r.redirect
            && !matches!(rd.status, 0 | 301 | 302 | 303 | 307 | 308)
        {
            return Err(format!(
                "{what}: redirect status {} (use 301, 302, 303, 307, 308)",
                rd.status
            ));
        }
    }
    Ok(())
}
