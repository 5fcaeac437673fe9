//! Resynchronisation between two sites on 127.0.0.1: a chain broken by merging what
//! the target lacks, a damaged replica segment, an interrupted resync, a disk changed
//! while replog was not running — each mended by comparing chunks, sending only those
//! that differ, and delta replication goes on from there.

mod common;

use common::pair::{create_vm1, one_disk, restore, start_target, trusted_pair, OneDisk};
use replog::replication::shipper::Shipper;
use replog::{Error, Machine, Site};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CHUNK: u64 = 4096;

struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    addr: String,
}

/// Two trusted sites, vm1 with disks os (`os_size`) and data (2 MiB) at the source,
/// os imported with data; the target listening in this process.
fn pair(os_size: u64) -> Pair {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    create_vm1(
        &a,
        &common::pattern(7, (os_size / 2) as usize),
        &os_size.to_string(),
        "2M",
    );
    let addr = start_target(&b);
    Pair {
        _tmp: tmp,
        a,
        b,
        addr,
    }
}

/// Every disk of `m`, read whole.
fn disks(m: &Machine) -> Vec<Vec<u8>> {
    m.disks()
        .iter()
        .map(|(name, size)| {
            let mut buf = vec![0u8; *size as usize];
            m.volume(name)
                .expect("vol")
                .read(0, &mut buf)
                .expect("read");
            buf
        })
        .collect()
}

/// Restore the newest point at the target and compare with `want`.
fn assert_replica_equals(p: &Pair, want: &[Vec<u8>], what: &str) {
    let out = p.a.with_file_name(format!("restored-{}", rand_name()));
    let r = restore(&p.b, "latest", &out).unwrap_or_else(|e| panic!("{what}: restore: {e}"));
    assert!(r.verified, "{what}: restore not verified");
    for (d, name) in ["os", "data"].iter().enumerate() {
        let got = std::fs::read(out.join(format!("{name}.img"))).expect("image");
        assert!(got == want[d], "{what}: {name} differs from the source");
    }
    std::fs::remove_dir_all(&out).expect("clean");
}

fn rand_name() -> u64 {
    replog::format::now_ns()
}

/// Write `n` scattered 4 KiB blocks to os, starting from `seed`.
fn scatter(m: &Machine, seed: u64, n: u64) {
    let v = m.volume("os").expect("vol");
    let blocks = v.size() / 4096;
    for i in 0..n {
        let b = (seed * 7919 + i * 104_729) % blocks;
        v.write(b * 4096, &common::pattern(seed + i, 4096))
            .expect("write");
    }
}

/// Break the chain: the source merges what the target never got.
fn break_chain(m: &Machine, shipper: &mut Shipper) {
    scatter(m, 500, 40);
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.release_hold(m.status().last_lsn);
    m.compact().expect("compact");
    scatter(m, 900, 5);
    m.flush().expect("flush");
    m.seal().expect("seal");
}

