//! Torn tails and bit flips.
//!
//! - Cutting the last (unsealed) segment at every byte offset: recovery keeps exactly
//!   the complete records.
//! - A flipped bit in a sealed segment: open and inspect report that segment and the
//!   damaged record's offset; nothing the damage may hide is served.

mod common;

use common::*;
use replog::format::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use replog::storage::{FileStorage, MemStorage, OpenMode, Storage};
use replog::Machine;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: u64 = 16 * 1024;

/// The writes the journal gets: unaligned, of different sizes.
const WRITES: [(u64, usize); 5] = [(0, 100), (777, 33), (4095, 2), (9000, 513), (100, 1)];

/// Write WRITES then flush (a point record at the end). Returns the end offset of every
/// record in the segment with the number of writes complete at that point.
fn build(storage: Arc<dyn Storage>, dir: &Path, seal_after: bool) -> Vec<(u64, usize)> {
    create_machine(storage.as_ref(), dir, &[SIZE]);
    let m = open(storage, dir, 1 << 20).expect("open");
    let v = m.volume("d0").expect("vol");
    let mut ends = Vec::new();
    let mut at = SEGMENT_HEADER_LEN as u64;
    for (i, (off, len)) in WRITES.iter().enumerate() {
        v.write(*off, &pattern(i as u64, *len)).expect("write");
        at += (RECORD_HEADER_LEN + len) as u64;
        ends.push((at, i + 1));
    }
    m.flush().expect("flush");
    at += RECORD_HEADER_LEN as u64 + 8;
    ends.push((at, WRITES.len()));
    if seal_after {
        m.seal().expect("seal");
    }
    drop(m);
    ends
}

fn model_after(writes: usize) -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    for (i, (off, len)) in WRITES.iter().enumerate().take(writes) {
        d[*off as usize..*off as usize + len].copy_from_slice(&pattern(i as u64, *len));
    }
    d
}

fn first_segment(dir: &Path) -> PathBuf {
    dir.join("journal")
        .join(replog::format::segment::segment_name(1))
}

#[test]
fn cut_at_every_offset_keeps_exactly_the_complete_records() {
    let dir = machine_dir();
    let probe = MemStorage::new();
    let ends = build(Arc::new(probe.clone()), &dir, false);
    let full = ends.last().expect("records").0;
    for cut in 0..=full {
        let mem = MemStorage::new();
        build(Arc::new(mem.clone()), &dir, false);
        let seg = mem
            .open(&first_segment(&dir), OpenMode::ReadWrite)
            .expect("segment");
        assert_eq!(seg.len().expect("len"), full);
        seg.set_len(cut).expect("cut");
        drop(seg);
        let m = open(Arc::new(mem.clone()), &dir, 1 << 20)
            .unwrap_or_else(|e| panic!("recovery failed with the segment cut at {cut}: {e}"));
        let complete = ends.iter().filter(|(end, _)| *end <= cut).count();
        let writes = ends
            .iter()
            .filter(|(end, _)| *end <= cut)
            .map(|(_, w)| *w)
            .max()
            .unwrap_or(0);
        assert_eq!(m.status().last_lsn, complete as u64, "cut at {cut}");
        assert_eq!(
            read_disks(&m, &[SIZE])[0],
            model_after(writes),
            "cut at {cut}"
        );
        // The journal goes on after the cut: a new write lands and survives a reopen.
        let v = m.volume("d0").expect("vol");
        v.write(5000, b"after").expect("write after recovery");
        m.close().expect("close");
        let m = open(Arc::new(mem.clone()), &dir, 1 << 20).expect("reopen");
        let mut buf = [0u8; 5];
        m.volume("d0")
            .expect("vol")
            .read(5000, &mut buf)
            .expect("read");
        assert_eq!(&buf, b"after", "cut at {cut}");
    }
}

/// The offset a damage description ("… damaged at offset N: …") names.
fn damage_offset(what: &str) -> u64 {
    let rest = what
        .split("at offset ")
        .nth(1)
        .unwrap_or_else(|| panic!("no offset in {what:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {what:?}"))
}

