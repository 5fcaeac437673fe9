//! A machine's disks as callers see them: read, write, zero, flush — over the parent
//! images and the machine's change journal.
//!
//! Write path: take the journal lock, append the record (page cache only), insert its
//! extent into the index, release. The write is acknowledged then; [`Machine::flush`]
//! makes every acknowledged write durable with one `fdatasync` shared by all
//! concurrent callers (group commit) and records a recovery point.
//!
//! Read path: look the range up in the index under a read lock (taking handles to the
//! segment files it needs in the same critical section, so a concurrent compaction
//! cannot delete them underneath), release, then read each piece from its segment, as
//! zeros, or from the parent image.
//!
//! Lock order: `writer` → `state` → `sync`. `flush` never holds `sync` while taking
//! `writer`.

use crate::compactor::{self, Compactor};
use crate::config::JournalConfig;
use crate::digest::DiskDigest;
use crate::error::{Error, Result};
use crate::format::meta::{DiskEntry, Manifest, Watermark};
use crate::format::record::MAX_PAYLOAD;
use crate::format::RecordKind;
use crate::holds::{self, Holds};
use crate::index::{ExtentMap, Location, Piece};
use crate::journal::reader::Expect;
use crate::journal::{self, JournalParams, JournalWriter, Point, PointKind, SealedSegment};
use crate::names::{validate_disk_size, validate_name};
use crate::storage::{read_all, write_atomic, OpenMode, Storage, StorageFile};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

mod ahead;
mod barrier;
mod base;
mod changed;
mod damage;
mod open;
mod read;
mod write;

pub use barrier::{plan_point, PlanPoint};

pub use base::PointParent;
pub use changed::{ChangedMap, CHANGED_FILE};
pub use damage::{DamageEntry, DamageList, DamagedRange, DAMAGE_FILE};
pub(crate) use open::{apply_to_index, record_outside_disk};

pub const MANIFEST_FILE: &str = "machine.meta";
pub const WATERMARK_FILE: &str = "watermark";
pub const JOURNAL_DIR: &str = "journal";
pub const DISKS_DIR: &str = "disks";
/// Largest manifest or watermark file read (envelope + the largest body allowed).
pub const META_FILE_LIMIT: u64 =
    crate::format::meta::META_HEADER_LEN as u64 + crate::format::meta::MAX_META_BODY as u64;

/// Read and decode the small metadata file at `path` (None if there is none); what
/// does not decode is corruption naming the file.
pub(crate) fn load_meta<T>(
    storage: &dyn Storage,
    path: &Path,
    decode: impl FnOnce(&[u8]) -> std::result::Result<T, crate::format::DecodeError>,
) -> Result<Option<T>> {
    if !storage.exists(path) {
        return Ok(None);
    }
    let bytes = read_all(
        storage.open(path, OpenMode::ReadOnly)?.as_ref(),
        META_FILE_LIMIT,
    )?;
    decode(&bytes)
        .map(Some)
        .map_err(|e| Error::corruption(path, e.offset, e.what))
}

/// Fills a new parent image (see [`Machine::add_disk`]).
pub type ImportFn<'a> = dyn FnMut(&dyn StorageFile) -> Result<()> + 'a;

/// One disk of a machine.
#[derive(Debug)]
pub(crate) struct Disk {
    pub id: u32,
    pub name: String,
    pub size: u64,
    /// The parent image, or a replica point until the fold swaps the file in.
    parent: RwLock<Arc<dyn StorageFile>>,
    /// Read-ahead of the parent for sequential O_DIRECT readers (`volume::ahead`).
    ahead: ahead::DirectAhead,
}

impl Disk {
    pub fn new(id: u32, name: String, size: u64, parent: Arc<dyn StorageFile>) -> Disk {
        Disk {
            id,
            name,
            size,
            parent: RwLock::new(parent),
            ahead: ahead::DirectAhead::default(),
        }
    }

    /// The parent as it is now (a cheap clone; the fold may swap it later).
    pub fn parent(&self) -> Arc<dyn StorageFile> {
        self.parent.read().clone()
    }

    /// Swap in the parent image the fold wrote.
    pub(crate) fn set_parent(&self, parent: Arc<dyn StorageFile>) {
        *self.parent.write() = parent;
    }
}

