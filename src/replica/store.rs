//! A replica's store at the target: every segment received is verified like the
//! source's own recovery would verify it, stored gap-free and exactly once,
//! encrypted, fsynced — and only then acknowledged. Below the segments lie the
//! replica parent images, kept as encrypted fixed-size chunks.
//!
//! ```text
//! SITE/replicas/<machine>/replica.meta             manifest: source site, machine id, disks
//! SITE/replicas/<machine>/received                 last segment stored (LSN, seq): a watermark file
//! SITE/replicas/<machine>/parent.meta              what the parent chunks hold (ParentMark)
//! SITE/replicas/<machine>/retention.meta           how long points are kept (Retention)
//! SITE/replicas/<machine>/segments/<seq>.seg.enc   encrypted segments (see crypt.rs)
//! SITE/replicas/<machine>/segments/<seq>.idx.enc   each one's records and points (SegmentIndex)
//! SITE/replicas/<machine>/parent/<disk>/<n>.enc    parent chunk n of disk id <disk>: bytes
//!                                                  n*256KiB.. of the disk; missing = zeroes
//! SITE/replicas/<machine>/initial                  initial-copy progress (chunks, position, done)
//! SITE/replicas/<machine>/pins/, merge.lock        readers' pins (see pin.rs)
//! SITE/replicas/<machine>/damaged                  why the replica needs a resync (text)
//! SITE/replicas/<machine>/patches/<n>.{data,idx}.enc  a resync's chunks, on top of the
//!                                                  parent until the compactor folds them
//! SITE/replicas/<machine>/resync.meta              a resync under way (see resync.rs)
//! ```
//!
//! Order for a new segment: verify it, write its index and then the segment (each to a
//! temporary file, fsync, rename, fsync the directory), then persist `received`. A
//! crash between the rename and `received` leaves one segment past the mark; opening
//! the store for writing verifies it and takes it in, or removes it if it does not
//! verify. Readers (restore, views, the target compactor) open the store read-only and
//! never look past the mark.
//!
//! The initial copy is written straight into the parent chunks (read, overlay,
//! encrypt, write temporary, fsync, rename), then its position is persisted: a resent
//! chunk after a crash overlays the same bytes again.

use super::crypt::ReplicaKey;
use crate::error::{Error, Result};
use crate::format::meta::{self, DiskEntry, Watermark, KIND_REPLICA_MANIFEST};
use crate::format::segment::segment_name;
use crate::format::RecordKind;
use crate::journal::reader::{scan_segment, Expect, FaultKind};
use crate::names::validate_name;
use crate::storage::{write_atomic, FileStorage, MemStorage, OpenMode, Storage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const REPLICAS_DIR: &str = "replicas";
const MANIFEST: &str = "replica.meta";
const RECEIVED: &str = "received";
const SEGMENTS: &str = "segments";
const PARENT: &str = "parent";
const PARENT_MARK: &str = "parent.meta";
const RETENTION: &str = "retention.meta";
const INITIAL: &str = "initial";
const DAMAGED: &str = "damaged";
const PATCHES: &str = "patches";
pub(crate) const PINS: &str = "pins";
pub(crate) const MERGE_LOCK: &str = "merge.lock";

/// Bytes per parent chunk. Smaller chunks rewrite less when scattered blocks change (a
/// merge or a resync rewrites every chunk it touches) but make more files; 256 KiB
/// measured a resync with 1% of blocks changed 1.4x faster than 1 MiB, and restore
/// no slower (see tools/bench).
pub const CHUNK_BYTES: u64 = 256 << 10;
/// Dirty parent chunks a [`ChunkEditor`] keeps in memory before writing them out.
const EDITOR_BUDGET: usize = 256 << 20;

/// What the replica parent chunks hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentMark {
    /// Every record with an LSN <= `lsn` is in the parent chunks; the chain goes on
    /// with segment `seq + 1`.
    pub lsn: u64,
    pub seq: u64,
    /// The recovery point the parent stands for, when it is one (after a merge; the
    /// initial copy is not).
    pub point: Option<IndexedPoint>,
    /// A merge toward (LSN, seq) is under way: points before that LSN are gone, and
    /// each parent chunk is somewhere between `lsn` and it (replaying the chain from
    /// `seq + 1` over any of those states gives the same result).
    pub merging_to: Option<(u64, u64)>,
    /// A resynchronisation is rewriting the parent (see resync.rs): no point can be
    /// opened until it ends.
    pub resyncing: bool,
    /// Points before this LSN are not consistent (the chunks a resync took were read
    /// at various times after its base) and are never offered.
    pub valid_from: u64,
    /// Patch files 1..=patches (a resync's chunks) lie on top of the parent chunks,
    /// below the segments, until the target compactor folds them in.
    pub patches: u64,
}

