//! kill -9 `serve` during a loop of writes with an fsync after each batch; restart
//! (the dead mount is cleared); every batch acknowledged by a completed fsync is there,
//! byte for byte.

mod common;

use common::pattern;
use common::serve::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 64 * 1024;
const SLOTS: u64 = 1000; // distinct regions on the disk, one per batch

#[test]
fn kill_9_keeps_every_fsynced_batch() {
    if !fuse_available("kill_9_keeps_every_fsynced_batch") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = make_site(tmp.path(), &[("os", "128M")]);
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&site, &mnt, &[]);
    let path = served.disk("os");

    // Batch i writes slot i (unaligned: 3 writes of odd sizes), then fsyncs; `acked`
    // counts the batches whose fsync returned.
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let acked = acked.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            for i in 0..SLOTS {
                let data = pattern(i, BATCH);
                let base = i * (BATCH as u64 + 512) + 1;
                let ok = f.write_all_at(&data[..1000], base).is_ok()
                    && f.write_all_at(&data[1000..40_001], base + 1000).is_ok()
                    && f.write_all_at(&data[40_001..], base + 40_001).is_ok()
                    && f.sync_data().is_ok();
                if !ok {
                    return;
                }
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    // Let it run a while, then kill serve in the middle of the loop.
    while acked.load(Ordering::SeqCst) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    served.kill();
    writer.join().expect("writer");
    let done = acked.load(Ordering::SeqCst);
    assert!(
        done < SLOTS,
        "the writer finished before the kill; make the loop longer"
    );

    // Restart: the dead mount is detected and cleared, the journal recovered.
    let served = Served::start(&site, &mnt, &[]);
    assert!(
        served.log_text().contains("dead FUSE mount"),
        "restart did not report the dead mount:\n{}",
        served.log_text()
    );
    let f = std::fs::File::open(served.disk("os")).expect("open");
    for i in 0..done {
        let mut buf = vec![0u8; BATCH];
        f.read_exact_at(&mut buf, i * (BATCH as u64 + 512) + 1)
            .expect("read");
        assert!(
            buf == pattern(i, BATCH),
            "batch {i} (of {done} acknowledged) lost or damaged"
        );
    }
    drop(f);
    assert!(served.stop().success());
    eprintln!("{done} batches acknowledged before kill -9; all present");
}
