//! Live tap: while `meshctl tap <service>` runs, the control plane tells every proxy (on the
//! telemetry stream) which services are tapped, and proxies send each finished request of those
//! services back on the same stream. Off, it costs a request one atomic load; on, events go
//! through a bounded queue (full: dropped and counted), never blocking a request.

use super::Detail;
use super::metrics::{Outcome, metrics};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use tokio::sync::mpsc;

/// Events waiting for the reporter; past this they are dropped.
pub const QUEUE_EVENTS: usize = 4096;

pub type TapEntry = (Box<Detail>, Outcome);

pub struct Tap {
    active: AtomicBool,
    services: ArcSwap<Vec<Arc<str>>>,
    tx: mpsc::Sender<TapEntry>,
    rx: Mutex<Option<mpsc::Receiver<TapEntry>>>,
}

static TAP: LazyLock<Tap> = LazyLock::new(|| {
    let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
    Tap {
        active: AtomicBool::new(false),
        services: ArcSwap::from_pointee(Vec::new()),
        tx,
        rx: Mutex::new(Some(rx)),
    }
});

pub fn tap() -> &'static Tap {
    &TAP
}

impl Tap {
    /// True while any service is tapped (requests then carry the detail an event needs).
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether requests of `service` are tapped now.
    pub fn wants(&self, service: &str) -> bool {
        self.active() && self.services.load().iter().any(|s| &**s == service)
    }

    /// The tapped services, as the control plane last said (empty: tap off).
    pub fn set(&self, services: Vec<Arc<str>>) {
        self.active.store(!services.is_empty(), Ordering::Relaxed);
        self.services.store(Arc::new(services));
    }

    /// The tapped services (for `/config_dump`).
    pub fn services(&self) -> Vec<String> {
        self.services.load().iter().map(|s| s.to_string()).collect()
    }

    pub fn send(&self, e: TapEntry) {
        if self.tx.try_send(e).is_err() {
            metrics().tap_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The queue's receiving end (the telemetry reporter takes it once).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<TapEntry>> {
        self.rx.lock().ok()?.take()
    }
}
