//! Property fuzzing of every decoder and of the segment scanner.
//!
//! For arbitrary bytes, and for valid encodings with random mutations (with and
//! without their checksums repaired afterwards, so that damage reaches the checks
//! behind the CRCs), no decoder panics, and `scan_segment` never hands out a record
//! whose CRC does not verify.

use proptest::prelude::*;
use replog::format::meta::{self, DiskEntry, Manifest, Watermark, KIND_MANIFEST, KIND_WATERMARK};
use replog::format::record::{PointPayload, RecordHeader, RecordKind, FLAG_APP_CONSISTENT};
use replog::format::segment::parse_segment_name;
use replog::format::{
    SegmentFooter, SegmentHeader, FOOTER_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use replog::journal::reader::{scan_bytes, scan_segment, valid_records_after, Expect, SegmentScan};
use replog::storage::{MemStorage, OpenMode, Storage, StorageFile};
use std::path::Path;
use std::sync::Arc;

// ------------------------------------------------------------------ building

#[derive(Debug, Clone)]
struct Rec {
    kind: RecordKind,
    app: bool,
    disk: u32,
    offset: u64,
    payload: Vec<u8>,
    /// Zero records: the length of the range.
    zero_len: u64,
}

#[derive(Debug, Clone)]
struct Seg {
    machine_id: u64,
    seq: u64,
    base_lsn: u64,
    created_ns: u64,
    records: Vec<Rec>,
    sealed: bool,
}

fn rec_strategy() -> impl Strategy<Value = Rec> {
    (
        0u8..3,
        any::<bool>(),
        prop_oneof![0u32..4, any::<u32>()],
        prop_oneof![0u64..1 << 20, any::<u64>()],
        prop::collection::vec(any::<u8>(), 1..200),
        1u64..1 << 30,
    )
        .prop_map(|(k, app, disk, offset, payload, zero_len)| {
            let kind = match k {
                0 => RecordKind::Write,
                1 => RecordKind::Zero,
                _ => RecordKind::Point,
            };
            let len = match kind {
                RecordKind::Write => payload.len() as u64,
                RecordKind::Zero => zero_len,
                RecordKind::Point => 0,
            };
            Rec {
                kind,
                app: app && kind == RecordKind::Point,
                disk: if kind == RecordKind::Point { 0 } else { disk },
                // Keep offset + length representable, as the decoder demands.
                offset: if kind == RecordKind::Point {
                    0
                } else {
                    offset.min(u64::MAX - len)
                },
                payload: match kind {
                    RecordKind::Write => payload,
                    RecordKind::Zero => Vec::new(),
                    // A point's time, plus optional fields a newer version may add.
                    RecordKind::Point => payload
                        .iter()
                        .copied()
                        .chain([0; 8])
                        .take(8 + payload.len() % 5)
                        .collect(),
                },
                zero_len,
            }
        })
}

fn seg_strategy() -> impl Strategy<Value = Seg> {
    (
        any::<u64>(),
        // Valid segments: numbers in 1..2^62, LSNs in 1..2^63 (the format's ranges;
        // out-of-range values are covered by the mutation tests and
        // `scan_survives_lsn_u64_max`).
        prop_oneof![1u64..10, 1u64..(1 << 62)],
        prop_oneof![
            1u64..100,
            ((1u64 << 63) - 64)..((1u64 << 63) - 16),
            1u64..(1 << 63)
        ],
        any::<u64>(),
        prop::collection::vec(rec_strategy(), 0..12),
        any::<bool>(),
    )
        .prop_map(
            |(machine_id, seq, base_lsn, created_ns, records, sealed)| Seg {
                machine_id,
                seq,
                base_lsn,
                created_ns,
                records,
                sealed,
            },
        )
}

fn record_len(r: &Rec) -> u64 {
    match r.kind {
        RecordKind::Write => r.payload.len() as u64,
        RecordKind::Zero => r.zero_len,
        RecordKind::Point => 0,
    }
}

/// Encode a segment exactly as the writer lays it out.
fn build(s: &Seg) -> Vec<u8> {
    let mut out = SegmentHeader::new(s.machine_id, s.seq, s.base_lsn, s.created_ns)
        .encode()
        .to_vec();
    let mut chain = 0u32;
    for (i, r) in s.records.iter().enumerate() {
        let flags = if r.app { FLAG_APP_CONSISTENT } else { 0 };
        let h = RecordHeader::new(
            r.kind,
            flags,
            s.base_lsn + i as u64,
            r.disk,
            r.offset,
            record_len(r),
            &[&r.payload],
        );
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(&r.payload);
        chain = crc32c::crc32c_append(chain, &h.crc.to_le_bytes());
    }
    if s.sealed && !s.records.is_empty() {
        let f = SegmentFooter {
            records: s.records.len() as u32,
            first_lsn: s.base_lsn,
            last_lsn: s.base_lsn + s.records.len() as u64 - 1,
            footer_offset: out.len() as u64,
            sealed_ns: s.created_ns ^ 1,
            chain_crc: chain,
        };
        out.extend_from_slice(&f.encode());
    }
    out
}

// ------------------------------------------------------------------ mutating

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    /// Overwrite 4 or 8 bytes with an interesting integer.
    Field {
        at: usize,
        value: u64,
        wide: bool,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        n: usize,
    },
    /// Copy a range of the input over another place (a splice of its own records).
    Copy {
        from: usize,
        to: usize,
        n: usize,
    },
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(7),
        Just(8),
        Just(48),
        Just(64),
        Just(0x7f),
        Just(0xff),
        Just(u64::from(u32::MAX)),
        Just(8 << 20),
        Just((8 << 20) + 1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, b)| Mutation::Flip { at, bit: 1 << b }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        2 => (any::<usize>(), interesting, any::<bool>()).prop_map(|(at, value, wide)| Mutation::Field { at, value, wide }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, n)| Mutation::Remove { at, n }),
        1 => (any::<usize>(), any::<usize>(), 1usize..256).prop_map(|(from, to, n)| Mutation::Copy { from, to, n }),
    ]
}

