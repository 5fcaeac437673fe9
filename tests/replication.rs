//! Delta replication between two sites on 127.0.0.1 over mutual TLS: sealed segments
//! ship in order, are stored verified and encrypted at the target, are acknowledged,
//! and only then merged at the source; untrusted peers get nothing.

mod common;

use common::pair::{one_disk, replog, restore, start_target, trusted_pair, OneDisk};
use replog::replication::shipper::Shipper;
use replog::{Error, Site};
use std::process::Command;

#[test]
fn sealed_segments_ship_in_order_and_merge_only_after_ack() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    trusted_pair(&a, &b);
    replog(&["init"], &c);
    replog(&["disk", "create", "vm1/os", "--size", "8M"], &a);
    let addr = start_target(&b);

    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let v = m.volume("os").expect("vol");
    let mut shipper = Shipper::new(&a, &m, &addr);
    for i in 0..3u64 {
        v.write(i * 100_000 + 7, &vec![i as u8 + 1; 70_000])
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    // Nothing acknowledged yet: the compactor may not merge.
    assert_eq!(
        m.compact().expect("compact").segments,
        0,
        "merged before the target acknowledged"
    );
    let sealed: Vec<_> = m.sealed_segments();
    let r = shipper.ship_once(&m).expect("ship");
    assert_eq!(r.segments, 3);
    assert_eq!(r.acked_lsn, sealed.last().expect("sealed").last_lsn);

    // At the target: the same bytes, stored and decryptable with the target's key.
    let key = replog::replica::crypt::ReplicaKey::load_or_create(&b.join("identity/replica.key"))
        .expect("key");
    let store = replog::replica::store::Replicas::with_key(&b, key.clone())
        .open("vm1")
        .expect("replica");
    for s in &sealed {
        let mut want = vec![0u8; s.file.len().expect("len") as usize];
        s.file.read_exact_at(&mut want, 0).expect("read");
        assert!(
            store.read_segment(s.seq).expect("stored")[..] == want[..],
            "segment {} differs",
            s.seq
        );
    }
    drop(store);

    // Acknowledged: now it merges, and the next pass ships only what is new.
    assert_eq!(m.compact().expect("compact").segments, 3);
    v.write(5, b"later").expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    assert_eq!(shipper.ship_once(&m).expect("ship").segments, 1);
    assert_eq!(
        shipper.ship_once(&m).expect("ship again").segments,
        0,
        "resent what was acknowledged"
    );

    // An untrusted source is refused in the handshake; nothing is stored for it.
    replog(&["disk", "create", "vm2/os", "--size", "1M"], &c);
    let site_c = Site::open(&c).expect("open c");
    let mc = site_c.open_machine("vm2").expect("machine");
    mc.volume("os").expect("vol").write(0, b"x").expect("write");
    mc.seal().expect("seal");
    let err = Shipper::new(&c, &mc, &addr)
        .ship_once(&mc)
        .expect_err("untrusted source shipped");
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert_eq!(err.class(), replog::error::ErrorClass::Critical, "{err}");
    assert!(
        !b.join("replicas/vm2").exists(),
        "the target stored something for an untrusted source"
    );
}

