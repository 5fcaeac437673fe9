//! Bad input through the mount and to `serve`: each a clear error, nothing changed
//! (a write across the end is a short write, as on a block device).

mod common;

use common::serve::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

#[test]
fn writes_past_the_end_truncate_and_strangers_are_refused() {
    if !fuse_available("writes_past_the_end_truncate_and_strangers_are_refused") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = make_site(tmp.path(), &[("os", "4M")]);
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&site, &mnt, &[]);
    let path = served.disk("os");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(b"keep", 100).expect("write");
    f.sync_all().expect("fsync");

    // Past the end: ENOSPC, like a full block device; nothing written.
    let err = f
        .write_all_at(&[7u8; 4096], 4 << 20)
        .expect_err("write past the end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let mut tail = [0u8; 100];
    f.read_exact_at(&mut tail, (4 << 20) - 100)
        .expect("read tail");
    assert_eq!(tail, [0u8; 100], "a refused write changed the disk");
    // Across the end: the kernel splits the write at the end of the file, so like a
    // block device it is a short write: the bytes inside land, the rest is refused.
    let n = f
        .write_at(&[7u8; 4096], (4 << 20) - 100)
        .expect("short write across the end");
    assert_eq!(n, 100, "a write across the end must stop at the end");
    f.read_exact_at(&mut tail, (4 << 20) - 100)
        .expect("read tail");
    assert_eq!(tail, [7u8; 100]);

    // Truncate and extend: EPERM; the size stays.
    assert_eq!(
        f.set_len(1 << 20).expect_err("truncate").raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(
        f.set_len(8 << 20).expect_err("extend").raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4 << 20);

    // New files, unknown names: refused.
    let e = std::fs::write(mnt.join("vm1/new.img"), b"x").expect_err("create");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let e = std::fs::File::open(mnt.join("vm1/nope.img")).expect_err("open unknown");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    let e = std::fs::remove_file(&path).expect_err("unlink");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let names: Vec<String> = std::fs::read_dir(mnt.join("vm1"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["os.img".to_string()]);

    // A second serve on the same site: a clear error naming the holder.
    let out = replog()
        .arg("serve")
        .arg(&site)
        .arg("--mount")
        .arg(tmp.path().join("mnt2"))
        .output()
        .expect("second serve");
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("in use by pid"), "{msg}");

    let log = served.log_text();
    assert!(
        log.contains("refused: truncate"),
        "no log line for the truncate:\n{log}"
    );
    assert!(
        log.contains("outside the disk"),
        "no log line for the write past the end:\n{log}"
    );
    drop(f);
    assert!(served.stop().success());

    // Nothing refused reached the journal: the disk holds exactly "keep".
    let mut buf = vec![0u8; 4 << 20];
    let out = replog()
        .arg("read")
        .arg(&site)
        .arg("vm1/os")
        .output()
        .expect("read");
    buf.copy_from_slice(&out.stdout);
    let mut want = vec![0u8; 4 << 20];
    want[100..104].copy_from_slice(b"keep");
    want[(4 << 20) - 100..].fill(7);
    assert!(buf == want);
}

#[test]
fn serve_refuses_bad_sites_and_mount_points() {
    if !fuse_available("serve_refuses_bad_sites_and_mount_points") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Not a site.
    let out = replog()
        .arg("serve")
        .arg(tmp.path())
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a replog site"));
    // Mount point is a file.
    let site = make_site(tmp.path(), &[("os", "1M")]);
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let out = replog()
        .arg("serve")
        .arg(&site)
        .arg("--mount")
        .arg(&file)
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));

    // A live replog mount, at a path the kernel lists with an escape (a space is
    // `\040` in /proc/self/mountinfo): another serve onto it is refused, and the
    // first mount keeps serving.
    let spaced = tmp.path().join("my mnt");
    let served = Served::start(&site, &spaced, &[]);
    write_at(&served.disk("os"), 0, b"first");
    let other_root = tmp.path().join("other");
    std::fs::create_dir(&other_root).expect("mkdir");
    let other = make_site(&other_root, &[("os", "1M")]);
    let out = replog()
        .arg("serve")
        .arg(&other)
        .arg("--mount")
        .arg(&spaced)
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already a live replog mount"), "{err}");
    let head = std::fs::read(served.disk("os")).expect("read");
    assert_eq!(head.get(..5), Some(&b"first"[..]));
    assert!(served.stop().success());
}