fn mutate(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len();
    let pick = |at: usize| if len == 0 { 0 } else { at % len };
    match m {
        Mutation::Flip { at, bit } => {
            if len > 0 {
                b[pick(*at)] ^= bit;
            }
        }
        Mutation::Set { at, value } => {
            if len > 0 {
                b[pick(*at)] = *value;
            }
        }
        Mutation::Field { at, value, wide } => {
            let bytes = value.to_le_bytes();
            let n = if *wide { 8 } else { 4 };
            let at = pick(*at);
            for (i, v) in bytes.iter().take(n).enumerate() {
                if let Some(x) = b.get_mut(at + i) {
                    *x = *v;
                }
            }
        }
        Mutation::Truncate { at } => b.truncate(pick(*at)),
        Mutation::Insert { at, bytes } => {
            let at = if len == 0 { 0 } else { at % (len + 1) };
            b.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove { at, n } => {
            let at = pick(*at);
            b.drain(at..(at + n).min(len));
        }
        Mutation::Copy { from, to, n } => {
            if len > 0 {
                let from = pick(*from);
                let to = pick(*to);
                let n = (*n).min(len - from).min(len - to);
                b.copy_within(from..from + n, to);
            }
        }
    }
}

/// Recompute every checksum a segment walk can find, so that mutations of fields
/// behind the CRCs reach the checks that follow them.
fn fix_crcs(b: &mut [u8]) {
    if b.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + 4 <= b.len() {
        if &b[pos..pos + 4] == b"RFTR" {
            if pos + FOOTER_LEN <= b.len() {
                let crc = crc32c::crc32c(&b[pos..pos + 44]);
                b[pos + 44..pos + 48].copy_from_slice(&crc.to_le_bytes());
            }
            return;
        }
        if pos + RECORD_HEADER_LEN > b.len() {
            return;
        }
        let plen = u32::from_le_bytes(b[pos + 20..pos + 24].try_into().expect("4 bytes")) as usize;
        let end = pos + RECORD_HEADER_LEN + plen;
        if end > b.len() {
            return;
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&b[pos..pos + 44]),
            &b[pos + RECORD_HEADER_LEN..end],
        );
        b[pos + 44..pos + 48].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// The same for a metadata envelope.
fn fix_meta_crc(b: &mut [u8]) {
    if b.len() < meta::META_HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..20]), &b[meta::META_HEADER_LEN..]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
}

