//! Recovery points at the target and the replay engine: every point of random
//! multi-disk workloads materialises exactly the source's disks at that LSN (through a
//! point image and through restore, which proves itself with the source's digests);
//! retention and the target compactor never disturb a point being read; damaged or
//! lost replica files fail loudly and write nothing; an unplanned failover at every
//! point, and a change of point from it, gives exactly the model's disks there.

mod common;

use common::pair::{create_vm1, restore, start_receiver, trusted_pair};
use replog::failover::planned::Shipping;
use replog::failover::{Host, Offline};
use replog::protection::FailoverKind;
use replog::replica::compact::compact_replica;
use replog::replica::replay::PointImage;
use replog::replica::store::ReplicaStore;
use replog::replication::shipper::Shipper;
use replog::{Error, Machine, Site};
use std::path::{Path, PathBuf};

const SIZES: [u64; 2] = [3 << 20, (1 << 20) + 512];
const NAMES: [&str; 2] = ["os", "data"];
const HOUR_NS: u64 = 3600 * 1_000_000_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A protected machine vm1 (disks os and data, os imported with data in its parent)
/// at site `a`, replicating to an in-process target at `b`, and a model of its disks.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    b: PathBuf,
    _site: Site,
    m: Machine,
    shipper: Shipper,
    model: Vec<Vec<u8>>,
    /// (LSN, disks) at every point recorded.
    states: Vec<(u64, Vec<Vec<u8>>)>,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let (a, b) = (root.join("a"), root.join("b"));
        trusted_pair(&a, &b);
        let mut os = common::pattern(seed, 2 << 20);
        os[300_000..700_000].fill(0); // a hole in the parent
        create_vm1(&a, &os, "3M", "1049088");
        let addr = start_receiver(&b);
        let site = Site::open(&a).expect("open source");
        let m = site.open_machine("vm1").expect("machine");
        let mut model = vec![vec![0u8; SIZES[0] as usize], vec![0u8; SIZES[1] as usize]];
        model[0][..os.len()].copy_from_slice(&os);
        let mut shipper = Shipper::new(&a, &m, &addr);
        shipper.ship_once(&m).expect("initial replication");
        Fixture {
            _tmp: tmp,
            root,
            b,
            _site: site,
            m,
            shipper,
            model,
            states: Vec::new(),
        }
    }

    fn record(&mut self, lsn: u64) {
        self.states.push((lsn, self.model.clone()));
    }

    /// `ops` random steps: unaligned writes, zeroes, flushes, seals, app-consistent
    /// checkpoints, shipping now and then; ends sealed and shipped.
    fn workload(&mut self, rng: &mut Rng, ops: usize) {
        for i in 0..ops {
            let d = rng.below(2) as usize;
            let size = SIZES[d];
            let vol = self.m.volume(NAMES[d]).expect("vol");
            match rng.below(10) {
                0..=5 => {
                    let len = 1 + rng.below(150_000);
                    let off = rng.below(size - len);
                    let data = common::pattern(rng.next(), len as usize);
                    vol.write(off, &data).expect("write");
                    self.model[d][off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                6 => {
                    let len = 1 + rng.below(100_000);
                    let off = rng.below(size - len);
                    vol.write_zeroes(off, len).expect("zero");
                    self.model[d][off as usize..(off + len) as usize].fill(0);
                }
                7 => {
                    let lsn = self.m.flush().expect("flush");
                    self.record(lsn);
                }
                8 => {
                    if let Some(lsn) = self.m.seal().expect("seal") {
                        self.record(lsn);
                    }
                }
                _ => {
                    let p = self.m.checkpoint().expect("checkpoint");
                    self.record(p.lsn);
                }
            }
            if i % 15 == 14 {
                self.shipper.ship_once(&self.m).expect("ship");
            }
        }
        let lsn = self.m.flush().expect("flush");
        self.record(lsn);
        if let Some(lsn) = self.m.seal().expect("seal") {
            self.record(lsn);
        }
        self.shipper.ship_once(&self.m).expect("ship");
    }

    fn store(&self) -> ReplicaStore {
        let key = replog::site::replica_key_at(&self.b).expect("key");
        replog::replica::store::Replicas::with_key(&self.b, key)
            .open_readonly("vm1")
            .expect("replica")
    }

    fn image(&self, at: &str) -> replog::Result<PointImage> {
        PointImage::open(self.store(), at)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// Read every disk of a point image whole.
fn read_image(img: &PointImage) -> Vec<Vec<u8>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(d, size)| {
            let mut buf = vec![0u8; *size as usize];
            img.read(d as u32, 0, &mut buf).expect("read point");
            buf
        })
        .collect()
}

fn assert_restored(out: &Path, want: &[Vec<u8>], what: &str) {
    for (d, name) in NAMES.iter().enumerate() {
        let got = std::fs::read(out.join(format!("{name}.img"))).expect("image");
        assert!(got == want[d], "{what}: {name} differs from the model");
    }
}

#[test]
fn every_point_of_random_multi_disk_workloads_materialises_exactly() {
    for seed in [3u64, 17, 99] {
        let mut f = Fixture::new(seed);
        let mut rng = Rng(seed * 7919 + 1);
        f.workload(&mut rng, 90);
        let store = f.store();
        let points = replog::replica::points::list(&store).expect("points");
        assert!(points.len() >= f.states.len() / 2, "too few points");
        assert!(
            points.iter().any(|p| p.app_consistent),
            "no app-consistent point"
        );
        for (k, (lsn, want)) in f.states.iter().enumerate() {
            let p = points
                .iter()
                .find(|p| p.lsn == *lsn)
                .unwrap_or_else(|| panic!("seed {seed}: LSN {lsn} is not a point"));
            assert!(p.digests.is_some(), "point {lsn} carries no digests");
            let img = f.image(&p.id()).expect("open point");
            assert!(
                read_image(&img) == *want,
                "seed {seed}: point {lsn} read through the image differs from the model"
            );
            if k % 6 == 0 {
                let out = f.out(&format!("r{seed}-{lsn}"));
                let r = restore(&f.b, &p.id(), &out).expect("restore");
                assert!(r.verified, "restore at {lsn} not verified");
                assert_restored(&out, want, &format!("seed {seed}: restore at {lsn}"));
            }
        }
        // Random times: the newest point at or before each.
        for _ in 0..8 {
            let p = &points[rng.below(points.len() as u64) as usize];
            let t = replog::format::rfc3339(p.time_ns + 1_000);
            let img = f.image(&t).expect("open by time");
            let got = img.point().lsn;
            assert!(got >= p.lsn, "{t} resolved to {got}, before {}", p.lsn);
            let (_, want) = f
                .states
                .iter()
                .find(|(l, _)| *l == got)
                .expect("a recorded state at that point");
            assert!(read_image(&img) == *want, "point at {t} differs");
        }
    }
}

#[test]
fn retention_merges_around_open_views_and_running_restores() {
    let mut f = Fixture::new(5);
    let mut rng = Rng(77);
    f.workload(&mut rng, 60);
    // Every point but the newest has expired then (app-consistent ones are kept 72 h).
    let later = replog::format::now_ns() + 100 * HOUR_NS;
    let (old_lsn, old_state) = f.states[f.states.len() / 3].clone();
    let (new_lsn, new_state) = f.states.last().cloned().expect("states");

    // A view of an old point is open: the compactor merges up to it at most.
    let view = f.image(&format!("pt-{old_lsn}")).expect("open old point");
    let stats = compact_replica(
        &replog::replica::store::Replicas::with_key(&f.b, f.store().key().clone()),
        "vm1",
        later,
    )
    .expect("compact");
    let merged = stats.merged_to.expect("something merged");
    assert!(
        merged <= old_lsn,
        "merged to {merged}, past the open view at {old_lsn}"
    );
    assert!(
        read_image(&view) == old_state,
        "open view changed under the compactor"
    );
    // Expired points disappear from the list as retention sees them.
    let kept = replog::replica::points::retained(&f.store(), later).expect("retained");
    assert_eq!(kept.len(), 1, "only the newest point survives: {kept:?}");
    assert_eq!(kept[0].lsn, new_lsn);
    drop(view);

    // A restore of the newest point runs while the compactor merges everything: the
    // merge happens inside the restore's progress callback.
    let out = f.out("during-merge");
    let key = replog::site::replica_key_at(&f.b).expect("key");
    let img = f.image("latest").expect("open latest");
    let merged_during = std::cell::Cell::new(None);
    let r = replog::replica::restore::restore(&img, &out, &|done, total| {
        if merged_during.get().is_none() && done > 0 && done < total {
            let s = compact_replica(
                &replog::replica::store::Replicas::with_key(&f.b, key.clone()),
                "vm1",
                later,
            )
            .expect("compact");
            merged_during.set(Some(s.merged_to));
        }
    })
    .expect("restore during merge");
    assert!(r.verified);
    assert_restored(&out, &new_state, "restore during a merge");
    assert!(
        merged_during.get().flatten().is_some(),
        "the compactor did not merge during the restore"
    );
    drop(img);
    // Segments merged and no longer pinned are gone; the parent is the newest point.
    let s = compact_replica(
        &replog::replica::store::Replicas::with_key(&f.b, key.clone()),
        "vm1",
        later,
    )
    .expect("compact");
    let store = f.store();
    assert_eq!(store.parent().lsn, new_lsn);
    assert!(store.parent().point.is_some());
    assert!(s.files_removed > 0 || store.oldest_stored_segment().expect("list").is_none());
    assert_eq!(store.oldest_stored_segment().expect("list"), None);
    // The parent point restores and verifies; an expired point is refused by name.
    let out = f.out("parent-point");
    let r = restore(&f.b, "latest", &out).expect("restore parent point");
    assert!(r.verified);
    assert_restored(&out, &new_state, "parent point");
    let err = restore(&f.b, &format!("pt-{old_lsn}"), &f.out("expired")).expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(
        !f.out("expired").exists(),
        "a refused restore created its directory"
    );

    // Replication goes on on top of the merged parent.
    let mut rng = Rng(1234);
    f.states.clear();
    f.workload(&mut rng, 30);
    for (lsn, want) in f.states.iter().step_by(4) {
        let img = f.image(&format!("pt-{lsn}")).expect("open");
        assert!(
            read_image(&img) == *want,
            "point {lsn} after the merge differs"
        );
    }
}

#[test]
fn a_corrupt_replica_segment_fails_with_its_location_and_earlier_points_restore() {
    let mut f = Fixture::new(11);
    let vol = f.m.volume("os").expect("vol");
    let mut lsns = Vec::new();
    for i in 0..3u64 {
        vol.write(i * 100_000, &common::pattern(i + 50, 70_000))
            .expect("write");
        lsns.push(f.m.seal().expect("seal").expect("sealed"));
    }
    f.shipper.ship_once(&f.m).expect("ship");
    let seq = f.store().received().segment_seq - 1; // the middle segment
    let path =
        f.b.join("replicas/vm1/segments")
            .join(format!("{seq:020}.seg.enc"));
    let mut bytes = std::fs::read(&path).expect("segment");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).expect("corrupt");

    let out = f.out("needs-it");
    let err = restore(&f.b, &format!("pt-{}", lsns[2]), &out).expect_err("corrupt");
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("{seq:020}.seg.enc")),
        "error does not name the file: {err}"
    );
    assert!(!out.exists(), "a failed restore left {}", out.display());
    // The same through a view: reading the damaged data fails, it is never served.
    let img = f.image(&format!("pt-{}", lsns[2])).expect("open");
    let mut buf = vec![0u8; 70_000];
    assert!(
        img.read(0, 100_000, &mut buf).is_err(),
        "damaged data served"
    );
    drop(img);
    // Points before the damaged segment still restore.
    let out = f.out("before-it");
    let r = restore(&f.b, &format!("pt-{}", lsns[0]), &out).expect("earlier point");
    assert!(r.verified);
}

