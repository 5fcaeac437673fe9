//! A replica's segment store at the target: every segment received is verified like
//! the source's own recovery would verify it, stored gap-free and exactly once,
//! encrypted, fsynced — and only then acknowledged.
//!
//! ```text
//! SITE/replicas/<machine>/replica.meta         manifest: source site, machine id, disks
//! SITE/replicas/<machine>/received             last segment stored (LSN, seq): a watermark file
//! SITE/replicas/<machine>/segments/<seq>.seg.enc   encrypted segments (see crypt.rs)
//! SITE/replicas/<machine>/base/<n>.enc         encrypted initial-copy chunks
//! SITE/replicas/<machine>/initial              initial-copy progress (chunks, position, done)
//! ```
//!
//! Order for a new segment: write it to a temporary file, fsync, rename, fsync the
//! directory, then persist `received`. A crash between the rename and `received` leaves
//! one segment past the mark; opening the store verifies it and takes it in, or
//! removes it if it does not verify.

use super::crypt::ReplicaKey;
use crate::error::{Error, Result};
use crate::format::meta::{self, DiskEntry, Watermark, KIND_REPLICA_MANIFEST};
use crate::format::segment::segment_name;
use crate::journal::reader::{scan_segment, Expect};
use crate::names::validate_name;
use crate::storage::{write_atomic, FileStorage, MemStorage, OpenMode, Storage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const REPLICAS_DIR: &str = "replicas";
const MANIFEST: &str = "replica.meta";
const RECEIVED: &str = "received";
const SEGMENTS: &str = "segments";
const BASE: &str = "base";
const INITIAL: &str = "initial";

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
}