/// Initial replication of parents that hold data (with holes), then deltas, then a
/// restore of the latest point at the target: byte-equal to the source's disks.
#[test]
fn initial_copy_then_deltas_restore_byte_equal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    replog(&["disk", "create", "vm1/os", "--size", "16M"], &a);
    replog(&["disk", "create", "vm1/data", "--size", "4M"], &a);
    let addr = start_target(&b);

    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let (os, data) = (m.volume("os").expect("os"), m.volume("data").expect("data"));
    // Data in the parents (merged), with holes between.
    for i in 0..6u64 {
        os.write(i * 2_500_000 + 13, &vec![0x40 + i as u8; 300_000])
            .expect("write");
    }
    data.write(4096 * 7 + 1, b"parent data").expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    m.compact().expect("compact");
    // And more in the journal before protection starts (protection merges it first,
    // so the initial copy covers it and every point shipped carries digests).
    os.write(1_000_000, &vec![0xEE; 50_000]).expect("write");
    os.write_zeroes(2_500_000, 100_000).expect("zero");
    m.flush().expect("flush");
    m.seal().expect("seal");

    let mut shipper = Shipper::new(&a, &m, &addr);
    let r = shipper.ship_once(&m).expect("ship");
    assert!(r.initial_completed);
    assert!(
        r.initial_bytes >= 1_700_000 && r.initial_bytes < 4 << 20,
        "sent {} bytes of parents",
        r.initial_bytes
    );
    assert_eq!(r.segments, 0, "the journal was merged before the copy");

    // Writes go on; they ship as deltas.
    data.write(3_000_000, &vec![0x77; 200_000]).expect("write");
    os.write(15_000_000, b"the end").expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    assert_eq!(shipper.ship_once(&m).expect("ship").segments, 1);

    let out = tmp.path().join("restored");
    let restored = restore(&b, "latest", &out).expect("restore");
    assert_eq!(restored.lsn, shipper.acked_lsn());
    assert!(restored.verified, "the point carries digests");
    for (name, vol) in [("os", &os), ("data", &data)] {
        let mut want = vec![0u8; vol.size() as usize];
        vol.read(0, &mut want).expect("read source");
        let got = std::fs::read(out.join(format!("{name}.img"))).expect("restored image");
        assert!(got == want, "restored {name} differs from the source");
    }
    // A second restore into the same directory is refused, and leaves it as it was.
    let err = restore(&b, "latest", &out).expect_err("overwrote");
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert!(!out.join("os.img.partial").exists());
}

/// An initial copy of several of the target's 16 MiB batches, whose chunks the target
/// keeps in the frames they arrived in and whose frames come back for the next chunks:
/// first 8 MiB pieces (big frames), then many small runs read into those frames again,
/// some of them compressible (unpacked into buffers of their own). The replica restores
/// byte-equal.
#[test]
fn an_initial_copy_of_many_batches_restores_byte_equal() {
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    replog(&["disk", "create", "vm1/os", "--size", "96M"], &a);
    let addr = start_target(&b);

    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let os = m.volume("os").expect("os");
    // 40 MiB in one run: five 8 MiB chunks, two and a half batches.
    os.write(0, &common::pattern(1, 40 * MIB as usize))
        .expect("write");
    // Then 300 runs of 20–80 KiB with holes between; every fifth compressible.
    let mut at = 41 * MIB;
    for i in 0..300u64 {
        let len = (20 + i * 7 % 61) * 1024;
        let run = if i % 5 == 0 {
            vec![(i % 250) as u8 + 1; len as usize]
        } else {
            common::pattern(100 + i, len as usize)
        };
        os.write(at, &run).expect("write");
        at += len + 64 * 1024 + i * 4096 % 40_960;
    }
    assert!(at < 96 * MIB);
    m.flush().expect("flush");
    m.seal().expect("seal");
    m.compact().expect("compact");

    let mut shipper = Shipper::new(&a, &m, &addr);
    let r = shipper.ship_once(&m).expect("ship");
    assert!(r.initial_completed);
    assert!(
        r.initial_bytes > 48 * MIB,
        "sent {} bytes of parents",
        r.initial_bytes
    );
    // A point after the copy (its base is not one).
    os.write(95 * MIB, b"the end").expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    assert_eq!(shipper.ship_once(&m).expect("ship").segments, 1);

    let out = tmp.path().join("restored");
    restore(&b, "latest", &out).expect("restore");
    let mut want = vec![0u8; os.size() as usize];
    os.read(0, &mut want).expect("read source");
    let got = std::fs::read(out.join("os.img")).expect("restored image");
    assert!(got == want, "the restored disk differs from the source");
}

