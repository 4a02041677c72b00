//! `pgo-train`: the training run of the sidecar's profile-guided build
//! (`scripts/build-release.sh`). It starts the mesh with an instrumented `mesh-proxy`
//! (`--proxy`), sends HTTP/1.1, HTTP/2 and gRPC unary requests through the mTLS sidecar pair
//! and through one sidecar taking plaintext (the request paths a sidecar serves), checks every
//! answer, then stops the sidecars with SIGTERM so that each writes its profile on exit (to
//! where `LLVM_PROFILE_FILE` says). Needs no load tool: the clients are hyper's and tonic's.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_benches::mesh::{Mesh, READY, echo_client, echo_request, get_request, grpc_check};
use meshctl::process::bin_dir;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(clap::Parser)]
struct Args {
    /// The instrumented sidecar binary (built with `-Cprofile-generate`).
    #[arg(long)]
    proxy: PathBuf,
    /// Seconds of each load through each topology.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Requests in flight per load.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Body size of each answer (HTTP) or message (gRPC), bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
}

#[derive(Clone, Copy, Debug)]
enum Load {
    H1,
    H2,
    Grpc,
}

/// A GET for `/bytes/<body>`; absolute for HTTP/2.
fn get(body: usize, absolute: bool) -> anyhow::Result<http::Request<Empty<Bytes>>> {
    get_request(&format!("/bytes/{body}"), absolute)
}

/// Reads a whole answer and fails unless it is a 200.
async fn expect_ok(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<()> {
    let status = resp.status();
    resp.into_body().collect().await?;
    anyhow::ensure!(status == http::StatusCode::OK, "answered {status}");
    Ok(())
}

/// One HTTP/1.1 keep-alive connection sending GETs back to back until `until` (at least one).
async fn h1_conn(port: u16, body: usize, until: Instant) -> anyhow::Result<u64> {
    let io = TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await?);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let mut n = 0;
    loop {
        tx.ready().await?;
        expect_ok(tx.send_request(get(body, false)?).await?).await?;
        n += 1;
        if Instant::now() >= until {
            return Ok(n);
        }
    }
}

/// `streams` concurrent streams over one HTTP/2 connection until `until`.
async fn h2_conn(port: u16, body: usize, streams: usize, until: Instant) -> anyhow::Result<u64> {
    let io = TokioIo::new(TcpStream::connect(("127.0.0.1", port)).await?);
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(conn);
    let tasks = (0..streams).map(|_| {
        let mut tx = tx.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                tx.ready().await?;
                expect_ok(tx.send_request(get(body, true)?).await?).await?;
                n += 1;
                if Instant::now() >= until {
                    return Ok::<_, anyhow::Error>(n);
                }
            }
        })
    });
    sum(tasks).await
}

/// `calls` concurrent `Echo/Unary` calls over one gRPC channel until `until`.
async fn grpc_conn(port: u16, body: usize, calls: usize, until: Instant) -> anyhow::Result<u64> {
    let client = echo_client(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let tasks = (0..calls).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let req = echo_request(body);
                let len = req.message.len();
                let r = client.unary(req).await?.into_inner();
                anyhow::ensure!(r.message.len() == len, "gRPC echo came back changed");
                n += 1;
                if Instant::now() >= until {
                    return Ok::<_, anyhow::Error>(n);
                }
            }
        })
    });
    sum(tasks).await
}

/// Waits for every task; the requests they made, or the first failure.
async fn sum<I>(tasks: I) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = tokio::task::JoinHandle<anyhow::Result<u64>>>,
{
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// Runs `load` through the listener on `port` for `args.secs`; the requests answered.
async fn run(args: &Args, port: u16, load: Load) -> anyhow::Result<u64> {
    let until = Instant::now() + Duration::from_secs(args.secs);
    let (conns, per_conn) = match load {
        Load::H1 => (args.concurrency, 1),
        Load::H2 | Load::Grpc => (4, args.concurrency.div_ceil(4)),
    };
    let body = args.body;
    let tasks = (0..conns).map(|_| {
        tokio::spawn(async move {
            match load {
                Load::H1 => h1_conn(port, body, until).await,
                Load::H2 => h2_conn(port, body, per_conn, until).await,
                Load::Grpc => grpc_conn(port, body, per_conn, until).await,
            }
        })
    });
    sum(tasks).await
}

/// Waits until a GET through `port` is answered 200 (the sidecars learn the service on the
/// first request) and a gRPC call comes back OK.
async fn warm_up(port: u16, body: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        match h1_conn(port, body, Instant::now()).await {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => return Err(e.context("warm-up")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    grpc_check(std::net::SocketAddr::from(([127, 0, 0, 1], port)), body).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = clap::Parser::parse();
    let dir = tempfile::tempdir()?;
    let mut mesh = Mesh::start(dir.path(), &bin_dir()?, &args.proxy, None, 1)
        .await
        .with_context(|| format!("starting the mesh; logs in {}", dir.path().display()))?;
    let topologies = [
        ("mesh pair", mesh.pair_port),
        ("one sidecar", mesh.single_port),
    ];
    for (name, port) in topologies {
        warm_up(port, args.body)
            .await
            .with_context(|| format!("{name} not answering"))?;
    }
    for load in [Load::H1, Load::H2, Load::Grpc] {
        for (name, port) in topologies {
            let n = run(&args, port, load)
                .await
                .with_context(|| format!("{load:?} through the {name}"))?;
            eprintln!("{load:?} through the {name}: {n} requests");
        }
    }
    mesh.stop_sidecars().await?;
    mesh.stop();
    Ok(())
}