/// Index and segment files, under one lock so lookups and file handles agree.
#[derive(Debug, Default)]
pub(crate) struct IndexState {
    pub disks: Vec<ExtentMap>,
    /// Every segment the index may point into, by sequence number.
    pub files: BTreeMap<u64, Arc<dyn StorageFile>>,
    /// Damaged segments (found by recovery, the shipper's check or the compactor, or
    /// listed in the damage list): reads that need them fail instead of returning
    /// their bytes.
    pub damaged: BTreeMap<u64, String>,
    /// The damaged segments recovery could read only up to the damage: which ranges
    /// their later records wrote is unknown, so every range whose newest verified data
    /// is in such a segment or older (the parent included) is refused too.
    pub lost: std::collections::BTreeSet<u64>,
    /// Bumped by the merge as it moves reads from its segments to the parents (after
    /// writing them): what was read from a parent before is stale (`ahead`).
    pub parent_epoch: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    durable_lsn: u64,
    in_progress: bool,
}

/// Shared state of an open machine.
#[derive(Debug)]
pub(crate) struct MachineInner {
    pub name: String,
    pub dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    pub machine_id: u64,
    pub disks: Vec<Disk>,
    pub writer: Mutex<JournalWriter>,
    /// The journal's spare segment files (the writer's, shared with the compactor).
    pub spares: crate::journal::spare::Spares,
    pub state: RwLock<IndexState>,
    pub sealed: Mutex<BTreeMap<u64, SealedSegment>>,
    pub points: Mutex<Vec<Point>>,
    pub watermark: Mutex<Watermark>,
    pub holds: Holds,
    /// Serialises compactions.
    pub compaction: Mutex<()>,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    /// A write or sync failed (not only damage found): mending cannot lift the poison.
    poisoned_by_io: AtomicBool,
    /// Damaged segments whose every live range was rewritten: merges skip them.
    pub mended: Mutex<std::collections::BTreeSet<u64>>,
    /// The persisted damage list (`damage::DamageList`), rewritten under this lock.
    pub damage_list: Mutex<damage::DamageList>,
    /// Ranges a mend in progress rewrote (disk, offset, length): their digests are
    /// updated once every batch is in (`Machine::finish_mend`).
    mending: Mutex<Vec<(u32, u64, u64)>>,
    /// Wall-clock time of the newest append (for the compactor's idle test).
    last_append_ns: AtomicU64,
    /// Wakes the background compactor after a seal.
    pub compactor_kick: Mutex<Option<crossbeam::channel::Sender<()>>>,
    /// Per-disk digests (see `crate::digest`), kept once `Machine::keep_digests` ran:
    /// updated with the writer lock held, so a point's digests are exactly the state
    /// at its LSN.
    digests: Mutex<Option<Vec<DiskDigest>>>,
    /// The machine's generation (see `crate::protection`): grows by one at every
    /// promotion; segments and messages carry it.
    pub generation: u32,
    /// What this site is for the machine (from its manifest).
    pub role: crate::protection::Role,
    /// Why writes are refused (EROFS), when they are: a newer generation took the
    /// machine over (persisted in the manifest), or the command channel fenced it.
    fence: Mutex<Option<String>>,
    /// The manifest says a newer generation took the machine over.
    failed_over: AtomicBool,
    /// The persisted fence (where the machine went), if it was failed over.
    fence_record: Mutex<Option<crate::protection::Fence>>,
    /// The parents are a replica at a point (until the fold).
    base: Mutex<Option<crate::protection::Base>>,
    /// A promotion not committed yet.
    pending: Mutex<Option<crate::protection::Pending>>,
    /// A planned failover under way at this primary.
    intent: Mutex<Option<crate::protection::Intent>>,
    /// Serialises rewrites of `machine.meta`.
    manifest_lock: Mutex<()>,
    /// The changed-block map, kept from a promotion's fold until a reprotect is
    /// verified (see `changed`); the compactor adds what it merges.
    pub changed: Mutex<Option<ChangedMap>>,
    /// Closed (removed, or reopened after a change): writes get `Error::Closed`, so a
    /// request in flight looks the machine up again instead of writing to a journal
    /// that another open machine now owns.
    closed: AtomicBool,
}

