//! Proof that a promoted machine (or a test copy) stands on exactly the point it
//! names: the digest of every disk at the point (see `crate::digest`), computed from
//! the replica through the replay engine, against the digests the source recorded
//! with that point.
//!
//! Only what holds data is read: the parent chunks the replica stores and the
//! chunks the segments up to the point touch (an all-zero block adds nothing to a
//! digest). So the time grows with the data, not with the size of the disks; the
//! reading is spread over the cores.

use crate::digest::{contribution, BLOCK};
use crate::error::{Error, Result};
use crate::index::Location;
use crate::replica::replay::{PointImage, SEGMENT_CACHE};
use crate::replica::store::CHUNK_BYTES;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What verifying a point found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The point carried digests and every disk matched them (false: it carries
    /// none — the initial copy alone, or a source that kept none — and every byte
    /// read was authenticated, which is all there is to check).
    pub digests_matched: bool,
    /// Bytes read and checked.
    pub bytes: u64,
    /// Bytes of segments of it read ahead while a planned failover shipped its last
    /// segments (`replica::warm`), not read again.
    pub read_ahead: u64,
}

/// The digest of every disk of `image`, and the bytes read for it.
pub fn digests(image: &PointImage) -> Result<(Vec<u64>, u64)> {
    let store = image.store();
    let disks = image.disks().to_vec();
    let mut work: Vec<(u32, u64)> = Vec::new();
    // The end of the furthest payload read from any segment: about the size of the
    // biggest segment, whole copies of which the readers cache.
    let mut largest = 0u64;
    for d in &disks {
        let mut chunks: BTreeSet<u64> = store.stored_chunks(d.id)?.into_iter().collect();
        if let Some(map) = image.map(d.id) {
            for (start, e) in map.iter() {
                if let Location::Segment { offset, .. } = e.loc {
                    largest = largest.max(offset + e.len);
                    let last = (start + e.len - 1) / CHUNK_BYTES;
                    chunks.extend(start / CHUNK_BYTES..=last);
                }
            }
        }
        work.extend(chunks.into_iter().map(|n| (d.id, n)));
    }
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    // Consecutive chunks are mostly in the same segment, which is read and decrypted
    // whole: so the workers' picks go round `spans` parts of the work list in turn,
    // and the workers load different segments at once instead of waiting for the
    // same one (the k-th pick is item `spread(k)`). No more parts than the readers'
    // segment cache holds segments: each part keeps one in use, and more would evict
    // each other's and load every segment again and again (one part when segments
    // are over about half the cache: all workers in order, on one segment).
    // A segment is a little more than its furthest payload (record headers, the
    // footer): a quarter more is counted for it.
    let fits = (SEGMENT_CACHE as u64 / (largest + largest / 4).max(1)) as usize;
    let spans = fits.clamp(1, workers);
    let span = work.len().div_ceil(spans);
    let picks = span * spans;
    let spread = |k: usize| (k % spans) * span + k / spans;
    let results: Vec<Result<(Vec<u64>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<(Vec<u64>, u64)> {
                    let mut acc = vec![0u64; disks.len()];
                    let mut bytes = 0u64;
                    let mut buf = vec![0u8; CHUNK_BYTES as usize];
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= picks {
                            return Ok((acc, bytes));
                        }
                        let Some(&(disk, n)) = work.get(spread(k)) else {
                            continue;
                        };
                        let size = disks.get(disk as usize).map_or(0, |d| d.size);
                        let at = n * CHUNK_BYTES;
                        let len = size.saturating_sub(at).min(CHUNK_BYTES) as usize;
                        let b = buf.get_mut(..len).unwrap_or(&mut []);
                        if let Err(e) = image.read(disk, at, b) {
                            next.store(picks, Ordering::Relaxed);
                            return Err(e);
                        }
                        let Some(d) = acc.get_mut(disk as usize) else {
                            continue;
                        };
                        for (j, block) in b.chunks(BLOCK as usize).enumerate() {
                            let i = at / BLOCK + j as u64;
                            *d ^= contribution(i, block.len(), crate::crc::crc32c(block));
                        }
                        bytes += len as u64;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InvalidInput("digest worker panicked".into())))
            })
            .collect()
    });
    let mut total = vec![0u64; disks.len()];
    let mut bytes = 0;
    for r in results {
        let (acc, b) = r?;
        for (t, a) in total.iter_mut().zip(acc) {
            *t ^= a;
        }
        bytes += b;
    }
    Ok((total, bytes))
}

/// Verify `image` against its point's digests: an error naming the disk that
/// differs.
pub fn verify(image: &PointImage) -> Result<Verified> {
    let (got, bytes) = digests(image)?;
    let point = image.point();
    let Some(want) = &point.digests else {
        return Ok(Verified {
            digests_matched: false,
            bytes,
            read_ahead: image.read_ahead(),
        });
    };
    if want.len() != got.len() {
        return Err(Error::corruption(
            image.store().dir(),
            0,
            format!(
                "point {} carries {} digests for {} disks",
                point.id(),
                want.len(),
                got.len()
            ),
        ));
    }
    for ((d, w), g) in image.disks().iter().zip(want).zip(&got) {
        if w != g {
            return Err(Error::corruption(
                image.store().dir(),
                0,
                format!(
                    "disk {} at point {} does not match the source's digest \
                     ({g:016x}, the source recorded {w:016x})",
                    d.name,
                    point.id()
                ),
            ));
        }
    }
    Ok(Verified {
        digests_matched: true,
        bytes,
        read_ahead: image.read_ahead(),
    })
}
