//! The shared store: etcd, for several control-plane replicas. Every key lives under one
//! prefix; every commit is one transaction that also rewrites `<prefix>meta/revision`, and
//! succeeds only if that key's last change is still the revision the writer's view is at
//! (optimistic concurrency, no lock). Replicas follow each other with one watch on the prefix
//! from their revision on: no polling, and every replica applies commits in etcd's order.

use super::{BoxFuture, Change, ChangeStream, Contents, Op, Store, StoreError};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, TxnOp, WatchOptions,
};
use std::time::Duration;

/// Key rewritten by every commit: its mod revision is the store's revision.
const META: &str = "meta/revision";
const DEFAULT_PREFIX: &str = "/mesh/";

pub struct EtcdStore {
    client: Client,
    /// Keys are `<prefix><registry key>`.
    prefix: String,
    /// `etcd://…` as given, for messages.
    url: String,
}

/// Where an `etcd://host:port[,host:port…][/prefix]` (or `etcd+https://…`) URL points.
#[derive(Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// `etcd+https://`: TLS to every member.
    pub tls: bool,
}

/// TLS to etcd: the CA that signed its serving certificates, and this replica's client
/// certificate and key (PEM files) for etcd's `--client-cert-auth`.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTls {
    fn options(&self, url: &str) -> Result<etcd_client::TlsOptions, StoreError> {
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                StoreError::Unavailable(format!("--store {url}: {flag} {}: {e}", p.display()))
            })
        };
        // etcd's certificates come from its own CA, never a public one: no system roots.
        let ca = self.ca.as_ref().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "--store {url}: give --etcd-ca, the CA that signed etcd's certificates"
            ))
        })?;
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("--etcd-ca", ca)?));
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                o = o.identity(etcd_client::Identity::from_pem(
                    read("--etcd-cert", c)?,
                    read("--etcd-key", k)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Unavailable(format!(
                    "--store {url}: --etcd-cert and --etcd-key go together"
                )));
            }
        }
        Ok(o)
    }

    fn given(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

impl EtcdUrl {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Unavailable(format!("--store {url:?}: {why}"));
        let (rest, tls) = match (
            url.strip_prefix("etcd://"),
            url.strip_prefix("etcd+https://"),
        ) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => {
                return Err(bad(
                    "expected etcd://host:port[,host:port...][/prefix] or etcd+https://…",
                ));
            }
        };
        let scheme = if tls { "https" } else { "http" };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.trim_matches('/').is_empty() => {
                (h, format!("/{}/", p.trim_matches('/')))
            }
            Some((h, _)) => (h, DEFAULT_PREFIX.to_string()),
            None => (rest, DEFAULT_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(bad("no etcd address"));
        }
        for e in &endpoints {
            e.parse::<http::Uri>()
                .map_err(|err| bad(&format!("{e}: {err}")))?;
        }
        Ok(Self {
            endpoints,
            prefix,
            tls,
        })
    }
}

impl EtcdStore {
    /// Connects to etcd (failing over between the endpoints). Each call is bounded in time,
    /// so an unreachable etcd gives a clear error rather than a hang.
    /// `tls` applies to `etcd+https://` only; given with `etcd://` it is refused, so a
    /// replica never talks plain HTTP while its operator believes it uses TLS.
    pub async fn connect(url: &str, tls: &EtcdTls) -> Result<Self, StoreError> {
        let u = EtcdUrl::parse(url)?;
        if tls.given() && !u.tls {
            return Err(StoreError::Unavailable(format!(
                "--store {url}: --etcd-ca/--etcd-cert/--etcd-key need an etcd+https:// URL"
            )));
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if u.tls {
            opts = opts.with_tls(tls.options(url)?);
        }
        let client = Client::connect(&u.endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd {url}: {e}")))?;
        Ok(Self {
            client,
            prefix: u.prefix,
            url: url.to_string(),
        })
    }

    /// A client for other etcd work of this replica (leader election).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        StoreError::Unavailable(format!("etcd {}: {e}", self.url))
    }

    fn meta(&self) -> String {
        format!("{}{META}", self.prefix)
    }
}

/// Registry key of an etcd key (None: outside the prefix, or the meta key).
fn registry_key<'a>(prefix: &str, key: &'a [u8]) -> Option<&'a str> {
    let k = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    (k != META).then_some(k)
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