/// An open machine: its journal, index, disks and compactor.
#[derive(Debug)]
pub struct Machine {
    inner: Arc<MachineInner>,
    compactor: Mutex<Option<Compactor>>,
    /// Keeps the compactor at the base point while the parents are a replica point.
    base_hold: Mutex<Option<holds::WatermarkHold>>,
    /// Set at open when a parent image is not as replog left it.
    changed_offline: Option<String>,
}

/// A disk of an open machine, the handle reads and writes go through.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<MachineInner>,
    disk: u32,
}

/// What a journal holds after an LSN (see [`Machine::records_after`]).
#[derive(Debug, Clone, Default)]
pub struct Tail {
    pub ranges: Vec<(u32, u64, u64)>,
    pub first_lsn: Option<u64>,
    pub last_lsn: u64,
    /// The clock of the first and last point after the LSN.
    pub first_ns: Option<u64>,
    pub last_ns: u64,
}

/// Summary of a machine's journal for status and inspect.
#[derive(Debug, Clone)]
pub struct JournalStatus {
    pub sealed_segments: usize,
    pub journal_bytes: u64,
    /// Bytes of merged segments kept to be written again (`journal::spare`).
    pub spare_bytes: u64,
    pub active_seq: u64,
    pub last_lsn: u64,
    pub durable_lsn: u64,
    pub watermark: Watermark,
    pub index_extents: usize,
    pub last_point: Option<Point>,
    pub poisoned: Option<String>,
}

impl Machine {
    /// Why the parents are not as replog left them, if they are not (a resync of a
    /// protected machine is then required).
    pub fn changed_offline(&self) -> Option<String> {
        self.changed_offline.clone()
    }

    /// Stop the background compactor (waiting for a merge in progress). Used before
    /// replication lets go of its holds, so nothing unacknowledged is merged.
    pub fn stop_compactor(&self) {
        let c = self.compactor.lock().take();
        if let Some(c) = c {
            c.stop();
        }
    }

    /// Wait until no merge is running (the next one will see the holds as they are).
    pub fn wait_for_merge(&self) {
        drop(self.inner.compaction.lock());
    }

