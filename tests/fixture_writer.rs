//! Writes the fixtures of the formats this build writes (`tests/fixtures/v2`, see its
//! README) — run by hand when a format gains a version, never in CI:
//!
//! ```text
//! cargo test --test fixture_writer -- --ignored
//! ```
//!
//! When a format changes again, bump its version, change this writer to write the new
//! fixtures into a new directory (`v3`), and keep the old ones with their tests.

mod common;

use common::pair::{create_vm1, replog, restore, start_target, trusted_pair};
use replog::replica::store::Replicas;
use replog::replication::protocol::{self, Message};
use replog::replication::shipper::Shipper;
use replog::Site;
use sha2::Digest;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        let t = e.file_type().expect("type");
        if t.is_dir() {
            copy_dir(&e.path(), &dst);
        } else if t.is_file() {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// A site copied for a fixture, without what only a running process has.
fn keep_site(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    copy_dir(from, to);
    for f in ["lock", "status.json", "trusted-peers.lock", "control.sock"] {
        let _ = std::fs::remove_file(to.join(f));
    }
    let _ = std::fs::remove_file(to.join("replicas/vm1/merge.lock"));
    for d in ["machines", "replicas"] {
        if to.join(d).is_dir() {
            std::fs::write(to.join(d).join(".keep"), b"").expect("keep");
        }
    }
}

fn scatter(m: &replog::Machine, disk: &str, seed: u64, n: u64) {
    let v = m.volume(disk).expect("vol");
    let blocks = v.size() / 4096;
    for i in 0..n {
        let b = (seed * 7919 + i * 104_729) % blocks;
        v.write(b * 4096, &common::pattern(seed + i, 4096))
            .expect("write");
    }
}

fn hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
#[ignore]
fn write_version_2_fixtures() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    create_vm1(&a, &common::pattern(17, 256 << 10), "2M", "1M");
    let addr = start_target(&b);
    let site = Site::open(&a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut sh = Shipper::new(&a, &m, &addr);
    sh.set_retention(3_600_000, 7_200_000);
    sh.ship_once(&m).expect("initial");
    for round in 0..3u64 {
        scatter(&m, "os", 10 + round, 12);
        scatter(&m, "data", 40 + round, 4);
        m.flush().expect("flush");
        if round == 1 {
            m.checkpoint().expect("app point");
        }
        m.volume("os")
            .expect("vol")
            .write_zeroes(8192 * (round + 1), 4096)
            .expect("zero");
        m.flush().expect("flush");
        m.seal().expect("seal");
        sh.ship_once(&m).expect("ship");
    }
    // One merge at the target (all but the newest point expired "three hours later").
    sh.set_retention(1000, 1000);
    scatter(&m, "os", 70, 6);
    m.flush().expect("flush");
    m.seal().expect("seal");
    sh.ship_once(&m).expect("ship");
    let replicas = Replicas::local(&b).expect("replicas");
    let later = replog::format::now_ns() + 3 * 3600 * 1_000_000_000;
    replog::replica::compact::compact_replica(&replicas, "vm1", later).expect("merge");
    sh.set_retention(3_600_000, 7_200_000);
    scatter(&m, "os", 100, 8);
    m.flush().expect("flush");
    m.seal().expect("seal");
    sh.ship_once(&m).expect("ship");
    replog::replica::scrub::scrub_replica(&replicas, "vm1", u64::MAX).expect("scrub");

    // v2/target: a replica with a merged parent, segments after it, a scrub state.
    keep_site(&b, &out.join("target/site"));
    let mut sums = String::new();
    for at in ["latest"] {
        let o = tmp.path().join(format!("restored-{at}"));
        assert!(restore(&b, at, &o).expect("restore").verified);
        for d in ["os", "data"] {
            let img = std::fs::read(o.join(format!("{d}.img"))).expect("image");
            sums.push_str(&format!("{} {at} {d}\n", hex(&img)));
        }
    }
    std::fs::write(out.join("target/expected.sha256"), sums).expect("sums");

    // v2/site: the source, protected (machine.meta 2, segments 2, relationship),
    // its disks as they read now.
    replog::replication::relationship::Relationship {
        target: addr.clone(),
        target_id: replog::identity::Identity::load(&b)
            .expect("id")
            .id()
            .to_string(),
        retention: Some("1h".into()),
        app_retention: Some("2h".into()),
        ..Default::default()
    }
    .save(&a, "vm1")
    .expect("relationship");
    scatter(&m, "data", 300, 3);
    m.flush().expect("flush");
    let mut sums = String::new();
    for d in ["os", "data"] {
        let v = m.volume(d).expect("vol");
        let mut buf = vec![0u8; v.size() as usize];
        v.read(0, &mut buf).expect("read");
        sums.push_str(&format!("{} now {d}\n", hex(&buf)));
    }
    drop(sh);
    m.close().expect("close");
    drop(site);
    keep_site(&a, &out.join("site/site"));
    std::fs::write(out.join("site/expected.sha256"), sums).expect("sums");

    // v2/target-resyncing and v2/source: a resync stopped after its first batch.
    let site = Site::open(&a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut sh = Shipper::new(&a, &m, &addr);
    sh.ship_once(&m).expect("ship");
    scatter(&m, "os", 500, 20);
    m.flush().expect("flush");
    m.seal().expect("seal");
    sh.release_hold(m.status().last_lsn);
    m.compact().expect("compact");
    scatter(&m, "os", 900, 4);
    m.flush().expect("flush");
    m.seal().expect("seal");
    assert!(sh.ship_once(&m).is_err(), "the chain should be broken");
    replog::replication::resync_schedule::SourceResync::require(&a, "vm1", "fixture")
        .expect("require");
    let stop = Arc::new(AtomicBool::new(false));
    sh.stop_on(stop.clone());
    {
        let stop = stop.clone();
        sh.on_progress(Box::new(move |done, _| {
            if done > 0 {
                stop.store(true, Ordering::Release);
            }
        }));
    }
    sh.resync_batched(&m, 4096, 1 << 20)
        .expect_err("did not stop");
    keep_site(&b, &out.join("target-resyncing/site"));
    let s = out.join("source");
    let _ = std::fs::remove_dir_all(&s);
    std::fs::create_dir_all(&s).expect("mkdir");
    for f in ["relationship.toml", "resync.toml"] {
        std::fs::copy(a.join("machines/vm1").join(f), s.join(f)).expect("copy");
    }
    m.close().expect("close");

    // v2/protocol: a Hello and a Protect as this build sends them.
    let p = out.join("protocol");
    std::fs::create_dir_all(&p).expect("mkdir");
    std::fs::write(
        p.join("hello.frame"),
        protocol::encode(&protocol::hello([7; 32])).expect("hello"),
    )
    .expect("write");
    let protect = Message::Protect {
        machine: "vm1".into(),
        machine_id: 42,
        generation: 3,
        disks: vec![("os".into(), 4 << 20)],
        base_lsn: 10,
        base_seq: 2,
        retention_ms: 1000,
        app_retention_ms: 2000,
    };
    std::fs::write(
        p.join("protect.frame"),
        protocol::encode(&protect).expect("protect"),
    )
    .expect("write");

    // v2/jobs: the jobs the source site recorded (format 1).
    let j = out.join("jobs");
    let _ = std::fs::remove_dir_all(&j);
    let mut job = replog::jobs::JobHandle::start(&a, replog::jobs::JobKind::Restore, Some("vm1"))
        .expect("job");
    job.step("a step");
    job.finish(|| Ok("checked".into())).expect("finish");
    copy_dir(&a.join("jobs"), &j);
}

/// `tests/fixtures/v3`: the formats the failover issue changed or added — machine
/// manifest 3 (base, pending, intent) for a promoted machine, a test copy, a primary
/// with a planned failover's intent and a failed-over one; the replica's promotion
/// record (kind 9, version 1); `Promote` / `Promoted` frames and this build's `Hello`
/// (with the failover feature bit).
#[test]
#[ignore]
fn write_version_3_fixtures() {
    use replog::format::meta::{self, DiskEntry, Manifest};
    use replog::protection::{Base, FailoverKind, Fence, Intent, Pending, Role};
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v3");
    let _ = std::fs::remove_dir_all(&out);
    let m = out.join("manifests");
    std::fs::create_dir_all(&m).expect("mkdir");
    let disks = vec![DiskEntry {
        id: 0,
        name: "os".into(),
        size: 16 << 20,
    }];
    let base = Base {
        replica: "vm1".into(),
        lsn: 1234,
        time_ns: 1_796_000_000_000_000_000,
    };
    let promoted = Manifest {
        disks: disks.clone(),
        role: Role::Primary,
        generation: 2,
        base: Some(base.clone()),
        pending: Some(Pending {
            kind: FailoverKind::Unplanned,
            from_generation: 1,
            source_site: [5; 32],
            started_ns: 1_796_000_001_000_000_000,
        }),
        ..Manifest::new(42)
    };
    let test_copy = Manifest {
        disks: disks.clone(),
        role: Role::Test,
        generation: 1,
        base: Some(base),
        ..Manifest::new(42)
    };
    let intent = Manifest {
        disks: disks.clone(),
        intent: Some(Intent {
            target_site: [6; 32],
            target: "127.0.0.1:7000".into(),
            generation: 2,
            job: "j-20261202T000000-000000-abcd".into(),
            started_ns: 1_796_000_002_000_000_000,
        }),
        ..Manifest::new(42)
    };
    let failed_over = Manifest {
        disks,
        fence: Some(Fence {
            by_site: [6; 32],
            generation: 2,
            at_ns: 1_796_000_003_000_000_000,
            reason: "planned failover at LSN 1234".into(),
        }),
        ..Manifest::new(42)
    };
    for (name, man) in [
        ("promoted.meta", promoted),
        ("test-copy.meta", test_copy),
        ("intent.meta", intent),
        ("failed-over.meta", failed_over),
    ] {
        std::fs::write(m.join(name), man.encode()).expect("write");
    }
    let promotion = replog::replica::store::Promotion {
        kind: FailoverKind::Planned,
        generation: 2,
        from_generation: 1,
        lsn: 1234,
        at_ns: 1_796_000_004_000_000_000,
        site: [6; 32],
        committed: false,
    };
    let body = postcard::to_stdvec(&promotion).expect("postcard");
    std::fs::write(
        m.join("promotion.meta"),
        meta::encode(meta::KIND_PROMOTION, &body),
    )
    .expect("write");
    write_frames(
        &out.join("protocol"),
        [
            ("hello.frame", protocol::hello([7; 32])),
            (
                "promote.frame",
                Message::Promote {
                    machine: "vm1".into(),
                    machine_id: 42,
                    generation: 2,
                    lsn: 1234,
                },
            ),
            (
                "promoted.frame",
                Message::Promoted {
                    machine: "vm1".into(),
                    generation: 2,
                    lsn: 1234,
                },
            ),
        ],
    );
}

/// `tests/fixtures/v4`: the formats the reprotect issue added — a changed-block map
/// (kind 10, version 1), a reprotect seed (kind 11, version 1), an orphan point's
/// `orphan.json`; `Reprotect` / `ReprotectState` frames and this build's `Hello` (with
/// the reprotect feature bit).
#[test]
#[ignore]
fn write_version_4_fixtures() {
    use replog::failover::reprotect::{Seed, SeedState};
    use replog::format::meta;
    use replog::replication::protocol::{Held, OrphanReport};
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4");
    let _ = std::fs::remove_dir_all(&out);
    let m = out.join("meta");
    std::fs::create_dir_all(&m).expect("mkdir");
    let mut map = replog::volume::ChangedMap::new(1234, Some(1300), 2);
    map.add(0, 4096, 8192);
    map.add(0, 1 << 20, 4096);
    map.add(1, 0, 65536);
    std::fs::write(m.join("changed.meta"), map.encode().expect("encode")).expect("write");
    let orphan = OrphanReport {
        id: "orphan-g1-1400".into(),
        first_lsn: 1235,
        last_lsn: 1400,
        bytes: 12288,
        first_ns: 1_796_000_005_000_000_000,
        last_ns: 1_796_000_006_000_000_000,
    };
    let seed = Seed {
        source_site: [6; 32],
        generation: 2,
        from_generation: 1,
        since: 1234,
        tail: vec![(0, 8192, 4096), (1, 65536, 8192)],
        covered: true,
        orphan: Some(orphan.clone()),
        state: SeedState::Seeding {
            disk: 1,
            offset: 64 << 20,
        },
        seeded_bytes: 1 << 20,
        verified: None,
    };
    let body = postcard::to_stdvec(&seed).expect("postcard");
    std::fs::write(m.join("seed.meta"), meta::encode(meta::KIND_SEED, &body)).expect("write");
    std::fs::write(
        m.join("orphan.json"),
        serde_json::to_string_pretty(&orphan).expect("json"),
    )
    .expect("write");
    write_frames(
        &out.join("protocol"),
        [
            ("hello.frame", protocol::hello([7; 32])),
            (
                "reprotect.frame",
                Message::Reprotect {
                    machine: "vm1".into(),
                    machine_id: 42,
                    generation: 2,
                    since: 1234,
                    foreign_upto: Some(1300),
                    disks: vec![("os".into(), 16 << 20)],
                    base_lsn: 1500,
                    base_seq: 7,
                    probe: false,
                },
            ),
            (
                "reprotect-state.frame",
                Message::ReprotectState {
                    machine: "vm1".into(),
                    held: Held::Seeded,
                    generation: 2,
                    tail: vec![(0, 8192, 4096)],
                    covered: true,
                    seeded_bytes: 1 << 20,
                    orphan: Some(orphan),
                    verified: Some(1501),
                },
            ),
        ],
    );
}

#[test]
#[ignore]
fn write_version_5_fixtures() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v5");
    let _ = std::fs::remove_dir_all(&out);
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    for m in ["vm1", "vm2"] {
        replog(&["disk", "create", &format!("{m}/os"), "--size", "1M"], &a);
    }
    let addr = start_target(&b);
    let site = Site::open(&a).expect("source");
    let ms: Vec<replog::Machine> = ["vm1", "vm2"]
        .iter()
        .map(|n| site.open_machine(n).expect("machine"))
        .collect();
    let mut shippers: Vec<Shipper> = ms.iter().map(|m| Shipper::new(&a, m, &addr)).collect();
    for (m, sh) in ms.iter().zip(shippers.iter_mut()) {
        sh.set_retention(3_600_000, 7_200_000);
        sh.ship_once(m).expect("initial");
        scatter(m, "os", 5, 6);
        m.flush().expect("flush");
    }
    // v5/target: two replicas whose segments hold one plan point (index version 2).
    let refs: Vec<&replog::Machine> = ms.iter().collect();
    let pp = replog::volume::plan_point(&refs, true, std::time::Duration::from_secs(5))
        .expect("plan point");
    for (m, sh) in ms.iter().zip(shippers.iter_mut()) {
        scatter(m, "os", 9, 3);
        m.flush().expect("flush");
        m.seal().expect("seal");
        sh.ship_once(m).expect("ship");
    }
    keep_site(&b, &out.join("target/site"));
    let _ = std::fs::remove_file(out.join("target/site/replicas/vm2/merge.lock"));
    let points: Vec<serde_json::Value> = pp
        .points
        .iter()
        .map(|(m, p)| serde_json::json!({"machine": m, "lsn": p.lsn}))
        .collect();
    std::fs::write(
        out.join("target/plan-point.json"),
        serde_json::to_string_pretty(&serde_json::json!({"id": pp.id, "points": points}))
            .expect("json"),
    )
    .expect("write");

    // v5/site: a plan file and the state of a run of it (format 1), stopped at a
    // manual step.
    let site_dir = out.join("site");
    std::fs::create_dir_all(site_dir.join("plans/runs")).expect("mkdir");
    let plan_text = "name = \"erp\"\n[[group]]\nmachines = [\"vm1\"]\n  [[group.after]]\n  run = \"/bin/true --quick\"\n  timeout = \"2m\"\n  on = [\"test\", \"planned\"]\n  [[group.after]]\n  manual = \"Check vm1\"\n[[group]]\nmachines = [\"vm2\"]\n";
    std::fs::write(site_dir.join("plans/erp.toml"), plan_text).expect("write");
    let plan =
        replog::plan::file::parse(plan_text, "erp.toml", &replog::plan::file::Checks::STORED)
            .expect("plan");
    let job = "j-20261203T220000-000001-abcd".to_string();
    let mut machines = std::collections::BTreeMap::new();
    for (m, state) in [
        ("vm1", replog::plan::run::MachineState::Up),
        ("vm2", replog::plan::run::MachineState::Pending),
    ] {
        machines.insert(
            m.to_string(),
            replog::plan::run::MachineRun {
                name: format!("{m}-test"),
                point: "latest".into(),
                job: (m == "vm1").then(|| "j-20261203T220000-000002-abcd".to_string()),
                state,
                detail: None,
                made: m == "vm1",
            },
        );
    }
    let run = replog::plan::run::Run {
        format: replog::plan::run::FORMAT,
        job: job.clone(),
        plan,
        kind: replog::protection::FailoverKind::Test,
        at: "latest".into(),
        plan_point: None,
        next: 3,
        state: replog::plan::run::RunState::Waiting,
        machines,
        failures: Vec::new(),
        action: None,
        mount: Some("/mnt/dr".into()),
    };
    std::fs::write(
        site_dir.join(format!("plans/runs/{job}.json")),
        serde_json::to_string_pretty(&run).expect("json"),
    )
    .expect("write");
}

/// v6: the formats of the object-store target and of operations — a bucket holding a
/// replica (object manifests, kind 12 version 1, and immutable data objects), site.toml
/// format 2 (`[replica] store`, `[replica.s3]`), relationship.toml format 2 (`rpo`,
/// `bandwidth`, `bandwidth_schedule`), and a site identity rotated twice
/// (`lineage.pem`).
#[test]
#[ignore]
fn write_version_6_fixtures() {
    use replog::replica::objects::{MemObjects, ObjectBackend, ObjectStore};
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v6");
    let _ = std::fs::remove_dir_all(&out);
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    create_vm1(&a, &common::pattern(61, 256 << 10), "1M", "512K");

    // object-store/: what an S3 target keeps of vm1, received over the protocol.
    let bucket = Arc::new(MemObjects::new());
    let key = replog::site::replica_key_at(&b).expect("key");
    let backend = ObjectBackend::new(
        bucket.clone(),
        replog::replica::backend::DirBackend::new(
            Arc::new(replog::storage::FileStorage),
            tmp.path().join("state"),
        ),
        std::time::Duration::from_secs(1),
        false,
    );
    let replicas = Replicas::new(Arc::new(backend), key.clone());
    let addr = common::pair::start_receiver_into(&b, replicas.clone());
    let site = Site::open(&a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut sh = Shipper::new(&a, &m, &addr);
    sh.set_retention(3_600_000, 7_200_000);
    sh.ship_once(&m).expect("initial");
    for round in 0..2u64 {
        scatter(&m, "os", 20 + round, 8);
        scatter(&m, "data", 30 + round, 3);
        m.flush().expect("flush");
        if round == 0 {
            m.checkpoint().expect("app point");
        }
        m.seal().expect("seal");
        sh.ship_once(&m).expect("ship");
    }
    let dir = out.join("object-store");
    for k in bucket.keys() {
        let bytes = bucket.get(&k).expect("get").expect("object");
        let p = dir.join("bucket").join(&k);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write");
    }
    std::fs::copy(
        replog::site::replica_key_path(&b).expect("key path"),
        dir.join("replica.key"),
    )
    .expect("key");
    let o = tmp.path().join("restored");
    let store = replicas.open_readonly("vm1").expect("replica");
    assert!(
        replog::replica::restore::restore_at(store, "latest", &o, &|_, _| {})
            .expect("restore")
            .verified
    );
    let mut sums = String::new();
    for d in ["os", "data"] {
        let img = std::fs::read(o.join(format!("{d}.img"))).expect("image");
        sums.push_str(&format!("{} latest {d}\n", hex(&img)));
    }
    std::fs::write(dir.join("expected.sha256"), sums).expect("sums");

    // site/site.toml: format 2, with an object-store target.
    let mut c = replog::config::SiteConfig::default();
    c.replica.store = "s3://replicas/site-b".into();
    c.replica.s3.endpoint = "http://127.0.0.1:8333".into();
    c.replica.s3.region = "eu-west-1".into();
    std::fs::create_dir_all(out.join("site")).expect("mkdir");
    std::fs::write(out.join("site/site.toml"), c.to_toml()).expect("site.toml");

    // source/relationship.toml: format 2, with an RPO and a bandwidth schedule.
    replog::replication::relationship::Relationship {
        target: addr.clone(),
        target_id: replog::identity::Identity::load(&b)
            .expect("id")
            .id()
            .to_string(),
        retention: Some("1h".into()),
        app_retention: Some("2h".into()),
        rpo: Some("30s".into()),
        bandwidth: Some("50MiB/s".into()),
        bandwidth_schedule: Some("Mon-Fri 08:00-18:00=10MiB/s, *=unlimited".into()),
        ..Default::default()
    }
    .save(&a, "vm1")
    .expect("relationship");
    std::fs::create_dir_all(out.join("source")).expect("mkdir");
    std::fs::copy(
        a.join("machines/vm1/relationship.toml"),
        out.join("source/relationship.toml"),
    )
    .expect("copy");

    // identity/: a site that rotated its certificate twice; `expected-id` its ID.
    let id_site = tmp.path().join("rotated");
    std::fs::create_dir_all(&id_site).expect("mkdir");
    let first = replog::identity::Identity::create(&id_site).expect("identity");
    replog::identity::Identity::rotate(&id_site, None).expect("rotate");
    replog::identity::Identity::rotate(&id_site, None).expect("rotate");
    copy_dir(&id_site.join("identity"), &out.join("identity"));
    std::fs::write(out.join("identity/expected-id"), first.id().to_string()).expect("id");
}

/// v7: what a target keeps beside a replica since hash pages (layout 1: piece bytes,
/// hash id, 64 slots of nonce + hashes) and the list of what a resync lost at both
/// ends (`dropped`, text), both written by this build over a copy of `v2/target`
/// (whose replica key and chunk files the pages belong to).
#[test]
#[ignore]
fn write_version_7_fixtures() {
    use replog::chunk_hash::ChunkHash;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = root.join("v7");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("mkdir");
    let tmp = tempfile::tempdir().expect("tmp");

    // hash-pages/: the pages a resync writes back over a replica that had none.
    let site = tmp.path().join("pages");
    copy_dir(&root.join("v2/target/site"), &site);
    let store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    for d in 0..store.manifest().disks.len() as u32 {
        store
            .resync_hashes(4096, d, 0, u64::MAX, ChunkHash::Blake3)
            .expect("hashes");
    }
    copy_dir(&site.join("replicas/vm1/hashes"), &out.join("hash-pages"));

    // dropped: a resync begun over a replica whose parent chunk 1 of disk 1 rotted.
    let site = tmp.path().join("dropped");
    copy_dir(&root.join("v2/target/site"), &site);
    let chunk = site.join("replicas/vm1/parent/1/0000000001.enc");
    let mut b = std::fs::read(&chunk).expect("chunk");
    let at = b.len() - 9;
    b[at] ^= 1;
    std::fs::write(&chunk, &b).expect("damage");
    let mut store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    store
        .mark_damaged("parent chunk 1 of disk 1")
        .expect("mark");
    let w = store.received();
    store
        .begin_resync(w.lsn, w.segment_seq, 4096)
        .expect("begin");
    std::fs::copy(site.join("replicas/vm1/dropped"), out.join("dropped")).expect("copy");
}

/// Version 8: a source site whose journal's newest segment was written into a
/// recycled file (the segment header's incompatible bit RECYCLED and its salt, record
/// CRCs salted, an earlier segment's bytes after its records) with one spare left
/// beside it, as a crash leaves them.
#[test]
#[ignore]
fn write_version_8_fixtures() {
    use replog::storage::{FileStorage, Storage};
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v8");
    let _ = std::fs::remove_dir_all(&out);
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tmp.path().join("a");
    Site::init(&a).expect("init");
    let site = Site::open(&a).expect("open");
    site.create_disk("vm1", "os", 1 << 20, None).expect("disk");
    let dir = site.machine_dir("vm1").expect("dir");
    drop(site);
    let cfg = replog::config::JournalConfig {
        segment_bytes: 64 << 10,
        ..replog::config::JournalConfig::default()
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage);
    let m = replog::Machine::open(storage, &dir, "vm1", cfg).expect("machine");
    let v = m.volume("os").expect("vol");
    let write = |at: u64, len: usize, seed: u8| {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        v.write(at, &data).expect("write");
    };
    // Three segments, merged: two kept as spares.
    for i in 0..48u64 {
        write(i * 5_000, 4_000, i as u8);
    }
    m.flush().expect("flush");
    m.seal().expect("seal");
    m.compact().expect("compact");
    // One more segment and the start of the next, written into spares, over the
    // ranges the spares' stale records wrote (so reading any of those back as this
    // journal's would change the disk).
    for i in 0..20u64 {
        write(i * 12_000 + 1_000, 4_000, 0x40 + i as u8);
    }
    m.flush().expect("flush");
    let mut buf = vec![0u8; 1 << 20];
    v.read(0, &mut buf).expect("read");
    let sums = format!("{} now os\n", hex(&buf));
    // Left as a crash leaves it: no close.
    drop(v);
    drop(m);
    let names: Vec<String> = std::fs::read_dir(dir.join("journal"))
        .expect("journal")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.ends_with(".spare")), "{names:?}");
    keep_site(&a, &out.join("site/site"));
    std::fs::write(out.join("site/expected.sha256"), sums).expect("sums");
}

