//! Fixed-size chunk hashes, the common language of resynchronisation: both ends hash
//! chunks of `chunk_bytes` and 1 MiB groups of them (the hash of the chunk hashes), so
//! only the groups, then the chunks, that differ are looked at and sent. The hash is
//! BLAKE3 when both sites say they can (Hello feature bit `FEATURE_RESYNC_BLAKE3`),
//! else SHA-256 (every build before that bit): BLAKE3 hashes 4 KiB chunks several
//! times faster than SHA-256 with SHA-NI here, and hashing the whole disk at both ends
//! is most of a resync's time.
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

/// Which hash both ends use for chunks and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    Sha256,
    Blake3,
}

impl ChunkHash {
    /// The hash of `data`.
    pub fn of(self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkHash::Sha256 => Sha256::digest(data).into(),
            ChunkHash::Blake3 => blake3::hash(data).into(),
        }
    }

    /// The hash of the concatenation of `parts`.
    fn of_parts(self, parts: &[[u8; 32]]) -> [u8; 32] {
        match self {
            ChunkHash::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().into()
            }
            ChunkHash::Blake3 => {
                let mut h = blake3::Hasher::new();
                for p in parts {
                    h.update(p);
                }
                h.finalize().into()
            }
        }
    }
}

/// One hash per `group` consecutive chunk hashes (the hash of their concatenation; a
/// group of one is the chunk's hash itself).
pub fn group_hashes(chunks: &[[u8; 32]], group: usize, algo: ChunkHash) -> Vec<[u8; 32]> {
    if group <= 1 {
        return chunks.to_vec();
    }
    chunks.chunks(group).map(|g| algo.of_parts(g)).collect()
}

/// Hashes of `count` chunks of `chunk_bytes` from `first` of a disk of `size` bytes,
/// each read by `read(offset, buf)` (any all-zero range may be skipped by `zero`),
/// on up to four threads ([`crate::parallel::map`]).
pub fn hash_chunks(
    size: u64,
    chunk_bytes: u64,
    first: u64,
    count: u64,
    read: &(dyn Fn(u64, &mut [u8]) -> Result<()> + Sync),
    algo: ChunkHash,
) -> Result<Vec<[u8; 32]>> {
    let total = size.div_ceil(chunk_bytes);
    let end = first.saturating_add(count).min(total);
    if first >= end {
        return Ok(Vec::new());
    }
    // One run of consecutive chunks per worker, each read in big pieces.
    let per = (end - first).div_ceil(crate::parallel::workers((end - first) as usize) as u64);
    let runs: Vec<(u64, u64)> = (first..end)
        .step_by(per.max(1) as usize)
        .map(|from| (from, (from + per).min(end)))
        .collect();
    let parts = crate::parallel::map(&runs, |&(from, to)| -> Result<Vec<[u8; 32]>> {
        let step = (1u64 << 20).max(chunk_bytes);
        let mut buf = vec![0u8; step as usize];
        let mut out = Vec::with_capacity((to - from) as usize);
        let mut c = from;
        while c < to {
            let at = c * chunk_bytes;
            let chunks = (step / chunk_bytes).min(to - c);
            let len = (chunks * chunk_bytes).min(size - at) as usize;
            let b = buf.get_mut(..len).unwrap_or(&mut []);
            read(at, b)?;
            for piece in b.chunks(chunk_bytes as usize) {
                out.push(algo.of(piece));
            }
            c += chunks;
        }
        Ok(out)
    })?;
    Ok(parts.concat())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_hashes_are_what_their_standards_say_and_groups_follow_them() {
        let data = b"replog chunk";
        let sha: [u8; 32] = Sha256::digest(data).into();
        assert_eq!(ChunkHash::Sha256.of(data), sha);
        assert_eq!(ChunkHash::Blake3.of(data), *blake3::hash(data).as_bytes());
        assert_ne!(ChunkHash::Sha256.of(data), ChunkHash::Blake3.of(data));
        let chunks: Vec<[u8; 32]> = (0..5u8).map(|i| ChunkHash::Blake3.of(&[i])).collect();
        // A group of one is the chunk's own hash; a group hashes its members in order.
        assert_eq!(group_hashes(&chunks, 1, ChunkHash::Blake3), chunks);
        let g = group_hashes(&chunks, 2, ChunkHash::Blake3);
        assert_eq!(g.len(), 3);
        let mut h = blake3::Hasher::new();
        h.update(&chunks[0]);
        h.update(&chunks[1]);
        assert_eq!(g[0], *h.finalize().as_bytes());
        assert_eq!(g[2], ChunkHash::Blake3.of(&chunks[4]));
        assert_ne!(
            group_hashes(&chunks, 2, ChunkHash::Sha256),
            g,
            "the algorithm decides the groups too"
        );
    }

    #[test]
    fn parallel_chunk_hashes_equal_one_at_a_time() {
        let disk: Vec<u8> = (0..(3 << 20) + 5000u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&disk[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        for algo in [ChunkHash::Sha256, ChunkHash::Blake3] {
            let got = hash_chunks(disk.len() as u64, 4096, 3, 700, &read, algo).unwrap();
            let want: Vec<[u8; 32]> = (3..703)
                .map(|c| algo.of(&disk[c * 4096..((c + 1) * 4096).min(disk.len())]))
                .collect();
            assert_eq!(got, want, "{algo:?}");
        }
    }
}