#[test]
fn a_broken_chain_is_mended_by_sending_only_what_differs() {
    let p = pair(8 << 20);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.ship_once(&m).expect("initial");
    scatter(&m, 1, 10);
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("deltas");
    assert_replica_equals(&p, &disks(&m), "before the break");

    break_chain(&m, &mut shipper);
    let err = shipper.ship_once(&m).expect_err("shipped over a gap");
    assert!(matches!(err, Error::BrokenChain(_)), "{err}");

    // What status is told as the resync goes: the counters, chunks sent included.
    let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
    {
        let told = told.clone();
        shipper.report_resync_to(Box::new(move |c| told.lock().push(c)));
    }
    let r = shipper.resync_once(&m, CHUNK).expect("resync");
    let total: u64 = m.disks().iter().map(|(_, s)| s / CHUNK).sum();
    assert_eq!(r.compared, total, "every chunk compared once");
    let last = *told.lock().last().expect("counters reported");
    assert_eq!(
        (
            last.chunks_compared,
            last.chunks_total,
            last.chunks_sent,
            last.bytes_sent
        ),
        (total, total, r.sent_chunks, r.sent_bytes),
        "status is told what was sent"
    );
    assert!(last.chunks_sent > 0);
    // 45 scattered blocks changed (some may coincide): only those travel.
    assert!(
        r.sent_chunks >= 1 && r.sent_chunks <= 45,
        "sent {} chunks",
        r.sent_chunks
    );
    assert!(
        r.sent_bytes_now + r.hash_bytes_now < (total * CHUNK) / 10,
        "sent {} bytes of data and {} of hashes for {} bytes of disks",
        r.sent_bytes_now,
        r.hash_bytes_now,
        total * CHUNK
    );
    // Delta replication goes on from the resync's base.
    shipper.ship_once(&m).expect("ship after the resync");
    assert_replica_equals(&p, &disks(&m), "after the resync");
    // The resync's chunks lie in patch files over the parent until the target
    // compactor folds them in; the replica reads the same before and after.
    let key = replog::site::replica_key_at(&p.b).expect("key");
    let open = || {
        replog::replica::store::Replicas::with_key(&p.b, key.clone())
            .open_readonly("vm1")
            .expect("store")
    };
    assert!(open().parent().patches > 0, "no patch written");
    replog::replica::compact::compact_replica(
        &replog::replica::store::Replicas::with_key(&p.b, key.clone()),
        "vm1",
        replog::format::now_ns(),
    )
    .expect("compact");
    assert_eq!(open().parent().patches, 0, "patches not folded");
    assert!(
        !p.b.join("replicas/vm1/patches").exists(),
        "patch files left"
    );
    assert_replica_equals(&p, &disks(&m), "after folding the patches");
    scatter(&m, 77, 3);
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship more");
    assert_replica_equals(&p, &disks(&m), "deltas after the resync");
    // Points from before the resync are gone; the resync's end is a point.
    let key = replog::site::replica_key_at(&p.b).expect("key");
    let store = replog::replica::store::Replicas::with_key(&p.b, key)
        .open_readonly("vm1")
        .expect("store");
    let points = replog::replica::points::list(&store).expect("points");
    assert!(
        points.iter().all(|q| q.lsn >= r.valid_from),
        "a point before the resync survived: {points:?}"
    );
    assert!(
        points.iter().any(|q| q.lsn == r.valid_from),
        "the resync's end is no point"
    );
}

#[test]
fn a_damaged_replica_segment_is_found_reported_and_mended() {
    let p = pair(4 << 20);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.ship_once(&m).expect("initial");
    for i in 0..3 {
        scatter(&m, 10 + i, 8);
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    shipper.ship_once(&m).expect("deltas");
    // Damage the middle segment at rest.
    let seg = p.b.join("replicas/vm1/segments");
    let mut files: Vec<_> = std::fs::read_dir(&seg)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|f| f.to_string_lossy().ends_with(".seg.enc"))
        .collect();
    files.sort();
    let victim = &files[files.len() / 2];
    let mut bytes = std::fs::read(victim).expect("read");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(victim, &bytes).expect("damage");
    // The scrub finds it; the damage is never served.
    let key = replog::site::replica_key_at(&p.b).expect("key");
    replog::replica::scrub::scrub_replica(
        &replog::replica::store::Replicas::with_key(&p.b, key.clone()),
        "vm1",
        u64::MAX,
    )
    .expect("scrub");
    let store = replog::replica::store::Replicas::with_key(&p.b, key.clone())
        .open_readonly("vm1")
        .expect("store");
    let why = store.damage().expect("damage").expect("damage recorded");
    assert!(why.contains(".seg.enc"), "{why}");
    assert!(restore(&p.b, "latest", &p.a.with_file_name("x")).is_err());
    // The source hears of it and resyncs.
    let err = shipper
        .ship_once(&m)
        .expect_err("shipped to a damaged replica");
    assert!(matches!(err, Error::BrokenChain(_)), "{err}");
    let r = shipper.resync_once(&m, CHUNK).expect("resync");
    assert!(
        r.sent_chunks > 0 && r.sent_chunks <= 24,
        "sent {}",
        r.sent_chunks
    );
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after mending");
    let store = replog::replica::store::Replicas::with_key(&p.b, key)
        .open_readonly("vm1")
        .expect("store");
    assert_eq!(store.damage().expect("damage"), None);
}

