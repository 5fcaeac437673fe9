//! Every format fixture under tests/fixtures (see its README) opens as it should: read
//! the same as when it was written, or refused with a message naming both versions.

mod common;

use replog::replica::store::Replicas;
use replog::replication::protocol::{self, FrameError, Message, RefusalCode};
use sha2::Digest;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// A fresh copy of fixture site `name` (its `site/` directory). Its retention was an
/// hour when it was written; the copy keeps every point for a century, so that the
/// points it had then are there whenever the test runs (its retention.meta is read
/// first, as written).
fn site_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("site");
    copy_dir(&fixtures().join(name).join("site"), &site);
    let replicas: Vec<PathBuf> = std::fs::read_dir(site.join("replicas"))
        .map(|e| e.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    for r in replicas.iter().map(|d| d.join("retention.meta")) {
        if !r.exists() {
            continue;
        }
        let b = std::fs::read(&r).expect("retention");
        let (v, _) = replog::format::meta::decode(replog::format::meta::KIND_RETENTION, &b)
            .expect("retention.meta decodes");
        assert_eq!(v, 1);
        let century: u64 = 100 * 365 * 24 * 3600 * 1000;
        let body = postcard::to_stdvec(&replog::replica::store::Retention {
            window_ms: century,
            app_window_ms: century,
        })
        .expect("encode");
        std::fs::write(
            &r,
            replog::format::meta::encode(replog::format::meta::KIND_RETENTION, &body),
        )
        .expect("write");
    }
    (tmp, site)
}

fn sha256(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Restore every point `expected.sha256` names and compare the sums.
fn check_expected(name: &str, site: &Path) {
    let sums = std::fs::read_to_string(fixtures().join(name).join("expected.sha256"))
        .expect("expected.sha256");
    for line in sums.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (sum, at, disk) = (f[0], f[1], f[2]);
        let out = site.with_file_name(format!("restored-{at}-{disk}"));
        let store = Replicas::local(site)
            .expect("replicas")
            .open_readonly("vm1")
            .expect("open replica");
        let r = replog::replica::restore::restore_at(store, at, &out, &|_, _| {})
            .unwrap_or_else(|e| panic!("{name}: restore {at}: {e}"));
        assert!(r.verified, "{name}: restore at {at} not verified");
        let got = std::fs::read(out.join(format!("{disk}.img"))).expect("image");
        assert_eq!(
            sha256(&got),
            sum,
            "{name}: {disk} at {at} reads differently"
        );
        std::fs::remove_dir_all(&out).expect("clean");
    }
}

#[test]
fn a_version_1_replica_opens_lists_its_points_and_restores_them_identically() {
    let (_t, site) = site_copy("v1/target");
    let replicas = Replicas::local(&site).expect("replicas");
    let store = replicas.open("vm1").expect("open for receiving");
    assert_eq!(
        store.generation(),
        1,
        "a version-1 manifest is generation 1"
    );
    let points: Vec<u64> = replog::replica::points::list(&store)
        .expect("points")
        .iter()
        .map(|p| p.lsn)
        .collect();
    let want: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("v1/target/points.json")).expect("points"),
    )
    .expect("json");
    let want: Vec<u64> = want
        .iter()
        .map(|p| p["lsn"].as_u64().expect("lsn"))
        .collect();
    assert_eq!(points, want);
    assert!(
        store.parent().point.is_some(),
        "the merged parent's point is kept"
    );
    drop(store);
    check_expected("v1/target", &site);
    // Every object authenticates: a whole scrub round finds nothing.
    let r = replog::replica::scrub::scrub_replica(&replicas, "vm1", u64::MAX).expect("scrub");
    assert!(r.round_completed && r.damage.is_none(), "{r:?}");
    // The target compactor folds it further, and it still reads the same at latest.
    let later = replog::format::now_ns() + 101 * 365 * 24 * 3600 * 1_000_000_000;
    let merged =
        replog::replica::compact::compact_replica(&replicas, "vm1", later).expect("compact");
    assert!(merged.merged_to.is_some(), "nothing merged: {merged:?}");
    let sums = std::fs::read_to_string(fixtures().join("v1/target/expected.sha256")).expect("sums");
    let latest: Vec<&str> = sums.lines().filter(|l| l.contains(" latest ")).collect();
    let out = site.with_file_name("after-merge");
    let store = replicas.open_readonly("vm1").expect("store");
    replog::replica::restore::restore_at(store, "latest", &out, &|_, _| {}).expect("restore");
    for l in latest {
        let f: Vec<&str> = l.split_whitespace().collect();
        let got = std::fs::read(out.join(format!("{}.img", f[2]))).expect("image");
        assert_eq!(sha256(&got), f[0], "after a merge of the v1 replica");
    }
}

#[test]
fn a_version_1_replica_after_a_resync_restores_through_its_patches() {
    let (_t, site) = site_copy("v1/target-resynced");
    let store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    assert!(store.parent().patches > 0, "the fixture has patches");
    assert!(store.parent().valid_from > 0);
    drop(store);
    check_expected("v1/target-resynced", &site);
}

