//! Faults on the wire in every phase (issue 17): both serves (and the commands that
//! open sessions themselves) run with `REPLOG_WIRE_FAULTS`, so frames each way are
//! dropped, delayed, sent twice, cut short, held back behind the next, flipped, or the
//! connection is cut (`src/replication/wire_fault.rs`) — inside TLS, where replog's
//! own checks must catch them. During initial replication, delta shipping, a resync, a
//! planned failover and the reprotect back: nothing wrong is applied (each phase ends
//! with the replica byte-equal to the source, restored), every phase resumes and
//! converges once the faults stop, and health said what happened meanwhile.

mod common;

use common::serve::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK: u64 = 64 << 20;
const BLOCK: u64 = 4096;

/// The fault spec file both serves read at each session.
struct Faults(PathBuf);

impl Faults {
    fn on(&self, seed: u64, every: u64) {
        std::fs::write(&self.0, format!("seed={seed} every={every}\n")).expect("faults on");
    }
    fn off(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `count` distinct random blocks written through `img` (fsynced), into `model` too.
fn scatter(img: &Path, seed: u64, count: usize, model: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % (DISK / BLOCK);
        let data = common::pattern(seed * 1_000_000 + i as u64, BLOCK as usize);
        std::os::unix::fs::FileExt::write_all_at(&f, &data, b * BLOCK).expect("write");
        let at = (b * BLOCK) as usize;
        model[at..at + BLOCK as usize].copy_from_slice(&data);
    }
    f.sync_all().expect("fsync");
}

/// The faults logged so far by every serve under `root`.
fn faults_logged(logs: &[&Path]) -> usize {
    logs.iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .matches("wire fault:")
                .count()
        })
        .sum()
}

