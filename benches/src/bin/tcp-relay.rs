//! The floor of `mesh-bench`: a TCP relay that does nothing a proxy could avoid. It accepts on
//! one address and copies bytes both ways to another, on one thread, with no TLS and no HTTP.
//! Two of them in a chain cross the same hops as a sidecar pair (load tool, outbound, inbound,
//! app), so what they add to a request's latency is what the machine charges for two more
//! processes on the path: wake-ups, context switches and loopback TCP. No proxy with more to
//! do can add less.
//!
//! Usage: `tcp-relay LISTEN UPSTREAM` (both `ip:port`).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::process::ExitCode {
    let mut a = std::env::args().skip(1);
    let parse = |s: Option<String>| s.and_then(|s| s.parse::<SocketAddr>().ok());
    let (Some(listen), Some(upstream)) = (parse(a.next()), parse(a.next())) else {
        eprintln!("usage: tcp-relay LISTEN UPSTREAM (ip:port each)");
        return std::process::ExitCode::from(2);
    };
    // One thread, as the mesh's sidecar runs by default.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcp-relay: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(relay(listen, upstream)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp-relay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn relay(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let l = TcpListener::bind(listen).await?;
    loop {
        let (mut down, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut up = match TcpStream::connect(upstream).await {
                Ok(up) => up,
                Err(e) => {
                    eprintln!("tcp-relay: connect {upstream}: {e}");
                    return;
                }
            };
            // As the proxies under test: no Nagle delay on either side.
            if down.set_nodelay(true).is_ok() && up.set_nodelay(true).is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
}
