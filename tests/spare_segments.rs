//! Spare segment files (`journal::spare`) on real files: merged segments are written
//! again, and a journal whose active segment is a recycled file inspects clean and
//! reopens, after a close or a crash, with every write it made durable and nothing
//! of the earlier segment that file held; a spare is kept across the restart and
//! written into.

mod common;

use common::pattern;
use replog::config::JournalConfig;
use replog::storage::{FileStorage, Storage};
use replog::Machine;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const SEGMENT: u64 = 256 << 10;
const DISK: u64 = 4 << 20;

fn open(dir: &Path) -> Machine {
    let cfg = JournalConfig {
        segment_bytes: SEGMENT,
        ..JournalConfig::default()
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage);
    Machine::open(storage, dir, "vm1", cfg).expect("open machine")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("journal"))
        .expect("journal")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// How many spare files the journal directory of `dir` holds.
fn spare_count(dir: &Path) -> usize {
    names(dir).iter().filter(|n| n.ends_with(".spare")).count()
}

/// The header and the length of the newest segment file of the journal of `dir`.
fn active_segment(dir: &Path) -> (replog::format::SegmentHeader, u64) {
    let names = names(dir);
    let newest = names
        .iter()
        .rfind(|n| n.ends_with(".seg"))
        .expect("a segment");
    let bytes = std::fs::read(dir.join("journal").join(newest)).expect("read active");
    let header = replog::format::SegmentHeader::decode(&bytes).expect("header");
    (header, bytes.len() as u64)
}

/// A site with machine vm1 (one disk, `os`) whose journal wrote three full segments,
/// merged: two are kept as spares (the default budget). The temporary directory, the
/// site's and the machine's directories, the open machine and its disk's model.
fn machine_with_two_spares() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    Machine,
    Vec<u8>,
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site_dir = tmp.path().join("site");
    replog::Site::init(&site_dir).expect("init");
    let site = replog::Site::open(&site_dir).expect("open site");
    site.create_disk("vm1", "os", DISK, None).expect("disk");
    let dir = site.machine_dir("vm1").expect("machine dir");
    drop(site);
    let mut model = vec![0u8; DISK as usize];
    let m = open(&dir);
    write(&m, &mut model, 0, 3 * SEGMENT, 1);
    m.flush().expect("flush");
    m.seal().expect("seal");
    m.compact().expect("compact");
    assert_eq!(spare_count(&dir), 2, "{:?}", names(&dir));
    (tmp, site_dir, dir, m, model)
}

/// Write `len` bytes at `offset` of disk `os` and the model, in 60 KiB writes.
fn write(m: &Machine, model: &mut [u8], offset: u64, len: u64, seed: u64) {
    let vol = m.volume("os").expect("volume");
    let mut at = offset;
    while at < offset + len {
        let n = (60 << 10).min(offset + len - at);
        let data = pattern(seed ^ at, n as usize);
        vol.write(at, &data).expect("write");
        model[at as usize..(at + n) as usize].copy_from_slice(&data);
        at += n;
    }
}

fn assert_reads(m: &Machine, model: &[u8], what: &str) {
    let mut buf = vec![0u8; DISK as usize];
    m.volume("os")
        .expect("volume")
        .read(0, &mut buf)
        .expect("read");
    assert!(
        buf == model,
        "{what}: the disk differs from what was written"
    );
}

#[test]
fn a_recycled_active_segment_inspects_clean_and_reopens_with_every_write() {
    // Three full segments, merged: two are kept as spares.
    let (_tmp, site_dir, dir, m, mut model) = machine_with_two_spares();
    // Status counts the disk they take.
    let kept = m.status().spare_bytes;
    assert!(kept > SEGMENT, "{kept}");
    // One more full segment: the next one is written into a spare.
    write(&m, &mut model, SEGMENT, SEGMENT + (8 << 10), 2);
    write(&m, &mut model, 100 << 10, 40 << 10, 3);
    m.flush().expect("flush");
    assert_eq!(spare_count(&dir), 1, "one spare taken: {:?}", names(&dir));
    assert!(m.status().spare_bytes < kept);
    let (header, len) = active_segment(&dir);
    assert!(
        header.is_recycled(),
        "the active segment is a recycled file"
    );
    assert!(
        len >= SEGMENT - 4096,
        "the earlier segment's bytes follow its records ({len} bytes)"
    );

    // `replog inspect` reads the running journal: the stale bytes are no fault.
    let out = Command::new(env!("CARGO_BIN_EXE_replog"))
        .arg("inspect")
        .arg(&site_dir)
        .env("REPLOG_LOG", "warn")
        .output()
        .expect("inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all checksums verified: OK"), "{text}");
    assert!(!text.contains("torn tail"), "{text}");

    // A crash (no close): every flushed write is back, nothing of the earlier
    // segment; the spare left is kept, to be written again.
    drop(m);
    let m = open(&dir);
    assert_reads(&m, &model, "after a crash");
    assert_eq!(spare_count(&dir), 1, "the spare is kept across a restart");
    assert!(m.status().spare_bytes > 0);
    // It goes on: writes (the next segment into that spare), a clean close and a
    // reopen.
    write(&m, &mut model, 2 << 20, SEGMENT + (44 << 10), 4);
    m.flush().expect("flush");
    assert_eq!(
        spare_count(&dir),
        0,
        "the spare was written into: {:?}",
        names(&dir)
    );
    let (header, _) = active_segment(&dir);
    assert!(header.is_recycled(), "{:?}", names(&dir));
    m.close().expect("close");
    let m = open(&dir);
    assert_reads(&m, &model, "after a close");
    m.close().expect("close");
}