#[test]
fn a_version_1_replica_in_the_middle_of_a_resync_resumes_it() {
    let (_t, site) = site_copy("v1/target-resyncing");
    let mut store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    let p = store
        .resync_progress()
        .expect("resync.meta decodes")
        .expect("a resync is under way");
    assert_eq!((p.base_lsn, p.base_seq, p.chunk_bytes), (153, 8, 4096));
    assert!(p.compared > 0 && p.patches == 1, "{p:?}");
    assert!(store.parent().resyncing);
    let err = replog::replica::points::resolve(&store, "latest").expect_err("a point");
    assert!(err.to_string().contains("resynchronised"), "{err}");
    // The same resync (same base and chunk size) resumes where it stopped.
    let again = store.begin_resync(153, 8, 4096).expect("resume");
    assert_eq!(again, p);
    // Its source side: resync.toml of format 1 (no header) with the base.
    let dir = tempfile::tempdir().expect("tmp");
    let m = dir.path().join("machines/vm1");
    std::fs::create_dir_all(&m).expect("mkdir");
    for f in ["resync.toml", "relationship.toml", "parents.stamp"] {
        std::fs::copy(fixtures().join("v1/source").join(f), m.join(f)).expect("copy");
    }
    std::fs::write(m.join("machine.meta"), b"").expect("placeholder");
    let r = replog::replication::resync_schedule::SourceResync::load(dir.path(), "vm1")
        .expect("resync.toml v1")
        .expect("present");
    assert_eq!(r.base, Some((153, 8)));
    assert_eq!(r.chunk_bytes, 4096);
    let rel = replog::replication::relationship::Relationship::load(dir.path(), "vm1")
        .expect("relationship.toml v1")
        .expect("present");
    assert_eq!(
        rel.retention_ms().expect("retention"),
        (3_600_000, 7_200_000)
    );
    // Written again, it is format 2 and reads back the same.
    r.save(dir.path(), "vm1").expect("save");
    let text = std::fs::read_to_string(m.join("resync.toml")).expect("read");
    assert!(
        text.starts_with("# replog resync state, format 2"),
        "{text}"
    );
    assert_eq!(
        replog::replication::resync_schedule::SourceResync::load(dir.path(), "vm1")
            .expect("v2")
            .expect("present"),
        r
    );
}

#[test]
fn a_replica_in_the_layout_before_recovery_points_is_refused_naming_both_layouts() {
    let (_t, site) = site_copy("v1/target-before-points");
    let err = Replicas::local(&site)
        .expect("replicas")
        .open_readonly("vm1")
        .expect_err("opened a base/ layout replica");
    let msg = err.to_string();
    assert!(
        matches!(err, replog::Error::Unsupported { .. })
            && msg.contains("layout 1")
            && msg.contains("layout 2"),
        "{msg}"
    );
}

/// The development layouts of parent.meta and resync.meta written under version 1.
#[test]
fn every_layout_written_as_version_1_decodes_exactly() {
    let legacy = fixtures().join("v1/legacy");
    for (file, want_point_recv, want_resync, want_valid_from, merging) in [
        ("parent.meta.dcea4b2", 0u64, false, 0u64, Some((2000, 19))),
        (
            "parent.meta.9c13afe",
            1_764_000_000_500_000_000,
            false,
            0,
            Some((2000, 19)),
        ),
        (
            "parent.meta.1f7c5c7",
            1_764_000_000_500_000_000,
            true,
            999,
            None,
        ),
    ] {
        let (_t, site) = site_copy("v1/target");
        std::fs::copy(legacy.join(file), site.join("replicas/vm1/parent.meta")).expect("copy");
        let store = Replicas::local(&site)
            .expect("replicas")
            .open_readonly("vm1")
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let p = store.parent();
        assert_eq!((p.lsn, p.seq), (1234, 17), "{file}");
        assert_eq!(p.merging_to, merging, "{file}");
        assert_eq!(
            (p.resyncing, p.valid_from, p.patches),
            (want_resync, want_valid_from, 0)
        );
        let point = p.point.as_ref().expect("point");
        assert_eq!(
            (point.lsn, point.received_ns),
            (1234, want_point_recv),
            "{file}"
        );
    }
    let (_t, site) = site_copy("v1/target");
    std::fs::copy(
        legacy.join("resync.meta.1f7c5c7"),
        site.join("replicas/vm1/resync.meta"),
    )
    .expect("copy");
    let p = Replicas::local(&site)
        .expect("replicas")
        .open_readonly("vm1")
        .expect("open")
        .resync_progress()
        .expect("decodes")
        .expect("present");
    assert_eq!(
        (
            p.base_lsn,
            p.base_seq,
            p.disk,
            p.next,
            p.compared,
            p.sent_chunks,
            p.sent_bytes,
            p.patches
        ),
        (500, 9, 1, 77, 333, 12, 40_000, 0)
    );
}

#[test]
fn a_metadata_file_of_a_newer_version_is_refused_naming_both() {
    let (_t, site) = site_copy("v1/target");
    let p = site.join("replicas/vm1/parent.meta");
    let b = std::fs::read(&p).expect("read");
    let body = &b[replog::format::meta::META_HEADER_LEN..];
    std::fs::write(
        &p,
        replog::format::meta::encode_version(replog::format::meta::KIND_PARENT_MARK, 9, body),
    )
    .expect("write");
    let err = Replicas::local(&site)
        .expect("replicas")
        .open_readonly("vm1")
        .expect_err("opened version 9");
    let msg = err.to_string();
    assert!(msg.contains("version 9") && msg.contains("1 to 2"), "{msg}");
}