#[test]
fn an_interrupted_resync_continues_where_it_stopped() {
    // 160 MiB: three batches of 64 MiB, so it can stop between them.
    let p = pair(160 << 20);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.ship_once(&m).expect("initial");
    break_chain(&m, &mut shipper);
    scatter(&m, 4242, 300);
    m.flush().expect("flush");
    // Stop after the first batch.
    let stop = Arc::new(AtomicBool::new(false));
    shipper.stop_on(stop.clone());
    {
        let stop = stop.clone();
        shipper.on_progress(Box::new(move |done, _| {
            if done > 0 {
                stop.store(true, Ordering::Release);
            }
        }));
    }
    let err = shipper.resync_once(&m, CHUNK).expect_err("did not stop");
    assert!(!matches!(err, Error::BrokenChain(_)), "{err}");
    // A new shipper (as after a restart) resumes: the chunks compared and the bytes
    // sent before the stop are not repeated.
    stop.store(false, Ordering::Release);
    drop(shipper);
    let mut again = Shipper::new(&p.a, &m, &p.addr);
    let r = again.resync_once(&m, CHUNK).expect("resumed resync");
    let total: u64 = m.disks().iter().map(|(_, s)| s / CHUNK).sum();
    assert_eq!(r.compared, total);
    assert!(
        r.compared_now < total && r.compared_now + (64 << 20) / CHUNK <= total,
        "the resumed run compared {} of {total} chunks: it started over",
        r.compared_now
    );
    assert!(r.sent_bytes_now <= r.sent_bytes, "counters went backwards");
    again.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after the resumed resync");
}

#[test]
fn a_disk_changed_while_replog_was_not_running_is_detected() {
    let p = pair(4 << 20);
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        assert_eq!(m.changed_offline(), None);
        m.close().expect("close");
    }
    // Someone writes the parent image directly.
    write_parent(&p.a, "os", 123_456, b"written behind replog's back");
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let why = m.changed_offline().expect("change not detected");
    assert!(why.contains("os"), "{why}");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    let r = shipper.resync_once(&m, CHUNK).expect("resync");
    assert_eq!(r.sent_chunks, 1, "one chunk changed");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after the offline change");
    // Closing records the parents as they are: no change seen next time.
    m.close().expect("close");
    drop(site);
    let site = Site::open(&p.a).expect("source");
    assert_eq!(
        site.open_machine("vm1").expect("machine").changed_offline(),
        None
    );
}

/// Write `data` at `at` of vm1's parent image of disk `disk` at site `a`, behind
/// replog's back.
fn write_parent(a: &Path, disk: &str, at: u64, data: &[u8]) {
    let img = a.join(format!("machines/vm1/disks/{disk}.img"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open parent");
    std::os::unix::fs::FileExt::write_all_at(&f, data, at).expect("write");
}

/// A kill -9 in the middle of a merge leaves parents replog itself changed: that is
/// not a change made while replog was not running (found by tools/soak).
#[test]
fn a_merge_cut_short_is_not_a_change_made_offline() {
    let p = pair(4 << 20);
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        m.volume("data")
            .expect("vol")
            .write(4096, b"merged by replog")
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
        m.compact().expect("compact");
        m.close().expect("close");
    }
    // As a merge leaves it when killed: the stamp says "merging" and the parent
    // changed since the last stamp.
    std::fs::write(p.a.join("machines/vm1/parents.stamp"), "merging\n").expect("stamp");
    write_parent(&p.a, "data", 8192, b"merge in progress");
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        assert_eq!(
            m.changed_offline(),
            None,
            "a merge cut short taken for an offline change"
        );
        drop(m);
    }
    // The stamp is current again: a real change after this is still found.
    write_parent(&p.a, "data", 12_288, b"behind replog's back");
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    assert!(
        m.changed_offline().is_some(),
        "an offline change went unnoticed"
    );
}

