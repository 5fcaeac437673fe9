//! A target whose replicas live in an S3 bucket on a real SeaweedFS cluster (one
//! master, four volume servers, a filer, the S3 gateway; three copies of everything),
//! started and stopped by these tests: what a directory target does works there, the
//! site directory keeps no replica data, and the store's failures — a volume server
//! killed, the receiver killed between a data PUT and its manifest, a second
//! receiver, the store down, credentials that may not write — each end as the
//! design says.

mod common;

use common::seaweed::{self, Cluster};
use common::serve::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `replog serve DST --listen ADDR --mount MNT` with the store's credentials (or
/// `env`), its log in a file; SIGTERM when dropped.
struct S3Target {
    child: Option<Child>,
    log: PathBuf,
    mount: PathBuf,
}

impl S3Target {
    fn start(dst: &Path, addr: &str, env: &[(&str, &str)]) -> S3Target {
        let mount = dst.with_extension("mnt");
        let log = dst.with_extension(format!("serve-{}.log", Instant::now().elapsed().as_nanos()));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = replog()
            .arg("serve")
            .arg(dst)
            .args(["--listen", addr])
            .arg("--mount")
            .arg(&mount)
            .env("REPLOG_LOG", "info")
            .envs(seaweed::env())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("target serve");
        let t = S3Target {
            child: Some(child),
            log,
            mount,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "target never listened:\n{}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for it to die on its own (a failpoint).
    fn wait_killed(mut self) {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "target did not die:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        sweep_mounts(self.mount.parent().expect("parent"));
    }
}

impl Drop for S3Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signal to a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// A source `src` (FUSE, fast replication, vm1/os of `size`) and a target `dst`
/// keeping its replicas in the cluster under `prefix`, trusting each other.
fn s3_pair(root: &Path, cluster: &Cluster, prefix: &str, size: &str) -> (PathBuf, PathBuf, String) {
    let (src, dst) = (root.join("src"), root.join("dst"));
    run_ok(replog().arg("init").arg(&src));
    cluster.init_site(&dst, prefix);
    fast_replication(&src);
    edit_config(&dst, |c| {
        // Collection soon after a crash, and the loop that runs it often.
        c.replica.s3.gc_grace_ms = 3000;
        c.replica.compact_interval_ms = 300;
    });
    let id_src = run_ok(replog().arg("id").arg(&src)).trim().to_string();
    let id_dst = run_ok(replog().arg("id").arg(&dst)).trim().to_string();
    run_ok(replog().arg("trust").arg(&src).arg(&id_dst));
    run_ok(replog().arg("trust").arg(&dst).arg(&id_src));
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/os", "--size", size]),
    );
    (src, dst, format!("127.0.0.1:{}", free_port()))
}

/// Restore vm1 at `at` from `dst` (the store's credentials) into a new directory.
fn restore_os(dst: &Path, at: &str, out: &Path) -> Vec<u8> {
    run_ok(
        replog()
            .arg("restore")
            .arg(dst)
            .arg("vm1")
            .args(["--at", at, "--out"])
            .arg(out)
            .envs(seaweed::env()),
    );
    read_all(&out.join("os.img"))
}

/// Write `n` blocks of fresh data through the mount, fsync'd.
fn write_some(img: &Path, seed: u64, n: u64) {
    for i in 0..n {
        write_at(img, ((seed * 7919 + i * 131) % 2000) * 4096, &common::pattern(seed * 1000 + i, 64 << 10));
    }
}

/// Wait for lag 0 at the source, healthy.
fn caught_up(src: &Path) -> serde_json::Value {
    wait_for(src, "caught up", |m| {
        m["state"] == "protected" && m["health"] == "healthy" && m["lag_seconds"] == 0.0
    })
}

fn bytes_of_replicas_in(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += bytes_of_replicas_in(&p);
        } else if let Ok(m) = p.metadata() {
            n += m.len();
        }
    }
    n
}