/// A connection's two directions, in memory.
struct Duplex {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl std::io::Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_protocol_1_peer_is_refused_naming_both_versions() {
    for frame in ["hello.frame", "protect.frame"] {
        let bytes = std::fs::read(fixtures().join("v1/protocol").join(frame)).expect("frame");
        // Read by this build: refused, naming both versions.
        let err = protocol::read_frame::<Message>(&mut &bytes[..]).expect_err("decoded v1");
        assert!(matches!(err, FrameError::Version(1)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("version 1") && msg.contains("version 2"),
            "{msg}"
        );
        // Sent to a target: it answers with a refusal of class Version that says so.
        let tmp = tempfile::tempdir().expect("tmp");
        let replicas = Replicas::with_key(
            tmp.path(),
            replog::replica::crypt::ReplicaKey::from_bytes([1; 32]),
        );
        let target =
            replog::replication::receiver::Target::new(replog::identity::SiteId([8; 32]), replicas);
        let mut wire = Duplex {
            input: std::io::Cursor::new(bytes),
            output: Vec::new(),
        };
        target.session(&mut wire, replog::identity::SiteId([7; 32]));
        let (answer, _) = protocol::decode::<Message>(&wire.output).expect("an answer");
        match answer {
            Message::Error { code, message } => {
                assert_eq!(code, RefusalCode::Version);
                assert!(
                    message.contains("version 1") && message.contains("version 2"),
                    "{message}"
                );
            }
            other => panic!("answered {other:?}"),
        }
    }
}

#[test]
fn a_hello_with_another_version_or_missing_features_is_refused() {
    let err = protocol::check_hello(3, protocol::FEATURES, 0).expect_err("version 3");
    assert!(
        err.contains("version 3") && err.contains("version 2"),
        "{err}"
    );
    let err = protocol::check_hello(2, 0, 0).expect_err("no generations");
    assert!(err.contains("lacks"), "{err}");
    let err = protocol::check_hello(2, protocol::FEATURES, 1 << 40).expect_err("unknown bit");
    assert!(err.contains("requires"), "{err}");
    protocol::check_hello(2, protocol::FEATURES, protocol::REQUIRED_FEATURES).expect("this build");
}

// ------------------------------------------------------------------ version 2

fn version_of(path: &Path) -> u16 {
    let b = std::fs::read(path).expect("read");
    u16::from_le_bytes([b[8], b[9]])
}

#[test]
fn the_version_2_source_site_opens_and_reads_the_same_disks() {
    let (_t, site) = site_copy("v2/site");
    assert_eq!(version_of(&site.join("machines/vm1/machine.meta")), 2);
    let report = replog::inspect::inspect(&site).expect("inspect");
    assert!(report.ok(), "{:?}", report.corruption);
    let s = replog::Site::open(&site).expect("open");
    let m = s.open_machine("vm1").expect("machine");
    assert_eq!(m.generation(), 1);
    assert_eq!(m.role(), replog::protection::Role::Primary);
    assert!(m.fenced().is_none());
    let sums = std::fs::read_to_string(fixtures().join("v2/site/expected.sha256")).expect("sums");
    for line in sums.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let v = m.volume(f[2]).expect("vol");
        let mut buf = vec![0u8; v.size() as usize];
        v.read(0, &mut buf).expect("read");
        assert_eq!(
            sha256(&buf),
            f[0],
            "disk {} of the v2 site reads differently",
            f[2]
        );
    }
    assert!(
        replog::replication::relationship::Relationship::load(&site, "vm1")
            .expect("relationship")
            .is_some()
    );
}

#[test]
fn the_version_2_replica_opens_and_restores_identically() {
    let (_t, site) = site_copy("v2/target");
    let dir = site.join("replicas/vm1");
    assert_eq!(version_of(&dir.join("replica.meta")), 2);
    assert_eq!(version_of(&dir.join("parent.meta")), 2);
    let replicas = Replicas::local(&site).expect("replicas");
    let store = replicas.open("vm1").expect("open");
    assert_eq!(store.generation(), 1);
    assert!(store.scrub_state().expect("scrub").last_full_ns.is_some());
    drop(store);
    check_expected("v2/target", &site);
    let report = replog::inspect::inspect(&site).expect("inspect");
    assert!(report.ok(), "{:?}", report.corruption);

    let (_t, site) = site_copy("v2/target-resyncing");
    let store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    assert_eq!(version_of(&site.join("replicas/vm1/resync.meta")), 2);
    let p = store
        .resync_progress()
        .expect("decodes")
        .expect("under way");
    assert!(p.compared > 0, "{p:?}");
    let src = tempfile::tempdir().expect("tmp");
    let m = src.path().join("machines/vm1");
    std::fs::create_dir_all(&m).expect("mkdir");
    std::fs::copy(
        fixtures().join("v2/source/resync.toml"),
        m.join("resync.toml"),
    )
    .expect("copy");
    let r = replog::replication::resync_schedule::SourceResync::load(src.path(), "vm1")
        .expect("resync.toml format 2")
        .expect("present");
    assert_eq!(r.base.map(|b| b.0), Some(p.base_lsn));
}

#[test]
fn version_2_frames_and_job_records_decode() {
    let hello = std::fs::read(fixtures().join("v2/protocol/hello.frame")).expect("frame");
    match protocol::decode::<Message>(&hello).expect("hello").0 {
        Message::Hello {
            site_id,
            protocol: p,
            features,
            required,
            ..
        } => {
            assert_eq!(site_id, [7; 32]);
            protocol::check_hello(p, features, required).expect("this build's own Hello");
        }
        other => panic!("{other:?}"),
    }
    let protect = std::fs::read(fixtures().join("v2/protocol/protect.frame")).expect("frame");
    match protocol::decode::<Message>(&protect).expect("protect").0 {
        Message::Protect {
            machine,
            generation,
            base_lsn,
            ..
        } => assert_eq!((machine.as_str(), generation, base_lsn), ("vm1", 3, 10)),
        other => panic!("{other:?}"),
    }
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixtures().join("v2/jobs"), &tmp.path().join("jobs"));
    let jobs = replog::jobs::list(tmp.path()).expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, replog::jobs::JobState::Succeeded);
    assert_eq!(jobs[0].kind, replog::jobs::JobKind::Restore);
    assert_eq!(
        replog::jobs::get(tmp.path(), &jobs[0].id)
            .expect("get")
            .steps
            .len(),
        2
    );
    // Job records stay format 1 as kinds are added (`accept-loss` since 38ddc45): a
    // kind this build knows lists; one it does not (what an older build meets in a
    // newer one's history) is passed over, the others still listed.
    let old = std::fs::read_to_string(tmp.path().join("jobs/j-20261202T005051-160999-cf7e.json"))
        .expect("fixture");
    for (id, kind) in [
        ("j-20261203T000000-000001-0a0a", "accept-loss"),
        ("j-20261203T000000-000002-0b0b", "a-kind-of-a-newer-build"),
    ] {
        let text = old
            .replace("j-20261202T005051-160999-cf7e", id)
            .replace("\"restore\"", &format!("\"{kind}\""));
        std::fs::write(tmp.path().join(format!("jobs/{id}.json")), text).expect("write");
    }
    let jobs = replog::jobs::list(tmp.path()).expect("jobs");
    let kinds: Vec<_> = jobs.iter().map(|j| j.kind).collect();
    assert_eq!(
        kinds,
        [
            replog::jobs::JobKind::AcceptLoss,
            replog::jobs::JobKind::Restore
        ]
    );
}