/// Flip the byte at `at` of the source's journal segment `seq`.
fn damage_source_segment(a: &Path, seq: u64, at: usize) {
    let path = a
        .join("machines/vm1/journal")
        .join(replog::format::segment::segment_name(seq));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("segment");
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at as u64).expect("read");
    b[0] ^= 0x10;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, at as u64).expect("flip");
}

#[test]
fn damage_in_the_source_journal_is_never_served_and_is_mended() {
    let p = pair(4 << 20);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let v = m.volume("data").expect("vol");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.ship_once(&m).expect("initial");
    // A: shipped. Then B over A's range and C elsewhere, in one unshipped segment.
    let a = common::pattern(1, 8192);
    v.write(65_536, &a).expect("A");
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship A");
    let c = common::pattern(3, 4096);
    v.write(300_000, &c).expect("C");
    let b = common::pattern(2, 8192);
    v.write(65_536, &b).expect("B");
    m.flush().expect("flush");
    let seq = m.sealed_segments().last().map(|g| g.seq).unwrap_or(0) + 1;
    m.seal().expect("seal");
    // Damage B's payload (the last write record: 48-byte footer + point record before
    // the end, B's payload before those).
    let seg = m
        .sealed_segments()
        .into_iter()
        .find(|g| g.seq == seq)
        .expect("segment");
    let end = seg.file.len().expect("len") as usize;
    damage_source_segment(&p.a, seq, end - 48 - 48 - 16 - 48 - 100);
    // The shipper finds it before sending; the damaged data is never served.
    let err = shipper
        .ship_once(&m)
        .expect_err("shipped a damaged segment");
    assert!(matches!(err, Error::BrokenChain(_)), "{err}");
    let mut buf = vec![0u8; 8192];
    assert!(v.read(65_536, &mut buf).is_err(), "damaged data served");
    assert!(m.is_poisoned());
    // The resync mends: C (its record verifies) is kept, B (damaged) is lost and A
    // comes back from the replica; the machine takes writes again.
    let r = shipper.resync_once(&m, CHUNK).expect("resync");
    assert!(r.mended_bytes >= 8192 + 4096, "{r:?}");
    assert_eq!(r.lost_bytes, 8192, "{r:?}");
    assert!(!m.is_poisoned());
    v.read(65_536, &mut buf).expect("read mended");
    assert!(buf == a, "the damaged range is not the replica's data");
    let mut cbuf = vec![0u8; 4096];
    v.read(300_000, &mut cbuf).expect("read C");
    assert!(cbuf == c, "an intact record was lost");
    v.write(0, b"writes go on").expect("write after mending");
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after mending the source");
    // Merges skip the mended segment; the machine reopens cleanly.
    shipper.release_hold(m.status().last_lsn);
    m.compact().expect("compact past the mended segment");
    m.close().expect("close");
    drop(site);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("reopen");
    let mut buf = vec![0u8; 8192];
    m.volume("data")
        .expect("vol")
        .read(65_536, &mut buf)
        .expect("read");
    assert!(buf == a);
}

/// Write `a` (8 KiB at 64 KiB) and `b` (4 KiB at 300,000) into one new sealed segment
/// of vm1/data; returns its number.
fn two_writes_sealed(m: &Machine, a: &[u8], b: &[u8]) -> u64 {
    let v = m.volume("data").expect("vol");
    m.seal().expect("seal before");
    v.write(65_536, a).expect("a");
    v.write(300_000, b).expect("b");
    m.flush().expect("flush");
    let seq = m.sealed_segments().last().map_or(0, |g| g.seq) + 1;
    m.seal().expect("seal");
    seq
}

fn read_data(m: &Machine, at: u64, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    m.volume("data")?.read(at, &mut buf)?;
    Ok(buf)
}