fn enc_name(seq: u64) -> String {
    format!("{}.enc", segment_name(seq))
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
        fs.create_dir_all(&dir.join(BASE))?;
        // The received mark first: the manifest, written last, says "created".
        write_atomic(&fs, &dir.join(RECEIVED), &base.encode())?;
        let body =
            postcard::to_stdvec(&manifest).map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_atomic(
            &fs,
            &dir.join(MANIFEST),
            &meta::encode(KIND_REPLICA_MANIFEST, &body),
        )?;
        Self::open(site, machine, key)
    }

    pub fn open(site: &Path, machine: &str, key: ReplicaKey) -> Result<Self> {
        let dir = Self::dir_of(site, machine)?;
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            return Err(Error::NotFound(format!(
                "site {} holds no replica of {machine}",
                site.display()
            )));
        }
        let bytes = std::fs::read(&mpath).map_err(|e| Error::io("read", &mpath, e))?;
        let body = meta::decode(KIND_REPLICA_MANIFEST, &bytes)
            .map_err(|e| Error::corruption(&mpath, e.offset, e.what))?;
        let manifest: ReplicaManifest =
            postcard::from_bytes(body).map_err(|e| Error::corruption(&mpath, 24, e.to_string()))?;
        let rpath = dir.join(RECEIVED);
        let received = if rpath.exists() {
            let b = std::fs::read(&rpath).map_err(|e| Error::io("read", &rpath, e))?;
            Watermark::decode(&b).map_err(|e| Error::corruption(&rpath, e.offset, e.what))?
        } else {
            Watermark::default()
        };
        let ipath = dir.join(INITIAL);
        let initial = if ipath.exists() {
            let b = std::fs::read(&ipath).map_err(|e| Error::io("read", &ipath, e))?;
            let body = meta::decode(meta::KIND_INITIAL_PROGRESS, &b)
                .map_err(|e| Error::corruption(&ipath, e.offset, e.what))?;
            postcard::from_bytes(body).map_err(|e| Error::corruption(&ipath, 24, e.to_string()))?
        } else {
            InitialProgress::default()
        };
        let mut store = ReplicaStore {
            dir,
            key,
            manifest,
            received,
            initial,
        };
        store.reconcile()?;
        Ok(store)
    }

    pub fn manifest(&self) -> &ReplicaManifest {
        &self.manifest
    }

    /// The newest segment stored (LSN 0 / seq 0: none).
    pub fn received(&self) -> Watermark {
        self.received
    }

    fn seg_path(&self, seq: u64) -> PathBuf {
        self.dir.join(SEGMENTS).join(enc_name(seq))
    }

    /// Take in (or remove) a segment stored just past the mark by a crash.
    fn reconcile(&mut self) -> Result<()> {
        let next = self.received.segment_seq + 1;
        let path = self.seg_path(next);
        if !path.exists() {
            return Ok(());
        }
        let taken = std::fs::read(&path)
            .map_err(|e| Error::io("read", &path, e))
            .and_then(|ct| self.key.open(self.manifest.machine_id, next, &ct, &path))
            .and_then(|plain| self.verify(next, &plain));
        match taken {
            Ok(last_lsn) => {
                tracing::info!("replica: took in segment {next} stored before a crash");
                self.mark(Watermark {
                    lsn: last_lsn,
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

    fn mark(&mut self, w: Watermark) -> Result<()> {
        write_atomic(&FileStorage, &self.dir.join(RECEIVED), &w.encode())?;
        self.received = w;
        Ok(())
    }

    /// Verify a whole sealed segment `seq` that must follow what is stored; returns its
    /// last LSN. Everything the source's recovery checks is checked here.
    fn verify(&self, seq: u64, plain: &[u8]) -> Result<u64> {
        let mem = MemStorage::new();
        let dir = Path::new("/incoming");
        let path = dir.join(segment_name(seq));
        mem.create_dir_all(dir)?;
        let f = mem.open(&path, OpenMode::CreateNew)?;
        f.write_at(&[plain], 0)?;
        let sizes: Vec<u64> = self.manifest.disks.iter().map(|d| d.size).collect();
        let mut outside = None;
        let expect = Expect {
            machine_id: Some(self.manifest.machine_id),
            seq: Some(seq),
            first_lsn: Some(self.received.lsn + 1),
            disk_count: Some(sizes.len() as u32),
        };
        let scan = scan_segment(f.as_ref(), expect, |rec| {
            if let Some(what) = crate::volume::record_outside_disk(&rec.header, &sizes) {
                outside.get_or_insert((rec.offset, what));
            }
            Ok(())
        })?;
        let named = self.seg_path(seq);
        if let Some(fault) = &scan.fault {
            return Err(Error::corruption(named, fault.offset, fault.what.clone()));
        }
        if let Some((offset, what)) = outside {
            return Err(Error::corruption(named, offset, what));
        }
        match (scan.footer, scan.last_lsn) {
            (Some(_), Some(last)) => Ok(last),
            _ => Err(Error::corruption(
                named,
                scan.end,
                "segment is not sealed or holds no records",
            )),
        }
    }

    /// Receive segment `seq` (its plain bytes as the source has them). Verified, then
    /// stored durably, then acknowledged; nothing is stored if anything is wrong.
    pub fn receive(&mut self, seq: u64, plain: &[u8]) -> Result<Receipt> {
        if seq <= self.received.segment_seq {
            let path = self.seg_path(seq);
            let stored = std::fs::read(&path)
                .map_err(|e| Error::io("read", &path, e))
                .and_then(|ct| self.key.open(self.manifest.machine_id, seq, &ct, &path));
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
        let last_lsn = self.verify(seq, plain).map_err(|e| match e {
            Error::Corruption { offset, what, .. } if what.contains("was next") => {
                Error::BrokenChain(format!(
                    "segment {seq} does not continue the chain at LSN {} (offset {offset}: {what})",
                    self.received.lsn + 1
                ))
            }
            other => other,
        })?;
        let ct = self.key.seal(self.manifest.machine_id, seq, plain)?;
        self.write_durably(&self.seg_path(seq), &ct)?;
        self.mark(Watermark {
            lsn: last_lsn,
            segment_seq: seq,
        })?;
        Ok(Receipt::Stored { lsn: last_lsn })
    }

    pub fn initial(&self) -> InitialProgress {
        self.initial
    }

    fn base_path(&self, n: u64) -> PathBuf {
        self.dir.join(BASE).join(format!("{n:020}.enc"))
    }

    fn save_initial(&mut self, p: InitialProgress) -> Result<()> {
        let body = postcard::to_stdvec(&p).map_err(|e| Error::InvalidInput(e.to_string()))?;
        write_atomic(
            &FileStorage,
            &self.dir.join(INITIAL),
            &meta::encode(meta::KIND_INITIAL_PROGRESS, &body),
        )?;
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
        let size = self
            .manifest
            .disks
            .get(disk as usize)
            .map(|d| d.size)
            .ok_or_else(|| Error::InvalidInput(format!("no disk {disk} in this replica")))?;
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
        let mut plain = Vec::with_capacity(16 + data.len());
        plain.extend_from_slice(&disk.to_le_bytes());
        plain.extend_from_slice(&0u32.to_le_bytes());
        plain.extend_from_slice(&offset.to_le_bytes());
        plain.extend_from_slice(data);
        let n = self.initial.chunks;
        let ct = self.key.seal_base(self.manifest.machine_id, n, &plain)?;
        self.write_durably(&self.base_path(n), &ct)?;
        self.save_initial(InitialProgress {
            chunks: n + 1,
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

    /// Base chunk `n`: (disk, offset, data), decrypted and authenticated.
    pub fn read_base(&self, n: u64) -> Result<(u32, u64, Vec<u8>)> {
        let path = self.base_path(n);
        let ct = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let plain = self
            .key
            .open_base(self.manifest.machine_id, n, &ct, &path)?;
        let field = |a: usize, b: usize| plain.get(a..b).unwrap_or(&[]);
        let disk = u32::from_le_bytes(field(0, 4).try_into().unwrap_or([0; 4]));
        let offset = u64::from_le_bytes(field(8, 16).try_into().unwrap_or([0; 8]));
        Ok((disk, offset, field(16, plain.len()).to_vec()))
    }

    fn write_durably(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let fs = FileStorage;
        if fs.exists(&tmp) {
            fs.remove_file(&tmp)?;
        }
        let f = fs.open(&tmp, OpenMode::CreateNew)?;
        f.write_at(&[bytes], 0)?;
        f.sync_data()?;
        drop(f);
        fs.rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs.sync_dir(dir)?;
        }
        Ok(())
    }

    /// The plain bytes of stored segment `seq`, decrypted and authenticated.
    pub fn read_segment(&self, seq: u64) -> Result<Vec<u8>> {
        if seq == 0 || seq > self.received.segment_seq {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        let path = self.seg_path(seq);
        let ct = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        self.key.open(self.manifest.machine_id, seq, &ct, &path)
    }
}
