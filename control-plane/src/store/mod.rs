//! Persistent key/value store with a global revision. The registry keeps everything in memory
//! and writes through this trait, so other backends (etcd, Kubernetes) slot in behind it.

pub mod file;

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

/// One change in a write.
#[derive(Debug, Clone)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store file {path} is corrupt ({reason}); it was left untouched: restore it from a backup or move it away to start empty"
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
}

/// Key/value persistence. Writes are atomic per call: all ops land, at one new revision, or none.
pub trait Store: Send + Sync + 'static {
    /// Everything, at the current revision.
    fn load(&self) -> BoxFuture<'_, Result<Contents, StoreError>>;
    /// Applies `ops` atomically; returns the new revision.
    fn commit(&self, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>>;
}