#[test]
fn version_3_manifests_promotion_records_and_failover_frames_decode() {
    use replog::format::meta::{self, Manifest};
    use replog::protection::{FailoverKind, Role};
    let m = fixtures().join("v3/manifests");
    let read = |f: &str| Manifest::decode(&std::fs::read(m.join(f)).expect(f)).expect(f);
    let promoted = read("promoted.meta");
    assert_eq!(promoted.role, Role::Primary);
    assert_eq!(promoted.generation, 2);
    assert_eq!(
        promoted.base.as_ref().map(|b| (b.replica.as_str(), b.lsn)),
        Some(("vm1", 1234))
    );
    assert_eq!(
        promoted.pending.as_ref().map(|p| p.kind),
        Some(FailoverKind::Unplanned)
    );
    let t = read("test-copy.meta");
    assert_eq!(
        (t.role, t.pending.is_none(), t.base.is_some()),
        (Role::Test, true, true)
    );
    let i = read("intent.meta");
    assert_eq!(i.intent.as_ref().map(|i| i.generation), Some(2));
    let f = read("failed-over.meta");
    assert_eq!(f.fence.as_ref().map(|f| f.generation), Some(2));
    // A version-2 manifest reads as before: no base, nothing pending.
    let v2 = Manifest::decode(
        &std::fs::read(fixtures().join("v2/site/site/machines/vm1/machine.meta")).expect("v2"),
    )
    .expect("v2 manifest");
    assert!(v2.base.is_none() && v2.pending.is_none() && v2.intent.is_none());
    // A newer version is refused naming both.
    let body = &promoted.encode()[meta::META_HEADER_LEN..];
    let newer = meta::encode_version(meta::KIND_MANIFEST, 4, body);
    let e = Manifest::decode(&newer).expect_err("version 4");
    assert!(e.what.contains('4') && e.what.contains('3'), "{}", e.what);

    let bytes = std::fs::read(m.join("promotion.meta")).expect("promotion");
    let (v, body) = meta::decode(meta::KIND_PROMOTION, &bytes).expect("promotion envelope");
    assert_eq!(v, 1);
    let p: replog::replica::store::Promotion = meta::body_exact(body).expect("promotion body");
    assert_eq!(
        (p.kind, p.generation, p.lsn, p.committed),
        (FailoverKind::Planned, 2, 1234, false)
    );

    let frames = fixtures().join("v3/protocol");
    let frame = |f: &str| {
        protocol::decode::<Message>(&std::fs::read(frames.join(f)).expect(f))
            .expect(f)
            .0
    };
    assert!(matches!(
        frame("promote.frame"),
        Message::Promote {
            generation: 2,
            lsn: 1234,
            ..
        }
    ));
    assert!(matches!(
        frame("promoted.frame"),
        Message::Promoted {
            generation: 2,
            lsn: 1234,
            ..
        }
    ));
    match frame("hello.frame") {
        Message::Hello { features, .. } => {
            assert_ne!(features & protocol::FEATURE_FAILOVER, 0, "no failover bit")
        }
        other => panic!("not a Hello: {other:?}"),
    }
}