/// Every file in the journal directory of `dir`, segments and spares, in bytes.
fn journal_dir_bytes(storage: &dyn Storage, dir: &Path) -> u64 {
    let j = dir.join("journal");
    storage
        .list_dir(&j)
        .expect("list")
        .iter()
        .filter(|n| n.as_str() != "watermark")
        .map(|n| {
            storage
                .open(&j.join(n), replog::storage::OpenMode::ReadOnly)
                .and_then(|f| f.len())
                .expect("len")
        })
        .sum()
}

/// Spares live within the budget the journal had anyway: with a merge whenever the
/// sealed segments reach `compact_min_bytes`, the directory never holds more than
/// `compact_min_bytes` + two segments (and a record), spares and all.
#[test]
fn spares_keep_the_journal_directory_within_its_bound() {
    const SEG: u64 = 16 << 10;
    const MIN: u64 = 4 * SEG;
    let storage = replog::storage::MemStorage::new();
    let dir = common::machine_dir();
    common::create_machine(&storage, &dir, &[1 << 20]);
    let cfg = JournalConfig {
        segment_bytes: SEG,
        compact_min_bytes: MIN,
        ..JournalConfig::default()
    };
    let shared: Arc<dyn Storage> = Arc::new(storage.clone());
    let m = Machine::open(shared.clone(), &dir, "vm1", cfg).expect("open");
    // The background compactor sets the spares' budget; it never wakes in this test
    // (the merges below are called at the moment the policy would make them).
    m.start_compactor(replog::compactor::CompactPolicy {
        interval: std::time::Duration::from_secs(3600),
        min_bytes: MIN,
        idle: std::time::Duration::from_secs(3600),
    });
    let v = m.volume("d0").expect("volume");
    let (mut peak, mut most_spares) = (0u64, 0u64);
    for i in 0..600u64 {
        v.write((i * 4096) % (1 << 20), &pattern(i, 4096))
            .expect("write");
        if i % 3 == 0 {
            m.flush().expect("flush");
        }
        let s = m.status();
        if s.journal_bytes - m.active_bytes() >= MIN {
            m.compact().expect("compact");
        }
        most_spares = most_spares.max(m.status().spare_bytes);
        peak = peak.max(journal_dir_bytes(shared.as_ref(), &dir));
    }
    assert!(most_spares >= 2 * SEG, "spares were kept: {most_spares}");
    assert!(
        peak <= MIN + 2 * SEG + 8192,
        "the journal directory reached {peak} bytes"
    );
    let mut buf = vec![0u8; 4096];
    v.read(599 * 4096 % (1 << 20), &mut buf).expect("read");
    assert_eq!(buf, pattern(599, 4096));
}

/// A machine failed over to a newer generation takes no writes again: its spares
/// would never be written into, so its next open removes them.
#[test]
fn a_failed_over_machine_keeps_no_spares_across_a_restart() {
    let (_tmp, _site, dir, m, model) = machine_with_two_spares();
    // Control: a plain restart keeps them.
    m.close().expect("close");
    let m = open(&dir);
    assert_eq!(
        spare_count(&dir),
        2,
        "kept across a restart: {:?}",
        names(&dir)
    );
    m.persist_fence(replog::protection::Fence {
        by_site: [7; 32],
        generation: 2,
        at_ns: 1,
        reason: "failed over in a test".into(),
    })
    .expect("fence");
    // Gone as soon as the fence is persisted (a failed-over machine stays open in
    // serve, its loops stopped in place), and after a restart too.
    assert_eq!(spare_count(&dir), 0, "{:?}", names(&dir));
    assert_eq!(m.status().spare_bytes, 0);
    m.close().expect("close");
    let m = open(&dir);
    assert!(m.failed_over());
    assert_eq!(spare_count(&dir), 0, "{:?}", names(&dir));
    assert_eq!(m.status().spare_bytes, 0);
    assert_reads(&m, &model, "after the fence");
    m.close().expect("close");
}