/// Flip one byte at each offset of a sealed segment that is not the last: the machine
/// opens (recovery indexes the records before the damage), names the segment and an
/// offset inside the damaged record, takes no writes, and refuses every range whose
/// newest data is not verifiably newer than the damage — here all but the later
/// segment's write. The damage list keeps the damage over a restart; inspect reports
/// the same place.
#[test]
fn bit_flip_in_sealed_segment_is_reported_where_it_is() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fs: Arc<dyn Storage> = Arc::new(FileStorage);
    let dir = tmp.path().join("machines").join("vm1");
    let ends = build(fs.clone(), &dir, true);
    // Write something more so the sealed segment is not the last one.
    {
        let m = open(fs.clone(), &dir, 1 << 20).expect("open");
        m.volume("d0")
            .expect("vol")
            .write(12000, b"later")
            .expect("write");
        m.close().expect("close");
    }
    let seg = first_segment(&dir);
    let pristine = std::fs::read(&seg).expect("read segment");
    let mut starts = vec![SEGMENT_HEADER_LEN as u64];
    starts.extend(ends.iter().map(|(e, _)| *e));
    let list = dir.join("journal").join(replog::volume::DAMAGE_FILE);
    // Every byte of every record (the header and footer have their own tests).
    for at in SEGMENT_HEADER_LEN as u64..ends.last().expect("end").0 {
        let mut bad = pristine.clone();
        bad[at as usize] ^= 0x40;
        std::fs::write(&seg, &bad).expect("write damaged");
        let rec_start = *starts.iter().filter(|s| **s <= at).max().expect("start");
        let rec_end = *starts.iter().find(|s| **s > at).expect("end");
        for reopen in [false, true] {
            let m = open(fs.clone(), &dir, 1 << 20)
                .unwrap_or_else(|e| panic!("flip at {at}: the machine did not open: {e}"));
            let damage = m.damage();
            assert_eq!(damage.len(), 1, "flip at {at}: {damage:?}");
            let (seq, what) = &damage[0];
            assert_eq!(*seq, 1, "flip at {at}");
            assert!(what.contains(seg.to_str().expect("path")), "{what}");
            let offset = damage_offset(what);
            assert!(
                (rec_start..rec_end).contains(&offset),
                "flip at {at} reported at {offset} ({what}), record is {rec_start}..{rec_end}"
            );
            let v = m.volume("d0").expect("vol");
            let mut later = [0u8; 5];
            v.read(12000, &mut later)
                .expect("the later segment's write");
            assert_eq!(&later, b"later");
            let mut buf = vec![0u8; 100];
            let err = v
                .read(0, &mut buf)
                .expect_err("served a range the damage may hide");
            assert!(err.is_corruption(), "flip at {at}: {err}");
            assert!(v.write(0, b"x").is_err(), "flip at {at}: took a write");
            assert!(m.status().poisoned.is_some());
            drop(m);
            assert!(
                list.exists(),
                "flip at {at} (reopened: {reopen}): no damage list"
            );
        }
        let report = replog::inspect::inspect(&dir).expect("inspect");
        let c = report
            .corruption
            .unwrap_or_else(|| panic!("inspect missed the flip at {at}"));
        assert_eq!(c.path, seg);
        assert!(
            (rec_start..rec_end).contains(&c.offset),
            "inspect: flip at {at} reported at {}",
            c.offset
        );
        std::fs::remove_file(&list).expect("forget the damage for the next flip");
    }
    std::fs::write(&seg, &pristine).expect("restore");
    let m = open(fs, &dir, 1 << 20).expect("pristine opens");
    assert!(m.damage().is_empty());
    assert_eq!(
        &read_disks(&m, &[SIZE])[0][..WRITES[0].1],
        &pattern(0, WRITES[0].1)[..]
    );
}

