//! Fault injection: fail the Nth write or the Nth fsync at every step of a workload
//! that appends, flushes, seals and compacts; then lose power. Whatever failed:
//! - after a failed fsync (or write) the machine is poisoned: later writes and flushes
//!   fail, nothing claims success;
//! - recovery opens the machine, and every disk equals the model after some prefix of
//!   the acknowledged writes that includes every write made durable before the fault.
//!
//! Failing each write and sync of a compaction in turn, then crashing, interrupts the
//! compactor between each of its steps.

mod common;

use common::*;
use replog::storage::{CrashMode, FaultyStorage, Storage};
use replog::Error;
use std::sync::Arc;

const SIZES: [u64; 2] = [64 * 1024, 32 * 1024];

/// Run the workload with the given fault armed; returns whether the fault fired.
fn run(fault: Fault, n: u64, crash: CrashMode) -> bool {
    let storage = FaultyStorage::new();
    let dyn_storage: Arc<dyn Storage> = Arc::new(storage.clone());
    let dir = machine_dir();
    create_machine(&storage, &dir, &SIZES);
    let m = open(dyn_storage.clone(), &dir, 4096).expect("open");
    fault.arm(&storage, n, false);
    let mut model: Vec<Vec<u8>> = SIZES.iter().map(|s| vec![0u8; *s as usize]).collect();
    let mut durable = model.clone();
    let mut pending = Vec::new();
    let mut failed = false;

    for i in 0..40u64 {
        let disk = (i % 2) as usize;
        let len = 700 + (i * 337) % 3000;
        let offset = (i * 4093) % (SIZES[disk] - len);
        let data = pattern(i, len as usize);
        let vol = m.volume(&format!("d{disk}")).expect("vol");
        let (w, res) = if i % 7 == 3 {
            (
                ModelWrite {
                    disk,
                    offset,
                    len,
                    data: None,
                },
                vol.write_zeroes(offset, len),
            )
        } else {
            let res = vol.write(offset, &data);
            (
                ModelWrite {
                    disk,
                    offset,
                    len,
                    data: Some(data),
                },
                res,
            )
        };
        match res {
            Ok(_) => {
                assert!(
                    !failed,
                    "write {i} acknowledged after a failure poisoned the machine"
                );
                apply(&mut model, &w);
                pending.push(w);
            }
            Err(e) => {
                // A failed write may or may not have reached the disk (it can fail
                // after its record was appended, when rotating the segment): it may
                // end the prefix that survives.
                if !failed {
                    pending.push(w);
                }
                failed = true;
                assert!(matches!(e, Error::Poisoned { .. }), "write {i}: {e}");
            }
        }
        let step = match i % 10 {
            4 | 9 => m.flush().map(|_| true),
            6 => m.seal().map(|_| true),
            8 => m.compact().map(|_| false),
            _ => Ok(false),
        };
        match step {
            Ok(true) => {
                assert!(!failed, "flush/seal {i} succeeded on a poisoned machine");
                durable = model.clone();
                pending.clear();
            }
            Ok(false) => {}
            Err(e) => {
                failed = true;
                assert!(
                    matches!(e, Error::Poisoned { .. } | Error::Io { .. }),
                    "step {i}: {e}"
                );
            }
        }
    }
    let fired = storage.fired();
    assert_eq!(
        fired, failed,
        "fault fired = {fired} but failure seen = {failed}"
    );
    if fired {
        assert!(
            m.status().poisoned.is_some(),
            "a fault fired but the machine is not poisoned"
        );
        assert!(m.flush().is_err(), "flush succeeded after a fault");
    }
    drop(m);
    storage.crash(crash);
    let m = open(dyn_storage, &dir, 4096)
        .unwrap_or_else(|e| panic!("{fault:?} #{n}, {crash:?}: recovery failed: {e}"));
    let actual = read_disks(&m, &SIZES);
    assert!(
        matching_prefix(&durable, &pending, &actual).is_some(),
        "{fault:?} #{n}, {crash:?}: disks match no prefix of the {} writes after the last durable point",
        pending.len()
    );
    fired
}

fn every_step(fault: Fault) {
    let mut n = 0;
    let mut fired_count = 0;
    loop {
        let fired = run(fault, n, CrashMode::DropAll);
        run(fault, n, CrashMode::Tear(n * 7 + 1));
        run(fault, n, CrashMode::DropLastNames(1));
        run(fault, n, CrashMode::DropLastNames(2));
        if !fired {
            break;
        }
        fired_count += 1;
        n += 1;
        assert!(n < 10_000, "workload never finishes");
    }
    // The workload really does many writes / syncs, and the last run completed.
    assert!(
        fired_count > 10,
        "only {fired_count} {fault:?} steps exercised"
    );
    eprintln!("{fault:?}: failed each of {fired_count} steps in turn");
}

#[test]
fn failing_each_write_loses_nothing_durable() {
    every_step(Fault::Write);
}

#[test]
fn failing_each_sync_poisons_and_loses_nothing_durable() {
    every_step(Fault::Sync);
}

/// A power loss at every change the workload makes in turn: unsynced writes, and
/// names whose directory was not synced, are dropped (or torn); recovery finds every
/// write made durable before the cut.
#[test]
fn a_power_cut_at_each_change_loses_nothing_durable() {
    every_step(Fault::Cut);
}
