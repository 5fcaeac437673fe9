//! Where a target keeps its replicas: a small object interface, so that the replica
//! store, its compactor, resync, replay, restore, scrub and inspect never touch files
//! themselves — and replicas can live elsewhere than in the site directory.
//!
//! Objects are named by keys of `/`-separated names (`vm1/segments/00000000000000000005.seg.enc`),
//! each name as `crate::names` allows plus the store's own suffixes: never empty,
//! never `.` or `..`, no NUL, no leading `-`. [`ReplicaBackend::put`] replaces an
//! object atomically and durably (a reader sees the old bytes or the new, and after a
//! crash one of them); [`ReplicaBackend::put_if_absent`] creates one only if it does
//! not exist. Locks and pins are how readers and the target compactor keep out of each
//! other's way across processes (see `pin.rs`).
//!
//! [`DirBackend`] is the first implementation: a directory (`SITE/replicas`) through
//! the [`Storage`] seam — real files in production, the in-memory storage with crash
//! and fault injection in tests.

use crate::error::{Error, Result};
use crate::storage::pool::Pooled;
use crate::storage::{
    is_not_found, read_all, write_atomic, write_new, OpenMode, Storage, StorageFile, StorageLock,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest object read whole (a segment of at most 1 GiB and its envelope).
pub const MAX_OBJECT: u64 = (1 << 30) + (1 << 20);

/// A held lock or pin; released when dropped.
pub trait Held: Send + Sync + fmt::Debug {}

/// See the module documentation.
pub trait ReplicaBackend: Send + Sync + fmt::Debug {
    /// The whole object, or None if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        Ok(self.get_into(key, &mut buf)?.then_some(buf))
    }
    /// The whole object into `buf` (reused: no allocation once it is big enough);
    /// false, and `buf` untouched, if it does not exist.
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<bool>;
    /// [`ReplicaBackend::get`] into a recycled buffer (`storage::pool`), for objects
    /// read whole and dropped soon after (segments): a directory reads it around the
    /// page cache, straight into memory the process has used before.
    fn get_pooled(&self, key: &str) -> Result<Option<Pooled>> {
        Ok(self.get(key)?.map(Pooled::from_vec))
    }
    /// The first `len` bytes of the object (fewer if it is shorter), or None if it
    /// does not exist.
    fn get_head(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.get(key)?.map(|mut b| {
            b.truncate(len);
            b
        }))
    }
    /// Create or replace `key`, atomically and durably.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Create `key` only if it does not exist; false (nothing written) if it does.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool>;
    /// Several puts, every one durable on return (and none half-written).
    fn put_batch(&self, items: &[(String, &[u8])]) -> Result<()> {
        for (k, v) in items {
            self.put(k, v)?;
        }
        Ok(())
    }
    /// Several puts of objects whose loss costs nothing (a cache: the hash pages):
    /// each replaced atomically — readers see the old bytes or the new — but not
    /// necessarily durably, so after a crash any of them may be old, missing or
    /// damaged, which their readers must tell.
    fn put_cache_batch(&self, items: &[(String, &[u8])]) -> Result<()> {
        self.put_batch(items)
    }
    /// The names directly under `prefix` (objects and deeper prefixes), sorted; none
    /// if there is nothing there.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn exists(&self, key: &str) -> Result<bool>;
    /// Remove objects (missing ones are fine); durable on return.
    fn delete(&self, keys: &[String]) -> Result<()>;
    /// Remove every object under `prefix` (a whole replica); durable on return.
    fn delete_prefix(&self, prefix: &str) -> Result<()>;
    /// An exclusive lock named `key`, held until the guard is dropped (waits for it).
    fn lock(&self, key: &str) -> Result<Box<dyn Held>>;
    /// Leave a pin under `prefix` holding `body`, live until the guard is dropped (or
    /// its holder dies).
    fn pin(&self, prefix: &str, body: &[u8]) -> Result<Box<dyn Held>>;
    /// The bodies of the live pins under `prefix`; pins of holders that died are
    /// removed.
    fn live_pins(&self, prefix: &str) -> Result<Vec<Vec<u8>>>;
    /// Bytes free for new objects (u64::MAX: no known limit).
    fn free_bytes(&self) -> u64;
    /// Where `key` lives, for messages (a file path, a URL).
    fn locate(&self, key: &str) -> PathBuf;
    /// Delete what `machine` keeps and no longer needs (an object store's superseded
    /// manifests and unnamed objects, after their grace period); how many went.
    fn collect(&self, _machine: &str) -> Result<u64> {
        Ok(0)
    }
    /// Remove what a creation or a removal cut short left of replicas (anything of a
    /// machine without its manifest); the machines it cleaned. Only while nothing
    /// else uses the store (a starting serve).
    fn remove_leftovers(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Check a key: `/`-separated names, none empty, `.` or `..`, no NUL or leading `-`.
pub fn check_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.split('/').any(|part| {
            part.is_empty()
                || part == "."
                || part == ".."
                || part.starts_with('-')
                || part.bytes().any(|b| b == 0 || b == b'\\')
        });
    if bad {
        return Err(Error::InvalidInput(format!(
            "{key:?} is not a valid replica object name"
        )));
    }
    Ok(())
}