impl Store for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Contents, StoreError>> {
        Box::pin(async move {
            let mut c = self.client.clone();
            let resp = c
                .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| self.err(e))?;
            let mut out = Contents::default();
            let meta = self.meta();
            for kv in resp.kvs() {
                if kv.key() == meta.as_bytes() {
                    out.revision = revision(kv.mod_revision());
                } else if let Some(k) = registry_key(&self.prefix, kv.key()) {
                    out.entries.push((
                        k.to_string(),
                        kv.value().to_vec(),
                        revision(kv.mod_revision()),
                    ));
                }
            }
            Ok(out)
        })
    }

    fn commit(&self, base: u64, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let meta = self.meta();
            let mut then: Vec<TxnOp> = ops
                .into_iter()
                .map(|op| match op {
                    Op::Put(k, v) => TxnOp::put(format!("{}{k}", self.prefix), v, None),
                    Op::Delete(k) => TxnOp::delete(format!("{}{k}", self.prefix), None),
                })
                .collect();
            then.push(TxnOp::put(meta.as_str(), base.to_string(), None));
            let base_rev = i64::try_from(base).unwrap_or(i64::MAX);
            let txn = etcd_client::Txn::new()
                .when([Compare::mod_revision(
                    meta.as_str(),
                    CompareOp::Equal,
                    base_rev,
                )])
                .and_then(then)
                .or_else([TxnOp::get(meta.as_str(), None)]);
            let mut c = self.client.clone();
            let resp = c.txn(txn).await.map_err(|e| self.err(e))?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, |h| revision(h.revision())));
            }
            let newest = resp
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => {
                        g.kvs().first().map(|kv| revision(kv.mod_revision()))
                    }
                    _ => None,
                })
                .unwrap_or(0);
            Err(StoreError::Conflict(newest))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn watch(&self, after: u64) -> BoxFuture<'_, Result<ChangeStream, StoreError>> {
        Box::pin(async move {
            let mut c = self.client.clone();
            let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
            let stream = c
                .watch(
                    self.prefix.as_str(),
                    Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                )
                .await
                .map_err(|e| self.err(e))?;
            let (prefix, url) = (self.prefix.clone(), self.url.clone());
            let changes = futures_util::stream::unfold(
                (stream, prefix, url, false),
                |(mut stream, prefix, url, done)| async move {
                    if done {
                        return None;
                    }
                    let item = match stream.message().await {
                        Ok(Some(resp)) if resp.compact_revision() > 0 => {
                            Err(StoreError::Compacted(revision(resp.compact_revision())))
                        }
                        Ok(Some(resp)) if resp.canceled() => Err(StoreError::Unavailable(format!(
                            "etcd {url}: watch canceled: {}",
                            resp.cancel_reason()
                        ))),
                        Ok(Some(resp)) => Ok(changes_of(&prefix, resp.events())),
                        Ok(None) => {
                            Err(StoreError::Unavailable(format!("etcd {url}: watch closed")))
                        }
                        Err(e) => Err(StoreError::Unavailable(format!("etcd {url}: {e}"))),
                    };
                    let done = item.is_err();
                    Some((item, (stream, prefix, url, done)))
                },
            );
            // One watch response may carry several commits: one item per commit.
            use futures_util::StreamExt;
            let flat = changes.flat_map(|r| {
                futures_util::stream::iter(match r {
                    Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            });
            Ok(Box::pin(flat) as ChangeStream)
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// Groups a watch response's events into commits (one transaction = one revision).
fn changes_of(prefix: &str, events: &[etcd_client::Event]) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    for ev in events {
        let Some(kv) = ev.kv() else { continue };
        let rev = revision(kv.mod_revision());
        if out.last().is_none_or(|c| c.revision != rev) {
            out.push(Change {
                revision: rev,
                ops: Vec::new(),
            });
        }
        let Some(k) = registry_key(prefix, kv.key()) else {
            continue;
        };
        let op = match ev.event_type() {
            EventType::Put => Op::Put(k.to_string(), kv.value().to_vec()),
            EventType::Delete => Op::Delete(k.to_string()),
        };
        if let Some(c) = out.last_mut() {
            c.ops.push(op);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = EtcdUrl::parse("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap();
        assert_eq!(
            u,
            EtcdUrl {
                endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
                prefix: "/mesh/".into(),
                tls: false,
            }
        );
        assert_eq!(
            EtcdUrl::parse("etcd+https://10.0.0.1:2379/p").unwrap(),
            EtcdUrl {
                endpoints: vec!["https://10.0.0.1:2379".into()],
                prefix: "/p/".into(),
                tls: true,
            }
        );
        assert_eq!(
            EtcdUrl::parse("etcd://127.0.0.1:2379/prod/mesh/")
                .unwrap()
                .prefix,
            "/prod/mesh/"
        );
        for bad in ["http://x:2379", "etcd://", "etcd:///p", "etcd://a b:1"] {
            assert!(EtcdUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_outside_the_prefix_and_the_meta_key_are_not_registry_keys() {
        assert_eq!(registry_key("/mesh/", b"/mesh/routes/a"), Some("routes/a"));
        assert_eq!(registry_key("/mesh/", b"/mesh/meta/revision"), None);
        assert_eq!(registry_key("/mesh/", b"/other/routes/a"), None);
    }
}
