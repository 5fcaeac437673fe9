//! Segment files: a header, records (see [`super::record`]), and — once sealed — a
//! footer.
//!
//! A segment is named `<seq>.seg` with `seq` as 20 decimal digits, so names sort in
//! the order they were written.
//!
//! ## Segment header (64 bytes, at offset 0)
//!
//! ```text
//! off len field
//!   0   8 magic: 89 52 4C 53 0D 0A 1A 0A  ("\x89RLS\r\n\x1a\n", PNG-style: high
//!         bit, line endings and ^Z catch text-mode and truncating transfers)
//!   8   2 format version (2; version 1 is read: bytes 56..60 were reserved)
//!  10   2 header length in bytes (64)
//!  12   4 incompatible feature bits (a reader refuses any it does not know):
//!         bit 0 RECYCLED — the file held an earlier segment (see `journal::spare`):
//!         every record's CRC is seeded with the salt at 20..24 (see `record`), and
//!         the bytes after the last record up to the file's end are the earlier
//!         segment's. Their records, and any record-like bytes in their payloads
//!         (guest data), fail the salted CRC, so a scan stops there as at a torn
//!         tail. A reader that does not know the bit must refuse the segment: it
//!         would read every record as damaged.
//!  16   4 compatible feature bits (a reader ignores those it does not know; none yet)
//!  20   4 with RECYCLED: the salt, random and non-zero, chosen when the file was
//!         taken for this segment (after every byte it holds was written); without:
//!         reserved, zero
//!  24   8 machine id (random, from the machine manifest: segments never mix)
//!  32   8 segment sequence number
//!  40   8 base LSN: every record in the segment has an LSN >= this
//!  48   8 creation time, nanoseconds since the Unix epoch
//!  56   4 the machine's generation when the segment was written (>= 1; version 1:
//!         reserved zero, read as generation 1)
//!  60   4 CRC-32C of bytes 0..60
//! ```
//!
//! ## Segment footer (48 bytes, written once when the segment is sealed, and only after
//! every record before it is durable — so a footer on disk proves its records were)
//!
//! ```text
//! off len field
//!   0   4 magic "RFTR" (52 46 54 52)
//!   4   4 number of records
//!   8   8 first LSN in the segment
//!  16   8 last LSN in the segment
//!  24   8 offset of this footer in the file (= header + all records)
//!  32   8 seal time, nanoseconds since the Unix epoch
//!  40   4 chain checksum: CRC-32C of every record's CRC, in order (4 bytes LE each)
//!  44   4 CRC-32C of bytes 0..44
//! ```
//!
//! A sealed segment ends exactly after its footer. A segment without a footer is the
//! active one (or one torn by a crash; only the last segment of a journal may be so).

use super::{DecodeError, Le, LeMut};

pub const SEGMENT_MAGIC: [u8; 8] = *b"\x89RLS\r\n\x1a\n";
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const FOOTER_MAGIC: [u8; 4] = *b"RFTR";
pub const FOOTER_LEN: usize = 48;
/// Segment numbers are below this (10^19 would not fit the 20-digit names' meaning
/// of "sorted"; 2^62 leaves room for `seq + 1` everywhere).
pub const MAX_SEGMENT_SEQ: u64 = 1 << 62;
/// The segment format version this build writes (and the newest it reads).
pub const SEGMENT_VERSION: u16 = 2;
/// Incompatible feature bit: the segment was written into a recycled file, its
/// records' CRCs salted (header table above).
pub const INCOMPAT_RECYCLED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u16,
    pub compat: u32,
    /// Non-zero for a segment written into a recycled file: seeds every record's CRC.
    pub salt: u32,
    pub machine_id: u64,
    pub seq: u64,
    pub base_lsn: u64,
    pub created_ns: u64,
    /// The machine's generation when the segment was written.
    pub generation: u32,
}

impl SegmentHeader {
    pub fn new(machine_id: u64, seq: u64, base_lsn: u64, created_ns: u64) -> Self {
        SegmentHeader {
            version: SEGMENT_VERSION,
            compat: 0,
            salt: 0,
            machine_id,
            seq,
            base_lsn,
            created_ns,
            generation: 1,
        }
    }

    /// The same header for a machine at `generation`.
    pub fn with_generation(mut self, generation: u32) -> Self {
        self.generation = generation;
        self
    }