/// Damage in a segment the target holds, found only when the machine opens (bit rot
/// while it was stopped): the machine opens, refuses every range the damage may hide,
/// and the resync takes those from the replica — nothing is lost.
#[test]
fn damage_found_at_open_in_a_shipped_segment_is_mended_from_the_replica() {
    let p = pair(4 << 20);
    let (a, b, later) = (
        common::pattern(11, 8192),
        common::pattern(12, 4096),
        common::pattern(13, 4096),
    );
    let seq;
    let want;
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        seq = two_writes_sealed(&m, &a, &b);
        shipper.ship_once(&m).expect("ship");
        // A later write, in the next segment, not shipped.
        m.volume("data")
            .expect("vol")
            .write(500_000, &later)
            .expect("later");
        m.flush().expect("flush");
        want = disks(&m);
        m.close().expect("close");
    }
    // The first record's payload rots.
    damage_source_segment(
        &p.a,
        seq,
        replog::format::SEGMENT_HEADER_LEN + replog::format::RECORD_HEADER_LEN + 10,
    );
    let site = Site::open(&p.a).expect("source");
    let m = site
        .open_machine("vm1")
        .expect("a damaged segment stopped the machine opening");
    assert_eq!(m.damage().len(), 1, "{:?}", m.damage());
    assert!(m.is_poisoned());
    assert!(
        read_data(&m, 65_536, 8192).is_err(),
        "served a range the damage hides"
    );
    assert!(
        read_data(&m, 0, 4096).is_err(),
        "served a parent range the damage may hide"
    );
    assert_eq!(read_data(&m, 500_000, 4096).expect("later"), later);
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    let r = shipper.resync_once(&m, CHUNK).expect("resync");
    assert_eq!(r.lost_bytes, 0, "{r:?}");
    assert!(!m.is_poisoned());
    assert!(
        disks(&m) == want,
        "the mended machine differs from before the damage"
    );
    m.volume("data")
        .expect("vol")
        .write(0, b"writes go on")
        .expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    let now = disks(&m);
    assert_replica_equals(&p, &now, "after mending damage found at open");
    // Mended for good: the next open indexes nothing of the damaged segment.
    m.close().expect("close");
    drop(site);
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("reopen");
    assert!(m.damage().is_empty(), "{:?}", m.damage());
    assert!(disks(&m) == now);
}

