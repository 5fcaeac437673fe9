//! Restore: write every disk of a replica, as of one recovery point, to
//! `OUT/<disk>.img` (sparse raw images), and prove the result.
//!
//! The point is opened through the replay engine (replay.rs), which pins it and maps
//! every byte of every disk to a parent chunk, a segment payload or zeroes. The
//! images are then written in two passes that touch each source once: the parent
//! chunks (only where the map leaves the parent in charge), then each segment
//! decrypted once, its surviving payloads written where they land. All-zero 4 KiB
//! blocks are never written, so the images stay sparse.
//!
//! Proof: when the point carries the source's digests (see `crate::digest`), every
//! image is read back after its fsync and its digest compared; any difference fails
//! the restore. Images are written as `<disk>.img.partial` and renamed only when all
//! of them are complete, fsynced and verified: on any error nothing is left in OUT.

use super::replay::PointImage;
use super::store::{ReplicaStore, CHUNK_BYTES};
use crate::digest::BLOCK;
use crate::error::{Error, Result};
use crate::index::{Location, Piece};
use crate::storage::{FileStorage, OpenMode, Storage, StorageFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub lsn: u64,
    pub images: Vec<PathBuf>,
    pub bytes_written: u64,
    /// Every image matched the source's digest at the point (false: the point carries
    /// no digests, so there was nothing to check against).
    pub verified: bool,
}