/// Sequence numbers from here on name patch files where a segment's number would go
/// (segment numbers stay below 2^62): patch `n` is `PATCH_SEQ + n`.
pub const PATCH_SEQ: u64 = 1 << 62;

/// How long a replica keeps recovery points (set by the source's relationship).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Every point younger than this is kept.
    pub window_ms: u64,
    /// App-consistent points younger than this are kept (at least `window_ms`).
    pub app_window_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            window_ms: 24 * 3600 * 1000,
            app_window_ms: 72 * 3600 * 1000,
        }
    }
}

/// One record of a stored segment, as its index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedRecord {
    pub lsn: u64,
    pub disk: u32,
    /// A zero (discard) record; otherwise a write whose payload is at `payload_at`
    /// in the segment's plain bytes.
    pub zero: bool,
    pub offset: u64,
    pub length: u64,
    pub payload_at: u64,
}

/// One recovery point in a stored segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPoint {
    pub lsn: u64,
    /// The source's clock at the point.
    pub time_ns: u64,
    pub app: bool,
    pub digests: Option<Vec<u64>>,
    /// This site's clock when the segment holding the point was stored: retention
    /// ages points by it, so a source clock that is off cannot expire history early
    /// or keep it for ever.
    pub received_ns: u64,
}

/// The records and points of one stored segment (`<seq>.idx.enc`, postcard, in field
/// order), so points can be listed and a point's image mapped without decrypting
/// every segment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub sealed_ns: u64,
    pub records: Vec<IndexedRecord>,
    pub points: Vec<IndexedPoint>,
}

/// How far initial replication got (persisted after every chunk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialProgress {
    /// Base chunks stored.
    pub chunks: u64,
    /// Where the next chunk may start: disk and byte offset.
    pub disk: u32,
    pub offset: u64,
    /// Every disk has been copied.
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaManifest {
    pub source_site: [u8; 32],
    pub machine_id: u64,
    pub disks: Vec<DiskEntry>,
    /// The chain starts after this LSN and segment (what the initial copy stands for).
    pub base_lsn: u64,
    pub base_seq: u64,
}

/// What happened to a segment handed to [`ReplicaStore::receive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Stored now; everything up to `lsn` is durable here.
    Stored { lsn: u64 },
    /// Stored before (a resend); nothing changed.
    Duplicate { lsn: u64 },
}

/// One machine's replica segments.
#[derive(Debug)]
pub struct ReplicaStore {
    dir: PathBuf,
    key: ReplicaKey,
    manifest: ReplicaManifest,
    received: Watermark,
    initial: InitialProgress,
    parent: ParentMark,
    retention: Retention,
}

fn enc_name(seq: u64) -> String {
    format!("{}.enc", segment_name(seq))
}

fn idx_name(seq: u64) -> String {
    format!("{seq:020}.idx.enc")
}

pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    path: &Path,
    kind: u16,
) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let b = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let body = meta::decode(kind, &b).map_err(|e| Error::corruption(path, e.offset, e.what))?;
    postcard::from_bytes(body)
        .map(Some)
        .map_err(|e| Error::corruption(path, 24, e.to_string()))
}

pub(crate) fn write_meta<T: Serialize>(path: &Path, kind: u16, v: &T) -> Result<()> {
    let body = postcard::to_stdvec(v).map_err(|e| Error::InvalidInput(e.to_string()))?;
    write_atomic(&FileStorage, path, &meta::encode(kind, &body))
}

impl ReplicaStore {
    pub fn dir_of(site: &Path, machine: &str) -> Result<PathBuf> {
        validate_name("machine", machine)?;
        Ok(site.join(REPLICAS_DIR).join(machine))
    }

