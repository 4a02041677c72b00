//! `meshctl policy set|get|clear`: flags → a `Policy` message. `set` changes only the fields
//! given and keeps the rest, so `--timeout 2s` alone does not drop the retries set earlier.

use super::output::{self, Table, print_json};
use clap::Subcommand;
use mesh_proto::v1 as pb;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    pub service: String,
    /// Set the policy of this rule of the service's route instead (its requests then use it
    /// in place of the service's).
    #[arg(long)]
    pub route: Option<String>,
    /// Whole-request timeout including retries, e.g. 2s (0 turns it off).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Timeout of each attempt, e.g. 500ms.
    #[arg(long)]
    pub per_try_timeout: Option<String>,
    /// TCP + TLS connect timeout to the peer sidecar (default 2s).
    #[arg(long)]
    pub connect_timeout: Option<String>,
    /// Close pooled connections unused this long (default 5m).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// End a request or answer body that moves no data this long, e.g. 30s (default: none).
    #[arg(long)]
    pub stream_idle_timeout: Option<String>,
    /// Retries after the first attempt (0 turns retries off).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Retry conditions: 5xx, gateway-error, connect-failure, refused-stream, reset, timeout, a
    /// status such as 503, a gRPC code such as unavailable. Comma-separated.
    #[arg(long)]
    pub retry_on: Option<String>,
    /// Retry budget: retries stay within this share of recent requests, e.g. 20%.
    #[arg(long)]
    pub retry_budget: Option<String>,
    /// Retries per second always allowed besides the budget (default 10).
    #[arg(long)]
    pub retry_budget_min: Option<u32>,
    /// Backoff base and cap, e.g. 25ms,250ms.
    #[arg(long)]
    pub retry_backoff: Option<String>,
    /// Also retry non-idempotent requests (POST, PATCH) on response conditions.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub retry_non_idempotent: Option<bool>,
    /// Outlier ejection and limits, e.g. consecutive=5,eject=30s,max-ejected=50%,
    /// failure-rate=50%,window=10s,min-requests=20,max-concurrent=100,max-pending=10.
    #[arg(long)]
    pub circuit_breaker: Option<String>,
    /// gRPC statuses that count as the server's failure (outlier ejection, success rates,
    /// canary gate), e.g. unavailable,internal,resource-exhausted; "default" for UNKNOWN,
    /// DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS.
    #[arg(long)]
    pub grpc_failures: Option<String>,
    /// Calls from each client proxy to the service, e.g. 100/s or 100/s,burst=20.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// All callers together, enforced by the service's own proxy.
    #[arg(long)]
    pub inbound_rate_limit: Option<String>,
    /// Each caller identity, enforced by the service's own proxy.
    #[arg(long)]
    pub inbound_rate_limit_per_caller: Option<String>,
    /// At a gateway: the request header that names the client for
    /// --inbound-rate-limit-per-caller (e.g. x-api-key); "ip" (the default) keys by the
    /// client's address.
    #[arg(long)]
    pub client_header: Option<String>,
    /// All replicas of the service together, e.g. 1000/s (quota leases from the control
    /// plane; each proxy decides locally within its share). "off" removes it.
    #[arg(long)]
    pub global_rate_limit: Option<String>,
    /// With --global-rate-limit: the budget is each caller identity's, across all replicas.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub per_caller: Option<bool>,
    /// Hedge idempotent requests (best set on a rule with --route): "p95" sends a second
    /// copy to another endpoint after the p95 of recent answers, a duration after that long,
    /// "off" stops hedging. Hedges draw on the retry budget.
    #[arg(long)]
    pub hedge: Option<String>,
    /// Adaptive concurrency limit at the service's own proxies: "on", "off", or settings,
    /// e.g. min=3,max=1000,interval=30s,tolerance=10%.
    #[arg(long)]
    pub adaptive_concurrency: Option<String>,
    /// p2c-ewma (default), round-robin, or consistent-hash.
    #[arg(long)]
    pub lb: Option<String>,
    /// Header hashed by consistent-hash, e.g. x-user.
    #[arg(long)]
    pub hash_header: Option<String>,
    /// Ramp new endpoints up over this long, e.g. 30s.
    #[arg(long)]
    pub warmup: Option<String>,
    /// Delay a share of requests, e.g. 100ms@5%.
    #[arg(long)]
    pub fault_delay: Option<String>,
    /// Answer a share of requests with a status, e.g. 503@10%.
    #[arg(long)]
    pub fault_abort: Option<String>,
}

