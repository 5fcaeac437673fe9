//! Model test: random writes (unaligned included), zeroes, reads, flushes, seals,
//! compactions, crashes and reopens against plain `Vec<u8>` disks.
//!
//! Invariant 1: reads always equal the model. Invariant 2: after a crash the disks
//! equal the model after some prefix of the writes that includes every write made
//! durable (flushed or sealed) before it.

mod common;

use common::*;
use proptest::prelude::*;
use replog::storage::{CrashMode, FaultyStorage, Storage};
use std::sync::Arc;

const SIZES: [u64; 2] = [64 * 1024, 40 * 1024 + 512];
const SEGMENT: u64 = 8192;

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: usize,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Read {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Flush,
    Seal,
    Compact,
    Checkpoint,
    Crash(CrashMode),
    Reopen,
}

fn range(disk: usize, max_len: u64) -> impl Strategy<Value = (usize, u64, u64)> {
    let size = SIZES[disk];
    (0..size).prop_flat_map(move |off| {
        let room = (size - off).min(max_len);
        (Just(disk), Just(off), 1..=room)
    })
}

fn any_range(max_len: u64) -> impl Strategy<Value = (usize, u64, u64)> {
    prop_oneof![range(0, max_len), range(1, max_len)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (any_range(9000), any::<u64>()).prop_map(|((disk, offset, len), seed)| Op::Write { disk, offset, len, seed }),
        2 => any_range(20000).prop_map(|(disk, offset, len)| Op::Zero { disk, offset, len }),
        4 => any_range(12000).prop_map(|(disk, offset, len)| Op::Read { disk, offset, len }),
        3 => Just(Op::Flush),
        1 => Just(Op::Seal),
        2 => Just(Op::Compact),
        1 => Just(Op::Checkpoint),
        2 => prop_oneof![
            Just(CrashMode::DropAll),
            Just(CrashMode::KeepAll),
            any::<u64>().prop_map(CrashMode::Tear),
            (1usize..4).prop_map(CrashMode::DropLastNames)
        ]
        .prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let storage = FaultyStorage::new();
    let dyn_storage: Arc<dyn Storage> = Arc::new(storage.clone());
    let dir = machine_dir();
    create_machine(&storage, &dir, &SIZES);
    let mut m = open(dyn_storage.clone(), &dir, SEGMENT).expect("open");
    let mut model: Vec<Vec<u8>> = SIZES.iter().map(|s| vec![0u8; *s as usize]).collect();
    let mut durable = model.clone();
    let mut pending: Vec<ModelWrite> = Vec::new();

    for op in ops {
        match op {
            Op::Write {
                disk,
                offset,
                len,
                seed,
            } => {
                let data = pattern(seed, len as usize);
                m.volume(&format!("d{disk}"))
                    .expect("vol")
                    .write(offset, &data)
                    .expect("write");
                let w = ModelWrite {
                    disk,
                    offset,
                    len,
                    data: Some(data),
                };
                apply(&mut model, &w);
                pending.push(w);
            }
            Op::Zero { disk, offset, len } => {
                m.volume(&format!("d{disk}"))
                    .expect("vol")
                    .write_zeroes(offset, len)
                    .expect("zero");
                let w = ModelWrite {
                    disk,
                    offset,
                    len,
                    data: None,
                };
                apply(&mut model, &w);
                pending.push(w);
            }
            Op::Read { disk, offset, len } => {
                let mut buf = vec![0u8; len as usize];
                m.volume(&format!("d{disk}"))
                    .expect("vol")
                    .read(offset, &mut buf)
                    .expect("read");
                prop_assert!(
                    buf[..] == model[disk][offset as usize..(offset + len) as usize],
                    "read of d{disk} {offset}+{len} differs from the model"
                );
            }
            Op::Flush | Op::Checkpoint => {
                if matches!(op, Op::Flush) {
                    m.flush().expect("flush");
                } else {
                    m.checkpoint().expect("checkpoint");
                }
                durable = model.clone();
                pending.clear();
            }
            Op::Seal => {
                m.seal().expect("seal");
                durable = model.clone();
                pending.clear();
            }
            Op::Compact => {
                let before = read_disks(&m, &SIZES);
                m.compact().expect("compact");
                prop_assert!(
                    read_disks(&m, &SIZES) == before,
                    "compaction changed what reads return"
                );
            }
            Op::Crash(mode) => {
                drop(m);
                storage.crash(mode);
                m = open(dyn_storage.clone(), &dir, SEGMENT).expect("reopen after crash");
                let actual = read_disks(&m, &SIZES);
                let k = matching_prefix(&durable, &pending, &actual);
                prop_assert!(
                    k.is_some(),
                    "after crash ({mode:?}) the disks match no prefix of the {} unsynced writes",
                    pending.len()
                );
                if mode == CrashMode::KeepAll {
                    prop_assert!(actual == model, "a process crash lost page-cache writes");
                }
                model = actual;
                durable = model.clone();
                pending.clear();
            }
            Op::Reopen => {
                m.close().expect("close");
                m = open(dyn_storage.clone(), &dir, SEGMENT).expect("reopen");
                durable = model.clone();
                pending.clear();
            }
        }
    }
    prop_assert!(
        read_disks(&m, &SIZES) == model,
        "final state differs from the model"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

#[test]
fn journal_stays_bounded_without_holds() {
    let storage = FaultyStorage::new();
    let dir = machine_dir();
    create_machine(&storage, &dir, &[1 << 20]);
    let m = open(Arc::new(storage.clone()), &dir, 16 * 1024).expect("open");
    m.start_compactor(replog::compactor::CompactPolicy::eager(
        std::time::Duration::from_millis(5),
    ));
    let v = m.volume("d0").expect("vol");
    for i in 0..400u64 {
        v.write((i * 4096) % (1 << 20), &pattern(i, 4096))
            .expect("write");
    }
    m.flush().expect("flush");
    // The background compactor merges sealed segments as they appear; give it a moment
    // and then check the journal is within a few segments, not 1.6 MB.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = m.status();
        if s.sealed_segments == 0 {
            assert!(
                s.journal_bytes <= 2 * 16 * 1024,
                "journal {} bytes",
                s.journal_bytes
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "compactor never caught up: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut buf = vec![0u8; 4096];
    v.read(399 * 4096 % (1 << 20), &mut buf).expect("read");
    assert_eq!(buf, pattern(399, 4096));
}

#[test]
fn hold_keeps_segments_until_released() {
    let storage = FaultyStorage::new();
    let dir = machine_dir();
    create_machine(&storage, &dir, &[1 << 20]);
    let m = open(Arc::new(storage.clone()), &dir, 8192).expect("open");
    let v = m.volume("d0").expect("vol");
    v.write(0, &pattern(1, 4096)).expect("write");
    m.seal().expect("seal");
    let hold = m.hold_watermark(0);
    v.write(4096, &pattern(2, 4096)).expect("write");
    m.seal().expect("seal");
    assert_eq!(
        m.compact().expect("compact").segments,
        0,
        "merged past a hold at LSN 0"
    );
    assert_eq!(m.status().sealed_segments, 2);
    // Every seal ends on a point record: the first segment is the write and its point.
    let first_last = m.sealed_segments()[0].last_lsn;
    assert_eq!(first_last, 2);
    hold.set(1);
    assert_eq!(
        m.compact().expect("compact").segments,
        0,
        "merged past LSN 1"
    );
    hold.set(first_last);
    assert_eq!(
        m.compact().expect("compact").segments,
        1,
        "a hold at the first segment's last LSN allows it"
    );
    drop(hold);
    assert_eq!(m.compact().expect("compact").segments, 1);
    assert_eq!(m.status().sealed_segments, 0);
}

#[test]
fn group_commit_shares_fsyncs() {
    let storage = FaultyStorage::new();
    let dir = machine_dir();
    create_machine(&storage, &dir, &[8 << 20]);
    let m = Arc::new(open(Arc::new(storage.clone()), &dir, 64 << 20).expect("open"));
    // Slow syncs, like a real disk, so that callers overlap.
    storage.set_sync_delay(Some(std::time::Duration::from_millis(2)));
    let before = storage.sync_count();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let v = m.volume("d0").expect("vol");
                for i in 0..200u64 {
                    v.write((t * 200 + i) * 4096, &pattern(t * 1000 + i, 4096))
                        .expect("write");
                    v.flush().expect("flush");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let syncs = storage.sync_count() - before;
    assert!(
        syncs <= 800,
        "{syncs} fdatasyncs for 1600 flushes: callers do not share them"
    );
    let s = m.status();
    assert_eq!(s.durable_lsn, s.last_lsn);
    eprintln!("1600 flushes from 8 threads took {syncs} fdatasyncs");
}