    /// Start a replica of `machine`.
    /// Start a replica of `machine` whose chain begins after `base` (the point the
    /// initial copy of the disks stands for: segments up to it are never sent).
    pub fn create(
        site: &Path,
        machine: &str,
        manifest: ReplicaManifest,
        base: Watermark,
        key: ReplicaKey,
    ) -> Result<Self> {
        let dir = Self::dir_of(site, machine)?;
        if dir.join(MANIFEST).exists() {
            return Err(Error::AlreadyExists(format!(
                "a replica of {machine} exists at {}",
                dir.display()
            )));
        }
        for d in &manifest.disks {
            validate_name("disk", &d.name)?;
            crate::names::validate_disk_size(d.size)?;
        }
        let fs = FileStorage;
        fs.create_dir_all(&dir.join(SEGMENTS))?;
        fs.create_dir_all(&dir.join(PARENT))?;
        fs.create_dir_all(&dir.join(PINS))?;
        // The marks first: the manifest, written last, says "created".
        write_atomic(&fs, &dir.join(RECEIVED), &base.encode())?;
        let parent = ParentMark {
            lsn: base.lsn,
            seq: base.segment_seq,
            point: None,
            merging_to: None,
            resyncing: false,
            valid_from: 0,
            patches: 0,
        };
        write_meta(&dir.join(PARENT_MARK), meta::KIND_PARENT_MARK, &parent)?;
        let body =
            postcard::to_stdvec(&manifest).map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_atomic(
            &fs,
            &dir.join(MANIFEST),
            &meta::encode(KIND_REPLICA_MANIFEST, &body),
        )?;
        Self::open(site, machine, key)
    }

    /// Open for receiving (the serve that owns the site): a segment a crash left past
    /// the mark is taken in or removed.
    pub fn open(site: &Path, machine: &str, key: ReplicaKey) -> Result<Self> {
        let mut store = Self::open_readonly(site, machine, key)?;
        store.reconcile()?;
        Ok(store)
    }