/// Parses `250ms`, `2s`, `5m`, `1h` (or `0`) into milliseconds.
pub fn parse_ms(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(0);
    }
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        return Err(format!("{s:?}: give a unit, e.g. 250ms, 2s, 5m"));
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("invalid duration {s:?}"))
}

/// Parses `20%` or `20` into a percentage.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    t.strip_suffix('%')
        .unwrap_or(t)
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite() && *p >= 0.0)
        .ok_or_else(|| format!("invalid percentage {s:?}: use e.g. 20%"))
}

/// Parses `100/s` or `100/s,burst=20`.
pub fn parse_rate(s: &str) -> Result<pb::Rate, String> {
    let mut parts = s.split(',').map(str::trim);
    let first = parts.next().unwrap_or_default();
    let per_second = first
        .strip_suffix("/s")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid rate {first:?}: use e.g. 100/s"))?;
    let mut burst = 0;
    for p in parts {
        match p.split_once('=') {
            Some(("burst", v)) => {
                burst = v
                    .parse()
                    .map_err(|_| format!("invalid burst {v:?}: a whole number"))?
            }
            _ => return Err(format!("unknown rate option {p:?} (use burst=N)")),
        }
    }
    Ok(pb::Rate { per_second, burst })
}

/// Parses `<value>@<percent>` (e.g. `100ms@5%`, `503@10%`).
fn parse_at<T>(s: &str, value: impl Fn(&str) -> Result<T, String>) -> Result<(T, f64), String> {
    let (v, p) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: expected <value>@<percent>, e.g. 503@10%"))?;
    Ok((value(v)?, parse_percent(p)?))
}

fn parse_circuit_breaker(s: &str, cb: &mut pb::CircuitBreaker) -> Result<(), String> {
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value"))?;
        let n = || {
            v.parse::<u32>()
                .map_err(|_| format!("{k}: {v:?} is not a whole number"))
        };
        match k {
            "consecutive" => cb.consecutive_failures = n()?,
            "failure-rate" => cb.failure_rate_percent = parse_percent(v)?,
            "window" => cb.window_ms = parse_ms(v)?,
            "min-requests" => cb.min_requests = n()?,
            "eject" => cb.base_ejection_ms = parse_ms(v)?,
            "max-ejected" => cb.max_ejection_percent = parse_percent(v)?,
            "max-concurrent" => cb.max_concurrent = n()?,
            "max-pending" => cb.max_pending = n()?,
            _ => {
                return Err(format!(
                    "unknown key {k:?} (use consecutive, failure-rate, window, min-requests, \
                     eject, max-ejected, max-concurrent, max-pending)"
                ));
            }
        }
    }
    Ok(())
}

fn parse_adaptive(
    s: &str,
    mut a: pb::AdaptiveConcurrency,
) -> Result<pb::AdaptiveConcurrency, String> {
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected on, off, or key=value"))?;
        let n = || {
            v.parse::<u32>()
                .map_err(|_| format!("{k}: {v:?} is not a whole number"))
        };
        match k {
            "min" => a.min_limit = n()?,
            "max" => a.max_limit = n()?,
            "interval" => a.min_rtt_interval_ms = parse_ms(v)?,
            "tolerance" => a.tolerance_percent = parse_percent(v)?,
            _ => {
                return Err(format!(
                    "unknown key {k:?} (use min, max, interval, tolerance)"
                ));
            }
        }
    }
    Ok(a)
}