/// Replicas in a directory, through the storage seam.
#[derive(Clone)]
pub struct DirBackend {
    storage: Arc<dyn Storage>,
    root: PathBuf,
}

impl fmt::Debug for DirBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirBackend({})", self.root.display())
    }
}

impl DirBackend {
    /// Object `key` opened for reading, and its length (checked against the most
    /// any replica object can be); None if it does not exist.
    fn open_object(&self, key: &str) -> Result<Option<(Arc<dyn StorageFile>, u64)>> {
        let path = self.path(key)?;
        let file = match self.storage.open(&path, OpenMode::ReadOnly) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.len()?;
        if len > MAX_OBJECT {
            return Err(Error::corruption(
                &path,
                0,
                format!("object is {len} bytes, more than any replica object can be"),
            ));
        }
        Ok(Some((file, len)))
    }

    pub fn new(storage: Arc<dyn Storage>, root: impl Into<PathBuf>) -> Self {
        DirBackend {
            storage,
            root: root.into(),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Run `write` with `path`'s directory present; once more if a delete that
    /// emptied the directory removed it in between.
    fn with_parent<T>(&self, path: &Path, write: impl Fn() -> Result<T>) -> Result<T> {
        self.ensure_parent(path)?;
        match write() {
            Err(e) if is_not_found(&e) => {
                self.ensure_parent(path)?;
                write()
            }
            other => other,
        }
    }

    /// An object store has no empty prefixes: remove directories emptied by deletes,
    /// up to (not including) the root.
    fn remove_if_empty(&self, dir: &Path) -> Result<()> {
        let mut d = dir.to_path_buf();
        while d != self.root && d.starts_with(&self.root) {
            let empty =
                self.storage.list_dir(&d)?.is_empty() && self.storage.list_dirs(&d)?.is_empty();
            if !empty {
                break;
            }
            // A file may have come meanwhile (a put racing this delete): then the
            // directory stays, as it should.
            if self.storage.remove_dir(&d).is_err() {
                break;
            }
            let Some(up) = d.parent() else { break };
            self.storage.sync_dir(up)?;
            d = up.to_path_buf();
        }
        Ok(())
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        match path.parent() {
            Some(dir) if !self.storage.exists(dir) => {
                self.storage.create_dir_all(dir)?;
                // The new directories' names must be durable before the file's.
                let mut d = dir;
                while let Some(up) = d.parent() {
                    self.storage.sync_dir(up)?;
                    if up == self.root || !up.starts_with(&self.root) {
                        break;
                    }
                    d = up;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug)]
struct LockGuard(#[allow(dead_code)] Box<dyn StorageLock>);
impl Held for LockGuard {}

/// A pin: its file, locked while it lives, removed when it goes.
#[derive(Debug)]
struct PinGuard {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    _lock: Box<dyn StorageLock>,
}

impl Held for PinGuard {}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = self.storage.remove_file(&self.path);
    }
}

static PIN_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ReplicaBackend for DirBackend {
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<bool> {
        let Some((file, len)) = self.open_object(key)? else {
            return Ok(false);
        };
        buf.clear();
        buf.resize(len as usize, 0);
        let n = file.read_at(buf, 0)?;
        buf.truncate(n);
        Ok(true)
    }

    fn get_head(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let file = match self.storage.open(&path, OpenMode::ReadOnly) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        Ok(Some(buf))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match self.storage.open(&path, OpenMode::ReadOnly) {
            Ok(f) => read_all(f.as_ref(), MAX_OBJECT).map(Some),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get_pooled(&self, key: &str) -> Result<Option<Pooled>> {
        let Some((file, len)) = self.open_object(key)? else {
            return Ok(None);
        };
        let mut out = Pooled::with_room(len as usize);
        let n = file.read_direct(out.room(), 0)?;
        out.set_len(n.min(len as usize));
        Ok(Some(out))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        self.with_parent(&path, || write_atomic(self.storage.as_ref(), &path, bytes))
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        self.with_parent(&path, || write_new(self.storage.as_ref(), &path, bytes))
    }

    /// Every object to its temporary name first, from several threads, each file's
    /// writeback started as it is written; then all fsynced (several at once, so the
    /// device gets the batch's writes together and its cache flushes overlap, instead
    /// of one write-then-flush after another), then renamed, then each directory
    /// synced once; 128 files at a time. Measured with `tools/experiments/chunk-files.py`
    /// (`sfr` against `files`): a 16 MiB batch of 64 files 10–15% quicker.
    fn put_batch(&self, items: &[(String, &[u8])]) -> Result<()> {
        const THREADS: usize = 8;
        // Files written before they are synced, each held open till then: a merge's
        // batch may be a thousand chunks, and a process has file descriptors to spare
        // but not that many (a soft limit of 1024 is common). An initial-copy batch
        // (16 MiB of data: 64 chunks, a few more where its runs are not aligned) is
        // one group.
        const GROUP: usize = 128;
        let mut paths = Vec::with_capacity(items.len());
        for (k, _) in items {
            let p = self.path(k)?;
            self.ensure_parent(&p)?;
            paths.push(p);
        }
        let jobs: Vec<(&PathBuf, &[u8])> =
            paths.iter().zip(items.iter().map(|(_, v)| *v)).collect();
        let storage = self.storage.as_ref();
        let mut temps: Vec<PathBuf> = Vec::with_capacity(jobs.len());
        for group in jobs.chunks(GROUP) {
            let written = crate::parallel::map_on(THREADS, group, |(p, v)| {
                crate::storage::write_temp_unsynced(storage, p, v)
            })?;
            crate::parallel::map_on(THREADS, &written, |(_, file)| file.sync_data())?;
            temps.extend(written.into_iter().map(|(tmp, _)| tmp));
        }
        let mut dirs = std::collections::BTreeSet::new();
        for (p, tmp) in paths.iter().zip(&temps) {
            self.storage.rename(tmp, p)?;
            if let Some(d) = p.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
        for d in dirs {
            self.storage.sync_dir(&d)?;
        }
        Ok(())
    }

    /// No fsync: a file system's own ordering decides what a crash leaves.
    fn put_cache_batch(&self, items: &[(String, &[u8])]) -> Result<()> {
        for (k, v) in items {
            let path = self.path(k)?;
            self.with_parent(&path, || {
                crate::storage::write_replace(self.storage.as_ref(), &path, v)
            })?;
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix)?
        };
        if !self.storage.exists(&dir) {
            return Ok(Vec::new());
        }
        let mut names = self.storage.list_dir(&dir)?;
        names.extend(self.storage.list_dirs(&dir)?);
        names.sort();
        Ok(names)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.storage.exists(&self.path(key)?))
    }

    fn remove_leftovers(&self) -> Result<Vec<String>> {
        crate::storage::remove_uncommitted_dirs(
            self.storage.as_ref(),
            &self.root,
            crate::replica::store::MANIFEST,
        )
    }

    /// A whole replica: its manifest first, durably (it vanishes at once for
    /// readers, and a crash leaves no replica with parts missing), then the rest.
    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let dir = self.path(prefix)?;
        if !self.storage.exists(&dir) {
            return Ok(());
        }
        crate::storage::remove_committed_dir(
            self.storage.as_ref(),
            &dir,
            crate::replica::store::MANIFEST,
        )
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for k in keys {
            let p = self.path(k)?;
            match self.storage.remove_file(&p) {
                Ok(()) => {
                    if let Some(d) = p.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        for d in dirs {
            self.storage.sync_dir(&d)?;
            self.remove_if_empty(&d)?;
        }
        Ok(())
    }

    fn lock(&self, key: &str) -> Result<Box<dyn Held>> {
        let path = self.path(key)?;
        self.ensure_parent(&path)?;
        let held = self
            .storage
            .lock(&path, true)?
            .ok_or_else(|| Error::Busy(format!("{} is locked", path.display())))?;
        Ok(Box::new(LockGuard(held)))
    }

    fn pin(&self, prefix: &str, body: &[u8]) -> Result<Box<dyn Held>> {
        let dir = self.path(prefix)?;
        if !self.storage.exists(&dir) {
            self.storage.create_dir_all(&dir)?;
        }
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            crate::format::now_ns(),
            PIN_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let tmp = dir.join(format!(".{name}"));
        let path = dir.join(&name);
        let f = self.storage.open(&tmp, OpenMode::CreateNew)?;
        let lock = self
            .storage
            .lock(&tmp, false)?
            .ok_or_else(|| Error::Busy(format!("{} is locked", tmp.display())))?;
        f.write_at(&[body], 0)?;
        drop(f);
        // Locked before it has its name: the compactor never sees it unlocked.
        self.storage.rename(&tmp, &path)?;
        Ok(Box::new(PinGuard {
            storage: self.storage.clone(),
            path,
            _lock: lock,
        }))
    }

    fn live_pins(&self, prefix: &str) -> Result<Vec<Vec<u8>>> {
        let dir = self.path(prefix)?;
        if !self.storage.exists(&dir) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for name in self.storage.list_dir(&dir)? {
            let path = dir.join(&name);
            // A pin being made (its holder has it locked) or left by one that died.
            let being_made = name.starts_with('.');
            match self.storage.lock(&path, false)? {
                Some(free) => {
                    // Nobody holds it: its reader is gone.
                    drop(free);
                    let _ = self.storage.remove_file(&path);
                }
                None if being_made => {}
                None => match self.storage.open(&path, OpenMode::ReadOnly) {
                    Ok(f) => out.push(read_all(f.as_ref(), 4096)?),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(e),
                },
            }
        }
        Ok(out)
    }

    fn free_bytes(&self) -> u64 {
        self.storage.free_bytes(&self.root).unwrap_or(u64::MAX)
    }

    fn locate(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::storage::{CrashMode, MemStorage};

    #[test]
    fn hostile_keys_are_refused() {
        for bad in [
            "", "/a", "a/", "a//b", "../x", "a/../b", "./a", "-x", "a\0b", "a\\b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        check_key("vm1/segments/00000000000000000001.seg.enc").unwrap();
    }

    #[test]
    fn put_get_list_delete_and_put_if_absent() {
        let mem = MemStorage::new();
        let b = DirBackend::new(Arc::new(mem.clone()), "/r");
        assert_eq!(b.get("vm1/x").unwrap(), None);
        b.put("vm1/x", b"one").unwrap();
        b.put("vm1/d/y", b"two").unwrap();
        assert_eq!(b.get("vm1/x").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(
            b.list("vm1").unwrap(),
            vec!["d".to_string(), "x".to_string()]
        );
        assert!(!b.put_if_absent("vm1/x", b"again").unwrap());
        assert_eq!(b.get("vm1/x").unwrap().as_deref(), Some(&b"one"[..]));
        assert!(b.put_if_absent("vm1/z", b"new").unwrap());
        b.delete(&["vm1/x".into(), "vm1/never".into()]).unwrap();
        assert_eq!(b.get("vm1/x").unwrap(), None);
        // Durable: a crash that drops every unsynced write keeps them.
        mem.crash(CrashMode::DropAll);
        assert_eq!(b.get("vm1/d/y").unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(b.get("vm1/z").unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn a_batch_is_durable_on_return_and_leaves_no_temporaries() {
        let mem = MemStorage::new();
        let b = DirBackend::new(Arc::new(mem.clone()), "/r");
        b.put("vm1/parent/c3", b"old").unwrap();
        // More than one group of files written before they are synced.
        let bodies: Vec<(String, Vec<u8>)> = (0..200u8)
            .map(|i| (format!("vm1/parent/c{i}"), vec![i; 300 + usize::from(i)]))
            .collect();
        let items: Vec<(String, &[u8])> = bodies
            .iter()
            .map(|(k, v)| (k.clone(), v.as_slice()))
            .collect();
        b.put_batch(&items).unwrap();
        // A crash that drops every unsynced write and name keeps all of them, whole.
        mem.crash(CrashMode::DropAll);
        for (k, v) in &bodies {
            assert_eq!(b.get(k).unwrap().as_ref(), Some(v), "{k}");
        }
        let names = b.list("vm1/parent").unwrap();
        assert_eq!(names.len(), 200, "{names:?}");
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn pins_live_while_held_and_go_when_dropped() {
        let b = DirBackend::new(Arc::new(MemStorage::new()), "/r");
        let p1 = b.pin("vm1/pins", b"first").unwrap();
        let p2 = b.pin("vm1/pins", b"second").unwrap();
        let mut live = b.live_pins("vm1/pins").unwrap();
        live.sort();
        assert_eq!(live, vec![b"first".to_vec(), b"second".to_vec()]);
        drop(p1);
        assert_eq!(b.live_pins("vm1/pins").unwrap(), vec![b"second".to_vec()]);
        drop(p2);
        assert!(b.live_pins("vm1/pins").unwrap().is_empty());
        let l = b.lock("vm1/merge.lock").unwrap();
        drop(l);
        b.lock("vm1/merge.lock").unwrap();
    }
}
