//! The target's segment store: verified, gap-free, exactly once, encrypted at rest.

use replog::config::JournalConfig;
use replog::format::meta::DiskEntry;
use replog::format::segment::segment_name;
use replog::replica::crypt::ReplicaKey;
use replog::replica::store::{Receipt, ReplicaManifest, ReplicaStore};
use replog::storage::FileStorage;
use replog::{Error, Machine};
use std::path::Path;
use std::sync::Arc;

/// A source machine with three sealed segments; returns (machine id, segment bytes).
fn source(dir: &Path) -> (u64, Vec<Vec<u8>>) {
    let fs = FileStorage;
    Machine::create(&fs, dir).expect("create");
    Machine::add_disk(&fs, dir, "os", 1 << 20, None).expect("disk");
    let m =
        Machine::open(Arc::new(FileStorage), dir, "vm1", JournalConfig::default()).expect("open");
    let v = m.volume("os").expect("vol");
    for i in 0..3u64 {
        v.write(i * 10_000 + 3, &vec![b'a' + i as u8; 5000])
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    let id = Machine::read_manifest(&fs, dir)
        .expect("manifest")
        .machine_id;
    let segs = (1..=3)
        .map(|s| std::fs::read(dir.join("journal").join(segment_name(s))).expect("segment"))
        .collect();
    (id, segs)
}

fn replica(site: &Path, machine_id: u64) -> ReplicaStore {
    replica_sized(site, machine_id, 1 << 20)
}

/// A replica of `machine_id` whose one disk "os" is `size` bytes.
fn replica_sized(site: &Path, machine_id: u64, size: u64) -> ReplicaStore {
    let manifest = ReplicaManifest {
        source_site: [1u8; 32],
        machine_id,
        disks: vec![DiskEntry {
            id: 0,
            name: "os".into(),
            size,
        }],
        base_lsn: 0,
        base_seq: 0,
        generation: 1,
    };
    let key = ReplicaKey::load_or_create(&site.join("identity/replica.key")).expect("key");
    replog::replica::store::Replicas::with_key(site, key)
        .create("vm1", manifest, Default::default())
        .expect("create replica")
}

fn key(site: &Path) -> ReplicaKey {
    ReplicaKey::load_or_create(&site.join("identity/replica.key")).expect("key")
}

#[test]
fn segments_are_stored_in_order_exactly_once_and_encrypted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (id, segs) = source(&tmp.path().join("src"));
    let site = tmp.path().join("target");
    let mut r = replica(&site, id);

    // A gap is refused, nothing stored.
    assert!(matches!(r.receive(2, &segs[1]), Err(Error::BrokenChain(_))));
    assert_eq!(r.received().segment_seq, 0);

    let Receipt::Stored { lsn: l1 } = r.receive(1, &segs[0]).expect("seg 1") else {
        panic!("not stored")
    };
    assert!(l1 > 0);
    // A resend is idempotent.
    assert_eq!(
        r.receive(1, &segs[0]).expect("resend"),
        Receipt::Duplicate { lsn: l1 }
    );
    // A different segment under a stored number is a broken chain.
    assert!(matches!(r.receive(1, &segs[1]), Err(Error::BrokenChain(_))));

    // A flipped byte anywhere: refused, nothing stored, the chain goes on after.
    for at in [10, 64 + 20, 64 + 48 + 100, segs[1].len() - 3] {
        let mut bad = segs[1].clone();
        bad[at] ^= 0x08;
        let err = r.receive(2, &bad).expect_err("damaged segment stored");
        assert!(err.is_corruption(), "flip at {at}: {err}");
        assert_eq!(r.received().segment_seq, 1);
    }
    r.receive(2, &segs[1]).expect("seg 2");
    r.receive(3, &segs[2]).expect("seg 3");
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(
            &r.read_segment(i as u64 + 1).expect("read back")[..],
            &s[..]
        );
    }
    // At rest, the data is not readable.
    for entry in std::fs::read_dir(site.join("replicas/vm1/segments")).expect("ls") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        assert!(
            !bytes.windows(64).any(|w| w.iter().all(|b| *b == b'a')),
            "plaintext at rest"
        );
    }
    // Reopen: same state.
    drop(r);
    let r = replog::replica::store::Replicas::with_key(&site, key(&site))
        .open("vm1")
        .expect("reopen");
    assert_eq!(r.received().segment_seq, 3);
}