    /// Start the background compactor: it wakes every `policy.interval` and after each
    /// seal, and merges when the policy says so.
    pub fn start_compactor(&self, policy: compactor::CompactPolicy) {
        let mut c = self.compactor.lock();
        if c.is_none() {
            // The journal may hold this much before a merge: spares may use it.
            self.inner.spares.allow(policy.min_bytes);
            *c = Some(Compactor::spawn(self.inner.clone(), policy));
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn disk_names(&self) -> Vec<String> {
        self.inner.disks.iter().map(|d| d.name.clone()).collect()
    }

    /// The volume of disk `name`.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let d = self
            .inner
            .disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!("machine {} has no disk {name}", self.inner.name))
            })?;
        Ok(Volume {
            inner: self.inner.clone(),
            disk: d.id,
        })
    }

    /// Make every acknowledged write durable and record a recovery point. Returns the
    /// LSN that is now durable.
    pub fn flush(&self) -> Result<u64> {
        self.inner.flush()
    }

    /// Seal the active segment now (a recovery point). Returns the sealed segment's last
    /// LSN, or None if the active segment was empty.
    pub fn seal(&self) -> Result<Option<u64>> {
        let mut w = self.inner.writer.lock();
        self.inner.check_poison()?;
        let sealed = self.inner.seal_locked(&mut w)?;
        Ok(sealed)
    }

    /// Merge every sealed segment the holds allow into the parents, now.
    pub fn compact(&self) -> Result<compactor::CompactStats> {
        compactor::compact_once(&self.inner)
    }

    /// Hold the merge watermark at or below `lsn` until the hold is dropped.
    pub fn hold_watermark(&self, lsn: u64) -> holds::WatermarkHold {
        // Wait for a merge in progress: once this returns, nothing above `lsn` is
        // being merged into the parents.
        let _no_merge_running = self.inner.compaction.lock();
        self.inner.holds.hold(lsn)
    }

    /// The machine's generation (from its manifest; segments and messages carry it).
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// What this site is for the machine.
    pub fn role(&self) -> crate::protection::Role {
        self.inner.role
    }

    /// Refuse every write and zero range from now on (EROFS to a guest), with
    /// `reason`; a write in progress completes first (the writer lock is taken).
    /// Points, flushes and seals still work. Returns the last LSN written.
    pub fn fence(&self, reason: &str) -> u64 {
        let w = self.inner.writer.lock();
        *self.inner.fence.lock() = Some(reason.to_string());
        w.last_lsn()
    }

    /// Take writes again — unless the machine was failed over (its persisted fence
    /// is for good: nothing unfences it).
    pub fn unfence(&self) {
        let _w = self.inner.writer.lock();
        if self.inner.failed_over.load(Ordering::Acquire) {
            return;
        }
        *self.inner.fence.lock() = None;
    }

    /// Whether the manifest says a newer generation took the machine over.
    pub fn failed_over(&self) -> bool {
        self.inner.failed_over.load(Ordering::Acquire)
    }

    /// A newer generation took the machine over: persist the fence in the manifest
    /// (and drop a planned failover's intent), refuse writes from now on. Idempotent.
    pub fn persist_fence(&self, fence: crate::protection::Fence) -> Result<()> {
        let reason = fence_reason(&fence);
        let w = self.inner.writer.lock();
        self.inner.update_manifest(|m| {
            m.fence = Some(fence.clone());
            m.intent = None;
        })?;
        *self.inner.intent.lock() = None;
        *self.inner.fence.lock() = Some(reason);
        *self.inner.fence_record.lock() = Some(fence);
        self.inner.failed_over.store(true, Ordering::Release);
        drop(w);
        // It takes no writes from now on: its spare segment files would never be
        // written again (a fenced machine opened afresh keeps none either).
        if let Err(e) = self.drop_spares() {
            tracing::warn!(machine = %self.inner.name, "spare segment files: {e}");
        }
        Ok(())
    }

    /// Remove the journal's spare segment files (those no reader still holds);
    /// returns how many went.
    pub fn drop_spares(&self) -> Result<usize> {
        let mut n = 0;
        while let Some(s) = self.inner.spares.take() {
            drop(s.file);
            self.inner.storage.remove_file(&s.path)?;
            n += 1;
        }
        if n > 0 {
            self.inner
                .storage
                .sync_dir(&self.inner.dir.join(JOURNAL_DIR))?;
        }
        Ok(n)
    }

    /// The persisted fence of a failed-over machine: the site and generation that
    /// took it over, and when this site learnt of it.
    pub fn fence_record(&self) -> Option<crate::protection::Fence> {
        self.inner.fence_record.lock().clone()
    }

    /// Where the parents come from while they are a replica point.
    pub fn base(&self) -> Option<crate::protection::Base> {
        self.inner.base.lock().clone()
    }

    /// The promotion not committed yet, if any.
    pub fn pending(&self) -> Option<crate::protection::Pending> {
        self.inner.pending.lock().clone()
    }

    /// The planned failover under way at this primary, if any.
    pub fn intent(&self) -> Option<crate::protection::Intent> {
        self.inner.intent.lock().clone()
    }

    /// Record (or clear) a planned failover's intent, durably.
    pub fn set_intent(&self, intent: Option<crate::protection::Intent>) -> Result<()> {
        self.inner.update_manifest(|m| m.intent = intent.clone())?;
        *self.inner.intent.lock() = intent;
        Ok(())
    }

    /// The promotion is final: clear `pending`, durably.
    pub fn clear_pending(&self) -> Result<()> {
        self.inner.update_manifest(|m| m.pending = None)?;
        *self.inner.pending.lock() = None;
        Ok(())
    }

    /// The fold wrote every parent image: swap them in, drop the base from the
    /// manifest, release the compactor. `parents` are in disk-id order.
    pub fn finish_fold(&self, parents: Vec<Arc<dyn StorageFile>>) -> Result<()> {
        if parents.len() != self.inner.disks.len() {
            return Err(Error::InvalidInput("fold: one parent per disk".into()));
        }
        // No merge may run while the parents change (none can: the hold), and no
        // read sees a mix: each swap is atomic per disk, and both sources hold the
        // same bytes.
        let _merge = self.inner.compaction.lock();
        self.inner.update_manifest(|m| m.base = None)?;
        for (d, p) in self.inner.disks.iter().zip(parents) {
            d.set_parent(p);
        }
        *self.inner.base.lock() = None;
        self.inner.write_parents_stamp();
        self.base_hold.lock().take();
        Ok(())
    }

    /// Keep a changed-block map from now on, starting with `map` (a promotion's
    /// fold, before its hold goes: everything since the base is still in the
    /// journal).
    pub fn start_tracking(&self, map: ChangedMap) -> Result<()> {
        let _merge = self.inner.compaction.lock();
        map.save(self.inner.storage.as_ref(), &self.inner.dir)?;
        *self.inner.changed.lock() = Some(map);
        Ok(())
    }

    /// What the merges since the map's base point changed in the parents, if the
    /// machine keeps a map (the journal holds the rest).
    pub fn changed_map(&self) -> Option<ChangedMap> {
        let _merge = self.inner.compaction.lock();
        self.inner.changed.lock().clone()
    }

    /// Stop keeping the map (a reprotect was verified: the journal and the target
    /// answer for everything from here on).
    pub fn stop_tracking(&self) -> Result<()> {
        let _merge = self.inner.compaction.lock();
        let path = self.inner.dir.join(CHANGED_FILE);
        if self.inner.storage.exists(&path) {
            self.inner.storage.remove_file(&path)?;
            self.inner.storage.sync_dir(&self.inner.dir)?;
        }
        *self.inner.changed.lock() = None;
        Ok(())
    }

    /// The write and zero records of the journal after `lsn` (disk, offset, length)
    /// and the LSN and time range of what the journal holds after it: an old
    /// primary's tail.
    pub fn records_after(&self, lsn: u64) -> Result<Tail> {
        let files: Vec<(u64, Arc<dyn StorageFile>)> = self
            .inner
            .state
            .read()
            .files
            .iter()
            .map(|(s, f)| (*s, f.clone()))
            .collect();
        let mut tail = Tail::default();
        for (seq, f) in files {
            let expect = Expect {
                machine_id: Some(self.inner.machine_id),
                seq: Some(seq),
                first_lsn: None,
                disk_count: Some(self.inner.disks.len() as u32),
            };
            crate::journal::reader::scan_segment(f.as_ref(), expect, |rec| {
                let h = &rec.header;
                if h.lsn <= lsn || h.kind == RecordKind::Point {
                    return Ok(());
                }
                tail.ranges.push((h.disk, h.offset, h.length));
                tail.first_lsn = Some(tail.first_lsn.map_or(h.lsn, |l: u64| l.min(h.lsn)));
                tail.last_lsn = tail.last_lsn.max(h.lsn);
                Ok(())
            })?;
        }
        for p in self.inner.points.lock().iter().filter(|p| p.lsn > lsn) {
            tail.first_ns = Some(tail.first_ns.map_or(p.time_ns, |t: u64| t.min(p.time_ns)));
            tail.last_ns = tail.last_ns.max(p.time_ns);
        }
        Ok(tail)
    }

    /// Why writes are refused, if they are.
    pub fn fenced(&self) -> Option<String> {
        self.inner.fence.lock().clone()
    }

    /// The machine's id (from its manifest; segments carry it).
    pub fn machine_id(&self) -> u64 {
        self.inner.machine_id
    }

    /// Disk names and sizes, in disk-id order.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.inner
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.size))
            .collect()
    }

    /// The parent image of disk number `disk` (initial replication reads it while a
    /// watermark hold keeps it frozen).
    pub(crate) fn parent(&self, disk: usize) -> Option<Arc<dyn StorageFile>> {
        self.inner.disks.get(disk).map(|d| d.parent())
    }

    /// The sealed segments still in the journal, oldest first.
    pub fn sealed_segments(&self) -> Vec<SealedSegment> {
        self.inner.sealed.lock().values().cloned().collect()
    }

    pub fn points(&self) -> Vec<Point> {
        self.inner.points.lock().clone()
    }

    /// Bytes of the disks the journal holds now, each once however often it was
    /// written (for a machine that stands on a replica point: what differs from it).
    pub fn journal_extent_bytes(&self) -> u64 {
        let state = self.inner.state.read();
        state
            .disks
            .iter()
            .map(|m| m.iter().map(|(_, e)| e.len).sum::<u64>())
            .sum()
    }

    /// Bytes in the active (unsealed) segment.
    pub fn active_bytes(&self) -> u64 {
        self.inner.writer.lock().active_bytes()
    }

    pub fn status(&self) -> JournalStatus {
        let w = self.inner.writer.lock();
        let (active_seq, active_bytes, last_lsn) = (w.active_seq(), w.active_bytes(), w.last_lsn());
        drop(w);
        let sealed = self.inner.sealed.lock();
        let sealed_bytes: u64 = sealed.values().map(|s| s.bytes).sum();
        let sealed_segments = sealed.len();
        drop(sealed);
        let index_extents = self.inner.state.read().disks.iter().map(|m| m.len()).sum();
        JournalStatus {
            sealed_segments,
            journal_bytes: sealed_bytes + active_bytes,
            spare_bytes: self.inner.spares.bytes(),
            active_seq,
            last_lsn,
            durable_lsn: self.inner.sync.lock().durable_lsn,
            watermark: *self.inner.watermark.lock(),
            index_extents,
            last_point: self.inner.points.lock().last().copied(),
            poisoned: self.inner.poison_reason.lock().clone(),
        }
    }

    /// Refuse every further write with `Error::Closed` (a write in progress completes
    /// first): the machine is about to be closed, perhaps while others still hold
    /// handles to its disks.
    pub fn mark_closed(&self) {
        let _w = self.inner.writer.lock();
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Flush, stop the compactor and close.
    pub fn close(self) -> Result<()> {
        self.mark_closed();
        let flushed = self.flush();
        if let Some(c) = self.compactor.lock().take() {
            c.stop();
        }
        self.inner.write_parents_stamp();
        flushed.map(|_| ())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // No flush here: dropping without `close` is what a crash looks like to tests.
        if let Some(c) = self.compactor.lock().take() {
            c.stop();
        }
    }
}

