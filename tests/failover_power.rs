//! Power cuts through failover: promotion records, machine manifests, the fold and
//! the job records, on one fault-injecting storage.
//!
//! A real site directory (its config, identity and keys are real files) keeps its
//! machines, its replicas and its job records on a `FaultyStorage`. A scenario runs
//! the failover commands as the CLI runs them (`failover::run`), with guest writes and
//! flushes between them. The power is cut at every change in turn (every write,
//! sync, creation, rename, removal); the storage then drops (or tears) everything
//! not synced, the site reopens and reconciles as `serve` does, and:
//!
//! - no split brain (invariant 7): a promoted machine exists here exactly when its
//!   replica carries the promotion record (uncommitted, or committed until the fold
//!   removes the replica);
//! - the promoted machine's disks are its point plus the writes acknowledged since
//!   (invariants 2 and 8) — all of them, unless a change of point or a cancel that
//!   drops them had begun;
//! - a job recorded as succeeded has its end state now (invariant 9);
//! - the rest of the scenario, run without faults, ends where an uncut run ends.

mod common;

use common::source::{receive_all, source, Source, DATA, OS};
use replog::failover::{self, run, Host, Offline};
use replog::jobs::{JobKind, JobSpec, JobState};
use replog::protection::{FailoverKind, Role};
use replog::site::Site;
use replog::storage::{CrashMode, FaultyStorage, Storage};
use replog::volume::MANIFEST_FILE;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

const VM: &str = "vm1";
const TEST_COPY: &str = "vm1-test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    TestFailover,
    CleanupTest,
    /// An unplanned failover at point 0 or 1 (of [`Points`]).
    Unplanned(usize),
    /// Guest writes (each flushed) of phase N on the point the machine stands on.
    Writes(usize),
    /// Change the point to point 1.
    ChangePoint,
    Commit,
    Cancel,
}

/// The points the scenarios use: an early one and the newest.
#[derive(Clone, Copy, Debug)]
struct Points([u64; 2]);

impl Points {
    fn id(&self, n: usize) -> String {
        format!("pt-{}", self.0[n])
    }
}

/// A write of the guest: disk, offset, bytes.
type Write = (usize, u64, Vec<u8>);

fn phase_writes(phase: usize) -> Vec<Write> {
    (0..6u64)
        .map(|j| {
            let disk = (j % 2) as usize;
            let size = if disk == 0 { OS } else { DATA };
            let len = 4096 * (1 + (j + phase as u64) % 3);
            let off = ((phase as u64 * 37 + j * 11) * 4096) % (size - len);
            let seed = 1000 + phase as u64 * 100 + j;
            (disk, off, common::pattern(seed, len as usize))
        })
        .collect()
}

/// What a scenario did before the power went.
#[derive(Debug, Default)]
struct Done {
    /// The first step that failed (the scenario's length if none did).
    reached: usize,
    /// Per point the machine stood on: (phase, writes issued, writes acknowledged).
    writes: BTreeMap<u64, (usize, usize, usize)>,
    /// Points whose writes a begun change of point or cancel may have dropped.
    dropping: BTreeSet<u64>,
    /// Cancels refused, as they must be, after a commit had recorded itself.
    refused_cancels: usize,
}

struct World {
    site_dir: tempfile::TempDir,
    src: Source,
    points: Points,
}

fn world() -> World {
    let site_dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = replog::config::SiteConfig::default();
    // Small segments: the guest's writes span several, as a change of point drops.
    cfg.journal.segment_bytes = 16 << 10;
    Site::init_with(site_dir.path(), cfg).expect("init");
    let src = source();
    // The replica's points, from a replica received once.
    let fs = FaultyStorage::new();
    let site = open_site(site_dir.path(), &fs);
    let replicas = site.replicas().expect("replicas");
    receive_all(&replicas, &src).expect("receive");
    let store = replicas.open_readonly(VM).expect("store");
    let lsns: Vec<u64> = replog::replica::points::list(&store)
        .expect("points")
        .iter()
        .map(|p| p.lsn)
        .collect();
    assert!(lsns.len() >= 3, "the replica offers {lsns:?}");
    let points = Points([lsns[1], lsns[lsns.len() - 1]]);
    World {
        site_dir,
        src,
        points,
    }
}

fn open_site(path: &Path, fs: &FaultyStorage) -> Site {
    let site = Site::open_with(path, Arc::new(fs.clone())).expect("open site");
    fs.create_dir_all(&path.join(replog::site::MACHINES_DIR))
        .expect("machines dir");
    site
}

fn host(w: &World, fs: &FaultyStorage) -> Offline {
    Offline::new(open_site(w.site_dir.path(), fs)).expect("host")
}