    /// Open for reading (restore, views, the target compactor): changes nothing and
    /// sees nothing past the `received` mark.
    pub fn open_readonly(site: &Path, machine: &str, key: ReplicaKey) -> Result<Self> {
        let dir = Self::dir_of(site, machine)?;
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            return Err(Error::NotFound(format!(
                "site {} holds no replica of {machine}",
                site.display()
            )));
        }
        let manifest: ReplicaManifest = read_meta(&mpath, KIND_REPLICA_MANIFEST)?
            .ok_or_else(|| Error::NotFound(mpath.display().to_string()))?;
        if !dir.join(PARENT_MARK).exists() && dir.join("base").exists() {
            // Written before replica parents existed: its initial copy is elsewhere.
            return Err(Error::Unsupported {
                path: dir.clone(),
                what: "a replica in the layout before replica parents (base/ chunks); \
                       remove it and protect the machine again"
                    .into(),
            });
        }
        let mut store = ReplicaStore {
            dir,
            key,
            received: Watermark::default(),
            initial: InitialProgress::default(),
            parent: ParentMark {
                lsn: manifest.base_lsn,
                seq: manifest.base_seq,
                point: None,
                merging_to: None,
                resyncing: false,
                valid_from: 0,
                patches: 0,
            },
            retention: Retention::default(),
            manifest,
        };
        store.refresh()?;
        Ok(store)
    }

    /// Read the marks again (a long-lived reader catching up with the receiver and
    /// the target compactor).
    pub fn refresh(&mut self) -> Result<()> {
        let rpath = self.dir.join(RECEIVED);
        if rpath.exists() {
            let b = std::fs::read(&rpath).map_err(|e| Error::io("read", &rpath, e))?;
            self.received =
                Watermark::decode(&b).map_err(|e| Error::corruption(&rpath, e.offset, e.what))?;
        }
        if let Some(i) = read_meta(&self.dir.join(INITIAL), meta::KIND_INITIAL_PROGRESS)? {
            self.initial = i;
        }
        if let Some(p) = read_meta(&self.dir.join(PARENT_MARK), meta::KIND_PARENT_MARK)? {
            self.parent = p;
        }
        if let Some(r) = read_meta(&self.dir.join(RETENTION), meta::KIND_RETENTION)? {
            self.retention = r;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(&self) -> &ReplicaKey {
        &self.key
    }

    /// What the parent chunks hold.
    pub fn parent(&self) -> &ParentMark {
        &self.parent
    }

    /// Persist a new parent mark (the target compactor).
    pub fn set_parent(&mut self, mark: ParentMark) -> Result<()> {
        write_meta(&self.dir.join(PARENT_MARK), meta::KIND_PARENT_MARK, &mark)?;
        self.parent = mark;
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Persist the retention the source asked for (when it changed).
    pub fn set_retention(&mut self, r: Retention) -> Result<()> {
        if r != self.retention || !self.dir.join(RETENTION).exists() {
            write_meta(&self.dir.join(RETENTION), meta::KIND_RETENTION, &r)?;
            self.retention = r;
        }
        Ok(())
    }

    pub fn manifest(&self) -> &ReplicaManifest {
        &self.manifest
    }

    /// The generation of the machine this replica holds.
    pub fn generation(&self) -> u32 {
        1
    }

    /// The newest segment stored (LSN 0 / seq 0: none).
    pub fn received(&self) -> Watermark {
        self.received
    }

    fn seg_path(&self, seq: u64) -> PathBuf {
        self.dir.join(SEGMENTS).join(enc_name(seq))
    }

    fn idx_path(&self, seq: u64) -> PathBuf {
        self.dir.join(SEGMENTS).join(idx_name(seq))
    }

    /// Take in (or remove) a segment stored just past the mark by a crash.
    fn reconcile(&mut self) -> Result<()> {
        let next = self.received.segment_seq + 1;
        let path = self.seg_path(next);
        if !path.exists() {
            let idx = self.idx_path(next);
            if idx.exists() {
                std::fs::remove_file(&idx).map_err(|e| Error::io("remove", &idx, e))?;
            }
            return Ok(());
        }
        let taken = std::fs::read(&path)
            .map_err(|e| Error::io("read", &path, e))
            .and_then(|ct| self.key.open(self.manifest.machine_id, next, &ct, &path))
            .and_then(|plain| self.verify(next, &plain));
        match taken {
            Ok(index) => {
                tracing::info!("replica: took in segment {next} stored before a crash");
                self.write_index(next, &index)?;
                self.mark(Watermark {
                    lsn: index.last_lsn,
                    segment_seq: next,
                })
            }
            Err(e) => {
                tracing::warn!("replica: removing unacknowledged segment {next}: {e}");
                std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
                FileStorage.sync_dir(&self.dir.join(SEGMENTS))
            }
        }
    }

    /// Why this replica needs a resync, if damage was found in it (`damaged`, text).
    pub fn damage(&self) -> Result<Option<String>> {
        let path = self.dir.join(DAMAGED);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Record damage found in this replica (the source will be told to resync).
    pub fn mark_damaged(&self, why: &str) -> Result<()> {
        write_atomic(&FileStorage, &self.dir.join(DAMAGED), why.as_bytes())
    }

    /// The damage is mended (a resync ended).
    pub(crate) fn clear_damage(&self) -> Result<()> {
        let path = self.dir.join(DAMAGED);
        match std::fs::remove_file(&path) {
            Ok(()) => FileStorage.sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    /// Set the received mark (a resync moves it back to its base).
    pub(crate) fn set_received(&mut self, w: Watermark) -> Result<()> {
        self.mark(w)
    }

    fn mark(&mut self, w: Watermark) -> Result<()> {
        write_atomic(&FileStorage, &self.dir.join(RECEIVED), &w.encode())?;
        self.received = w;
        Ok(())
    }

    /// Verify a whole sealed segment `seq` that must follow what is stored and index
    /// its records and points. Everything the source's recovery checks is checked.
    fn verify(&self, seq: u64, plain: &[u8]) -> Result<SegmentIndex> {
        let named = self.seg_path(seq);
        index_segment(
            &self.manifest,
            seq,
            Some(self.received.lsn + 1),
            plain,
            &named,
        )
    }

    /// Receive segment `seq` (its plain bytes as the source has them). Verified, then
    /// stored durably, then acknowledged; nothing is stored if anything is wrong.
    pub fn receive(&mut self, seq: u64, plain: &[u8]) -> Result<Receipt> {
        if seq <= self.received.segment_seq {
            // The target compactor may have merged it since this store was opened.
            if let Some(p) = read_meta(&self.dir.join(PARENT_MARK), meta::KIND_PARENT_MARK)? {
                self.parent = p;
            }
            if seq <= self.parent.seq {
                // Merged into the parent already (and perhaps deleted): nothing left to
                // compare it with.
                return Ok(Receipt::Duplicate {
                    lsn: self.received.lsn,
                });
            }
            let stored = self.read_segment(seq);
            if stored.is_err() {
                // Merged and removed since the mark was read above?
                if let Some(p) = read_meta(&self.dir.join(PARENT_MARK), meta::KIND_PARENT_MARK)? {
                    self.parent = p;
                }
                if seq <= self.parent.seq {
                    return Ok(Receipt::Duplicate {
                        lsn: self.received.lsn,
                    });
                }
            }
            return match stored {
                Ok(p) if p == plain => Ok(Receipt::Duplicate {
                    lsn: self.received.lsn,
                }),
                Ok(_) => Err(Error::BrokenChain(format!(
                    "segment {seq} differs from the one stored under that number"
                ))),
                Err(e) => Err(e),
            };
        }
        if seq != self.received.segment_seq + 1 {
            return Err(Error::BrokenChain(format!(
                "segment {seq} arrived but {} is next (a gap)",
                self.received.segment_seq + 1
            )));
        }
        let index = self.verify(seq, plain)?;
        self.write_index(seq, &index)?;
        let ct = self.key.seal(self.manifest.machine_id, seq, plain)?;
        write_atomic(&FileStorage, &self.seg_path(seq), &ct)?;
        self.mark(Watermark {
            lsn: index.last_lsn,
            segment_seq: seq,
        })?;
        Ok(Receipt::Stored {
            lsn: index.last_lsn,
        })
    }

    fn write_index(&self, seq: u64, index: &SegmentIndex) -> Result<()> {
        let body = postcard::to_stdvec(index).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let ct = self.key.seal_index(self.manifest.machine_id, seq, &body)?;
        write_atomic(&FileStorage, &self.idx_path(seq), &ct)
    }

    /// The records and points of stored segment `seq` (from its index file, or from
    /// the segment itself when the index is missing).
    pub fn segment_index(&self, seq: u64) -> Result<SegmentIndex> {
        if seq == 0 || seq > self.received.segment_seq {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        let path = self.idx_path(seq);
        match std::fs::read(&path) {
            Ok(ct) => {
                let body = self
                    .key
                    .open_index(self.manifest.machine_id, seq, &ct, &path)?;
                postcard::from_bytes(&body).map_err(|e| Error::corruption(&path, 40, e.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let plain = self.read_segment(seq)?;
                index_segment(&self.manifest, seq, None, &plain, &self.seg_path(seq))
            }
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Remove stored segments `from..=upto` (merged into the parent and needed by no
    /// reader), and their indexes.
    pub fn remove_segments(&self, from: u64, upto: u64) -> Result<u64> {
        let mut n = 0;
        for seq in from..=upto {
            for path in [self.seg_path(seq), self.idx_path(seq)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove", &path, e)),
                }
            }
        }
        if n > 0 {
            FileStorage.sync_dir(&self.dir.join(SEGMENTS))?;
        }
        Ok(n)
    }

    /// The oldest segment file still stored (None: none).
    pub fn oldest_stored_segment(&self) -> Result<Option<u64>> {
        let dir = self.dir.join(SEGMENTS);
        let mut oldest = None;
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let e = e.map_err(|e| Error::io("list", &dir, e))?;
            let name = e.file_name();
            let Some(num) = name.to_str().and_then(|n| {
                n.strip_suffix(".seg.enc")
                    .or_else(|| n.strip_suffix(".idx.enc"))
            }) else {
                continue;
            };
            if let Ok(seq) = num.parse::<u64>() {
                oldest = Some(oldest.map_or(seq, |o: u64| o.min(seq)));
            }
        }
        Ok(oldest)
    }

    pub fn initial(&self) -> InitialProgress {
        self.initial
    }

    fn save_initial(&mut self, p: InitialProgress) -> Result<()> {
        write_meta(&self.dir.join(INITIAL), meta::KIND_INITIAL_PROGRESS, &p)?;
        self.initial = p;
        Ok(())
    }

    /// Store one chunk of the initial copy: `data` is disk `disk` at `offset`. Chunks
    /// must come in disk order, each at or after the previous one's end.
    pub fn receive_base(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<()> {
        if self.initial.done {
            return Err(Error::InvalidInput(
                "the initial copy is already complete".into(),
            ));
        }
        let size = self.disk_size(disk)?;
        let end = offset.saturating_add(data.len() as u64);
        if end > size {
            return Err(Error::OutOfRange {
                what: "initial copy chunk".into(),
                offset,
                end,
                size,
            });
        }
        if (disk, offset) < (self.initial.disk, self.initial.offset) {
            return Err(Error::BrokenChain(format!(
                "initial chunk for disk {disk} at {offset} is behind the copy's position"
            )));
        }
        let mut ed = ChunkEditor::new(self);
        ed.write(disk, offset, data)?;
        ed.finish()?;
        self.save_initial(InitialProgress {
            chunks: self.initial.chunks + 1,
            disk,
            offset: end,
            done: false,
        })
    }

    /// Mark the initial copy complete.
    pub fn finish_initial(&mut self) -> Result<()> {
        let p = InitialProgress {
            done: true,
            ..self.initial
        };
        self.save_initial(p)
    }

    /// Size of disk id `disk` of this replica.
    pub(crate) fn disk_size(&self, disk: u32) -> Result<u64> {
        self.manifest
            .disks
            .get(disk as usize)
            .map(|d| d.size)
            .ok_or_else(|| Error::InvalidInput(format!("no disk {disk} in this replica")))
    }

    fn chunk_path(&self, disk: u32, n: u64) -> PathBuf {
        self.dir
            .join(PARENT)
            .join(disk.to_string())
            .join(format!("{n:010}.enc"))
    }

    /// Length of parent chunk `n` of `disk` (the last one may be short).
    pub fn chunk_len(&self, disk: u32, n: u64) -> Result<usize> {
        let size = self.disk_size(disk)?;
        Ok((size.saturating_sub(n * CHUNK_BYTES)).min(CHUNK_BYTES) as usize)
    }

    /// Parent chunk `n` of `disk`, decrypted and authenticated (None: all zeroes).
    pub fn read_chunk(&self, disk: u32, n: u64) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        Ok(self.read_chunk_into(disk, n, &mut buf)?.then_some(buf))
    }

    /// Parent chunk `n` of `disk` into `buf` (reused: no allocation once it is big
    /// enough); false, and `buf` untouched, when the chunk is all zeroes.
    pub fn read_chunk_into(&self, disk: u32, n: u64, buf: &mut Vec<u8>) -> Result<bool> {
        use std::io::Read;
        let path = self.chunk_path(disk, n);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        buf.clear();
        f.read_to_end(buf)
            .map_err(|e| Error::io("read", &path, e))?;
        let id = u64::from(disk) << 40 | n;
        self.key
            .open_chunk_in_place(self.manifest.machine_id, id, buf, &path)?;
        if buf.len() != self.chunk_len(disk, n)? {
            return Err(Error::corruption(
                &path,
                0,
                format!("parent chunk holds {} bytes", buf.len()),
            ));
        }
        Ok(true)
    }

    /// The parent chunks of `disk` that hold data, in order.
    pub fn stored_chunks(&self, disk: u32) -> Result<Vec<u64>> {
        let dir = self.dir.join(PARENT).join(disk.to_string());
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let e = e.map_err(|e| Error::io("list", &dir, e))?;
            let name = e.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".enc"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn patch_path(&self, n: u64, what: &str) -> PathBuf {
        self.dir.join(PATCHES).join(format!("{n:010}.{what}.enc"))
    }

    /// Store patch `n`: `chunks` (disk, offset, data) as one encrypted file of their
    /// bytes and an index of records pointing into it (LSN 0: below every point).
    pub fn write_patch(&self, n: u64, chunks: &[(u32, u64, Vec<u8>)]) -> Result<()> {
        let mut plain = Vec::new();
        let mut index = SegmentIndex::default();
        for (disk, offset, data) in chunks {
            self.disk_size(*disk).and_then(|size| {
                if offset.saturating_add(data.len() as u64) > size {
                    Err(Error::OutOfRange {
                        what: "resync chunk".into(),
                        offset: *offset,
                        end: offset.saturating_add(data.len() as u64),
                        size,
                    })
                } else {
                    Ok(())
                }
            })?;
            index.records.push(IndexedRecord {
                lsn: 0,
                disk: *disk,
                zero: false,
                offset: *offset,
                length: data.len() as u64,
                payload_at: plain.len() as u64,
            });
            plain.extend_from_slice(data);
        }
        FileStorage.create_dir_all(&self.dir.join(PATCHES))?;
        let id = PATCH_SEQ + n;
        let body = postcard::to_stdvec(&index).map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_atomic(
            &FileStorage,
            &self.patch_path(n, "idx"),
            &self.key.seal_index(self.manifest.machine_id, id, &body)?,
        )?;
        write_atomic(
            &FileStorage,
            &self.patch_path(n, "data"),
            &self.key.seal(self.manifest.machine_id, id, &plain)?,
        )
    }

    /// The records of patch `n`.
    pub fn patch_index(&self, n: u64) -> Result<SegmentIndex> {
        let path = self.patch_path(n, "idx");
        let ct = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let body = self
            .key
            .open_index(self.manifest.machine_id, PATCH_SEQ + n, &ct, &path)?;
        postcard::from_bytes(&body).map_err(|e| Error::corruption(&path, 40, e.to_string()))
    }

    /// Remove every patch file (folded into the parent, needed by no reader).
    pub fn remove_patches(&self) -> Result<()> {
        let dir = self.dir.join(PATCHES);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => FileStorage.sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        }
    }

    /// Whether patch files lie around that the parent mark no longer counts.
    pub fn has_stale_patches(&self) -> bool {
        self.parent.patches == 0 && !self.parent.resyncing && self.dir.join(PATCHES).exists()
    }

    /// The index and plain bytes of a layer: stored segment `seq`, or patch `n` as
    /// `PATCH_SEQ + n`.
    pub fn layer(&self, seq: u64) -> Result<(SegmentIndex, Vec<u8>)> {
        let index = if seq > PATCH_SEQ {
            self.patch_index(seq - PATCH_SEQ)?
        } else {
            self.segment_index(seq)?
        };
        Ok((index, self.read_layer(seq)?))
    }

    /// The plain bytes a map location's `seq` names: a stored segment, or a patch
    /// (`PATCH_SEQ + n`).
    pub fn read_layer(&self, seq: u64) -> Result<Vec<u8>> {
        if seq > PATCH_SEQ {
            let n = seq - PATCH_SEQ;
            let path = self.patch_path(n, "data");
            let ct = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            return self.key.open(self.manifest.machine_id, seq, &ct, &path);
        }
        self.read_segment(seq)
    }

    /// The plain bytes of stored segment `seq`, decrypted and authenticated.
    pub fn read_segment(&self, seq: u64) -> Result<Vec<u8>> {
        if seq == 0 || seq > self.received.segment_seq {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        let path = self.seg_path(seq);
        let ct = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::corruption(
                &path,
                0,
                "segment missing from the replica (deleted or lost)",
            ),
            _ => Error::io("read", &path, e),
        })?;
        self.key.open(self.manifest.machine_id, seq, &ct, &path)
    }
}

/// Verify the plain bytes of sealed segment `seq` of the replica's machine (starting
/// at `first_lsn` when given) and index them; `named` names it in errors.
fn index_segment(
    man: &ReplicaManifest,
    seq: u64,
    first_lsn: Option<u64>,
    plain: &[u8],
    named: &Path,
) -> Result<SegmentIndex> {
    let mem = MemStorage::new();
    let dir = Path::new("/incoming");
    let path = dir.join(segment_name(seq));
    mem.create_dir_all(dir)?;
    let f = mem.open(&path, OpenMode::CreateNew)?;
    f.write_at(&[plain], 0)?;
    let sizes: Vec<u64> = man.disks.iter().map(|d| d.size).collect();
    let mut outside = None;
    let mut index = SegmentIndex::default();
    let expect = Expect {
        machine_id: Some(man.machine_id),
        seq: Some(seq),
        first_lsn,
        disk_count: Some(sizes.len() as u32),
    };
    let scan = scan_segment(f.as_ref(), expect, |rec| {
        if let Some(what) = crate::volume::record_outside_disk(&rec.header, &sizes) {
            outside.get_or_insert((rec.offset, what));
        }
        let h = rec.header;
        match h.kind {
            RecordKind::Point => {
                if let Some((time_ns, app)) = rec.point() {
                    index.points.push(IndexedPoint {
                        lsn: h.lsn,
                        time_ns,
                        app,
                        digests: rec.point_digests(),
                        received_ns: crate::format::now_ns(),
                    });
                }
            }
            kind => index.records.push(IndexedRecord {
                lsn: h.lsn,
                disk: h.disk,
                zero: kind == RecordKind::Zero,
                offset: h.offset,
                length: h.length,
                payload_at: rec.payload_offset,
            }),
        }
        Ok(())
    })?;
    if let Some(fault) = &scan.fault {
        return Err(match fault.kind {
            FaultKind::Discontinuity => Error::BrokenChain(format!(
                "segment {seq} does not continue the chain (offset {}: {})",
                fault.offset, fault.what
            )),
            FaultKind::Damage => Error::corruption(named, fault.offset, fault.what.clone()),
        });
    }
    if let Some((offset, what)) = outside {
        return Err(Error::corruption(named, offset, what));
    }
    match (scan.footer, scan.first_lsn, scan.last_lsn) {
        (Some(footer), Some(first), Some(last)) => {
            index.first_lsn = first;
            index.last_lsn = last;
            index.sealed_ns = footer.sealed_ns;
            // A seal is a point (segments written before seals ended on a point record
            // have none there).
            if index.points.last().map(|p| p.lsn) != Some(last) {
                index.points.push(IndexedPoint {
                    lsn: last,
                    time_ns: footer.sealed_ns,
                    app: false,
                    digests: None,
                    received_ns: crate::format::now_ns(),
                });
            }
            Ok(index)
        }
        _ => Err(Error::corruption(
            named,
            scan.end,
            "segment is not sealed or holds no records",
        )),
    }
}

/// Edits parent chunks: writes and zeroes land in decrypted chunks kept in memory,
/// written out (encrypted, temporary, fsync, rename; all-zero chunks removed) when
/// they pass a memory budget and at [`ChunkEditor::finish`], which also fsyncs the
/// directories. Replaying records over chunks is idempotent, so a crash in between
/// only leaves chunks somewhere between their old and new states.
pub struct ChunkEditor<'a> {
    store: &'a ReplicaStore,
    dirty: BTreeMap<(u32, u64), Vec<u8>>,
    bytes: usize,
    dirs: std::collections::BTreeSet<u32>,
}

impl<'a> ChunkEditor<'a> {
    pub fn new(store: &'a ReplicaStore) -> Self {
        ChunkEditor {
            store,
            dirty: BTreeMap::new(),
            bytes: 0,
            dirs: Default::default(),
        }
    }

    fn apply(&mut self, disk: u32, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let size = self.store.disk_size(disk)?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| Error::OutOfRange {
                what: "parent chunk edit".into(),
                offset,
                end: offset.saturating_add(len),
                size,
            })?;
        let mut at = offset;
        while at < end {
            let n = at / CHUNK_BYTES;
            let within = (at % CHUNK_BYTES) as usize;
            let take = ((end - at) as usize).min(CHUNK_BYTES as usize - within);
            if !self.dirty.contains_key(&(disk, n)) {
                let chunk = match self.store.read_chunk(disk, n)? {
                    Some(c) => c,
                    None => vec![0u8; self.store.chunk_len(disk, n)?],
                };
                self.bytes += chunk.len();
                self.dirty.insert((disk, n), chunk);
            }
            if let Some(chunk) = self.dirty.get_mut(&(disk, n)) {
                let dst = chunk
                    .get_mut(within..within + take)
                    .ok_or_else(|| Error::InvalidInput("chunk edit out of range".into()))?;
                match data {
                    Some(d) => {
                        let from = (at - offset) as usize;
                        dst.copy_from_slice(d.get(from..from + take).unwrap_or(&[]));
                    }
                    None => dst.fill(0),
                }
            }
            at += take as u64;
        }
        if self.bytes > EDITOR_BUDGET {
            self.write_out()?;
        }
        Ok(())
    }

    /// Apply every record of a layer (a stored segment or a patch: its index and its
    /// plain bytes, as [`ReplicaStore::layer`] gives them), in order.
    pub fn apply_layer(&mut self, index: &SegmentIndex, plain: &[u8]) -> Result<()> {
        for r in &index.records {
            if r.zero {
                self.zero(r.disk, r.offset, r.length)?;
                continue;
            }
            let data = plain
                .get(r.payload_at as usize..(r.payload_at + r.length) as usize)
                .ok_or_else(|| {
                    Error::corruption(
                        self.store.dir(),
                        r.payload_at,
                        format!("record at LSN {} runs past the end of its file", r.lsn),
                    )
                })?;
            self.write(r.disk, r.offset, data)?;
        }
        Ok(())
    }

    /// `data` written at `offset` of `disk`.
    pub fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.apply(disk, offset, data.len() as u64, Some(data))
    }

    /// `offset..offset+len` of `disk` zeroed.
    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<()> {
        self.apply(disk, offset, len, None)
    }

    fn write_out(&mut self) -> Result<()> {
        let fs = FileStorage;
        let mut renames = Vec::new();
        for ((disk, n), chunk) in std::mem::take(&mut self.dirty) {
            let path = self.store.chunk_path(disk, n);
            self.dirs.insert(disk);
            if chunk.iter().all(|b| *b == 0) {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove", &path, e)),
                }
                continue;
            }
            if let Some(dir) = path.parent() {
                fs.create_dir_all(dir)?;
            }
            let id = u64::from(disk) << 40 | n;
            let ct = self
                .store
                .key
                .seal_chunk(self.store.manifest.machine_id, id, &chunk)?;
            let tmp = path.with_extension("tmp");
            if fs.exists(&tmp) {
                fs.remove_file(&tmp)?;
            }
            let f = fs.open(&tmp, OpenMode::CreateNew)?;
            f.write_at(&[&ct], 0)?;
            renames.push((tmp, path, f));
        }
        // fsync them all before any rename; several at once, so the file system's
        // journal commits them together instead of one commit per chunk.
        let per = renames.len().div_ceil(8).max(1);
        std::thread::scope(|sc| -> Result<()> {
            let handles: Vec<_> = renames
                .chunks(per)
                .map(|part| {
                    sc.spawn(move || -> Result<()> {
                        for (_, _, f) in part {
                            f.sync_data()?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InvalidInput("fsync worker panicked".into())))?;
            }
            Ok(())
        })?;
        for (tmp, path, f) in renames {
            drop(f);
            fs.rename(&tmp, &path)?;
        }
        self.bytes = 0;
        Ok(())
    }

    /// Write every edited chunk out and make the renames durable.
    pub fn finish(mut self) -> Result<()> {
        self.write_out()?;
        let fs = FileStorage;
        for disk in &self.dirs {
            fs.sync_dir(&self.store.dir.join(PARENT).join(disk.to_string()))?;
        }
        fs.sync_dir(&self.store.dir.join(PARENT))
    }
}
