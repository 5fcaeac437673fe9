//! Failover through real serves, real TLS on 127.0.0.1 and real FUSE mounts at both
//! sites: test failover (the copy's writes never reach the replica, replication goes
//! on, cleanup leaves nothing), unplanned failover at a chosen point with change of
//! point, commit and the old primary learning it is fenced, cancel, planned
//! failover with zero loss, and every bad input refused with nothing changed.

mod common;

use common::serve::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn out(cmd: &mut std::process::Command) -> Output {
    cmd.output().expect("run replog")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `replog failover SITE vm1 ARGS…`.
fn failover(site: &Path, args: &[&str]) -> Output {
    out(replog().arg("failover").arg(site).arg("vm1").args(args))
}

/// The status entry of `name` with `role` at `site`, from a status taken after now.
fn entry(site: &Path, name: &str, role: &str) -> Option<serde_json::Value> {
    fresh_status(site)["machines"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name && m["role"] == role)
        .cloned()
}

/// The names of process `pid`'s threads.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// A protected source with a mount and a listening target with a mount, vm1/os of
/// 16 MiB, initial replication done.
struct Pair {
    // Dropped first: the dead mounts of killed serves go before the directory.
    _sweep: MountSweep,
    _tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    addr: String,
    src_serve: Option<Served>,
    dst_serve: Option<Served>,
}

impl Pair {
    fn new() -> Pair {
        let tmp = tempfile::tempdir().expect("tmp");
        let (src, dst, addr) = two_sites(tmp.path(), "16M");
        let dst_serve = Served::start(&dst, &tmp.path().join("dst-mnt"), &["--listen", &addr]);
        let src_serve = Served::start(&src, &tmp.path().join("src-mnt"), &[]);
        protect_when_listening(&src, &addr);
        wait_shipped(&src);
        Pair {
            src,
            dst,
            addr,
            src_serve: Some(src_serve),
            dst_serve: Some(dst_serve),
            _sweep: MountSweep(tmp.path().to_path_buf()),
            _tmp: tmp,
        }
    }

    fn src_img(&self) -> PathBuf {
        self.src_serve.as_ref().expect("src serve").disk("os")
    }

    fn dst_mnt(&self) -> PathBuf {
        self.dst_serve.as_ref().expect("dst serve").mount.clone()
    }

    fn points(&self) -> serde_json::Value {
        let o = out(replog()
            .arg("points")
            .arg(&self.dst)
            .arg("vm1")
            .arg("--json"));
        assert!(o.status.success(), "points: {}", text(&o));
        serde_json::from_slice(&o.stdout).expect("points json")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(s) = self.src_serve.take() {
            s.stop();
        }
        if let Some(s) = self.dst_serve.take() {
            s.stop();
        }
    }
}

/// Wait until `site`'s (old) primary says it was failed over; its status entry.
fn wait_failed_over(site: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(site);
        if st["machines"][0]["state"] == "failed-over" {
            return st["machines"][0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the old primary never learnt it was failed over: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A write to `img` is refused with EROFS (a fenced primary).
fn assert_refuses_writes(img: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    let e = f.write_all_at(b"x", 0).and_then(|()| f.sync_all());
    assert_eq!(
        e.expect_err("a fenced primary took a write").raw_os_error(),
        Some(libc::EROFS)
    );
}

#[test]
fn a_test_copy_is_writable_isolated_and_cleaned_up_while_replication_goes_on() {
    if !fuse_available("a_test_copy_is_writable_isolated") {
        return;
    }
    let p = Pair::new();
    let a = common::pattern(1, MIB as usize);
    write_at(&p.src_img(), 3 * MIB, &a);
    wait_shipped(&p.src);

    let o = failover(&p.dst, &["--test"]);
    assert!(o.status.success(), "test failover: {}", text(&o));
    let copy = p.dst_mnt().join("vm1-test/os.img");
    // At once, writable, the point's bytes.
    let seen = read_all(&copy);
    assert_eq!(seen.len() as u64, 16 * MIB);
    assert!(
        seen[3 * MIB as usize..4 * MIB as usize] == a[..],
        "test copy lacks the point's data"
    );
    let b = common::pattern(2, MIB as usize);
    write_at(&copy, 8 * MIB, &b);
    assert!(read_all(&copy)[8 * MIB as usize..9 * MIB as usize] == b[..]);
    let st = entry(&p.dst, "vm1-test", "test").expect("test copy in status");
    assert_eq!(st["state"], "test-failover", "{st}");

    // A second copy under another name, at once; a taken name is refused.
    let o = failover(&p.dst, &["--test", "--as", "vm1-t2"]);
    assert!(o.status.success(), "second test copy: {}", text(&o));
    assert!(p.dst_mnt().join("vm1-t2/os.img").exists());
    let o = failover(&p.dst, &["--test"]);
    assert_eq!(o.status.code(), Some(1), "a taken name: {}", text(&o));

    // Replication goes on meanwhile; the copy's writes never reach the replica.
    let c = common::pattern(3, MIB as usize);
    write_at(&p.src_img(), 10 * MIB, &c);
    wait_shipped(&p.src);
    let restored = p._tmp.path().join("restored");
    let o = out(replog()
        .arg("restore")
        .arg(&p.dst)
        .arg("vm1")
        .args(["--at", "latest", "--out"])
        .arg(&restored)
        .arg("--json"));
    assert!(o.status.success(), "restore: {}", text(&o));
    let r = read_all(&restored.join("os.img"));
    assert!(
        r[10 * MIB as usize..11 * MIB as usize] == c[..],
        "replication stopped"
    );
    assert!(
        r[8 * MIB as usize..9 * MIB as usize]
            .iter()
            .all(|&x| x == 0),
        "the test copy's write reached the replica"
    );
    // The copy still shows its own point, not the newer one.
    assert!(read_all(&copy)[10 * MIB as usize..11 * MIB as usize]
        .iter()
        .all(|&x| x == 0));

    // Cleanup: gone from the mount and the site, the note in the job.
    let o = failover(&p.dst, &["--cleanup-test", "--note", "boot checked"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));
    assert!(!copy.exists(), "the test copy is still under the mount");
    assert!(!p.dst.join("machines/vm1-test").exists());
    let o = failover(&p.dst, &["--cleanup-test", "--as", "vm1-t2"]);
    assert!(o.status.success(), "cleanup 2: {}", text(&o));
    let jobs = out(replog().arg("jobs").arg(&p.dst).arg("--json"));
    let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).expect("jobs");
    assert!(
        jobs["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .any(|j| j["kind"] == "cleanup-test"
                && j["state"] == "succeeded"
                && j.to_string().contains("boot checked")),
        "no succeeded cleanup job with the note: {jobs}"
    );
    assert!(jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["kind"] == "failover-test" && j["state"] == "succeeded"));
    // The replica goes on being a replica.
    assert!(entry(&p.dst, "vm1", "replica").is_some());
}

#[test]
fn unplanned_failover_change_point_commit_and_the_old_primary_learns_it_is_fenced() {
    if !fuse_available("unplanned_failover_change_point_commit") {
        return;
    }
    let mut p = Pair::new();
    let a = common::pattern(11, MIB as usize);
    write_at(&p.src_img(), 0, &a);
    let cp = out(replog()
        .arg("checkpoint")
        .arg(&p.src)
        .arg("vm1")
        .args(["--app-consistent", "--json"]));
    assert!(cp.status.success(), "checkpoint: {}", text(&cp));
    let p1: serde_json::Value = serde_json::from_slice(&cp.stdout).expect("checkpoint json");
    let p1 = p1["id"].as_str().expect("point id").to_string();
    let b = common::pattern(12, MIB as usize);
    write_at(&p.src_img(), 0, &b);
    wait_shipped(&p.src);
    let final_src = read_all(&p.src_img());
    // The source is lost.
    p.src_serve.take().expect("src").kill();

    let o = failover(&p.dst, &["--at", &p1]);
    assert!(o.status.success(), "unplanned failover: {}", text(&o));
    let img = p.dst_mnt().join("vm1/os.img");
    assert!(
        read_all(&img)[..MIB as usize] == a[..],
        "not the state at {p1}"
    );
    let st = entry(&p.dst, "vm1", "primary").expect("promoted in status");
    assert_eq!(st["state"], "commit-pending", "{st}");
    assert_eq!(st["generation"], 2, "{st}");
    // A write, then a change of point: it is dropped, and the command says so.
    write_at(&img, 5 * MIB, &common::pattern(13, MIB as usize));
    let o = failover(&p.dst, &["--change-point", "latest"]);
    assert!(o.status.success(), "change point: {}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{MIB} bytes written since the failover were dropped"
        )),
        "{}",
        text(&o)
    );
    assert!(read_all(&img) == final_src, "not the source's latest state");
    // Still commit-pending; a cancel of the unplanned failover would be allowed, a
    // second failover is refused.
    assert_eq!(failover(&p.dst, &[]).status.code(), Some(1));

    let o = out(replog().arg("commit").arg(&p.dst).arg("vm1"));
    assert!(o.status.success(), "commit: {}", text(&o));
    let st = entry(&p.dst, "vm1", "primary").expect("primary");
    assert_eq!(st["state"], "unprotected", "{st}");
    assert!(
        entry(&p.dst, "vm1", "replica").is_none(),
        "the replica is still listed"
    );
    assert!(read_all(&img) == final_src, "commit changed the disk");
    let c = common::pattern(14, MIB as usize);
    write_at(&img, 7 * MIB, &c);
    assert!(read_all(&img)[7 * MIB as usize..8 * MIB as usize] == c[..]);
    assert!(!p.dst.join("machines/vm1/fold").exists());
    assert!(
        p.dst.join("machines/vm1/disks/os.img").exists(),
        "not folded"
    );
    // Commit again: nothing pending.
    assert_eq!(
        out(replog().arg("commit").arg(&p.dst).arg("vm1"))
            .status
            .code(),
        Some(1)
    );

    // The old primary comes back: at its first contact it learns it was failed over,
    // refuses writes, and changes nothing at the new primary.
    let before = read_all(&img);
    let tmp = p._tmp.path().to_path_buf();
    let back = Served::start(&p.src, &tmp.join("src-mnt"), &[]);
    let st = wait_failed_over(&p.src);
    assert!(
        st["reason"].as_str().unwrap_or("").contains("fenced"),
        "{st}"
    );
    assert_refuses_writes(&back.disk("os"));
    assert!(
        read_all(&img) == before,
        "the old primary changed the new one"
    );
    back.stop();
    // After a restart it is still fenced (persisted), with no loops.
    let again = Served::start(&p.src, &tmp.join("src-mnt"), &[]);
    let st = fresh_status(&p.src);
    assert_eq!(st["machines"][0]["state"], "failed-over", "{st}");
    again.stop();
}

