//! Disk-state digests: what lets a restore prove itself.
//!
//! The digest of a disk is a rolling checksum in the style of LTX (litestream): the
//! disk is cut into 4 KiB blocks (the last one may be shorter), each block `i` with
//! contents `b` contributes `mix(i, crc32c(b)) ^ mix(i, crc32c(zeroes))` — so an
//! all-zero block contributes nothing and an all-zero disk's digest is 0 — and the
//! digest is the XOR of every contribution. Replacing block `i`'s contents changes the
//! digest by `mix(i, old) ^ mix(i, new)`, so the source keeps it current in O(1) per
//! block written, with one CRC-32C per block (the CRCs are kept: 4 bytes per 4 KiB,
//! 0.1% of the disk's size, in memory).
//!
//! `mix` runs splitmix64's finaliser over the block number, XORs in the CRC and runs
//! it again: every bit of the (full 64-bit) block number and of the CRC reaches every
//! bit of the contribution, so a block's data moved to another block, two equal blocks
//! swapped or a block missing all change the digest. It is a check against mistakes (a replay bug, a lost or stale block, a
//! decryption of the wrong chunk), not a MAC: the stored data is authenticated by
//! AES-GCM.
//!
//! Recovery points carry one digest per disk (see `format::record::PointPayload`); a
//! restore recomputes them over the images it wrote and fails on any difference.

use crate::error::Result;

/// Digest block size.
pub const BLOCK: u64 = 4096;

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The mix of a block number and a CRC (see the module documentation).
pub fn mix(block: u64, crc: u32) -> u64 {
    splitmix(splitmix(block) ^ u64::from(crc))
}

/// CRC-32C of `len` zero bytes (the full-block one is computed once).
pub fn zero_crc(len: usize) -> u32 {
    const Z: [u8; BLOCK as usize] = [0; BLOCK as usize];
    static FULL: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    if len == BLOCK as usize {
        return *FULL.get_or_init(|| crate::crc::crc32c(&Z));
    }
    crate::crc::crc32c(Z.get(..len).unwrap_or(&Z))
}

/// What block `i` (of `len` bytes) with CRC `crc` adds to a digest.
pub fn contribution(i: u64, len: usize, crc: u32) -> u64 {
    mix(i, crc) ^ mix(i, zero_crc(len))
}

/// Length of block `i` of a disk of `size` bytes.
fn block_len(size: u64, i: u64) -> usize {
    (size - i * BLOCK).min(BLOCK) as usize
}

/// The digest of one disk, kept current as blocks change.
#[derive(Debug, Clone)]
pub struct DiskDigest {
    size: u64,
    crcs: Vec<u32>,
    value: u64,
}

impl DiskDigest {
    /// The digest of an all-zero disk of `size` bytes (0).
    pub fn zeroed(size: u64) -> Self {
        let blocks = size.div_ceil(BLOCK);
        let mut crcs = vec![zero_crc(BLOCK as usize); blocks as usize];
        if let Some(last) = crcs.last_mut() {
            *last = zero_crc(block_len(size, blocks - 1));
        }
        DiskDigest {
            size,
            crcs,
            value: 0,
        }
    }

    pub fn value(&self) -> u64 {
        self.value
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block `i` now has CRC `crc`.
    pub fn set(&mut self, i: u64, crc: u32) {
        if let Some(old) = self.crcs.get_mut(i as usize) {
            self.value ^= mix(i, *old) ^ mix(i, crc);
            *old = crc;
        }
    }

    /// Blocks `first..=last` touched by `offset..offset+len` (None for len 0).
    pub fn blocks(offset: u64, len: u64) -> Option<(u64, u64)> {
        (len > 0).then(|| (offset / BLOCK, (offset + len - 1) / BLOCK))
    }

    /// Whether block `i` lies wholly inside `offset..offset+len`.
    pub fn covers(&self, i: u64, offset: u64, len: u64) -> bool {
        let start = i * BLOCK;
        let end = start + block_len(self.size, i) as u64;
        start >= offset && end <= offset + len
    }

    /// The byte range of block `i`.
    pub fn range(&self, i: u64) -> (u64, usize) {
        (i * BLOCK, block_len(self.size, i))
    }

    /// Update for `data` written at `offset`: whole blocks from `data`; partial
    /// blocks by `read_block` (which must return the block's contents after the
    /// write).
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        read_block: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.update(offset, data.len() as u64, Some(data), read_block)
    }