#[test]
fn version_4_changed_maps_seeds_orphans_and_reprotect_frames_decode() {
    use replog::failover::reprotect::SeedState;
    use replog::replica::store::{decode_meta_file, MetaFile};
    use replog::replication::protocol::{Held, OrphanReport};
    let m = fixtures().join("v4/meta");
    let read = |f: &str| {
        decode_meta_file(&std::fs::read(m.join(f)).expect(f))
            .expect(f)
            .1
    };
    match read("changed.meta") {
        MetaFile::ChangedMap(map) => {
            assert_eq!((map.since, map.foreign_upto), (1234, Some(1300)));
            assert_eq!(map.ranges(0, 16 << 20), vec![(4096, 8192), (1 << 20, 4096)]);
            assert_eq!(map.ranges(1, 16 << 20), vec![(0, 65536)]);
        }
        other => panic!("{other:?}"),
    }
    match read("seed.meta") {
        MetaFile::Seed(s) => {
            assert_eq!((s.generation, s.from_generation, s.since), (2, 1, 1234));
            assert_eq!(
                s.state,
                SeedState::Seeding {
                    disk: 1,
                    offset: 64 << 20
                }
            );
            assert_eq!(s.tail, vec![(0, 8192, 4096), (1, 65536, 8192)]);
            assert_eq!(s.orphan.map(|o| o.id), Some("orphan-g1-1400".to_string()));
        }
        other => panic!("{other:?}"),
    }
    let o: OrphanReport =
        serde_json::from_str(&std::fs::read_to_string(m.join("orphan.json")).expect("orphan"))
            .expect("orphan.json");
    assert_eq!((o.first_lsn, o.last_lsn, o.bytes), (1235, 1400, 12288));

    let frames = fixtures().join("v4/protocol");
    let frame = |f: &str| {
        protocol::decode::<Message>(&std::fs::read(frames.join(f)).expect(f))
            .expect(f)
            .0
    };
    assert!(matches!(
        frame("reprotect.frame"),
        Message::Reprotect {
            generation: 2,
            since: 1234,
            foreign_upto: Some(1300),
            base_lsn: 1500,
            probe: false,
            ..
        }
    ));
    assert!(matches!(
        frame("reprotect-state.frame"),
        Message::ReprotectState {
            held: Held::Seeded,
            verified: Some(1501),
            covered: true,
            ..
        }
    ));
    match frame("hello.frame") {
        Message::Hello { features, .. } => {
            assert!(features & protocol::FEATURE_REPROTECT != 0)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn version_5_plan_points_index_version_2_plans_and_runs_read_back() {
    use replog::replica::points::{materialisable, plan_point_id, resolve};
    let (_tmp, site) = site_copy("v5/target");
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("v5/target/plan-point.json")).expect("json"),
    )
    .expect("plan-point.json");
    let id = want["id"].as_u64().expect("id");
    let replicas = Replicas::local(&site).expect("replicas");
    for p in want["points"].as_array().expect("points") {
        let m = p["machine"].as_str().expect("machine");
        let lsn = p["lsn"].as_u64().expect("lsn");
        // Index files of version 2 (the header), listing the plan point.
        let idx = std::fs::read(site.join(format!(
            "replicas/{m}/segments/00000000000000000001.idx.enc"
        )))
        .expect("index");
        assert_eq!(&idx[8..10], &2u16.to_le_bytes(), "{m}: index version");
        let store = replicas.open_readonly(m).expect("replica");
        let all = materialisable(&store).expect("points");
        let tagged: Vec<_> = all.iter().filter(|x| x.plan_point.is_some()).collect();
        assert_eq!(tagged.len(), 1, "{m}: {all:?}");
        assert_eq!((tagged[0].lsn, tagged[0].plan_point), (lsn, Some(id)));
        assert!(tagged[0].app_consistent && tagged[0].digests.is_some());
        let r = resolve(&store, &plan_point_id(id)).expect("pp- resolves");
        assert_eq!(r.lsn, lsn);
        // Restored at the plan point, checked against its digests.
        let out = site.with_file_name(format!("restored-{m}"));
        let o = common::serve::replog()
            .arg("restore")
            .arg(&site)
            .arg(m)
            .args(["--at", &plan_point_id(id), "--out"])
            .arg(&out)
            .arg("--json")
            .output()
            .expect("restore");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(doc["verified"], true, "{doc}");
    }
    // inspect checks every index against its segment.
    let o = common::serve::replog()
        .arg("inspect")
        .arg(&site)
        .output()
        .expect("inspect");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // A plan file and a run's state (format 1).
    let plans = fixtures().join("v5/site");
    let plan = replog::plan::store::load(&plans, "erp").expect("plan");
    assert_eq!(plan.groups.len(), 2);
    assert_eq!(plan.groups[0].after.len(), 2);
    let run = replog::plan::run::load(&plans, "j-20261203T220000-000001-abcd").expect("run");
    assert_eq!(run.format, 1);
    assert_eq!(run.state, replog::plan::run::RunState::Waiting);
    assert_eq!(run.next, 3);
    assert_eq!(run.plan, plan);
    assert_eq!(
        run.machines["vm1"].job.as_deref(),
        Some("j-20261203T220000-000002-abcd")
    );
    // Written before `made` existed: it reads as not made.
    assert!(!run.machines["vm1"].made);
}

/// The files of `dir`, recursively, as (path relative to `dir` with `/`, bytes).
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("under")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out
}

