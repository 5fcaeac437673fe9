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

use crate::compactor::{self, Compactor, Holds};
use crate::config::JournalConfig;
use crate::digest::DiskDigest;
use crate::error::{Error, Result};
use crate::format::meta::{DiskEntry, Manifest, Watermark};
use crate::format::record::MAX_PAYLOAD;
use crate::format::RecordKind;
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

pub const MANIFEST_FILE: &str = "machine.meta";
pub const WATERMARK_FILE: &str = "watermark";
pub const JOURNAL_DIR: &str = "journal";
pub const DISKS_DIR: &str = "disks";
/// Largest manifest or watermark file read (envelope + the largest body allowed).
pub const META_FILE_LIMIT: u64 =
    crate::format::meta::META_HEADER_LEN as u64 + crate::format::meta::MAX_META_BODY as u64;

/// Pieces of a range and the segment files they read from.
type Resolved = (Vec<Piece>, Vec<(u64, Arc<dyn StorageFile>)>);

/// Fills a new parent image (see [`Machine::add_disk`]).
pub type ImportFn<'a> = dyn FnMut(&dyn StorageFile) -> Result<()> + 'a;

/// One disk of a machine.
#[derive(Debug)]
pub(crate) struct Disk {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub parent: Arc<dyn StorageFile>,
}

/// Index and segment files, under one lock so lookups and file handles agree.
#[derive(Debug, Default)]
pub(crate) struct IndexState {
    pub disks: Vec<ExtentMap>,
    /// Every segment the index may point into, by sequence number.
    pub files: BTreeMap<u64, Arc<dyn StorageFile>>,
    /// Segments found damaged after they were opened (by the compactor): reads that
    /// need them fail instead of returning their bytes.
    pub damaged: BTreeMap<u64, String>,
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
    /// Wall-clock time of the newest append (for the compactor's idle test).
    last_append_ns: AtomicU64,
    /// Wakes the background compactor after a seal.
    pub compactor_kick: Mutex<Option<crossbeam::channel::Sender<()>>>,
    /// Per-disk digests (see `crate::digest`), kept once `Machine::keep_digests` ran:
    /// updated with the writer lock held, so a point's digests are exactly the state
    /// at its LSN.
    digests: Mutex<Option<Vec<DiskDigest>>>,
}

/// An open machine: its journal, index, disks and compactor.
#[derive(Debug)]
pub struct Machine {
    inner: Arc<MachineInner>,
    compactor: Mutex<Option<Compactor>>,
    /// Set at open when a parent image is not as replog left it.
    changed_offline: Option<String>,
}

/// `parents.stamp`: size, mtime, ctime and inode of every parent image as replog left
/// it (written after every merge and at close). A parent written by anything else
/// while replog was not running no longer matches (ctime cannot be set back).
const STAMP_FILE: &str = "parents.stamp";

fn parents_stamp(dir: &Path, disks: &[Disk]) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut out = String::new();
    for d in disks {
        let p = dir.join(DISKS_DIR).join(format!("{}.img", d.name));
        match std::fs::metadata(&p) {
            Ok(m) => out.push_str(&format!(
                "{} {} {}.{} {}.{} {}\n",
                d.name,
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino()
            )),
            Err(_) => out.push_str(&format!("{} missing\n", d.name)),
        }
    }
    out
}

/// A disk of an open machine, the handle reads and writes go through.
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<MachineInner>,
    disk: u32,
}

/// Summary of a machine's journal for status and inspect.
#[derive(Debug, Clone)]
pub struct JournalStatus {
    pub sealed_segments: usize,
    pub journal_bytes: u64,
    pub active_seq: u64,
    pub last_lsn: u64,
    pub durable_lsn: u64,
    pub watermark: Watermark,
    pub index_extents: usize,
    pub last_point: Option<Point>,
    pub poisoned: Option<String>,
}