    /// Update for `offset..offset+len` zeroed.
    pub fn zero(
        &mut self,
        offset: u64,
        len: u64,
        read_block: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.update(offset, len, None, read_block)
    }

    fn update(
        &mut self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        read_block: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let Some((first, last)) = Self::blocks(offset, len) else {
            return Ok(());
        };
        let mut buf = vec![0u8; BLOCK as usize];
        for i in first..=last {
            let (start, n) = self.range(i);
            let crc = if self.covers(i, offset, len) {
                match data {
                    Some(d) => {
                        let at = (start - offset) as usize;
                        crate::crc::crc32c(d.get(at..at + n).unwrap_or(&[]))
                    }
                    None => zero_crc(n),
                }
            } else {
                let b = buf.get_mut(..n).unwrap_or(&mut []);
                read_block(start, b)?;
                crate::crc::crc32c(b)
            };
            self.set(i, crc);
        }
        Ok(())
    }
}

/// Digest of a disk of `size` bytes whose data lies in `data_ranges` (sorted,
/// non-overlapping; everything else reads as zeroes), read through `read`.
pub fn of_ranges(
    size: u64,
    data_ranges: &[(u64, u64)],
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<u64> {
    let mut value = 0u64;
    let mut next = 0u64; // first block not yet counted
    let mut buf = vec![0u8; 1 << 20];
    for &(start, end) in data_ranges {
        let (b0, b1) = (start / BLOCK, end.min(size).div_ceil(BLOCK));
        // Blocks outside the data ranges are zero: they add nothing.
        let mut i = b0.max(next);
        while i < b1 {
            let n = ((b1 - i) * BLOCK).min(buf.len() as u64);
            let bytes = n.min(size - i * BLOCK) as usize;
            let chunk = buf.get_mut(..bytes).unwrap_or(&mut []);
            read(i * BLOCK, chunk)?;
            for (k, b) in chunk.chunks(BLOCK as usize).enumerate() {
                value ^= contribution(i + k as u64, b.len(), crate::crc::crc32c(b));
            }
            i += bytes.div_ceil(BLOCK as usize) as u64;
        }
        next = next.max(b1);
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn whole(disk: &[u8]) -> u64 {
        of_ranges(disk.len() as u64, &[(0, disk.len() as u64)], &mut |o, b| {
            b.copy_from_slice(&disk[o as usize..o as usize + b.len()]);
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn incremental_equals_recomputed() {
        let size = 5 * BLOCK + 100;
        let mut disk = vec![0u8; size as usize];
        let mut d = DiskDigest::zeroed(size);
        assert_eq!(d.value(), whole(&disk));
        assert_eq!(d.value(), of_ranges(size, &[], &mut |_, _| Ok(())).unwrap());
        let writes: [(u64, usize, u8); 5] = [
            (0, 4096, 1),
            (100, 9000, 2),
            (5 * BLOCK, 100, 3),
            (3 * BLOCK + 7, 1, 4),
            (0, size as usize, 5),
        ];
        for (off, len, v) in writes {
            let data = vec![v; len];
            disk[off as usize..off as usize + len].copy_from_slice(&data);
            let snapshot = disk.clone();
            d.write(off, &data, &mut |o, b| {
                b.copy_from_slice(&snapshot[o as usize..o as usize + b.len()]);
                Ok(())
            })
            .unwrap();
            assert_eq!(d.value(), whole(&disk), "after write at {off}+{len}");
        }
        disk[10..5000].fill(0);
        let snapshot = disk.clone();
        d.zero(10, 4990, &mut |o, b| {
            b.copy_from_slice(&snapshot[o as usize..o as usize + b.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(d.value(), whole(&disk));
        disk[2 * BLOCK as usize..3 * BLOCK as usize].fill(0);
        d.zero(2 * BLOCK, BLOCK, &mut |_, _| unreachable!("whole block"))
            .unwrap();
        assert_eq!(d.value(), whole(&disk));
        // Data ranges that skip zero blocks give the same answer.
        let sparse = of_ranges(size, &[(0, 2 * BLOCK), (3 * BLOCK, size)], &mut |o, b| {
            b.copy_from_slice(&disk[o as usize..o as usize + b.len()]);
            Ok(())
        });
        assert_eq!(sparse.unwrap(), whole(&disk));
    }

    #[test]
    fn swapped_blocks_change_the_digest() {
        let mut disk = vec![0u8; 2 * BLOCK as usize];
        disk[..4096].fill(1);
        let a = whole(&disk);
        disk.rotate_left(4096);
        assert_ne!(a, whole(&disk));
    }
}
