//! [`ObjectBackend`]: the replica store's keys in an object store.
//!
//! Per machine `<m>` (below the store's prefix):
//!
//! ```text
//! <m>/m/<seq:020>           manifest `seq`: the machine's whole namespace; created with
//!                           If-None-Match: * — the commit point
//! <m>/d/<rel>~<writer>-<n>  a data object: written once, never replaced, never renamed
//! ```
//!
//! Manifest object, byte by byte: the metadata envelope (`format::meta`, kind
//! [`MANIFEST_KIND`], version 1: magic, version, kind, flags, body length, CRC-32C),
//! whose body is an LZ4 block with its uncompressed length prepended (u32 LE), which
//! holds the postcard encoding of [`Manifest`].
//!
//! A key's value is either inline in the manifest (at most [`INLINE_MAX`] bytes:
//! marks, watermarks, small metadata) or a data object the manifest names. A put
//! writes the data object, then commits manifest `seq + 1`; `put_batch` commits once
//! for all its objects; a delete commits a manifest without the keys. The object a
//! key no longer names goes on the manifest's `dropped` list with the time, and is
//! deleted [`ObjectBackend::collect`] a grace period later; objects no manifest ever
//! named (a crash between a data PUT and its manifest, a fenced writer's) are deleted
//! once older than the grace period.
//!
//! Fencing: a commit that finds its number taken means another process writes the
//! machine. The commit fails, and so does every later one of this process for that
//! machine (`Error::Store`, Critical, "written by another receiver"): its objects are
//! never named, its writes never show. So does a first commit after this process saw
//! another writer's manifest appear. A writer whose last look at the chain is older
//! than half the grace period lists the manifests before committing: collected old
//! manifests can then never open a hole a stale writer could commit into.
//!
//! Locks and pins (readers on this host, the target compactor) stay in a local
//! directory: they are about this host's processes.

use super::{ObjectInfo, ObjectStore};
use crate::error::{Error, Result};
use crate::format::meta;
use crate::replica::backend::{check_key, DirBackend, Held, ReplicaBackend, MAX_OBJECT};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MANIFEST_KIND: u16 = meta::KIND_OBJECT_MANIFEST;
/// Values up to this size ride inline in the manifest.
pub const INLINE_MAX: usize = 4096;
/// A process that has not written a machine reloads its manifest when the one it
/// holds is older than this.
const READ_TTL: Duration = Duration::from_secs(1);
/// Largest uncompressed manifest accepted.
const MAX_MANIFEST: usize = 256 << 20;
/// Data objects PUT at once by a batch.
const PUT_THREADS: usize = 8;

/// A machine's namespace at one commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub seq: u64,
    /// The writing process (random per backend instance).
    pub writer: u64,
    /// When it was written (ns since the epoch, the writer's clock).
    pub at_ns: u64,
    /// Relative key → value.
    pub entries: BTreeMap<String, Entry>,
    /// Data objects no longer named, and since when (ns): deleted a grace period on.
    pub dropped: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `name` is relative to the machine (`d/<rel>~<writer>-<n>`).
    Object {
        name: String,
        len: u64,
    },
}

impl Manifest {
    fn set(&mut self, rel: &str, e: Entry, now: u64) {
        if let Some(Entry::Object { name, .. }) = self.entries.insert(rel.to_string(), e) {
            self.dropped.push((name, now));
        }
    }

    fn remove(&mut self, rel: &str, now: u64) -> bool {
        match self.entries.remove(rel) {
            Some(Entry::Object { name, .. }) => {
                self.dropped.push((name, now));
                true
            }
            Some(Entry::Inline(_)) => true,
            None => false,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let raw = crate::replica::store::postcard_body(self)?;
        let body = lz4_flex::compress_prepend_size(&raw);
        if body.len() > meta::MAX_META_BODY as usize {
            return Err(Error::InvalidInput(format!(
                "a replica manifest of {} entries is {} bytes compressed, more than {}: \
                 the machine's disks are too large for an object-store replica in this \
                 version",
                self.entries.len(),
                body.len(),
                meta::MAX_META_BODY
            )));
        }
        Ok(meta::encode(MANIFEST_KIND, &body))
    }

    pub fn decode(b: &[u8], at: &str) -> Result<Manifest> {
        Self::decode_file(b).map_err(|e| Error::corruption(PathBuf::from(at), e.offset, e.what))
    }

    /// [`Self::decode`] saying only where and what is wrong (`replog inspect` of a
    /// manifest object saved from the store).
    pub fn decode_file(b: &[u8]) -> std::result::Result<Manifest, crate::format::DecodeError> {
        use crate::format::DecodeError;
        let (_, body) = meta::decode(MANIFEST_KIND, b)?;
        let at_body = meta::META_HEADER_LEN as u64;
        let raw = crate::format::lz4_unpack(body, MAX_MANIFEST)
            .map_err(|e| DecodeError::new(at_body, format!("manifest body: {e}")))?;
        meta::body_exact(&raw).ok_or_else(|| DecodeError::new(at_body, "manifest does not decode"))
    }
}

/// What this process knows of one machine.
#[derive(Debug)]
struct Machine {
    base: Arc<Manifest>,
    loaded_at: Instant,
    /// This process committed a manifest of it.
    wrote: bool,
    /// A reload found a manifest of another writer after this process's first look.
    foreign: bool,
    fenced: Option<String>,
    /// When the chain was last seen to end at `base` (a commit, a listing).
    verified_at: Instant,
    /// Data objects PUT and not yet named (collection leaves them).
    pending: HashSet<String>,
}

/// See the module documentation.
pub struct ObjectBackend {
    objects: Arc<dyn ObjectStore>,
    local: DirBackend,
    writer: u64,
    counter: AtomicU64,
    grace: Duration,
    unfenced: bool,
    /// Create-if-absent checked (Some(true): honoured).
    probed: Mutex<Option<bool>>,
    machines: Mutex<HashMap<String, Arc<Mutex<Machine>>>>,
    /// Added to the wall clock (tests move time on).
    clock_offset_ns: AtomicU64,
}

impl fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ObjectBackend({:?}, writer {:016x})",
            self.objects, self.writer
        )
    }
}

