//! A running serve's live registry: machines created and removed while it runs appear
//! and vanish under the mount at once (the kernel's caches invalidated); commands
//! reach it through the control socket — and, with no serve, work offline under the
//! site lock; the command channel into a shipping loop ships and waits for the
//! acknowledgement, pauses and resumes; a fenced machine refuses writes with EROFS.

mod common;

use common::serve::*;
use replog::control::{request, Reply, Request};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn ask(site: &Path, req: Request) -> Reply {
    request(site, &req)
        .expect("control socket")
        .expect("a serve is listening")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn machines_created_and_removed_while_serving_appear_and_vanish_under_the_mount() {
    if !fuse_available("machines_created_and_removed_while_serving") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let site = make_site(tmp.path(), &[("os", "4M")]);
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&site, &mnt, &[]);
    // The kernel has looked and found nothing (a negative entry it may cache).
    assert!(!mnt.join("vm2").exists());
    assert_eq!(names(&mnt), vec!["vm1"]);

    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&site)
            .args(["vm2/os", "--size", "4M"]),
    );
    // At once: no wait, no polling.
    let img = mnt.join("vm2/os.img");
    assert!(img.exists(), "vm2 did not appear");
    assert_eq!(names(&mnt), vec!["vm1", "vm2"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .expect("open vm2/os.img");
    let data = common::pattern(5, 64 << 10);
    f.write_all_at(&data, 12_345).expect("write vm2");
    f.sync_all().expect("fsync vm2");
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 12_345).expect("read vm2");
    assert!(back == data);

    // A disk added to an open machine: it closes, gains the disk, opens again — while
    // a writer keeps writing through a file opened before. Its file keeps working
    // (same inode), no write fails, and every one is there afterwards.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (f, stop) = (f.try_clone().expect("dup"), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
                let block = common::pattern(100 + n, 4096);
                f.write_all_at(&block, (1 << 20) + (n % 256) * 4096)
                    .unwrap_or_else(|e| panic!("write {n} during the reload: {e}"));
                n += 1;
            }
            f.sync_all().expect("fsync after the reload");
            n
        })
    };
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&site)
            .args(["vm2/data", "--size", "1M"]),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer");
    let mut block = vec![0u8; 4096];
    for n in written.saturating_sub(256)..written {
        f.read_exact_at(&mut block, (1 << 20) + (n % 256) * 4096)
            .expect("read through the file opened before the reload");
        assert!(
            block == common::pattern(100 + n, 4096),
            "write {n} of {written} is not there after the reload"
        );
    }
    assert_eq!(names(&mnt.join("vm2")), vec!["data.img", "os.img"]);
    let again = std::fs::File::open(&img).expect("reopen");
    let mut back = vec![0u8; data.len()];
    again
        .read_exact_at(&mut back, 12_345)
        .expect("read after reload");
    assert!(back == data, "the reopened machine lost what was written");

    // Removed: gone from the mount at once, and its files; an open file errors.
    run_ok(replog().args(["machine", "remove"]).arg(&site).arg("vm2"));
    assert!(!mnt.join("vm2").exists(), "vm2 still under the mount");
    assert_eq!(names(&mnt), vec!["vm1"]);
    assert!(!site.join("machines/vm2").exists(), "vm2's files are left");
    let err = f
        .write_all_at(b"after removal", 0)
        .expect_err("wrote to a removed disk");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ESTALE) | Some(libc::EIO)
        ),
        "{err}"
    );
    // A machine that is not there: a clear error, exit 1.
    let out = replog()
        .args(["machine", "remove"])
        .arg(&site)
        .arg("vm2")
        .output()
        .expect("remove");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no machine vm2"));
    drop((f, again));
    assert!(served.stop().success());

    // Offline (no serve): the same commands work under the site lock.
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&site)
            .args(["vm3/os", "--size", "1M"]),
    );
    assert!(site.join("machines/vm3/machine.meta").exists());
    run_ok(replog().args(["machine", "remove"]).arg(&site).arg("vm3"));
    assert!(!site.join("machines/vm3").exists());
    // And the next serve shows what is there.
    let served = Served::start(&site, &mnt, &[]);
    assert_eq!(names(&mnt), vec!["vm1"]);
    assert!(served.stop().success());
}

