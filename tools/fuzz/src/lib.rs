//! Shared by the libFuzzer target (`fuzz_targets/segment.rs`) and the stable driver
//! (`src/bin/segment_mutate.rs`): what one input is checked for, how valid segments
//! are generated, and how they are mutated.
//!
//! [`check`] treats the bytes as a segment file and runs, in order:
//! - every decoder of `replog::format` on the bytes and on windows of them
//!   (segment header, footer, record header + CRC verification, point payload,
//!   machine manifest, merge watermark, metadata envelope);
//! - `journal::reader::scan_segment` over a `MemStorage` file, expecting nothing and
//!   expecting what the header says, re-verifying every record it hands out (CRC,
//!   bytes, LSN order) and the scan's own summary;
//! - `journal::reader::valid_records_after` (the torn-tail helper);
//! - `journal::recover` on a journal holding the bytes as its only segment, and, when
//!   recovery succeeds, a re-scan proving the repaired journal is valid.
//!
//! Any panic — in replog or in an assertion here — is a finding.

use replog::format::meta::{self, Manifest, Watermark};
use replog::format::record::{PointPayload, FLAG_APP_CONSISTENT};
use replog::format::segment::segment_name;
use replog::format::{
    RecordHeader, RecordKind, SegmentFooter, SegmentHeader, FOOTER_LEN, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use replog::journal::reader::{scan_bytes, scan_segment, valid_records_after, Expect, SegmentScan};
use replog::journal::{list_segments, recover, JournalParams};
use replog::storage::{MemStorage, OpenMode, Storage, StorageFile};
use std::path::Path;
use std::sync::Arc;

pub mod decoders;

const DIR: &str = "/m/journal";

/// Check one input; panics on any finding.
pub fn check(data: &[u8]) {
    decode_everything(data);
    let header = SegmentHeader::decode(data).ok();
    scan_checked(
        data,
        Expect {
            machine_id: None,
            seq: None,
            first_lsn: None,
            disk_count: None,
        },
    );
    if let Some(h) = header {
        scan_checked(
            data,
            Expect {
                machine_id: Some(h.machine_id),
                seq: Some(h.seq),
                first_lsn: Some(h.base_lsn),
                disk_count: Some(4),
            },
        );
    }
    recover_checked(data, header);
}

/// Every decoder on `b` and on a few windows of it.
pub fn decode_everything(b: &[u8]) {
    for start in [
        0,
        1,
        4,
        SEGMENT_HEADER_LEN,
        b.len().saturating_sub(FOOTER_LEN),
    ] {
        let w = b.get(start..).unwrap_or(&[]);
        if let Ok(h) = SegmentHeader::decode(w) {
            let again = SegmentHeader::decode(&h.encode()).expect("header re-decodes");
            assert_eq!(again, h, "segment header does not round-trip");
        }
        let _ = SegmentFooter::is_footer(w);
        if let Ok(f) = SegmentFooter::decode(w) {
            assert_eq!(
                &f.encode()[..],
                w.get(..FOOTER_LEN).unwrap_or(&[]),
                "footer does not round-trip"
            );
        }
        let _ = RecordHeader::is_record(w);
        if let Ok(h) = RecordHeader::decode(w) {
            let payload = w.get(RECORD_HEADER_LEN..).unwrap_or(&[]);
            let _ = h.verify(payload);
            if let Some(p) = payload.get(..h.payload_len as usize) {
                let _ = h.verify(p);
            }
            assert_eq!(
                &h.encode()[..],
                w.get(..RECORD_HEADER_LEN).unwrap_or(&[]),
                "record header does not round-trip"
            );
            let _ = h.total_len();
        }
        let _ = PointPayload::decode(w);
        if let Ok(m) = Manifest::decode(w) {
            assert_eq!(
                Manifest::decode(&m.encode()).ok(),
                Some(m),
                "manifest does not round-trip"
            );
        }
        if let Ok(wm) = Watermark::decode(w) {
            assert_eq!(
                Watermark::decode(&wm.encode()).ok(),
                Some(wm),
                "watermark does not round-trip"
            );
        }
        for kind in [0, meta::KIND_MANIFEST, meta::KIND_WATERMARK, u16::MAX] {
            let _ = meta::decode(kind, w);
        }
    }
}

fn mem_segment(bytes: &[u8], seq: u64) -> (MemStorage, Arc<dyn StorageFile>) {
    let storage = MemStorage::new();
    storage.create_dir_all(Path::new(DIR)).expect("mkdir");
    let path = Path::new(DIR).join(segment_name(seq));
    let f = storage.open(&path, OpenMode::CreateNew).expect("create");
    if !bytes.is_empty() {
        f.write_at(&[bytes], 0).expect("write");
    }
    (storage, f)
}

/// Scan `bytes` as a segment; check every record handed out and the summary.
pub fn scan_checked(bytes: &[u8], expect: Expect) -> SegmentScan {
    let (_storage, file) = mem_segment(bytes, 1);
    let mut handed_out = 0u32;
    let mut prev_lsn: Option<u64> = None;
    let mut chain = 0u32;
    let mut from_file = Vec::new();
    let scan = scan_segment(file.as_ref(), expect, |rec| {
        from_file.push((rec.offset, rec.header, rec.payload.to_vec()));
        if let Err(e) = rec.header.verify(rec.payload) {
            panic!(
                "record at {} handed out with a bad CRC: {}",
                rec.offset, e.what
            );
        }
        let at = rec.offset as usize;
        let pat = rec.payload_offset as usize;
        assert!(at >= SEGMENT_HEADER_LEN, "record inside the segment header");
        assert_eq!(pat, at + RECORD_HEADER_LEN);
        let end = pat + rec.header.payload_len as usize;
        let file_payload = bytes
            .get(pat..end)
            .expect("record runs past the end of the file");
        assert_eq!(rec.payload, file_payload, "payload is not the file's bytes");
        let on_disk = RecordHeader::decode(bytes.get(at..).unwrap_or(&[]))
            .expect("handed-out header decodes");
        assert_eq!(on_disk, rec.header);
        if let Some(p) = prev_lsn {
            assert_eq!(
                Some(rec.header.lsn),
                p.checked_add(1),
                "LSNs are not consecutive"
            );
        }
        if let Some(n) = expect.disk_count {
            if rec.header.kind != RecordKind::Point {
                assert!(rec.header.disk < n, "disk id out of range handed out");
            }
        }
        if rec.header.kind == RecordKind::Point {
            assert!(rec.point().is_some(), "point payload does not decode");
            assert_eq!(rec.header.flags & !FLAG_APP_CONSISTENT, 0);
        }
        prev_lsn = Some(rec.header.lsn);
        chain = crc32c_append(chain, &rec.header.crc.to_le_bytes());
        handed_out += 1;
        Ok(())
    })
    .expect("MemStorage reads never fail");
    // The same bytes scanned in place, as a target scans an incoming segment.
    let mut in_place = Vec::new();
    let same = scan_bytes(bytes, expect, |rec| {
        in_place.push((rec.offset, rec.header, rec.payload.to_vec()));
        Ok(())
    })
    .expect("a scan in memory does no I/O");
    assert_eq!(in_place, from_file, "records scanned in place");
    assert_eq!(format!("{same:?}"), format!("{scan:?}"), "scan in place");
    assert_eq!(scan.records, handed_out);
    assert_eq!(scan.chain_crc, chain);
    assert_eq!(scan.last_lsn, prev_lsn);
    assert_eq!(scan.file_len, bytes.len() as u64);
    assert!(scan.end <= scan.file_len);
    if scan.header.is_none() {
        assert_eq!(handed_out, 0);
        assert!(scan.fault.is_some(), "no header and no fault");
    }
    if scan.fault.is_some() {
        assert!(scan.footer.is_none());
    } else if let Some(f) = &scan.footer {
        assert_eq!(scan.end + FOOTER_LEN as u64, scan.file_len);
        assert_eq!(f.records, scan.records);
        assert_eq!(f.chain_crc, scan.chain_crc);
    } else {
        assert_eq!(
            scan.end, scan.file_len,
            "clean unsealed scan must reach the end"
        );
    }
    // Unsalted, and with the salt of the header (a recycled segment's records).
    let salt = scan.header.map_or(0, |h| h.salt);
    for from in [scan.end, 0, 1, bytes.len() as u64] {
        for salt in [0, salt] {
            let _ = valid_records_after(file.as_ref(), from, salt)
                .expect("MemStorage reads never fail");
        }
    }
    scan
}

/// Recover a journal whose only segment is `bytes`; if recovery accepts it, what it
/// leaves behind must scan clean.
fn recover_checked(bytes: &[u8], header: Option<SegmentHeader>) {
    // Name the file and set the watermark the way the header asks, so that recovery
    // gets past the header and into the records.
    let h = header.unwrap_or_else(|| SegmentHeader::new(0, 1, 1, 0));
    let (storage, file) = mem_segment(bytes, h.seq);
    drop(file);
    let params = JournalParams {
        machine_id: h.machine_id,
        disk_count: 4,
        segment_bytes: 1 << 20,
        watermark_lsn: h.base_lsn.saturating_sub(1),
        watermark_seq: h.seq.saturating_sub(1),
        generation: h.generation,
        // No spares: recovery removes any it finds.
        spare_budget: 0,
    };
    let storage = Arc::new(storage);
    let Ok(rec) = recover(storage.clone(), Path::new(DIR), params, |_, r| {
        assert!(
            r.header.verify(r.payload).is_ok(),
            "recovery handed out a bad record"
        );
    }) else {
        return;
    };
    // A segment recovery reports damaged is kept as it is (never cut): every other
    // segment it leaves must scan clean.
    let damaged: Vec<u64> = rec.damaged.iter().map(|d| d.seq).collect();
    drop(rec);
    let segs = list_segments(storage.as_ref(), Path::new(DIR)).expect("list");
    assert!(!segs.is_empty(), "recovery left no segment");
    for (seq, path) in segs {
        if damaged.contains(&seq) {
            continue;
        }
        let f = storage.open(&path, OpenMode::ReadOnly).expect("open");
        let scan = scan_segment(
            f.as_ref(),
            Expect {
                machine_id: None,
                seq: None,
                first_lsn: None,
                disk_count: None,
            },
            |_| Ok(()),
        )
        .expect("scan");
        assert!(
            scan.fault.is_none(),
            "recovery left a faulty segment {}: {:?}",
            path.display(),
            scan.fault
        );
    }
}

fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

// ------------------------------------------------------------------ generating

/// A small, fast, deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Interesting integers for field overwrites.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    8,
    48,
    64,
    0x7f,
    0xff,
    0xffff_ffff,
    8 << 20,
    (8 << 20) + 1,
    u64::MAX - 1,
    u64::MAX,
];