#[test]
fn a_target_on_s3_receives_restores_browses_fails_over_and_keeps_no_replica_data_locally() {
    let test = "a_target_on_s3_receives_restores_browses_fails_over_and_keeps_no_replica_data_locally";
    if !fuse_available(test) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let Some(cluster) = Cluster::start(&tmp.path().join("cluster"), test) else {
        return;
    };
    let (src, dst, addr) = s3_pair(tmp.path(), &cluster, "site-b", "32M");
    let target = S3Target::start(&dst, &addr, &[]);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = served.disk("os");
    write_some(&os, 1, 40);
    protect_when_listening(&src, &addr);
    write_some(&os, 2, 40);
    caught_up(&src);
    let source_bytes = read_all(&os);

    // Restore at the newest point: byte-equal to the source.
    assert!(restore_os(&dst, "latest", &tmp.path().join("r1")) == source_bytes);
    // Points; a read-only view of the newest one through the target's mount.
    let points = run_ok(replog().arg("points").arg(&dst).arg("vm1").arg("--json").envs(seaweed::env()));
    let points: serde_json::Value = serde_json::from_str(&points).expect("points json");
    let newest = points["points"]
        .as_array()
        .and_then(|p| p.last())
        .and_then(|p| p["id"].as_str())
        .expect("a point")
        .to_string();
    let view = target.mount.join("vm1/points").join(&newest).join("os.img");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !view.exists() {
        assert!(Instant::now() < deadline, "no view {}", view.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(read_all(&view) == restore_os(&dst, &newest, &tmp.path().join("r2")));

    // An older point stays restorable after more writes.
    write_some(&os, 3, 40);
    caught_up(&src);
    assert!(restore_os(&dst, &newest, &tmp.path().join("r3")) == read_all(&view));
    assert!(restore_os(&dst, "latest", &tmp.path().join("r4")) == read_all(&os));

    // inspect reads the replica from the store and finds it sound.
    let inspected = run_ok(replog().arg("inspect").arg(&dst).envs(seaweed::env()));
    assert!(inspected.contains("vm1"), "{inspected}");

    // A resync: compares with the replica in the store and converges.
    run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    wait_for(&src, "resynced", |m| {
        let total = m["resync"]["chunks_total"].as_u64().unwrap_or(0);
        m["state"] == "protected"
            && m["health"] == "healthy"
            && total > 0
            && m["resync"]["chunks_compared"].as_u64() == Some(total)
    });
    caught_up(&src);
    assert!(restore_os(&dst, "latest", &tmp.path().join("r5")) == read_all(&os));

    // A test failover: a writable copy standing on the point in the store.
    run_ok(replog().arg("failover").arg(&dst).arg("vm1").arg("--test").envs(seaweed::env()));
    let copy = target.mount.join("vm1-test/os.img");
    let latest = read_all(&os);
    assert!(read_all(&copy) == latest, "the test copy shows the newest point");
    write_at(&copy, 0, b"written in the test copy");
    run_ok(
        replog()
            .arg("failover")
            .arg(&dst)
            .arg("vm1")
            .arg("--cleanup-test")
            .envs(seaweed::env()),
    );

    // Nothing of the replica is kept in the site directory: no replicas/, and the
    // local state is a few small files (locks, pins).
    assert!(!dst.join("replicas").exists());
    let local = bytes_of_replicas_in(&dst.join("replica-state"));
    assert!(local < 64 << 10, "{local} bytes of local replica state");
    // What is in the bucket: manifests and data objects of vm1 only.
    let keys = cluster.keys("site-b/");
    assert!(keys.iter().any(|k| k.starts_with("site-b/vm1/m/")), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("site-b/vm1/d/segments/")), "{keys:?}");

    // Unplanned failover at the target, then commit: the disk runs there.
    drop(served);
    run_ok(replog().arg("failover").arg(&dst).arg("vm1").envs(seaweed::env()));
    assert!(read_all(&target.mount.join("vm1/os.img")) == latest);
    run_ok(replog().arg("commit").arg(&dst).arg("vm1").envs(seaweed::env()));
    assert!(read_all(&target.mount.join("vm1/os.img")) == latest);
    // The committed replica's objects go from the bucket.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.keys("site-b/vm1/m/").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the committed replica's manifests stay: {:?}\n{}",
            cluster.keys("site-b/"),
            target.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
