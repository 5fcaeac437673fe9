//! Journal records.
//!
//! ## Record header (48 bytes), followed by `payload length` bytes of payload
//!
//! ```text
//! off len field
//!   0   4 magic "RREC" (52 52 45 43)
//!   4   1 kind: 1 = write (payload = the data), 2 = zero (discard / write-zeroes;
//!         no payload), 3 = recovery point (payload: see below; a newer version may
//!         add fields after those, which older readers skip)
//!   5   1 flags: bit 0 = app-consistent (points only); other bits must be zero
//!   6   2 reserved, zero
//!   8   8 LSN (strictly increasing within a machine, across its segments)
//!  16   4 disk id (0 for points)
//!  20   4 payload length in bytes
//!  24   8 disk byte offset (writes and zeros)
//!  32   8 length in bytes of the disk range (writes: = payload length; points: 0)
//!  40   4 reserved, zero
//!  44   4 CRC-32C of bytes 0..44 followed by the payload; in a segment written into
//!         a recycled file (segment header bit RECYCLED), of the segment's salt
//!         (4 bytes, little-endian) followed by those
//! ```
//!
//! ## Point payload
//!
//! ```text
//!   0   8 wall-clock time in ns since the Unix epoch
//! optional (present when the machine keeps digests, i.e. it is protected; a layout
//! that does not fit — another block size, too short — reads as no digests):
//!   8   4 number of disks n
//!  12   4 digest block size in bytes (4096)
//!  16 8*n digest of each disk in disk-id order, state after every record with an
//!         LSN <= this point's (see `crate::digest`)
//! optional, only after the digests (present when `replog plan checkpoint` recorded
//! the point at one barrier with other machines' points):
//! 16+8n 8 plan-point ID (non-zero: the barrier's wall clock in ns); every machine
//!         of the barrier carries the same ID
//! ```
//!
//! Builds before plan points read the digests and skip the ID, as the layout allows.
//!
//! A record is never split across segments. Its CRC covers the whole header, so a
//! flipped bit in the LSN, offset or length is caught like one in the data.

use super::{DecodeError, Le, LeMut};

pub const RECORD_MAGIC: [u8; 4] = *b"RREC";
pub const RECORD_HEADER_LEN: usize = 48;
/// Largest payload one record may carry. Bigger writes are split into several records.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// LSNs are below this (2^63), so `lsn + 1` never overflows anywhere.
pub const MAX_LSN: u64 = 1 << 63;
/// Flag bit: the point is app-consistent.
pub const FLAG_APP_CONSISTENT: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write,
    Zero,
    Point,
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Zero => 2,
            RecordKind::Point => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::Point),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u8,
    pub lsn: u64,
    pub disk: u32,
    pub payload_len: u32,
    pub offset: u64,
    pub length: u64,
    pub crc: u32,
}

impl RecordHeader {
    /// A header for `kind` whose CRC is computed over `payload`.
    pub fn new(
        kind: RecordKind,
        flags: u8,
        lsn: u64,
        disk: u32,
        offset: u64,
        length: u64,
        payload: &[&[u8]],
    ) -> Self {
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        let mut h = RecordHeader {
            kind,
            flags,
            lsn,
            disk,
            payload_len: payload_len as u32,
            offset,
            length,
            crc: 0,
        };
        let head = h.encode_without_crc();
        let mut crc = crate::crc::crc32c(head.get(..44).unwrap_or(&[]));
        for p in payload {
            crc = crate::crc::crc32c_append(crc, p);
        }
        h.crc = crc;
        h
    }

    /// The same record with its CRC seeded with `salt` (a segment written into a
    /// recycled file; 0: unsalted, the same record). Derived from the unsalted CRC
    /// without reading the payload again: the CRC of `salt ‖ header ‖ payload`.
    pub fn salted(mut self, salt: u32) -> Self {
        if salt != 0 {
            let len = 44 + u64::from(self.payload_len);
            self.crc =
                crate::crc::crc32c_combine(crate::crc::crc32c(&salt.to_le_bytes()), self.crc, len);
        }
        self
    }