#[test]
fn the_command_channel_ships_pauses_and_fences() {
    if !fuse_available("the_command_channel_ships_pauses_and_fences") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let (src, dst, addr) = two_sites(tmp.path(), "8M");
    // Seal rarely: only the command channel makes the shipping prompt.
    edit_config(&src, |c| c.replication.seal_interval_ms = 60_000);
    let tmnt = tmp.path().join("tmnt");
    let target = Served::start(&dst, &tmnt, &["--listen", &addr]);
    assert!(!tmnt.join("vm1").exists());
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&src, &mnt, &[]);
    protect_when_listening(&src, &addr);
    let disk = open_disk(&served, "os");

    // Ship now and wait for the acknowledgement: it covers the write just made.
    write_synced(&disk, 1, 1 << 20, 0);
    // (A status taken after the write.)
    let st = wait_for(&src, "the write counted", |m| {
        m["last_lsn"].as_u64() > Some(0)
    });
    let last = st["machines"][0]["last_lsn"].as_u64().expect("last lsn");
    let r = ask(
        &src,
        Request::Ship {
            machine: "vm1".into(),
            timeout_ms: 60_000,
        },
    );
    assert!(r.ok, "{r:?}");
    assert!(r.lsn.expect("acked lsn") >= last, "{r:?} vs {last}");
    // The replica appeared under the target's mount when it was created.
    assert!(
        tmnt.join("vm1/points").is_dir(),
        "the new replica is not shown"
    );

    // Paused: nothing ships, a ship request says why; resumed: it ships again.
    assert!(
        ask(
            &src,
            Request::PauseShipping {
                machine: "vm1".into()
            }
        )
        .ok
    );
    disk.write_all_at(b"while paused", 4096).expect("write");
    disk.sync_all().expect("fsync");
    let r = ask(
        &src,
        Request::Ship {
            machine: "vm1".into(),
            timeout_ms: 5_000,
        },
    );
    assert!(
        !r.ok && r.error.as_deref().unwrap_or("").contains("paused"),
        "{r:?}"
    );
    ask(
        &src,
        Request::ResumeShipping {
            machine: "vm1".into(),
        },
    );
    let r = ask(
        &src,
        Request::Ship {
            machine: "vm1".into(),
            timeout_ms: 60_000,
        },
    );
    assert!(r.ok, "{r:?}");

    // Fenced: writes through the mount fail with EROFS, reads go on; then unfenced.
    let f = ask(
        &src,
        Request::Fence {
            machine: "vm1".into(),
            reason: "a test".into(),
        },
    );
    assert!(f.ok && f.lsn.is_some(), "{f:?}");
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(served.disk("os"))
        .expect("open direct");
    let buf = AlignedBlock::new(0x5a);
    let err = direct
        .write_at(buf.as_slice(), 8192)
        .expect_err("a fenced machine took a write");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    wait_for(&src, "the fence shown", |m| {
        m["reason"]
            .as_str()
            .unwrap_or("")
            .contains("writes refused: a test")
            && m["health"] == "warning"
    });
    let mut back = vec![0u8; 4096];
    disk.read_exact_at(&mut back, 0).expect("reads go on");
    assert!(
        ask(
            &src,
            Request::Unfence {
                machine: "vm1".into()
            }
        )
        .ok
    );
    direct
        .write_at(buf.as_slice(), 8192)
        .expect("write after unfence");

    // A protected machine's disks are its replica's: no disk added, no removal.
    for args in [
        vec!["disk", "create", "SITE", "vm1/extra", "--size", "1M"],
        vec!["machine", "remove", "SITE", "vm1"],
    ] {
        let mut cmd = replog();
        for a in &args {
            if *a == "SITE" {
                cmd.arg(&src);
            } else {
                cmd.arg(a);
            }
        }
        let out = cmd.output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("protected"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(mnt.join("vm1/os.img").exists());
    drop((disk, direct));
    assert!(served.stop().success());
    assert!(target.stop().success());
    // Without a serve, the commands that need one say so.
    let out = replog().arg("status").arg(&src).output().expect("status");
    assert!(out.status.success());
    let err = replog::control::run(
        &src,
        &Request::Ship {
            machine: "vm1".into(),
            timeout_ms: 1000,
        },
    )
    .expect_err("shipped without a serve");
    assert!(err.to_string().contains("running `replog serve"), "{err}");
}

/// One 4 KiB block, aligned for O_DIRECT.
struct AlignedBlock(Vec<u8>, usize);

impl AlignedBlock {
    fn new(fill: u8) -> Self {
        let mut v = vec![fill; 8192];
        let skip = v.as_ptr().align_offset(4096);
        v.truncate(skip + 4096);
        AlignedBlock(v, skip)
    }
    fn as_slice(&self) -> &[u8] {
        &self.0[self.1..self.1 + 4096]
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// A pause is carried out under the machine's `changing` lock, so a loop `resync
/// --now` starts in a stopped one's place cannot be swapped in between finding the
/// loop and telling it: while a pause stalls there (a failpoint), another change of
/// the same machine through serve (a disk created) waits, and one of another machine
/// does not.
#[test]
fn a_pause_holds_its_machine_against_other_changes_until_it_is_told() {
    if !fuse_available("a_pause_holds_its_machine_against_other_changes_until_it_is_told") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let (src, dst, addr) = two_sites(tmp.path(), "8M");
    let tmnt = tmp.path().join("tmnt");
    let _target = Served::start(&dst, &tmnt, &["--listen", &addr]);
    let mnt = tmp.path().join("mnt");
    let served = Served::start_with_env(
        &src,
        &mnt,
        &[],
        &[("REPLOG_FAILPOINT", "serve:pause-found:stall")],
    );
    protect_when_listening(&src, &addr);
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm2/os", "--size", "4M"]),
    );
    // The pause's request stays unanswered: its thread stalls with the lock held.
    {
        let src = src.clone();
        std::thread::spawn(move || {
            let _ = request(
                &src,
                &Request::PauseShipping {
                    machine: "vm1".into(),
                },
            );
        });
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !served.log_text().contains("failpoint serve:pause-found") {
        assert!(
            std::time::Instant::now() < deadline,
            "the pause never reached its loop; log:\n{}",
            served.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Another machine's change goes through at once (a liveness check: 120 s is
    // only how long to wait for a call that would otherwise wait for ever).
    let create = |disk: &str| {
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args([disk, "--size", "4M"])
            .spawn()
            .expect("spawn")
    };
    let waited = exited_within(&mut create("vm2/data"), std::time::Duration::from_secs(120));
    assert!(
        waited.is_some_and(|st| st.success()),
        "vm2's change waited for vm1's pause"
    );
    // This machine's waits — to be refused, as a protected machine gets no new disk,
    // but only once it has the machine (a slow machine can only make this pass, never
    // fail).
    let mut same = create("vm1/data");
    let waited = exited_within(&mut same, std::time::Duration::from_secs(2));
    assert!(
        waited.is_none(),
        "vm1's change was answered while its pause held the machine: {waited:?}"
    );
    // The stalled thread ends with the process.
    served.kill();
    let _ = same.wait();
    let _ = replog::frontend::detach(&mnt);
}
