//! Readers' pins: how a restore or a mounted point view keeps the target compactor
//! away from what it reads, across processes.
//!
//! A reader takes `merge.lock` (exclusive, briefly), reads the marks, chooses its
//! point and leaves a pin under `pins/` (a [`ReplicaBackend::pin`]: live for as long
//! as its holder keeps it, gone when the holder drops it or dies), holding 16 bytes —
//! the point's LSN and the sequence number of the parent mark it started from, both
//! little-endian u64. The target compactor takes `merge.lock` while it decides how
//! far to merge, and:
//!
//! - merges no further than the oldest pinned point (so the point stays), and
//! - deletes no segment after the oldest pinned parent start (so the segments a
//!   reader's map points into stay).
//!
//! Rewriting parent chunks under a reader is safe: a reader reads the parent only
//! where no record between its start and its point wrote, and there the parent is
//! the same at every state in between.
//!
//! [`ReplicaBackend::pin`]: super::backend::ReplicaBackend::pin

use super::backend::Held;
use super::store::{ReplicaStore, MERGE_LOCK, PINS};
use crate::error::Result;

/// `merge.lock`, held exclusively until dropped.
#[derive(Debug)]
pub struct MergeLock {
    _held: Box<dyn Held>,
}

/// Take `merge.lock` of `store`'s replica (waits while another holds it).
pub fn merge_lock(store: &ReplicaStore) -> Result<MergeLock> {
    Ok(MergeLock {
        _held: store.backend().lock(&store.key_of(MERGE_LOCK))?,
    })
}

/// What a pin protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinInfo {
    /// The point read.
    pub lsn: u64,
    /// The parent mark's segment the reader's map starts after.
    pub from_seq: u64,
}

impl PinInfo {
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.lsn.to_le_bytes());
        b[8..].copy_from_slice(&self.from_seq.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<PinInfo> {
        let lsn = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let from_seq = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
        Some(PinInfo { lsn, from_seq })
    }
}

/// A held pin; dropping it releases and removes it.
#[derive(Debug)]
pub struct Pin {
    _held: Box<dyn Held>,
    pub info: PinInfo,
}

/// Leave a pin in `store`'s replica. Call with `merge.lock` held.
pub fn pin(store: &ReplicaStore, info: PinInfo, _held: &MergeLock) -> Result<Pin> {
    Ok(Pin {
        _held: store.backend().pin(&store.key_of(PINS), &info.encode())?,
        info,
    })
}

/// The pins of live readers of `store`'s replica; pins of dead ones are removed.
/// Call with `merge.lock` held.
pub fn live_pins(store: &ReplicaStore, _held: &MergeLock) -> Result<Vec<PinInfo>> {
    Ok(store
        .backend()
        .live_pins(&store.key_of(PINS))?
        .iter()
        .filter_map(|b| PinInfo::decode(b))
        .collect())
}
