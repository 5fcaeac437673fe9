//! The replica store over a fault-injecting backend: a crash between any two writes
//! of a receive, a target merge or a resync leaves a replica that reopens consistent.
//!
//! Each operation runs once per write it makes (and once per sync), with that write
//! (or sync) failing, and once per change of any kind with the power cut there; then
//! the storage loses everything not synced — writes, and names whose directory was not
//! synced — (and, in a second pass, tears each unsynced write at random), the replica is reopened, and:
//! every point it offers equals the source's disks at that point, byte for byte; and
//! the operation run again without faults completes, ending where a run without a
//! crash ends.

mod common;

use common::Fault;

use replog::format::meta::{DiskEntry, Watermark};
use replog::format::segment::segment_name;
use replog::replica::backend::DirBackend;
use replog::replica::crypt::ReplicaKey;
use replog::replica::replay::PointImage;
use replog::replica::store::{ReplicaManifest, Replicas};
use replog::storage::{CrashMode, FaultyStorage, MemStorage, OpenMode, Storage};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const OS: u64 = 1 << 20;
const DATA: u64 = 256 << 10;

/// The source: machine vm1 (os, data) in memory; its sealed segments and the disks
/// at every point (flushes and seals).
struct Source {
    machine_id: u64,
    segments: Vec<Vec<u8>>,
    at: BTreeMap<u64, Vec<Vec<u8>>>,
}