#[test]
fn version_6_object_store_replicas_settings_relationships_and_rotated_identities_read_back() {
    use replog::replica::objects::{Manifest, MemObjects, ObjectBackend, ObjectStore};
    let v6 = fixtures().join("v6");
    // A bucket holding vm1: its manifests are kind 12 version 1, and it restores to
    // the disks it was written from.
    let bucket = std::sync::Arc::new(MemObjects::new());
    let mut manifests = 0;
    for (k, bytes) in files_under(&v6.join("object-store/bucket")) {
        if k.starts_with("vm1/m/") {
            let m = Manifest::decode(&bytes, &k).expect("object manifest version 1");
            assert!(!m.entries.is_empty(), "{k}: an empty manifest");
            manifests += 1;
        }
        bucket.put(&k, &bytes).expect("put");
    }
    assert!(manifests > 0, "no manifest in the bucket");
    let state = tempfile::tempdir().expect("tmp");
    let backend = ObjectBackend::new(
        bucket,
        replog::replica::backend::DirBackend::new(
            std::sync::Arc::new(replog::storage::FileStorage),
            state.path(),
        ),
        std::time::Duration::from_secs(1),
        false,
    );
    let key =
        replog::replica::crypt::ReplicaKey::load_or_create(&v6.join("object-store/replica.key"))
            .expect("key");
    let replicas = Replicas::new(std::sync::Arc::new(backend), key);
    assert_eq!(
        replicas.machines().expect("machines"),
        vec!["vm1".to_string()]
    );
    let out = state.path().join("restored");
    let store = replicas.open_readonly("vm1").expect("replica");
    let r =
        replog::replica::restore::restore_at(store, "latest", &out, &|_, _| {}).expect("restore");
    assert!(r.verified);
    let want = std::fs::read_to_string(v6.join("object-store/expected.sha256")).expect("sums");
    for line in want.lines() {
        let (sum, disk) = (
            line.split(' ').next().expect("sum"),
            line.rsplit(' ').next().expect("disk"),
        );
        let img = std::fs::read(out.join(format!("{disk}.img"))).expect("image");
        assert_eq!(sha256(&img), sum, "{disk}");
    }

    // site.toml format 2.
    let p = v6.join("site/site.toml");
    let text = std::fs::read_to_string(&p).expect("site.toml");
    assert!(text.starts_with("# replog site configuration, format 2\n"));
    let c = replog::config::SiteConfig::from_toml(&p, &text).expect("format 2 reads");
    assert_eq!(c.replica.store, "s3://replicas/site-b");
    assert_eq!(c.replica.s3.region, "eu-west-1");

    // relationship.toml format 2.
    let site = tempfile::tempdir().expect("tmp");
    let dir = site.path().join("machines/vm1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        v6.join("source/relationship.toml"),
        dir.join("relationship.toml"),
    )
    .expect("copy");
    let r = replog::replication::relationship::Relationship::load(site.path(), "vm1")
        .expect("format 2 reads")
        .expect("protected");
    assert_eq!(r.rpo.as_deref(), Some("30s"));
    assert_eq!(r.bandwidth.as_deref(), Some("50MiB/s"));
    assert!(r.bandwidth_schedule.is_some());

    // A rotated identity: the same ID as before its two rotations.
    let site = tempfile::tempdir().expect("tmp");
    copy_dir(&v6.join("identity"), &site.path().join("identity"));
    let me = replog::identity::Identity::load(site.path()).expect("identity");
    let want = std::fs::read_to_string(v6.join("identity/expected-id")).expect("id");
    assert_eq!(me.id().to_string(), want.trim());
    assert_eq!(me.rotations(), 2);
    assert_ne!(me.cert_id(), me.id());
    assert_eq!(replog::identity::lineage_root(&me.chain()), Ok(me.id()));
}

#[test]
fn a_settings_or_relationship_file_of_a_newer_format_is_refused_naming_both() {
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("site.toml");
    let e = replog::config::SiteConfig::from_toml(&p, "# replog site configuration, format 3\n")
        .expect_err("format 3");
    assert!(
        e.to_string()
            .contains("format 3; this build reads formats 1 to 2"),
        "{e}"
    );
    let dir = tmp.path().join("machines/vm1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("relationship.toml"),
        "# replog relationship, format 9\ntarget = \"127.0.0.1:1\"\n",
    )
    .expect("write");
    let e = replog::replication::relationship::Relationship::load(tmp.path(), "vm1")
        .expect_err("format 9");
    assert!(
        e.to_string()
            .contains("format 9; this build reads formats 1 to 3"),
        "{e}"
    );
    // Format 1 (v1, v2 fixtures) still reads: the tests of those fixtures open it.
}

/// Every piece hash of every disk of the replica in `site`, read from the parent
/// chunks (what a resync computed before hash pages).
fn read_and_hash(store: &replog::replica::store::ReplicaStore) -> Vec<Vec<[u8; 32]>> {
    store
        .manifest()
        .disks
        .iter()
        .enumerate()
        .map(|(d, disk)| {
            replog::chunk_hash::hash_chunks(
                disk.size,
                4096,
                0,
                u64::MAX,
                &|at, buf| store.read_parent(d as u32, at, buf),
                replog::chunk_hash::ChunkHash::Blake3,
            )
            .expect("read and hash")
        })
        .collect()
}

fn via_pages(store: &replog::replica::store::ReplicaStore) -> Vec<Vec<[u8; 32]>> {
    (0..store.manifest().disks.len() as u32)
        .map(|d| {
            store
                .resync_hashes(4096, d, 0, u64::MAX, replog::chunk_hash::ChunkHash::Blake3)
                .expect("hashes")
        })
        .collect()
}

#[test]
fn a_replica_written_before_hash_pages_resyncs_and_gains_them() {
    let (_t, site) = site_copy("v2/target");
    assert!(!site.join("replicas/vm1/hashes").exists());
    let store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    let want = read_and_hash(&store);
    assert_eq!(via_pages(&store), want);
    for d in 0..2 {
        let pages = store.stored_hash_pages(d).expect("pages");
        assert!(!pages.is_empty(), "disk {d}: no page written back");
        for p in pages {
            store.check_hash_page(d, p).expect("the page authenticates");
        }
    }
    assert_eq!(via_pages(&store), want, "answered from the pages");
}