/// A valid segment as the journal writer lays it out: random header, 0..16 records of
/// every kind, sealed or not.
pub fn valid_segment(rng: &mut Rng) -> Vec<u8> {
    let base_lsn = match rng.below(4) {
        0 => rng.below(100),
        1 => u64::MAX - rng.below(40),
        _ => rng.next_u64() >> rng.below(64),
    };
    let mut out = SegmentHeader::new(rng.next_u64(), rng.below(5), base_lsn, rng.next_u64())
        .encode()
        .to_vec();
    let n = rng.below(17);
    let mut chain = 0u32;
    let mut lsn = base_lsn;
    let mut count = 0u32;
    for _ in 0..n {
        let (kind, flags, disk, offset, length, payload) = match rng.below(3) {
            0 => {
                let n = 1 + rng.below(300) as usize;
                let p = rng.bytes(n);
                let len = p.len() as u64;
                (
                    RecordKind::Write,
                    0,
                    rng.below(5) as u32,
                    rng.below(1 << 30),
                    len,
                    p,
                )
            }
            1 => (
                RecordKind::Zero,
                0,
                rng.below(5) as u32,
                rng.below(1 << 30),
                1 + rng.below(1 << 24),
                Vec::new(),
            ),
            _ => {
                let mut p = rng.next_u64().to_le_bytes().to_vec();
                let extra = rng.below(4) as usize;
                p.extend(rng.bytes(extra));
                (
                    RecordKind::Point,
                    if rng.chance(2) {
                        FLAG_APP_CONSISTENT
                    } else {
                        0
                    },
                    0,
                    0,
                    0,
                    p,
                )
            }
        };
        let h = RecordHeader::new(kind, flags, lsn, disk, offset, length, &[&payload]);
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&payload);
        chain = crc32c_append(chain, &h.crc.to_le_bytes());
        count += 1;
        match lsn.checked_add(1) {
            Some(l) => lsn = l,
            None => break,
        }
    }
    if count > 0 && rng.chance(2) {
        let f = SegmentFooter {
            records: count,
            first_lsn: base_lsn,
            last_lsn: base_lsn + (u64::from(count) - 1),
            footer_offset: out.len() as u64,
            sealed_ns: rng.next_u64(),
            chain_crc: chain,
        };
        out.extend_from_slice(&f.encode());
    }
    out
}

