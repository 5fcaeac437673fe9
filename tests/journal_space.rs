//! Disk space a journal holds: a sealed segment keeps only the blocks its records and
//! footer need, not the whole segment preallocated for appends. A machine that seals
//! every few seconds with little written (a quiet guest, a target that is down) must
//! not hold a segment's worth of disk per sealed segment (found by the 100-machine
//! bench, which ran out of space).

mod common;

use replog::storage::FileStorage;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

#[test]
fn a_sealed_segment_gives_back_its_preallocated_blocks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("vm1");
    common::create_machine(&FileStorage, &dir, &[64 << 20]);
    let m = common::open(Arc::new(FileStorage), &dir, 64 << 20).expect("open");
    let v = m.volume("d0").expect("d0");
    let mut segments = Vec::new();
    for i in 0..5u64 {
        v.write(i * 4096, &common::pattern(i, 4096)).expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
        segments.extend(m.sealed_segments().into_iter().map(|s| s.seq));
    }
    segments.sort();
    segments.dedup();
    assert!(segments.len() >= 5, "{segments:?}");
    let journal = dir.join("journal");
    let mut held = 0;
    let mut active_preallocated = false;
    for e in std::fs::read_dir(&journal).expect("journal") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().to_string();
        let meta = e.metadata().expect("meta");
        if !name.ends_with(".seg") {
            continue;
        }
        // The active segment keeps its preallocation; sealed ones must not.
        let sealed = segments
            .iter()
            .any(|s| name == replog::format::segment::segment_name(*s));
        if sealed {
            assert!(
                meta.blocks() * 512 < meta.size() + (1 << 20),
                "{name}: {} bytes allocated for {} bytes",
                meta.blocks() * 512,
                meta.size()
            );
            held += meta.blocks() * 512;
        } else if meta.blocks() * 512 > meta.size() + (1 << 20) {
            active_preallocated = true;
        }
    }
    // The file system must keep preallocations at all, or this test shows nothing.
    assert!(
        active_preallocated,
        "the active segment holds no preallocation: fallocate(KEEP_SIZE) is not kept here"
    );
    assert!(held < 4 << 20, "5 sealed segments hold {held} bytes");
    drop(v);
    m.close().expect("close");
}