#[test]
fn an_old_primary_still_running_through_a_commit_is_fenced_and_brings_no_replica_back() {
    if !fuse_available("an_old_primary_still_running_through_a_commit") {
        return;
    }
    let p = Pair::new();
    write_at(&p.src_img(), 0, &common::pattern(31, MIB as usize));
    wait_shipped(&p.src);
    // The source stays up, its session open and idle, through an unplanned failover
    // and its commit at the target (the fold removes the replica).
    let o = failover(&p.dst, &[]);
    assert!(o.status.success(), "failover: {}", text(&o));
    let o = out(replog().arg("commit").arg(&p.dst).arg("vm1"));
    assert!(o.status.success(), "commit: {}", text(&o));
    assert!(!p.dst.join("replicas/vm1").exists(), "the replica stayed");
    let img = p.dst_mnt().join("vm1/os.img");
    let before = read_all(&img);
    // It learns it was failed over (its session is told) and takes no more writes;
    // nothing of the removed replica comes back at the target.
    wait_failed_over(&p.src);
    assert_refuses_writes(&p.src_img());
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !p.dst.join("replicas/vm1").exists(),
        "a segment of the old primary was stored where the replica was"
    );
    assert!(
        entry(&p.dst, "vm1", "replica").is_none(),
        "a replica is listed again"
    );
    assert!(
        read_all(&img) == before,
        "the old primary changed the new one"
    );
}