/// Damage at both ends of one range: the source's segment holding it rots after the
/// target merged that segment into a parent chunk, and that chunk rots too (the
/// scrub finds it). The resync's mend asks the replica for the range; the replica
/// dropped the chunk, so it answers that the bytes are lost there too — never
/// zeroes — and the source keeps refusing to serve them, until an operator gives the
/// range up at the target (`replog accept-loss`): then the mend takes the replica's
/// zeroes, the machine takes writes again and the replica converges.
#[test]
fn damage_at_both_ends_of_a_range_is_never_mended_with_zeroes_until_the_loss_is_accepted() {
    let p = pair(4 << 20);
    let (a, b) = (common::pattern(21, 8192), common::pattern(22, 4096));
    let seq;
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        seq = two_writes_sealed(&m, &a, &b);
        shipper.ship_once(&m).expect("ship");
        m.close().expect("close");
    }
    // The target merges that segment into its parent, then the parent chunk holding
    // `a` (disk data, chunk 0) rots and the scrub finds it.
    let key = replog::site::replica_key_at(&p.b).expect("key");
    let replicas = replog::replica::store::Replicas::with_key(&p.b, key.clone());
    let much_later = replog::format::now_ns() + 400 * 24 * 3600 * 1_000_000_000;
    replog::replica::compact::compact_replica(&replicas, "vm1", much_later).expect("merge");
    let store = replicas.open_readonly("vm1").expect("store");
    assert!(
        store.parent().seq >= seq,
        "segment {seq} not merged: {:?}",
        store.parent()
    );
    let chunk = p.b.join("replicas/vm1/parent/1/0000000000.enc");
    let mut bytes = std::fs::read(&chunk).expect("parent chunk");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    std::fs::write(&chunk, &bytes).expect("damage");
    replog::replica::scrub::scrub_replica(&replicas, "vm1", u64::MAX).expect("scrub");
    let why = store.damage().expect("damage").expect("damage recorded");
    assert!(why.contains("0000000000.enc"), "{why}");
    // The source's copy of `a` rots too.
    damage_source_segment(
        &p.a,
        seq,
        replog::format::SEGMENT_HEADER_LEN + replog::format::RECORD_HEADER_LEN + 10,
    );
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    assert!(read_data(&m, 65_536, 8192).is_err());
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    let e = shipper
        .resync_once(&m, CHUNK)
        .expect_err("mended a range no copy of which is left");
    let text = e.to_string();
    // Nothing retries its way out of this: an operator must look.
    assert_eq!(e.class(), replog::error::ErrorClass::Critical, "{text}");
    // The fetch covers every range the damage may hide (here all of chunk 0).
    assert!(
        text.contains("lost them too") && text.contains("disk 1 bytes 0..262144"),
        "{text}"
    );
    assert!(
        read_data(&m, 65_536, 8192).is_err(),
        "the lost range is served after the failed resync"
    );
    // What the replica lost stays listed until the resync ends.
    let store = replicas.open_readonly("vm1").expect("store");
    let lost = store.lost_ranges().expect("lost");
    assert!(
        lost.iter()
            .any(|(d, x, y)| *d == 1 && *x <= 65_536 && *y >= 65_536 + 8192),
        "{lost:?}"
    );
    assert!(text.contains("replog accept-loss"), "{text}");
    assert!(
        shipper.resync_once(&m, CHUNK).is_err(),
        "a second try mended it without an operator"
    );

    // The operator gives the range up at the target: a job names every range. (The
    // command itself, through a target's serve, is `tests/resync_e2e.rs`'s; this
    // target runs in this process, holding the site.)
    let done = replog::replica::resync_apply::accept_loss(&p.b, &store).expect("accept");
    assert!(
        done.ranges
            .iter()
            .any(|r| r.disk == 1 && r.name == "data" && r.start <= 65_536 && r.end >= 73_728),
        "{:?}",
        done.ranges
    );
    let job = replog::jobs::get(&p.b, &done.job.id).expect("job");
    assert_eq!(job.kind, replog::jobs::JobKind::AcceptLoss);
    assert_eq!(job.state, replog::jobs::JobState::Succeeded);
    let said = format!("{:?}", job.steps);
    assert!(said.contains("disk 1 (data) bytes 0..262144"), "{said}");
    assert!(store.lost_ranges().expect("lost").is_empty());
    // Nothing is left to give up: refused, and no job is recorded.
    let jobs = replog::jobs::list(&p.b).expect("jobs").len();
    let e = replog::replica::resync_apply::accept_loss(&p.b, &store).expect_err("twice");
    assert!(e.to_string().contains("nothing to accept"), "{e}");
    assert_eq!(replog::jobs::list(&p.b).expect("jobs").len(), jobs);

    // The mend now takes the replica's zeroes for the lost write (the loss is the
    // target's job's to record: the source asked for every range the damage may hide).
    let report = shipper
        .resync_once(&m, CHUNK)
        .expect("resync after the loss was accepted");
    assert!(report.mended_bytes >= 8192, "{report:?}");
    assert_eq!(read_data(&m, 65_536, 8192).expect("a"), vec![0u8; 8192]);
    assert_eq!(
        read_data(&m, 300_000, 4096).expect("b"),
        b,
        "b was in the replica"
    );
    assert!(!m.is_poisoned());
    m.volume("data")
        .expect("vol")
        .write(65_536, &a)
        .expect("the machine takes writes again");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after the loss was accepted");
}

