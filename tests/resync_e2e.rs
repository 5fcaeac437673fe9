//! Resynchronisation as an operator sees it, with `serve` processes on both sites:
//! the journal overflows while the target is down, the resync waits for its window,
//! `replog resync --now` starts it, writes through the FUSE mount go on during it and
//! reach the replica; kill -9 of either side mid-resync resumes without starting over.

mod common;

use common::serve::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Two trusted sites with vm1 (one disk of `size`) at the source; fast replication,
/// resyncs only on request, small batches; returns (src, dst, addr).
fn sites(root: &Path, size: &str, threshold: u64) -> (PathBuf, PathBuf, String) {
    let (src, dst, addr) = two_sites(root, size);
    edit_config(&src, |c| {
        c.replication.resync_window = "never".into();
        c.replication.resync_weekends = false;
        c.replication.resync_threshold_percent = threshold;
        c.replication.resync_batch_bytes = 1 << 20;
    });
    (src, dst, addr)
}

fn restore_equals(dst: &Path, out: &Path, disk: &std::fs::File, size: usize) {
    let doc = run_ok(
        replog()
            .arg("restore")
            .arg(dst)
            .arg("vm1")
            .args(["--at", "latest", "--out"])
            .arg(out)
            .arg("--json"),
    );
    let doc: serde_json::Value = serde_json::from_str(doc.trim()).expect("json");
    assert_eq!(doc["verified"], true, "{doc}");
    let mut want = vec![0u8; size];
    disk.read_exact_at(&mut want, 0).expect("read source");
    let got = std::fs::read(out.join("os.img")).expect("restored");
    assert!(got == want, "the replica differs from the source");
}

