//! meshctl: clap commands and output. No business logic: every command is one admin API call
//! (plus `demo`, which starts local processes, `inject`, which runs `mesh-inject` offline,
//! `install`, which prints the Kubernetes install, and `check`, which also reads the
//! Kubernetes API through the kubeconfig). Its own crate, so the CLI does not link etcd-client.

pub mod authz;
pub mod ca;
pub mod canary;
pub mod check;
pub mod client;
pub mod demo;
pub mod external;
pub mod install;
pub mod output;
pub mod policy;
pub mod process;
pub mod route;
pub mod tap;

use clap::{Parser, Subcommand};
use mesh_proto::v1 as pb;
pub use output::Format;
use output::{Table, print_json};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Operate the mesh: services, endpoints, routes, proxies, tokens"
)]
pub struct Cli {
    /// Admin API address of the control plane.
    #[arg(
        long,
        env = "MESH_ADMIN_SERVER",
        default_value = "https://127.0.0.1:15011",
        global = true
    )]
    pub server: String,
    /// Admin credential: the root admin token (default: read from <data-dir>/admin-token) or
    /// a scoped one from `meshctl token create --scope …`.
    #[arg(long, env = "MESH_ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Namespace of service names given without one (`api` means `api.<namespace>`), and of
    /// what lists show.
    #[arg(short = 'n', long, global = true, default_value = "default")]
    pub namespace: String,
    /// Lists show every namespace.
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,
    /// The kubeconfig context, for `check` and for the admin credential: without --token and
    /// a local data dir's token, meshctl presents the kubeconfig's own bearer token, which
    /// the control plane maps to mesh scopes through Kubernetes RBAC.
    #[arg(long, env = "MESH_KUBE_CONTEXT", global = true)]
    pub context: Option<String>,
    /// CA certificate to verify the control plane (default: <data-dir>/ca/bundle.pem).
    #[arg(long, env = "MESH_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// The control plane's data directory, for a local control plane.
    #[arg(long, env = "MESH_DATA_DIR", default_value = ".mesh", global = true)]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    #[command(flatten)]
    Admin(AdminCmd),
    /// Start a local mesh (control plane, example services, sidecars) and send traffic through it.
    Demo(demo::DemoArgs),
    /// Add the sidecar to every pod template of a Kubernetes manifest (offline; what the
    /// webhook does at admission). Prints the manifest on stdout, a summary on stderr.
    Inject(InjectCmd),
    /// Print the Kubernetes install of this version (namespace, CRDs, RBAC, control plane,
    /// webhook, and fresh CA and admin-token Secrets): `meshctl install | kubectl apply -f -`.
    Install(install::InstallArgs),
    /// Print what removes the install: `meshctl uninstall | kubectl delete -f -` (give the
    /// same --set/-f as the install, for its namespace).
    Uninstall(install::InstallArgs),
    /// Checks a cluster before an install (`--pre`: API version, permissions, namespace) or a
    /// running mesh (CRDs, control plane, webhook CA, proxies' configs, certificates and
    /// versions, clock skew), each with what to do; exits 1 if any fails.
    Check(check::CheckArgs),
    /// This meshctl's version, the control plane's, and the versions its proxies run.
    Version,
    /// Shell completion script: `source <(meshctl completion bash)`, `meshctl completion zsh >
    /// "${fpath[1]}/_meshctl"`, `meshctl completion fish | source`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct InjectCmd {
    /// The manifest (YAML, several documents allowed); `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    #[command(flatten)]
    pub inject: mesh_inject::InjectArgs,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "mesh.local")]
    pub trust_domain: String,
    /// Undo an injection: remove the sidecar, its volumes and annotations, and put the app's
    /// original probes back.
    #[arg(long)]
    pub uninject: bool,
}