#[test]
fn wrong_machine_and_wrong_key_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (id, segs) = source(&tmp.path().join("src"));
    let site = tmp.path().join("target");
    let mut r = replica(&site, id ^ 1);
    let err = r
        .receive(1, &segs[0])
        .expect_err("foreign machine's segment stored");
    assert!(err.is_corruption(), "{err}");

    let site2 = tmp.path().join("target2");
    let mut r2 = replica(&site2, id);
    r2.receive(1, &segs[0]).expect("seg 1");
    drop(r2);
    let other = tmp.path().join("other.key");
    let err = replog::replica::store::Replicas::with_key(
        &site2,
        ReplicaKey::load_or_create(&other).expect("key"),
    )
    .open("vm1")
    .and_then(|s| s.read_segment(1))
    .expect_err("opened with another key");
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn a_crash_between_storing_and_marking_is_reconciled() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (id, segs) = source(&tmp.path().join("src"));
    let site = tmp.path().join("target");
    let mut r = replica(&site, id);
    r.receive(1, &segs[0]).expect("seg 1");
    let received_1 = std::fs::read(site.join("replicas/vm1/received")).expect("mark");
    r.receive(2, &segs[1]).expect("seg 2");
    drop(r);
    // Roll the mark back to segment 1, as if the crash came before it was persisted.
    std::fs::write(site.join("replicas/vm1/received"), &received_1).expect("roll back");
    let r = replog::replica::store::Replicas::with_key(&site, key(&site))
        .open("vm1")
        .expect("reopen");
    assert_eq!(
        r.received().segment_seq,
        2,
        "the stored segment was not taken in"
    );

    // And a damaged leftover is removed, not taken in.
    drop(r);
    std::fs::write(site.join("replicas/vm1/received"), &received_1).expect("roll back");
    let p = site
        .join("replicas/vm1/segments")
        .join(format!("{}.enc", segment_name(2)));
    let mut ct = std::fs::read(&p).expect("read");
    let n = ct.len();
    ct[n - 5] ^= 1;
    std::fs::write(&p, ct).expect("damage");
    let mut r = replog::replica::store::Replicas::with_key(&site, key(&site))
        .open("vm1")
        .expect("reopen");
    assert_eq!(r.received().segment_seq, 1);
    assert!(!p.exists(), "a leftover that does not verify was kept");
    r.receive(2, &segs[1]).expect("seg 2 again");
}

#[test]
fn hostile_names_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let replicas = replog::replica::store::Replicas::with_key(tmp.path(), key(tmp.path()));
    for bad in ["../x", "a/b", "..", ""] {
        assert!(replicas.open_readonly(bad).is_err(), "{bad}");
        let manifest = ReplicaManifest {
            source_site: [1u8; 32],
            machine_id: 1,
            disks: Vec::new(),
            base_lsn: 0,
            base_seq: 0,
            generation: 1,
        };
        assert!(
            replicas.create(bad, manifest, Default::default()).is_err(),
            "{bad}"
        );
    }
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("replicas").exists());
}

#[test]
fn the_site_config_can_place_the_key_outside_the_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("s");
    replog::Site::init(&site).expect("init");
    let elsewhere = tmp.path().join("vault/replica.key");
    let cfg = std::fs::read_to_string(site.join("site.toml")).expect("cfg");
    let cfg = cfg.replace(
        "key_file = \"\"",
        &format!("key_file = {:?}", elsewhere.display().to_string()),
    );
    std::fs::write(site.join("site.toml"), cfg).expect("write cfg");
    let s = replog::Site::open(&site).expect("open");
    s.replica_key().expect("key");
    assert!(elsewhere.exists(), "key not created where the config says");
    assert!(!site.join("identity/replica.key").exists());
}