#[test]
fn a_lost_parent_chunk_is_caught_by_the_digest() {
    let mut f = Fixture::new(21);
    let vol = f.m.volume("data").expect("vol");
    vol.write(4096, b"after the initial copy").expect("write");
    let lsn = f.m.seal().expect("seal").expect("sealed");
    f.shipper.ship_once(&f.m).expect("ship");
    // Chunk 1 of the os disk holds imported data (authenticated chunks cannot be
    // altered unnoticed, but one can go missing, which reads as zeroes).
    let chunk = f.b.join("replicas/vm1/parent/0/0000000001.enc");
    assert!(chunk.exists(), "no parent chunk at {}", chunk.display());
    std::fs::remove_file(&chunk).expect("lose the chunk");
    let out = f.out("lost");
    let err = restore(&f.b, &format!("pt-{lsn}"), &out).expect_err("restored a wrong disk");
    assert!(err.to_string().contains("digest"), "{err}");
    assert!(!out.exists(), "a failed restore left {}", out.display());
}

#[test]
fn unknown_and_malformed_points_write_nothing() {
    let mut f = Fixture::new(31);
    let mut rng = Rng(5);
    f.workload(&mut rng, 20);
    for bad in [
        "pt-999999999",
        "999999999",
        "pt-x",
        "1970-01-01T00:00:00Z",
        "yesterday",
        "",
    ] {
        let out = f.out("bad");
        let err = restore(&f.b, bad, &out).expect_err(bad);
        assert!(
            matches!(err, Error::NotFound(_) | Error::InvalidInput(_)),
            "{bad}: {err}"
        );
        assert!(!out.exists(), "{bad}: wrote {}", out.display());
    }
}