impl Machine {
    /// Create an empty machine directory (no disks yet).
    pub fn create(storage: &dyn Storage, dir: &Path) -> Result<()> {
        if storage.exists(&dir.join(MANIFEST_FILE)) {
            return Err(Error::AlreadyExists(format!(
                "machine {} exists",
                dir.display()
            )));
        }
        storage.create_dir_all(&dir.join(JOURNAL_DIR))?;
        storage.create_dir_all(&dir.join(DISKS_DIR))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| {
            Error::io(
                "random machine id",
                dir,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let manifest = Manifest {
            machine_id: u64::from_le_bytes(id),
            disks: Vec::new(),
        };
        write_atomic(storage, &dir.join(MANIFEST_FILE), &manifest.encode())
    }

    pub fn read_manifest(storage: &dyn Storage, dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = read_all(
            storage.open(&path, OpenMode::ReadOnly)?.as_ref(),
            META_FILE_LIMIT,
        )?;
        Manifest::decode(&bytes).map_err(|e| Error::corruption(&path, e.offset, e.what))
    }

    pub fn read_watermark(storage: &dyn Storage, dir: &Path) -> Result<Watermark> {
        let path = dir.join(JOURNAL_DIR).join(WATERMARK_FILE);
        if !storage.exists(&path) {
            return Ok(Watermark::default());
        }
        let bytes = read_all(
            storage.open(&path, OpenMode::ReadOnly)?.as_ref(),
            META_FILE_LIMIT,
        )?;
        Watermark::decode(&bytes).map_err(|e| Error::corruption(&path, e.offset, e.what))
    }

    /// Add a disk to a machine that is not open. With `import`, copy a raw image into
    /// the new parent, leaving all-zero blocks as holes. Nothing is left behind on error.
    pub fn add_disk(
        storage: &dyn Storage,
        dir: &Path,
        name: &str,
        size: u64,
        import: Option<&mut ImportFn<'_>>,
    ) -> Result<()> {
        validate_name("disk", name)?;
        validate_disk_size(size)?;
        let mut manifest = Self::read_manifest(storage, dir)?;
        if manifest.disks.iter().any(|d| d.name == name) {
            return Err(Error::AlreadyExists(format!(
                "disk {name} exists in machine {}",
                dir.display()
            )));
        }
        let path = dir.join(DISKS_DIR).join(format!("{name}.img"));
        let result = (|| {
            let parent = storage.open(&path, OpenMode::CreateNew)?;
            parent.set_len(size)?;
            if let Some(import) = import {
                import(parent.as_ref())?;
            }
            parent.sync_data()?;
            storage.sync_dir(&dir.join(DISKS_DIR))?;
            let id = manifest.disks.iter().map(|d| d.id + 1).max().unwrap_or(0);
            manifest.disks.push(DiskEntry {
                id,
                name: name.to_string(),
                size,
            });
            write_atomic(storage, &dir.join(MANIFEST_FILE), &manifest.encode())
        })();
        if result.is_err() && storage.exists(&path) {
            let _ = storage.remove_file(&path);
        }
        result
    }

    /// Open a machine: read its manifest and watermark, recover the journal, rebuild the
    /// index. The background compactor is not started; see [`Machine::start_compactor`].
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        cfg: JournalConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let manifest = Self::read_manifest(storage.as_ref(), dir)?;
        let watermark = Self::read_watermark(storage.as_ref(), dir)?;
        let mut disks = Vec::new();
        for (i, d) in manifest.disks.iter().enumerate() {
            if d.id as usize != i {
                return Err(Error::corruption(
                    dir.join(MANIFEST_FILE),
                    0,
                    "disk ids are not 0..n",
                ));
            }
            // The manifest's names become paths and FUSE entries: never trust them.
            let bad_name = validate_name("disk", &d.name).is_err()
                || manifest.disks.iter().filter(|o| o.name == d.name).count() > 1
                || validate_disk_size(d.size).is_err();
            if bad_name {
                return Err(Error::corruption(
                    dir.join(MANIFEST_FILE),
                    0,
                    format!("disk entry {:?} ({} bytes) is not valid", d.name, d.size),
                ));
            }
            let path = dir.join(DISKS_DIR).join(format!("{}.img", d.name));
            let parent = storage.open(&path, OpenMode::ReadWrite)?;
            let len = parent.len()?;
            if len != d.size {
                return Err(Error::InvalidInput(format!(
                    "parent image {} is {len} bytes but the disk is {} bytes; it was changed \
                     outside replog",
                    path.display(),
                    d.size
                )));
            }
            disks.push(Disk {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                parent,
            });
        }
        let mut state = IndexState {
            disks: vec![ExtentMap::new(); disks.len()],
            files: BTreeMap::new(),
            damaged: BTreeMap::new(),
        };
        let jdir = dir.join(JOURNAL_DIR);
        let params = JournalParams {
            machine_id: manifest.machine_id,
            disk_count: disks.len() as u32,
            segment_bytes: cfg.segment_bytes,
            watermark_lsn: watermark.lsn,
            watermark_seq: watermark.segment_seq,
        };
        let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
        let mut outside: Option<Error> = None;
        let rec = journal::recover(storage.clone(), &jdir, params, |seq, r| {
            if let Some(what) = record_outside_disk(&r.header, &sizes) {
                let path = jdir.join(crate::format::segment::segment_name(seq));
                outside.get_or_insert(Error::corruption(path, r.offset, what));
                return;
            }
            apply_to_index(
                &mut state,
                seq,
                r.header.kind,
                r.header.disk,
                r.header.offset,
                r.header.length,
                r.payload_offset,
            );
        })?;
        if let Some(e) = outside {
            return Err(e);
        }
        for note in &rec.repairs {
            tracing::info!(machine = name, "{note}");
        }
        for s in &rec.sealed {
            state.files.insert(s.seq, s.file.clone());
        }
        state
            .files
            .insert(rec.writer.active_seq(), rec.writer.active_file());
        // What recovery found may still be only in the page cache (a killed process
        // leaves it there): make it durable before anyone is told it is.
        rec.writer.active_file().sync_data()?;
        let durable = rec.writer.last_lsn();
        let inner = Arc::new(MachineInner {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            storage,
            machine_id: manifest.machine_id,
            disks,
            writer: Mutex::new(rec.writer),
            state: RwLock::new(state),
            sealed: Mutex::new(rec.sealed.into_iter().map(|s| (s.seq, s)).collect()),
            points: Mutex::new(rec.points),
            watermark: Mutex::new(watermark),
            holds: Holds::default(),
            compaction: Mutex::new(()),
            sync: Mutex::new(SyncState {
                durable_lsn: durable,
                in_progress: false,
            }),
            sync_cv: Condvar::new(),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            poisoned_by_io: AtomicBool::new(false),
            mended: Mutex::new(Default::default()),
            last_append_ns: AtomicU64::new(0),
            compactor_kick: Mutex::new(None),
            digests: Mutex::new(None),
        });
        // Were the parents changed while replog was not running?
        let stamp_path = dir.join(STAMP_FILE);
        let changed_offline = match std::fs::read_to_string(&stamp_path) {
            Ok(old) if old != parents_stamp(dir, &inner.disks) => {
                let names: Vec<&str> = old
                    .lines()
                    .zip(
                        parents_stamp(dir, &inner.disks)
                            .lines()
                            .map(str::to_string)
                            .collect::<Vec<_>>(),
                    )
                    .filter(|(a, b)| a != b)
                    .filter_map(|(a, _)| a.split(' ').next())
                    .collect();
                Some(format!(
                    "disk image(s) {} changed while replog was not running",
                    names.join(", ")
                ))
            }
            _ => None,
        };
        if let Some(why) = &changed_offline {
            tracing::warn!(machine = name, "{why}");
        }
        Ok(Machine {
            inner,
            compactor: Mutex::new(None),
            changed_offline,
        })
    }

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
    pub fn hold_watermark(&self, lsn: u64) -> compactor::WatermarkHold {
        // Wait for a merge in progress: once this returns, nothing above `lsn` is
        // being merged into the parents.
        let _no_merge_running = self.inner.compaction.lock();
        self.inner.holds.hold(lsn)
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
        self.inner.disks.get(disk).map(|d| d.parent.clone())
    }

    /// The sealed segments still in the journal, oldest first.
    pub fn sealed_segments(&self) -> Vec<SealedSegment> {
        self.inner.sealed.lock().values().cloned().collect()
    }

    pub fn points(&self) -> Vec<Point> {
        self.inner.points.lock().clone()
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
            active_seq,
            last_lsn,
            durable_lsn: self.inner.sync.lock().durable_lsn,
            watermark: *self.inner.watermark.lock(),
            index_extents,
            last_point: self.inner.points.lock().last().copied(),
            poisoned: self.inner.poison_reason.lock().clone(),
        }
    }

