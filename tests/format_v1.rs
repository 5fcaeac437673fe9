//! Format version 1 fixture: a site written by the first release. Every later version
//! must open it, recover it and read the same disks.
//!
//! The fixture (tests/fixtures/v1/site) holds a merged watermark, two sealed segments
//! with writes and a zero record, and an active segment; expected/ holds the disks as
//! they read when it was made.

use replog::Site;
use std::path::{Path, PathBuf};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

#[test]
fn v1_site_inspects_clean() {
    let report = replog::inspect::inspect(&fixture().join("site")).expect("inspect");
    assert!(report.ok(), "{:?}", report.corruption);
    let j = &report.journals[0];
    assert_eq!(j.watermark_lsn, 4);
    let sealed: Vec<_> = j
        .segments
        .iter()
        .filter(|s| s.sealed)
        .map(|s| s.seq)
        .collect();
    assert_eq!(sealed, vec![2, 3]);
    assert_eq!(j.segments.last().map(|s| (s.seq, s.records)), Some((4, 2)));
}

#[test]
fn v1_site_opens_and_reads_the_same_disks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site_dir = tmp.path().join("site");
    copy_dir(&fixture().join("site"), &site_dir);
    let site = Site::open(&site_dir).expect("open v1 site");
    let m = site.open_machine("vm1").expect("open v1 machine");
    for disk in ["os", "data"] {
        let want = std::fs::read(fixture().join("expected").join(format!("{disk}.img")))
            .expect("expected");
        let v = m.volume(disk).expect("volume");
        let mut got = vec![0u8; v.size() as usize];
        v.read(0, &mut got).expect("read");
        assert!(
            got == want,
            "disk {disk} of the v1 fixture reads differently"
        );
    }
    // And it keeps working: compact everything, read again.
    m.seal().expect("seal");
    m.compact().expect("compact");
    let v = m.volume("os").expect("volume");
    let want = std::fs::read(fixture().join("expected/os.img")).expect("expected");
    let mut got = vec![0u8; v.size() as usize];
    v.read(0, &mut got).expect("read");
    assert!(got == want, "compaction of the v1 journal changed the disk");
}