#[test]
fn version_7_hash_pages_and_the_dropped_list_open() {
    let (_t, site) = site_copy("v2/target");
    let dir = site.join("replicas/vm1");
    copy_dir(&fixtures().join("v7/hash-pages"), &dir.join("hashes"));
    let store = Replicas::local(&site)
        .expect("replicas")
        .open("vm1")
        .expect("open");
    for d in 0..2 {
        store
            .check_hash_page(d, 0)
            .expect("a v7 page authenticates and decodes");
    }
    let want = read_and_hash(&store);
    // Every chunk body damaged: only the v7 pages can still answer, and they do.
    for d in 0..2 {
        for e in std::fs::read_dir(dir.join(format!("parent/{d}"))).expect("ls") {
            let path = e.expect("entry").path();
            let mut b = std::fs::read(&path).expect("chunk");
            let at = b.len() - 3;
            b[at] ^= 1;
            std::fs::write(&path, &b).expect("damage");
        }
    }
    assert_eq!(via_pages(&store), want);

    // The list of what a resync lost (text, "disk start end" per line), beside the
    // chunk that resync dropped.
    std::fs::copy(fixtures().join("v7/dropped"), dir.join("dropped")).expect("copy");
    std::fs::remove_file(dir.join("parent/1/0000000001.enc")).expect("dropped");
    let lost = store.lost_ranges().expect("decodes");
    assert_eq!(
        lost.into_iter().collect::<Vec<_>>(),
        vec![(1, 262_144, 524_288)]
    );
    let mut buf = vec![0u8; 4096];
    let e = store
        .read_replica(1, 300_000, &mut buf)
        .expect_err("lost bytes served");
    assert!(matches!(e, replog::Error::Lost(_)), "{e}");
}

#[test]
fn version_8_a_journal_written_into_a_recycled_file_opens_with_every_write() {
    let (_t, site) = site_copy("v8/site");
    let jdir = site.join("machines/vm1/journal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&jdir)
        .expect("journal")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let newest = std::fs::read(segs.last().expect("a segment")).expect("read");
    let header = replog::format::SegmentHeader::decode(&newest).expect("header");
    assert!(
        header.is_recycled(),
        "the fixture's newest segment is a recycled file"
    );
    assert!(jdir.join("00000000000000000001.spare").exists());
    // Inspect: the earlier segment's bytes after the records are no fault.
    let report = replog::inspect::inspect(&site).expect("inspect");
    assert!(report.ok(), "{:?}", report.corruption);
    assert!(
        !report.warnings.iter().any(|w| w.contains("torn")),
        "{:?}",
        report.warnings
    );
    let s = replog::Site::open(&site).expect("open");
    let m = s.open_machine("vm1").expect("machine");
    let sums = std::fs::read_to_string(fixtures().join("v8/site/expected.sha256")).expect("sums");
    for line in sums.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let v = m.volume(f[2]).expect("vol");
        let mut buf = vec![0u8; v.size() as usize];
        v.read(0, &mut buf).expect("read");
        assert_eq!(sha256(&buf), f[0], "disk {} reads differently", f[2]);
    }
    assert!(
        jdir.join("00000000000000000001.spare").exists(),
        "a spare left by the crash is kept at open, to be written again"
    );
    assert!(m.status().spare_bytes > 0);
    // The older build's spare is written into: one segment's worth of writes (the
    // site's 64 MiB), a clean close, a reopen that reads back the last of them.
    let v = m.volume("os").expect("vol");
    let size = v.size() as usize;
    let mut last = Vec::new();
    for pass in 0..66u8 {
        last = (0..size)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(pass))
            .collect();
        v.write(0, &last).expect("write");
    }
    m.flush().expect("flush");
    assert!(
        !jdir.join("00000000000000000001.spare").exists(),
        "the next segment took the spare"
    );
    let newest = std::fs::read_dir(&jdir)
        .expect("journal")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max()
        .expect("a segment");
    let header = replog::format::SegmentHeader::decode(&std::fs::read(&newest).expect("read"))
        .expect("header");
    assert!(header.is_recycled(), "{}", newest.display());
    drop(v);
    m.close().expect("close");
    let m = s.open_machine("vm1").expect("reopen");
    let mut buf = vec![0u8; size];
    m.volume("os")
        .expect("vol")
        .read(0, &mut buf)
        .expect("read");
    assert!(buf == last, "the disk reads back the last writes");
}