// ------------------------------------------------------------------ checking

/// Every decoder on `b` (and on a few windows of it): must not panic.
fn decode_everything(b: &[u8]) {
    for start in [
        0,
        1,
        4,
        SEGMENT_HEADER_LEN,
        b.len().saturating_sub(FOOTER_LEN),
    ] {
        let w = b.get(start..).unwrap_or(&[]);
        if let Ok(h) = SegmentHeader::decode(w) {
            assert!(h.version == 1 || h.version == 2, "version {}", h.version);
            // What decodes must re-encode to the same fields.
            let again = SegmentHeader::decode(&h.encode()).expect("re-decode");
            assert_eq!(again, h);
        }
        let _ = SegmentFooter::is_footer(w);
        if let Ok(f) = SegmentFooter::decode(w) {
            assert_eq!(
                &f.encode()[..],
                &w[..FOOTER_LEN],
                "footer re-encodes differently"
            );
        }
        let _ = RecordHeader::is_record(w);
        if let Ok(h) = RecordHeader::decode(w) {
            let payload = w.get(RECORD_HEADER_LEN..).unwrap_or(&[]);
            let exact = payload.get(..h.payload_len as usize);
            let _ = h.verify(payload);
            if let Some(p) = exact {
                if h.verify(p).is_ok() {
                    assert_eq!(
                        &h.encode()[..],
                        &w[..RECORD_HEADER_LEN],
                        "record re-encodes differently"
                    );
                }
            }
            let _ = h.total_len();
        }
        let _ = PointPayload::decode(w);
        if let Ok(m) = Manifest::decode(w) {
            let _ = Manifest::decode(&m.encode()).expect("manifest re-decodes");
        }
        let _ = Watermark::decode(w);
        for kind in [0, KIND_MANIFEST, KIND_WATERMARK, 3, u16::MAX] {
            let _ = meta::decode(kind, w);
        }
    }
    let _ = parse_segment_name(&String::from_utf8_lossy(b));
}

const SEG_PATH: &str = "/journal/00000000000000000001.seg";

fn mem_file(bytes: &[u8]) -> Arc<dyn StorageFile> {
    let storage = MemStorage::new();
    storage
        .create_dir_all(Path::new("/journal"))
        .expect("mkdir");
    let f = storage
        .open(Path::new(SEG_PATH), OpenMode::CreateNew)
        .expect("create");
    if !bytes.is_empty() {
        f.write_at(&[bytes], 0).expect("write");
    }
    f
}