/// A crash in the middle of a target merge: after the intent (nothing applied yet) and
/// after the chunks were rewritten but before the parent mark moved. Both states serve
/// every point at or after the merge target exactly, and the next pass finishes.
#[test]
fn a_merge_interrupted_by_a_crash_is_redone_and_never_serves_wrong_data() {
    let mut f = Fixture::new(41);
    let mut rng = Rng(4141);
    f.workload(&mut rng, 50);
    let later = replog::format::now_ns() + 100 * HOUR_NS;
    let key = replog::site::replica_key_at(&f.b).expect("key");
    let before = f.store().parent().clone();
    // Keep every segment on disk through the merge: a reader pinned at the first point.
    let (first_lsn, _) = f.states[0].clone();
    let pinned = f.image(&format!("pt-{first_lsn}")).expect("open");
    drop(pinned); // released: the merge may go all the way, but deletion is checked below
    let keep = f.image("latest").expect("pin latest from the old parent");
    let s = compact_replica(
        &replog::replica::store::Replicas::with_key(&f.b, key.clone()),
        "vm1",
        later,
    )
    .expect("merge");
    let target = f.store().parent().clone();
    assert_eq!(s.merged_to, Some(target.lsn));
    assert!(target.lsn > before.lsn);
    // Crash "after the chunks, before the mark": the old mark with the intent.
    let mut store = f.store();
    store
        .set_parent(replog::replica::store::ParentMark {
            merging_to: Some((target.lsn, target.seq)),
            ..before.clone()
        })
        .expect("rewind the mark");
    let check = |f: &Fixture, what: &str| {
        for (lsn, want) in f.states.iter().filter(|(l, _)| *l >= target.lsn) {
            let img = f.image(&format!("pt-{lsn}")).expect("open");
            assert!(read_image(&img) == *want, "{what}: point {lsn} differs");
        }
        // Points before the intent are gone.
        let (old, _) = f.states[0];
        if old < target.lsn {
            assert!(
                f.image(&format!("pt-{old}")).is_err(),
                "{what}: pt-{old} still served"
            );
        }
    };
    check(&f, "chunks merged, mark not moved");
    drop(keep);
    // The next pass redoes the merge and finishes.
    compact_replica(
        &replog::replica::store::Replicas::with_key(&f.b, key.clone()),
        "vm1",
        later,
    )
    .expect("redo");
    assert_eq!(f.store().parent().lsn, target.lsn);
    assert_eq!(f.store().parent().merging_to, None);
    check(&f, "after the redo");
    // Crash "right after the intent" on a fresh workload: nothing applied yet.
    let mut rng = Rng(99);
    f.workload(&mut rng, 30);
    let before = f.store().parent().clone();
    let received = f.store().received();
    let mut store = f.store();
    store
        .set_parent(replog::replica::store::ParentMark {
            merging_to: Some((received.lsn, received.segment_seq)),
            ..before
        })
        .expect("intent");
    let (last, want) = f.states.last().cloned().expect("states");
    let img = f.image(&format!("pt-{last}")).expect("open newest");
    assert!(
        read_image(&img) == want,
        "newest point after a bare intent differs"
    );
    drop(img);
    compact_replica(
        &replog::replica::store::Replicas::with_key(&f.b, key),
        "vm1",
        later,
    )
    .expect("finish");
    assert_eq!(f.store().parent().lsn, received.lsn);
    let img = f.image("latest").expect("latest");
    assert!(
        read_image(&img) == want,
        "newest point after finishing differs"
    );
}

