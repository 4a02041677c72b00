//! The shared store on the Kubernetes API: the whole state is one ConfigMap (`mesh-state` in
//! the control plane's namespace, key `state.json`, the same document as the file store), so
//! every replica writes through the API server and nothing else is needed in the cluster. A
//! commit replaces the ConfigMap with the resourceVersion it read, so a write computed from a
//! stale state never lands (409 → conflict, computed again); every replica follows the object
//! with a watch and applies what changed between two versions as one commit.
//!
//! Limit: a ConfigMap holds at most 1 MiB, which is a few thousand endpoints; beyond that,
//! use etcd (`--store etcd://…`).

use super::file::Document;
use super::{BoxFuture, Change, ChangeStream, Contents, Op, Store, StoreError};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};

const KEY: &str = "state.json";
pub const DEFAULT_NAME: &str = "mesh-state";

pub struct KubeStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl KubeStore {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("{}: {e}", self.describe()))
    }

    /// The document a ConfigMap holds (empty when it has none yet).
    fn document(&self, cm: &ConfigMap) -> Result<Document, StoreError> {
        match cm.data.as_ref().and_then(|d| d.get(KEY)) {
            None => Ok(Document::default()),
            Some(text) => serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
                path: self.describe(),
                reason: e.to_string(),
            }),
        }
    }

    async fn read(&self) -> Result<Option<(ConfigMap, Document)>, StoreError> {
        match self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?
        {
            None => Ok(None),
            Some(cm) => {
                let doc = self.document(&cm)?;
                Ok(Some((cm, doc)))
            }
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Store for KubeStore {
    fn load(&self) -> BoxFuture<'_, Result<Contents, StoreError>> {
        Box::pin(async move {
            Ok(self
                .read()
                .await?
                .map(|(_, d)| d.contents())
                .unwrap_or_default())
        })
    }

    fn commit(&self, base: u64, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let current = self.read().await?;
            let doc = current.as_ref().map(|(_, d)| d.clone()).unwrap_or_default();
            if doc.revision != base {
                return Err(StoreError::Conflict(doc.revision));
            }
            let next = doc.applied(ops).map_err(|e| self.err(e))?;
            let text = serde_json::to_string(&next).map_err(|e| self.err(e))?;
            let data = std::collections::BTreeMap::from([(KEY.to_string(), text)]);
            let written = match current {
                // The resourceVersion read above makes the replace a compare-and-swap.
                Some((mut cm, _)) => {
                    cm.data = Some(data);
                    self.api
                        .replace(&self.name, &PostParams::default(), &cm)
                        .await
                }
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            namespace: Some(self.namespace.clone()),
                            ..Default::default()
                        },
                        data: Some(data),
                        ..Default::default()
                    };
                    self.api.create(&PostParams::default(), &cm).await
                }
            };
            match written {
                Ok(_) => Ok(next.revision),
                // Someone else wrote first: report the newest revision.
                Err(e) if is_conflict(&e) => {
                    let newest = self
                        .read()
                        .await?
                        .map_or(base + 1, |(_, d)| d.revision.max(base + 1));
                    Err(StoreError::Conflict(newest))
                }
                Err(e) => Err(self.err(e)),
            }
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn watch(&self, after: u64) -> BoxFuture<'_, Result<ChangeStream, StoreError>> {
        Box::pin(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
            let name = self.name.clone();
            let describe = self.describe();
            let events = watcher(self.api.clone(), cfg);
            // The document as last applied: `after`'s is unknown until the first event shows
            // the object; if it is already past `after`, the registry must reload.
            let mut last: Option<Document> = None;
            let changes = events.filter_map(move |ev| {
                let item = match ev {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))
                        if cm.metadata.name.as_deref() == Some(name.as_str()) =>
                    {
                        let doc = match cm.data.as_ref().and_then(|d| d.get(KEY)) {
                            None => Document::default(),
                            Some(t) => match serde_json::from_str::<Document>(t) {
                                Ok(d) => d,
                                Err(e) => {
                                    return std::future::ready(Some(Err(StoreError::Corrupt {
                                        path: describe.clone(),
                                        reason: e.to_string(),
                                    })));
                                }
                            },
                        };
                        match &last {
                            None if doc.revision > after => Some(Err(StoreError::Compacted(after))),
                            None => {
                                last = Some(doc);
                                None
                            }
                            Some(prev) if doc.revision > prev.revision => {
                                let change = Change {
                                    revision: doc.revision,
                                    ops: prev.diff(&doc),
                                };
                                last = Some(doc);
                                Some(Ok(change))
                            }
                            Some(_) => None,
                        }
                    }
                    Ok(watcher::Event::Delete(_)) => Some(Err(StoreError::Unavailable(format!(
                        "{describe}: the state ConfigMap was deleted"
                    )))),
                    Ok(_) => None,
                    Err(e) => Some(Err(StoreError::Unavailable(format!("{describe}: {e}")))),
                };
                std::future::ready(item)
            });
            // The registry reconnects after an error: end the stream at the first one.
            let mut failed = false;
            let changes = changes.take_while(move |item| {
                let go = !failed;
                failed |= item.is_err();
                std::future::ready(go)
            });
            Ok(Box::pin(changes) as ChangeStream)
        })
    }

    fn describe(&self) -> String {
        format!("kubernetes:configmap/{}/{}", self.namespace, self.name)
    }
}
