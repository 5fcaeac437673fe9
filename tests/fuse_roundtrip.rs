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

/// `path` opened for reading and writing with O_DIRECT.
fn open_direct(path: &std::path::Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT")
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
    let d = open_direct(&path);
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

/// Pages of `path` in the page cache (mincore over a mapping of it).
fn resident_pages(path: &std::path::Path) -> usize {
    let f = std::fs::File::open(path).expect("open parent");
    let len = f.metadata().expect("stat").len() as usize;
    // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore
    // fills one byte per page of it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|b| **b & 1 != 0).count()
    }
}

/// A site with one 32 MiB disk whose journal merges as soon as 2 MiB are sealed, in 1
/// MiB segments; under the build's own directory, on a disk file system whatever
/// TMPDIR is (the page-cache residency checks mean nothing on tmpfs).
fn merging_site() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let site = make_site(tmp.path(), &[("os", "32M")]);
    edit_config(&site, |c| {
        c.journal.segment_bytes = 1 << 20;
        c.journal.compact_min_bytes = 2 << 20;
        c.journal.compact_interval_ms = 50;
        c.journal.compact_idle_ms = 100;
    });
    (tmp, site)
}

/// Drop `path`'s pages from the page cache (all of them are clean).
fn drop_pages(path: &std::path::Path) {
    let p = std::fs::File::open(path).expect("open");
    // SAFETY: posix_fadvise on an open descriptor with integer arguments.
    let rc = unsafe { libc::posix_fadvise(p.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    assert_eq!(resident_pages(path), 0, "{path:?}'s pages were not dropped");
}

/// Wait until the journal of the site's one machine is down to its open segment.
fn wait_merged(site: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while status(site)["machines"][0]["journal_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX)
        > 1 << 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the journal was not merged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `serve --direct-reads`: an O_DIRECT reader gets what was merged into the parent
/// (read with O_DIRECT, so none of it comes into the page cache) and what is still in
/// the journal, aligned or not; a buffered reader gets the same through the page
/// cache.
#[test]
fn direct_reads_return_the_parent_and_the_journal_without_caching_the_parent() {
    if !fuse_available("direct_reads_return_the_parent_and_the_journal_without_caching_the_parent")
    {
        return;
    }
    let (tmp, site) = merging_site();
    let served = Served::start(&site, &tmp.path().join("mnt"), &["--direct-reads"]);
    let path = served.disk("os");
    let mut model = vec![0u8; SIZE];
    let d = open_direct(&path);
    // 24 MiB in 1 MiB direct writes, then merged into the parent.
    let mut ab = Aligned::new(1 << 20);
    for k in 0..24usize {
        let data = pattern(2000 + k as u64, 1 << 20);
        ab.buf().copy_from_slice(&data);
        d.write_all_at(ab.buf(), (k << 20) as u64).expect("write");
        model[k << 20..(k + 1) << 20].copy_from_slice(&data);
    }
    d.sync_all().expect("fsync");
    wait_merged(&site);
    // Newer, unaligned writes on top, left in the journal.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    for (i, (off, len)) in [
        (4095usize, 10_000usize),
        (3 << 20, 1),
        ((20 << 20) + 7, 70_000),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(3000 + i as u64, len);
        f.write_all_at(&data, off as u64).expect("write");
        model[off..off + len].copy_from_slice(&data);
    }
    f.sync_data().expect("fdatasync");
    let parent = site.join("machines/vm1/disks/os.img");
    drop_pages(&parent);
    // Every MiB, direct.
    for k in 0..SIZE >> 20 {
        d.read_exact_at(ab.buf(), (k << 20) as u64)
            .expect("O_DIRECT read");
        assert!(
            ab.buf() == &model[k << 20..(k + 1) << 20],
            "O_DIRECT read of MiB {k} differs"
        );
    }
    // Unaligned direct reads, across journal and parent pieces.
    for (off, len) in [
        (4000usize, 20_000usize),
        (12_345, 4096),
        ((20 << 20) + 1, 100_000),
    ] {
        let b = &mut ab.buf()[..len];
        d.read_exact_at(b, off as u64)
            .expect("unaligned O_DIRECT read");
        assert!(
            *b == model[off..off + len],
            "O_DIRECT read {off}+{len} differs"
        );
    }
    let cached = resident_pages(&parent);
    assert!(
        cached < 16,
        "direct reads brought {cached} pages of the parent into the page cache"
    );
    // A buffered reader sees the same, through the page cache.
    let mut all = vec![0u8; SIZE];
    f.read_exact_at(&mut all, 0).expect("read all");
    assert!(all == model, "buffered read differs from the model");
    assert!(
        resident_pages(&parent) > 1000,
        "buffered reads did not use the page cache"
    );
    drop((d, f));
    assert!(served.stop().success());
}

/// By default a sequential O_DIRECT reader's run is read around the page cache and
/// ahead into replog's own buffers (the metrics count the bytes it served), and never
/// gets what a merge has replaced since: MiB 12, read ahead with its first contents, is
/// written again and merged before the reader gets there, and the reader gets the new
/// contents. Its stream leaves the parent's pages out of the page cache; O_DIRECT reads
/// that are not a run go through it.
#[test]
fn a_sequential_direct_reader_is_read_ahead_and_never_served_what_a_merge_replaced() {
    if !fuse_available(
        "a_sequential_direct_reader_is_read_ahead_and_never_served_what_a_merge_replaced",
    ) {
        return;
    }
    let (tmp, site) = merging_site();
    let metrics = format!("127.0.0.1:{}", free_port());
    let served = Served::start(&site, &tmp.path().join("mnt"), &["--metrics", &metrics]);
    let read_ahead = || {
        metric_samples(&http_get(&metrics, "/metrics").1)
            .get("replog_direct_read_bytes_total{source=\"read_ahead\"}")
            .copied()
            .unwrap_or(0.0)
    };
    let parent = site.join("machines/vm1/disks/os.img");
    let d = open_direct(&served.disk("os"));
    let mut model = vec![0u8; SIZE];
    let mut wb = Aligned::new(1 << 20);
    let mut write_mib = |k: usize, seed: u64, model: &mut Vec<u8>| {
        let data = pattern(seed, 1 << 20);
        wb.buf().copy_from_slice(&data);
        d.write_all_at(wb.buf(), (k << 20) as u64).expect("write");
        d.sync_all().expect("fsync");
        model[k << 20..(k + 1) << 20].copy_from_slice(&data);
    };
    for k in 0..SIZE >> 20 {
        write_mib(k, 5000 + k as u64, &mut model);
    }
    wait_merged(&site);
    drop_pages(&parent);
    let mut rb = Aligned::new(1 << 20);
    let mut read_mib = |k: usize, model: &[u8]| {
        d.read_exact_at(rb.buf(), (k << 20) as u64)
            .expect("O_DIRECT read");
        assert!(
            rb.buf() == &model[k << 20..(k + 1) << 20],
            "O_DIRECT read of MiB {k} differs"
        );
    };
    for k in 0..SIZE >> 20 {
        read_mib(k, &model);
    }
    assert!(
        read_ahead() >= (1 << 20) as f64,
        "nothing was read ahead for a sequential direct reader"
    );
    // From the start again (a new run).
    for k in 0..8 {
        read_mib(k, &model);
    }
    // MiB 12 is read ahead by now; write it again, and two more MiB elsewhere so that
    // the merge runs now, and let the merge take them.
    for (k, seed) in [(12usize, 9999u64), (30, 7030), (31, 7031)] {
        write_mib(k, seed, &mut model);
    }
    wait_merged(&site);
    for k in 8..SIZE >> 20 {
        read_mib(k, &model);
    }
    let streamed = resident_pages(&parent);
    assert!(
        streamed < 1024,
        "a sequential O_DIRECT reader's run brought {streamed} pages of the parent into \
         the page cache"
    );
    // O_DIRECT reads that are not a run (4 KiB, 1 MiB apart) go through the page cache.
    let mut small = Aligned::new(4096);
    for k in (0..SIZE >> 20).rev() {
        let off = (k << 20) + 8192;
        d.read_exact_at(small.buf(), off as u64)
            .expect("O_DIRECT read");
        assert!(
            small.buf() == &model[off..off + 4096],
            "4 KiB read at {off} differs"
        );
    }
    let after = resident_pages(&parent);
    assert!(
        after >= streamed + 24,
        "O_DIRECT reads that were not a run did not use the page cache ({streamed} then \
         {after} pages)"
    );
    drop(d);
    assert!(served.stop().success());
}