/// Applies the flags given in `a` on top of `p`.
pub fn apply(a: &PolicyArgs, p: &mut pb::Policy) -> Result<(), String> {
    fn err(flag: &'static str) -> impl Fn(String) -> String {
        move |e| format!("--{flag}: {e}")
    }
    if a.timeout.is_some()
        || a.per_try_timeout.is_some()
        || a.connect_timeout.is_some()
        || a.idle_timeout.is_some()
        || a.stream_idle_timeout.is_some()
    {
        let t = p.timeouts.get_or_insert_with(Default::default);
        let set = |v: &Option<String>, f: &mut u32, flag: &'static str| -> Result<(), String> {
            if let Some(v) = v {
                *f = parse_ms(v).map_err(err(flag))?;
            }
            Ok(())
        };
        set(&a.timeout, &mut t.request_ms, "timeout")?;
        set(&a.per_try_timeout, &mut t.per_try_ms, "per-try-timeout")?;
        set(&a.connect_timeout, &mut t.connect_ms, "connect-timeout")?;
        set(&a.idle_timeout, &mut t.idle_ms, "idle-timeout")?;
        set(
            &a.stream_idle_timeout,
            &mut t.stream_idle_ms,
            "stream-idle-timeout",
        )?;
    }
    if a.retries.is_some()
        || a.retry_on.is_some()
        || a.retry_budget.is_some()
        || a.retry_budget_min.is_some()
        || a.retry_backoff.is_some()
        || a.retry_non_idempotent.is_some()
    {
        let r = p.retry.get_or_insert_with(Default::default);
        if let Some(n) = a.retries {
            r.max_retries = n;
        }
        if let Some(on) = &a.retry_on {
            r.retry_on = on
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect();
        }
        if let Some(b) = &a.retry_budget {
            r.budget_percent = parse_percent(b).map_err(err("retry-budget"))?;
        }
        if let Some(m) = a.retry_budget_min {
            r.budget_min_per_second = m;
        }
        if let Some(b) = &a.retry_backoff {
            let (base, max) = b.split_once(',').unwrap_or((b, "0"));
            r.backoff_base_ms = parse_ms(base).map_err(err("retry-backoff"))?;
            r.backoff_max_ms = parse_ms(max).map_err(err("retry-backoff"))?;
        }
        if let Some(v) = a.retry_non_idempotent {
            r.non_idempotent = v;
        }
    }
    if let Some(g) = &a.grpc_failures {
        p.grpc_failures = if g.trim() == "default" {
            Vec::new()
        } else {
            g.split(',').map(|c| c.trim().to_string()).collect()
        };
    }
    if let Some(cb) = &a.circuit_breaker {
        parse_circuit_breaker(cb, p.circuit_breaker.get_or_insert_with(Default::default))
            .map_err(err("circuit-breaker"))?;
    }
    for (v, flag) in [
        (&a.rate_limit, "rate-limit"),
        (&a.inbound_rate_limit, "inbound-rate-limit"),
        (
            &a.inbound_rate_limit_per_caller,
            "inbound-rate-limit-per-caller",
        ),
    ] {
        let Some(v) = v else { continue };
        let rl = p.rate_limit.get_or_insert_with(Default::default);
        let slot = match flag {
            "rate-limit" => &mut rl.outbound,
            "inbound-rate-limit" => &mut rl.inbound,
            _ => &mut rl.inbound_per_caller,
        };
        *slot = if v == "off" {
            None
        } else {
            Some(parse_rate(v).map_err(err(flag))?)
        };
    }
    if let Some(v) = &a.client_header {
        p.rate_limit
            .get_or_insert_with(Default::default)
            .client_header = match v.trim() {
            "ip" | "" => String::new(),
            h => h.to_ascii_lowercase(),
        };
    }
    if let Some(v) = &a.global_rate_limit {
        let rl = p.rate_limit.get_or_insert_with(Default::default);
        rl.global = if v == "off" {
            None
        } else {
            Some(parse_rate(v).map_err(err("global-rate-limit"))?)
        };
    }
    if let Some(v) = a.per_caller {
        p.rate_limit
            .get_or_insert_with(Default::default)
            .global_per_caller = v;
    }
    if let Some(rl) = &mut p.rate_limit
        && rl.global.is_none()
    {
        rl.global_per_caller = false;
    }
    if let Some(h) = &a.hedge {
        p.hedge = match h.trim() {
            "off" => None,
            "p95" => Some(pb::Hedge { delay_ms: 0 }),
            d => Some(pb::Hedge {
                delay_ms: parse_ms(d).map_err(err("hedge"))?,
            }),
        };
    }
    if let Some(v) = &a.adaptive_concurrency {
        p.adaptive_concurrency = match v.trim() {
            "off" => None,
            "on" => Some(p.adaptive_concurrency.unwrap_or_default()),
            settings => Some(
                parse_adaptive(settings, p.adaptive_concurrency.unwrap_or_default())
                    .map_err(err("adaptive-concurrency"))?,
            ),
        };
    }
    if a.lb.is_some() || a.hash_header.is_some() || a.warmup.is_some() {
        let lb = p.load_balancer.get_or_insert_with(Default::default);
        if let Some(v) = &a.lb {
            lb.algorithm = v.clone();
        }
        if let Some(v) = &a.hash_header {
            lb.hash_header = v.to_ascii_lowercase();
        }
        if let Some(v) = &a.warmup {
            lb.warmup_ms = parse_ms(v).map_err(err("warmup"))?;
        }
    }
    if let Some(d) = &a.fault_delay {
        let f = p.fault.get_or_insert_with(Default::default);
        (f.delay_ms, f.delay_percent) = parse_at(d, parse_ms).map_err(err("fault-delay"))?;
    }
    if let Some(d) = &a.fault_abort {
        let f = p.fault.get_or_insert_with(Default::default);
        (f.abort_status, f.abort_percent) = parse_at(d, |s| {
            s.parse::<u32>()
                .map_err(|_| format!("{s:?} is not a status code"))
        })
        .map_err(err("fault-abort"))?;
    }
    mesh_model::Policy::try_from(&*p)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug, Clone)]
