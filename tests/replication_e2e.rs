//! End to end, as an operator does it: two sites on 127.0.0.1 trust each other, the
//! target listens, the source serves its disks over FUSE, `replog protect`, writes
//! through the mount during and after initial replication, wait for lag 0 in
//! `replog status --json`, `replog restore --at latest` at the target: byte-equal.

mod common;

use common::serve::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

#[test]
fn protect_replicate_and_restore_latest_byte_equal() {
    if !fuse_available("protect_replicate_and_restore_latest_byte_equal") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst) = trusted_sites(tmp.path());
    let id_src = run_ok(replog().arg("id").arg(&src)).trim().to_string();
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/os", "--size", "32M"]),
    );
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/data", "--size", "8M"]),
    );
    // Data in the parents before protection (imported), so initial replication has work.
    let raw = tmp.path().join("raw");
    std::fs::write(&raw, common::pattern(9, 3 << 20)).expect("raw");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _target = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    let data = open_disk(&served, "data");
    write_synced(&os, 1, 5 << 20, 1 << 20);

    protect_when_listening(&src, &addr);
    // Protecting twice is refused.
    let out = replog()
        .arg("protect")
        .arg(&src)
        .arg("vm1")
        .args(["--target", &addr])
        .output()
        .expect("protect");
    assert_eq!(out.status.code(), Some(1));

    // Writes during initial replication and after it.
    for i in 0..20u64 {
        data.write_all_at(&common::pattern(100 + i, 70_001), i * 300_000 + 11)
            .expect("write");
        os.write_all_at(&common::pattern(200 + i, 4096), (i * 997 % 8000) * 4096)
            .expect("write");
        if i % 5 == 0 {
            data.sync_all().expect("fsync");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    os.sync_all().expect("fsync");
    data.sync_all().expect("fsync");

    // Wait for protected, healthy, lag 0 — in a status taken after the last fsync.
    let st = wait_for(&src, "caught up", |m| {
        m["state"] == "protected" && m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    assert_eq!(st["machines"][0]["target"], addr.as_str());
    assert_eq!(st["machines"][0]["role"], "primary");
    assert_eq!(st["machines"][0]["generation"], 1);
    let acked = st["machines"][0]["acked_lsn"].as_u64().expect("acked");

    // The target lists its replica: role replica, generation, the newest point (the
    // source's acknowledged end), a lag, the source.
    let id_src_json = serde_json::Value::from(id_src.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let replica = loop {
        let t = status(&dst);
        let r = t["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["role"] == "replica").cloned());
        if let Some(r) = r.filter(|r| r["last_point"]["lsn"].as_u64() >= Some(acked)) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no replica in {t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(replica["name"], "vm1");
    assert_eq!(replica["state"], "protected");
    assert_eq!(replica["health"], "healthy", "{replica}");
    assert_eq!(replica["generation"], 1);
    assert_eq!(replica["source"], id_src_json);
    assert!(replica["lag_seconds"].as_f64().is_some(), "{replica}");

    // Restore at the target while it runs; compare with the source through the mount.
    let out_dir = tmp.path().join("restored");
    let out = run_ok(
        replog()
            .arg("restore")
            .arg(&dst)
            .arg("vm1")
            .args(["--at", "latest", "--out"])
            .arg(&out_dir)
            .arg("--json"),
    );
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("restore json");
    assert!(doc["lsn"].as_u64().unwrap_or(0) > 0);
    for (name, f, size) in [("os", &os, 32usize << 20), ("data", &data, 8 << 20)] {
        let mut want = vec![0u8; size];
        f.read_exact_at(&mut want, 0).expect("read source");
        let got = std::fs::read(out_dir.join(format!("{name}.img"))).expect("restored");
        assert!(got == want, "restored {name} differs from the source");
    }
    // At rest the target holds no plaintext of the data.
    let needle = &common::pattern(1, 5 << 20)[..64];
    for e in walk(&dst.join("replicas")) {
        let bytes = std::fs::read(&e).expect("read");
        assert!(
            !bytes.windows(64).any(|w| w == needle),
            "plaintext at rest in {}",
            e.display()
        );
    }
    drop(os);
    drop(data);
    assert!(served.stop().success());
}

/// `replog jobs SITE --json`: the jobs, newest first.
fn jobs(site: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(replog().arg("jobs").arg(site).arg("--json"));
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("jobs json");
    doc["jobs"].as_array().cloned().unwrap_or_default()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Two trusted sites with machine vm1 (one 16 MiB disk) at the source; returns
/// (src, dst, addr).
fn pair(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    two_sites(tmp, "16M")
}

/// kill -9 the target in the middle of delta shipping: the source goes to Warning and
/// retries on the (scaled) schedule; the target comes back; the source converges with
/// no gap and no duplicate, and the replica restores byte-equal.
#[test]
fn target_killed_mid_shipping_then_back_converges() {
    if !fuse_available("target_killed_mid_shipping_then_back_converges") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let t = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    protect_vm1(&src, &addr);
    let os = open_disk(&served, "os");
    write_synced(&os, 1, 1 << 20, 0);
    wait_caught_up(&src, "protected");

    // Kill the target hard while writes keep coming.
    t.kill9();
    for i in 0..10u64 {
        write_synced(&os, 10 + i, 100_000, 2_000_000 + i * 150_000);
    }
    let st = wait_for(&src, "warning", |m| m["health"] == "warning");
    assert!(
        st["machines"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("retry"),
        "warning without a retry: {st}"
    );
    let _t = TargetServe::start(&dst, &addr);
    wait_for(&src, "healthy again", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });

    // Now kill -9 the source while it ships, and bring it back.
    write_synced(&os, 50, 3 << 20, 8_000_000);
    drop(os);
    served.kill();
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    os.write_all_at(b"after the source came back", 12_000_000)
        .expect("write");
    os.sync_all().expect("fsync");
    wait_for(&src, "healthy after the source restart", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });

    restore_and_compare(&dst, &tmp.path().join("restored"), &[("os", &os)]);
    drop(os);
    assert!(served.stop().success());
}

/// The target stops trusting the source: the next connection is refused in the
/// handshake, and the source's machine goes Critical with the reason.
#[test]
fn untrusted_source_goes_critical_with_the_reason() {
    if !fuse_available("untrusted_source_goes_critical_with_the_reason") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let _t = TargetServe::start(&dst, &addr);
    protect_vm1(&src, &addr);
    // The target forgets the source before the source's serve connects.
    std::fs::write(
        dst.join("trusted-peers"),
        "# replog trusted peers, format 1\n",
    )
    .expect("untrust");
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let reason = critical_reason(&src);
    assert!(
        reason.contains("TLS") || reason.contains("certificate"),
        "reason: {reason}"
    );
    assert!(
        !dst.join("replicas/vm1").exists(),
        "the untrusted source's data reached the target"
    );
    assert!(served.stop().success());
}

/// `replog protect` checks its prerequisites, each with a clear error, and records
/// nothing when one fails.
#[test]
fn protect_prerequisites_are_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let fail = |args: &[&str], what: &str| {
        let out = replog()
            .arg("protect")
            .arg(&src)
            .args(args)
            .output()
            .expect("protect");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(what), "{args:?}: {err}");
        assert!(
            !src.join("machines/vm1/relationship.toml").exists(),
            "{args:?} recorded a relationship"
        );
    };
    fail(&["nope", "--target", &addr], "no machine");
    fail(&["vm1", "--target", &addr], "not reachable");
    let _t = TargetServe::start(&dst, &addr);
    std::fs::write(
        dst.join("trusted-peers"),
        "# replog trusted peers, format 1\n",
    )
    .expect("untrust");
    fail(&["vm1", "--target", &addr], "refused this site");
    let id_src = run_ok(replog().arg("id").arg(&src)).trim().to_string();
    run_ok(replog().arg("trust").arg(&dst).arg(&id_src));
    protect_vm1(&src, &addr);
    assert!(src.join("machines/vm1/relationship.toml").exists());
}

/// A TCP proxy between the sites that can cut every connection (and refuse new ones)
/// or flip one byte of the source's stream.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Milliseconds to hold every forwarded chunk (a slow, far link).
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Flip the byte at this offset of the next source→target connection.
    flip_at: Arc<Mutex<Option<u64>>>,
    flipped: Arc<AtomicBool>,
}

use parking_lot::Mutex;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

impl Proxy {
    fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let flip_at = Arc::new(Mutex::new(None));
        let flipped = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c, f, fl, d) = (
            cut.clone(),
            flip_at.clone(),
            flipped.clone(),
            delay_ms.clone(),
        );
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue;
                };
                // The flip goes to the first session that gets that far (a short
                // session with nothing to ship does not use it up).
                pump(
                    inbound.try_clone().expect("clone"),
                    outbound.try_clone().expect("clone"),
                    c.clone(),
                    Some(f.clone()),
                    fl.clone(),
                    d.clone(),
                );
                pump(outbound, inbound, c.clone(), None, fl.clone(), d.clone());
            }
        });
        Proxy {
            port,
            cut,
            delay_ms,
            flip_at,
            flipped,
        }
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: Arc<AtomicBool>,
    flip: Option<Arc<Mutex<Option<u64>>>>,
    flipped: Arc<AtomicBool>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) {
    std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut seen = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if cut.load(Ordering::SeqCst) {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(shared) = &flip {
                        let mut f = shared.lock();
                        if let Some(at) = *f {
                            if at >= seen && at < seen + n as u64 {
                                buf[(at - seen) as usize] ^= 0x01;
                                flipped.store(true, Ordering::SeqCst);
                                *f = None;
                            }
                        }
                    }
                    seen += n as u64;
                    let d = delay_ms.load(Ordering::SeqCst);
                    if d > 0 {
                        std::thread::sleep(Duration::from_millis(d));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Through a proxy: a cut makes the source Warning and retry, then Healthy again; a
/// flipped byte aborts the session with nothing applied, then replication recovers;
/// the replica ends byte-equal.
#[test]
fn cuts_and_flipped_bytes_are_retried_and_nothing_bad_is_applied() {
    if !fuse_available("cuts_and_flipped_bytes_are_retried_and_nothing_bad_is_applied") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let _t = TargetServe::start(&dst, &addr);
    let proxy = Proxy::start(addr.clone());
    let via = format!("127.0.0.1:{}", proxy.port);
    run_ok(
        replog()
            .arg("protect")
            .arg(&src)
            .arg("vm1")
            .args(["--target", &via]),
    );
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    write_synced(&os, 1, 1 << 20, 0);
    wait_caught_up(&src, "protected");

    // Cut: Warning with retries, then Healthy once the path is back.
    proxy.cut.store(true, Ordering::SeqCst);
    write_synced(&os, 2, 300_000, 3_000_000);
    let st = wait_for(&src, "warning", |m| m["health"] == "warning");
    assert!(
        st["machines"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("retry"),
        "{st}"
    );
    proxy.cut.store(false, Ordering::SeqCst);
    wait_for(&src, "healthy after the cut", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });

    // A slow link: everything still arrives, only later.
    proxy.delay_ms.store(30, Ordering::SeqCst);
    write_synced(&os, 4, 500_000, 9_000_000);
    wait_for(&src, "healthy over a slow link", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    proxy.delay_ms.store(0, Ordering::SeqCst);

    // Flip one byte well inside the next session that carries this much data.
    *proxy.flip_at.lock() = Some(200_000);
    write_synced(&os, 3, 2 << 20, 6_000_000);
    wait_for(&src, "healthy after the flip", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0 && proxy.flipped.load(Ordering::SeqCst)
    });
    let log = served.log_text();
    assert!(
        log.contains("replication failed"),
        "the flipped byte did not abort a session:\n{log}"
    );

    restore_and_compare(&dst, &tmp.path().join("restored"), &[("os", &os)]);
    drop(os);
    assert!(served.stop().success());
}

/// kill -9 the source in the middle of initial replication, then the target: each
/// time the copy resumes where it stopped (the target refuses a chunk behind its
/// position, so a restart from zero would fail), and the replica ends byte-equal.
#[test]
fn kill_9_during_initial_replication_resumes() {
    if !fuse_available("kill_9_during_initial_replication_resumes") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    // A second, big disk full of incompressible data, so the copy takes a while.
    let raw = tmp.path().join("big.raw");
    std::fs::write(&raw, common::pattern(77, 192 << 20)).expect("raw");
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/big", "--size", "256M", "--import"])
            .arg(&raw),
    );
    std::fs::remove_file(&raw).expect("rm raw");
    let t = TargetServe::start(&dst, &addr);
    // Paced, so that the copy is caught part-way at each step: unpaced, a resumed copy
    // now finishes between two status samples (shipping lost its copies), and the test
    // saw it done, never "copying again".
    run_ok(replog().arg("protect").arg(&src).arg("vm1").args([
        "--target",
        &addr,
        "--bandwidth",
        "48MiB/s",
    ]));
    let mnt = tmp.path().join("mnt");

    let progress = |m: &serde_json::Value| m["progress"].as_f64().unwrap_or(0.0);
    // Kill the source part-way.
    let served = Served::start(&src, &mnt, &[]);
    let st = wait_for(&src, "copying", |m| progress(m) > 0.1 && progress(m) < 0.9);
    served.kill();
    let before = progress(&st["machines"][0]);
    // The job of the copy the killed serve was running: in progress, its process gone.
    let copy = jobs(&src)
        .into_iter()
        .find(|j| j["kind"] == "initial-replication")
        .expect("an initial-replication job");
    assert_eq!(copy["state"], "in-progress", "{copy}");
    assert_eq!(copy["owner_gone"], true, "{copy}");
    let copy_id = copy["id"].as_str().expect("id").to_string();
    // Kill the target part-way through the resumed copy.
    let served = Served::start(&src, &mnt, &[]);
    let st = wait_for(&src, "copying again", |m| progress(m) > before);
    assert_ne!(
        st["machines"][0]["health"], "critical",
        "the resumed copy was refused: {st}"
    );
    t.kill9();
    let _t = TargetServe::start(&dst, &addr);
    let os = open_disk(&served, "os");
    os.write_all_at(b"written during the copy", 12345)
        .expect("write");
    os.sync_all().expect("fsync");
    wait_for(&src, "protected", |m| {
        m["state"] == "protected" && m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    // The same job went on in the restarted serve and succeeded once the target's next
    // session showed the copy complete.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let copy = loop {
        let all = jobs(&src);
        let copies: Vec<_> = all
            .iter()
            .filter(|j| j["kind"] == "initial-replication")
            .cloned()
            .collect();
        assert_eq!(copies.len(), 1, "one copy, one job: {all:?}");
        if copies[0]["state"] == "succeeded" {
            break copies[0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", copies[0]);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        copy["id"],
        copy_id.as_str(),
        "the restarted serve began another job"
    );
    let steps = copy["steps"].as_array().expect("steps");
    assert!(
        steps.iter().any(|s| s["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("resumed by process")),
        "{copy}"
    );
    assert_eq!(
        steps.last().map(|s| s["name"].clone()),
        Some(serde_json::Value::from("verify the end state"))
    );
    let protect = jobs(&src)
        .into_iter()
        .find(|j| j["kind"] == "protect")
        .expect("a protect job");
    assert_eq!(protect["state"], "succeeded", "{protect}");

    let out_dir = tmp.path().join("restored");
    let out = run_ok(
        replog()
            .arg("restore")
            .arg(&dst)
            .arg("vm1")
            .args(["--at", "latest", "--json", "--out"])
            .arg(&out_dir),
    );
    let doc: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let restore = jobs(&dst)
        .into_iter()
        .find(|j| j["id"] == doc["job"])
        .expect("the restore's job");
    assert_eq!(restore["kind"], "restore");
    assert_eq!(restore["state"], "succeeded", "{restore}");
    for (name, size) in [("os", 16usize << 20), ("big", 256 << 20)] {
        let f = std::fs::File::open(served.disk(name)).expect("open");
        let mut want = vec![0u8; size];
        f.read_exact_at(&mut want, 0).expect("read");
        let got = std::fs::read(out_dir.join(format!("{name}.img"))).expect("restored");
        assert!(got == want, "restored {name} differs");
    }
    drop(os);
    assert!(served.stop().success());
}

/// The target runs out of space: recoverable, retried, nothing corrupt; when space
/// returns, replication converges.
#[test]
fn target_out_of_space_is_retried_until_room_returns() {
    if !fuse_available("target_out_of_space_is_retried_until_room_returns") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    // This test is about retrying: the journal may grow past the resync threshold.
    edit_config(&src, |c| c.replication.resync_threshold_percent = 10_000);
    let replicas = dst.join("replicas");
    std::fs::create_dir_all(&replicas).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&replicas)
        .status()
        .expect("mount tmpfs");
    assert!(mounted.success(), "could not mount a small tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _cleanup = Unmount(replicas.clone());
    let _t = TargetServe::start(&dst, &addr);
    protect_vm1(&src, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    write_synced(&os, 5, 8 << 20, 4096);
    let st = wait_for(&src, "warning", |m| {
        m["health"] == "warning" && m["reason"].as_str().unwrap_or("").contains("retry")
    });
    // The operator is told why.
    let reason = st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.contains("No space left"), "reason: {reason}");
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&replicas)
        .status()
        .expect("remount");
    assert!(grown.success());
    wait_for(&src, "caught up", |m| {
        m["state"] == "protected" && m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    restore_and_compare(&dst, &tmp.path().join("restored"), &[("os", &os)]);
    drop(os);
    assert!(served.stop().success());
}

/// `replog restore --at latest` at the target into `out`, and each restored disk must
/// equal the source's disk as read through `file`; a difference names its range.
fn restore_and_compare(dst: &Path, out: &Path, disks: &[(&str, &std::fs::File)]) {
    run_ok(
        replog()
            .arg("restore")
            .arg(dst)
            .arg("vm1")
            .args(["--at", "latest", "--out"])
            .arg(out),
    );
    for (name, file) in disks {
        let size = file.metadata().expect("stat").len() as usize;
        let mut want = vec![0u8; size];
        file.read_exact_at(&mut want, 0).expect("read source");
        let got = std::fs::read(out.join(format!("{name}.img"))).expect("restored image");
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let last = got
                .iter()
                .zip(&want)
                .rposition(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("restored {name} differs from the source in {first}..={last}");
        }
    }
}

/// Another trusted site answering at the target's address (the target's certificate
/// was replaced, or a different site was put there): nothing is shipped to it, and the
/// machine goes Critical naming both IDs.
#[test]
fn a_target_whose_identity_changed_is_refused_naming_both_ids() {
    if !fuse_available("a_target_whose_identity_changed_is_refused_naming_both_ids") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let id_dst = run_ok(replog().arg("id").arg(&dst)).trim().to_string();
    {
        let _t = TargetServe::start(&dst, &addr);
        protect_vm1(&src, &addr);
    }
    // A second site, trusted by the source and trusting it, now answers at the address.
    let other = tmp.path().join("other");
    run_ok(replog().arg("init").arg(&other));
    let id_other = run_ok(replog().arg("id").arg(&other)).trim().to_string();
    let id_src = run_ok(replog().arg("id").arg(&src)).trim().to_string();
    run_ok(replog().arg("trust").arg(&src).arg(&id_other));
    run_ok(replog().arg("trust").arg(&other).arg(&id_src));
    let _o = TargetServe::start(&other, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let reason = critical_reason(&src);
    assert!(
        reason.contains(&id_other) && reason.contains(&id_dst),
        "both IDs named: {reason}"
    );
    assert!(
        !other.join("replicas/vm1").exists(),
        "data went to a site the machine does not replicate to"
    );
    assert!(served.stop().success());
}

/// `replog identity rotate` on both sites, one after the other, with replication
/// going on: neither site re-pins anything, the IDs stay, shipping goes on healthy and
/// the replica restores byte-equal. A certificate made to end soon shows as a site
/// warning in status.
#[test]
fn rotating_either_sites_certificate_keeps_replication_going() {
    if !fuse_available("rotating_either_sites_certificate_keeps_replication_going") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, dst, addr) = pair(tmp.path());
    let id_src = run_ok(replog().arg("id").arg(&src)).trim().to_string();
    let id_dst = run_ok(replog().arg("id").arg(&dst)).trim().to_string();
    let trusted = |site: &Path| std::fs::read_to_string(site.join("trusted-peers")).expect("read");
    let (trust_src, trust_dst) = (trusted(&src), trusted(&dst));
    let t = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    protect_vm1(&src, &addr);
    let os = open_disk(&served, "os");
    write_synced(&os, 1, 1 << 20, 0);
    wait_caught_up(&src, "protected");

    // Not while its serve runs (it holds the identity): refused, nothing changed.
    let cert_before = std::fs::read(dst.join("identity/cert.pem")).expect("cert");
    let out = replog()
        .args(["identity", "rotate"])
        .arg(&dst)
        .output()
        .expect("rotate");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dst.join("identity/cert.pem")).expect("cert"),
        cert_before
    );
    // The target rotates (its serve stopped, then started again).
    drop(t);
    let out = run_ok(replog().args(["identity", "rotate"]).arg(&dst));
    assert!(out.contains(&id_dst), "the ID stays: {out}");
    let _t = TargetServe::start(&dst, &addr);
    write_synced(&os, 2, 300_000, 3_000_000);
    wait_for(&src, "healthy after the target rotated", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });

    // The source rotates too, with a certificate that ends in 10 days.
    drop(os);
    assert!(served.stop().success());
    run_ok(
        replog()
            .args(["identity", "rotate"])
            .arg(&src)
            .args(["--valid-days", "10"]),
    );
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = open_disk(&served, "os");
    write_synced(&os, 3, 500_000, 6_000_000);
    let st = wait_for(&src, "healthy after the source rotated", |m| {
        m["health"] == "healthy" && m["lag_seconds"] == 0.0
    });
    let warnings = st["warnings"].to_string();
    assert!(
        warnings.contains("in 10 days") && warnings.contains("identity rotate"),
        "the short certificate is warned about: {st}"
    );
    let show = run_ok(replog().args(["identity", "show"]).arg(&src).arg("--json"));
    let show: serde_json::Value = serde_json::from_str(&show).expect("json");
    assert_eq!(show["id"], id_src.as_str());
    assert_ne!(show["certificate"], id_src.as_str());
    assert_eq!(show["rotations"], 1);

    // Nobody re-pinned by hand; the IDs are what they were.
    assert_eq!(trusted(&src), trust_src);
    assert_eq!(trusted(&dst), trust_dst);
    assert_eq!(run_ok(replog().arg("id").arg(&src)).trim(), id_src);
    assert_eq!(run_ok(replog().arg("id").arg(&dst)).trim(), id_dst);
    restore_and_compare(&dst, &tmp.path().join("restored"), &[("os", &os)]);
    drop(os);
    assert!(served.stop().success());
}

/// `replog pause|resume SRC vm1` (`verb`); what it said.
fn shipping(src: &Path, verb: &str) -> String {
    run_ok(replog().arg(verb).arg(src).arg("vm1"))
}

/// Once everything is shipped, the target's restore at latest must equal the disk;
/// serve stops cleanly.
fn shipped_and_compared(src: &Path, dst: &Path, served: Served, tmp: &Path) {
    wait_shipped(src);
    let os = open_disk(&served, "os");
    restore_and_compare(dst, &tmp.join("restored"), &[("os", &os)]);
    drop(os);
    assert!(served.stop().success());
}

/// `replog resume`, then [`shipped_and_compared`].
fn resume_and_compare(src: &Path, dst: &Path, served: Served, tmp: &Path) {
    shipping(src, "resume");
    shipped_and_compared(src, dst, served, tmp);
}

/// Write 1 MiB at `off` through the mount of a paused vm1, let several seal
/// intervals (200 ms) go by: status says paused, Warning, and the target's newest
/// point is still `shipped`. Machine 0's status.
fn write_and_ship_nothing(
    src: &Path,
    dst: &Path,
    served: &Served,
    off: u64,
    shipped: u64,
) -> serde_json::Value {
    write_at(&served.disk("os"), off, &common::pattern(off, 1 << 20));
    std::thread::sleep(Duration::from_millis(1500));
    let st = fresh_status(src);
    let m = st["machines"][0].clone();
    assert!(
        m["reason"].as_str().unwrap_or("").contains("is paused"),
        "{st}"
    );
    assert_eq!(m["health"], "warning", "{st}");
    assert_eq!(newest_point(dst), shipped);
    m
}

/// A resync required once the journal the target lacks passes 10% of the disks,
/// run at once (any hour).
fn resync_past_a_tenth(cfg: &mut replog::config::SiteConfig) {
    cfg.replication.resync_threshold_percent = 10;
    cfg.replication.resync_window = "always".into();
}

/// [`resync_past_a_tenth`], with small segments merged soon: what the hold lets go
/// shows in `journal_bytes`.
fn resync_and_merge_soon(cfg: &mut replog::config::SiteConfig) {
    resync_past_a_tenth(cfg);
    cfg.journal.segment_bytes = 1 << 20;
    cfg.journal.compact_interval_ms = 100;
    cfg.journal.compact_idle_ms = 200;
}

/// Wait until vm1 of `src` is resync-required and its journal merged (the hold let
/// go); the first of those statuses.
fn resync_required_and_merged(src: &Path) -> serde_json::Value {
    let st = wait_for(src, "resync required while paused", |m| {
        m["state"] == "resync-required"
    });
    wait_for(src, "the journal merged", |m| {
        m["journal_bytes"].as_u64().unwrap_or(u64::MAX) < 2 << 20
    });
    st
}

/// The target loses its replica of vm1: `target` stopped, the replica removed, a
/// target started again at `addr`.
fn lose_the_replica(dst: &Path, addr: &str, target: TargetServe) -> TargetServe {
    drop(target);
    std::fs::remove_dir_all(dst.join("replicas/vm1")).expect("remove the replica");
    TargetServe::start(dst, addr)
}

/// The source site, the target site, the target's address, the target's serve and
/// the source's.
type Pair = (
    std::path::PathBuf,
    std::path::PathBuf,
    String,
    TargetServe,
    Served,
);

/// Two sites under `tmp` (src's site.toml changed by `cfg`), vm1 with a 32 MiB disk,
/// the target listening, src served under `tmp/mnt`, vm1 protected, 1 MiB written
/// and shipped.
fn protected_and_shipped(tmp: &Path, cfg: impl FnOnce(&mut replog::config::SiteConfig)) -> Pair {
    let (src, dst, addr) = two_sites(tmp, "32M");
    edit_config(&src, cfg);
    let target = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.join("mnt"), &[]);
    protect_when_listening(&src, &addr);
    write_at(&served.disk("os"), 0, &common::pattern(1, 1 << 20));
    wait_shipped(&src);
    (src, dst, addr, target, served)
}

/// Two sites under `tmp` (src's site.toml changed by `cfg`), vm1 with 24 MiB of
/// pattern `seed` imported into a 32 MiB disk, protected at 4 MiB/s (about six
/// seconds of copying), src served under `tmp/mnt`; returns once the initial copy is
/// under way, with that status.
fn copying_at_4_mib_a_second(
    tmp: &Path,
    seed: u64,
    cfg: impl FnOnce(&mut replog::config::SiteConfig),
) -> (Pair, serde_json::Value) {
    let (src, dst) = trusted_sites(tmp);
    edit_config(&src, cfg);
    let raw = tmp.join("raw.img");
    std::fs::write(&raw, common::pattern(seed, 24 << 20)).expect("raw");
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/os", "--size", "32M", "--import"])
            .arg(&raw),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let target = TargetServe::start(&dst, &addr);
    let served = Served::start(&src, &tmp.join("mnt"), &[]);
    protect_when_listening_with(&src, &addr, &["--bandwidth", "4MiB/s"]);
    let st = wait_for(&src, "copying", |m| {
        m["state"] == "initial-replication" && m["progress"].as_f64().unwrap_or(0.0) > 0.0
    });
    ((src, dst, addr, target, served), st)
}

/// The newest LSN among the target's points of vm1 (0: none).
fn newest_point(dst: &Path) -> u64 {
    let out = run_ok(replog().arg("points").arg(dst).args(["vm1", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("points json");
    v["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["lsn"].as_u64())
        .max()
        .unwrap_or(0)
}

/// `replog pause` through a running serve: nothing more reaches the target, status
/// says so (Warning), a planned failover is refused and changes nothing; the pause is
/// kept in the relationship, so a serve started again (and `status` with none) keeps
/// it; `replog resume` ships what accumulated, and the restore equals the disk.
#[test]
fn a_paused_machine_ships_nothing_stays_paused_across_a_restart_and_catches_up() {
    if !fuse_available(
        "a_paused_machine_ships_nothing_stays_paused_across_a_restart_and_catches_up",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, _addr, _target, served) = protected_and_shipped(tmp.path(), |_| {});
    let shipped = newest_point(&dst);
    assert!(shipped > 0);
    // The copy mark: the initial copy toward this target is complete.
    let mark = std::fs::read_to_string(src.join("machines/vm1/copied.toml")).expect("mark");
    let dst_id = run_ok(replog().arg("id").arg(&dst)).trim().to_string();
    assert!(
        mark.starts_with("# replog copy mark, format 1\n") && mark.contains(&dst_id),
        "{mark}"
    );

    let said = shipping(&src, "pause");
    assert!(said.contains("shipping of vm1 paused"), "{said}");
    let rel_path = src.join("machines/vm1/relationship.toml");
    let rel = std::fs::read_to_string(&rel_path).expect("relationship");
    assert!(
        rel.starts_with("# replog relationship, format 3\n") && rel.contains("paused = true"),
        "{rel}"
    );
    let m = write_and_ship_nothing(&src, &dst, &served, 4 << 20, shipped);
    assert!(m["last_lsn"].as_u64() > m["acked_lsn"].as_u64(), "{m}");
    assert_eq!(m["paused"], true, "{m}");

    // A planned failover ships everything first: refused, the machine still writable.
    let out = replog()
        .arg("failover")
        .arg(&src)
        .args(["vm1", "--planned"])
        .output()
        .expect("failover");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is paused") && err.contains("replog resume"),
        "{err}"
    );
    write_at(&served.disk("os"), 8 << 20, &common::pattern(3, 65536));

    // Kept across a restart: with no serve, status says paused; a new serve ships
    // nothing either.
    assert!(served.stop().success());
    let st = status(&src);
    assert!(
        st["machines"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("is paused"),
        "{st}"
    );
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let m = write_and_ship_nothing(&src, &dst, &served, 12 << 20, shipped);
    assert_ne!(m["state"], "initial-replication", "{m}");

    let said = shipping(&src, "resume");
    assert!(said.contains("shipping of vm1 resumed"), "{said}");
    let st = fresh_status(&src);
    assert_eq!(st["machines"][0]["paused"], false, "{st}");
    let rel = std::fs::read_to_string(&rel_path).expect("relationship");
    assert!(
        rel.starts_with("# replog relationship, format 2\n") && !rel.contains("paused"),
        "{rel}"
    );
    shipped_and_compared(&src, &dst, served, tmp.path());

    // Without a serve: recorded in the file, for the next serve.
    let said = shipping(&src, "pause");
    assert!(said.contains("no serve runs"), "{said}");
    let rel = std::fs::read_to_string(&rel_path).expect("relationship");
    assert!(rel.contains("paused = true"), "{rel}");
    shipping(&src, "resume");
    let rel = std::fs::read_to_string(&rel_path).expect("relationship");
    assert!(!rel.contains("paused"), "{rel}");
    // Not protected: refused.
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm2/os", "--size", "1M"]),
    );
    let out = replog()
        .arg("pause")
        .arg(&src)
        .arg("vm2")
        .output()
        .expect("pause");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm2 is not protected"),
        "{out:?}"
    );
}

/// A journal that passes the resync threshold while shipping is paused makes a
/// resync required (said with the pause); once resumed, the resync brings the target
/// along and the restore equals the disk.
#[test]
fn a_journal_past_its_threshold_while_paused_is_resynchronised_once_resumed() {
    if !fuse_available("a_journal_past_its_threshold_while_paused_is_resynchronised_once_resumed") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, _addr, _target, served) = protected_and_shipped(tmp.path(), resync_past_a_tenth);
    shipping(&src, "pause");
    // Started again, paused: the loop never reaches the target, and knows from the
    // copy mark that its journal is a delta over a complete copy.
    assert!(served.stop().success());
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    // Paused for a while first: the journal is measured while the pause goes on,
    // not only as it begins.
    std::thread::sleep(Duration::from_millis(500));
    // 4 MiB: more than 10% of the 32 MiB disk.
    write_at(&served.disk("os"), 8 << 20, &common::pattern(2, 4 << 20));
    let st = wait_for(&src, "resync required while paused", |m| {
        m["state"] == "resync-required"
    });
    let reason = st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(reason.contains("is paused"), "{st}");
    assert!(src.join("machines/vm1/resync.toml").exists());
    resume_and_compare(&src, &dst, served, tmp.path());
    assert!(!src.join("machines/vm1/resync.toml").exists());
}

/// A pause during the initial copy stops it between chunks, not at its end (a copy
/// may run for hours); resumed, it goes on from there and the restore equals the disk.
#[test]
fn a_pause_stops_an_initial_copy_between_chunks_and_resume_finishes_it() {
    if !fuse_available("a_pause_stops_an_initial_copy_between_chunks_and_resume_finishes_it") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let ((src, dst, _addr, _target, served), _) = copying_at_4_mib_a_second(tmp.path(), 7, |_| {});
    let said = shipping(&src, "pause");
    assert!(said.contains("shipping of vm1 paused"), "{said}");
    let at_pause = fresh_status(&src);
    std::thread::sleep(Duration::from_millis(1500));
    let later = fresh_status(&src);
    for st in [&at_pause, &later] {
        let m = &st["machines"][0];
        assert_eq!(m["state"], "initial-replication", "{st}");
        assert!(m["progress"].as_f64().unwrap_or(1.0) < 1.0, "{st}");
        assert!(
            m["reason"].as_str().unwrap_or("").contains("is paused"),
            "{st}"
        );
    }
    assert_eq!(
        at_pause["machines"][0]["progress"], later["machines"][0]["progress"],
        "the copy went on while paused"
    );
    // Given up as paused, not failed: no retry (which waits its delay even when
    // resumed).
    let log = served.log_text();
    assert!(!log.contains("replication failed"), "{log}");
    resume_and_compare(&src, &dst, served, tmp.path());
}

/// The target lost its replica while the source was paused and started again: the
/// copy mark says the copy is complete, so the journal past its threshold is let go
/// for a resync; resumed, the target says it has no complete copy, the mark goes, a
/// new initial copy is based on parents that no merge moves meanwhile, and the
/// restore equals the disk (no endless round of resync and broken chain).
#[test]
fn a_replica_lost_while_paused_is_copied_again_once_resumed() {
    if !fuse_available("a_replica_lost_while_paused_is_copied_again_once_resumed") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, addr, target, served) = protected_and_shipped(tmp.path(), resync_and_merge_soon);
    let mark = src.join("machines/vm1/copied.toml");
    assert!(mark.exists());
    shipping(&src, "pause");
    assert!(served.stop().success());
    let _target = lose_the_replica(&dst, &addr, target);
    // Each pass waits a second after the target's answer to Protect: a merge due
    // then happens between the new replica's creation and its copy.
    let served = Served::start_with_env(
        &src,
        &tmp.path().join("mnt"),
        &[],
        &[("REPLOG_FAILPOINT", "ship:protected:delay")],
    );
    write_at(&served.disk("os"), 8 << 20, &common::pattern(2, 4 << 20));
    // Let go (the mark says the copy is complete): the compactor merges it.
    let st = resync_required_and_merged(&src);
    assert!(st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("is paused"));
    // Sealed segments not merged yet as shipping resumes: a merge ends during the
    // first passes, and the new copy's base must not move under it.
    write_at(&served.disk("os"), 16 << 20, &common::pattern(3, 3 << 20));
    let log_path = served.log.clone();
    resume_and_compare(&src, &dst, served, tmp.path());
    assert!(mark.exists(), "the mark of the new copy");
    let log = std::fs::read_to_string(&log_path).expect("serve's log");
    assert!(!log.contains("parents stand for LSN"), "{log}");
    // The mark went when the target said it had no complete copy, then came back.
    assert!(
        log.contains("has no complete copy: the copy mark is removed"),
        "{log}"
    );
}

/// An initial copy whose base the parents have left cannot go on, and no resync can
/// mend it (there is no complete copy to compare with). Reached here as a failed
/// removal of a stale copy mark would leave it: the copy paused half done, a mark
/// saying it is complete, the journal past its threshold across a restart, so it
/// merges past the copy's base. The machine stops Critical saying to remove the
/// replica at the target (where it went round between a broken chain and a resync
/// that cleared itself, for ever); done, `replog resync --now` starts a new copy and
/// the restore equals the disk.
#[test]
fn an_initial_copy_the_parents_have_left_stops_critical_until_its_replica_is_removed() {
    if !fuse_available("an_initial_copy_the_parents_have_left_stops_critical") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let ((src, dst, addr, target, served), st) =
        copying_at_4_mib_a_second(tmp.path(), 8, resync_and_merge_soon);
    let generation = st["machines"][0]["generation"]
        .as_u64()
        .expect("generation") as u32;
    shipping(&src, "pause");
    assert!(served.stop().success());
    let rel = replog::replication::relationship::Relationship::load(&src, "vm1")
        .expect("relationship")
        .expect("protected");
    replog::replication::relationship::CopyMark::record(&src, "vm1", &rel, generation)
        .expect("a stale mark");
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    write_at(&served.disk("os"), 0, &common::pattern(9, 4 << 20));
    resync_required_and_merged(&src);
    shipping(&src, "resume");
    let reason = critical_reason(&src);
    assert!(
        reason.contains("can neither go on nor be resynchronised")
            && reason.contains("remove the replica at the target"),
        "{reason}"
    );
    // The operator does as it says.
    let _target = lose_the_replica(&dst, &addr, target);
    let said = run_ok(replog().arg("resync").arg(&src).args(["vm1", "--now"]));
    assert!(said.contains("starts again"), "{said}");
    shipped_and_compared(&src, &dst, served, tmp.path());
}
