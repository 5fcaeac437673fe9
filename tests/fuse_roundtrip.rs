//! Round trip through the real kernel FUSE mount with std::fs: unaligned writes and
//! reads across block boundaries, O_DIRECT 4 KiB I/O, fallocate punch/zero, fsync,
//! SEEK_DATA/SEEK_HOLE — all against a model.

mod common;

use common::pattern;
use common::serve::*;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

const SIZE: usize = 32 << 20;

struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn seek(fd: i32, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: lseek on an open descriptor.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

#[test]
fn round_trip_through_the_mount_matches_a_model() {
    if !fuse_available("round_trip_through_the_mount_matches_a_model") {
        return;
    }
    round_trip(&[]);
}

/// The same with writes handed to worker threads and two session threads.
#[test]
fn round_trip_with_write_workers_matches_a_model() {
    if !fuse_available("round_trip_with_write_workers_matches_a_model") {
        return;
    }
    round_trip(&["--write-workers", "2", "--fuse-threads", "2"]);
}

fn round_trip(serve_args: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = make_site(tmp.path(), &[("os", "32M")]);
    let served = Served::start(&site, &tmp.path().join("mnt"), serve_args);
    let path = served.disk("os");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), SIZE as u64);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let mut model = vec![0u8; SIZE];

    // A fresh sparse disk is one hole.
    assert_eq!(seek(f.as_raw_fd(), 0, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(f.as_raw_fd(), 0, libc::SEEK_HOLE), Ok(0));

    // Unaligned writes across block boundaries, some overlapping.
    let writes: [(usize, usize); 8] = [
        (1, 4095),
        (4095, 2),
        (8191, 8194),
        (1_000_003, 300_001),
        (1_100_000, 17),
        (SIZE - 513, 513),
        (5 << 20, 2 << 20),
        (6 << 20, 1),
    ];
    for (i, (off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64, *len);
        f.write_all_at(&data, *off as u64).expect("write");
        model[*off..off + len].copy_from_slice(&data);
    }
    for (off, len) in [
        (0, 20_000),
        (4000, 200),
        (999_999, 400_000),
        (SIZE - 1000, 1000),
        (5 << 20, 2 << 20),
    ] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).expect("read");
        assert!(buf == model[off..off + len], "read {off}+{len} differs");
    }
    f.sync_all().expect("fsync");

    // Data now starts at offset 1.
    assert_eq!(seek(f.as_raw_fd(), 0, libc::SEEK_DATA), Ok(1));

    // fallocate: punch a hole, zero a range.
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1_050_000,
            100_000,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
    model[1_050_000..1_150_000].fill(0);
    // SAFETY: as above.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE,
            (5 << 20) + 7,
            4096 * 3,
        )
    };
    assert_eq!(rc, 0, "zero range: {}", std::io::Error::last_os_error());
    model[(5 << 20) + 7..(5 << 20) + 7 + 4096 * 3].fill(0);
    f.sync_data().expect("fdatasync");

    // O_DIRECT 4 KiB I/O.
    let d = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    let mut ab = Aligned::new(4096);
    for k in 0..64usize {
        let off = (k * 7919 % 4096) * 4096;
        let data = pattern(1000 + k as u64, 4096);
        ab.buf().copy_from_slice(&data);
        d.write_all_at(ab.buf(), off as u64)
            .expect("O_DIRECT write");
        model[off..off + 4096].copy_from_slice(&data);
    }
    for k in 0..64usize {
        let off = (k * 7919 % 4096) * 4096;
        d.read_exact_at(ab.buf(), off as u64)
            .expect("O_DIRECT read");
        assert!(
            ab.buf() == &model[off..off + 4096],
            "O_DIRECT read at {off}"
        );
    }
    d.sync_all().expect("fsync O_DIRECT");
    drop(d);

    // The whole disk, through the buffered descriptor, equals the model.
    let mut all = vec![0u8; SIZE];
    f.read_exact_at(&mut all, 0).expect("read all");
    assert!(all == model, "disk differs from the model");
    drop(f);

    // After a clean stop and a new serve, still equal.
    assert!(served.stop().success());
    let served = Served::start(&site, &tmp.path().join("mnt"), serve_args);
    let again = std::fs::read(served.disk("os")).expect("read after restart");
    assert!(again == model, "disk differs from the model after restart");
    assert!(served.stop().success());

    // And `replog inspect` finds every checksum good.
    run_ok(replog().arg("inspect").arg(&site));
}
