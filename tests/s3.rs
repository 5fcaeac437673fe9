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
        assert!(
            exited_within(&mut c, Duration::from_secs(60)).is_some(),
            "target did not die:\n{}",
            self.log_text()
        );
        // Its dead mount, as a crash leaves it.
        let _ = replog::frontend::detach(&self.mount);
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
    trust_each_other(&src, &dst);
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

/// How long each phase of a long test took, printed as each ends: nextest shows it
/// for the tests `.config/nextest.toml` names, passed or failed, so a run much slower
/// than the others says where its time went.
struct Phases {
    test: &'static str,
    last: Instant,
}

impl Phases {
    fn new(test: &'static str) -> Self {
        Phases {
            test,
            last: Instant::now(),
        }
    }

    fn done(&mut self, what: &str) {
        eprintln!(
            "{}: {what} in {:.1} s",
            self.test,
            self.last.elapsed().as_secs_f64()
        );
        self.last = Instant::now();
    }
}

/// Write `n` blocks of fresh data through the mount, fsync'd.
fn write_some(img: &Path, seed: u64, n: u64) {
    for i in 0..n {
        write_at(
            img,
            ((seed * 7919 + i * 131) % 2000) * 4096,
            &common::pattern(seed * 1000 + i, 64 << 10),
        );
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

/// What every end-to-end test here starts from: a temporary directory (its mounts
/// swept at the end), a cluster, and `s3_pair` under `prefix`. None when the test
/// cannot run here (no FUSE, no `weed`; CI fails instead).
struct Setup {
    cluster: Cluster,
    src: PathBuf,
    dst: PathBuf,
    addr: String,
    _sweep: MountSweep,
    tmp: tempfile::TempDir,
}

fn setup(test: &str, prefix: &str, size: &str) -> Option<Setup> {
    if !fuse_available(test) {
        return None;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let sweep = MountSweep(tmp.path().to_path_buf());
    let cluster = Cluster::start(&tmp.path().join("cluster"), test)?;
    let (src, dst, addr) = s3_pair(tmp.path(), &cluster, prefix, size);
    Some(Setup {
        cluster,
        src,
        dst,
        addr,
        _sweep: sweep,
        tmp,
    })
}

#[test]
fn a_target_on_s3_receives_restores_browses_fails_over_and_keeps_no_replica_data_locally() {
    let test =
        "a_target_on_s3_receives_restores_browses_fails_over_and_keeps_no_replica_data_locally";
    let Some(Setup {
        cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "site-b", "32M")
    else {
        return;
    };
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
    let points = run_ok(
        replog()
            .arg("points")
            .arg(&dst)
            .arg("vm1")
            .arg("--json")
            .envs(seaweed::env()),
    );
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
    run_ok(
        replog()
            .arg("failover")
            .arg(&dst)
            .arg("vm1")
            .arg("--test")
            .envs(seaweed::env()),
    );
    let copy = target.mount.join("vm1-test/os.img");
    let latest = read_all(&os);
    assert!(
        read_all(&copy) == latest,
        "the test copy shows the newest point"
    );
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
    assert!(
        keys.iter().any(|k| k.starts_with("site-b/vm1/m/")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("site-b/vm1/d/segments/")),
        "{keys:?}"
    );

    // Unplanned failover at the target, then commit: the disk runs there.
    drop(served);
    run_ok(
        replog()
            .arg("failover")
            .arg(&dst)
            .arg("vm1")
            .envs(seaweed::env()),
    );
    assert!(read_all(&target.mount.join("vm1/os.img")) == latest);
    run_ok(
        replog()
            .arg("commit")
            .arg(&dst)
            .arg("vm1")
            .envs(seaweed::env()),
    );
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

#[test]
fn a_volume_server_killed_while_segments_ship_changes_nothing() {
    let test = "a_volume_server_killed_while_segments_ship_changes_nothing";
    let Some(Setup {
        mut cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "vol", "32M")
    else {
        return;
    };
    let _target = S3Target::start(&dst, &addr, &[]);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = served.disk("os");
    write_some(&os, 1, 20);
    protect_when_listening(&src, &addr);
    caught_up(&src);
    // Segments ship while one of the four volume servers dies.
    for round in 0..10 {
        write_some(&os, 10 + round, 8);
        if round == 3 {
            cluster.kill_volume(1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    caught_up(&src);
    assert!(restore_os(&dst, "latest", &tmp.path().join("r")) == read_all(&os));
}

#[test]
fn a_receiver_killed_between_a_data_put_and_its_manifest_resumes_and_the_orphan_is_collected() {
    let test =
        "a_receiver_killed_between_a_data_put_and_its_manifest_resumes_and_the_orphan_is_collected";
    let Some(Setup {
        cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "crash", "32M")
    else {
        return;
    };
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = served.disk("os");
    write_some(&os, 1, 40);
    // The first batch of the initial copy is PUT; the process dies before the
    // manifest that would name it.
    let dying = S3Target::start(&dst, &addr, &[("REPLOG_FAILPOINT", "s3:before-manifest")]);
    protect_when_listening(&src, &addr);
    dying.wait_killed();
    let manifest_names = |cluster: &Cluster| -> Vec<String> {
        let keys = cluster.keys("crash/vm1/m/");
        let newest = keys.last().expect("a manifest").clone();
        let store = replica_objects(cluster);
        let m = replog::replica::objects::Manifest::decode(
            &replog::replica::objects::ObjectStore::get(&store, &newest)
                .expect("get")
                .expect("manifest"),
            &newest,
        )
        .expect("decode");
        m.entries
            .values()
            .filter_map(|e| match e {
                replog::replica::objects::Entry::Object { name, .. } => {
                    Some(format!("crash/vm1/{name}"))
                }
                replog::replica::objects::Entry::Inline(_) => None,
            })
            .chain(m.dropped.iter().map(|(n, _)| format!("crash/vm1/{n}")))
            .collect()
    };
    let named = manifest_names(&cluster);
    let orphans: Vec<String> = cluster
        .keys("crash/vm1/d/")
        .into_iter()
        .filter(|k| !named.contains(k))
        .collect();
    assert!(!orphans.is_empty(), "the failpoint left no unnamed object");

    // Back without the failpoint: the source resends, the replica converges.
    let target = S3Target::start(&dst, &addr, &[]);
    write_some(&os, 2, 20);
    caught_up(&src);
    assert!(restore_os(&dst, "latest", &tmp.path().join("r")) == read_all(&os));
    // A grace period (3 s here) on, the replica loop has deleted every orphan, and
    // every data object left is named by the newest manifest.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = cluster.keys("crash/vm1/d/");
        let named = manifest_names(&cluster);
        let unnamed: Vec<&String> = keys.iter().filter(|k| !named.contains(k)).collect();
        if unnamed.is_empty() && orphans.iter().all(|o| !keys.contains(o)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unnamed objects stay: {unnamed:?}\n{}",
            target.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(restore_os(&dst, "latest", &tmp.path().join("r2")) == read_all(&os));
}

/// The bucket, as the tests' own client.
fn replica_objects(cluster: &Cluster) -> replog::replica::objects::S3Objects {
    cluster.0.bucket().expect("bucket")
}

#[test]
fn of_two_receivers_for_one_replica_the_older_one_is_fenced_and_its_writes_never_show() {
    let test = "of_two_receivers_for_one_replica_the_older_one_is_fenced_and_its_writes_never_show";
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(cluster) = Cluster::start(&tmp.path().join("cluster"), test) else {
        return;
    };
    let site = tmp.path().join("t");
    cluster.init_site(&site, "two");
    edit_config(&site, |c| c.replica.s3.gc_grace_ms = 2000);
    for (k, v) in seaweed::env() {
        std::env::set_var(k, v);
    }
    let cfg = replog::site::Site::read_config(&site)
        .expect("config")
        .replica;
    use replog::replica::backend::ReplicaBackend;
    let first = replog::replica::store::object_backend(&site, &cfg).expect("first");
    first.put("vm1/received", b"first 1").expect("put");
    first
        .put("vm1/segments/1.seg.enc", &vec![1u8; 100_000])
        .expect("put");
    // A second receiver takes the replica over (a replaced target host, say).
    let second = replog::replica::store::object_backend(&site, &cfg).expect("second");
    assert_eq!(
        second.get("vm1/received").expect("get").as_deref(),
        Some(&b"first 1"[..])
    );
    second.put("vm1/received", b"second 1").expect("put");
    // The first one's next writes fail, Critical, naming why; none of them shows.
    let e = first
        .put("vm1/segments/2.seg.enc", &vec![2u8; 100_000])
        .expect_err("fenced");
    assert_eq!(e.class(), replog::error::ErrorClass::Critical, "{e}");
    assert!(e.to_string().contains("another receiver"), "{e}");
    assert!(first.put("vm1/received", b"first 2").is_err());
    let reader = replog::replica::store::object_backend(&site, &cfg).expect("reader");
    assert_eq!(
        reader.get("vm1/received").expect("get").as_deref(),
        Some(&b"second 1"[..])
    );
    assert_eq!(reader.get("vm1/segments/2.seg.enc").expect("get"), None);
    // Its object was PUT, never named: collected by the second one after the grace.
    let leftover = || {
        cluster
            .keys("two/vm1/d/segments/")
            .into_iter()
            .filter(|k| k.contains("2.seg.enc"))
            .count()
    };
    assert_eq!(leftover(), 1);
    // Collected by a collection once the grace period (2 s) has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while leftover() > 0 {
        assert!(std::time::Instant::now() < deadline, "never collected");
        std::thread::sleep(Duration::from_millis(200));
        second.collect("vm1").expect("collect");
    }
    assert_eq!(
        reader
            .get("vm1/segments/1.seg.enc")
            .expect("get")
            .map(|b| b.len()),
        Some(100_000)
    );
    // The head of an object (a ranged GET; a resync reads each parent chunk's
    // header so): the first bytes, all of a shorter one, none of a missing one.
    let mut seg = vec![1u8; 100_000];
    seg[..4].copy_from_slice(b"head");
    reader.put("vm1/segments/3.seg.enc", &seg).expect("put");
    assert_eq!(
        reader.get_head("vm1/segments/3.seg.enc", 40).expect("head"),
        Some(seg[..40].to_vec())
    );
    assert_eq!(
        reader
            .get_head("vm1/received", 40)
            .expect("head")
            .as_deref(),
        Some(&b"second 1"[..])
    );
    assert_eq!(
        reader.get_head("vm1/segments/9.seg.enc", 40).expect("head"),
        None
    );
    let objects = replica_objects(&cluster);
    use replog::replica::objects::ObjectStore;
    assert_eq!(objects.get_head("no/such/object", 40).expect("head"), None);
}

#[test]
fn the_store_down_is_a_warning_with_retries_then_replication_converges() {
    let test = "the_store_down_is_a_warning_with_retries_then_replication_converges";
    let Some(Setup {
        mut cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "down", "32M")
    else {
        return;
    };
    edit_config(&dst, |c| c.replica.s3.timeout_ms = 2000);
    let target = S3Target::start(&dst, &addr, &[]);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = served.disk("os");
    write_some(&os, 1, 20);
    protect_when_listening(&src, &addr);
    caught_up(&src);
    cluster.kill_gateway();
    write_some(&os, 2, 20);
    let st = wait_for(&src, "warned", |m| {
        m["health"] == "warning" && m["reason"].as_str().unwrap_or("").contains("replica store")
    });
    let reason = st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        reason.contains("retry"),
        "the retry schedule is named: {reason}"
    );
    assert!(reason.contains("unreachable"), "{reason}");
    // A target started while its store is down starts all the same, and takes its
    // replicas up once the store answers.
    drop(target);
    let target = S3Target::start(&dst, &addr, &[]);
    write_some(&os, 3, 10);
    cluster.start_gateway();
    let _ = &target;
    caught_up(&src);
    assert!(restore_os(&dst, "latest", &tmp.path().join("r")) == read_all(&os));
}

#[test]
fn credentials_that_may_not_write_are_critical_with_the_stores_reason() {
    let test = "credentials_that_may_not_write_are_critical_with_the_stores_reason";
    let Some(Setup {
        cluster: _cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "creds", "16M")
    else {
        return;
    };
    // The target runs with a key that may read and list the bucket, not write it.
    let target = S3Target::start(
        &dst,
        &addr,
        &[
            ("AWS_ACCESS_KEY_ID", seaweed::READER_KEY),
            ("AWS_SECRET_ACCESS_KEY", seaweed::READER_SECRET),
        ],
    );
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    write_some(&served.disk("os"), 1, 10);
    protect_when_listening(&src, &addr);
    let reason = critical_reason(&src);
    assert!(reason.contains("AccessDenied"), "{reason}");
    assert!(!reason.contains(seaweed::READER_SECRET));
    // Wrong credentials altogether: serve refuses to start, saying why.
    drop(target);
    let out = replog()
        .arg("serve")
        .arg(&dst)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("AWS_ACCESS_KEY_ID", seaweed::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("SignatureDoesNotMatch") || err.contains("AccessDenied"),
        "{err}"
    );
    assert!(!err.contains("not-the-secret"), "{err}");
}

#[test]
fn retention_merges_in_the_bucket_and_a_failback_cycle_reprotects_into_it() {
    let test = "retention_merges_in_the_bucket_and_a_failback_cycle_reprotects_into_it";
    if !fuse_available(test) {
        return;
    }
    let mut phase = Phases::new(test);
    let tmp = tempfile::tempdir().expect("tempdir");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let Some(cluster) = Cluster::start(&tmp.path().join("cluster"), test) else {
        return;
    };
    phase.done("the store started");
    // Every replog process of this test reaches the store.
    for (k, v) in seaweed::env() {
        std::env::set_var(k, v);
    }
    let (a, b, addr_b) = s3_pair(tmp.path(), &cluster, "cycle", "32M");
    fast_replication(&b);
    let addr_a = format!("127.0.0.1:{}", free_port());
    let sb = Served::start(&b, &tmp.path().join("b-mnt"), &["--listen", &addr_b]);
    let sa = Served::start(&a, &tmp.path().join("a-mnt"), &["--listen", &addr_a]);
    write_some(&sa.disk("os"), 1, 30);
    protect_when_listening_with(&a, &addr_b, &["--retention", "2s", "--app-retention", "2s"]);
    wait_shipped(&a);
    phase.done("protected and shipped");
    let first = status(&a)["machines"][0]["acked_lsn"]
        .as_u64()
        .expect("acked");
    // The oldest point the target still offers (None: every one folded in).
    let oldest = |site: &Path| -> Option<u64> {
        let p = run_ok(replog().arg("points").arg(site).arg("vm1").arg("--json"));
        let p: serde_json::Value = serde_json::from_str(&p).expect("json");
        p["points"][0]["lsn"].as_u64()
    };
    // Points expire after 2 s and the target compactor folds them into parent chunks
    // in the bucket (new chunk objects, the old ones collected later).
    for round in 2..6 {
        write_some(&sa.disk("os"), round, 20);
        std::thread::sleep(Duration::from_millis(700));
    }
    wait_shipped(&a);
    let deadline = Instant::now() + Duration::from_secs(30);
    while oldest(&b).is_some_and(|l| l <= first) {
        assert!(Instant::now() < deadline, "no point ever expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    phase.done("points expired and folded");
    assert!(restore_os(&b, "latest", &tmp.path().join("r1")) == read_all(&sa.disk("os")));
    phase.done("restored from the bucket");

    // Planned failover to B, commit, reprotect B → A (A's local directory holds the
    // replica); then back: planned failover to A, commit, reprotect A → B — B's old
    // primary becomes the replica, seeded from its own disks, into the bucket.
    let stage = |phase: &mut Phases, from: &Path, to: &Path, back: &str| {
        run_ok(
            replog()
                .arg("failover")
                .arg(from)
                .arg("vm1")
                .arg("--planned"),
        );
        phase.done("planned failover");
        run_ok(replog().arg("commit").arg(to).arg("vm1"));
        phase.done("commit");
        run_ok(
            replog()
                .arg("reprotect")
                .arg(to)
                .arg("vm1")
                .args(["--target", back]),
        );
        phase.done("reprotect");
    };
    stage(&mut phase, &a, &b, &addr_a);
    write_some(&sb.disk("os"), 7, 20);
    wait_shipped(&b);
    phase.done("written and shipped at B");
    stage(&mut phase, &b, &a, &addr_b);
    write_some(&sa.disk("os"), 8, 20);
    wait_shipped(&a);
    phase.done("written and shipped at A, into the bucket");
    assert!(restore_os(&b, "latest", &tmp.path().join("r2")) == read_all(&sa.disk("os")));
    phase.done("restored from the bucket");
    assert!(
        !b.join("replicas").exists(),
        "the replica went to the bucket"
    );
    assert!(!cluster.keys("cycle/vm1/m/").is_empty());
    sa.stop();
    sb.stop();
}

#[test]
fn damage_in_the_bucket_is_found_by_the_scrub_and_mended_by_a_resync() {
    let test = "damage_in_the_bucket_is_found_by_the_scrub_and_mended_by_a_resync";
    let Some(Setup {
        cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "scrub", "32M")
    else {
        return;
    };
    edit_config(&src, |c| c.replication.resync_window = "always".into());
    let _target = S3Target::start(&dst, &addr, &[]);
    let served = Served::start(&src, &tmp.path().join("mnt"), &[]);
    let os = served.disk("os");
    write_some(&os, 1, 10);
    protect_when_listening(&src, &addr);
    for round in 2..6 {
        write_some(&os, round, 10);
        std::thread::sleep(Duration::from_millis(300));
    }
    caught_up(&src);
    // Bit rot in the store: a byte of a stored segment flips.
    let segments: Vec<String> = cluster
        .keys("scrub/vm1/d/segments/")
        .into_iter()
        .filter(|k| k.contains(".seg.enc~"))
        .collect();
    assert!(segments.len() >= 2, "{segments:?}");
    let victim = &segments[segments.len() / 2];
    let bucket = replica_objects(&cluster);
    use replog::replica::objects::ObjectStore;
    let mut bytes = bucket.get(victim).expect("get").expect("segment");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    bucket.put(victim, &bytes).expect("damage");
    // The target's scrub finds it, the source is told, resyncs, and the replica is
    // whole again.
    wait_for(&src, "resynced after the damage", |m| {
        let total = m["resync"]["chunks_total"].as_u64().unwrap_or(0);
        total > 0 && m["resync"]["chunks_compared"].as_u64() == Some(total)
    });
    write_some(&os, 9, 5);
    caught_up(&src);
    assert!(restore_os(&dst, "latest", &tmp.path().join("r")) == read_all(&os));
}

/// `replog accept-loss` against a replica in the bucket: with the target's serve
/// running, the request goes through it, so the store keeps one writer (the receiver
/// holding the replica), and the ranges given up read as zeroes after the source's
/// stopped loop starts again.
#[test]
fn damage_at_both_ends_is_given_up_in_the_bucket_through_the_targets_serve() {
    let test = "damage_at_both_ends_is_given_up_in_the_bucket_through_the_targets_serve";
    let Some(Setup {
        cluster,
        src,
        dst,
        addr,
        tmp,
        ..
    }) = setup(test, "loss", "4M")
    else {
        return;
    };
    // This process opens the bucket's replicas itself (the merge and the scrub).
    for (k, v) in seaweed::env() {
        std::env::set_var(k, v);
    }
    edit_config(&src, |c| {
        c.replication.resync_window = "never".into();
        c.replication.resync_weekends = false;
        // The source merges nothing: the segment holding `x` stays in its journal.
        c.journal.compact_min_bytes = 1 << 40;
        c.journal.compact_idle_ms = 1 << 40;
    });
    let mnt = tmp.path().join("mnt");
    let (x, y) = (common::pattern(41, 8192), common::pattern(42, 4096));
    {
        let _target = S3Target::start(&dst, &addr, &[]);
        let served = Served::start(&src, &mnt, &[]);
        let os = served.disk("os");
        write_at(&os, 0, &common::pattern(40, 1 << 20));
        protect_when_listening(&src, &addr);
        caught_up(&src);
        write_at(&os, 65_536, &x);
        write_at(&os, 1 << 20, &y);
        caught_up(&src);
        assert!(served.stop().success());
    }
    // The replica's merge folds `x` into parent chunk 0 of disk 0, in the bucket; that
    // object rots and the scrub drops it.
    let replicas = replog::replica::store::Replicas::local(&dst).expect("replicas");
    let much_later = replog::format::now_ns() + 400 * 24 * 3600 * 1_000_000_000;
    replog::replica::compact::compact_replica(&replicas, "vm1", much_later).expect("merge");
    let bucket = replica_objects(&cluster);
    use replog::replica::objects::ObjectStore;
    let chunks: Vec<String> = cluster
        .keys("loss/vm1/")
        .into_iter()
        .filter(|k| k.contains("/parent/0/0000000000.enc"))
        .collect();
    assert!(!chunks.is_empty(), "{:?}", cluster.keys("loss/vm1/"));
    for key in &chunks {
        let mut bytes = bucket.get(key).expect("get").expect("chunk");
        let at = bytes.len() - 100;
        bytes[at] ^= 1;
        bucket.put(key, &bytes).expect("damage");
    }
    replog::replica::scrub::scrub_replica(&replicas, "vm1", u64::MAX).expect("scrub");
    // The source's copy of `x` rots too, in its journal.
    assert_eq!(
        rot_in_journal(&src, &x),
        1,
        "x is not in one segment of the source's journal"
    );

    let target = S3Target::start(&dst, &addr, &[]);
    let served = Served::start(&src, &mnt, &[]);
    let st = wait_for(&src, "refused as lost at the target", |m| {
        m["reason"].as_str().unwrap_or("").contains("lost them too")
    });
    assert_eq!(st["machines"][0]["health"], "critical", "{st}");
    let listed = run_ok(replog().arg("accept-loss").arg(&dst).arg("vm1"));
    assert!(listed.contains("disk 0 (os) bytes 0..262144"), "{listed}");
    let again = run_ok(replog().arg("accept-loss").arg(&dst).arg("vm1"));
    assert_eq!(listed, again, "listing changed what is listed");
    accept_loss_yes(&dst);
    assert!(
        target.log_text().contains("an operator gave up"),
        "the target's serve did not carry it out:\n{}",
        target.log_text()
    );
    // Nothing is listed any more.
    let after = replog()
        .arg("accept-loss")
        .arg(&dst)
        .arg("vm1")
        .output()
        .expect("run");
    let said = String::from_utf8_lossy(&after.stderr);
    assert!(
        !after.status.success() && said.contains("lists no lost ranges"),
        "{said}"
    );
    let out = run_ok(replog().arg("resync").arg(&src).arg("vm1").arg("--now"));
    assert!(out.contains("starts again"), "{out}");
    caught_up(&src);
    let os = served.disk("os");
    let disk = read_all(&os);
    assert!(
        disk[65_536..65_536 + 8192].iter().all(|b| *b == 0),
        "x is not the zeroes given up"
    );
    assert_eq!(
        &disk[1 << 20..(1 << 20) + 4096],
        &y[..],
        "y, outside the lost chunk, changed"
    );
    assert!(restore_os(&dst, "latest", &tmp.path().join("r")) == disk);
    assert!(served.stop().success());
}