/// Run `ops` from step `from` on, stopping at the first that fails. With `resume`,
/// each step first looks at what an interrupted run left and finishes it instead.
fn run_ops(w: &World, h: &Offline, ops: &[Op], from: usize, resume: bool, done: &mut Done) {
    done.reached = ops.len();
    for (i, op) in ops.iter().enumerate().skip(from) {
        let first = resume && i == from;
        if let Err(e) = step(w, h, *op, first, done) {
            if resume {
                panic!("step {op:?} of the resumed run failed: {e}");
            }
            done.reached = i;
            return;
        }
    }
}

fn exists(h: &Offline, name: &str) -> bool {
    let site = h.site();
    site.storage()
        .exists(&site.machine_dir(name).expect("dir").join(MANIFEST_FILE))
}

/// One step; `finishing`: the step a cut interrupted, now finished.
fn step(w: &World, h: &Offline, op: Op, finishing: bool, done: &mut Done) -> replog::Result<()> {
    let spec = JobSpec::default();
    match op {
        Op::TestFailover => {
            if finishing && exists(h, TEST_COPY) {
                run::verify_existing(h, VM, FailoverKind::Test, TEST_COPY, &spec)?;
            } else {
                run::failover(h, VM, FailoverKind::Test, &w.points.id(1), None)?;
            }
        }
        Op::CleanupTest => {
            if !finishing || exists(h, TEST_COPY) {
                run::cleanup_test(h, VM, None, None)?;
            }
        }
        Op::Unplanned(p) => {
            if finishing && exists(h, VM) {
                run::verify_existing(h, VM, FailoverKind::Unplanned, VM, &spec)?;
            } else {
                run::failover(h, VM, FailoverKind::Unplanned, &w.points.id(p), None)?;
            }
        }
        Op::Writes(phase) => {
            let m = h.machine(VM)?;
            let base = m.base().map(|b| b.lsn).expect("stands on a point");
            done.writes.insert(base, (phase, 0, 0));
            for (disk, off, data) in phase_writes(phase) {
                if let Some(e) = done.writes.get_mut(&base) {
                    e.1 += 1;
                }
                m.volume(&format!("d{disk}"))?.write(off, &data)?;
                m.flush()?;
                if let Some(e) = done.writes.get_mut(&base) {
                    e.2 += 1;
                }
            }
        }
        Op::ChangePoint => {
            let at = h.machine(VM)?.base().map(|b| b.lsn);
            if at != Some(w.points.0[1]) {
                done.dropping.extend(at);
                run::change_point(h, VM, &w.points.id(1))?;
            }
        }
        Op::Commit => {
            let unfinished =
                !exists(h, VM) || h.machine(VM)?.base().is_some() || h.replicas().has(VM);
            // A commit that stopped after its record said committed cannot be
            // cancelled any more, only finished.
            let committed = h
                .replicas()
                .open_readonly(VM)
                .ok()
                .and_then(|s| s.promotion().ok().flatten())
                .is_some_and(|p| p.committed);
            if finishing && committed && h.machine(VM)?.pending().is_some() {
                let refused = run::cancel(h, VM).expect_err("a committed failover cancelled");
                assert!(
                    refused.to_string().contains("was committed"),
                    "the cancel was refused for another reason: {refused}"
                );
                done.refused_cancels += 1;
            }
            if !finishing || unfinished {
                run::commit(h, VM)?;
            }
        }
        Op::Cancel => {
            if let Ok(m) = h.machine(VM) {
                done.dropping.extend(m.base().map(|b| b.lsn));
            }
            let promoted = h
                .replicas()
                .open_readonly(VM)
                .ok()
                .and_then(|s| s.promotion().ok().flatten())
                .is_some();
            if !finishing || exists(h, VM) || promoted {
                run::cancel(h, VM)?;
            }
        }
    }
    Ok(())
}

/// Every disk of machine `name`, whole.
fn disks_of(h: &Offline, name: &str, what: &str) -> Vec<Vec<u8>> {
    let m = h
        .machine(name)
        .unwrap_or_else(|e| panic!("{what}: open {name}: {e}"));
    common::read_disks(&m, &[OS, DATA])
}