/// Every disk of machine vm1 at `host`, whole.
fn read_promoted(host: &Offline) -> Vec<Vec<u8>> {
    let m = host.machine("vm1").expect("promoted machine");
    SIZES
        .iter()
        .zip(NAMES)
        .map(|(size, name)| {
            let mut buf = vec![0u8; *size as usize];
            m.volume(name)
                .expect("volume")
                .read(0, &mut buf)
                .expect("read");
            buf
        })
        .collect()
}

#[test]
fn an_unplanned_failover_at_every_point_equals_the_model_there() {
    let seed = 41;
    let mut f = Fixture::new(seed);
    let mut rng = Rng(seed * 7919 + 1);
    f.workload(&mut rng, 60);
    assert!(f.states.len() >= 8, "too few points: {}", f.states.len());
    let host = Offline::new(Site::open(&f.b).expect("target site")).expect("host");
    let run = replog::failover::run::failover;
    for (k, (lsn, want)) in f.states.iter().enumerate() {
        let at = lsn.to_string();
        run(&host, "vm1", FailoverKind::Unplanned, &at, None)
            .unwrap_or_else(|e| panic!("failover at {lsn}: {e}"));
        assert!(
            read_promoted(&host) == *want,
            "failed over at LSN {lsn}: the disks differ from the model"
        );
        // The promoted machine takes writes; a change of point drops them and gives
        // exactly the other point.
        let m = host.machine("vm1").expect("machine");
        m.volume("data")
            .expect("data")
            .write(4096, &common::pattern(k as u64, 8192))
            .expect("write to the promoted machine");
        m.flush().expect("flush");
        drop(m);
        let (other, other_want) = &f.states[rng.below(f.states.len() as u64) as usize];
        let r = replog::failover::run::change_point(&host, "vm1", &other.to_string())
            .unwrap_or_else(|e| panic!("change point {lsn} -> {other}: {e}"));
        let detail = r.detail.unwrap_or_default();
        assert!(detail.contains("8192 bytes"), "{detail}");
        assert!(
            read_promoted(&host) == *other_want,
            "changed from LSN {lsn} to {other}: the disks differ from the model"
        );
        replog::failover::run::cancel(&host, "vm1").expect("cancel");
        assert!(host.machine("vm1").is_err(), "vm1 is still a machine");
    }
    // The replica itself never changed: its newest point is the source's last state.
    let last = f.states.last().expect("states");
    let img = f.image("latest").expect("latest");
    assert_eq!(img.point().lsn, last.0);
    assert!(read_image(&img) == last.1, "the replica changed");
}