fn wait_faults(logs: &[&Path], more_than: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while faults_logged(logs) <= more_than {
        if Instant::now() > deadline {
            let tails: Vec<String> = logs
                .iter()
                .map(|l| {
                    let t = std::fs::read_to_string(l).unwrap_or_default();
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                })
                .collect();
            panic!(
                "{what}: {} faults injected, not more than {more_than}, in 60 s; logs:\n{}",
                faults_logged(logs),
                tails.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes go on through `img` (100 blocks at a time, seeds from `seed`) until more than
/// two faults were injected after `before`.
fn write_until_faults(
    img: &Path,
    seed: u64,
    model: &mut [u8],
    logs: &[&Path],
    before: usize,
    what: &str,
) {
    for s in seed..seed + 30 {
        scatter(img, s, 100, model);
        if faults_logged(logs) > before + 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_faults(logs, before + 2, what);
}

/// Polls `replog status SITE --json` until stopped; keeps every (health, reason) of
/// machine 0 that is not healthy.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(String, String)>>>,
}

impl Watcher {
    fn start(site: &Path) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, site) = (stop.clone(), site.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Acquire) {
                let st = status(&site);
                let m = &st["machines"][0];
                let health = m["health"].as_str().unwrap_or("").to_string();
                if health != "healthy" {
                    let reason = m["reason"].as_str().unwrap_or("").to_string();
                    if !seen.contains(&(health.clone(), reason.clone())) {
                        seen.push((health, reason));
                    }
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            seen
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Health must have said, with the reason, that a session failed and when it
    /// would be retried.
    fn said_something(mut self, what: &str) {
        self.stop.store(true, Ordering::Release);
        let seen = self
            .thread
            .take()
            .map(|t| t.join().expect("watcher"))
            .unwrap_or_default();
        assert!(
            seen.iter().any(|(_, r)| r.contains("retry")),
            "{what}: health never said a session failed and would be retried: {seen:?}"
        );
    }
}

/// The faults stop; shipping from `src` catches up, health said what failed, and
/// `dst`'s replica restores equal to `model`.
fn settle(
    faults: &Faults,
    w: Watcher,
    src: &Path,
    dst: &Path,
    scratch: &Path,
    model: &[u8],
    what: &str,
) {
    faults.off();
    wait_caught_up(src, &format!("{what} after the faults"));
    w.said_something(what);
    replica_equals(dst, scratch, model, what);
}

/// Restore the newest point of vm1 at `site` and compare its disk with `want`.
fn replica_equals(site: &Path, scratch: &Path, want: &[u8], what: &str) {
    let _ = std::fs::remove_dir_all(scratch);
    run_ok(
        replog()
            .arg("restore")
            .arg(site)
            .arg("vm1")
            .args(["--at", "latest", "--out"])
            .arg(scratch),
    );
    let got = read_all(&scratch.join("os.img"));
    assert!(got == want, "{what}: the replica differs from the source");
    std::fs::remove_dir_all(scratch).expect("clean");
}

/// Run `cmd` (with the faults) until it succeeds; after `with_faults` failures the
/// faults stop. Every failure must say why. Returns the faults the command's own
/// sessions logged.
fn until_ok(
    faults: &Faults,
    with_faults: usize,
    what: &str,
    mut cmd: impl FnMut() -> std::process::Command,
) -> usize {
    let mut injected = 0;
    for attempt in 0.. {
        if attempt == with_faults {
            faults.off();
        }
        let o = cmd().output().expect("run replog");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        injected += text.matches("wire fault:").count();
        if o.status.success() {
            return injected;
        }
        assert!(!text.trim().is_empty(), "{what}: failed without saying why");
        assert!(attempt < with_faults + 5, "{what}: never succeeded: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
    unreachable!()
}

#[test]
fn every_phase_survives_faults_on_the_wire_and_converges() {
    if !fuse_available("every_phase_survives_faults_on_the_wire_and_converges") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (a, b, addr_b) = two_sites(tmp.path(), "64M");
    // Retry after a second: long enough for status (rewritten four times a second) to
    // show each failure.
    for site in [&a, &b] {
        edit_config(site, |cfg| {
            cfg.replication.seal_interval_ms = 200;
            cfg.replication.retry_schedule_ms = vec![1000];
            cfg.replication.retry_then_ms = 1000;
        });
    }
    let addr_a = format!("127.0.0.1:{}", free_port());
    let faults = Faults(tmp.path().join("wire-faults"));
    let spec = faults.0.to_str().expect("path").to_string();
    let env = [("REPLOG_WIRE_FAULTS", spec.as_str())];
    let scratch = tmp.path().join("restored");
    let sb = Served::start_with_env(&b, &tmp.path().join("b-mnt"), &["--listen", &addr_b], &env);
    let sa = Served::start_with_env(&a, &tmp.path().join("a-mnt"), &["--listen", &addr_a], &env);
    let logs = [sa.log.as_path(), sb.log.as_path()];
    let img_a = sa.disk("os");
    let mut model = vec![0u8; DISK as usize];
    scatter(&img_a, 1, 4000, &mut model);

    // 1. Initial replication.
    faults.on(1, 6);
    let w = Watcher::start(&a);
    protect_when_listening(&a, &addr_b);
    wait_faults(&logs, 2, "initial replication");
    settle(&faults, w, &a, &b, &scratch, &model, "initial replication");

    // 2. Delta shipping, writes going on.
    let before = faults_logged(&logs);
    faults.on(2, 6);
    let w = Watcher::start(&a);
    write_until_faults(&img_a, 10, &mut model, &logs, before, "delta shipping");
    settle(&faults, w, &a, &b, &scratch, &model, "delta shipping");

    // 3. A resync.
    let before = faults_logged(&logs);
    faults.on(3, 3);
    let w = Watcher::start(&a);
    run_ok(replog().arg("resync").arg(&a).arg("vm1").arg("--now"));
    wait_faults(&logs, before + 2, "resync");
    settle(&faults, w, &a, &b, &scratch, &model, "resync");

    // 4. A planned failover from the primary; then commit at the target.
    scatter(&img_a, 50, 300, &mut model);
    let before = faults_logged(&logs);
    faults.on(4, 2);
    let by_cli = until_ok(&faults, 2, "planned failover", || {
        let mut c = replog();
        c.arg("failover")
            .arg(&a)
            .arg("vm1")
            .arg("--planned")
            .env("REPLOG_WIRE_FAULTS", &spec);
        c
    });
    faults.off();
    assert!(
        faults_logged(&logs) + by_cli > before,
        "planned failover: no fault injected"
    );
    wait_for(&a, "the old primary fenced", |m| {
        m["state"] == "failed-over"
    });
    run_ok(replog().arg("commit").arg(&b).arg("vm1"));
    let img_b = sb.disk("os");
    assert!(
        read_all(&img_b) == model,
        "the promoted machine is not the primary's last state"
    );

    // 5. The reprotect back, toward the old primary; the new primary writes on.
    let before = faults_logged(&logs);
    faults.on(5, 2);
    let by_cli = until_ok(&faults, 3, "reprotect", || {
        let mut c = replog();
        c.arg("reprotect")
            .arg(&b)
            .arg("vm1")
            .args(["--target", &addr_a])
            .env("REPLOG_WIRE_FAULTS", &spec);
        c
    });
    assert!(
        faults_logged(&logs) + by_cli > before,
        "reprotect: no fault injected"
    );
    let before = faults_logged(&logs);
    faults.on(6, 4);
    let w = Watcher::start(&b);
    write_until_faults(&img_b, 60, &mut model, &logs, before, "after the reprotect");
    faults.off();
    wait_shipped(&b);
    w.said_something("shipping after the reprotect");
    replica_equals(&a, &scratch, &model, "after the reprotect");
    let refused = std::fs::read_to_string(sb.log.as_path()).unwrap_or_default()
        + &std::fs::read_to_string(sa.log.as_path()).unwrap_or_default();
    assert!(
        refused.contains("closed ("),
        "no session was ever refused: the faults reached nothing that checks"
    );
}
