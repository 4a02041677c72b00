//! `meshctl tap`: the control plane relays proxies' tap events to the admin clients tapping a
//! service. Which services are tapped is a `watch` that every proxy's telemetry stream follows
//! (proxies only send events while someone listens); events fan out on a `broadcast`, so a slow
//! tap client misses events instead of holding memory.

use mesh_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Events buffered per tap client before it starts missing some.
pub const TAP_BUFFER: usize = 4096;

pub struct TapHub {
    events: broadcast::Sender<Arc<pb::TapEvent>>,
    /// Tapped service → number of open taps.
    taps: watch::Sender<BTreeMap<String, usize>>,
}

impl Default for TapHub {
    fn default() -> Self {
        Self {
            events: broadcast::channel(TAP_BUFFER).0,
            taps: watch::channel(BTreeMap::new()).0,
        }
    }
}

/// Keeps a service tapped while it lives.
pub struct TapGuard {
    hub: Arc<TapHub>,
    service: String,
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        self.hub.taps.send_modify(|m| {
            if let Some(n) = m.get_mut(&self.service) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.service);
                }
            }
        });
    }
}

impl TapHub {
    /// Starts tapping `service`: proxies are told, and events arrive on the receiver.
    pub fn open(
        self: &Arc<Self>,
        service: &str,
    ) -> (TapGuard, broadcast::Receiver<Arc<pb::TapEvent>>) {
        let rx = self.events.subscribe();
        self.taps
            .send_modify(|m| *m.entry(service.to_string()).or_default() += 1);
        (
            TapGuard {
                hub: self.clone(),
                service: service.to_string(),
            },
            rx,
        )
    }

    /// The tapped services, for proxies' telemetry streams.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<String, usize>> {
        self.taps.subscribe()
    }

    /// Hands a proxy's event to the tap clients (nobody listening: dropped).
    pub fn publish(&self, e: pb::TapEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Arc::new(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taps_are_counted_and_events_reach_listeners() {
        let hub = Arc::new(TapHub::default());
        let w = hub.watch();
        let (g1, mut rx) = hub.open("backend");
        let (g2, _rx2) = hub.open("backend");
        assert_eq!(w.borrow().get("backend"), Some(&2));
        hub.publish(pb::TapEvent {
            dst_service: "backend".into(),
            ..Default::default()
        });
        assert_eq!(
            rx.recv().await.map(|e| e.dst_service.clone()).ok(),
            Some("backend".into())
        );
        drop(g1);
        assert_eq!(w.borrow().get("backend"), Some(&1));
        drop(g2);
        assert!(w.borrow().is_empty());
    }
}
