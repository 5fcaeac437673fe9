//! The replica store over a fault-injecting backend: a crash between any two writes
//! of a receive, a target merge or a resync leaves a replica that reopens consistent.
//!
//! Each operation runs once per write it makes (and once per sync), with that write
//! (or sync) failing, and once per change of any kind with the power cut there; then
//! the storage loses everything not synced — writes, and names whose directory was not
//! synced — (in a second pass, tears each unsynced write at random and keeps a prefix
//! of the unsynced namespace changes; in two more, keeps every namespace change but
//! the last one or two), the replica is reopened, and:
//! every point it offers equals the source's disks at that point, byte for byte; and
//! the operation run again without faults completes, ending where a run without a
//! crash ends.

mod common;

use common::source::{receive_all, source, Source, DATA, OS};
use common::Fault;

use replog::replica::backend::DirBackend;
use replog::replica::crypt::ReplicaKey;
use replog::replica::replay::PointImage;
use replog::replica::store::Replicas;
use replog::storage::{CrashMode, FaultyStorage};
use std::sync::Arc;

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
    for mode in [
        CrashMode::DropAll,
        CrashMode::Tear(77),
        CrashMode::DropLastNames(1),
        CrashMode::DropLastNames(2),
    ] {
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