/// Commands that are one admin API call.
#[derive(Subcommand, Debug, Clone)]
pub enum AdminCmd {
    /// List services.
    Services,
    /// List or change endpoints.
    Endpoints {
        #[command(subcommand)]
        cmd: Option<EndpointsCmd>,
        /// Only this service's endpoints.
        #[arg(long)]
        service: Option<String>,
    },
    /// Show or change routes.
    Route {
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// Show or change a service's resilience policy (timeouts, retries, circuit breaking,
    /// rate limits, load balancing, fault injection).
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Services outside the mesh that apps call through their sidecars (TLS originated).
    External {
        #[command(subcommand)]
        cmd: external::ExternalCmd,
    },
    /// A namespace's egress mode: allow-any (the default: destinations outside the mesh are
    /// passed through) or registry-only (only mesh services and declared externals).
    Egress { namespace: String, mode: String },
    /// mTLS mode of a service: strict (only mTLS from mesh peers; the default) or permissive
    /// (plaintext accepted too, for migration).
    Mtls { service: String, mode: String },
    /// Declare what a service's app speaks on its ports, replacing earlier declarations
    /// (`8080=http2 5432=opaque`; none: clears them). http1 or http2 reach the app as that
    /// protocol whatever the caller spoke; opaque ports are tunnelled as TCP without detection.
    Protocol {
        service: String,
        /// PORT=PROTOCOL, protocol http1, http2 or opaque.
        ports: Vec<String>,
    },
    /// Authorization: who may call a service (rules by caller identity, method, path).
    Authz {
        #[command(subcommand)]
        cmd: authz::AuthzCmd,
    },
    /// Automated canary: shift traffic step by step, judged on live metrics, with rollback.
    Canary {
        #[command(subcommand)]
        cmd: canary::CanaryCmd,
    },
    /// Live golden metrics per service version (requests/s, success rate, p50, p99), from the
    /// proxies' telemetry.
    Top {
        /// Window the figures cover, e.g. 10s.
        #[arg(long, default_value = "10s")]
        window: String,
        /// Time between refreshes.
        #[arg(long, default_value = "2s")]
        refresh: String,
        /// Stop after this many tables (default: run until interrupted; once with -o json).
        #[arg(long)]
        count: Option<u32>,
    },
    /// Live requests of a service (method, path, status, latency, identities), from the
    /// proxies' telemetry; `-o json` prints one JSON object per line.
    Tap(tap::TapArgs),
    /// Connected proxies and the config version each ACKed or NACKed.
    Proxies,
    /// Bootstrap tokens for VMs / single machines, and scoped admin credentials.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Workload identities.
    Identity {
        #[command(subcommand)]
        cmd: IdentityCmd,
    },
    /// The mesh's trust roots: status, and rotation with an overlap period.
    Ca {
        #[command(subcommand)]
        cmd: ca::CaCmd,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum EndpointsCmd {
    /// Register an endpoint by hand (proxies normally register themselves).
    Add {
        service: String,
        /// Endpoint id, unique within the service.
        #[arg(long)]
        id: String,
        /// ip:port of the endpoint's sidecar inbound listener.
        #[arg(long)]
        address: String,
        /// `version` label.
        #[arg(long)]
        version: Option<String>,
        /// Service account, in the service's namespace (default: the service name).
        #[arg(long)]
        service_account: Option<String>,
    },
    /// Remove an endpoint.
    Remove { service: String, id: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum RouteCmd {
    /// Set the default split (`--weights v1=90,v2=10`) and/or a rule (`--match
    /// header:x-canary=true --to v2`); the rest of the route is kept.
    Set(Box<route::RouteSetArgs>),
    /// Remove a rule by name.
    RemoveRule { service: String, name: String },
    /// Make the previous version of the route current again.
    Rollback { service: String },
    /// What changed between the previous version of the route and the current one.
    Diff { service: String },
    /// Show a service's route.
    Get { service: String },
    /// All services' routes.
    List,
    /// Earlier versions of a service's route, newest first.
    History { service: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenCmd {
    /// Create a bootstrap token bound to one identity (`--identity default/web`), or an admin
    /// credential with scopes (`--scope read`, `--scope read,write`; scopes: read, write,
    /// identity). A credential can grant only scopes it holds itself.
    Create {
        #[arg(long, required_unless_present = "scope", conflicts_with = "scope")]
        identity: Option<String>,
        #[arg(long, value_delimiter = ',')]
        scope: Vec<String>,
        /// What an admin credential is for, shown by `token list`.
        #[arg(long, default_value = "", requires = "scope")]
        name: String,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Bootstrap tokens (by identity) and admin credentials (by scopes), with id and expiry
    /// (the secrets are not stored).
    List,
    /// Revoke a token or admin credential by its id (or the secret itself): a bootstrap token
    /// can no longer obtain a certificate, an admin credential is refused at once.
    Revoke { id: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum IdentityCmd {
    /// Revoke an identity (`<namespace>/<service-account>`): its unused tokens are deleted and
    /// its certificates are no longer renewed, so its proxies drop out when their certificates
    /// expire (within the leaf lifetime, `--cert-ttl-secs` of the control plane). A token
    /// created afterwards admits it again.
    Revoke { identity: String },
}

/// `meshctl inject -f`: reads the manifest, prints it injected.
fn inject(args: &InjectCmd) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Read;
    let mut text = String::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
    }
    let mut cfg = args.inject.config();
    cfg.trust_domain = args.trust_domain.clone();
    let (out, report) = if args.uninject {
        mesh_inject::manifest::uninject_manifest(&text)?
    } else {
        mesh_inject::manifest::inject_manifest(&text, &cfg)?
    };
    print!("{out}");
    for l in report.lines {
        eprintln!("{l}");
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => std::future::pending().await,
    }
}

/// Parses `v1=90,v2=10` (versions of the service) or `svc/primary=90,svc/canary=10` (other
/// services). Refuses negative and non-numeric weights.
pub fn parse_weights(s: &str) -> Result<Vec<pb::WeightedBackend>, String> {
    let mut out: Vec<pb::WeightedBackend> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (v, w) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected <version>=<weight>"))?;
        let v = v.trim();
        if v.is_empty() {
            return Err(format!("{part:?}: empty version"));
        }
        let w: i64 = w
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: weight is not a whole number"))?;
        if w < 0 {
            return Err(format!("{part:?}: weights cannot be negative"));
        }
        let weight = u32::try_from(w).map_err(|_| format!("{part:?}: weight too large"))?;
        // `svc/<name>`: another service as the backend (one Service per version).
        let (service, version) = match v.strip_prefix("svc/") {
            Some(s) if !s.is_empty() => (s.to_string(), String::new()),
            Some(_) => return Err(format!("{part:?}: svc/ needs a service name")),
            None => (String::new(), v.to_string()),
        };
        out.push(pb::WeightedBackend {
            version,
            weight,
            service,
        });
    }
    if out.is_empty() {
        return Err("no weights given: expected e.g. v1=90,v2=10".into());
    }
    // Versions named twice and weights summing to 0 are the model's to refuse (`mesh-model`),
    // with the message the control plane and the proxies give.
    Ok(out)
}

/// Parses `90s`, `30m`, `24h`, `7d` or plain seconds.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid duration {s:?}: use e.g. 90s, 30m, 24h, 7d"))
}

pub(crate) fn fmt_weights(r: &Option<pb::Route>) -> String {
    match r {
        Some(r) if !r.backends.is_empty() => r
            .backends
            .iter()
            .map(|b| match (b.service.as_str(), b.version.as_str()) {
                ("", v) => format!("{v}={}", b.weight),
                (s, "") => format!("svc/{s}={}", b.weight),
                (s, v) => format!("svc/{s}@{v}={}", b.weight),
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => "(no split)".into(),
    }
}

fn fmt_time(unix: i64) -> String {
    if unix == 0 {
        return "-".into();
    }
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Routes as a table; services of namespace `ns` by their bare name.
fn route_table(routes: &[pb::RouteInfo], ns: &str) -> Table {
    let mut t = Table::with_wide(&["SERVICE", "WEIGHTS", "REVISION", "UPDATED"], &["RULES"]);
    for r in routes {
        let rules: Vec<&str> = r
            .route
            .iter()
            .flat_map(|r| &r.rules)
            .map(|x| x.name.as_str())
            .collect();
        t.row(vec![
            mesh_model::service::relative(&r.service, ns).to_string(),
            fmt_weights(&r.route),
            r.revision.to_string(),
            fmt_time(r.updated_at_unix),
            rules.join(","),
        ]);
    }
    t
}

/// `meshctl version`: the client's always; the server's and its proxies' when it answers.
async fn version(cli: &Cli) -> anyhow::Result<()> {
    let client = env!("CARGO_PKG_VERSION");
    let server = match client::connect(cli).await {
        Ok(mut c) => c
            .get_version(pb::GetVersionRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if cli.output.structured() {
        let mut v = serde_json::json!({ "client": client });
        if let Ok(s) = &server {
            v["control_plane"] = s.control_plane.clone().into();
            v["proxies"] = serde_json::json!(s.proxies);
        }
        output::print_value(&v)?;
    } else {
        println!("client:        {client}");
        if let Ok(s) = &server {
            println!("control plane: {}", s.control_plane);
            let mut proxies: Vec<_> = s.proxies.iter().collect();
            proxies.sort();
            for (v, n) in proxies {
                let note = if v == client {
                    ""
                } else {
                    " (differs from the client)"
                };
                println!("proxies:       {v} ×{n}{note}");
            }
        }
    }
    server.map(|_| ())
}

/// Runs one meshctl command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    output::set_format(cli.output);
    // JSON or YAML: every read verb prints its data instead of a table.
    let json = cli.output.structured();
    let cmd = match &cli.command {
        Command::Demo(args) => return demo::run(args.clone()).await,
        Command::Inject(args) => return inject(args),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "meshctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Version => return version(&cli).await,
        Command::Check(args) => return check::run(&cli, args).await,
        Command::Install(args) => {
            print!("{}", install::install(args)?);
            return Ok(());
        }
        Command::Uninstall(args) => {
            print!("{}", install::uninstall(args)?);
            return Ok(());
        }
        Command::Admin(cmd) => cmd.clone(),
    };
    let mut c = client::connect(&cli).await?;
    // Lists show the -n namespace, or every namespace with -A.
    let (all, ns) = (cli.all_namespaces, cli.namespace.clone());
    let in_scope = move |key: &str| all || mesh_model::service::split(key).1 == ns;
    match cmd {
        AdminCmd::Services => {
            let mut r = c
                .list_services(pb::ListServicesRequest {})
                .await?
                .into_inner();
            r.services
                .retain(|s| cli.all_namespaces || s.namespace == cli.namespace);
            if json {
                return print_json(&r);
            }
            let mut t = Table::new(&[
                "NAME",
                "NAMESPACE",
                "IDENTITY",
                "ENDPOINTS",
                "READY",
                "VERSIONS",
                "MTLS",
                "PROTOCOLS",
            ]);
            for s in r.services {
                t.row(vec![
                    s.name,
                    s.namespace,
                    s.identity,
                    s.endpoints.to_string(),
                    s.ready_endpoints.to_string(),
                    s.versions.join(","),
                    s.mtls_mode.to_uppercase(),
                    s.app_protocols
                        .iter()
                        .map(|p| format!("{}={}", p.port, p.protocol))
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            t.print();
        }
        AdminCmd::Endpoints { cmd: None, service } => {
            let mut r = c
                .list_endpoints(pb::ListEndpointsRequest {
                    service: service.unwrap_or_default(),
                })
                .await?
                .into_inner();
            r.endpoints.retain(|e| in_scope(&e.service));
            if json {
                return print_json(&r);
            }
            let mut t = Table::with_wide(
                &["SERVICE", "ID", "ADDRESS", "VERSION", "READY"],
                &["IDENTITY", "LABELS"],
            );
            for e in r.endpoints {
                let ep = e.endpoint.unwrap_or_default();
                let v = ep.labels.get("version").cloned().unwrap_or_default();
                let svc = mesh_model::service::relative(&e.service, &cli.namespace).to_string();
                let labels: Vec<String> =
                    ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let identity = if ep.identity.is_empty() {
                    "(the service's)".to_string()
                } else {
                    ep.identity
                };
                t.row(vec![
                    svc,
                    ep.id,
                    ep.address,
                    v,
                    ep.ready.to_string(),
                    identity,
                    labels.join(","),
                ]);
            }
            t.print();
        }
        AdminCmd::Endpoints {
            cmd:
                Some(EndpointsCmd::Add {
                    service,
                    id,
                    address,
                    version,
                    service_account,
                }),
            ..
        } => {
            let mut labels = std::collections::HashMap::new();
            if let Some(v) = version {
                labels.insert("version".to_string(), v);
            }
            c.add_endpoint(pb::AddEndpointRequest {
                service: service.clone(),
                namespace: String::new(),
                service_account: service_account.unwrap_or_default(),
                endpoint: Some(pb::Endpoint {
                    id: id.clone(),
                    address,
                    labels,
                    ready: true,
                    app_port: 0,
                    identity: String::new(),
                }),
            })
            .await?;
            println!("endpoint {id} added to {service}");
        }
        AdminCmd::Endpoints {
            cmd: Some(EndpointsCmd::Remove { service, id }),
            ..
        } => {
            c.remove_endpoint(pb::RemoveEndpointRequest {
                service: service.clone(),
                endpoint_id: id.clone(),
            })
            .await?;
            println!("endpoint {id} removed from {service}");
        }
        AdminCmd::Route { cmd } => match cmd {
            RouteCmd::Set(_) | RouteCmd::RemoveRule { .. } => {
                let service = match &cmd {
                    RouteCmd::Set(a) => a.service.clone(),
                    RouteCmd::RemoveRule { service, .. } => service.clone(),
                    _ => unreachable!("matched above"),
                };
                let cur = c
                    .get_route(pb::GetRouteRequest {
                        service: service.clone(),
                    })
                    .await?
                    .into_inner();
                let mut route = cur.route.unwrap_or_default();
                match &cmd {
                    RouteCmd::Set(a) => {
                        route::apply(a, &mut route).map_err(|e| anyhow::anyhow!(e))?
                    }
                    RouteCmd::RemoveRule { name, .. } => {
                        let before = route.rules.len();
                        route.rules.retain(|r| &r.name != name);
                        anyhow::ensure!(
                            route.rules.len() < before,
                            "route of {service} has no rule {name:?}"
                        );
                    }
                    _ => unreachable!("matched above"),
                }
                // The control plane's own checks (`mesh-model`), before anything is sent, on
                // the route as proxies get it (other services as versions).
                let key = mesh_model::service::absolute(&service, &cli.namespace);
                let (expanded, _) = mesh_model::backends::expand(&key, &route);
                mesh_model::Route::try_from(&expanded).map_err(|e| anyhow::anyhow!("{e}"))?;
                let r = c
                    .set_route(pb::SetRouteRequest {
                        service,
                        route: Some(route),
                        skip_validation: false,
                        expected_revision: cur.revision,
                    })
                    .await?
                    .into_inner();
                if json {
                    return print_json(&r);
                }
                println!(
                    "route of {} set to {} (revision {})",
                    mesh_model::service::relative(&r.service, &cli.namespace),
                    fmt_weights(&r.route),
                    r.revision
                );
            }
            RouteCmd::Get { service } => {
                let r = c
                    .get_route(pb::GetRouteRequest { service })
                    .await?
                    .into_inner();
                if json {
                    return print_json(&r);
                }
                route_table(std::slice::from_ref(&r), &cli.namespace).print();
                let route = r.route.unwrap_or_default();
                if route.backends.is_empty() {
                    // Say what "no split" does: it is not an even one.
                    let lb = c
                        .get_policy(pb::GetPolicyRequest {
                            service: r.service.clone(),
                        })
                        .await
                        .ok()
                        .and_then(|p| p.into_inner().policy?.load_balancer)
                        .map(|lb| lb.algorithm)
                        .unwrap_or_default();
                    println!("{}", route::no_split(&lb));
                }
                for l in route::lines(&route).iter().skip(1) {
                    println!("{l}");
                }
            }
            RouteCmd::Rollback { service } => {
                let r = c
                    .rollback_route(pb::GetRouteRequest { service })
                    .await?
                    .into_inner();
                if json {
                    return print_json(&r);
                }
                println!(
                    "route of {} rolled back to {} (revision {})",
                    mesh_model::service::relative(&r.service, &cli.namespace),
                    fmt_weights(&r.route),
                    r.revision
                );
            }
            RouteCmd::Diff { service } => {
                let h = c
                    .route_history(pb::GetRouteRequest {
                        service: service.clone(),
                    })
                    .await?
                    .into_inner()
                    .history;
                let (new, old) = match (h.first(), h.get(1)) {
                    (Some(n), Some(o)) => (n.clone(), o.clone()),
                    _ => anyhow::bail!("route of {service} has no earlier version to compare"),
                };
                println!(
                    "--- revision {}\n+++ revision {}",
                    old.revision, new.revision
                );
                for l in route::diff(
                    &old.route.unwrap_or_default(),
                    &new.route.unwrap_or_default(),
                ) {
                    println!("{l}");
                }
            }
            RouteCmd::List => {
                let mut r = c.list_routes(pb::ListRoutesRequest {}).await?.into_inner();
                r.routes.retain(|x| in_scope(&x.service));
                if json {
                    return print_json(&r);
                }
                route_table(&r.routes, &cli.namespace).print();
            }
            RouteCmd::History { service } => {
                let r = c
                    .route_history(pb::GetRouteRequest { service })
                    .await?
                    .into_inner();
                if json {
                    return print_json(&r);
                }
                route_table(&r.history, &cli.namespace).print();
            }
        },
        AdminCmd::Policy { cmd } => policy::run(&mut c, cmd, json).await?,
        AdminCmd::Authz { cmd } => authz::run(&mut c, cmd, json).await?,
        AdminCmd::External { cmd } => external::run(&mut c, cmd, json).await?,
        AdminCmd::Egress { namespace, mode } => external::egress(&mut c, namespace, mode).await?,
        AdminCmd::Mtls { service, mode } => {
            let r = c
                .set_mtls_mode(pb::SetMtlsModeRequest {
                    service: service.clone(),
                    mode: mode.clone(),
                })
                .await?
                .into_inner();
            println!(
                "mTLS mode of {service} set to {mode} (revision {})",
                r.revision
            );
        }
        AdminCmd::Protocol { service, ports } => {
            let ports = app_ports(&ports)?;
            let r = c
                .set_app_protocols(pb::SetAppProtocolsRequest {
                    service: service.clone(),
                    ports,
                })
                .await?
                .into_inner();
            println!("app protocols of {service} set (revision {})", r.revision);
        }
        AdminCmd::Top {
            window,
            refresh,
            count,
        } => {
            let ns = cli.namespace.clone();
            let shown = move |k: &str| mesh_model::service::relative(k, &ns).to_string();
            canary::top(&mut c, &window, &refresh, count, json, &in_scope, &shown).await?
        }
        AdminCmd::Canary { cmd } => canary::run(&mut c, cmd, json).await?,
        AdminCmd::Tap(a) => tap::run(&mut c, a, json).await?,
        AdminCmd::Ca { cmd } => ca::run(&mut c, cmd, json).await?,
        AdminCmd::Proxies => {
            let r = c
                .list_proxies(pb::ListProxiesRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let mut t = Table::with_wide(
                &[
                    "PROXY",
                    "IDENTITY",
                    "SERVICE",
                    "VERSION",
                    "REPLICA",
                    "ACKED",
                    "NACKED",
                    "NACK REASON",
                ],
                &["CONNECTED", "CERT EXPIRES", "SUBSCRIPTIONS"],
            );
            for p in r.proxies {
                let nacked = if p.nacked_version == 0 {
                    "-".to_string()
                } else {
                    p.nacked_version.to_string()
                };
                t.row(vec![
                    p.id,
                    p.identity,
                    p.service,
                    p.version_label,
                    p.replica,
                    p.acked_version.to_string(),
                    nacked,
                    p.nack_reason,
                    fmt_time(p.connected_at_unix),
                    fmt_time(p.cert_expires_unix),
                    p.subscriptions.join(","),
                ]);
            }
            t.print();
            output::unreachable_replicas(&r.unreachable_replicas);
        }
        AdminCmd::Token {
            cmd:
                TokenCmd::Create {
                    identity,
                    scope,
                    name,
                    ttl,
                },
        } => {
            let ttl_seconds = parse_duration_secs(&ttl).map_err(|e| anyhow::anyhow!(e))?;
            let r = c
                .create_token(pb::CreateTokenRequest {
                    identity: identity.unwrap_or_default(),
                    ttl_seconds,
                    scopes: scope,
                    name,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            let grants = if r.scopes.is_empty() {
                format!("for {}", r.identity)
            } else {
                format!("(admin credential: {})", r.scopes.join(","))
            };
            eprintln!(
                "token {} {grants} (expires {}):",
                r.id,
                fmt_time(r.expires_at_unix)
            );
            println!("{}", r.token);
        }
        AdminCmd::Token {
            cmd: TokenCmd::List,
        } => {
            let r = c.list_tokens(pb::ListTokensRequest {}).await?.into_inner();
            if json {
                let rows: Vec<_> = r
                    .tokens
                    .iter()
                    .map(|t| serde_json::json!({"id": t.id, "identity": t.identity, "scopes": t.scopes, "name": t.name, "expires_at_unix": t.expires_at_unix, "created_at_unix": t.created_at_unix}))
                    .collect();
                return output::print_value(&serde_json::json!({ "tokens": rows }));
            }
            let mut t = Table::new(&["ID", "KIND", "GRANTS", "NAME", "EXPIRES"]);
            for k in r.tokens {
                let (kind, grants) = if k.scopes.is_empty() {
                    ("bootstrap", k.identity)
                } else {
                    ("admin", k.scopes.join(","))
                };
                t.row(vec![
                    k.id,
                    kind.to_string(),
                    grants,
                    k.name,
                    fmt_time(k.expires_at_unix),
                ]);
            }
            t.print();
        }
        AdminCmd::Token {
            cmd: TokenCmd::Revoke { id },
        } => {
            let r = c
                .revoke_token(pb::RevokeTokenRequest { id })
                .await?
                .into_inner();
            if r.identity.is_empty() {
                println!("admin credential {} revoked", r.id);
            } else {
                println!("token {} for {} revoked", r.id, r.identity);
            }
        }
        AdminCmd::Identity {
            cmd: IdentityCmd::Revoke { identity },
        } => {
            let r = c
                .revoke_identity(pb::RevokeIdentityRequest { identity })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"identity": r.identity, "revoked_at_unix_ms": r.revoked_at_unix_ms, "tokens_deleted": r.tokens_deleted})
                );
                return Ok(());
            }
            println!(
                "identity {} revoked: its certificates are no longer renewed ({} unused token(s) deleted)",
                r.identity, r.tokens_deleted
            );
        }
    }
    Ok(())
}

/// `PORT=PROTOCOL` arguments, checked by the model the control plane and proxies use.
fn app_ports(args: &[String]) -> anyhow::Result<Vec<pb::AppPort>> {
    let ports = args
        .iter()
        .map(|a| {
            let (port, protocol) = a
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{a:?}: expected PORT=PROTOCOL"))?;
            let port: u32 = port
                .parse()
                .map_err(|_| anyhow::anyhow!("{a:?}: {port:?} is not a port"))?;
            Ok(pb::AppPort {
                port,
                protocol: protocol.to_string(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    mesh_model::AppProtocols::try_from(&ports[..]).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights() {
        let w = parse_weights("v1=90, v2=10").unwrap();
        assert_eq!(
            (w[0].version.as_str(), w[0].weight, w[1].weight),
            ("v1", 90, 10)
        );
        assert!(
            parse_weights("v1=-1,v2=10")
                .unwrap_err()
                .contains("negative")
        );
        assert!(parse_weights("v1=x").is_err());
        assert!(parse_weights("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("24h"), Ok(86400));
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert!(parse_duration_secs("0s").is_err());
        assert!(parse_duration_secs("abc").is_err());
    }
}