fn source() -> Source {
    let mem = MemStorage::new();
    let dir = Path::new("/src/vm1");
    common::create_machine(&mem, dir, &[OS, DATA]);
    let m = common::open(Arc::new(mem.clone()), dir, 64 << 20).expect("open");
    let mut model = vec![vec![0u8; OS as usize], vec![0u8; DATA as usize]];
    let mut at = BTreeMap::new();
    at.insert(0, model.clone());
    let mut seed = 1u64;
    for seg in 0..3 {
        for round in 0..3 {
            for w in 0..4u64 {
                seed += 1;
                let disk = (seed % 2) as usize;
                let size = if disk == 0 { OS } else { DATA };
                let len = 512 * (1 + (seed * 7 + w) % 40);
                let off = (seed * 104_729 + w * 7919) % (size - len);
                let v = m.volume(&format!("d{disk}")).expect("vol");
                if (seg + round + w) % 5 == 4 {
                    v.write_zeroes(off, len).expect("zero");
                    model[disk][off as usize..(off + len) as usize].fill(0);
                } else {
                    let data = common::pattern(seed, len as usize);
                    v.write(off, &data).expect("write");
                    model[disk][off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            let lsn = m.flush().expect("flush");
            at.insert(lsn, model.clone());
        }
        let last = m.seal().expect("seal").expect("sealed");
        at.insert(last, model.clone());
    }
    let segments = (1..=3)
        .map(|s| {
            let f = mem
                .open(
                    &dir.join("journal").join(segment_name(s)),
                    OpenMode::ReadOnly,
                )
                .expect("segment");
            replog::storage::read_all(f.as_ref(), 1 << 30).expect("read")
        })
        .collect();
    Source {
        machine_id: m.machine_id(),
        segments,
        at,
    }
}

fn manifest(src: &Source) -> ReplicaManifest {
    ReplicaManifest {
        source_site: [3u8; 32],
        machine_id: src.machine_id,
        disks: vec![
            DiskEntry {
                id: 0,
                name: "d0".into(),
                size: OS,
            },
            DiskEntry {
                id: 1,
                name: "d1".into(),
                size: DATA,
            },
        ],
        base_lsn: 0,
        base_seq: 0,
        generation: 1,
    }
}

fn replicas(fs: &FaultyStorage) -> Replicas {
    Replicas::new(
        Arc::new(DirBackend::new(Arc::new(fs.clone()), "/target/replicas")),
        ReplicaKey::from_bytes([9u8; 32]),
    )
}

/// Every point the replica offers equals the source at that LSN.
fn assert_points_exact(r: &Replicas, src: &Source, what: &str) {
    match r.open("vm1") {
        Ok(_) => {}
        // The crash came before the manifest (written last) said "created".
        Err(replog::Error::NotFound(_)) => return,
        Err(e) => panic!("{what}: reopen: {e}"),
    }
    let store = r.open_readonly("vm1").expect("store");
    let points = replog::replica::points::list(&store).expect("points");
    for p in points {
        let want = src
            .at
            .get(&p.lsn)
            .unwrap_or_else(|| panic!("{what}: point at LSN {} the source never had", p.lsn));
        let img = PointImage::open(r.open_readonly("vm1").expect("store"), &p.id())
            .unwrap_or_else(|e| panic!("{what}: open {}: {e}", p.id()));
        for (d, bytes) in want.iter().enumerate() {
            let mut got = vec![0u8; bytes.len()];
            img.read(d as u32, 0, &mut got)
                .unwrap_or_else(|e| panic!("{what}: read {}: {e}", p.id()));
            assert!(got == *bytes, "{what}: disk {d} at {} differs", p.id());
        }
    }
}

/// Run `op` on a fresh copy of `setup`'s state once per write and per sync it makes,
/// with that one failing, then crash, reopen, check, and finish with `op` again.
fn crash_matrix(
    name: &str,
    src: &Source,
    setup: &dyn Fn(&Replicas),
    op: &dyn Fn(&Replicas) -> replog::Result<()>,
    check: &dyn Fn(&Replicas, &str),
) {
    let mut runs = 0;
    for mode in [CrashMode::DropAll, CrashMode::Tear(77)] {
        for fault in [Fault::Write, Fault::Sync, Fault::Cut] {
            for n in 0.. {
                let fs = FaultyStorage::new();
                let r = replicas(&fs);
                setup(&r);
                fault.arm(&fs, n, true);
                let result = op(&r);
                let fired = fs.fired();
                fs.crash(mode);
                let what = format!("{name}, {mode:?}, {fault:?} at {n}");
                assert!(
                    fired || result.is_ok(),
                    "{what}: {result:?} without a fault"
                );
                assert_points_exact(&r, src, &what);
                check(&r, &what);
                // Done again without faults, it finishes.
                op(&r).unwrap_or_else(|e| panic!("{what}: the retry failed: {e}"));
                assert_points_exact(&r, src, &format!("{what}, retried"));
                check(&r, &format!("{what}, retried"));
                runs += 1;
                if !fired {
                    break;
                }
            }
        }
    }
    assert!(runs > 20, "{name}: only {runs} runs");
}

fn receive_all(r: &Replicas, src: &Source) -> replog::Result<()> {
    let mut st = match r.open("vm1") {
        Ok(s) => s,
        Err(replog::Error::NotFound(_)) => r.create("vm1", manifest(src), Watermark::default())?,
        Err(e) => return Err(e),
    };
    if !st.initial().done {
        st.finish_initial()?;
    }
    for (i, seg) in src.segments.iter().enumerate() {
        st.receive(i as u64 + 1, seg)?;
    }
    Ok(())
}

#[test]
fn a_crash_during_a_receive_leaves_a_consistent_replica() {
    let src = source();
    crash_matrix(
        "receive",
        &src,
        &|_| {},
        &|r| receive_all(r, &src),
        &|_, _| {},
    );
}

#[test]
fn a_crash_during_a_target_merge_leaves_a_consistent_replica() {
    let src = source();
    let later = replog::format::now_ns() + 3600 * 1_000_000_000;
    crash_matrix(
        "merge",
        &src,
        &|r| {
            receive_all(r, &src).expect("receive");
            let mut st = r.open("vm1").expect("store");
            st.set_retention(replog::replica::store::Retention {
                window_ms: 1000,
                app_window_ms: 1000,
            })
            .expect("retention");
        },
        &|r| replog::replica::compact::compact_replica(r, "vm1", later).map(|_| ()),
        &|r, what| {
            let st = r.open_readonly("vm1").expect("store");
            let p = st.parent();
            assert!(
                p.merging_to.is_some() || p.lsn == 0 || src.at.contains_key(&p.lsn),
                "{what}: parent at LSN {}",
                p.lsn
            );
        },
    );
}

#[test]
fn a_crash_during_a_resync_leaves_a_consistent_replica() {
    let src = source();
    let last = src.segments.len() as u64;
    let (base_lsn, base_model) = src
        .at
        .iter()
        .next_back()
        .map(|(l, m)| (*l, m.clone()))
        .expect("points");
    // What the source holds after a change made behind replog's back: three chunks
    // of os and one of data differ from the replica.
    let mut changed = base_model.clone();
    let edits: Vec<(u32, u64)> = vec![(0, 0), (0, 4096 * 100), (0, OS - 4096), (1, 8192)];
    for (i, (d, off)) in edits.iter().enumerate() {
        changed[*d as usize][*off as usize..*off as usize + 4096]
            .copy_from_slice(&common::pattern(900 + i as u64, 4096));
    }
    let chunks: Vec<(u32, u64, Vec<u8>)> = edits
        .iter()
        .map(|(d, off)| {
            (
                *d,
                *off,
                changed[*d as usize][*off as usize..*off as usize + 4096].to_vec(),
            )
        })
        .collect();
    let resync = |r: &Replicas| -> replog::Result<()> {
        let mut st = r.open("vm1")?;
        let p = st.begin_resync(base_lsn, last, 4096)?;
        // Two batches: the first disk's chunks, then the second's.
        if p.disk == 0 && p.next == 0 {
            let first: Vec<_> = chunks.iter().filter(|c| c.0 == 0).cloned().collect();
            let progress = replog::replica::resync_apply::ResyncProgress {
                disk: 1,
                next: 0,
                compared: OS / 4096,
                sent_chunks: first.len() as u64,
                ..p
            };
            st.apply_resync(&first, progress)?;
        }
        let p = st.resync_progress()?.expect("under way");
        if p.disk == 1 && p.next == 0 {
            let second: Vec<_> = chunks.iter().filter(|c| c.0 == 1).cloned().collect();
            let progress = replog::replica::resync_apply::ResyncProgress {
                disk: 2,
                next: 0,
                compared: (OS + DATA) / 4096,
                sent_chunks: chunks.len() as u64,
                ..p
            };
            st.apply_resync(&second, progress)?;
        }
        st.finish_resync(base_lsn + 1)
    };
    crash_matrix(
        "resync",
        &src,
        &|r| receive_all(r, &src).expect("receive"),
        &resync,
        &|r, what| {
            let st = r.open_readonly("vm1").expect("store");
            if st.resync_progress().expect("progress").is_some()
                || st.parent().resyncing
                || st.parent().valid_from == 0
            {
                return; // not begun, or under way (no point is offered): it resumes
            }
            // Finished: the replica holds the changed disks.
            for (d, want) in changed.iter().enumerate() {
                let mut got = vec![0u8; want.len()];
                st.read_replica(d as u32, 0, &mut got)
                    .expect("read replica");
                assert!(got == *want, "{what}: disk {d} after the resync differs");
            }
        },
    );
}
