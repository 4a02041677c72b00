//! Persistent key/value store with a global revision. The registry keeps everything in memory
//! and writes through this trait. The embedded file store has one writer (this process); a
//! shared store (etcd) has several control-plane replicas writing, and each follows the others'
//! commits through [`Store::watch`].

pub mod etcd;
pub mod file;
pub mod kube;

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so `Store` can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything in the store at one revision.
#[derive(Debug, Default, Clone)]
pub struct Contents {
    pub revision: u64,
    /// (key, value, revision at which the key was last written)
    pub entries: Vec<(String, Vec<u8>, u64)>,
}

/// One commit, by any writer: its revision and what it changed.
#[derive(Debug, Clone)]
pub struct Change {
    pub revision: u64,
    pub ops: Vec<Op>,
}

/// Commits after a revision, in revision order.
pub type ChangeStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<Change, StoreError>> + Send>>;

/// One change in a write.
#[derive(Debug, Clone)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store {path} is corrupt ({reason}); it was left untouched: restore it from a backup or move it away to start empty"
    )]
    Corrupt { path: String, reason: String },
    #[error("store I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another writer committed since the caller's revision; it is the newest one.
    #[error("another writer committed revision {0} first")]
    Conflict(u64),
    /// The store no longer has the history a watch asked for: reload everything.
    #[error("store history compacted past revision {0}")]
    Compacted(u64),
}

/// Key/value persistence. Writes are atomic per call: all ops land, at one new revision, or none.
pub trait Store: Send + Sync + 'static {
    /// Everything, at the revision of the last commit.
    fn load(&self) -> BoxFuture<'_, Result<Contents, StoreError>>;
    /// Applies `ops` atomically if the last commit is still `base` (the revision the caller's
    /// view is at), so a write computed from a stale view never lands; returns the new
    /// revision, or [`StoreError::Conflict`].
    fn commit(&self, base: u64, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Whether other processes commit to this store too. The registry then takes every
    /// change, its own included, from [`Store::watch`], so all replicas apply them in one order.
    fn shared(&self) -> bool {
        false
    }
    /// The commits after revision `after`, as they happen (shared stores only).
    fn watch(&self, after: u64) -> BoxFuture<'_, Result<ChangeStream, StoreError>> {
        Box::pin(async move {
            Err(StoreError::Unavailable(format!(
                "this store has one writer; nothing to watch after revision {after}"
            )))
        })
    }
    /// Where the store is, for messages (`file:/var/lib/mesh`, `etcd://10.0.0.1:2379`).
    fn describe(&self) -> String;
}