#[test]
fn an_unplanned_failover_can_be_cancelled_and_replication_resumes() {
    if !fuse_available("an_unplanned_failover_can_be_cancelled") {
        return;
    }
    let mut p = Pair::new();
    write_at(&p.src_img(), MIB, &common::pattern(21, MIB as usize));
    wait_shipped(&p.src);
    p.src_serve.take().expect("src").stop();
    let o = failover(&p.dst, &[]);
    assert!(o.status.success(), "failover: {}", text(&o));
    write_at(&p.dst_mnt().join("vm1/os.img"), 0, b"written at the target");
    let o = failover(&p.dst, &["--cancel"]);
    assert!(o.status.success(), "cancel: {}", text(&o));
    assert!(
        !p.dst_mnt().join("vm1/os.img").exists(),
        "the promoted disk is still mounted"
    );
    assert!(!p.dst.join("machines/vm1").exists());
    assert_eq!(
        entry(&p.dst, "vm1", "replica").expect("replica")["generation"],
        1
    );
    // The primary comes back and replicates again.
    let tmp = p._tmp.path().to_path_buf();
    p.src_serve = Some(Served::start(&p.src, &tmp.join("src-mnt"), &[]));
    let c = common::pattern(22, MIB as usize);
    write_at(&p.src_img(), 4 * MIB, &c);
    wait_shipped(&p.src);
    assert!(p.points()["points"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
}

#[test]
fn a_planned_failover_loses_nothing_and_fences_the_old_primary() {
    if !fuse_available("a_planned_failover_loses_nothing") {
        return;
    }
    let p = Pair::new();
    // Written, fsynced, some of it shipped (so the target holds a segment past its
    // parent to read ahead when the failover begins) and some not shipped yet when
    // the failover starts. (6 MiB of the 16 MiB disk: 8 MiB unshipped under load
    // reached the resync threshold, 50%, and the failover was refused — rightly.)
    for i in 0..6u64 {
        write_at(
            &p.src_img(),
            i * 2 * MIB,
            &common::pattern(30 + i, MIB as usize),
        );
        if i == 2 {
            wait_shipped(&p.src);
        }
    }
    let final_src = read_all(&p.src_img());
    // The primary's serve ships and merges vm1 (its threads, by name)…
    let pid = p.src_serve.as_ref().expect("src serve").pid();
    let loops = ["ship-vm1", "compactor-vm1"];
    let before = threads(pid);
    assert!(
        loops.iter().all(|l| before.iter().any(|t| t == l)),
        "{before:?}"
    );
    let o = out(replog()
        .arg("failover")
        .arg(&p.src)
        .arg("vm1")
        .arg("--planned"));
    assert!(o.status.success(), "planned failover: {}", text(&o));
    // …and no longer once it failed over (stopped in place, the machine still open).
    let after = threads(pid);
    assert!(
        loops.iter().all(|l| !after.iter().any(|t| t == l)),
        "{after:?}"
    );
    // The old primary refuses writes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.src_img())
        .expect("open");
    let e = f.write_all_at(b"late", 0).and_then(|()| f.sync_all());
    assert_eq!(
        e.expect_err("write after failover").raw_os_error(),
        Some(libc::EROFS)
    );
    let st = fresh_status(&p.src);
    assert_eq!(st["machines"][0]["state"], "failed-over", "{st}");
    // Where it went: the target's site ID, generation 2.
    let dst_id = run_ok(replog().arg("id").arg(&p.dst)).trim().to_string();
    let to = &st["machines"][0]["failed_over_to"];
    assert_eq!(to["site"], dst_id.as_str(), "{st}");
    assert_eq!(to["generation"], 2, "{st}");
    assert_eq!(st["machines"][0]["target"], p.addr.as_str(), "{st}");
    // The target has it, byte for byte, writable, commit pending, generation 2.
    let img = p.dst_mnt().join("vm1/os.img");
    assert!(
        read_all(&img) == final_src,
        "the promoted disk differs from the source"
    );
    let st = entry(&p.dst, "vm1", "primary").expect("promoted");
    assert_eq!(st["state"], "commit-pending", "{st}");
    assert_eq!(st["generation"], 2, "{st}");
    write_at(&img, 0, b"the new primary writes");
    // A planned failover cannot be cancelled; it is committed.
    assert_eq!(failover(&p.dst, &["--cancel"]).status.code(), Some(1));
    let o = out(replog().arg("commit").arg(&p.dst).arg("vm1"));
    assert!(o.status.success(), "commit: {}", text(&o));
    assert!(read_all(&img).starts_with(b"the new primary writes"));
    // Both jobs succeeded, at both sites; the target read the replica's segments
    // ahead of its check, told by the primary as the failover began (PromoteSoon).
    for site in [&p.src, &p.dst] {
        let jobs = out(replog().arg("jobs").arg(site).arg("--json"));
        let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).expect("jobs");
        let job = jobs["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["kind"] == "failover-planned" && j["state"] == "succeeded")
            .unwrap_or_else(|| panic!("no planned failover job at {}: {jobs}", site.display()))
            .clone();
        if site == &p.dst {
            let check = job["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .find(|s| s["name"] == "verify the point's digests")
                .unwrap_or_else(|| panic!("no check: {job}"))
                .clone();
            // "…; N bytes of segments read ahead while the last ones shipped": the
            // segment stored before the failover was queued when it began, and the
            // check waits for what is queued.
            let detail = check["detail"].as_str().unwrap_or_default();
            let ahead: u64 = detail
                .split("; ")
                .nth(1)
                .and_then(|t| {
                    t.strip_suffix(" bytes of segments read ahead while the last ones shipped)")
                })
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no read-ahead: {check}"));
            assert!(ahead >= MIB, "{check}");
        }
    }
    // A second planned failover of the failed-over machine is refused.
    let o = out(replog()
        .arg("failover")
        .arg(&p.src)
        .arg("vm1")
        .arg("--planned"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn bad_failover_requests_are_refused_and_change_nothing() {
    if !fuse_available("bad_failover_requests_are_refused") {
        return;
    }
    let p = Pair::new();
    let listing = |site: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(site.join("machines"))
            .expect("machines")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (src_before, dst_before) = (listing(&p.src), listing(&p.dst));
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&p.dst, vec!["nosuch"], "no replica"),
        (&p.dst, vec!["vm1", "--planned"], "runs at its primary"),
        (&p.src, vec!["vm1", "--test"], "no replica"),
        (&p.src, vec!["vm1"], "no replica"),
        (&p.dst, vec!["vm1", "--test", "--as", "../x"], "test copy"),
        (&p.dst, vec!["vm1", "--test", "--as", "a/b"], "test copy"),
        (
            &p.dst,
            vec!["vm1", "--at", "pt-999999999"],
            "not a recovery point",
        ),
        (&p.dst, vec!["vm1", "--at", "yesterday-ish"], "--at"),
        (
            &p.dst,
            vec!["vm1", "--change-point", "latest"],
            "no failover pending",
        ),
        (&p.dst, vec!["vm1", "--cancel"], "nothing to cancel"),
        (&p.dst, vec!["vm1", "--cleanup-test"], "no machine"),
    ];
    for (site, args, says) in &cases {
        let o = out(replog().arg("failover").arg(site).args(args));
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(says),
            "{args:?} should say {says:?}: {}",
            text(&o)
        );
    }
    // Usage errors: exit 2.
    for args in [
        vec!["vm1", "--planned", "--test"],
        vec!["vm1", "--cancel", "--at", "latest"],
        vec!["vm1", "--note", "x"],
    ] {
        let o = out(replog().arg("failover").arg(&p.dst).args(&args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
    let o = out(replog().arg("commit").arg(&p.dst).arg("vm1"));
    assert_eq!(
        o.status.code(),
        Some(1),
        "commit with nothing pending: {}",
        text(&o)
    );
    assert!(text(&o).contains("no failover pending"), "{}", text(&o));
    assert_eq!(listing(&p.src), src_before);
    assert_eq!(listing(&p.dst), dst_before);
    assert!(entry(&p.dst, "vm1", "replica").is_some());
    // The source is still protected and replicating.
    write_at(&p.src_img(), 0, b"still replicating");
    wait_shipped(&p.src);
    let _ = &p.addr;
}

#[test]
fn shutdown_source_has_the_primary_ship_everything_then_promotes_with_zero_loss() {
    if !fuse_available("shutdown_source_has_the_primary_ship_everything") {
        return;
    }
    let p = Pair::new();
    for i in 0..6u64 {
        write_at(
            &p.src_img(),
            i * 2 * MIB,
            &common::pattern(50 + i, MIB as usize),
        );
    }
    let final_src = read_all(&p.src_img());
    let o = failover(
        &p.dst,
        &["--shutdown-source", "--shutdown-timeout", "60", "--json"],
    );
    assert!(
        o.status.success(),
        "failover --shutdown-source: {}",
        text(&o)
    );
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let detail = reply["detail"].as_str().unwrap_or("");
    assert!(detail.contains("nothing lost"), "{reply}");
    // The primary shut down: fenced, its job records who asked. It learns of the
    // promotion from the target's reply and reopens the machine fenced, a moment
    // after the target's command returned.
    wait_for(&p.src, "failed over", |m| m["state"] == "failed-over");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(p.src_img())
        .and_then(|f| f.write_all_at(b"x", 0).and_then(|()| f.sync_all()));
    assert_eq!(
        e.expect_err("the shut-down primary took a write")
            .raw_os_error(),
        Some(libc::EROFS)
    );
    let jobs = out(replog().arg("jobs").arg(&p.src).arg("--json"));
    let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).expect("jobs json");
    assert!(
        jobs.to_string().contains("shutdown-source"),
        "the primary's job does not say who asked: {jobs}"
    );
    // Promoted at the newest LSN: every byte written at the primary is there.
    let promoted = p.dst_mnt().join("vm1/os.img");
    assert!(read_all(&promoted) == final_src, "lost writes");
    let st = entry(&p.dst, "vm1", "primary").expect("promoted");
    assert_eq!(st["state"], "commit-pending", "{st}");
}

#[test]
fn shutdown_source_with_the_primary_gone_promotes_at_the_newest_point_and_says_so() {
    if !fuse_available("shutdown_source_with_the_primary_gone") {
        return;
    }
    let mut p = Pair::new();
    write_at(&p.src_img(), 0, &common::pattern(60, MIB as usize));
    wait_shipped(&p.src);
    let shipped = read_all(&p.src_img());
    p.src_serve.take().expect("src").kill();
    let started = Instant::now();
    let o = failover(&p.dst, &["--shutdown-source", "--shutdown-timeout", "2"]);
    assert!(o.status.success(), "failover: {}", text(&o));
    assert!(
        text(&o).contains("did not contact this site within 2 s"),
        "{}",
        text(&o)
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(read_all(&p.dst_mnt().join("vm1/os.img")) == shipped);
    // Offline, the target cannot ask: refused, nothing changed.
    let mut q = Pair::new();
    q.dst_serve.take().expect("dst").stop();
    let o = failover(&q.dst, &["--shutdown-source"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("needs this site's"), "{}", text(&o));
    let o = out(replog().arg("points").arg(&q.dst).arg("vm1"));
    assert!(o.status.success(), "still a replica: {}", text(&o));
}

/// On machine disk `img` (a test copy or a promoted machine, under a target's
/// mount): ext4 put there by the source is clean and every file in `sums` intact; a
/// file written to it survives umount and e2fsck; then raw I/O as a VM issues it —
/// O_DIRECT writes and reads, a discard (punch hole) that reads back as zeroes, fsync.
fn use_like_a_vm(img: &Path, dir: &Path, sums: &Path, what: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    {
        let lo = Loop::attach(img);
        let fsck = sh("e2fsck", &["-fn", &lo.0]);
        assert!(fsck.status.success(), "{what}: e2fsck: {}", text(&fsck));
        let _m = FsMount::mount(&lo.0, dir, "rw");
        let check = std::process::Command::new("sha256sum")
            .args(["--quiet", "-c"])
            .arg(sums)
            .current_dir(dir)
            .output()
            .expect("sha256sum");
        assert!(check.status.success(), "{what}: files: {}", text(&check));
        std::fs::write(dir.join(format!("{what}.txt")), what).expect("write a file");
        drop(_m);
        let fsck = sh("e2fsck", &["-fn", &lo.0]);
        assert!(
            fsck.status.success(),
            "{what}: e2fsck after writes: {}",
            text(&fsck)
        );
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(img)
        .expect("open O_DIRECT");
    let mut raw = vec![0u8; 2 * 4096 + 65536];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + 65536];
    buf.copy_from_slice(&common::pattern(77, 65536));
    let want = buf.to_vec();
    f.write_all_at(buf, 2 * MIB).expect("O_DIRECT write");
    buf.fill(0);
    f.read_exact_at(buf, 2 * MIB).expect("O_DIRECT read");
    assert!(buf[..] == want[..], "{what}: O_DIRECT read back differs");
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (2 * MIB + 4096) as i64,
            8192,
        )
    };
    assert_eq!(
        rc,
        0,
        "{what}: discard: {}",
        std::io::Error::last_os_error()
    );
    f.sync_all().expect("fsync");
    f.read_exact_at(buf, 2 * MIB).expect("read after discard");
    assert!(
        buf[..4096] == want[..4096],
        "{what}: discard reached too far"
    );
    assert!(
        buf[4096..12288].iter().all(|&b| b == 0),
        "{what}: not discarded"
    );
    assert!(
        buf[12288..] == want[12288..],
        "{what}: discard reached too far"
    );
}

#[test]
fn a_test_copy_and_a_promoted_machine_hold_the_sources_ext4_and_take_direct_io_and_discard() {
    if !fuse_available("a_test_copy_and_a_promoted_machine_hold_the_sources_ext4") {
        return;
    }
    let mut p = Pair::new();
    let tmp = p._tmp.path().to_path_buf();
    let (fs_dir, sums) = (tmp.join("fs"), tmp.join("files.sha256"));
    {
        let lo = Loop::attach(&p.src_img());
        let mk = sh("mkfs.ext4", &["-q", "-F", &lo.0]);
        assert!(mk.status.success(), "mkfs: {}", text(&mk));
        let m = FsMount::mount(&lo.0, &fs_dir, "rw");
        for i in 0..6u64 {
            std::fs::write(
                fs_dir.join(format!("f{i}.bin")),
                common::pattern(200 + i, (300 + 97 * i as usize) << 10),
            )
            .expect("file");
        }
        let s = std::process::Command::new("sh")
            .args(["-c", "sha256sum f*.bin"])
            .current_dir(&fs_dir)
            .output()
            .expect("sha256sum");
        std::fs::write(&sums, &s.stdout).expect("sums");
        drop(m);
    }
    wait_shipped(&p.src);

    let o = failover(&p.dst, &["--test"]);
    assert!(o.status.success(), "test failover: {}", text(&o));
    use_like_a_vm(
        &p.dst_mnt().join("vm1-test/os.img"),
        &fs_dir,
        &sums,
        "test-copy",
    );
    let o = failover(&p.dst, &["--cleanup-test"]);
    assert!(o.status.success(), "cleanup: {}", text(&o));

    p.src_serve.take().expect("src").kill();
    let o = failover(&p.dst, &[]);
    assert!(o.status.success(), "failover: {}", text(&o));
    let img = p.dst_mnt().join("vm1/os.img");
    {
        // What the test copy wrote never reached the replica the machine stands on.
        let lo = Loop::attach(&img);
        let _m = FsMount::mount(&lo.0, &fs_dir, "ro,noload");
        assert!(
            fs_dir.join("f0.bin").exists() && !fs_dir.join("test-copy.txt").exists(),
            "a test copy's write leaked into the replica"
        );
    }
    use_like_a_vm(&img, &fs_dir, &sums, "promoted");
}
