//! `mesh-proxy`: parse flags, run until SIGTERM/SIGINT, drain.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // `mesh-proxy init ...`: the pod's traffic redirect (run by the injected init container).
    if std::env::args().nth(1).as_deref() == Some("init") {
        let a = mesh_proxy::init::InitArgs::parse_from(std::env::args().skip(1));
        return match mesh_proxy::init::run(&a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e @ mesh_proxy::init::InitError::Cidr(_)) => {
                eprintln!("error: invalid configuration: {e}");
                std::process::ExitCode::from(78)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let argv = match mesh_proxy::config_file::merge(std::env::args_os().collect(), |k| {
        std::env::var_os(k)
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return std::process::ExitCode::from(78);
        }
    };
    let args = mesh_proxy::bootstrap::Args::parse_from(argv);
    let bootstrap = match mesh_proxy::bootstrap::Bootstrap::try_from(args) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return std::process::ExitCode::from(78);
        }
    };
    // One worker: a current-thread runtime, so no wakeup ever crosses threads.
    let mut builder = match bootstrap.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(mesh_proxy::app::run(bootstrap)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