    /// The same header for a segment written into a recycled file, its records'
    /// CRCs seeded with `salt` (non-zero).
    pub fn recycled(mut self, salt: u32) -> Self {
        self.salt = salt;
        self
    }

    /// True if the segment was written into a recycled file.
    pub fn is_recycled(&self) -> bool {
        self.salt != 0
    }

    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        let mut w = LeMut(&mut b);
        w.put(0, &SEGMENT_MAGIC);
        w.u16(8, self.version);
        w.u16(10, SEGMENT_HEADER_LEN as u16);
        w.u32(12, if self.salt != 0 { INCOMPAT_RECYCLED } else { 0 });
        w.u32(16, self.compat);
        w.u32(20, self.salt);
        w.u64(24, self.machine_id);
        w.u64(32, self.seq);
        w.u64(40, self.base_lsn);
        w.u64(48, self.created_ns);
        if self.version >= 2 {
            w.u32(56, self.generation);
        }
        let crc = crate::crc::crc32c(b.get(..60).unwrap_or(&[]));
        LeMut(&mut b).u32(60, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let Some(b) = b.get(..SEGMENT_HEADER_LEN) else {
            return Err(DecodeError::new(
                0,
                format!(
                    "segment header is {} bytes, need {SEGMENT_HEADER_LEN}",
                    b.len()
                ),
            ));
        };
        if b.get(..8) != Some(&SEGMENT_MAGIC[..]) {
            return Err(DecodeError::new(0, "not a replog segment (bad magic)"));
        }
        let r = Le(b);
        let crc = crate::crc::crc32c(b.get(..60).unwrap_or(&[]));
        if crc != r.u32(60) {
            return Err(DecodeError::new(0, "segment header checksum mismatch"));
        }
        let version = r.u16(8);
        let incompat = r.u32(12);
        super::check_version_supporting(
            "segment",
            version,
            SEGMENT_VERSION,
            incompat,
            INCOMPAT_RECYCLED,
            8,
        )?;
        if usize::from(r.u16(10)) != SEGMENT_HEADER_LEN {
            return Err(DecodeError::new(10, format!("header length {}", r.u16(10))));
        }
        let salt = r.u32(20);
        match (incompat & INCOMPAT_RECYCLED != 0, salt) {
            (true, 0) => return Err(DecodeError::new(20, "a recycled segment without a salt")),
            (false, s) if s != 0 => {
                return Err(DecodeError::new(20, "non-zero reserved bytes"));
            }
            _ => {}
        }
        let generation = match version {
            1 if r.u32(56) != 0 => {
                return Err(DecodeError::new(56, "non-zero reserved bytes"));
            }
            1 => 1,
            _ => r.u32(56),
        };
        if generation == 0 {
            return Err(DecodeError::new(56, "generation 0"));
        }
        let (seq, base_lsn) = (r.u64(32), r.u64(40));
        if seq == 0 || seq >= MAX_SEGMENT_SEQ {
            return Err(DecodeError::new(
                32,
                format!("segment number {seq} is out of range"),
            ));
        }
        if base_lsn == 0 || base_lsn >= super::record::MAX_LSN {
            return Err(DecodeError::new(
                40,
                format!("base LSN {base_lsn} is out of range"),
            ));
        }
        Ok(SegmentHeader {
            version: r.u16(8),
            compat: r.u32(16),
            salt,
            machine_id: r.u64(24),
            seq: r.u64(32),
            base_lsn: r.u64(40),
            created_ns: r.u64(48),
            generation,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentFooter {
    pub records: u32,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub footer_offset: u64,
    pub sealed_ns: u64,
    pub chain_crc: u32,
}

impl SegmentFooter {
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        let mut w = LeMut(&mut b);
        w.put(0, &FOOTER_MAGIC);
        w.u32(4, self.records);
        w.u64(8, self.first_lsn);
        w.u64(16, self.last_lsn);
        w.u64(24, self.footer_offset);
        w.u64(32, self.sealed_ns);
        w.u32(40, self.chain_crc);
        let crc = crate::crc::crc32c(b.get(..44).unwrap_or(&[]));
        LeMut(&mut b).u32(44, crc);
        b
    }

    /// True if `b` holds a footer whose magic and checksum are right, whatever its
    /// fields say (a footer that was written, even if it disagrees with its segment).
    pub fn checksum_ok(b: &[u8]) -> bool {
        Self::is_footer(b)
            && b.len() >= FOOTER_LEN
            && crate::crc::crc32c(b.get(..44).unwrap_or(&[])) == Le(b).u32(44)
    }

    /// True if `b` starts with the footer magic (as opposed to a record).
    pub fn is_footer(b: &[u8]) -> bool {
        b.get(..4) == Some(&FOOTER_MAGIC[..])
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let Some(b) = b.get(..FOOTER_LEN) else {
            return Err(DecodeError::new(0, "footer cut short"));
        };
        if !Self::is_footer(b) {
            return Err(DecodeError::new(0, "bad footer magic"));
        }
        let r = Le(b);
        if crate::crc::crc32c(b.get(..44).unwrap_or(&[])) != r.u32(44) {
            return Err(DecodeError::new(0, "footer checksum mismatch"));
        }
        if r.u64(24) >= 1 << 62 || r.u64(16) >= super::record::MAX_LSN {
            return Err(DecodeError::new(16, "footer offset or LSN out of range"));
        }
        Ok(SegmentFooter {
            records: r.u32(4),
            first_lsn: r.u64(8),
            last_lsn: r.u64(16),
            footer_offset: r.u64(24),
            sealed_ns: r.u64(32),
            chain_crc: r.u32(40),
        })
    }
}

/// File name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

/// Parse a segment file name back into its sequence number.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits
        .parse()
        .ok()
        .filter(|s| *s > 0 && *s < MAX_SEGMENT_SEQ)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_refuses_damage() {
        let h = SegmentHeader::new(7, 3, 100, 123);
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for i in 0..SEGMENT_HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(SegmentHeader::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(SegmentHeader::decode(&b[..10]).is_err());
    }

    #[test]
    fn version_1_reads_as_generation_1_and_newer_versions_are_refused() {
        let mut v1 = SegmentHeader::new(7, 3, 100, 123);
        v1.version = 1;
        let b = v1.encode();
        assert_eq!(SegmentHeader::decode(&b).map(|h| h.generation), Ok(1));
        let v2 = SegmentHeader::new(7, 3, 100, 123).with_generation(5);
        assert_eq!(
            SegmentHeader::decode(&v2.encode()).map(|h| h.generation),
            Ok(5)
        );
        let mut v3 = v2;
        v3.version = 3;
        let err = SegmentHeader::decode(&v3.encode()).expect_err("version 3 read");
        assert!(
            err.what.contains("version 3") && err.what.contains("1 to 2"),
            "{}",
            err.what
        );
    }

    #[test]
    fn a_recycled_header_carries_its_salt_under_an_incompatible_bit() {
        let h = SegmentHeader::new(7, 3, 100, 123).recycled(0xdead_beef);
        let b = h.encode();
        assert_eq!(
            u32::from_le_bytes(b[12..16].try_into().unwrap()),
            INCOMPAT_RECYCLED
        );
        let d = SegmentHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        assert!(d.is_recycled());
        assert!(
            !SegmentHeader::decode(&SegmentHeader::new(7, 3, 100, 123).encode())
                .unwrap()
                .is_recycled()
        );
        // The bit without a salt, a salt without the bit, an unknown bit: refused.
        let reseal = |mut b: [u8; SEGMENT_HEADER_LEN]| {
            let crc = crate::crc::crc32c(&b[..60]);
            b[60..].copy_from_slice(&crc.to_le_bytes());
            SegmentHeader::decode(&b)
        };
        let mut no_salt = b;
        no_salt[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert!(reseal(no_salt).unwrap_err().what.contains("salt"));
        let mut no_bit = b;
        no_bit[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(reseal(no_bit).unwrap_err().what.contains("reserved"));
        let mut unknown = b;
        unknown[12..16].copy_from_slice(&3u32.to_le_bytes());
        assert!(reseal(unknown).unwrap_err().what.contains("0x2"));
    }

    #[test]
    fn footer_round_trip() {
        let f = SegmentFooter {
            records: 3,
            first_lsn: 1,
            last_lsn: 3,
            footer_offset: 400,
            sealed_ns: 9,
            chain_crc: 77,
        };
        assert_eq!(SegmentFooter::decode(&f.encode()), Ok(f));
    }

    #[test]
    fn names() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("../42.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
    }
}