/// Damage in a segment the target never got, found at open: the records before the
/// damage are kept, what was written after it is lost (reported), and the machine and
/// its replica go on equal.
#[test]
fn damage_found_at_open_in_an_unshipped_segment_keeps_what_verifies() {
    let p = pair(4 << 20);
    let (a, b) = (common::pattern(21, 8192), common::pattern(22, 4096));
    let seq;
    let old_b;
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        old_b = read_data(&m, 300_000, 4096).expect("read");
        seq = two_writes_sealed(&m, &a, &b);
        m.close().expect("close");
    }
    // The second record (b) rots; the first (a) still verifies.
    damage_source_segment(
        &p.a,
        seq,
        replog::format::SEGMENT_HEADER_LEN + 2 * replog::format::RECORD_HEADER_LEN + 8192 + 10,
    );
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("open");
    assert!(m.is_poisoned());
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.resync_once(&m, CHUNK).expect("resync");
    assert!(!m.is_poisoned());
    assert_eq!(
        read_data(&m, 65_536, 8192).expect("a"),
        a,
        "a verified write was lost"
    );
    assert_eq!(
        read_data(&m, 300_000, 4096).expect("b"),
        old_b,
        "the damaged write is not what was there before it"
    );
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after losing the damaged writes");
}

/// Damage the shipper found survives a restart, even if the bytes read right again
/// (the damage list): the machine stays stopped until a resync mends it.
#[test]
fn damage_found_by_the_shipper_survives_a_restart() {
    let p = pair(4 << 20);
    let (a, b) = (common::pattern(31, 8192), common::pattern(32, 4096));
    let seq;
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        seq = two_writes_sealed(&m, &a, &b);
        let at = replog::format::SEGMENT_HEADER_LEN + replog::format::RECORD_HEADER_LEN + 10;
        damage_source_segment(&p.a, seq, at);
        let err = shipper
            .ship_once(&m)
            .expect_err("shipped a damaged segment");
        assert!(matches!(err, Error::BrokenChain(_)), "{err}");
        // The flip goes away again (a read error that cleared, a repaired mirror).
        damage_source_segment(&p.a, seq, at);
        drop(shipper);
        drop(m);
    }
    let site = Site::open(&p.a).expect("source");
    let m = site.open_machine("vm1").expect("open");
    assert_eq!(
        m.damage().iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![seq],
        "the restart forgot the damage"
    );
    assert!(m.is_poisoned());
    assert!(
        read_data(&m, 65_536, 8192).is_err(),
        "served the damaged segment"
    );
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.resync_once(&m, CHUNK).expect("resync");
    assert!(!m.is_poisoned());
    assert_eq!(read_data(&m, 65_536, 8192).expect("a"), a);
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after mending");
}

#[test]
fn a_source_that_lost_its_journal_is_behind_its_target_and_resyncs() {
    let p = pair(4 << 20);
    {
        let site = Site::open(&p.a).expect("source");
        let m = site.open_machine("vm1").expect("machine");
        let mut shipper = Shipper::new(&p.a, &m, &p.addr);
        shipper.ship_once(&m).expect("initial");
        scatter(&m, 5, 20);
        m.flush().expect("flush");
        m.seal().expect("seal");
        shipper.ship_once(&m).expect("ship");
        // Lost: the machine stops without closing, and its journal is gone (as if the
        // file system lost it in an unclean stop); only the parents remain.
        drop(m);
    }
    let journal = p.a.join("machines/vm1/journal");
    for e in std::fs::read_dir(&journal).expect("journal") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "seg") {
            std::fs::remove_file(&path).expect("lose");
        }
    }
    let site = Site::open(&p.a).expect("source");
    let m = site
        .open_machine("vm1")
        .expect("machine reopens on its parents");
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    scatter(&m, 6, 3);
    m.flush().expect("flush");
    m.seal().expect("seal");
    let err = shipper
        .ship_once(&m)
        .expect_err("shipped onto a different history");
    assert!(matches!(err, Error::BrokenChain(_)), "{err}");
    shipper.resync_once(&m, CHUNK).expect("resync");
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    assert_replica_equals(&p, &disks(&m), "after losing the journal");
}