/// Scan `bytes` as a segment and check everything handed out against the bytes.
fn scan_checked(bytes: &[u8], expect: Expect) -> SegmentScan {
    let file = mem_file(bytes);
    let mut handed_out = 0u32;
    let mut prev_lsn: Option<u64> = None;
    let mut chain = 0u32;
    let mut from_file = Vec::new();
    let scan = scan_segment(file.as_ref(), expect, |rec| {
        from_file.push((
            rec.offset,
            rec.payload_offset,
            rec.header,
            rec.payload.to_vec(),
        ));
        // The CRC must verify, against the payload handed out and against the file.
        if let Err(e) = rec.header.verify(rec.payload) {
            panic!(
                "record at {} handed out with a bad CRC: {}",
                rec.offset, e.what
            );
        }
        let at = rec.offset as usize;
        let pat = rec.payload_offset as usize;
        assert!(at >= SEGMENT_HEADER_LEN);
        assert_eq!(pat, at + RECORD_HEADER_LEN);
        let end = pat + rec.header.payload_len as usize;
        assert!(end <= bytes.len(), "record runs past the end of the file");
        assert_eq!(
            rec.payload,
            &bytes[pat..end],
            "payload is not the file's bytes"
        );
        let on_disk = RecordHeader::decode(&bytes[at..]).expect("handed-out header decodes");
        assert_eq!(on_disk, rec.header);
        on_disk.verify(&bytes[pat..end]).expect("file bytes verify");
        if let Some(p) = prev_lsn {
            assert_eq!(rec.header.lsn, p + 1, "LSNs are not consecutive");
        }
        if let Some(n) = expect.disk_count {
            if rec.header.kind != RecordKind::Point {
                assert!(rec.header.disk < n, "disk id out of range handed out");
            }
        }
        if rec.header.kind == RecordKind::Point {
            assert!(
                rec.point().is_some(),
                "point payload does not decode: {:?}",
                rec.payload
            );
        }
        prev_lsn = Some(rec.header.lsn);
        chain = crc32c::crc32c_append(chain, &rec.header.crc.to_le_bytes());
        handed_out += 1;
        Ok(())
    })
    .expect("MemStorage reads never fail");
    // The same bytes scanned in place (a target's incoming segment): the same records
    // handed out, the same verdict.
    let mut in_place = Vec::new();
    let same = scan_bytes(bytes, expect, |rec| {
        in_place.push((
            rec.offset,
            rec.payload_offset,
            rec.header,
            rec.payload.to_vec(),
        ));
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
    if let Some(f) = &scan.fault {
        assert!(scan.footer.is_none());
        assert!(!f.what.is_empty());
        assert!(
            f.offset <= scan.file_len + FOOTER_LEN as u64,
            "fault offset {} past the file",
            f.offset
        );
    } else if let Some(f) = &scan.footer {
        assert_eq!(scan.end + FOOTER_LEN as u64, scan.file_len);
        assert_eq!(f.records, scan.records);
        assert_eq!(f.chain_crc, scan.chain_crc);
        assert!(scan.is_sealed());
    } else {
        assert_eq!(
            scan.end, scan.file_len,
            "clean unsealed scan must reach the end"
        );
    }
    // The torn-tail helper on the same bytes, from the scan's end and from elsewhere.
    for from in [scan.end, 0, 1, bytes.len() as u64, bytes.len() as u64 + 10] {
        let _ = valid_records_after(file.as_ref(), from, 0).expect("MemStorage reads never fail");
    }
    scan
}

fn expect_for(s: &Seg, choice: u8) -> Expect {
    match choice % 3 {
        0 => Expect {
            machine_id: None,
            seq: None,
            first_lsn: None,
            disk_count: None,
        },
        1 => Expect {
            machine_id: Some(s.machine_id),
            seq: Some(s.seq),
            first_lsn: Some(s.base_lsn),
            // Just enough disks for every record (None if u32::MAX itself is used).
            disk_count: s
                .records
                .iter()
                .filter(|r| r.kind != RecordKind::Point)
                .map(|r| r.disk)
                .max()
                .unwrap_or(0)
                .checked_add(1),
        },
        _ => Expect {
            machine_id: Some(s.machine_id ^ 1),
            seq: Some(s.seq.wrapping_add(1)),
            first_lsn: Some(s.base_lsn.wrapping_add(1)),
            disk_count: Some(0),
        },
    }
}

fn manifest_strategy() -> impl Strategy<Value = Manifest> {
    (
        any::<u64>(),
        prop::collection::vec(
            (any::<u32>(), "[a-z0-9._-]{0,16}|\\PC{0,8}", any::<u64>()),
            0..6,
        ),
        1..u32::MAX,
        0..3u8,
    )
        .prop_map(|(machine_id, disks, generation, role)| Manifest {
            disks: disks
                .into_iter()
                .map(|(id, name, size)| DiskEntry { id, name, size })
                .collect(),
            generation,
            role: match role {
                0 => replog::protection::Role::Primary,
                1 => replog::protection::Role::Replica,
                _ => replog::protection::Role::Test,
            },
            ..Manifest::new(machine_id)
        })
}

/// `cases` per property, unless PROPTEST_CASES is set (for longer runs by hand).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        // Failures are reported with their minimal input; no regression files are
        // written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..400)) {
        decode_everything(&b);
    }

    #[test]
    fn scan_never_panics_on_arbitrary_bytes(
        b in prop::collection::vec(any::<u8>(), 0..600),
        choice in any::<u8>(),
    ) {
        let scan = scan_checked(&b, expect_for(&Seg {
            machine_id: 0, seq: 0, base_lsn: 0, created_ns: 0, records: vec![], sealed: false,
        }, choice));
        if b.len() < SEGMENT_HEADER_LEN {
            prop_assert!(scan.fault.is_some());
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn valid_segments_scan_clean(s in seg_strategy()) {
        let bytes = build(&s);
        decode_everything(&bytes);
        let scan = scan_checked(&bytes, expect_for(&s, 1));
        prop_assert!(scan.fault.is_none(), "{:?}", scan.fault);
        prop_assert_eq!(scan.records as usize, s.records.len());
        prop_assert_eq!(scan.is_sealed(), s.sealed && !s.records.is_empty());
        if !s.records.is_empty() {
            prop_assert_eq!(scan.first_lsn, Some(s.base_lsn));
        }
        // Expecting another machine, sequence or LSN is a fault at once.
        let wrong = scan_checked(&bytes, expect_for(&s, 2));
        prop_assert!(wrong.fault.is_some());
        prop_assert_eq!(wrong.records, 0);
    }

}

proptest! {
    #![proptest_config(config(12000))]

    #[test]
    fn mutated_segments_never_hand_out_bad_records(
        s in seg_strategy(),
        muts in prop::collection::vec(mutation_strategy(), 1..6),
        fix in any::<bool>(),
        choice in any::<u8>(),
    ) {
        let mut bytes = build(&s);
        for m in &muts {
            mutate(&mut bytes, m);
        }
        if fix {
            fix_crcs(&mut bytes);
        }
        decode_everything(&bytes);
        scan_checked(&bytes, expect_for(&s, choice));
    }

    #[test]
    fn mutated_metadata_never_panics(
        m in manifest_strategy(),
        w in (0u64..(1 << 63), 0u64..(1 << 62)),
        muts in prop::collection::vec(mutation_strategy(), 0..4),
        fix in any::<bool>(),
    ) {
        let mb = m.encode();
        prop_assert_eq!(Manifest::decode(&mb).expect("round trip"), m);
        let wm = Watermark { lsn: w.0, segment_seq: w.1 };
        let wb = wm.encode();
        prop_assert_eq!(Watermark::decode(&wb).expect("round trip"), wm);
        for mut b in [mb, wb] {
            for mu in &muts {
                mutate(&mut b, mu);
            }
            if fix {
                fix_meta_crc(&mut b);
            }
            decode_everything(&b);
        }
    }
}

/// Every single-bit flip of a small sealed segment, with and without repaired CRCs.
#[test]
fn every_bit_flip_of_a_sealed_segment() {
    let s = Seg {
        machine_id: 0xfeed,
        seq: 3,
        base_lsn: 41,
        created_ns: 5,
        records: vec![
            Rec {
                kind: RecordKind::Write,
                app: false,
                disk: 0,
                offset: 4096,
                payload: b"hello, journal".to_vec(),
                zero_len: 0,
            },
            Rec {
                kind: RecordKind::Zero,
                app: false,
                disk: 1,
                offset: 0,
                payload: vec![],
                zero_len: 1 << 20,
            },
            Rec {
                kind: RecordKind::Point,
                app: true,
                disk: 0,
                offset: 0,
                payload: 7u64.to_le_bytes().to_vec(),
                zero_len: 0,
            },
        ],
        sealed: true,
    };
    let good = build(&s);
    let clean = scan_checked(&good, expect_for(&s, 1));
    assert!(clean.is_sealed());
    for at in 0..good.len() {
        for bit in 0..8 {
            let mut b = good.clone();
            b[at] ^= 1 << bit;
            let scan = scan_checked(&b, expect_for(&s, 1));
            // Without repair every flip is caught somewhere.
            assert!(scan.fault.is_some(), "flip of bit {bit} at {at} not caught");
            fix_crcs(&mut b);
            scan_checked(&b, expect_for(&s, 0));
            scan_checked(&b, expect_for(&s, 1));
        }
    }
}

/// Engine bug (found by this fuzzing): a well-formed segment whose header says base
/// LSN u64::MAX and that holds one record with that LSN makes `scan_segment` compute
/// `rh.lsn + 1` (src/journal/reader.rs, `next_lsn = rh.lsn + 1`) and panic with
/// "attempt to add with overflow" in debug builds; release builds wrap to 0.
#[test]

fn scan_survives_lsn_u64_max() {
    let s = Seg {
        machine_id: 1,
        seq: 1,
        base_lsn: u64::MAX,
        created_ns: 0,
        records: vec![Rec {
            kind: RecordKind::Write,
            app: false,
            disk: 0,
            offset: 0,
            payload: vec![1],
            zero_len: 0,
        }],
        sealed: false,
    };
    scan_checked(&build(&s), expect_for(&s, 0));
}

/// A journal directory in memory holding `files` (name, bytes).
fn mem_journal(files: &[(&str, Vec<u8>)]) -> Arc<MemStorage> {
    let storage = MemStorage::new();
    storage
        .create_dir_all(Path::new("/m/journal"))
        .expect("mkdir");
    for (name, bytes) in files {
        let f = storage
            .open(&Path::new("/m/journal").join(name), OpenMode::CreateNew)
            .expect("create");
        f.write_at(&[bytes], 0).expect("write");
    }
    Arc::new(storage)
}

fn recover_params(machine_id: u64) -> replog::journal::JournalParams {
    replog::journal::JournalParams {
        machine_id,
        disk_count: 1,
        segment_bytes: 1 << 20,
        watermark_lsn: 0,
        watermark_seq: 0,
        generation: 1,
        spare_budget: 0,
    }
}

/// Engine bug (found by tools/fuzz): the newest segment ends in a CRC-valid footer
/// whose footer offset is u64::MAX; recovery's `ends_in_footer` computes
/// `f.footer_offset + footer_len` (src/journal/mod.rs, `ends_in_footer`) and panics
/// with "attempt to add with overflow" in debug builds.
#[test]

fn recover_survives_footer_offset_u64_max() {
    let mut seg = SegmentHeader::new(1, 1, 1, 0).encode().to_vec();
    let footer = SegmentFooter {
        records: 0,
        first_lsn: 0,
        last_lsn: 0,
        footer_offset: u64::MAX,
        sealed_ns: 0,
        chain_crc: 0,
    };
    seg.extend_from_slice(&footer.encode());
    let storage = mem_journal(&[("00000000000000000001.seg", seg)]);
    let r = replog::journal::recover(
        storage,
        Path::new("/m/journal"),
        recover_params(1),
        |_, _| {},
    )
    .expect("damage in a sealed segment is reported, not refused");
    // A footer that disagrees with its segment is damage, never a torn tail to cut.
    assert_eq!(
        r.damaged.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![1],
        "{:?}",
        r.damaged
    );
    assert!(
        r.sealed.iter().any(|s| s.seq == 1),
        "the segment was dropped"
    );
    assert!(
        r.writer.active_seq() > 1,
        "appends went on in the damaged segment"
    );
}

/// Engine bug (found by tools/fuzz): a segment file named after sequence number
/// u64::MAX makes recovery compute `seq + 1` (src/journal/mod.rs, `expected_seq =
/// Some(seq + 1)`) and panic with "attempt to add with overflow" in debug builds.
#[test]

fn recover_survives_segment_seq_u64_max() {
    let seg = SegmentHeader::new(1, u64::MAX, 1, 0).encode().to_vec();
    let storage = mem_journal(&[("18446744073709551615.seg", seg)]);
    let _ = replog::journal::recover(
        storage,
        Path::new("/m/journal"),
        recover_params(1),
        |_, _| {},
    );
}
