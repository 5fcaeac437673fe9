//! Restore: write every disk of a replica, as of a recovery point (the newest
//! received, or any point `points::resolve` names), to `OUT/<disk>.img` (sparse raw
//! images).
//!
//! The initial copy's base chunks are written first, then every stored segment up to
//! the point is decrypted, verified whole (the same scanner recovery uses) and its
//! records with LSNs up to the point applied in LSN order. Images are written as `<disk>.img.partial` and renamed only when all of
//! them are complete and fsynced: on any error nothing is left in OUT.

use super::store::ReplicaStore;
use crate::error::{Error, Result};
use crate::format::RecordKind;
use crate::journal::reader::{scan_segment, Expect};
use crate::storage::{FileStorage, MemStorage, OpenMode, Storage, StorageFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub lsn: u64,
    pub images: Vec<PathBuf>,
    pub bytes_written: u64,
}

/// Restore the newest point of `store` into `out`. `progress(done, total)` counts
/// base chunks and segments applied.
pub fn restore_latest(
    store: &ReplicaStore,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Restored> {
    restore_at(store, store.received().lsn, out, progress)
}

/// Restore `store` as it was at LSN `upto` (a recovery point the caller resolved):
/// every record with a higher LSN is left out.
pub fn restore_at(
    store: &ReplicaStore,
    upto: u64,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Restored> {
    let man0 = store.manifest();
    if upto < man0.base_lsn || upto > store.received().lsn {
        return Err(Error::NotFound(format!(
            "LSN {upto} is outside what this replica holds ({}..={})",
            man0.base_lsn,
            store.received().lsn
        )));
    }
    let init = store.initial();
    if !init.done {
        return Err(Error::InvalidInput(
            "the initial replication of this machine is not complete yet; nothing to restore"
                .into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io("create", out, e))?;
    let fs = FileStorage;
    let man = store.manifest().clone();
    let mut files: Vec<(PathBuf, PathBuf, Arc<dyn StorageFile>)> = Vec::new();
    let cleanup = |files: &[(PathBuf, PathBuf, Arc<dyn StorageFile>)]| {
        for (partial, _, _) in files {
            let _ = std::fs::remove_file(partial);
        }
    };
    let result = (|| -> Result<Restored> {
        for d in &man.disks {
            let fin = out.join(format!("{}.img", d.name));
            if fin.exists() {
                return Err(Error::AlreadyExists(format!(
                    "{} exists; restore into an empty directory",
                    fin.display()
                )));
            }
            let partial = out.join(format!("{}.img.partial", d.name));
            if partial.exists() {
                fs.remove_file(&partial)?;
            }
            let f = fs.open(&partial, OpenMode::CreateNew)?;
            f.set_len(d.size)?;
            files.push((partial, fin, f));
        }
        let received = store.received();
        let segments = received.segment_seq.saturating_sub(man.base_seq);
        let total = init.chunks + segments;
        let mut written = 0u64;
        for n in 0..init.chunks {
            let (disk, offset, data) = store.read_base(n)?;
            let (_, _, f) = files.get(disk as usize).ok_or_else(|| {
                Error::corruption(out, n, format!("base chunk {n} names disk {disk}"))
            })?;
            f.write_at(&[&data], offset)?;
            written += data.len() as u64;
            progress(n + 1, total);
        }
        let sizes: Vec<u64> = man.disks.iter().map(|d| d.size).collect();
        let mut next_lsn = man.base_lsn + 1;
        for (k, seq) in (man.base_seq + 1..=received.segment_seq).enumerate() {
            if next_lsn > upto {
                break; // everything after the point stays out
            }
            let plain = store.read_segment(seq)?;
            // Verify the whole segment before applying any of it.
            let mem = MemStorage::new();
            let dir = Path::new("/restore");
            mem.create_dir_all(dir)?;
            let seg = mem.open(&dir.join("seg"), OpenMode::CreateNew)?;
            seg.write_at(&[&plain], 0)?;
            let expect = Expect {
                machine_id: Some(man.machine_id),
                seq: Some(seq),
                first_lsn: Some(next_lsn),
                disk_count: Some(sizes.len() as u32),
            };
            let mut ops: Vec<(u32, RecordKind, u64, u64, u64)> = Vec::new();
            let scan = scan_segment(seg.as_ref(), expect, |rec| {
                if let Some(what) = crate::volume::record_outside_disk(&rec.header, &sizes) {
                    return Err(Error::corruption(
                        format!("replica segment {seq}"),
                        rec.offset,
                        what,
                    ));
                }
                let h = rec.header;
                if h.lsn <= upto {
                    ops.push((h.disk, h.kind, h.offset, h.length, rec.payload_offset));
                }
                Ok(())
            })?;
            if let Some(f) = scan.fault {
                return Err(Error::corruption(
                    format!("replica segment {seq}"),
                    f.offset,
                    f.what,
                ));
            }
            for (disk, kind, offset, length, payload_at) in ops {
                let Some((_, _, f)) = files.get(disk as usize) else {
                    continue;
                };
                match kind {
                    RecordKind::Write => {
                        let data = plain
                            .get(payload_at as usize..(payload_at + length) as usize)
                            .ok_or_else(|| {
                                Error::corruption(
                                    format!("replica segment {seq}"),
                                    payload_at,
                                    "payload out of the segment",
                                )
                            })?;
                        f.write_at(&[data], offset)?;
                        written += length;
                    }
                    RecordKind::Zero => f.punch_hole(offset, length)?,
                    RecordKind::Point => {}
                }
            }
            if let Some(last) = scan.last_lsn {
                next_lsn = last + 1;
            }
            progress(init.chunks + k as u64 + 1, total);
        }
        for (_, _, f) in &files {
            f.sync_data()?;
        }
        let mut images = Vec::new();
        for (partial, fin, _) in &files {
            fs.rename(partial, fin)?;
            images.push(fin.clone());
        }
        fs.sync_dir(out)?;
        Ok(Restored {
            lsn: upto,
            images,
            bytes_written: written,
        })
    })();
    if result.is_err() {
        cleanup(&files);
    }
    result
}