fn manifest_key(m: &str, seq: u64) -> String {
    format!("{m}/m/{seq:020}")
}

/// `<machine>/<rel>` → (machine, rel); rel may be empty for the machine itself.
/// The number of the manifest stored under `key` (`<m>/m/<seq>`).
fn manifest_seq(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

fn split(key: &str) -> Result<(&str, &str)> {
    check_key(key)?;
    Ok(key.split_once('/').unwrap_or((key, "")))
}

/// Check a store as a writer needs it: reachable, credentials and bucket good, and
/// create-if-absent honoured (a probe object created twice; the second must be
/// refused) unless `unfenced`. Whether it is honoured.
pub fn probe(objects: &dyn ObjectStore, unfenced: bool) -> Result<bool> {
    objects.check_bucket()?;
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    let key = format!(".probe-{:016x}", u64::from_le_bytes(b));
    let first = objects.put_if_absent(&key, b"probe 1")?;
    let second = objects.put_if_absent(&key, b"probe 2")?;
    objects.delete(&[key])?;
    let honoured = first && !second;
    if !honoured && !unfenced {
        return Err(Error::Store {
            store: objects.locate(""),
            what: "the store ignores If-None-Match on PUT (create-if-absent), so a stale \
                   receiver could not be fenced and could overwrite a replica's manifest; \
                   to use it anyway, with one receiver per replica at any time, give \
                   `replog init` --s3-unfenced (replica.s3.unfenced = true in site.toml)"
                .into(),
            transient: false,
        });
    }
    Ok(honoured)
}

impl ObjectBackend {
    /// Over `objects`, with locks and pins in `local` (a directory backend).
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        local: DirBackend,
        grace: Duration,
        unfenced: bool,
    ) -> Self {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        ObjectBackend {
            objects,
            local,
            writer: u64::from_le_bytes(b) | 1,
            counter: AtomicU64::new(0),
            grace,
            unfenced,
            probed: Mutex::new(None),
            machines: Mutex::new(HashMap::new()),
            clock_offset_ns: AtomicU64::new(0),
        }
    }

    /// The wall clock (ns since the epoch), as this backend sees it.
    fn now_ns(&self) -> u64 {
        crate::format::now_ns() + self.clock_offset_ns.load(Ordering::Relaxed)
    }

    /// Move this backend's clock on (tests of collection).
    pub fn advance_clock(&self, ns: u64) {
        self.clock_offset_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn store_err(&self, m: &str, what: String, transient: bool) -> Error {
        Error::Store {
            store: self.objects.locate(m),
            what,
            transient,
        }
    }

    /// Check the store as a writer needs it (reachable, credentials and bucket good,
    /// create-if-absent honoured unless configured unfenced); done once, before the
    /// first write.
    pub fn ensure_probed(&self) -> Result<()> {
        let mut p = self.probed.lock();
        if p.is_some() {
            return Ok(());
        }
        let honoured = probe(self.objects.as_ref(), self.unfenced)?;
        *p = Some(honoured);
        Ok(())
    }

    /// The newest manifest's number (0: none), from a listing.
    fn latest_seq(&self, m: &str) -> Result<u64> {
        Ok(self
            .objects
            .list(&format!("{m}/m/"))?
            .iter()
            .filter_map(|o| manifest_seq(&o.key))
            .max()
            .unwrap_or(0))
    }

    /// The newest manifest (seq 0, empty: none).
    fn load_latest(&self, m: &str) -> Result<Manifest> {
        for _ in 0..3 {
            let seq = self.latest_seq(m)?;
            if seq == 0 {
                return Ok(Manifest::default());
            }
            let key = manifest_key(m, seq);
            // Collected between the listing and now: a newer one exists; list again.
            if let Some(b) = self.objects.get(&key)? {
                return Manifest::decode(&b, &self.objects.locate(&key));
            }
        }
        Err(self.store_err(
            m,
            "its manifests change faster than they can be read".into(),
            true,
        ))
    }

    fn cell(&self, m: &str) -> Result<Arc<Mutex<Machine>>> {
        if let Some(c) = self.machines.lock().get(m) {
            return Ok(c.clone());
        }
        let base = Arc::new(self.load_latest(m)?);
        let now = Instant::now();
        let cell = Arc::new(Mutex::new(Machine {
            base,
            loaded_at: now,
            wrote: false,
            foreign: false,
            fenced: None,
            verified_at: now,
            pending: HashSet::new(),
        }));
        Ok(self
            .machines
            .lock()
            .entry(m.to_string())
            .or_insert(cell)
            .clone())
    }

    /// The manifest to read `m` by: this process's own if it writes `m`, else one
    /// at most [`READ_TTL`] old.
    fn view(&self, m: &str) -> Result<Arc<Manifest>> {
        let cell = self.cell(m)?;
        let mut st = cell.lock();
        if !st.wrote && st.loaded_at.elapsed() > READ_TTL {
            // A listing tells whether anything changed; the manifest is read only then.
            if self.latest_seq(m)? != st.base.seq {
                let fresh = self.load_latest(m)?;
                if fresh.seq != st.base.seq && fresh.writer != self.writer {
                    st.foreign = true;
                }
                st.base = Arc::new(fresh);
            }
            st.loaded_at = Instant::now();
            st.verified_at = st.loaded_at;
        }
        Ok(st.base.clone())
    }

    fn fence(&self, m: &str, st: &mut Machine, why: &str) -> Error {
        let what = format!(
            "replica {m} was written by another receiver ({why}); this process no longer \
             writes it — stop the other receiver, or restart this one to take the \
             replica over"
        );
        tracing::error!(machine = m, "{what}");
        st.fenced = Some(what.clone());
        // No longer a writer: reads take the newest manifest again.
        st.wrote = false;
        st.loaded_at = Instant::now() - READ_TTL * 2;
        self.store_err(m, what, false)
    }

    /// Check that the chain still ends at this process's base: manifests after it
    /// that are this writer's own (commits whose answers were lost) are taken as the
    /// base; one of another writer fences.
    fn verify_chain(&self, m: &str, st: &mut Machine) -> Result<()> {
        let latest = self.latest_seq(m)?;
        if latest < st.base.seq {
            let why = format!(
                "its newest manifest is {latest}, before this process's {}",
                st.base.seq
            );
            return Err(self.fence(m, st, &why));
        }
        for seq in st.base.seq + 1..=latest {
            let key = manifest_key(m, seq);
            let own = self
                .objects
                .get(&key)?
                .map(|b| Manifest::decode(&b, &self.objects.locate(&key)))
                .transpose()?
                .filter(|t| t.writer == self.writer);
            match own {
                Some(t) => st.base = Arc::new(t),
                None => {
                    let why = format!("manifest {seq} is not this process's");
                    return Err(self.fence(m, st, &why));
                }
            }
        }
        st.verified_at = Instant::now();
        Ok(())
    }

    /// Commit manifest `seq + 1` = this process's base changed by `change`.
    fn commit(&self, m: &str, named: &[String], change: &dyn Fn(&mut Manifest, u64)) -> Result<()> {
        let cell = self.cell(m)?;
        self.commit_if(m, &cell, named, &|_| true, change)
            .map(|_| ())
    }

    /// [`Self::commit`] if `accept` takes the base it would build on (under the
    /// machine's lock); false, nothing committed, if not. `cell` is the machine's
    /// state as the operation found it when it began: if the replica was removed
    /// since (`delete_prefix` fences that state), the commit fails instead of
    /// starting the removed replica's namespace again with what it names.
    fn commit_if(
        &self,
        m: &str,
        cell: &Mutex<Machine>,
        named: &[String],
        accept: &dyn Fn(&Manifest) -> bool,
        change: &dyn Fn(&mut Manifest, u64),
    ) -> Result<bool> {
        if !named.is_empty() {
            // Crash tests: data objects PUT, their manifest not yet.
            crate::failpoint::hit("s3:before-manifest");
        }
        self.ensure_probed()?;
        let mut st = cell.lock();
        if let Some(why) = &st.fenced {
            return Err(self.store_err(m, why.clone(), false));
        }
        if st.foreign && !st.wrote {
            return Err(self.fence(
                m,
                &mut st,
                "its manifest changed after this process read it",
            ));
        }
        if st.verified_at.elapsed() > self.grace / 2 {
            self.verify_chain(m, &mut st)?;
        }
        loop {
            if !accept(&st.base) {
                return Ok(false);
            }
            let now = self.now_ns();
            let mut next = (*st.base).clone();
            change(&mut next, now);
            next.seq = st.base.seq + 1;
            next.writer = self.writer;
            next.at_ns = now;
            let bytes = next.encode()?;
            let key = manifest_key(m, next.seq);
            if self.objects.put_if_absent(&key, &bytes)? {
                for n in named {
                    st.pending.remove(n);
                }
                st.base = Arc::new(next);
                st.wrote = true;
                st.loaded_at = Instant::now();
                st.verified_at = st.loaded_at;
                return Ok(true);
            }
            // Taken. By an earlier commit of ours whose answer was lost (the caller
            // saw an error)? Then build on it; otherwise someone else writes here.
            let theirs = self
                .objects
                .get(&key)?
                .map(|b| Manifest::decode(&b, &self.objects.locate(&key)))
                .transpose()?;
            match theirs {
                Some(t) if t.writer == self.writer => st.base = Arc::new(t),
                _ => {
                    return Err(self.fence(
                        m,
                        &mut st,
                        &format!("manifest {} was created by another writer", next.seq),
                    ))
                }
            }
        }
    }

    /// A fresh data object name for `rel`, remembered as pending.
    fn data_name(&self, m: &str, rel: &str) -> Result<String> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("d/{rel}~{:016x}-{n:x}", self.writer);
        self.cell(m)?.lock().pending.insert(name.clone());
        Ok(name)
    }

    /// After a commit that failed (or was not made): its objects are nobody's now
    /// (collected as orphans).
    fn forget_pending(&self, m: &str, named: &[String], failed: bool) {
        if failed {
            if let Some(c) = self.machines.lock().get(m) {
                let mut st = c.lock();
                for n in named {
                    st.pending.remove(n);
                }
            }
        }
    }

    /// Write `bytes` as a new data object of `m`; the entry that names it.
    fn put_data(&self, m: &str, rel: &str, bytes: &[u8]) -> Result<(String, Entry)> {
        if bytes.len() <= INLINE_MAX {
            return Ok((String::new(), Entry::Inline(bytes.to_vec())));
        }
        let name = self.data_name(m, rel)?;
        self.objects.put(&format!("{m}/{name}"), bytes)?;
        let len = bytes.len() as u64;
        Ok((name.clone(), Entry::Object { name, len }))
    }

    /// Delete what `m` no longer needs: manifests superseded for longer than the grace
    /// period (the newest always stays), dropped objects dropped that long ago, and
    /// objects no manifest names that are older than it. Only by the process that
    /// writes `m`, and not while a reader on this host holds a pin. The count of
    /// objects deleted.
    pub fn collect_machine(&self, m: &str) -> Result<u64> {
        let cell = self.cell(m)?;
        if !cell.lock().wrote {
            return Ok(0);
        }
        // Listed before this process's state is taken: an object named after the
        // listing is not in it, one named before it is in the state.
        let manifests: Vec<ObjectInfo> = self.objects.list(&format!("{m}/m/"))?;
        let data: Vec<ObjectInfo> = self.objects.list(&format!("{m}/d/"))?;
        let (base, pending) = {
            let mut st = cell.lock();
            if !st.wrote || st.fenced.is_some() {
                return Ok(0);
            }
            // Another writer took the replica over since this process's last commit:
            // its objects are not ours to judge.
            let newest = manifests
                .last()
                .and_then(|o| manifest_seq(&o.key))
                .unwrap_or(0);
            if newest != st.base.seq {
                self.verify_chain(m, &mut st)?;
                return Ok(0);
            }
            (st.base.clone(), st.pending.clone())
        };
        // Readers on this host and elsewhere take the newest manifest at most a
        // second before they read what it names: the grace period covers them.
        let now = self.now_ns();
        let grace = self.grace.as_nanos() as u64;
        let old = |t: u64| now.saturating_sub(t) > grace;
        let mut gone = Vec::new();
        // Manifests: k may go once k + 1 has existed for the grace period.
        for pair in manifests.windows(2) {
            if let [a, b] = pair {
                if old(b.modified_ns) {
                    gone.push(a.key.clone());
                }
            }
        }
        // Dropped objects.
        let dropped_old: Vec<String> = base
            .dropped
            .iter()
            .filter(|(_, t)| old(*t))
            .map(|(n, _)| n.clone())
            .collect();
        gone.extend(dropped_old.iter().map(|n| format!("{m}/{n}")));
        // Never named (or named by a manifest long gone).
        let named: HashSet<&str> = base
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Object { name, .. } => Some(name.as_str()),
                Entry::Inline(_) => None,
            })
            .chain(base.dropped.iter().map(|(n, _)| n.as_str()))
            .collect();
        for o in data {
            let Some(rel) = o.key.strip_prefix(&format!("{m}/")) else {
                continue;
            };
            if !named.contains(rel) && !pending.contains(rel) && old(o.modified_ns) {
                gone.push(o.key.clone());
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        self.objects.delete(&gone)?;
        if !dropped_old.is_empty() {
            let forget: BTreeSet<String> = dropped_old.into_iter().collect();
            self.commit(m, &[], &|mf, _| {
                mf.dropped.retain(|(n, _)| !forget.contains(n))
            })?;
        }
        tracing::debug!(
            machine = m,
            objects = gone.len(),
            "collected replica objects"
        );
        Ok(gone.len() as u64)
    }
}

