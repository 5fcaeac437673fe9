//! Fixed-size chunk hashes, the common language of resynchronisation: both ends hash
//! chunks of `chunk_bytes` (SHA-256) and 1 MiB groups of them (SHA-256 of the chunk
//! hashes), so only the groups, then the chunks, that differ are looked at and sent.
//! Neutral ground: the source (`replication::shipper`) and the target
//! (`replica::resync_apply`) both use it and neither imports the other.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// Smallest and largest compared chunk.
pub const MIN_CHUNK: u64 = 4096;
pub const MAX_CHUNK: u64 = 1 << 20;

pub fn check_chunk_bytes(n: u64) -> Result<()> {
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&n) || !n.is_power_of_two() {
        return Err(Error::InvalidInput(format!(
            "resync chunk size {n}: a power of two from 4 KiB to 1 MiB"
        )));
    }
    Ok(())
}

/// SHA-256 of `data`.
pub fn hash(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// One hash per `group` consecutive chunk hashes (SHA-256 of their concatenation; a
/// group of one is the chunk's hash itself).
pub fn group_hashes(chunks: &[[u8; 32]], group: usize) -> Vec<[u8; 32]> {
    if group <= 1 {
        return chunks.to_vec();
    }
    chunks
        .chunks(group)
        .map(|g| {
            let mut h = Sha256::new();
            for c in g {
                h.update(c);
            }
            h.finalize().into()
        })
        .collect()
}

/// Hashes of `count` chunks of `chunk_bytes` from `first` of a disk of `size` bytes,
/// each read by `read(offset, buf)` (any all-zero range may be skipped by `zero`),
/// on every core.
pub fn hash_chunks(
    size: u64,
    chunk_bytes: u64,
    first: u64,
    count: u64,
    read: &(dyn Fn(u64, &mut [u8]) -> Result<()> + Sync),
) -> Result<Vec<[u8; 32]>> {
    let total = size.div_ceil(chunk_bytes);
    let end = first.saturating_add(count).min(total);
    if first >= end {
        return Ok(Vec::new());
    }
    let n = (end - first) as usize;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4)
        .min(n);
    let per = n.div_ceil(workers.max(1));
    let parts: Vec<Result<Vec<[u8; 32]>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || -> Result<Vec<[u8; 32]>> {
                    let from = first + (w * per) as u64;
                    let to = (from + per as u64).min(end);
                    // Read in big pieces, hash per chunk.
                    let step = (1u64 << 20).max(chunk_bytes);
                    let mut buf = vec![0u8; step as usize];
                    let mut out = Vec::with_capacity((to.saturating_sub(from)) as usize);
                    let mut c = from;
                    while c < to {
                        let at = c * chunk_bytes;
                        let chunks = (step / chunk_bytes).min(to - c);
                        let len = (chunks * chunk_bytes).min(size - at) as usize;
                        let b = buf.get_mut(..len).unwrap_or(&mut []);
                        read(at, b)?;
                        for piece in b.chunks(chunk_bytes as usize) {
                            out.push(hash(piece));
                        }
                        c += chunks;
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InvalidInput("hash worker panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}
