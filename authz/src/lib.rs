//! Authorization of calls to a service, shared by the proxy (which enforces it on inbound
//! requests) and the control plane (which validates what is stored and explains decisions for
//! `meshctl authz check`), so both decide the same way. A service's rules are tried in order and
//! the first that matches decides; when none does, its namespace's default decides.

use mesh_proto::v1 as pb;
use std::fmt;

pub mod path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    #[error("{0}")]
    Invalid(String),
}

fn bad(m: impl Into<String>) -> AuthzError {
    AuthzError::Invalid(m.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// What decides when no rule matches (set per namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    #[default]
    AllowAll,
    DenyAll,
    /// Any caller with a certificate of this trust domain; plaintext callers are denied.
    AllowMeshOnly,
}

impl DefaultAction {
    pub const NAMES: [&'static str; 3] = ["allow-all", "deny-all", "allow-mesh-only"];

    pub fn parse(s: &str) -> Result<Self, AuthzError> {
        match s {
            "" | "allow-all" => Ok(Self::AllowAll),
            "deny-all" => Ok(Self::DenyAll),
            "allow-mesh-only" => Ok(Self::AllowMeshOnly),
            other => Err(bad(format!(
                "unknown default {other:?}: use allow-all, deny-all or allow-mesh-only"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowAll => "allow-all",
            Self::DenyAll => "deny-all",
            Self::AllowMeshOnly => "allow-mesh-only",
        }
    }
}

/// A caller a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    /// Any caller with a certificate of the trust domain.
    AnyMesh,
    Namespace(String),
    Account {
        ns: String,
        sa: String,
    },
    /// A full SPIFFE id (possibly of another trust domain).
    Spiffe(String),
}

fn token_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Principal {
    fn parse(s: &str) -> Result<Self, AuthzError> {
        if s == "*" {
            return Ok(Self::AnyMesh);
        }
        if s.starts_with("spiffe://") {
            return Ok(Self::Spiffe(s.to_string()));
        }
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "*"] if token_ok(ns) => Ok(Self::Namespace(ns.to_string())),
            ["ns", ns, "sa", sa] if token_ok(ns) && token_ok(sa) => Ok(Self::Account {
                ns: ns.to_string(),
                sa: sa.to_string(),
            }),
            _ => Err(bad(format!(
                "caller {s:?}: use ns/<ns>/sa/<sa>, ns/<ns>/*, * or a spiffe:// id"
            ))),
        }
    }

    fn matches(&self, td: &str, caller: &Caller<'_>) -> bool {
        match self {
            Self::Spiffe(id) => caller.id == id,
            Self::AnyMesh => caller.td == td,
            Self::Namespace(ns) => caller.td == td && caller.ns == ns,
            Self::Account { ns, sa } => caller.td == td && caller.ns == ns && caller.sa == sa,
        }
    }
}

/// A caller's SPIFFE id, split.
struct Caller<'a> {
    id: &'a str,
    td: &'a str,
    ns: &'a str,
    sa: &'a str,
}

fn split_id(id: &str) -> Option<Caller<'_>> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut p = path.split('/');
    match (p.next(), p.next(), p.next(), p.next(), p.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some(Caller { id, td, ns, sa }),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    fn parse(s: &str) -> Result<Self, AuthzError> {
        if !s.starts_with('/') {
            return Err(bad(format!("path {s:?} must start with /")));
        }
        Ok(match s.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_string()),
            None => Self::Exact(s.to_string()),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    from: Vec<Principal>,
    methods: Vec<String>,
    paths: Vec<PathMatch>,
}

impl Rule {
    fn matches(&self, td: &str, caller: Option<&Caller<'_>>, method: &str, path: &str) -> bool {
        let from = self.from.is_empty()
            || caller.is_some_and(|c| self.from.iter().any(|p| p.matches(td, c)));
        from && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

/// The authorization of one service, as enforced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authz {
    pub name: String,
    pub rules: Vec<Rule>,
    pub audit: bool,
    pub default: DefaultAction,
    pub trust_domain: String,
}

/// What decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy<'a> {
    Rule { policy: &'a str, rule: &'a str },
    Default(DefaultAction),
}

impl fmt::Display for DecidedBy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule { policy, rule } => write!(f, "{policy}/{rule}"),
            Self::Default(d) => write!(f, "namespace default {}", d.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    pub by: DecidedBy<'a>,
}

impl Authz {
    /// Decides a request from `caller` (its SPIFFE id; None: plaintext) for `method` `path`
    /// (the path without the query). Audit mode is the caller's to apply (`self.audit`).
    pub fn decide(&self, caller: Option<&str>, method: &str, path: &str) -> Decision<'_> {
        let c = caller.and_then(split_id);
        for r in &self.rules {
            if r.matches(&self.trust_domain, c.as_ref(), method, path) {
                return Decision {
                    allowed: r.action == Action::Allow,
                    by: DecidedBy::Rule {
                        policy: &self.name,
                        rule: &r.name,
                    },
                };
            }
        }
        let allowed = match self.default {
            DefaultAction::AllowAll => true,
            DefaultAction::DenyAll => false,
            DefaultAction::AllowMeshOnly => c.is_some_and(|c| c.td == self.trust_domain),
        };
        Decision {
            allowed,
            by: DecidedBy::Default(self.default),
        }
    }

    /// True when a rule matches on paths: the path then decides, so encodings that apps read
    /// differently are refused (`path::normalize`'s `strict`).
    pub fn matches_paths(&self) -> bool {
        self.rules.iter().any(|r| !r.paths.is_empty())
    }

    /// True when every request is allowed without looking (no rules, allow-all): the proxy
    /// then skips the check.
    pub fn allows_everything(&self) -> bool {
        self.rules.is_empty() && self.default == DefaultAction::AllowAll
    }
}

impl TryFrom<&pb::Authz> for Authz {
    type Error = AuthzError;

    fn try_from(a: &pb::Authz) -> Result<Self, AuthzError> {
        if !a.rules.is_empty() && a.name.trim().is_empty() {
            return Err(bad("a policy with rules needs a name"));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(a.rules.len());
        for r in &a.rules {
            if r.name.is_empty() {
                return Err(bad("every rule needs a name"));
            }
            if rules.iter().any(|x| x.name == r.name) {
                return Err(bad(format!("rule name {:?} used twice", r.name)));
            }
            let action = match r.action.as_str() {
                "allow" => Action::Allow,
                "deny" => Action::Deny,
                other => {
                    return Err(bad(format!(
                        "rule {:?}: action {other:?}: use allow or deny",
                        r.name
                    )));
                }
            };
            let methods = r
                .methods
                .iter()
                .map(|m| {
                    if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) {
                        Ok(m.clone())
                    } else {
                        Err(bad(format!(
                            "rule {:?}: method {m:?}: use upper case, e.g. GET",
                            r.name
                        )))
                    }
                })
                .collect::<Result<_, _>>()?;
            rules.push(Rule {
                name: r.name.clone(),
                action,
                from: r
                    .from
                    .iter()
                    .map(|s| Principal::parse(s))
                    .collect::<Result<_, _>>()?,
                methods,
                paths: r
                    .paths
                    .iter()
                    .map(|s| PathMatch::parse(s))
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(Self {
            name: a.name.clone(),
            rules,
            audit: a.audit,
            default: DefaultAction::parse(&a.default_action)?,
            trust_domain: a.trust_domain.clone(),
        })
    }
}

/// Parses a rule as `meshctl authz set --rule` takes it:
/// `allow|deny [name=N] [from=A,B] [methods=GET,HEAD] [paths=/x,/api/*]`.
pub fn parse_rule(spec: &str, index: usize) -> Result<pb::AuthzRule, AuthzError> {
    let mut words = spec.split_whitespace();
    let action = words
        .next()
        .ok_or_else(|| bad("empty rule: start with allow or deny"))?;
    if action != "allow" && action != "deny" {
        return Err(bad(format!("rule {spec:?}: start with allow or deny")));
    }
    let mut r = pb::AuthzRule {
        name: format!("rule-{index}"),
        action: action.to_string(),
        ..pb::AuthzRule::default()
    };
    let list = |v: &str| {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| bad(format!("rule {spec:?}: {w:?} is not key=value")))?;
        match k {
            "name" => r.name = v.to_string(),
            "from" => r.from = list(v),
            "methods" => r.methods = list(v),
            "paths" => r.paths = list(v),
            other => {
                return Err(bad(format!(
                    "rule {spec:?}: unknown key {other:?} (name, from, methods, paths)"
                )));
            }
        }
    }
    Ok(r)
}

/// A caller as `meshctl authz check --from` takes it: `ns/<ns>/sa/<sa>`, `<ns>/<sa>`, a
/// spiffe:// id, or empty (plaintext) → its SPIFFE id in `trust_domain`.
pub fn caller_id(from: &str, trust_domain: &str) -> Result<Option<String>, AuthzError> {
    if from.is_empty() {
        return Ok(None);
    }
    if from.starts_with("spiffe://") {
        return Ok(Some(from.to_string()));
    }
    let parts: Vec<&str> = from.split('/').collect();
    let (ns, sa) = match parts.as_slice() {
        ["ns", ns, "sa", sa] => (*ns, *sa),
        [ns, sa] => (*ns, *sa),
        _ => {
            return Err(bad(format!(
                "caller {from:?}: use ns/<ns>/sa/<sa> or <ns>/<sa>"
            )));
        }
    };
    if !token_ok(ns) || !token_ok(sa) {
        return Err(bad(format!(
            "caller {from:?}: bad namespace or service account"
        )));
    }
    Ok(Some(format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")))
}

#[cfg(test)]
mod tests;