/// The chunk frames of protocol 2 (`SegmentChunk`, `InitialChunk`, `ResyncChunk`) as
/// the whole-message encoder writes them: since 184a8e5 a source writes them as a head
/// and the payload apart and the target reads segment chunks in place; these frames
/// pin the bytes both must keep.
#[test]
#[ignore]
fn write_chunk_frame_fixtures() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v8/protocol");
    let _ = std::fs::remove_dir_all(&out);
    write_frames(
        &out,
        common::frames::chunk_messages(&common::frames::payload()),
    );
}

/// Protocol frames of the read-ahead for a planned failover's check: `PromoteSoon`,
/// and a `Hello` with `FEATURE_PROMOTE_SOON`.
#[test]
#[ignore]
fn write_version_9_fixtures() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v9/protocol");
    let _ = std::fs::remove_dir_all(&out);
    write_frames(
        &out,
        [
            ("hello.frame", protocol::hello([9; 32])),
            (
                "promote-soon.frame",
                Message::PromoteSoon {
                    machine: "vm1".into(),
                    generation: 3,
                },
            ),
        ],
    );
}

/// Write each message as one frame file in `dir` (created if missing).
fn write_frames<'a>(dir: &Path, frames: impl IntoIterator<Item = (&'a str, Message)>) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, msg) in frames {
        std::fs::write(dir.join(name), protocol::encode(&msg).expect("encode")).expect("write");
    }
}

/// `relationship.toml` format 3: a relationship paused by `replog pause`; the copy
/// mark (`copied.toml`, format 1) of its initial copy.
#[test]
#[ignore]
fn write_version_10_fixtures() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v10/source");
    let _ = std::fs::remove_dir_all(&out);
    let site = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(site.path().join("machines/vm1")).expect("mkdir");
    let rel = replog::replication::relationship::Relationship {
        target: "10.0.0.2:7000".into(),
        target_id: "ab".repeat(32),
        retention: Some("24h".into()),
        app_retention: Some("72h".into()),
        rpo: Some("30s".into()),
        paused: true,
        ..Default::default()
    };
    rel.save(site.path(), "vm1").expect("relationship");
    replog::replication::relationship::CopyMark::record(site.path(), "vm1", &rel, 3)
        .expect("copy mark");
    std::fs::create_dir_all(&out).expect("mkdir");
    for f in ["relationship.toml", "copied.toml"] {
        std::fs::copy(site.path().join("machines/vm1").join(f), out.join(f)).expect("copy");
    }
}
