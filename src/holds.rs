//! Watermark holds: the contract between replication and the compactor.
//!
//! A hold keeps a machine's merge watermark at or below an LSN while it lives: the
//! compactor merges (and then deletes) only sealed segments whose last LSN is at or
//! below every hold. Initial replication holds the watermark at the replica's base so
//! the parents stay frozen while they are copied; the shipper holds it at the last LSN
//! the target acknowledged, so nothing the target lacks is merged away; a resync holds
//! it at its base. Taking a hold waits for a merge in progress
//! (`Machine::hold_watermark`), so once it returns nothing above the hold is being
//! merged.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// Watermark holds of one machine.
#[derive(Debug, Default)]
pub struct Holds {
    inner: Arc<Mutex<HoldTable>>,
}

#[derive(Debug, Default)]
struct HoldTable {
    next: u64,
    limits: BTreeMap<u64, u64>,
}

impl Holds {
    pub fn hold(&self, lsn: u64) -> WatermarkHold {
        let mut t = self.inner.lock();
        let id = t.next;
        t.next += 1;
        t.limits.insert(id, lsn);
        WatermarkHold {
            table: Arc::downgrade(&self.inner),
            id,
        }
    }

    /// The highest LSN that may be merged (u64::MAX when nothing holds).
    pub fn limit(&self) -> u64 {
        self.inner
            .lock()
            .limits
            .values()
            .copied()
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// Keeps the merge watermark at or below an LSN while it lives.
#[derive(Debug)]
pub struct WatermarkHold {
    table: Weak<Mutex<HoldTable>>,
    id: u64,
}

impl WatermarkHold {
    /// Move the hold (for example, as the target acknowledges more).
    pub fn set(&self, lsn: u64) {
        if let Some(t) = self.table.upgrade() {
            t.lock().limits.insert(self.id, lsn);
        }
    }
}

impl Drop for WatermarkHold {
    fn drop(&mut self) {
        if let Some(t) = self.table.upgrade() {
            t.lock().limits.remove(&self.id);
        }
    }
}