/// Every point received restores exactly the source's disk at that point; points list
/// with IDs; LSN, ID and time forms resolve; an unknown point writes nothing.
#[test]
fn every_received_point_restores_the_disk_as_it_was() {
    let OneDisk { tmp, a, b, addr } = one_disk("2M");
    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let v = m.volume("os").expect("vol");
    let mut shipper = Shipper::new(&a, &m, &addr);
    shipper.ship_once(&m).expect("initial");
    // Each flush is a point; remember the disk at each.
    let mut states = Vec::new();
    for i in 0..8u64 {
        v.write(i * 123_457 % 1_900_000, &vec![i as u8 + 1; 50_000])
            .expect("write");
        if i % 3 == 2 {
            v.write_zeroes(i * 10_000, 30_000).expect("zero");
        }
        let lsn = m.flush().expect("flush");
        let mut disk = vec![0u8; 2 << 20];
        v.read(0, &mut disk).expect("read");
        states.push((lsn, disk));
        if i % 2 == 1 {
            m.seal().expect("seal");
        }
    }
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");

    let key = replog::site::replica_key_at(&b).expect("key");
    let store = replog::replica::store::Replicas::with_key(&b, key)
        .open("vm1")
        .expect("replica");
    let points = replog::replica::points::list(&store).expect("points");
    for (lsn, disk) in &states {
        assert!(
            points.iter().any(|p| p.lsn == *lsn),
            "flush at LSN {lsn} is not a point"
        );
        let out = tmp.path().join(format!("at-{lsn}"));
        let r = restore(&b, &lsn.to_string(), &out).expect("restore");
        assert_eq!(r.lsn, *lsn);
        assert!(r.verified, "point {lsn} carries digests");
        assert!(
            std::fs::read(out.join("os.img")).expect("image") == *disk,
            "restore at LSN {lsn} differs"
        );
    }
    // The forms of POINT resolve to the same LSN.
    let p = points[points.len() / 2].clone();
    let resolve = |at: &str| replog::replica::points::resolve(&store, at).map(|p| p.lsn);
    assert_eq!(resolve(&p.id()).expect("id"), p.lsn);
    assert_eq!(resolve(&p.lsn.to_string()).expect("lsn"), p.lsn);
    // Times print to the microsecond: one microsecond later is at or after p.
    let t = replog::format::rfc3339(p.time_ns + 1_000);
    let by_time = resolve(&t).expect("time");
    assert!(
        by_time >= p.lsn,
        "{t} resolved to {by_time}, before point {}",
        p.lsn
    );
    let found = points.iter().find(|q| q.lsn == by_time).expect("a point");
    assert!(found.time_ns <= p.time_ns + 1_000);
    assert_eq!(resolve("latest").expect("latest"), store.received().lsn);
    // Unknown points and times before the first point: clear errors, nothing written.
    for bad in ["pt-999999", "999999", "1970-01-01T00:00:00Z", "yesterday"] {
        assert!(resolve(bad).is_err(), "{bad} resolved");
    }
    let out = tmp.path().join("bad");
    let status = Command::new(env!("CARGO_BIN_EXE_replog"))
        .arg("restore")
        .arg(&b)
        .args(["vm1", "--at", "pt-999999", "--out"])
        .arg(&out)
        .status()
        .expect("restore");
    assert_eq!(status.code(), Some(1));
    assert!(
        !out.exists() || std::fs::read_dir(&out).expect("ls").next().is_none(),
        "wrote to --out"
    );
    // `points --json` carries the contract's fields.
    let doc: serde_json::Value =
        serde_json::from_str(&replog(&["points", "vm1", "--json"], &b)).expect("json");
    assert_eq!(doc["machine"], "vm1");
    let first = &doc["points"][0];
    for field in ["id", "lsn", "time", "kind"] {
        assert!(!first[field].is_null(), "points JSON lacks {field}: {doc}");
    }
}

/// A new shipper (a restarted serve) whose target already holds every sealed segment
/// ships nothing, and still moves the hold (and what it reports as acknowledged) to
/// the target's position: otherwise the compactor could never merge them and the loop
/// would take them for unshipped.
#[test]
fn a_pass_that_ships_nothing_still_moves_the_hold_to_the_target() {
    let OneDisk {
        tmp: _tmp, a, addr, ..
    } = one_disk("8M");
    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let v = m.volume("os").expect("vol");
    let mut first = Shipper::new(&a, &m, &addr);
    first.ship_once(&m).expect("initial");
    for i in 0..3u64 {
        v.write(i * 100_000, &vec![i as u8 + 1; 70_000])
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    first.ship_once(&m).expect("deltas");
    let last = m.status().last_lsn;
    assert_eq!(first.acked_lsn(), last);
    drop(first);
    // What a restarted serve does: a new shipper, its hold at the merge watermark.
    let mut again = Shipper::new(&a, &m, &addr);
    assert!(again.acked_lsn() < last, "the test needs unmerged segments");
    let r = again.ship_once(&m).expect("nothing to ship");
    assert_eq!(r.segments, 0);
    assert_eq!(
        again.acked_lsn(),
        last,
        "acknowledged: the target's position"
    );
    let merged = m.compact().expect("compact");
    assert_eq!(merged.watermark, last, "the hold kept the merge back");
}
