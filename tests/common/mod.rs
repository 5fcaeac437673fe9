//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod frames;
pub mod pair;
pub mod seaweed;
pub mod serve;
pub mod source;

use replog::config::JournalConfig;
use replog::storage::Storage;
use replog::Machine;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a fault-injection run makes fail (see `FaultyStorage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Write,
    Sync,
    /// The power goes at this change (write, sync, creation, rename, removal, …):
    /// it and every later one fail.
    Cut,
}

impl Fault {
    /// Let `n` operations of this kind through, then fail (the later ones too if
    /// `sticky`; a power cut is always for good).
    pub fn arm(self, fs: &replog::storage::FaultyStorage, n: u64, sticky: bool) {
        match self {
            Fault::Write => fs.fail_write_after(n, sticky),
            Fault::Sync => fs.fail_sync_after(n, sticky),
            Fault::Cut => fs.cut_after(n),
        }
    }
}

pub fn machine_dir() -> PathBuf {
    PathBuf::from("/site/machines/vm1")
}

/// Create machine `vm1` with disks of the given sizes (named d0, d1, …) in `storage`.
pub fn create_machine(storage: &dyn Storage, dir: &Path, sizes: &[u64]) {
    Machine::create(storage, dir).expect("create machine");
    for (i, size) in sizes.iter().enumerate() {
        Machine::add_disk(storage, dir, &format!("d{i}"), *size, None).expect("add disk");
    }
}

pub fn open(storage: Arc<dyn Storage>, dir: &Path, segment_bytes: u64) -> replog::Result<Machine> {
    let cfg = JournalConfig {
        segment_bytes,
        ..JournalConfig::default()
    };
    Machine::open(storage, dir, "vm1", cfg)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Read every disk of `m` whole.
pub fn read_disks(m: &Machine, sizes: &[u64]) -> Vec<Vec<u8>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let v = m.volume(&format!("d{i}")).expect("volume");
            let mut buf = vec![0u8; *size as usize];
            v.read(0, &mut buf).expect("read disk");
            buf
        })
        .collect()
}

/// A write as the model sees it: data, or zeros when `data` is None.
#[derive(Debug, Clone)]
pub struct ModelWrite {
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
    pub data: Option<Vec<u8>>,
}

pub fn apply(model: &mut [Vec<u8>], w: &ModelWrite) {
    let d = &mut model[w.disk];
    let range = w.offset as usize..(w.offset + w.len) as usize;
    match &w.data {
        Some(data) => d[range].copy_from_slice(data),
        None => d[range].fill(0),
    }
}

/// After a crash: the disks must equal `durable` plus some prefix of `pending`.
/// Returns the length of the matching prefix.
pub fn matching_prefix(
    durable: &[Vec<u8>],
    pending: &[ModelWrite],
    actual: &[Vec<u8>],
) -> Option<usize> {
    let mut state = durable.to_vec();
    if state == actual {
        return Some(0);
    }
    for (k, w) in pending.iter().enumerate() {
        apply(&mut state, w);
        if state == actual {
            return Some(k + 1);
        }
    }
    None
}