fn apply(mut disks: Vec<Vec<u8>>, writes: &[Write]) -> Vec<Vec<u8>> {
    for (d, off, data) in writes {
        disks[*d][*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    disks
}

/// The machine's disks: its point, plus a prefix of the writes made on it that
/// holds every acknowledged one (any prefix once a drop of them began).
fn assert_disks(w: &World, h: &Offline, done: &Done, lsn: u64, what: &str) {
    let got = disks_of(h, VM, what);
    let point = w
        .src
        .at
        .get(&lsn)
        .expect("a source state at the point")
        .clone();
    let (phase, issued, acked) = done.writes.get(&lsn).copied().unwrap_or((0, 0, 0));
    let lo = if done.dropping.contains(&lsn) {
        0
    } else {
        acked
    };
    let writes = phase_writes(phase);
    let ok = (lo..=issued).any(|k| got == apply(point.clone(), &writes[..k]));
    assert!(
        ok,
        "{what}: {VM}'s disks are not pt-{lsn} plus {lo}..={issued} of its writes ({acked} \
         acknowledged)"
    );
}

/// The invariants after a crash, the site reopened and reconciled.
fn check(w: &World, h: &Offline, done: &Done, final_lsn: u64, what: &str) {
    let site = h.site();
    let machine = exists(h, VM)
        .then(|| {
            replog::Machine::read_manifest(
                site.storage().as_ref(),
                &site.machine_dir(VM).expect("dir"),
            )
        })
        .map(|r| r.unwrap_or_else(|e| panic!("{what}: {VM}'s manifest: {e}")));
    let replica = h.replicas().has(VM);
    // Nothing is left of a replica removed or created only in part.
    let replica_dir = site.path().join("replicas").join(VM);
    assert!(
        replica || !site.storage().exists(&replica_dir),
        "{what}: a replica directory without its manifest"
    );
    let promotion = if replica {
        h.replicas()
            .open_readonly(VM)
            .and_then(|s| s.promotion())
            .unwrap_or_else(|e| panic!("{what}: the replica: {e}"))
    } else {
        None
    };
    // No split brain.
    match (&machine, &promotion) {
        (Some(m), Some(p)) => {
            assert_eq!(m.role, Role::Primary, "{what}");
            assert_eq!(m.generation, p.generation, "{what}: generations");
            assert!(
                m.pending.is_some() || p.committed,
                "{what}: {VM} has no failover pending, but its promotion is not committed"
            );
        }
        (Some(m), None) => assert!(
            !replica && m.base.is_none() && m.pending.is_none(),
            "{what}: {VM} is writable here while its replica takes the old generation"
        ),
        (None, Some(p)) => panic!("{what}: a {} promotion record without its machine", p.kind),
        (None, None) => assert!(replica, "{what}: neither the machine nor its replica"),
    }
    if let Some(m) = &machine {
        let lsn = m.base.as_ref().map_or(final_lsn, |b| b.lsn);
        assert_disks(w, h, done, lsn, what);
    }
    if exists(h, TEST_COPY) {
        let want = w.src.at.get(&w.points.0[1]).expect("point");
        assert!(
            disks_of(h, TEST_COPY, what) == *want,
            "{what}: the test copy's disks"
        );
    }
    // A job that says it succeeded has its end state, unless a later step's job
    // exists (in any state: begun is enough to have changed it — a cleanup removes
    // the test copy, a cancel the machine — before its own record said so).
    let jobs = replog::jobs::list_on(site.storage().as_ref(), site.path()).expect("jobs");
    let any = |k: JobKind| jobs.iter().any(|j| j.kind == k);
    for j in jobs.iter().filter(|j| j.state == JobState::Succeeded) {
        let holds = match j.kind {
            JobKind::FailoverTest => exists(h, TEST_COPY) || any(JobKind::CleanupTest),
            JobKind::CleanupTest => !exists(h, TEST_COPY),
            JobKind::FailoverUnplanned => machine.is_some() || any(JobKind::Cancel),
            JobKind::ChangePoint => machine
                .as_ref()
                .is_some_and(|m| m.base.as_ref().is_none_or(|b| b.lsn == w.points.0[1])),
            JobKind::Commit => {
                machine
                    .as_ref()
                    .is_some_and(|m| m.base.is_none() && m.pending.is_none())
                    && !replica
            }
            JobKind::Cancel => machine.is_none() && promotion.is_none(),
            other => panic!("{what}: a {other:?} job"),
        };
        assert!(
            holds,
            "{what}: job {} ({:?}) succeeded, but its end state is not there",
            j.id, j.kind
        );
    }
}

/// The scenario once without faults: how many changes it makes.
fn uncut(w: &World, ops: &[Op]) -> u64 {
    let fs = FaultyStorage::new();
    let h = host(w, &fs);
    receive_all(h.replicas(), &w.src).expect("receive");
    let mut done = Done::default();
    let before = fs.changes();
    run_ops(w, &h, ops, 0, false, &mut done);
    assert_eq!(done.reached, ops.len(), "the scenario fails without faults");
    fs.changes() - before
}

/// Cut the power at every change of `ops` in turn (every `stride`th), crash, reopen,
/// check, finish; then `finished` checks the end state.
fn cut_everywhere(
    name: &str,
    ops: &[Op],
    final_point: usize,
    finished: &dyn Fn(&World, &Offline, &Done, &str),
) -> usize {
    let w = world();
    let final_lsn = w.points.0[final_point];
    let changes = uncut(&w, ops);
    assert!(changes > 100, "{name}: only {changes} changes");
    let (mut cuts, mut refused_cancels) = (0, 0);
    for pass in 0..5 {
        for n in 0..changes + 10 {
            // Everything unsynced dropped; or each unsynced write kept, dropped or cut
            // short, and a prefix of the unsynced namespace changes kept; or the
            // namespace changes kept but the last one or two; or everything kept (the
            // process died, not the machine).
            let mode = match pass {
                0 => CrashMode::DropAll,
                1 => CrashMode::Tear(n.wrapping_mul(0x9E37_79B9) + 31),
                2 | 3 => CrashMode::DropLastNames(pass - 1),
                _ => CrashMode::KeepAll,
            };
            let fs = FaultyStorage::new();
            let mut done = Done::default();
            {
                let h = host(&w, &fs);
                receive_all(h.replicas(), &w.src).expect("receive");
                fs.cut_after(n);
                run_ops(&w, &h, ops, 0, false, &mut done);
            }
            let fired = fs.fired();
            fs.crash(mode);
            let what = format!(
                "{name}, {mode:?}, cut at change {n} in step {}",
                done.reached
            );
            // As a starting serve does.
            let site = open_site(w.site_dir.path(), &fs);
            site.remove_interrupted_creations()
                .unwrap_or_else(|e| panic!("{what}: interrupted creations: {e}"));
            let replicas = site.replicas().expect("replicas");
            failover::reconcile(&site, &replicas)
                .unwrap_or_else(|e| panic!("{what}: reconcile: {e}"));
            let h = Offline::new(site).expect("host");
            check(&w, &h, &done, final_lsn, &what);
            // Then finished without faults.
            let from = done.reached;
            if from < ops.len() {
                run_ops(&w, &h, ops, from, true, &mut done);
            }
            finished(&w, &h, &done, &what);
            refused_cancels += done.refused_cancels;
            cuts += 1;
            if !fired {
                break;
            }
        }
    }
    assert!(cuts > 100, "{name}: only {cuts} cuts");
    eprintln!(
        "{name}: {cuts} power cuts, {refused_cancels} cancels of a committed failover refused"
    );
    refused_cancels
}

#[test]
fn a_power_cut_anywhere_in_a_failover_lifecycle_loses_nothing_and_splits_nothing() {
    use Op::*;
    let ops = [
        TestFailover,
        CleanupTest,
        Unplanned(0),
        Writes(0),
        ChangePoint,
        Writes(1),
        Commit,
    ];
    let refused = cut_everywhere(
        "failover, change of point, commit",
        &ops,
        1, // the point the change of point moves to, which the fold writes
        &|w, h, _done, what| {
            assert!(exists(h, VM), "{what}: {VM} is gone");
            let m = h.machine(VM).expect("open");
            assert!(
                m.base().is_none() && m.pending().is_none(),
                "{what}: not committed"
            );
            assert_eq!(m.role(), Role::Primary, "{what}");
            drop(m);
            assert!(!h.replicas().has(VM), "{what}: the replica is left");
            assert!(!exists(h, TEST_COPY), "{what}: the test copy is left");
            let want = apply(
                w.src.at.get(&w.points.0[1]).expect("point").clone(),
                &phase_writes(1),
            );
            assert!(disks_of(h, VM, what) == want, "{what}: the committed disks");
        },
    );
    // Some cut fell between the commit's record and the machine's manifest.
    assert!(refused > 0, "no cut left a commit half recorded");
}

#[test]
fn a_power_cut_anywhere_in_a_cancelled_failover_leaves_the_replica_whole() {
    use Op::*;
    let ops = [Unplanned(1), Writes(0), Cancel];
    let _ = cut_everywhere("failover, cancel", &ops, 1, &|w, h, _done, what| {
        assert!(!exists(h, VM), "{what}: {VM} is still a machine");
        let store = h.replicas().open_readonly(VM).expect("replica");
        assert!(
            store.promotion().expect("promotion").is_none(),
            "{what}: still promoted"
        );
        // Every point the replica offers is whole.
        for p in replog::replica::points::list(&store).expect("points") {
            let want = w.src.at.get(&p.lsn).expect("a source state");
            let img = replog::replica::replay::PointImage::open(
                h.replicas().open_readonly(VM).expect("store"),
                &p.id(),
            )
            .expect("point");
            for (d, bytes) in want.iter().enumerate() {
                let mut got = vec![0u8; bytes.len()];
                img.read(d as u32, 0, &mut got).expect("read");
                assert!(got == *bytes, "{what}: disk {d} at {}", p.id());
            }
        }
    });
}