/// A planned failover's read-ahead (`replica::warm`): the check takes the segments
/// read ahead and finds what reading them again finds. A segment whose object was
/// written again since (its header's random nonce differs) is read again, so damage
/// in it is refused, never served from memory; so is one the read-ahead could not
/// read.
#[test]
fn segments_read_ahead_for_a_check_are_the_stored_ones() {
    use replog::failover::verify::verify;
    use std::time::Duration;
    let mut f = Fixture::new(41);
    let vol = f.m.volume("os").expect("vol");
    let mut lsn = 0;
    for i in 0..3u64 {
        vol.write(i * 100_000, &common::pattern(i + 70, 70_000))
            .expect("write");
        lsn = f.m.seal().expect("seal").expect("sealed");
    }
    f.shipper.ship_once(&f.m).expect("ship");
    let key = replog::site::replica_key_at(&f.b).expect("key");
    let replicas = replog::replica::store::Replicas::with_key(&f.b, key);
    let open = || replicas.open_readonly("vm1").expect("replica");
    let (from, to) = (open().parent().seq, open().received().segment_seq);
    assert!(to >= from + 3, "segments {from}..{to}");
    let plain: u64 = (from + 1..=to)
        .map(|s| open().read_segment(s).expect("read").len() as u64)
        .sum();
    let cold = verify(&f.image(&format!("pt-{lsn}")).expect("image")).expect("verify");
    assert_eq!(cold.read_ahead, 0);

    let warm = replicas.warm();
    warm.begin(open(), from + 1..=to);
    assert!(
        warm.settle("vm1", Duration::from_secs(60)),
        "not read ahead"
    );
    let image = PointImage::open_exact(open(), lsn).expect("image");
    let v = verify(&image).expect("verify");
    assert!(v.digests_matched);
    assert_eq!((v.bytes, v.read_ahead), (cold.bytes, plain));
    let fresh = f.image(&format!("pt-{lsn}")).expect("image");
    assert_eq!(read_image(&image), read_image(&fresh));
    drop((image, fresh));
    warm.end("vm1");

    // The middle segment written again after it was read ahead (a new nonce, its
    // ciphertext as before: it no longer authenticates): read again, and refused.
    let seq = to - 1;
    let path =
        f.b.join("replicas/vm1/segments")
            .join(format!("{seq:020}.seg.enc"));
    let good = std::fs::read(&path).expect("segment");
    let mut renonced = good.clone();
    renonced[30] ^= 0x01;
    let crc = replog::crc::crc32c(&renonced[..36]);
    renonced[36..40].copy_from_slice(&crc.to_le_bytes());
    warm.begin(open(), from + 1..=to);
    assert!(
        warm.settle("vm1", Duration::from_secs(60)),
        "not read ahead"
    );
    std::fs::write(&path, &renonced).expect("rewrite");
    let image = PointImage::open_exact(open(), lsn).expect("image");
    let err = verify(&image).expect_err("a stale copy served");
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("{seq:020}.seg.enc")),
        "{err}"
    );
    drop(image);
    warm.end("vm1");

    // Damaged before the read-ahead: it keeps nothing of it, and the check reads it
    // and says so.
    warm.begin(open(), from + 1..=to);
    assert!(
        warm.settle("vm1", Duration::from_secs(60)),
        "not read ahead"
    );
    assert!(warm.get("vm1", seq).is_none(), "a damaged segment kept");
    let err =
        verify(&PointImage::open_exact(open(), lsn).expect("image")).expect_err("damage served");
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    warm.end("vm1");
    std::fs::write(&path, &good).expect("mend");
    let v = verify(&PointImage::open_exact(open(), lsn).expect("image")).expect("mended");
    assert_eq!(v.read_ahead, 0, "an ended set serves nothing");
}

