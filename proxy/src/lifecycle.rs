//! The proxy's lifecycle in one place: the readiness registry (what the proxy still waits
//! for: `/ready` reports it, and the start waits on it before registering) and the one drain
//! signal every listener and connection watches.
//!
//! Readiness is read from the state that decides it (the installed certificate, the applied
//! config), never from a copy that could drift. Drain has two steps: [`Lifecycle::start_drain`]
//! turns `/ready` to 503 while everything is still served (callers learn that the endpoint is
//! leaving); [`Lifecycle::finish_drain`] then stops the listeners and lets open connections
//! finish (HTTP/2 with a two-step GOAWAY) within a deadline.

use crate::snapshot::Snapshots;
use crate::tls::TlsContext;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// One thing the proxy waits for before it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// No certificate from the control plane yet.
    Certificate,
    /// No config from the control plane yet.
    Config,
    /// The service this proxy serves has no settings yet (authorization, mTLS mode). They
    /// follow its endpoint's registration, so the start does not wait for them; `/ready` does.
    OwnService,
    /// Shutting down: load balancers and probes must stop sending.
    Draining,
}

impl Pending {
    pub fn reason(self) -> &'static str {
        match self {
            Pending::Certificate => "no certificate yet",
            Pending::Config => "no config from the control plane yet",
            Pending::OwnService => {
                "the service's own authorization and mTLS settings are not known yet"
            }
            Pending::Draining => "draining",
        }
    }

    /// Whether the start (registration, the ready line) waits for it.
    fn blocks_start(self) -> bool {
        matches!(self, Pending::Certificate | Pending::Config)
    }
}

pub struct Lifecycle {
    tls: Arc<TlsContext>,
    snapshots: Arc<Snapshots>,
    /// The service this proxy serves inbound, if any.
    service: Option<Arc<str>>,
    /// Changes with each certificate the identity manager installs.
    cert: watch::Receiver<Option<Arc<str>>>,
    /// Set when the drain starts (`/ready` answers 503).
    draining: AtomicBool,
    /// Turns true when the listeners stop and open connections are told to finish.
    closing: watch::Sender<bool>,
    /// Hands each connection a watcher; taken when the drain finishes.
    graceful: Mutex<Option<GracefulShutdown>>,
}

impl Lifecycle {
    pub fn new(
        tls: Arc<TlsContext>,
        snapshots: Arc<Snapshots>,
        service: Option<Arc<str>>,
        cert: watch::Receiver<Option<Arc<str>>>,
    ) -> Self {
        Self {
            tls,
            snapshots,
            service,
            cert,
            draining: AtomicBool::new(false),
            closing: watch::channel(false).0,
            graceful: Mutex::new(Some(GracefulShutdown::new())),
        }
    }

    /// Everything not yet ready, in order; empty: ready.
    pub fn pending(&self) -> Vec<Pending> {
        let snap = self.snapshots.load();
        let mut out = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            out.push(Pending::Draining);
        }
        if self.tls.leaf().is_none() {
            out.push(Pending::Certificate);
        }
        if !snap.synced {
            out.push(Pending::Config);
        }
        if self
            .service
            .as_ref()
            .is_some_and(|s| !snap.services.contains_key(s))
        {
            out.push(Pending::OwnService);
        }
        out
    }

    /// Resolves once nothing the start waits for is pending (certificate and first config);
    /// never, if what it waits for can no longer change.
    pub async fn started(&self) {
        let mut cert = self.cert.clone();
        let mut config = self.snapshots.watch();
        let (mut cert_open, mut config_open) = (true, true);
        while self.pending().iter().any(|p| p.blocks_start()) {
            tokio::select! {
                r = cert.changed(), if cert_open => cert_open = r.is_ok(),
                r = config.changed(), if config_open => config_open = r.is_ok(),
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// Turns true when the listeners stop and open connections are told to finish.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Starts the drain: `/ready` answers 503; everything is still served.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// A watcher for a new connection, so the drain waits for it; None once the drain
    /// finishes (the connection is closed at once).
    pub fn watcher(&self) -> Option<Watcher> {
        self.graceful
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(GracefulShutdown::watcher)
    }

    /// Stops the listeners (their accept loops end).
    pub fn stop_listening(&self) {
        self.start_drain();
        self.closing.send_replace(true);
    }

    /// Stops the listeners, tells every open connection to finish (HTTP/2: GOAWAY) and waits
    /// for them, at most `within`. False: the deadline passed with connections still open.
    pub async fn finish_drain(&self, within: Duration) -> bool {
        self.stop_listening();
        let graceful = self
            .graceful
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match graceful {
            Some(g) => tokio::time::timeout(within, g.shutdown()).await.is_ok(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(service: Option<&str>) -> Lifecycle {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("CA");
        let tls = Arc::new(TlsContext::new(&ca.cert.pem()).expect("bundle"));
        let (snapshots, _subscriptions) = Snapshots::new();
        Lifecycle::new(
            tls,
            snapshots,
            service.map(Arc::from),
            watch::channel(None).1,
        )
    }

    #[tokio::test]
    async fn readiness_says_everything_pending_and_drain_turns_it_off() {
        let l = lifecycle(Some("api"));
        assert_eq!(
            l.pending(),
            [Pending::Certificate, Pending::Config, Pending::OwnService]
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), l.started())
                .await
                .is_err(),
            "no certificate, no config: not started"
        );
        l.start_drain();
        assert_eq!(l.pending()[0], Pending::Draining);
        assert!(!*l.closing().borrow(), "still serving while callers learn");
        assert!(l.watcher().is_some());
        assert!(
            l.finish_drain(Duration::from_secs(1)).await,
            "no connection open"
        );
        assert!(*l.closing().borrow());
        assert!(l.watcher().is_none(), "nothing new after the drain");
    }

    #[test]
    fn a_client_only_proxy_does_not_wait_for_a_service() {
        let l = lifecycle(None);
        assert_eq!(l.pending(), [Pending::Certificate, Pending::Config]);
    }
}