/// A resync drops a parent chunk that does not authenticate; the segments it then
/// folds rewrite parts of it, and only those parts are the replica's to give back —
/// the rest of the chunk is listed as lost until the resync ends.
#[test]
fn a_resync_gives_back_of_a_dropped_chunk_what_the_folded_segments_rewrote() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (id, segs) = source(&tmp.path().join("src"));
    let site = tmp.path().join("target");
    let mut r = replica(&site, id);
    let mut ed = replog::replica::store::ChunkEditor::new(&r);
    ed.write(0, 0, &vec![b'p'; 256 << 10]).expect("parent");
    ed.finish().expect("parent");
    for (i, s) in segs.iter().enumerate() {
        r.receive(i as u64 + 1, s).expect("segment");
    }
    // Parent chunk 0 rots; the scrub's finding is recorded.
    let chunk = site.join("replicas/vm1/parent/0/0000000000.enc");
    let mut bytes = std::fs::read(&chunk).expect("chunk");
    let at = bytes.len() - 7;
    bytes[at] ^= 1;
    std::fs::write(&chunk, &bytes).expect("damage");
    r.mark_damaged("parent chunk 0 does not authenticate")
        .expect("mark");
    let w = r.received();
    r.begin_resync(w.lsn, w.segment_seq, 4096).expect("begin");
    // The three segments wrote 5000 bytes at 3, 10 003 and 20 003.
    let lost: Vec<(u32, u64, u64)> = r.lost_ranges().expect("lost").into_iter().collect();
    assert_eq!(
        lost,
        vec![
            (0, 0, 3),
            (0, 5003, 10_003),
            (0, 15_003, 20_003),
            (0, 25_003, 256 << 10)
        ]
    );
    let mut buf = vec![0u8; 5000];
    r.read_replica(0, 10_003, &mut buf)
        .expect("rewritten by segment 2");
    assert_eq!(buf, vec![b'b'; 5000]);
    let e = r
        .read_replica(0, 0, &mut buf)
        .expect_err("lost bytes served");
    assert!(matches!(e, Error::Lost(_)), "{e}");
    assert!(e.to_string().contains("bytes 0..3"), "{e}");
    // Beyond the dropped chunk the parent is whole (zeroes: never written).
    r.read_replica(0, 300_000, &mut buf).expect("chunk 1");
    assert_eq!(buf, vec![0u8; 5000]);
}

/// A stored segment that does not read stops the resync's fold: the parent then
/// holds older bytes than the replica received for every range that segment and the
/// ones after it wrote. A fetch of them is refused as lost, never answered with the
/// older bytes; the ranges folded before it, and the rest, are served. If even the
/// damaged segment's index does not read, what it wrote is unknown: every byte.
#[test]
fn a_fold_stopped_by_a_damaged_segment_loses_what_the_unfolded_segments_wrote() {
    for index_too in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (id, segs) = source(&tmp.path().join("src"));
        let site = tmp.path().join("target");
        let mut r = replica(&site, id);
        for (i, s) in segs.iter().enumerate() {
            r.receive(i as u64 + 1, s).expect("segment");
        }
        let dir = site.join("replicas/vm1/segments");
        let damage = |name: String| {
            let p = dir.join(name);
            let mut b = std::fs::read(&p).expect("stored file");
            let at = b.len() - 9;
            b[at] ^= 1;
            std::fs::write(&p, &b).expect("damage");
        };
        damage(format!("{}.enc", segment_name(2)));
        if index_too {
            damage(format!("{:020}.idx.enc", 2));
        }
        let w = r.received();
        r.begin_resync(w.lsn, w.segment_seq, 4096).expect("begin");
        let lost: Vec<(u32, u64, u64)> = r.lost_ranges().expect("lost").into_iter().collect();
        let mut buf = vec![0u8; 5000];
        if index_too {
            assert_eq!(lost, vec![(0, 0, 1 << 20)]);
            let e = r
                .read_replica(0, 3, &mut buf)
                .expect_err("nothing is known");
            assert!(matches!(e, Error::Lost(_)), "{e}");
            continue;
        }
        // Segments 2 and 3 wrote 5000 bytes at 10 003 and 20 003.
        assert_eq!(lost, vec![(0, 10_003, 15_003), (0, 20_003, 25_003)]);
        r.read_replica(0, 3, &mut buf).expect("folded: segment 1");
        assert_eq!(buf, vec![b'a'; 5000]);
        for at in [10_003, 20_003] {
            let e = r
                .read_replica(0, at, &mut buf)
                .expect_err("older bytes served");
            assert!(matches!(e, Error::Lost(_)), "{e}");
        }
        r.read_replica(0, 300_000, &mut buf).expect("never written");
        assert_eq!(buf, vec![0u8; 5000]);
    }
}