#[test]
fn overflow_waits_for_the_window_then_resync_now_with_writes_going_on() {
    if !fuse_available("overflow_waits_for_the_window_then_resync_now_with_writes_going_on") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = sites(tmp.path(), "16M", 25);
    let target = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    write_synced(&os, 1, 3 << 20, 0);
    protect_when_listening(&src, &addr);
    wait_caught_up(&src, "protected");
    // The target goes away; the guest writes more than 25% of the disk.
    drop(target);
    for i in 0..6u64 {
        os.write_all_at(&common::pattern(10 + i, 1 << 20), (i * 2 + 1) << 20)
            .expect("write");
        os.sync_all().expect("fsync");
    }
    let st = wait_for(&src, "resync-required", |m| m["state"] == "resync-required");
    let m = &st["machines"][0];
    assert_eq!(m["health"], "warning");
    assert!(
        m["reason"]
            .as_str()
            .unwrap_or("")
            .contains("unshipped journal"),
        "{m}"
    );
    // The journal stays bounded: the compactor merges what the target never got.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&src)["machines"][0]["journal_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX)
        > 4 << 20
    {
        assert!(Instant::now() < deadline, "the journal was not merged");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The target is back, but outside the window nothing starts by itself.
    let _target = TargetServe::start(&dst, &addr);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&src)["machines"][0]["state"], "resync-required");
    // --now starts it; writes go on through the mount meanwhile.
    let out = run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    assert!(out.contains("now"), "{out}");
    for i in 0..20u64 {
        os.write_all_at(
            &common::pattern(100 + i, 65_536),
            (i * 700_000) % (15 << 20),
        )
        .expect("write during resync");
        if i % 4 == 0 {
            os.sync_all().expect("fsync");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    os.sync_all().expect("fsync");
    let st = wait_for(&src, "resynced and caught up", |m| {
        m["state"] == "protected" && m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    let r = &st["machines"][0]["resync"];
    let total = r["chunks_total"].as_u64().unwrap_or(0);
    assert_eq!(r["chunks_compared"].as_u64(), Some(total), "{r}");
    assert!(total == (16 << 20) / 4096, "{r}");
    let sent = r["chunks_sent"].as_u64().unwrap_or(0);
    assert!(
        sent > 0 && sent < total,
        "sent {sent} of {total} chunks: {r}"
    );
    restore_equals(&dst, &tmp.path().join("restored"), &os, 16 << 20);
    drop(os);
    assert!(served.stop().success());
}

/// Wait until the source's resync has compared some chunks but not all.
fn wait_mid_resync(src: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(src);
        let m = &st["machines"][0];
        let done = m["resync"]["chunks_compared"].as_u64().unwrap_or(0);
        let total = m["resync"]["chunks_total"].as_u64().unwrap_or(0);
        if m["state"] == "resyncing" && done > 0 && done < total {
            return done;
        }
        assert!(Instant::now() < deadline, "never mid-resync: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_of_either_side_mid_resync_resumes_without_starting_over() {
    if !fuse_available("kill_9_of_either_side_mid_resync_resumes_without_starting_over") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = sites(tmp.path(), "256M", 50);
    let target = TargetServe::start(&dst, &addr);
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&src, &mnt, &[]);
    protect_when_listening(&src, &addr);
    wait_for(&src, "protected", |m| m["state"] == "protected");
    let os = open_disk(&served, "os");
    for i in 0..64u64 {
        os.write_all_at(&common::pattern(i, 8192), i * (4 << 20))
            .expect("write");
    }
    os.sync_all().expect("fsync");
    drop(os);
    // kill -9 of the source mid-resync.
    run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    let before = wait_mid_resync(&src);
    served.kill();
    let served = Served::start(&src, &mnt, &[]);
    let st = wait_for(&src, "resumed and done", |m| {
        m["state"] == "protected" && m["resync"]["resumed_from"].as_u64().unwrap_or(0) > 0
    });
    let r = &st["machines"][0]["resync"];
    assert!(
        r["resumed_from"].as_u64().unwrap_or(0) >= before.saturating_sub(256),
        "resumed from {r} after {before} chunks were compared"
    );
    // kill -9 of the target mid-resync.
    run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    wait_mid_resync(&src);
    target.kill9();
    let _target = TargetServe::start(&dst, &addr);
    let st = wait_for(&src, "resumed after the target's kill", |m| {
        m["state"] == "protected"
            && m["health"] == "healthy"
            && m["resync"]["resumed_from"].as_u64().unwrap_or(0) > 0
    });
    let r = &st["machines"][0]["resync"];
    assert_eq!(
        r["chunks_compared"].as_u64(),
        r["chunks_total"].as_u64(),
        "{r}"
    );
    let os = OpenOptions::new()
        .read(true)
        .open(served.disk("os"))
        .expect("os");
    wait_for(&src, "caught up", |m| m["lag_seconds"] == 0.0);
    restore_equals(&dst, &tmp.path().join("restored"), &os, 256 << 20);
    drop(os);
    assert!(served.stop().success());
}

#[test]
fn inside_the_window_a_required_resync_starts_by_itself() {
    if !fuse_available("inside_the_window_a_required_resync_starts_by_itself") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = sites(tmp.path(), "8M", 50);
    edit_config(&src, |c| c.replication.resync_window = "always".into());
    let _target = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    protect_when_listening(&src, &addr);
    wait_for(&src, "protected", |m| m["state"] == "protected");
    // Required, not asked for now: inside the window it runs on its own.
    let out = run_ok(replog().arg("resync").arg(&src).arg("vm1"));
    assert!(out.contains("window"), "{out}");
    let st = wait_for(&src, "resynced", |m| {
        m["state"] == "protected"
            && m["resync"]["chunks_compared"].as_u64() == Some((8 << 20) / 4096)
    });
    assert_eq!(st["machines"][0]["resync"]["chunks_sent"], 0, "{st}");
    assert!(served.stop().success());
}

#[test]
fn a_disk_written_while_serve_was_stopped_is_detected_and_resynced() {
    if !fuse_available("a_disk_written_while_serve_was_stopped_is_detected_and_resynced") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = sites(tmp.path(), "8M", 50);
    edit_config(&src, |c| c.replication.resync_window = "always".into());
    let _target = TargetServe::start(&dst, &addr);
    let mnt = tmp.path().join("mnt");
    let served = Served::start(&src, &mnt, &[]);
    protect_when_listening(&src, &addr);
    wait_caught_up(&src, "protected");
    assert!(served.stop().success());
    // Written directly, behind replog's back.
    let img = src.join("machines/vm1/disks/os.img");
    let f = OpenOptions::new().write(true).open(&img).expect("parent");
    f.write_all_at(b"changed while replog was not running", 1_000_000)
        .expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    let served = Served::start(&src, &mnt, &[]);
    let st = wait_for(&src, "detected and resynced", |m| {
        m["state"] == "protected" && m["resync"]["chunks_sent"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(st["machines"][0]["resync"]["chunks_sent"], 1, "{st}");
    assert!(served
        .log_text()
        .contains("changed while replog was not running"));
    let os = OpenOptions::new()
        .read(true)
        .open(served.disk("os"))
        .expect("os");
    wait_for(&src, "caught up", |m| m["lag_seconds"] == 0.0);
    restore_equals(&dst, &tmp.path().join("restored"), &os, 8 << 20);
    // points says what the resync took away.
    let out = run_ok(replog().arg("points").arg(&dst).arg("vm1"));
    assert!(out.contains("removed by a resynchronisation"), "{out}");
    drop(os);
    assert!(served.stop().success());
}

/// Damage at both ends as an operator meets it, with `serve` on both sites: the
/// replica's parent chunk holding a range rots, and so does the source's journal
/// segment holding the same range; the source's resync is refused ("the replica lost
/// them too") and its loop stops, Critical. `replog accept-loss` at the target lists
/// the ranges (changing nothing), then with `--yes` gives them up through the target's
/// serve; `replog resync --now` at the source starts its stopped loop again, the mend
/// takes the replica's zeroes, and replication converges.
#[test]
fn damage_at_both_ends_is_given_up_through_serve_and_the_stopped_loop_starts_again() {
    if !fuse_available(
        "damage_at_both_ends_is_given_up_through_serve_and_the_stopped_loop_starts_again",
    ) {
        return;
    }
    damage_at_both_ends_given_up(true);
}

/// The same, the target's serve stopped while the operator gives the ranges up
/// (offline, under the site's lock).
#[test]
fn damage_at_both_ends_is_given_up_offline_at_a_stopped_target() {
    if !fuse_available("damage_at_both_ends_is_given_up_offline_at_a_stopped_target") {
        return;
    }
    damage_at_both_ends_given_up(false);
}

fn damage_at_both_ends_given_up(through_serve: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = sites(tmp.path(), "4M", 100);
    // The source merges nothing: the segment holding `x` stays in its journal.
    edit_config(&src, |c| {
        c.journal.compact_min_bytes = 1 << 40;
        c.journal.compact_idle_ms = 1 << 40;
    });
    let mnt = tmp.path().join("mnt");
    let (x, y) = (common::pattern(41, 8192), common::pattern(42, 4096));
    {
        let target = TargetServe::start(&dst, &addr);
        let served = Served::start(&src, &mnt, &[]);
        let os = open_disk(&served, "os");
        write_synced(&os, 40, 1 << 20, 0);
        protect_when_listening(&src, &addr);
        wait_caught_up(&src, "protected");
        // After the initial copy (protecting merges the journal first).
        os.write_all_at(&x, 65_536).expect("x");
        os.write_all_at(&y, 1 << 20).expect("y");
        os.sync_all().expect("fsync");
        wait_caught_up(&src, "x shipped");
        drop(os);
        assert!(served.stop().success());
        drop(target);
    }
    // The target merges it into its parent; the parent chunk holding `x` (disk os,
    // chunk 0) rots and the scrub finds it.
    let replicas = replog::replica::store::Replicas::local(&dst).expect("replicas");
    let much_later = replog::format::now_ns() + 400 * 24 * 3600 * 1_000_000_000;
    replog::replica::compact::compact_replica(&replicas, "vm1", much_later).expect("merge");
    let chunk = dst.join("replicas/vm1/parent/0/0000000000.enc");
    let mut bytes = std::fs::read(&chunk).expect("parent chunk");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&chunk, &bytes).expect("damage");
    replog::replica::scrub::scrub_replica(&replicas, "vm1", u64::MAX).expect("scrub");
    // The source's copy of `x` rots too, in its journal.
    assert_eq!(
        rot_in_journal(&src, &x),
        1,
        "x is not in one segment of the source's journal"
    );

    let mut target = Some(TargetServe::start(&dst, &addr));
    // The damage found at open starts a resync at once; the target refuses its mend.
    let served = Served::start(&src, &mnt, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = status(&src);
        if st["machines"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("lost them too")
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "never refused as lost at the target: {st}\nsource:\n{}\ntarget:\n{}",
            served.log_text(),
            TargetServe::log_text(&dst)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let m = &st["machines"][0];
    assert_eq!(m["health"], "critical", "{m}");
    let why = m["reason"].as_str().unwrap_or("");
    assert!(why.contains("replog accept-loss"), "{why}");
    // Listed, nothing changed.
    let before = std::fs::read(dst.join("replicas/vm1/dropped")).expect("dropped");
    let listed = run_ok(replog().arg("accept-loss").arg(&dst).arg("vm1"));
    assert!(listed.contains("disk 0 (os) bytes 0..262144"), "{listed}");
    assert_eq!(
        std::fs::read(dst.join("replicas/vm1/dropped")).expect("dropped"),
        before
    );
    // Given up through the target's serve, or with none running.
    if !through_serve {
        drop(target.take());
    }
    accept_loss_yes(&dst);
    assert!(!dst.join("replicas/vm1/dropped").exists());
    let _started_again = target.is_none().then(|| TargetServe::start(&dst, &addr));
    // Paused while stopped: the loop started again in its place starts paused.
    let ask = |req| {
        replog::control::request(&src, &req)
            .expect("control socket")
            .expect("the source's serve")
    };
    let machine = || "vm1".to_string();
    assert!(ask(replog::control::Request::PauseShipping { machine: machine() }).ok);
    // The source's stopped loop starts again on an operator's resync.
    let out = run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    assert!(
        out.contains("starts again") && out.contains("paused as the stopped one was"),
        "{out}"
    );
    let st = wait_for(&src, "the new loop paused", |m| {
        m["reason"].as_str().unwrap_or("").contains("is paused")
    });
    assert!(
        st["machines"][0]["resync"].is_null(),
        "resynced while paused: {st}"
    );
    assert!(ask(replog::control::Request::ResumeShipping { machine: machine() }).ok);
    wait_caught_up(&src, "resynced after the loss was accepted");
    let os = open_disk(&served, "os");
    let mut got = vec![0u8; 8192];
    os.read_exact_at(&mut got, 65_536).expect("read x");
    assert!(got.iter().all(|b| *b == 0), "x is not the zeroes given up");
    let mut got = vec![0u8; 4096];
    os.read_exact_at(&mut got, 1 << 20).expect("read y");
    assert_eq!(got, y, "y, outside the lost chunk, changed");
    // The source's own older bytes in the chunk given up go too: its damage was found
    // at open, so its resync asked for every range (as the help says).
    let mut got = vec![1u8; 65_536];
    os.read_exact_at(&mut got, 0)
        .expect("read the chunk's start");
    assert!(
        got.iter().all(|b| *b == 0),
        "the source's older bytes were kept"
    );
    write_synced(&os, 43, 65_536, 65_536);
    wait_caught_up(&src, "caught up after a write");
    restore_equals(&dst, &tmp.path().join("restored"), &os, 4 << 20);
    drop(os);
    assert!(served.stop().success());
}