/// The newest segment, once sealed, is never treated as having a torn tail: it is kept
/// whole, reported damaged, and the journal goes on in a new segment whose LSNs are
/// above anything the damaged one can hold.
#[test]
fn bit_flip_in_last_sealed_segment_is_corruption_not_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fs: Arc<dyn Storage> = Arc::new(FileStorage);
    let dir = tmp.path().join("vm1");
    let ends = build(fs.clone(), &dir, true);
    // `build` sealed segment 1 and created segment 2 (empty); remove the empty one so
    // the sealed segment is the newest file.
    let seg2 = dir
        .join("journal")
        .join(replog::format::segment::segment_name(2));
    std::fs::remove_file(&seg2).expect("remove empty active segment");
    let seg = first_segment(&dir);
    let mut bad = std::fs::read(&seg).expect("read");
    let at = ends[2].0 as usize + 50; // inside the 4th record's payload
    bad[at] ^= 1;
    std::fs::write(&seg, &bad).expect("write");
    let m = open(fs, &dir, 1 << 20).expect("a damaged sealed segment stops the machine opening");
    assert_eq!(
        std::fs::read(&seg).expect("read").len(),
        bad.len(),
        "recovery cut a sealed segment"
    );
    let damage = m.damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage_offset(&damage[0].1), ends[2].0, "{damage:?}");
    let sealed = m.sealed_segments();
    let first = sealed
        .iter()
        .find(|g| g.seq == 1)
        .expect("segment 1 is kept");
    // The footer still verifies: it says where segment 1 ended.
    assert_eq!(first.last_lsn, WRITES.len() as u64 + 1);
    assert!(seg2.exists(), "no new segment after the damaged one");
    // Even a range written before the damage may have been written again after it.
    let v = m.volume("d0").expect("vol");
    // No hole is certain either: a sparse-aware reader must read, and be refused.
    assert_eq!(v.seek(0, true).expect("seek data"), Some(0));
    assert_eq!(v.seek(0, false).expect("seek hole"), Some(SIZE));
    let mut buf = vec![0u8; 33];
    let err = v
        .read(777, &mut buf)
        .expect_err("served a range the damage may hide");
    assert!(err.is_corruption(), "{err}");
}

/// The newest segment with an intact header that belongs to another machine is
/// corruption: recovery must not take it for a torn header and delete it.
#[test]
fn foreign_header_in_newest_segment_is_corruption_not_deleted() {
    let dir = machine_dir();
    let mem = MemStorage::new();
    build(Arc::new(mem.clone()), &dir, false);
    let seg = first_segment(&dir);
    let foreign = replog::format::SegmentHeader::new(0xdead_beef, 1, 1, 0).encode();
    mem.corrupt(&seg, 0, &foreign).expect("rewrite header");
    let err = open(Arc::new(mem.clone()), &dir, 1 << 20).expect_err("foreign segment accepted");
    assert!(err.is_corruption(), "{err}");
    assert!(
        mem.exists(&seg),
        "recovery deleted a segment it did not understand"
    );
}

/// Damage that appears in a sealed segment after the machine opened (bit rot) is found
/// by the compactor: nothing is merged, the machine is poisoned, and reads that need
/// the damaged segment fail instead of returning its bytes.
#[test]
fn damage_found_by_the_compactor_is_never_served() {
    let dir = machine_dir();
    let mem = MemStorage::new();
    let ends = build(Arc::new(mem.clone()), &dir, true);
    let m = open(Arc::new(mem.clone()), &dir, 1 << 20).expect("open");
    let v = m.volume("d0").expect("vol");
    let mut buf = vec![0u8; 513];
    v.read(9000, &mut buf).expect("read before the damage");
    // Flip a byte in the payload of the 4th write (at 9000, 513 bytes).
    mem.corrupt(&first_segment(&dir), ends[2].0 + 48 + 10, &[0xff])
        .expect("corrupt");
    let err = m
        .compact()
        .expect_err("compaction merged a damaged segment");
    assert!(err.is_corruption(), "{err}");
    assert!(
        m.status().poisoned.is_some(),
        "damage did not poison the machine"
    );
    let err = v
        .read(9000, &mut buf)
        .expect_err("served data from a damaged segment");
    assert!(err.is_corruption(), "{err}");
    assert!(v.write(0, b"x").is_err(), "accepted a write after damage");
    assert_eq!(
        Machine::read_watermark(&mem, &dir).expect("watermark").lsn,
        0,
        "merged past damage"
    );
}