    fn encode_without_crc(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        let mut w = LeMut(&mut b);
        w.put(0, &RECORD_MAGIC);
        w.u8(4, self.kind.code());
        w.u8(5, self.flags);
        w.u64(8, self.lsn);
        w.u32(16, self.disk);
        w.u32(20, self.payload_len);
        w.u64(24, self.offset);
        w.u64(32, self.length);
        b
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = self.encode_without_crc();
        LeMut(&mut b).u32(44, self.crc);
        b
    }

    /// Bytes of header plus payload.
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// True if `b` starts with the record magic.
    pub fn is_record(b: &[u8]) -> bool {
        b.get(..4) == Some(&RECORD_MAGIC[..])
    }

    /// Decode and sanity-check a header. The CRC is checked by [`verify`](Self::verify)
    /// once the payload has been read.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let Some(b) = b.get(..RECORD_HEADER_LEN) else {
            return Err(DecodeError::new(0, "record header cut short"));
        };
        if !Self::is_record(b) {
            return Err(DecodeError::new(0, "bad record magic"));
        }
        let r = Le(b);
        let Some(kind) = RecordKind::from_code(r.u8(4)) else {
            return Err(DecodeError::new(
                4,
                format!("unknown record kind {}", r.u8(4)),
            ));
        };
        let h = RecordHeader {
            kind,
            flags: r.u8(5),
            lsn: r.u64(8),
            disk: r.u32(16),
            payload_len: r.u32(20),
            offset: r.u64(24),
            length: r.u64(32),
            crc: r.u32(44),
        };
        if h.lsn == 0 || h.lsn >= MAX_LSN {
            return Err(DecodeError::new(
                8,
                format!("LSN {} is out of range", h.lsn),
            ));
        }
        if h.payload_len > MAX_PAYLOAD {
            return Err(DecodeError::new(
                20,
                format!("payload length {} too large", h.payload_len),
            ));
        }
        let flags_ok = match kind {
            RecordKind::Point => h.flags & !FLAG_APP_CONSISTENT == 0,
            _ => h.flags == 0,
        };
        if !flags_ok || r.u16(6) != 0 || r.u32(40) != 0 {
            return Err(DecodeError::new(
                5,
                "unknown flags or non-zero reserved bytes",
            ));
        }
        let shape_ok = match kind {
            RecordKind::Write => u64::from(h.payload_len) == h.length && h.length > 0,
            RecordKind::Zero => h.payload_len == 0 && h.length > 0,
            RecordKind::Point => h.payload_len >= 8 && h.length == 0,
        };
        if !shape_ok || h.offset.checked_add(h.length).is_none() {
            return Err(DecodeError::new(20, "record lengths do not fit its kind"));
        }
        Ok(h)
    }

    /// Check the CRC over the header and `payload`.
    pub fn verify(&self, payload: &[u8]) -> Result<(), DecodeError> {
        self.verify_salted(payload, 0)
    }

    /// Check the CRC over the header and `payload`, seeded with the segment's `salt`
    /// (0: none).
    pub fn verify_salted(&self, payload: &[u8], salt: u32) -> Result<(), DecodeError> {
        let expect = RecordHeader::new(
            self.kind,
            self.flags,
            self.lsn,
            self.disk,
            self.offset,
            self.length,
            &[payload],
        )
        .salted(salt);
        if expect.crc != self.crc || payload.len() != self.payload_len as usize {
            return Err(DecodeError::new(44, "record checksum mismatch"));
        }
        Ok(())
    }
}

/// Payload of a point record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointPayload {
    pub time_ns: u64,
    /// Digest of every disk at this point (see [`crate::digest`]), when kept.
    pub digests: Option<Vec<u64>>,
    /// The plan point this point belongs to (written only after digests).
    pub plan_point: Option<u64>,
}