#[test]
fn points_taken_during_a_resync_are_never_offered() {
    let p = pair(4 << 20);
    let site = Site::open(&p.a).expect("source");
    let m = Arc::new(site.open_machine("vm1").expect("machine"));
    let mut shipper = Shipper::new(&p.a, &m, &p.addr);
    shipper.ship_once(&m).expect("initial");
    break_chain(&m, &mut shipper);
    // Writes with flushes and seals go on while the resync compares.
    {
        let m = m.clone();
        shipper.on_progress(Box::new(move |_, _| {
            scatter(&m, 333, 2);
            m.flush().expect("flush during the resync");
            m.seal().expect("seal during the resync");
        }));
    }
    let r = shipper.resync_batched(&m, CHUNK, 1 << 20).expect("resync");
    shipper.on_progress(Box::new(|_, _| {}));
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");
    let key = replog::site::replica_key_at(&p.b).expect("key");
    let store = replog::replica::store::Replicas::with_key(&p.b, key)
        .open_readonly("vm1")
        .expect("store");
    let points = replog::replica::points::list(&store).expect("points");
    assert!(!points.is_empty());
    assert!(
        points.iter().all(|q| q.lsn >= r.valid_from),
        "a point taken during the resync is offered: {:?} (valid from {})",
        points.iter().map(|q| q.lsn).collect::<Vec<_>>(),
        r.valid_from
    );
    assert_replica_equals(&p, &disks(&m), "after a resync with writes going on");
}

/// A 1 GiB disk whose resync sends more than the target's limit for one batch (256
/// MiB) in all, batch after batch. Until 3f48609 the target summed the bytes of every
/// batch of a session against that limit and closed the session part-way ("send to
/// target: Broken pipe" in `tools/bench`'s 1 GiB resync).
#[test]
fn a_1gib_resync_sending_more_than_one_batch_limit_in_all_converges() {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    let OneDisk { tmp, a, b, addr } = one_disk("1G");
    let site = Site::open(&a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&a, &m, &addr);
    shipper.ship_once(&m).expect("initial");
    // 320 MiB changed, merged at the source without being shipped: the chain breaks.
    let v = m.volume("os").expect("vol");
    for i in 0..320 {
        let at = (i * 3 % 1024) * MIB;
        v.write(at, &common::pattern(i, MIB as usize))
            .expect("write");
        if i % 16 == 15 {
            m.flush().expect("flush");
        }
    }
    m.flush().expect("flush");
    m.seal().expect("seal");
    shipper.release_hold(m.status().last_lsn);
    m.compact().expect("compact");
    v.write(5 * MIB, &common::pattern(999, 4096))
        .expect("write");
    m.flush().expect("flush");
    m.seal().expect("seal");
    let err = shipper.ship_once(&m).expect_err("shipped over a gap");
    assert!(matches!(err, Error::BrokenChain(_)), "{err}");

    let r = shipper.resync_once(&m, CHUNK).expect("resync of 1 GiB");
    assert_eq!(r.compared, GIB / CHUNK, "every chunk compared once");
    assert!(
        r.sent_chunks * CHUNK > 256 * MIB,
        "sent only {} chunks: the test must send more than one batch's limit",
        r.sent_chunks
    );
    shipper.ship_once(&m).expect("ship after the resync");
    let out = tmp.path().join("restored");
    let restored = restore(&b, "latest", &out).expect("restore");
    assert!(restored.verified, "the point's digests do not match");
    // Byte for byte, a MiB at a time.
    let img = std::fs::File::open(out.join("os.img")).expect("image");
    let (mut want, mut got) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for at in (0..GIB).step_by(MIB as usize) {
        v.read(at, &mut want).expect("read source");
        std::os::unix::fs::FileExt::read_exact_at(&img, &mut got, at).expect("read image");
        assert!(got == want, "the replica differs in the MiB at {at}");
    }
}