/// Segments read into recycled buffers (`read_layer`: around the page cache, into
/// memory a reader before used) are the bytes the source sealed, however big the
/// buffer's earlier contents; unknown numbers and damage are refused.
#[test]
fn segments_read_into_reused_buffers_are_their_bytes_and_damage_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("src");
    let fs = FileStorage;
    Machine::create(&fs, &dir).expect("create");
    Machine::add_disk(&fs, &dir, "os", 32 << 20, None).expect("disk");
    let m =
        Machine::open(Arc::new(FileStorage), &dir, "vm1", JournalConfig::default()).expect("open");
    let v = m.volume("os").expect("vol");
    // Segments big enough for the pool to keep their buffers (12 and 9 MiB, one size
    // class), then small ones: the 9 MiB one read into the 12 MiB one's buffer must
    // not show the bigger one's bytes past its end.
    let big: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for len in [12usize << 20, 9 << 20] {
        v.write(0, &big[..len]).expect("write big");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    for i in 0..2u64 {
        v.write(i * 4096, &vec![b'x' + i as u8; 3000])
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    let id = Machine::read_manifest(&fs, &dir)
        .expect("manifest")
        .machine_id;
    drop(v);
    drop(m);
    let site = tmp.path().join("target");
    let mut r = replica_sized(&site, id, 32 << 20);
    let segs: Vec<Vec<u8>> = (1..=4u64)
        .map(|s| std::fs::read(dir.join("journal").join(segment_name(s))).expect("segment"))
        .collect();
    for (s, seg) in (1u64..).zip(&segs) {
        r.receive(s, seg).expect("store");
    }
    assert!(
        segs[0].len() > replog::storage::pool::POOLED_MIN,
        "the first segment is big enough to be pooled"
    );
    for round in 0..2 {
        for s in [1u64, 2, 3, 4, 1, 4, 2] {
            let read = r.read_segment(s).expect("read");
            assert_eq!(
                &read[..],
                &segs[s as usize - 1][..],
                "segment {s}, round {round}"
            );
        }
    }
    for s in [0u64, 5] {
        let err = r.read_segment(s).expect_err("no such segment");
        assert!(matches!(err, Error::NotFound(_)), "{s}: {err}");
    }
    // A flipped byte and a cut file: corruption, naming the file.
    let seg_dir = site.join("replicas/vm1/segments");
    let file2 = std::fs::read_dir(&seg_dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.to_string_lossy().ends_with(".seg.enc") && p.to_string_lossy().contains("00002")
        })
        .expect("segment 2's file");
    let good = std::fs::read(&file2).expect("read");
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x20;
    std::fs::write(&file2, &bad).expect("damage");
    let err = r.read_segment(2).expect_err("damaged segment served");
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("segments"), "{err}");
    std::fs::write(&file2, &good[..good.len() - 100]).expect("cut");
    let err = r.read_segment(2).expect_err("cut segment served");
    assert!(err.is_corruption(), "{err}");
    std::fs::write(&file2, &good).expect("mend");
    assert_eq!(&r.read_segment(2).expect("mended")[..], &segs[1][..]);
}