impl ReplicaBackend for ObjectBackend {
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<bool> {
        let (m, rel) = split(key)?;
        let view = self.view(m)?;
        match view.entries.get(rel) {
            None => Ok(false),
            Some(Entry::Inline(b)) => {
                buf.clear();
                buf.extend_from_slice(b);
                Ok(true)
            }
            Some(Entry::Object { name, len }) => {
                let full = format!("{m}/{name}");
                let b = self.objects.get(&full)?.ok_or_else(|| {
                    Error::corruption(
                        PathBuf::from(self.objects.locate(&full)),
                        0,
                        format!("missing: manifest {} of {m} names it", view.seq),
                    )
                })?;
                if b.len() as u64 != *len || *len > MAX_OBJECT {
                    return Err(Error::corruption(
                        PathBuf::from(self.objects.locate(&full)),
                        0,
                        format!("{} bytes; its manifest says {len}", b.len()),
                    ));
                }
                *buf = b;
                Ok(true)
            }
        }
    }

    fn get_head(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let (m, rel) = split(key)?;
        let view = self.view(m)?;
        match view.entries.get(rel) {
            None => Ok(None),
            Some(Entry::Inline(b)) => Ok(Some(b.get(..len.min(b.len())).unwrap_or(&[]).to_vec())),
            Some(Entry::Object { name, len: whole }) => {
                let full = format!("{m}/{name}");
                let b = self.objects.get_head(&full, len)?.ok_or_else(|| {
                    Error::corruption(
                        PathBuf::from(self.objects.locate(&full)),
                        0,
                        format!("missing: manifest {} of {m} names it", view.seq),
                    )
                })?;
                if b.len() as u64 != (*whole).min(len as u64) {
                    return Err(Error::corruption(
                        PathBuf::from(self.objects.locate(&full)),
                        0,
                        format!("its first {len} bytes came back as {}; its manifest says {whole} bytes in all", b.len()),
                    ));
                }
                Ok(Some(b))
            }
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let (m, rel) = split(key)?;
        if rel.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{key:?} names a replica, not an object"
            )));
        }
        let cell = self.cell(m)?;
        let (name, entry) = self.put_data(m, rel, bytes)?;
        let named: Vec<String> = (!name.is_empty()).then_some(name).into_iter().collect();
        let done = self
            .commit_if(m, &cell, &named, &|_| true, &|mf, now| {
                mf.set(rel, entry.clone(), now)
            })
            .map(|_| ());
        self.forget_pending(m, &named, done.is_err());
        done
    }

    /// The check and the commit under one lock: of two racing callers one wins (the
    /// loser's data object, if it wrote one, is an orphan, collected later).
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let (m, rel) = split(key)?;
        if rel.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{key:?} names a replica, not an object"
            )));
        }
        let cell = self.cell(m)?;
        if self.view(m)?.entries.contains_key(rel) {
            return Ok(false);
        }
        let (name, entry) = self.put_data(m, rel, bytes)?;
        let named: Vec<String> = (!name.is_empty()).then_some(name).into_iter().collect();
        let done = self.commit_if(
            m,
            &cell,
            &named,
            &|base| !base.entries.contains_key(rel),
            &|mf, now| mf.set(rel, entry.clone(), now),
        );
        self.forget_pending(m, &named, !matches!(done, Ok(true)));
        done
    }

    /// Every data object at once (a few threads), then one manifest for them all.
    fn put_batch(&self, items: &[(String, &[u8])]) -> Result<()> {
        let mut by_machine: BTreeMap<&str, Vec<(&str, &[u8])>> = BTreeMap::new();
        for (k, v) in items {
            let (m, rel) = split(k)?;
            if rel.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "{k:?} names a replica, not an object"
                )));
            }
            by_machine.entry(m).or_default().push((rel, v));
        }
        for (m, puts) in by_machine {
            let cell = self.cell(m)?;
            let per = puts.len().div_ceil(PUT_THREADS).max(1);
            let written = std::thread::scope(|sc| -> Result<Vec<(String, String, Entry)>> {
                let handles: Vec<_> = puts
                    .chunks(per)
                    .map(|part| {
                        sc.spawn(move || -> Result<Vec<(String, String, Entry)>> {
                            part.iter()
                                .map(|(rel, v)| {
                                    let (n, e) = self.put_data(m, rel, v)?;
                                    Ok((rel.to_string(), n, e))
                                })
                                .collect()
                        })
                    })
                    .collect();
                let mut all = Vec::with_capacity(puts.len());
                for h in handles {
                    all.extend(h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidInput("object writer thread panicked".into()))
                    })?);
                }
                Ok(all)
            })?;
            let named: Vec<String> = written
                .iter()
                .filter(|(_, n, _)| !n.is_empty())
                .map(|(_, n, _)| n.clone())
                .collect();
            let done = self
                .commit_if(m, &cell, &named, &|_| true, &|mf, now| {
                    for (rel, _, e) in &written {
                        mf.set(rel, e.clone(), now);
                    }
                })
                .map(|_| ());
            self.forget_pending(m, &named, done.is_err());
            done?;
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        if prefix.is_empty() {
            let mut dirs = self.objects.list_dirs("")?;
            dirs.retain(|d| !d.starts_with('.'));
            return Ok(dirs);
        }
        let (m, rel) = split(prefix)?;
        let view = self.view(m)?;
        let under = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        // Sorted by name, as a directory lists (`parent` before `parent.meta`).
        let names: BTreeSet<String> = view
            .entries
            .range(under.clone()..)
            .take_while(|(k, _)| k.starts_with(&under))
            .filter_map(|(k, _)| k[under.len()..].split('/').next().map(str::to_string))
            .collect();
        Ok(names.into_iter().collect())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let (m, rel) = split(key)?;
        let view = self.view(m)?;
        if rel.is_empty() {
            return Ok(view.seq > 0);
        }
        let under = format!("{rel}/");
        Ok(view.entries.contains_key(rel)
            || view
                .entries
                .range(under.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&under)))
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        let mut by_machine: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for k in keys {
            let (m, rel) = split(k)?;
            by_machine.entry(m).or_default().push(rel);
        }
        for (m, rels) in by_machine {
            let cell = self.cell(m)?;
            let view = self.view(m)?;
            if !rels.iter().any(|r| view.entries.contains_key(*r)) {
                continue;
            }
            self.commit_if(m, &cell, &[], &|_| true, &|mf, now| {
                for r in &rels {
                    mf.remove(r, now);
                }
            })?;
        }
        Ok(())
    }

    /// A whole replica: its manifests go first (older ones, then the newest: it
    /// vanishes at once for readers), then its data objects.
    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let (m, rel) = split(prefix)?;
        if !rel.is_empty() {
            let view = self.view(m)?;
            let under = format!("{rel}/");
            let doomed: Vec<String> = view
                .entries
                .keys()
                .filter(|k| k.starts_with(&under) || k.as_str() == rel)
                .cloned()
                .collect();
            if doomed.is_empty() {
                return Ok(());
            }
            return self.commit(m, &[], &|mf, now| {
                for r in &doomed {
                    mf.remove(r, now);
                }
            });
        }
        // Under the machine's lock, and marked gone for every holder of its state: a
        // commit waiting for the lock must not bring the replica back.
        let cell = self.cell(m)?;
        let mut st = cell.lock();
        st.fenced = Some(format!("replica {m} was removed"));
        st.wrote = false;
        let mut manifests: Vec<String> = self
            .objects
            .list(&format!("{m}/m/"))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        if let Some(newest) = manifests.pop() {
            self.objects.delete(&manifests)?;
            self.objects.delete(&[newest])?;
        }
        let data: Vec<String> = self
            .objects
            .list(&format!("{m}/"))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        self.objects.delete(&data)?;
        drop(st);
        self.machines.lock().remove(m);
        Ok(())
    }

    fn lock(&self, key: &str) -> Result<Box<dyn Held>> {
        self.local.lock(key)
    }

    fn pin(&self, prefix: &str, body: &[u8]) -> Result<Box<dyn Held>> {
        self.local.pin(prefix, body)
    }

    fn live_pins(&self, prefix: &str) -> Result<Vec<Vec<u8>>> {
        self.local.live_pins(prefix)
    }

    fn free_bytes(&self) -> u64 {
        u64::MAX
    }

    fn locate(&self, key: &str) -> PathBuf {
        PathBuf::from(self.objects.locate(key))
    }

    fn collect(&self, machine: &str) -> Result<u64> {
        self.collect_machine(machine)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::MemObjects;
    use super::*;
    use crate::storage::MemStorage;

    const GRACE: Duration = Duration::from_secs(10);

    fn backend(objects: &Arc<MemObjects>) -> ObjectBackend {
        ObjectBackend::new(
            objects.clone(),
            DirBackend::new(Arc::new(MemStorage::new()), "/state"),
            GRACE,
            false,
        )
    }

    #[test]
    fn keys_behave_as_in_a_directory_and_every_commit_is_a_new_manifest() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        assert_eq!(b.get("vm1/x").unwrap(), None);
        assert!(!b.exists("vm1").unwrap());
        b.put("vm1/received", b"small").unwrap();
        let big = vec![7u8; 10_000];
        b.put("vm1/segments/1.seg.enc", &big).unwrap();
        b.put_batch(&[
            ("vm1/parent/1/0.enc".into(), &big[..]),
            ("vm1/parent/1/1.enc".into(), &[1; 10][..]),
        ])
        .unwrap();
        assert_eq!(b.get("vm1/received").unwrap().unwrap(), b"small");
        assert_eq!(b.get("vm1/segments/1.seg.enc").unwrap().unwrap(), big);
        // Heads: of an object, of an inline value, of a shorter one, of none.
        assert_eq!(
            b.get_head("vm1/segments/1.seg.enc", 40).unwrap().unwrap(),
            big[..40]
        );
        assert_eq!(b.get_head("vm1/received", 3).unwrap().unwrap(), b"sma");
        assert_eq!(
            b.get_head("vm1/parent/1/1.enc", 40).unwrap().unwrap(),
            vec![1; 10]
        );
        assert_eq!(b.get_head("vm1/x", 40).unwrap(), None);
        assert_eq!(b.list("").unwrap(), vec!["vm1".to_string()]);
        assert_eq!(
            b.list("vm1").unwrap(),
            vec!["parent", "received", "segments"]
        );
        assert_eq!(b.list("vm1/parent/1").unwrap(), vec!["0.enc", "1.enc"]);
        assert!(b.exists("vm1/parent").unwrap());
        assert!(b.put_if_absent("vm1/new", b"a").unwrap());
        assert!(!b.put_if_absent("vm1/new", b"b").unwrap());
        b.delete(&["vm1/segments/1.seg.enc".into()]).unwrap();
        assert_eq!(b.get("vm1/segments/1.seg.enc").unwrap(), None);
        // Five commits; data objects for the two large values only.
        assert_eq!(b.latest_seq("vm1").unwrap(), 5);
        let data = o.keys().into_iter().filter(|k| k.contains("/d/")).count();
        assert_eq!(data, 2);
        // Another process sees it all.
        let other = backend(&o);
        assert_eq!(other.get("vm1/parent/1/0.enc").unwrap().unwrap(), big);
        assert_eq!(other.get("vm1/segments/1.seg.enc").unwrap(), None);
    }

    #[test]
    fn a_second_writer_fences_the_first_whose_writes_never_show() {
        let o = Arc::new(MemObjects::new());
        let a = backend(&o);
        a.put("vm1/received", b"a1").unwrap();
        let b = backend(&o);
        assert_eq!(b.get("vm1/received").unwrap().unwrap(), b"a1");
        b.put("vm1/received", b"b1").unwrap();
        let e = a.put("vm1/received", b"a2").unwrap_err();
        assert!(e.to_string().contains("another receiver"), "{e}");
        assert_eq!(e.class(), crate::error::ErrorClass::Critical);
        // Fenced for good in this process, whatever comes next.
        assert!(a.put("vm1/other", &vec![0; 9000]).is_err());
        let reader = backend(&o);
        assert_eq!(reader.get("vm1/received").unwrap().unwrap(), b"b1");
        assert_eq!(reader.get("vm1/other").unwrap(), None);
        b.put("vm1/received", b"b2").unwrap();
    }

    #[test]
    fn a_reader_that_saw_another_writer_cannot_write_on_its_stale_view() {
        let o = Arc::new(MemObjects::new());
        let a = backend(&o);
        a.put("vm1/received", b"a1").unwrap();
        let late = backend(&o);
        assert_eq!(late.get("vm1/received").unwrap().unwrap(), b"a1");
        a.put("vm1/received", b"a2").unwrap();
        std::thread::sleep(READ_TTL + Duration::from_millis(50));
        assert_eq!(late.get("vm1/received").unwrap().unwrap(), b"a2");
        assert!(late.put("vm1/received", b"late").is_err());
    }

    #[test]
    fn objects_nobody_names_are_collected_only_after_the_grace_period() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        let big = vec![3u8; 9000];
        b.put("vm1/parent/1/0.enc", &big).unwrap();
        b.put("vm1/parent/1/0.enc", &vec![4u8; 9000]).unwrap(); // drops the first
                                                                // A crashed writer's object: PUT, never named.
        o.put("vm1/d/parent/1/5.enc~dead-0", &big).unwrap();
        let before = o.keys();
        assert_eq!(b.collect("vm1").unwrap(), 0, "nothing is old enough yet");
        assert_eq!(o.keys(), before);
        let data = |o: &MemObjects| o.keys().into_iter().filter(|k| k.contains("/d/")).count();
        assert_eq!(data(&o), 3);
        o.advance(GRACE.as_nanos() as u64 + 1);
        b.advance_clock(GRACE.as_nanos() as u64 + 1);
        // The orphan, the replaced version and the superseded manifests go.
        let n = b.collect("vm1").unwrap();
        assert_eq!(n, 2 + 1, "two objects and manifest 1");
        assert!(!o.keys().iter().any(|k| k.contains("dead")));
        assert_eq!(data(&o), 1);
        assert_eq!(
            b.get("vm1/parent/1/0.enc").unwrap().unwrap(),
            vec![4u8; 9000]
        );
        assert_eq!(
            backend(&o).get("vm1/parent/1/0.enc").unwrap().unwrap(),
            vec![4u8; 9000]
        );
        // Forgetting the dropped object was a commit; the newest manifest stays.
        assert_eq!(b.latest_seq("vm1").unwrap(), 3);
        assert!(b.list("vm1").is_ok());
    }

    #[test]
    fn a_store_that_ignores_create_if_absent_is_refused_unless_unfenced() {
        let o = Arc::new(MemObjects::new());
        o.set_ignores_if_none_match(true);
        let e = backend(&o).put("vm1/x", b"1").unwrap_err().to_string();
        assert!(e.contains("If-None-Match") && e.contains("unfenced"), "{e}");
        let unfenced = ObjectBackend::new(
            o.clone(),
            DirBackend::new(Arc::new(MemStorage::new()), "/state"),
            GRACE,
            true,
        );
        unfenced.put("vm1/x", b"1").unwrap();
    }

    #[test]
    fn a_store_down_is_a_transient_error_and_changes_nothing() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/received", b"1").unwrap();
        o.set_down(true);
        let e = b.put("vm1/received", b"2").unwrap_err();
        assert_eq!(e.class(), crate::error::ErrorClass::Retry, "{e}");
        o.set_down(false);
        assert_eq!(b.get("vm1/received").unwrap().unwrap(), b"1");
        b.put("vm1/received", b"3").unwrap();
        assert_eq!(backend(&o).get("vm1/received").unwrap().unwrap(), b"3");
    }

    #[test]
    fn removing_a_replica_removes_every_object_of_it() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/a", &vec![1; 9000]).unwrap();
        b.put("vm2/a", b"x").unwrap();
        b.delete_prefix("vm1").unwrap();
        assert!(!b.exists("vm1").unwrap());
        assert!(o.keys().iter().all(|k| !k.starts_with("vm1/")));
        assert_eq!(b.list("").unwrap(), vec!["vm2".to_string()]);
    }

    #[test]
    fn a_write_under_way_when_its_replica_is_removed_does_not_bring_it_back() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/replica.meta", b"m").unwrap();
        b.put("vm1/parent/0", &vec![1; 9000]).unwrap();
        // A merge's batch: its data object PUT, its manifest not yet, when the
        // replica goes (a committed failover's fold).
        let cell = b.cell("vm1").unwrap();
        let (name, entry) = b.put_data("vm1", "parent/1", &vec![2; 9000]).unwrap();
        b.delete_prefix("vm1").unwrap();
        let e = b
            .commit_if("vm1", &cell, &[name], &|_| true, &|mf, now| {
                mf.set("parent/1", entry.clone(), now)
            })
            .unwrap_err();
        assert!(e.to_string().contains("removed"), "{e}");
        assert!(
            o.keys().iter().all(|k| !k.starts_with("vm1/m/")),
            "{:?}",
            o.keys()
        );
        assert!(!b.exists("vm1").unwrap());
        // A replica of the same name made afterwards starts empty.
        b.put("vm1/replica.meta", b"new").unwrap();
        assert_eq!(b.list("vm1").unwrap(), vec!["replica.meta".to_string()]);
        assert_eq!(b.latest_seq("vm1").unwrap(), 1);
    }

    /// A store that runs its hook once, right after the first data object is PUT.
    struct OnDataPut {
        inner: Arc<MemObjects>,
        hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl fmt::Debug for OnDataPut {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("OnDataPut")
        }
    }

    impl ObjectStore for OnDataPut {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
            self.inner.get(key)
        }
        fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
            self.inner.put(key, bytes)?;
            if key.contains("/d/") {
                let hook = self.hook.lock().take();
                if let Some(h) = hook {
                    h();
                }
            }
            Ok(())
        }
        fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
            self.inner.put_if_absent(key, bytes)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
            self.inner.list(prefix)
        }
        fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
            self.inner.list_dirs(prefix)
        }
        fn delete(&self, keys: &[String]) -> Result<()> {
            self.inner.delete(keys)
        }
        fn locate(&self, key: &str) -> String {
            self.inner.locate(key)
        }
    }

    #[test]
    fn puts_and_batches_under_way_when_their_replica_is_removed_fail() {
        let big = vec![7u8; 9000];
        let batch: Vec<(String, &[u8])> = vec![
            ("vm1/parent/0".into(), &big[..]),
            ("vm1/parent/1".into(), &big[..]),
        ];
        for as_batch in [false, true] {
            let mem = Arc::new(MemObjects::new());
            let store = Arc::new(OnDataPut {
                inner: mem.clone(),
                hook: Mutex::new(None),
            });
            let b = Arc::new(ObjectBackend::new(
                store.clone(),
                DirBackend::new(Arc::new(MemStorage::new()), "/state"),
                GRACE,
                false,
            ));
            b.put("vm1/replica.meta", b"m").unwrap();
            // The replica goes (a committed failover's fold) once the write's first
            // data object is PUT, before its manifest.
            let weak = Arc::downgrade(&b);
            *store.hook.lock() = Some(Box::new(move || {
                weak.upgrade().unwrap().delete_prefix("vm1").unwrap();
            }));
            let e = if as_batch {
                b.put_batch(&batch).unwrap_err()
            } else {
                b.put("vm1/parent/0", &big).unwrap_err()
            };
            assert!(e.to_string().contains("removed"), "{e}");
            assert!(
                mem.keys().iter().all(|k| !k.starts_with("vm1/m/")),
                "{:?}",
                mem.keys()
            );
            assert!(!b.exists("vm1").unwrap());
        }
    }

    #[test]
    fn a_manifest_object_saved_from_the_store_is_read_by_inspect() {
        use crate::replica::store::{decode_meta_file, MetaFile};
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/received", b"1").unwrap();
        b.put("vm1/parent/0", &vec![3; 9000]).unwrap();
        let bytes = o.get("vm1/m/00000000000000000002").unwrap().unwrap();
        let (kind, file) = decode_meta_file(&bytes).unwrap();
        assert_eq!(kind, MANIFEST_KIND);
        let MetaFile::ObjectManifest(m) = file else {
            panic!("{file:?}")
        };
        assert_eq!(m.seq, 2);
        assert!(m.entries.contains_key("received") && m.entries.contains_key("parent/0"));
        // Damaged: an error at the byte, never a manifest.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_meta_file(&bad).is_err());
    }

    #[test]
    fn a_commit_whose_answer_was_lost_is_taken_up_not_fenced() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/received", b"1").unwrap();
        // Manifest 2 of this very writer landed, its answer lost: the process still
        // stands on 1. Its next commit meets number 2 taken, reads it back, finds it
        // its own and goes on from there.
        let mut landed =
            Manifest::decode(&o.get("vm1/m/00000000000000000001").unwrap().unwrap(), "m").unwrap();
        landed.seq = 2;
        landed.set("received", Entry::Inline(b"2".to_vec()), 0);
        o.put("vm1/m/00000000000000000002", &landed.encode().unwrap())
            .unwrap();
        b.put("vm1/received", b"3").unwrap();
        assert_eq!(b.latest_seq("vm1").unwrap(), 3);
        assert_eq!(backend(&o).get("vm1/received").unwrap().unwrap(), b"3");
    }

    #[test]
    fn a_stale_writer_never_collects_the_new_writers_objects() {
        let o = Arc::new(MemObjects::new());
        let stale = backend(&o);
        stale
            .put("vm1/segments/1.seg.enc", &vec![1u8; 9000])
            .unwrap();
        let new = backend(&o);
        new.get("vm1/segments/1.seg.enc").unwrap();
        new.put("vm1/segments/2.seg.enc", &vec![2u8; 9000]).unwrap();
        o.advance(GRACE.as_nanos() as u64 * 2);
        stale.advance_clock(GRACE.as_nanos() as u64 * 2);
        // The stale one never wrote again, so it was never fenced by a commit: its
        // collection must find out, and delete nothing.
        assert!(stale.collect("vm1").is_err());
        assert_eq!(
            new.get("vm1/segments/2.seg.enc").unwrap().unwrap(),
            vec![2u8; 9000]
        );
        assert_eq!(
            backend(&o).get("vm1/segments/2.seg.enc").unwrap().unwrap(),
            vec![2u8; 9000]
        );
    }

    #[test]
    fn of_threads_racing_to_create_one_key_exactly_one_wins() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        for round in 0..20 {
            let key = format!("vm1/k{round}");
            let wins: usize = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..4u8)
                    .map(|t| {
                        let (b, key) = (&b, &key);
                        sc.spawn(move || b.put_if_absent(key, &vec![t; 5000]).unwrap())
                    })
                    .collect();
                hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
            });
            assert_eq!(wins, 1, "round {round}");
        }
    }

    #[test]
    fn names_list_in_order_as_a_directory_lists_them() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        b.put("vm1/parent.meta", b"m").unwrap();
        b.put("vm1/parent/1/0.enc", b"c").unwrap();
        assert_eq!(b.list("vm1").unwrap(), vec!["parent", "parent.meta"]);
    }

    #[test]
    fn a_manifest_naming_every_chunk_of_a_1gib_disk_stays_small() {
        let o = Arc::new(MemObjects::new());
        let b = backend(&o);
        let body = vec![0u8; INLINE_MAX + 1];
        let chunks: Vec<(String, &[u8])> = (0..4096)
            .map(|n| (format!("vm1/parent/1/{n}.enc"), &body[..]))
            .collect();
        b.put_batch(&chunks).unwrap();
        let key = o.keys().into_iter().find(|k| k.contains("/m/")).unwrap();
        let len = o.get(&key).unwrap().unwrap().len();
        // About 20 bytes per chunk: the 1 MiB ceiling is some 50,000 chunks (12 GiB of
        // written disk at 256 KiB a chunk); see DESIGN.md, "Known limits".
        assert!(len < 100 << 10, "{len} bytes for 4096 chunks");
        eprintln!("manifest of 4096 chunks: {len} bytes");
    }

    #[test]
    fn manifests_that_do_not_decode_are_corruption() {
        let m = Manifest {
            seq: 1,
            ..Default::default()
        };
        let mut b = m.encode().unwrap();
        assert_eq!(Manifest::decode(&b, "x").unwrap(), m);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert!(matches!(
            Manifest::decode(&b, "x"),
            Err(Error::Corruption { .. })
        ));
        assert!(Manifest::decode(b"short", "x").is_err());
    }
}