pub enum PolicyCmd {
    /// Change the fields given; the others keep their values.
    Set(Box<PolicyArgs>),
    /// Show a service's policy (or, with --route, one rule's).
    Get {
        service: String,
        /// A rule of the service's route (see `meshctl route get`).
        #[arg(long)]
        route: Option<String>,
    },
    /// Remove a service's policy, or a rule's (back to the service's).
    Clear {
        service: String,
        #[arg(long)]
        route: Option<String>,
    },
}

/// `meshctl policy …`.
pub async fn run(c: &mut super::client::Admin, cmd: PolicyCmd, json: bool) -> anyhow::Result<()> {
    let (service, rule) = match &cmd {
        PolicyCmd::Get { service, route } | PolicyCmd::Clear { service, route } => {
            (service.clone(), route.clone())
        }
        PolicyCmd::Set(a) => (a.service.clone(), a.route.clone()),
    };
    let what = match &rule {
        Some(r) => format!("policy of {service}, rule {r}"),
        None => format!("policy of {service}"),
    };
    // The policy now in force: the service's, or the rule's (with the route it is in).
    let (current, revision, route) = match &rule {
        None => {
            let r = c
                .get_policy(pb::GetPolicyRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            if json && matches!(cmd, PolicyCmd::Get { .. }) {
                return print_json(&r);
            }
            (r.policy.unwrap_or_default(), r.revision, None)
        }
        Some(name) => {
            let r = c
                .get_route(pb::GetRouteRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            let route = r.route.unwrap_or_default();
            let p = route
                .rules
                .iter()
                .find(|x| &x.name == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "route of {service} has no rule {name:?} (see meshctl route get {service})"
                    )
                })?
                .policy
                .clone()
                .unwrap_or_default();
            (p, r.revision, Some(route))
        }
    };
    let next = match cmd {
        PolicyCmd::Get { .. } => {
            if json {
                return output::print_value(&serde_json::to_value(&current)?);
            }
            let mut t = Table::new(&["SETTING", "VALUE"]);
            for (k, v) in output::policy_lines(&current) {
                t.row(vec![k, v]);
            }
            println!("{what} (revision {revision}):");
            t.print();
            return Ok(());
        }
        PolicyCmd::Clear { .. } => pb::Policy::default(),
        PolicyCmd::Set(args) => {
            let mut p = current;
            apply(&args, &mut p).map_err(|e| anyhow::anyhow!(e))?;
            p
        }
    };
    let revision = match (route, rule) {
        (Some(mut route), Some(name)) => {
            if let Some(r) = route.rules.iter_mut().find(|x| x.name == name) {
                r.policy = (next != pb::Policy::default()).then_some(next);
            }
            c.set_route(pb::SetRouteRequest {
                service,
                route: Some(route),
                skip_validation: false,
                expected_revision: revision,
            })
            .await?
            .into_inner()
            .revision
        }
        _ => {
            c.set_policy(pb::SetPolicyRequest {
                service,
                policy: Some(next),
                skip_validation: false,
            })
            .await?
            .into_inner()
            .revision
        }
    };
    println!("{what} set (revision {revision})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(service: &str) -> PolicyArgs {
        PolicyArgs {
            service: service.into(),
            ..Default::default()
        }
    }

    #[test]
    fn flags_merge_over_the_stored_policy() {
        let mut p = pb::Policy::default();
        let mut a = args("web");
        a.timeout = Some("2s".into());
        a.retries = Some(3);
        a.retry_on = Some("5xx,Connect-Failure".into());
        a.retry_budget = Some("20%".into());
        a.rate_limit = Some("100/s,burst=5".into());
        a.circuit_breaker = Some("consecutive=5,eject=30s,max-ejected=50%".into());
        a.fault_abort = Some("503@10%".into());
        apply(&a, &mut p).unwrap();
        assert_eq!(p.timeouts.as_ref().unwrap().request_ms, 2000);
        let r = p.retry.clone().unwrap();
        assert_eq!(
            (r.max_retries, r.retry_on, r.budget_percent),
            (3, vec!["5xx".to_string(), "connect-failure".into()], 20.0)
        );
        assert_eq!(p.rate_limit.as_ref().unwrap().outbound.unwrap().burst, 5);
        assert_eq!(p.circuit_breaker.as_ref().unwrap().base_ejection_ms, 30_000);
        assert_eq!(p.fault.as_ref().unwrap().abort_status, 503);
        // A later call changes one field and keeps the rest.
        let mut b = args("web");
        b.timeout = Some("500ms".into());
        apply(&b, &mut p).unwrap();
        assert_eq!(p.timeouts.as_ref().unwrap().request_ms, 500);
        assert_eq!(p.retry.as_ref().unwrap().max_retries, 3);
    }

    #[test]
    fn hedging_adaptive_concurrency_and_global_limits_from_flags() {
        let mut p = pb::Policy::default();
        let mut a = args("api");
        a.hedge = Some("p95".into());
        a.adaptive_concurrency = Some("min=2,max=200,interval=10s".into());
        a.global_rate_limit = Some("1000/s".into());
        a.per_caller = Some(true);
        apply(&a, &mut p).unwrap();
        assert_eq!(p.hedge, Some(pb::Hedge { delay_ms: 0 }));
        let ac = p.adaptive_concurrency.unwrap();
        assert_eq!(
            (ac.min_limit, ac.max_limit, ac.min_rtt_interval_ms),
            (2, 200, 10_000)
        );
        let rl = p.rate_limit.clone().unwrap();
        assert_eq!(rl.global.unwrap().per_second, 1000);
        assert!(rl.global_per_caller);
        let mut b = args("api");
        b.hedge = Some("40ms".into());
        b.global_rate_limit = Some("off".into());
        apply(&b, &mut p).unwrap();
        assert_eq!(p.hedge, Some(pb::Hedge { delay_ms: 40 }));
        let rl = p.rate_limit.clone().unwrap();
        assert!(
            rl.global.is_none() && !rl.global_per_caller,
            "per-caller goes with it"
        );
        let mut c = args("api");
        c.adaptive_concurrency = Some("min=5,max=2".into());
        assert!(apply(&c, &mut p).unwrap_err().contains("min_limit"));
        let mut c = args("api");
        c.adaptive_concurrency = Some("fast".into());
        assert!(
            apply(&c, &mut p)
                .unwrap_err()
                .starts_with("--adaptive-concurrency")
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let mut p = pb::Policy::default();
        let mut a = args("web");
        a.timeout = Some("2 parsecs".into());
        assert!(apply(&a, &mut p).unwrap_err().starts_with("--timeout"));
        let mut a = args("web");
        a.rate_limit = Some("fast".into());
        assert!(apply(&a, &mut p).unwrap_err().starts_with("--rate-limit"));
        let mut a = args("web");
        a.retry_on = Some("5xx,sometimes".into());
        assert!(apply(&a, &mut p).unwrap_err().contains("sometimes"));
        let mut a = args("web");
        a.circuit_breaker = Some("consecutive=five".into());
        assert!(apply(&a, &mut p).unwrap_err().contains("whole number"));
        assert_eq!(parse_ms("250ms"), Ok(250));
        assert_eq!(parse_ms("2m"), Ok(120_000));
        assert!(parse_ms("250").is_err());
    }
}