/// Restore `store` at POINT `at` (any form `points::resolve` takes) into `out`.
pub fn restore_at(
    store: ReplicaStore,
    at: &str,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Restored> {
    let image = PointImage::open(store, at)?;
    restore(&image, out, progress)
}

/// Write `data` at `offset` of `f`, leaving out all-zero 4 KiB blocks.
fn write_sparse(f: &dyn StorageFile, offset: u64, data: &[u8]) -> Result<()> {
    let mut run: Option<usize> = None; // start of the current non-zero run
    let mut pos = 0usize;
    while pos < data.len() {
        // Blocks follow the disk's 4 KiB grid.
        let next = ((offset + pos as u64) / BLOCK + 1) * BLOCK;
        let end = ((next - offset) as usize).min(data.len());
        let zero = data
            .get(pos..end)
            .is_some_and(|b| b.iter().all(|x| *x == 0));
        match (zero, run) {
            (true, Some(s)) => {
                f.write_at(&[data.get(s..pos).unwrap_or(&[])], offset + s as u64)?;
                run = None;
            }
            (false, None) => run = Some(pos),
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run {
        f.write_at(&[data.get(s..).unwrap_or(&[])], offset + s as u64)?;
    }
    Ok(())
}

/// The digest of a written image, reading only its data ranges.
fn image_digest(f: &dyn StorageFile, size: u64) -> Result<u64> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = f.seek_data(pos)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = f.seek_hole(start)?.min(size);
        ranges.push((start, end));
        pos = end.max(start + 1);
    }
    crate::digest::of_ranges(size, &ranges, &mut |at, buf| f.read_exact_at(buf, at))
}

/// Restore the point `image` holds into `out`.
pub fn restore(image: &PointImage, out: &Path, progress: &dyn Fn(u64, u64)) -> Result<Restored> {
    let fs = FileStorage;
    let disks = image.disks().to_vec();
    for d in &disks {
        let fin = out.join(format!("{}.img", d.name));
        if fin.exists() {
            return Err(Error::AlreadyExists(format!(
                "{} exists; restore into an empty directory",
                fin.display()
            )));
        }
    }
    let created_out = !out.exists();
    std::fs::create_dir_all(out).map_err(|e| Error::io("create", out, e))?;
    let mut files: Vec<(PathBuf, PathBuf, Arc<dyn StorageFile>)> = Vec::new();
    let result = (|| -> Result<Restored> {
        for d in &disks {
            let partial = out.join(format!("{}.img.partial", d.name));
            if partial.exists() {
                fs.remove_file(&partial)?;
            }
            let f = fs.open(&partial, OpenMode::CreateNew)?;
            files.push((partial, out.join(format!("{}.img", d.name)), f.clone()));
            f.set_len(d.size)?;
        }
        let store = image.store();
        // What comes from where: parent pieces per disk, segment pieces by segment.
        let mut parent_work: Vec<(u32, u64, Vec<Piece>)> = Vec::new();
        let mut seg_work: Vec<(u64, u32, u64, u64, u64)> = Vec::new(); // seq, disk, at, from, len
        let mut total = 0u64;
        for (id, _) in disks.iter().enumerate() {
            let id = id as u32;
            let Some(map) = image.map(id) else { continue };
            for n in store.stored_chunks(id)? {
                let mut pieces = Vec::new();
                map.lookup(n * CHUNK_BYTES, store.chunk_len(id, n)? as u64, &mut pieces);
                pieces.retain(|p| p.loc.is_none());
                if !pieces.is_empty() {
                    total += pieces.iter().map(|p| p.len).sum::<u64>();
                    parent_work.push((id, n, pieces));
                }
            }
            for (start, e) in map.iter() {
                if let Location::Segment { seq, offset } = e.loc {
                    seg_work.push((seq, id, start, offset, e.len));
                    total += e.len;
                }
            }
        }
        seg_work.sort_unstable();
        let mut done = 0u64;
        progress(0, total);
        for (id, n, pieces) in parent_work {
            let Some(chunk) = store.read_chunk(id, n)? else {
                continue;
            };
            let Some((_, _, f)) = files.get(id as usize) else {
                continue;
            };
            for p in pieces {
                let within = (p.start - n * CHUNK_BYTES) as usize;
                let data = chunk.get(within..within + p.len as usize).unwrap_or(&[]);
                write_sparse(f.as_ref(), p.start, data)?;
                done += p.len;
            }
            progress(done, total);
        }
        let mut i = 0;
        while i < seg_work.len() {
            let seq = seg_work.get(i).map(|w| w.0).unwrap_or(0);
            let plain = image.segment(seq)?;
            while let Some(&(s, id, at, from, len)) = seg_work.get(i) {
                if s != seq {
                    break;
                }
                let data = plain
                    .get(from as usize..(from + len) as usize)
                    .ok_or_else(|| {
                        Error::corruption(
                            store.dir().join("segments"),
                            from,
                            format!("payload past the end of segment {seq}"),
                        )
                    })?;
                if let Some((_, _, f)) = files.get(id as usize) {
                    write_sparse(f.as_ref(), at, data)?;
                }
                done += len;
                i += 1;
            }
            progress(done, total);
        }
        for (_, _, f) in &files {
            f.sync_data()?;
        }
        let point = image.point();
        let verified = match &point.digests {
            Some(want) => {
                if want.len() != disks.len() {
                    return Err(Error::corruption(
                        store.dir(),
                        0,
                        format!(
                            "{} carries {} digests for {} disks",
                            point.id(),
                            want.len(),
                            disks.len()
                        ),
                    ));
                }
                for ((d, (_, fin, f)), want) in disks.iter().zip(&files).zip(want) {
                    let got = image_digest(f.as_ref(), d.size)?;
                    if got != *want {
                        return Err(Error::corruption(
                            fin,
                            0,
                            format!(
                                "restored disk {} does not match the source's digest at {} \
                                 (source {want:016x}, restored {got:016x}); nothing was kept",
                                d.name,
                                point.id()
                            ),
                        ));
                    }
                }
                true
            }
            None => false,
        };
        let mut images = Vec::new();
        for (partial, fin, _) in &files {
            fs.rename(partial, fin)?;
            images.push(fin.clone());
        }
        fs.sync_dir(out)?;
        Ok(Restored {
            lsn: point.lsn,
            images,
            bytes_written: done,
            verified,
        })
    })();
    if result.is_err() {
        for (partial, _, _) in &files {
            let _ = std::fs::remove_file(partial);
        }
        if created_out {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}