/// Offsets of the fields of a segment (header, each record, footer), for
/// structure-aware overwrites.
fn field_offsets(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = [
        (8, 2),
        (10, 2),
        (12, 4),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 8),
        (40, 8),
        (48, 8),
        (56, 4),
    ]
    .to_vec();
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + RECORD_HEADER_LEN <= b.len() {
        if SegmentFooter::is_footer(&b[pos..]) {
            for (o, n) in [(4, 4), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4)] {
                out.push((pos + o, n));
            }
            break;
        }
        for (o, n) in [
            (4, 1),
            (5, 1),
            (6, 2),
            (8, 8),
            (16, 4),
            (20, 4),
            (24, 8),
            (32, 8),
            (40, 4),
        ] {
            out.push((pos + o, n));
        }
        let plen = u32::from_le_bytes(b[pos + 20..pos + 24].try_into().unwrap_or([0; 4])) as usize;
        pos += RECORD_HEADER_LEN + plen;
    }
    out
}

/// Recompute every checksum a segment walk can find, so that damage behind the CRCs
/// reaches the checks after them.
pub fn fix_crcs(b: &mut [u8]) {
    if b.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let crc = crc32c_append(0, &b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + 4 <= b.len() {
        if SegmentFooter::is_footer(&b[pos..]) {
            if pos + FOOTER_LEN <= b.len() {
                let crc = crc32c_append(0, &b[pos..pos + 44]);
                b[pos + 44..pos + 48].copy_from_slice(&crc.to_le_bytes());
            }
            return;
        }
        if pos + RECORD_HEADER_LEN > b.len() {
            return;
        }
        let plen = u32::from_le_bytes(b[pos + 20..pos + 24].try_into().unwrap_or([0; 4])) as usize;
        let end = pos + RECORD_HEADER_LEN + plen;
        if end > b.len() {
            return;
        }
        let crc = crc32c_append(
            crc32c_append(0, &b[pos..pos + 44]),
            &b[pos + RECORD_HEADER_LEN..end],
        );
        b[pos + 44..pos + 48].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// Apply 1..=8 random mutations: bit flips, byte sets, field overwrites with
/// interesting values, truncations, insertions, removals, splices from `other`, then
/// (half the time) repair the checksums.
pub fn mutate(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    mutate_raw(rng, b, other);
    if rng.chance(2) {
        fix_crcs(b);
    }
}

/// [`mutate`]'s mutations without the checksum repair (field overwrites land on the
/// segment layout's offsets, which in other formats are just offsets).
pub fn mutate_raw(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        let len = b.len();
        match rng.below(9) {
            0 | 1 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                b[at] = INTERESTING[rng.below(INTERESTING.len() as u64) as usize] as u8;
            }
            3 | 4 => {
                let fields = field_offsets(b);
                let (at, n) = fields[rng.below(fields.len() as u64) as usize];
                let v = if rng.chance(3) {
                    rng.next_u64()
                } else {
                    INTERESTING[rng.below(INTERESTING.len() as u64) as usize]
                };
                for (i, byte) in v.to_le_bytes().iter().take(n).enumerate() {
                    if let Some(x) = b.get_mut(at + i) {
                        *x = *byte;
                    }
                }
            }
            5 => b.truncate(rng.below(len as u64 + 1) as usize),
            6 => {
                let at = rng.below(len as u64 + 1) as usize;
                let n = 1 + rng.below(64) as usize;
                let ins = rng.bytes(n);
                b.splice(at..at, ins);
            }
            7 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                let n = (1 + rng.below(128) as usize).min(len - at);
                b.drain(at..at + n);
            }
            8 if !other.is_empty() => {
                // Splice: a piece of another segment into this one.
                let from = rng.below(other.len() as u64) as usize;
                let n = (1 + rng.below(512) as usize).min(other.len() - from);
                let at = rng.below(len as u64 + 1) as usize;
                if rng.chance(2) {
                    b.splice(at..at, other[from..from + n].iter().copied());
                } else {
                    b.truncate(at);
                    b.extend_from_slice(&other[from..from + n]);
                }
            }
            _ => {}
        }
    }
}
