//! The embedded default store: one JSON document in the data directory, rewritten atomically
//! (write temp, fsync, rename, fsync dir) on every commit. Small and dependency-free; the mesh's
//! state is kilobytes to a few megabytes.

use super::{BoxFuture, Contents, Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::sync::Mutex;

const FILE_NAME: &str = "state.json";

#[derive(Serialize, Deserialize, Default, Clone)]
pub(crate) struct Document {
    pub(crate) revision: u64,
    pub(crate) entries: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Entry {
    /// The value is itself JSON; kept as a string so the file stays readable.
    pub(crate) value: String,
    pub(crate) revision: u64,
}

impl Document {
    pub(crate) fn contents(&self) -> Contents {
        Contents {
            revision: self.revision,
            entries: self
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), e.value.clone().into_bytes(), e.revision))
                .collect(),
        }
    }

    /// The document after one commit of `ops`, at the next revision.
    pub(crate) fn applied(&self, ops: Vec<Op>) -> Result<Self, std::string::FromUtf8Error> {
        let mut next = self.clone();
        next.revision += 1;
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    let entry = Entry {
                        value: String::from_utf8(v)?,
                        revision: next.revision,
                    };
                    next.entries.insert(k, entry);
                }
                Op::Delete(k) => {
                    next.entries.remove(&k);
                }
            }
        }
        Ok(next)
    }

    /// What changed from `self` to `next`, as one commit.
    pub(crate) fn diff(&self, next: &Self) -> Vec<Op> {
        let mut ops: Vec<Op> = next
            .entries
            .iter()
            .filter(|(k, e)| self.entries.get(*k).is_none_or(|old| old.value != e.value))
            .map(|(k, e)| Op::Put(k.clone(), e.value.clone().into_bytes()))
            .collect();
        ops.extend(
            self.entries
                .keys()
                .filter(|k| !next.entries.contains_key(*k))
                .map(|k| Op::Delete(k.clone())),
        );
        ops
    }
}

/// File-backed store. One writer at a time; the document is cached in memory.
pub struct FileStore {
    path: PathBuf,
    doc: Mutex<Document>,
}

impl FileStore {
    /// Opens `<dir>/state.json`, creating an empty store if absent. A file that exists but does
    /// not parse is an error: it is never replaced silently.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let doc = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<Document>(&bytes).map_err(|e| StoreError::Corrupt {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document::default(),
            Err(e) => return Err(io(e)),
        };
        Ok(Self {
            path,
            doc: Mutex::new(doc),
        })
    }

    fn persist(&self, doc: &Document) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(doc).map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(&self.path, &bytes, 0o600).map_err(io)
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Store for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Contents, StoreError>> {
        Box::pin(async move { Ok(self.doc.lock().await.contents()) })
    }

    fn commit(&self, base: u64, ops: Vec<Op>) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut doc = self.doc.lock().await;
            if doc.revision != base {
                return Err(StoreError::Conflict(doc.revision));
            }
            let next = doc.applied(ops).map_err(|e| StoreError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
            let rev = next.revision;
            // Persist before publishing in memory: a failed write changes nothing.
            let to_write = next.clone();
            let this = self;
            tokio::task::block_in_place(|| this.persist(&to_write))?;
            *doc = next;
            Ok(rev)
        })
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_documents_diff_replays_to_the_next_document() {
        let d0 = Document::default()
            .applied(vec![
                Op::Put("a".into(), b"1".to_vec()),
                Op::Put("b".into(), b"2".to_vec()),
            ])
            .unwrap();
        let d1 = d0
            .applied(vec![
                Op::Put("b".into(), b"3".to_vec()),
                Op::Delete("a".into()),
                Op::Put("c".into(), b"4".to_vec()),
            ])
            .unwrap();
        assert_eq!((d0.revision, d1.revision), (1, 2));
        let ops = d0.diff(&d1);
        // Replaying the difference on the old document gives the new one's entries.
        let replayed = d0.applied(ops.clone()).unwrap();
        let values = |d: &Document| {
            d.entries
                .iter()
                .map(|(k, e)| (k.clone(), e.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&replayed), values(&d1));
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(d1.diff(&d1).is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn survives_reopen_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let r1 = s
            .commit(0, vec![Op::Put("a".into(), b"\"1\"".to_vec())])
            .await
            .unwrap();
        assert!(matches!(
            s.commit(0, vec![Op::Delete("a".into())]).await,
            Err(StoreError::Conflict(1))
        ));
        let r2 = s
            .commit(
                1,
                vec![
                    Op::Put("b".into(), b"\"2\"".to_vec()),
                    Op::Delete("a".into()),
                ],
            )
            .await
            .unwrap();
        assert_eq!((r1, r2), (1, 2));
        drop(s);
        let s = FileStore::open(dir.path()).unwrap();
        let c = s.load().await.unwrap();
        assert_eq!(c.revision, 2);
        assert_eq!(c.entries, vec![("b".to_string(), b"\"2\"".to_vec(), 2)]);

        std::fs::write(dir.path().join(FILE_NAME), b"{ not json").unwrap();
        let err = FileStore::open(dir.path())
            .err()
            .expect("corrupt file must not open");
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The corrupt file is still there, untouched.
        assert_eq!(
            std::fs::read(dir.path().join(FILE_NAME)).unwrap(),
            b"{ not json"
        );
    }
}