/// What status and errors say about a persisted fence.
pub(crate) fn fence_reason(f: &crate::protection::Fence) -> String {
    format!(
        "it was failed over to site {} (generation {}) at {}: {}",
        crate::identity::SiteId(f.by_site),
        f.generation,
        crate::format::rfc3339(f.at_ns),
        f.reason
    )
}

impl MachineInner {
    /// Read `machine.meta`, change it, write it back atomically.
    pub(crate) fn update_manifest(&self, change: impl FnOnce(&mut Manifest)) -> Result<()> {
        let _g = self.manifest_lock.lock();
        let mut m = Machine::read_manifest(self.storage.as_ref(), &self.dir)?;
        change(&mut m);
        write_atomic(
            self.storage.as_ref(),
            &self.dir.join(MANIFEST_FILE),
            &m.encode(),
        )
    }

    pub fn last_append_ns(&self) -> u64 {
        self.last_append_ns.load(Ordering::Relaxed)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Refuse a guest write while fenced or once closed.
    /// Refused once the machine is closed (or reopened: the new instance owns the
    /// journal).
    fn check_closed(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed {
                machine: self.name.clone(),
            });
        }
        Ok(())
    }

    fn check_fence(&self) -> Result<()> {
        self.check_closed()?;
        match &*self.fence.lock() {
            Some(reason) => Err(Error::Fenced {
                machine: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn check_poison(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                machine: self.name.clone(),
                reason: self.poison_reason.lock().clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Refuse every later write: after a failed write or sync nothing written since the
    /// last good sync can be trusted to be on disk.
    pub fn poison(&self, err: &Error) -> Error {
        self.poisoned_by_io.store(true, Ordering::Release);
        self.poison_with(err)
    }

    fn poison_with(&self, err: &Error) -> Error {
        let reason = err.to_string();
        tracing::error!(machine = %self.name, "poisoned: {reason}");
        let mut r = self.poison_reason.lock();
        if r.is_none() {
            *r = Some(reason.clone());
        }
        self.poisoned.store(true, Ordering::Release);
        drop(r);
        self.sync_cv.notify_all();
        Error::Poisoned {
            machine: self.name.clone(),
            reason,
        }
    }

    fn disk(&self, id: u32) -> Result<&Disk> {
        self.disks
            .get(id as usize)
            .ok_or_else(|| Error::NotFound(format!("disk id {id}")))
    }

    fn check_range(&self, disk: &Disk, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= disk.size => Ok(()),
            end => Err(Error::OutOfRange {
                what: format!("{what} on {}/{}", self.name, disk.name),
                offset,
                end: end.unwrap_or(u64::MAX),
                size: disk.size,
            }),
        }
    }
}

impl Volume {
    /// Whether `other` is a disk of the same open machine (not of one reopened since).
    pub fn same_machine(&self, other: &Volume) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn size(&self) -> u64 {
        self.inner
            .disks
            .get(self.disk as usize)
            .map(|d| d.size)
            .unwrap_or(0)
    }

    pub fn name(&self) -> &str {
        self.inner
            .disks
            .get(self.disk as usize)
            .map(|d| d.name.as_str())
            .unwrap_or("")
    }

    pub fn machine(&self) -> &str {
        &self.inner.name
    }

    /// Read at any offset and length inside the disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(self.disk, offset, buf, false)
    }

    /// [`read`](Self::read) for a reader that asked for uncached I/O (an O_DIRECT
    /// open): what the parent image answers is read around the page cache
    /// (`StorageFile::read_direct`), as a plain file opened O_DIRECT would be, or
    /// taken from the read-ahead slots [`prefetch_direct`](Self::prefetch_direct)
    /// filled where they are still current (`volume::ahead`). Data still in the
    /// journal is read from its segments through the page cache.
    pub fn read_direct(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(self.disk, offset, buf, true)
    }

    /// Hint that `offset..offset+len` will be read soon (sequential readers).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.prefetch(self.disk, offset, len, false)
    }

    /// [`prefetch`](Self::prefetch) for a reader of [`read_direct`](Self::read_direct):
    /// what the parent answers is read with O_DIRECT into buffers of replog's own
    /// (`volume::ahead`), none of it into the page cache.
    pub fn prefetch_direct(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.prefetch(self.disk, offset, len, true)
    }

    /// Write at any offset and length inside the disk; returns the record's LSN.
    /// Acknowledged once in the page cache; durable after [`flush`](Self::flush).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<u64> {
        self.inner.append(
            self.disk,
            RecordKind::Write,
            offset,
            data.len() as u64,
            data,
        )
    }

    /// Make `offset..offset+len` read as zeros (discard, write-zeroes, punch hole).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<u64> {
        self.inner
            .append(self.disk, RecordKind::Zero, offset, len, &[])
    }

    /// Flush the machine's journal (all disks of a machine share one write order).
    pub fn flush(&self) -> Result<u64> {
        self.inner.flush()
    }

    /// `SEEK_DATA` (`data`) or `SEEK_HOLE` from `offset`: journal data counts as data,
    /// zeroed ranges as holes, and the parent image answers for the rest. None means
    /// no data at or after `offset` (ENXIO).
    pub fn seek(&self, offset: u64, data: bool) -> Result<Option<u64>> {
        self.inner.seek(self.disk, offset, data)
    }
}

impl Machine {
    /// Start keeping per-disk digests, so every later point carries them (what a
    /// restore at the target checks itself against). Reads every disk's data once,
    /// holding writes back meanwhile; a no-op when already kept.
    pub fn keep_digests(&self) -> Result<()> {
        self.inner.keep_digests()
    }

    /// Whether points carry digests.
    pub fn keeps_digests(&self) -> bool {
        self.inner.digests.lock().is_some()
    }

    /// Record an app-consistent recovery point, durable on return.
    pub fn checkpoint(&self) -> Result<Point> {
        self.inner.checkpoint(true)
    }

    /// Record a recovery point now (a new point record even when nothing was written
    /// since the last one), app-consistent or crash-consistent; durable on return.
    pub fn point(&self, app_consistent: bool) -> Result<Point> {
        self.inner.checkpoint(app_consistent)
    }
}