/// Chunk frames of protocol 2 as the whole-message encoder wrote them (`v8/protocol`):
/// they decode, a segment chunk and an initial chunk decode the same in place (as a
/// target reads them), and a head written apart from its payload (as a source sends
/// it) is the same bytes.
#[test]
fn chunk_frames_of_protocol_2_decode_whole_and_in_place_and_are_sent_as_they_were() {
    let payload = common::frames::payload();
    let frames = fixtures().join("v8/protocol");
    let heads = common::frames::chunk_messages(&[]);
    for (name, expected) in heads {
        let frame = std::fs::read(frames.join(name)).expect(name);
        let (whole, used) = protocol::decode::<Message>(&frame).expect(name);
        assert_eq!(used, frame.len(), "{name}");
        // The message with its payload taken out: the head a source sends.
        let mut head = whole.clone();
        let got = match &mut head {
            Message::SegmentChunk { bytes, .. }
            | Message::InitialChunk { bytes, .. }
            | Message::ResyncChunk { bytes, .. } => std::mem::take(bytes),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!((&head, &got), (&expected, &payload), "{name}");
        // In place, as a target reads it: a segment chunk only, the same message.
        let body = &frame[protocol::FRAME_HEADER_LEN..];
        match protocol::segment_chunk_ref(body) {
            Some(c) => {
                assert_eq!(c.expect("decodes in place").to_message(), whole, "{name}");
            }
            None => assert!(
                !matches!(whole, Message::SegmentChunk { .. }),
                "{name}: not taken in place"
            ),
        }
        // So is an initial chunk, its bytes the body's last (the target keeps the body
        // as the chunk's buffer).
        match protocol::initial_chunk_ref(body) {
            Some(c) => {
                let c = c.expect("decodes in place");
                assert_eq!(c.to_message(), whole, "{name}");
                assert_eq!(
                    c.bytes_at(body),
                    Some(body.len() - payload.len()..body.len()),
                    "{name}"
                );
            }
            None => assert!(
                !matches!(whole, Message::InitialChunk { .. }),
                "{name}: not taken in place"
            ),
        }
        // Sent as a head and the payload apart: the same bytes.
        let mut sent = protocol::encode_head(&head, &payload).expect(name);
        sent.extend_from_slice(&payload);
        assert_eq!(sent, frame, "{name}: sent as it was written");
        assert_eq!(protocol::encode(&whole).expect(name), frame, "{name}");
    }
}

/// The read-ahead for a planned failover's check (`v9/protocol`): `PromoteSoon` and a
/// `Hello` with its feature bit decode as written, and encode to the same bytes.
#[test]
fn version_9_promote_soon_frames_decode() {
    let frames = fixtures().join("v9/protocol");
    let frame = |f: &str| {
        let bytes = std::fs::read(frames.join(f)).expect(f);
        let (m, used) = protocol::decode::<Message>(&bytes).expect(f);
        assert_eq!(used, bytes.len(), "{f}");
        assert_eq!(protocol::encode(&m).expect(f), bytes, "{f}");
        m
    };
    assert_eq!(
        frame("promote-soon.frame"),
        Message::PromoteSoon {
            machine: "vm1".into(),
            generation: 3,
        }
    );
    match frame("hello.frame") {
        Message::Hello { features, .. } => {
            assert_ne!(
                features & protocol::FEATURE_PROMOTE_SOON,
                0,
                "no read-ahead bit"
            );
            // This build still says it (the fixture is frozen; later bits may join).
            assert_ne!(protocol::FEATURES & protocol::FEATURE_PROMOTE_SOON, 0);
        }
        other => panic!("not a Hello: {other:?}"),
    }
}

/// `relationship.toml` format 3 (`v10/source`): a paused relationship reads as
/// paused; resumed, it is written as format 2 again (what builds before `paused`
/// read), and paused again, as the fixture's bytes. The copy mark beside it.
#[test]
fn version_10_a_paused_relationship_and_a_copy_mark_read_back() {
    use replog::replication::relationship::Relationship;
    let fixture = fixtures().join("v10/source/relationship.toml");
    let written = std::fs::read_to_string(&fixture).expect("fixture");
    let site = tempfile::tempdir().expect("tmp");
    let dir = site.path().join("machines/vm1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(&fixture, dir.join("relationship.toml")).expect("copy");
    let mut r = Relationship::load(site.path(), "vm1")
        .expect("format 3 reads")
        .expect("protected");
    assert!(r.paused);
    assert_eq!(r.rpo.as_deref(), Some("30s"));
    assert_eq!(r.to_toml().expect("toml"), written);
    r.paused = false;
    let text = r.to_toml().expect("toml");
    assert!(
        text.starts_with("# replog relationship, format 2\n"),
        "{text}"
    );
    assert!(!text.contains("paused"), "{text}");

    // The copy mark: it holds for its target and generation only.
    use replog::replication::relationship::CopyMark;
    std::fs::copy(
        fixtures().join("v10/source/copied.toml"),
        dir.join("copied.toml"),
    )
    .expect("copy");
    let mark = CopyMark::load(site.path(), "vm1")
        .expect("format 1 reads")
        .expect("a mark");
    assert_eq!(mark.generation, 3);
    assert!(CopyMark::holds(site.path(), "vm1", &r, 3));
    // Written again by this build: the fixture's bytes.
    std::fs::remove_file(dir.join("copied.toml")).expect("rm");
    CopyMark::record(site.path(), "vm1", &r, 3).expect("record");
    assert_eq!(
        std::fs::read(dir.join("copied.toml")).expect("mark"),
        std::fs::read(fixtures().join("v10/source/copied.toml")).expect("fixture")
    );
    assert!(!CopyMark::holds(site.path(), "vm1", &r, 4));
    r.target_id = "cd".repeat(32);
    assert!(!CopyMark::holds(site.path(), "vm1", &r, 3));
    // A newer format is refused naming both.
    std::fs::write(dir.join("copied.toml"), "# replog copy mark, format 2\n").expect("write");
    let e = CopyMark::load(site.path(), "vm1").expect_err("format 2");
    assert!(
        e.to_string()
            .contains("format 2; this build reads formats 1 to 1"),
        "{e}"
    );
    // … and not written over.
    r.target_id = "ab".repeat(32);
    CopyMark::record(site.path(), "vm1", &r, 3).expect_err("a newer mark");
    assert_eq!(
        std::fs::read_to_string(dir.join("copied.toml")).expect("mark"),
        "# replog copy mark, format 2\n"
    );
}

/// Job records of format 2 (`v11/jobs`): a failure folded with the two identical ones
/// before it (`repeats`, `first_started`). They list beside a format-1 record (`v2/jobs`),
/// which reads as no repeats.
#[test]
fn version_11_job_records_with_repeats_read_beside_format_1() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixtures().join("v2/jobs"), &tmp.path().join("jobs"));
    copy_dir(&fixtures().join("v11/jobs"), &tmp.path().join("jobs"));
    let jobs = replog::jobs::list(tmp.path()).expect("jobs");
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let (new, old) = (&jobs[0], &jobs[1]);
    assert_eq!((new.format, old.format), (2, 1));
    assert_eq!(new.kind, replog::jobs::JobKind::Protect);
    assert_eq!(new.state, replog::jobs::JobState::Failed);
    assert_eq!(new.repeats, 2);
    assert_eq!(
        new.first_started.as_deref(),
        Some("2026-12-06T21:32:26.806743Z")
    );
    assert_eq!((old.repeats, old.first_started.as_deref()), (0, None));
    let got = replog::jobs::get(tmp.path(), &new.id).expect("get");
    assert_eq!(&got, new);
}
