//! CRC-32C (Castagnoli, the iSCSI polynomial), as every record, frame, header and
//! digest block in replog is checked with: computed by `crc-fast`, which folds with
//! carry-less multiplication where the CPU has it (about 2.5× the `crc32c` crate's
//! speed on 4 KiB blocks and 1 MiB payloads on this project's machines; the figures
//! are in docs/DESIGN.md). The values are the standard CRC-32C: the on-disk and wire
//! formats do not depend on which implementation computes them (tested against the
//! `crc32c` crate below).

use crc_fast::CrcAlgorithm::Crc32Iscsi;

/// CRC-32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// CRC-32C of the bytes whose CRC is `crc`, followed by `data`.
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The running state is the finished CRC with its final XOR undone.
    let mut d = crc_fast::Digest::new_with_init_state(Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

/// CRC-32C of `a` followed by `b`, from the CRC of each and the length of `b`.
#[inline]
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    if len_b == 0 {
        // Nothing follows `a` (crc-fast would mix in `crc_b` regardless).
        return crc_a;
    }
    crc_fast::checksum_combine(Crc32Iscsi, u64::from(crc_a), u64::from(crc_b), len_b) as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_check_value_of_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), 0xe306_9283);
        assert_eq!(
            crc32c_combine(crc32c(b"1234"), crc32c(b"56789"), 5),
            0xe306_9283
        );
        // Nothing after `a`: `a`'s CRC, whatever the second CRC says.
        assert_eq!(crc32c_combine(0xe306_9283, 0xdead_beef, 0), 0xe306_9283);
    }

    /// Every length up to 1100 bytes (the short-buffer paths every header and chain
    /// append takes) and around 4 KiB and 1 MiB, with fixed seeds, as the `crc32c`
    /// crate computes them.
    #[test]
    fn every_short_length_and_the_block_sizes_match_the_crc32c_crate() {
        let data: Vec<u8> = (0..(1usize << 20) + 1)
            .map(|i| (i * 131 + i / 977) as u8)
            .collect();
        let lens = (0..=1100).chain([4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1]);
        for len in lens {
            let d = &data[..len];
            assert_eq!(crc32c(d), ::crc32c::crc32c(d), "length {len}");
            for seed in [0u32, !0, 0x1234_5678] {
                assert_eq!(
                    crc32c_append(seed, d),
                    ::crc32c::crc32c_append(seed, d),
                    "append of {len} to {seed:#x}"
                );
            }
            let (a, b) = d.split_at(len / 3);
            assert_eq!(
                crc32c_combine(crc32c(a), crc32c(b), b.len() as u64),
                crc32c(d),
                "combine at {} of {len}",
                len / 3
            );
        }
    }

    proptest! {
        /// Every function gives what the `crc32c` crate gives, for any data and any
        /// split of it (short buffers as often as long ones).
        #[test]
        fn same_as_the_crc32c_crate(
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(any::<u8>(), 0..20_000),
            ],
            split in any::<prop::sample::Index>(),
            seed in any::<u32>(),
        ) {
            let at = split.index(data.len() + 1);
            let (a, b) = data.split_at(at);
            prop_assert_eq!(crc32c(&data), ::crc32c::crc32c(&data));
            prop_assert_eq!(crc32c_append(seed, b), ::crc32c::crc32c_append(seed, b));
            prop_assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
            prop_assert_eq!(
                crc32c_combine(crc32c(a), crc32c(b), b.len() as u64),
                ::crc32c::crc32c_combine(::crc32c::crc32c(a), ::crc32c::crc32c(b), b.len())
            );
        }
    }
}