/// A source says `PromoteSoon` on a pass while its machine has a planned failover's
/// intent, and only then: not without an intent, and not on a pass that only asks
/// how a failover whose answer was lost ended (`announce_promotion(false)`).
#[test]
fn a_source_announces_a_promotion_only_while_a_planned_failover_ships() {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    create_vm1(&a, &common::pattern(3, 1 << 20), "2M", "1M");
    let key = replog::site::replica_key_at(&b).expect("key");
    let replicas = replog::replica::store::Replicas::with_key(&b, key);
    let me = replog::identity::Identity::load(&b).expect("id").id();
    let target = Arc::new(
        replog::replication::receiver::Target::new(me, replicas.clone())
            .on_promote(|_, _, _| Ok(())),
    );
    let addr = replog::replication::transport::listen(&b, "127.0.0.1:0", move |mut s, peer| {
        target.session_tls(&mut s, peer)
    })
    .expect("listen")
    .to_string();
    let site = Site::open(&a).expect("open source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&a, &m, &addr);
    let warm = replicas.warm();
    // 8 KiB written at `at` and sealed: a segment to ship.
    let segment = |at: u64| {
        m.volume("os")
            .expect("vol")
            .write(at, &common::pattern(at, 8192))
            .expect("write");
        m.seal().expect("seal");
    };
    let pass = |shipper: &mut Shipper, at: u64| {
        segment(at);
        shipper.ship_once(&m).expect("ship");
    };
    pass(&mut shipper, 0);
    assert!(!warm.active("vm1"), "announced without a failover");
    m.set_intent(Some(replog::protection::Intent {
        target_site: me.0,
        target: addr.clone(),
        generation: 2,
        job: "j-test".into(),
        started_ns: 1,
    }))
    .expect("intent");
    shipper.announce_promotion(false);
    pass(&mut shipper, 16384);
    assert!(!warm.active("vm1"), "announced by a pass that only asks");
    shipper.announce_promotion(true);
    pass(&mut shipper, 32768);
    assert!(
        warm.active("vm1"),
        "a planned failover's pass did not announce it"
    );
    warm.end("vm1");
    // How a failover whose answer was lost ended, asked offline: not promoted (the
    // intent goes), and nothing announced.
    segment(49152);
    let asked = replog::failover::planned::OfflineShipping::new(&a, &addr)
        .resolve(&m, std::time::Duration::from_secs(30))
        .expect("resolve");
    assert!(!asked, "promoted?");
    assert!(m.intent().is_none(), "the intent stayed");
    assert!(!warm.active("vm1"), "announced by an offline asking pass");
}