/// Replicas `names` (machine ids 1, 2, …) at `site`, and a target on them that is
/// that site.
fn target_of(site: &Path, names: &[&str]) -> Arc<replog::replication::receiver::Target> {
    let replicas = replog::replica::store::Replicas::with_key(site, key(site));
    for (i, name) in names.iter().enumerate() {
        let manifest = ReplicaManifest {
            source_site: [1u8; 32],
            machine_id: i as u64 + 1,
            disks: vec![DiskEntry {
                id: 0,
                name: "os".into(),
                size: 1 << 20,
            }],
            base_lsn: 0,
            base_seq: 0,
            generation: 1,
        };
        replicas
            .create(name, manifest, Default::default())
            .expect("create replica");
    }
    Arc::new(
        replog::replication::receiver::Target::new(replog::identity::SiteId([9; 32]), replicas)
            .at_site(site),
    )
}

/// While a `with_store` call on `held` waits inside, does one on `other` run within
/// `wait`? Its machine id, or None if it did not. A call that waits for the held one
/// can only end after this gives up and releases it.
fn runs_beside(
    target: &Arc<replog::replication::receiver::Target>,
    held: &str,
    other: &str,
    wait: std::time::Duration,
) -> Option<u64> {
    use std::sync::mpsc::channel;
    let (inside_tx, inside_rx) = channel();
    let (release_tx, release_rx) = channel::<()>();
    let holder = {
        let (target, held) = (target.clone(), held.to_string());
        std::thread::spawn(move || {
            target.with_store(&held, |_| {
                inside_tx.send(()).expect("send");
                release_rx.recv().expect("released");
                Ok(())
            })
        })
    };
    inside_rx.recv().expect("inside");
    let (done_tx, done_rx) = channel();
    {
        let (target, other) = (target.clone(), other.to_string());
        std::thread::spawn(move || {
            let id = target.with_store(&other, |store| Ok(store.manifest().machine_id));
            let _ = done_tx.send(id);
        });
    }
    let got = done_rx.recv_timeout(wait);
    release_tx.send(()).expect("release");
    holder.join().expect("join").expect("the held call");
    got.ok().map(|id| id.expect("the other call"))
}

/// `Target::with_store` on a replica no session holds (what `accept-loss` through a
/// serve that received nothing since it started does) makes the replica's slot and
/// runs under that slot's lock, not the table's: another machine's store is reached
/// while it runs; the same machine's is not (one writer of a store at a time).
#[test]
fn with_store_on_a_replica_no_session_holds_keeps_other_machines_free() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = target_of(&tmp.path().join("target"), &["vm1", "vm2"]);
    // A liveness check, not a timing one: 120 s is only how long to wait for a
    // call that would otherwise wait for ever.
    assert_eq!(
        runs_beside(&target, "vm1", "vm2", Duration::from_secs(120)),
        Some(2),
        "vm2's store waited for vm1's call"
    );
    // The other way round, a call that runs at once where it should wait is caught
    // (a slow machine can only make this pass, never fail).
    assert_eq!(
        runs_beside(&target, "vm1", "vm1", Duration::from_secs(2)),
        None,
        "two calls on vm1 at once"
    );
    assert!(
        target.with_store("vm3", |_| Ok(())).is_err(),
        "no replica of vm3"
    );
}

/// A machine of this site (promoted here) is given no receiving slot: its replica is
/// read as it is, by as many calls as come.
#[test]
fn with_store_on_a_machine_of_this_site_reads_its_replica_without_a_slot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("target");
    let target = target_of(&site, &["vm1"]);
    let dir = site.join("machines/vm1");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(replog::volume::MANIFEST_FILE), b"a machine here").expect("manifest");
    assert_eq!(
        runs_beside(&target, "vm1", "vm1", std::time::Duration::from_secs(120)),
        Some(1)
    );
}