    /// Flush, stop the compactor and close.
    pub fn close(self) -> Result<()> {
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

/// A write or zero record whose range does not fit its disk (a checksum only proves
/// the bytes are the ones written, not that they make sense).
pub(crate) fn record_outside_disk(
    h: &crate::format::RecordHeader,
    sizes: &[u64],
) -> Option<String> {
    if h.kind == RecordKind::Point {
        return None;
    }
    let size = sizes.get(h.disk as usize)?;
    let end = h.offset.checked_add(h.length)?;
    (end > *size).then(|| {
        format!(
            "record for disk {} covers {}..{end}, past the disk's {size} bytes",
            h.disk, h.offset
        )
    })
}

pub(crate) fn apply_to_index(
    state: &mut IndexState,
    seq: u64,
    kind: RecordKind,
    disk: u32,
    offset: u64,
    length: u64,
    payload_offset: u64,
) {
    let Some(map) = state.disks.get_mut(disk as usize) else {
        return;
    };
    match kind {
        RecordKind::Write => map.insert(
            offset,
            length,
            Location::Segment {
                seq,
                offset: payload_offset,
            },
        ),
        RecordKind::Zero => map.insert(offset, length, Location::Zero { seq }),
        RecordKind::Point => {}
    }
}

impl MachineInner {
    pub fn last_append_ns(&self) -> u64 {
        self.last_append_ns.load(Ordering::Relaxed)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
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

    /// A segment turned out damaged: stop serving it and poison the machine (the
    /// damage must be mended, by resynchronisation, before anything continues).
    pub(crate) fn damaged(&self, seq: u64, err: Error) -> Error {
        tracing::error!(machine = %self.name, "segment {seq} is damaged: {err}");
        self.state.write().damaged.insert(seq, err.to_string());
        self.poison_with(&err);
        err
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

    /// Append records for a write or zero range, update the index, rotate if due.
    fn append(
        &self,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<u64> {
        let d = self.disk(disk)?;
        self.check_range(
            d,
            if kind == RecordKind::Write {
                "write"
            } else {
                "zero"
            },
            offset,
            len,
        )?;
        if len == 0 {
            return Ok(self.writer.lock().last_lsn());
        }
        let mut w = self.writer.lock();
        self.check_poison()?;
        self.append_locked(&mut w, disk, kind, offset, len, data, true)?;
        let lsn = w.last_lsn();
        if w.wants_rotation() {
            self.seal_locked(&mut w)?;
        }
        let writeback = w.take_writeback();
        drop(w);
        if let Some((file, from, len)) = writeback {
            file.start_writeback(from, len);
        }
        self.last_append_ns
            .store(crate::format::now_ns(), Ordering::Relaxed);
        Ok(lsn)
    }

    /// Append records for a range and index them, the writer lock held (`append`'s
    /// core; also used to mend damaged ranges).
    #[allow(clippy::too_many_arguments)]
    fn append_locked(
        &self,
        w: &mut JournalWriter,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        digest: bool,
    ) -> Result<()> {
        let mut placed = Vec::new();
        let step = u64::from(MAX_PAYLOAD);
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(if kind == RecordKind::Write { step } else { len });
            let payload = match kind {
                RecordKind::Write => data.get(at as usize..(at + n) as usize).unwrap_or(&[]),
                _ => &[],
            };
            let a = w
                .append(kind, 0, disk, offset + at, n, payload)
                .map_err(|e| self.poison(&e))?;
            placed.push((a, offset + at, n));
            at += n;
        }
        {
            let mut st = self.state.write();
            for (a, off, n) in &placed {
                apply_to_index(&mut st, a.seq, kind, disk, *off, *n, a.payload_offset);
            }
        }
        if digest {
            self.update_digest(disk, kind, offset, len, data)
                .map_err(|e| self.poison(&e))?;
        }
        Ok(())
    }

    /// Keep the disk's digest current after a write or zero range was indexed (the
    /// writer lock is held, so no other write can come between). Partial blocks are
    /// read back through the index.
    fn update_digest(
        &self,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<()> {
        let mut g = self.digests.lock();
        let Some(d) = g.as_mut().and_then(|v| v.get_mut(disk as usize)) else {
            return Ok(());
        };
        let mut read = |at: u64, buf: &mut [u8]| self.read(disk, at, buf);
        match kind {
            RecordKind::Write => d.write(offset, data, &mut read),
            _ => d.zero(offset, len, &mut read),
        }
    }

    /// The digests a point appended now carries.
    fn point_digests(&self) -> Option<Vec<u64>> {
        self.digests
            .lock()
            .as_ref()
            .map(|v| v.iter().map(DiskDigest::value).collect())
    }

    /// Append a point record (the writer lock held).
    fn append_point_locked(&self, w: &mut JournalWriter, app: bool) -> Result<Point> {
        let p = w
            .append_point(app, self.point_digests())
            .map_err(|e| self.poison(&e))?;
        self.points.lock().push(p);
        Ok(p)
    }

    /// Record the parents as they are now (after a merge, at close).
    pub(crate) fn write_parents_stamp(&self) {
        if !self.dir.exists() {
            return; // not on the real file system (in-memory storage in tests)
        }
        let path = self.dir.join(STAMP_FILE);
        let stamp = parents_stamp(&self.dir, &self.disks);
        if let Err(e) = std::fs::write(&path, stamp) {
            tracing::warn!(machine = %self.name, "{}: {e}", path.display());
        }
    }

    /// Start keeping digests: compute every disk's from its contents (reading only
    /// where there is data), with the writer lock held so no write slips past.
    pub(crate) fn keep_digests(&self) -> Result<()> {
        let w = self.writer.lock();
        if self.digests.lock().is_some() {
            return Ok(());
        }
        let mut all = Vec::new();
        for (id, d) in self.disks.iter().enumerate() {
            let id = id as u32;
            let mut ranges = Vec::new();
            let mut pos = 0;
            while pos < d.size {
                let Some(start) = self.seek(id, pos, true)? else {
                    break;
                };
                let end = self.seek(id, start, false)?.unwrap_or(d.size).min(d.size);
                ranges.push((start, end));
                pos = end.max(start + 1);
            }
            let mut dd = DiskDigest::zeroed(d.size);
            // The per-block CRCs of the data ranges (each block read once, only as much
            // as the range needs); the rest stay zero blocks.
            let step = 1u64 << 20;
            let mut buf = vec![0u8; step as usize];
            let mut next = 0u64; // first block not yet read
            for &(start, end) in &ranges {
                let mut at = (start / crate::digest::BLOCK).max(next) * crate::digest::BLOCK;
                let stop = (end.div_ceil(crate::digest::BLOCK) * crate::digest::BLOCK).min(d.size);
                while at < stop {
                    let n = step.min(stop - at) as usize;
                    let b = buf.get_mut(..n).unwrap_or(&mut []);
                    self.read(id, at, b)?;
                    for (k, blk) in b.chunks(crate::digest::BLOCK as usize).enumerate() {
                        dd.set(at / crate::digest::BLOCK + k as u64, crc32c::crc32c(blk));
                    }
                    at += n as u64;
                }
                next = stop.div_ceil(crate::digest::BLOCK);
            }
            all.push(dd);
        }
        *self.digests.lock() = Some(all);
        drop(w);
        Ok(())
    }

    /// Seal with the writer lock held. A segment always ends on a point record, so
    /// every seal is a point with digests.
    pub(crate) fn seal_locked(&self, w: &mut JournalWriter) -> Result<Option<u64>> {
        if w.has_unpointed_writes() {
            self.append_point_locked(w, false)?;
        }
        let sealed = match w.seal() {
            Ok(s) => s,
            Err(e) => return Err(self.poison(&e)),
        };
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let last = sealed.last_lsn;
        self.state
            .write()
            .files
            .insert(w.active_seq(), w.active_file());
        self.points.lock().push(Point {
            lsn: last,
            time_ns: sealed.sealed_ns,
            kind: PointKind::Seal,
        });
        self.sealed.lock().insert(sealed.seq, sealed);
        {
            let mut s = self.sync.lock();
            s.durable_lsn = s.durable_lsn.max(last);
        }
        self.sync_cv.notify_all();
        if let Some(kick) = self.compactor_kick.lock().as_ref() {
            let _ = kick.try_send(());
        }
        Ok(Some(last))
    }

    /// Group commit: see the module documentation.
    pub(crate) fn flush(&self) -> Result<u64> {
        self.check_poison()?;
        let target = {
            let mut w = self.writer.lock();
            self.check_poison()?;
            if w.has_unpointed_writes() {
                self.append_point_locked(&mut w, false)?;
            }
            let t = w.last_lsn();
            if w.wants_rotation() {
                self.seal_locked(&mut w)?;
            }
            t
        };
        self.sync_to(target)?;
        Ok(target)
    }

    /// Append a point (app-consistent or not) and make it durable.
    pub(crate) fn checkpoint(&self, app: bool) -> Result<Point> {
        let p = {
            let mut w = self.writer.lock();
            self.check_poison()?;
            self.append_point_locked(&mut w, app)?
        };
        self.sync_to(p.lsn)?;
        Ok(p)
    }

    fn sync_to(&self, target: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            self.check_poison()?;
            if s.durable_lsn >= target {
                return Ok(());
            }
            if !s.in_progress {
                s.in_progress = true;
                break;
            }
            self.sync_cv.wait(&mut s);
        }
        drop(s);
        // This caller leads: one fdatasync covers every record appended so far, its own
        // and those of every caller now waiting.
        let (file, lsn) = {
            let w = self.writer.lock();
            (w.active_file(), w.last_lsn())
        };
        let res = file.sync_data();
        let mut s = self.sync.lock();
        s.in_progress = false;
        let out = match res {
            Ok(()) => {
                s.durable_lsn = s.durable_lsn.max(lsn);
                Ok(())
            }
            Err(e) => Err(self.poison(&e)),
        };
        drop(s);
        self.sync_cv.notify_all();
        out
    }

    /// Next data (or hole) at or after `offset` of `disk`: the index first, the parent
    /// where the index has nothing.
    pub(crate) fn seek(&self, disk: u32, offset: u64, data: bool) -> Result<Option<u64>> {
        let d = self.disk(disk)?;
        let size = d.size;
        let mut pos = offset;
        while pos < size {
            let ext = {
                let st = self.state.read();
                st.disks.get(disk as usize).and_then(|m| m.at_or_after(pos))
            };
            match ext {
                Some((start, e)) if start <= pos => {
                    let is_data = !e.loc.is_zero();
                    if is_data == data {
                        return Ok(Some(pos));
                    }
                    pos = start + e.len;
                }
                other => {
                    // The parent answers for pos..next (next: the next extent or the end).
                    let next = other.map(|(s, _)| s).unwrap_or(size).min(size);
                    let found = if data {
                        d.parent.seek_data(pos)?
                    } else {
                        Some(d.parent.seek_hole(pos)?)
                    };
                    match found {
                        Some(at) if at < next => return Ok(Some(at.max(pos))),
                        _ => pos = next,
                    }
                }
            }
        }
        Ok(if data { None } else { Some(size.max(offset)) })
    }

    /// Split `offset..offset+len` of `disk` into pieces and take handles to the segment
    /// files they need, in one critical section (see the module documentation).
    fn resolve(&self, disk: u32, offset: u64, len: u64) -> Result<Resolved> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut files: Vec<(u64, Arc<dyn StorageFile>)> = Vec::new();
        {
            let st = self.state.read();
            if let Some(map) = st.disks.get(disk as usize) {
                map.lookup(offset, len, &mut pieces);
            }
            for p in &pieces {
                if let Some(loc) = p.loc {
                    if let Some(why) = st.damaged.get(&loc.segment()) {
                        return Err(Error::corruption(&self.dir, p.start, why.clone()));
                    }
                }
                if let Some(Location::Segment { seq, .. }) = p.loc {
                    if !files.iter().any(|(s, _)| *s == seq) {
                        let f = st.files.get(&seq).ok_or_else(|| {
                            Error::corruption(
                                &self.dir,
                                0,
                                format!("index points into unknown segment {seq}"),
                            )
                        })?;
                        files.push((seq, f.clone()));
                    }
                }
            }
        }
        if pieces.is_empty() {
            pieces.push(Piece {
                start: offset,
                len,
                loc: None,
            });
        }
        Ok((pieces, files))
    }

    /// Start reading a range into the page cache (for sequential readers).
    fn prefetch(&self, disk: u32, offset: u64, len: u64) -> Result<()> {
        let d = self.disk(disk)?;
        let len = len.min(d.size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let (pieces, files) = self.resolve(disk, offset, len)?;
        for p in pieces {
            match p.loc {
                None => d.parent.prefetch(p.start, p.len),
                Some(Location::Segment { seq, offset: at }) => {
                    if let Some((_, f)) = files.iter().find(|(s, _)| *s == seq) {
                        f.prefetch(at, p.len);
                    }
                }
                Some(Location::Zero { .. }) => {}
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of disk `disk`.
    fn read(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let d = self.disk(disk)?;
        self.check_range(d, "read", offset, buf.len() as u64)?;
        let (pieces, files) = self.resolve(disk, offset, buf.len() as u64)?;
        for p in pieces {
            let from = (p.start - offset) as usize;
            let Some(dst) = buf.get_mut(from..from + p.len as usize) else {
                continue;
            };
            match p.loc {
                Some(Location::Zero { .. }) => dst.fill(0),
                Some(Location::Segment { seq, offset: at }) => {
                    let f = files.iter().find(|(s, _)| *s == seq).map(|(_, f)| f);
                    if let Some(f) = f {
                        f.read_exact_at(dst, at)?;
                    }
                }
                None => {
                    let n = d.parent.read_at(dst, p.start)?;
                    if let Some(rest) = dst.get_mut(n..) {
                        rest.fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Volume {
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
        self.inner.read(self.disk, offset, buf)
    }

    /// Hint that `offset..offset+len` will be read soon (sequential readers).
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.prefetch(self.disk, offset, len)
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

/// A range whose newest data lies in a damaged segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub seq: u64,
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    /// The data, when its record still verifies (it lies before the damage).
    pub data: Option<Vec<u8>>,
}

impl Machine {
    /// Whether a segment of this machine was found damaged (and is not mended yet).
    pub fn has_damage(&self) -> bool {
        !self.inner.state.read().damaged.is_empty()
    }

    /// Whether the machine refuses writes (a failed write or sync, or damage found).
    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// A segment turned out damaged (the shipper's check before sending): its data is
    /// not served any more and the machine stops taking writes until it is mended.
    pub fn report_damage(&self, seq: u64, err: Error) -> Error {
        self.inner.damaged(seq, err)
    }

    /// Every range whose newest data lies in a damaged segment, with the data where
    /// the segment's records still verify up to it.
    pub fn damaged_ranges(&self) -> Result<Vec<DamagedRange>> {
        let inner = &self.inner;
        let st = inner.state.read();
        let mut out = Vec::new();
        for &seq in st.damaged.keys() {
            let Some(file) = st.files.get(&seq) else {
                continue;
            };
            // Records wholly before the first fault still verify.
            let first_lsn = inner.sealed.lock().get(&seq).map(|g| g.first_lsn);
            let expect = Expect {
                machine_id: Some(inner.machine_id),
                seq: Some(seq),
                first_lsn,
                disk_count: Some(inner.disks.len() as u32),
            };
            let good_until =
                match crate::journal::reader::scan_segment(file.as_ref(), expect, |_| Ok(())) {
                    Ok(scan) => scan.fault.map_or(scan.end, |f| f.offset),
                    Err(_) => 0,
                };
            for (d, map) in st.disks.iter().enumerate() {
                for (start, e) in map.iter() {
                    if e.loc.segment() != seq {
                        continue;
                    }
                    let data = match e.loc {
                        Location::Segment { offset, .. } if offset + e.len <= good_until => {
                            let mut buf = vec![0u8; e.len as usize];
                            file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
                        }
                        _ => None,
                    };
                    out.push(DamagedRange {
                        seq,
                        disk: d as u32,
                        offset: start,
                        len: e.len,
                        data,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Mend damaged segments: rewrite each range (`data` for every range
    /// [`Machine::damaged_ranges`] gave) as new writes — only where the range still
    /// reads from the damaged segment — then let the machine take writes again and
    /// have merges skip those segments. Refused if a write or sync failed too.
    pub fn mend(&self, ranges: &[(DamagedRange, Vec<u8>)]) -> Result<()> {
        let inner = &self.inner;
        if inner.poisoned_by_io.load(Ordering::Acquire) {
            return inner.check_poison();
        }
        let mut w = inner.writer.lock();
        // Digests after every piece is in: a partial block read back before that could
        // still reach into the damaged segment.
        let mut written: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        for (r, data) in ranges {
            if data.len() as u64 != r.len {
                return Err(Error::InvalidInput(format!(
                    "mend of {}+{} with {} bytes",
                    r.offset,
                    r.len,
                    data.len()
                )));
            }
            // Only the pieces still in the damaged segment (a newer write wins).
            let mut pieces = Vec::new();
            if let Some(map) = inner.state.read().disks.get(r.disk as usize) {
                map.lookup(r.offset, r.len, &mut pieces);
            }
            for p in pieces {
                if p.loc.map(Location::segment) != Some(r.seq) {
                    continue;
                }
                let from = (p.start - r.offset) as usize;
                let piece = data.get(from..from + p.len as usize).unwrap_or(&[]);
                inner.append_locked(
                    &mut w,
                    r.disk,
                    RecordKind::Write,
                    p.start,
                    p.len,
                    piece,
                    false,
                )?;
                written.push((r.disk, p.start, piece.to_vec()));
            }
        }
        let still = {
            let st = inner.state.read();
            st.disks.iter().any(|m| {
                m.iter()
                    .any(|(_, e)| st.damaged.contains_key(&e.loc.segment()))
            })
        };
        if still {
            return Err(Error::InvalidInput(
                "damaged ranges remain after mending".into(),
            ));
        }
        {
            let mut st = inner.state.write();
            let seqs: Vec<u64> = st.damaged.keys().copied().collect();
            inner.mended.lock().extend(seqs);
            st.damaged.clear();
        }
        for (disk, at, piece) in &written {
            inner
                .update_digest(*disk, RecordKind::Write, *at, piece.len() as u64, piece)
                .map_err(|e| inner.poison(&e))?;
        }
        *inner.poison_reason.lock() = None;
        inner.poisoned.store(false, Ordering::Release);
        if w.wants_rotation() {
            inner.seal_locked(&mut w)?;
        }
        drop(w);
        tracing::warn!(machine = %inner.name, "damaged segments mended ({} ranges rewritten)", ranges.len());
        inner.flush().map(|_| ())
    }

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