impl PointPayload {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.time_ns.to_le_bytes().to_vec();
        if let Some(d) = &self.digests {
            b.extend_from_slice(&(d.len() as u32).to_le_bytes());
            b.extend_from_slice(&(crate::digest::BLOCK as u32).to_le_bytes());
            for v in d {
                b.extend_from_slice(&v.to_le_bytes());
            }
            // The ID has a place only after the digests; a machine that keeps none is
            // refused a plan point before it gets here (`Machine::plan_barrier`).
            if let Some(id) = self.plan_point.filter(|&id| id != 0) {
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
        b
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < 8 {
            return Err(DecodeError::new(0, "point payload cut short"));
        }
        let time_ns = Le(b).u64(0);
        if b.len() < 16 {
            return Ok(PointPayload {
                time_ns,
                digests: None,
                plan_point: None,
            });
        }
        // Digests in a layout this version does not know (another block size, a count
        // the payload cannot hold) are no digests: the point stays a point.
        let n = Le(b).u32(8) as usize;
        let block = Le(b).u32(12);
        let want = n.checked_mul(8).and_then(|x| x.checked_add(16));
        let Some(want) = want.filter(|&w| u64::from(block) == crate::digest::BLOCK && b.len() >= w)
        else {
            return Ok(PointPayload {
                time_ns,
                digests: None,
                plan_point: None,
            });
        };
        let digests = (0..n).map(|k| Le(b).u64(16 + 8 * k)).collect();
        let plan_point = (b.len() >= want + 8)
            .then(|| Le(b).u64(want))
            .filter(|&id| id != 0);
        Ok(PointPayload {
            time_ns,
            digests: Some(digests),
            plan_point,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_salted_crc_is_that_of_the_salt_then_the_record() {
        let data = b"some payload bytes";
        let h = RecordHeader::new(RecordKind::Write, 0, 9, 1, 4096, 18, &[data]);
        let s = h.salted(0x1234_5678);
        let mut direct = crate::crc::crc32c(&0x1234_5678u32.to_le_bytes());
        direct = crate::crc::crc32c_append(direct, &h.encode()[..44]);
        direct = crate::crc::crc32c_append(direct, data);
        assert_eq!(s.crc, direct);
        assert_ne!(s.crc, h.crc);
        assert_eq!(h.salted(0), h, "salt 0 is no salt");
        s.verify_salted(data, 0x1234_5678).unwrap();
        assert!(s.verify(data).is_err(), "a salted record fails unsalted");
        assert!(h.verify_salted(data, 0x1234_5678).is_err());
        assert!(s.verify_salted(data, 0x1234_5679).is_err());
    }

    #[test]
    fn round_trip_and_crc_covers_everything() {
        let data = b"hello world";
        let h = RecordHeader::new(RecordKind::Write, 0, 9, 1, 4096, 11, &[data]);
        let b = h.encode();
        let d = RecordHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        d.verify(data).unwrap();
        assert!(d.verify(b"hello worle").is_err());
        for i in 0..RECORD_HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            let caught = match RecordHeader::decode(&bad) {
                Err(_) => true,
                Ok(h) => h.verify(data).is_err(),
            };
            assert!(caught, "flip in header byte {i} not caught");
        }
    }

    #[test]
    fn a_plan_point_id_follows_the_digests_and_older_layouts_still_read() {
        let p = PointPayload {
            time_ns: 7,
            digests: Some(vec![1, 2]),
            plan_point: Some(99),
        };
        let b = p.encode();
        assert_eq!(b.len(), 16 + 16 + 8);
        assert_eq!(PointPayload::decode(&b).unwrap(), p);
        // What a build before plan points reads: the same digests (it stops there).
        let before = PointPayload::decode(&b[..32]).unwrap();
        assert_eq!(before.digests, p.digests);
        assert_eq!(before.plan_point, None);
        // No digests, no place for an ID: it is not written.
        let bare = PointPayload {
            time_ns: 7,
            digests: None,
            plan_point: Some(99),
        };
        assert_eq!(bare.encode().len(), 8);
        // A cut ID is no ID.
        assert_eq!(PointPayload::decode(&b[..36]).unwrap().plan_point, None);
    }

    #[test]
    fn split_payload_crc_equals_whole() {
        let a = RecordHeader::new(RecordKind::Write, 0, 1, 0, 0, 6, &[b"abc", b"def"]);
        let b = RecordHeader::new(RecordKind::Write, 0, 1, 0, 0, 6, &[b"abcdef"]);
        assert_eq!(a.crc, b.crc);
    }
}
