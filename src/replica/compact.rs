//! The target compactor: folds segments whose points retention has let go into the
//! replica parent chunks, and removes segments no reader needs any more.
//!
//! Order, as on the source: decide under `merge.lock` (never past the oldest point
//! retention keeps, never past a pinned point) and persist the intent in the parent
//! mark (`merging_to`: from now on points before it are gone); apply every record of
//! the merged segments to the parent chunks (encrypted, temporary, fsync, rename,
//! directory fsync); persist the new parent mark; then delete segments up to it —
//! except those a reader that started from an older parent still maps into (its pin
//! says which), which a later pass removes. A crash anywhere redoes the merge from the
//! intent: replaying records over chunks is idempotent.
//!
//! Damage found by a merge is recorded in the replica's `damaged` file (as the scrub,
//! `scrub.rs`, records what it finds); the next session tells the source, which
//! resynchronises.

use super::pin::{live_pins, merge_lock};
use super::points;
use super::store::{ChunkEditor, ParentMark, ReplicaStore, Replicas};
use crate::error::Result;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// The parent's new LSN, when it moved.
    pub merged_to: Option<u64>,
    pub segments_merged: u64,
    pub files_removed: u64,
}

/// One pass over the replica of `machine`, as if the time were `now_ns`.
pub fn compact_replica(replicas: &Replicas, machine: &str, now_ns: u64) -> Result<MergeStats> {
    let mut store = replicas.open_readonly(machine)?;
    let mut stats = MergeStats::default();
    if !store.initial().done {
        return Ok(stats);
    }
    let lock = merge_lock(&store)?;
    store.refresh()?;
    let pins = live_pins(&store, &lock)?;
    let parent = store.parent().clone();
    if parent.resyncing || store.resync_progress()?.is_some() {
        return Ok(stats); // a resync owns the parent until it has ended
    }
    if store.has_stale_patches()? && pins.is_empty() {
        store.remove_patches()?;
    }
    let target = match parent.merging_to {
        Some(t) => Some(t), // an interrupted merge: finish it
        None => {
            let oldest_kept = points::retained(&store, now_ns)?
                .first()
                .map_or(u64::MAX, |p| p.lsn);
            let limit = pins.iter().map(|p| p.lsn).fold(oldest_kept, u64::min);
            let mut best = None;
            for seq in parent.seq + 1..=store.received().segment_seq {
                let index = store.segment_index(seq)?;
                if index.last_lsn > limit {
                    break;
                }
                best = Some((index.last_lsn, seq));
            }
            // A resync's patches are folded in at once (they lie below every point).
            best.or((parent.patches > 0).then_some((parent.lsn, parent.seq)))
        }
    };
    if let Some((lsn, seq)) = target {
        if parent.merging_to.is_none() {
            store.set_parent(ParentMark {
                merging_to: Some((lsn, seq)),
                ..parent.clone()
            })?;
        }
        drop(lock);
        let mut ed = ChunkEditor::new(&store);
        let mut point = parent.point.clone();
        for n in 1..=parent.patches {
            let (index, plain) = store.layer(super::store::PATCH_SEQ + n)?;
            ed.apply_layer(&index, &plain)?;
        }
        for s in parent.seq + 1..=seq {
            let (index, plain) = match store.layer(s) {
                Ok(x) => x,
                Err(e @ crate::error::Error::Corruption { .. }) => {
                    // The chain is broken here: say so (the source resyncs) and stop.
                    store.mark_damaged(&e.to_string())?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            ed.apply_layer(&index, &plain)?;
            if s == seq {
                point = index.points.iter().rfind(|p| p.lsn == lsn).cloned();
            }
            stats.segments_merged += 1;
        }
        ed.finish()?;
        let lock = merge_lock(&store)?;
        let fresh = replicas.open_readonly(machine)?;
        if fresh.parent().resyncing || fresh.resync_progress()?.is_some() {
            // A resync began meanwhile (it refuses while a merge is marked, so this is
            // only a guard): its mark stands.
            return Ok(stats);
        }
        store.set_parent(ParentMark {
            lsn,
            seq,
            point,
            merging_to: None,
            resyncing: false,
            valid_from: parent.valid_from,
            patches: 0,
        })?;
        stats.merged_to = Some(lsn);
        let pins = live_pins(&store, &lock)?;
        if pins.is_empty() {
            store.remove_patches()?;
        }
        stats.files_removed = remove_unneeded(&store, &pins)?;
        tracing::info!(
            machine,
            lsn,
            segments = stats.segments_merged,
            "replica: merged expired points into the parent"
        );
        return Ok(stats);
    }
    stats.files_removed = remove_unneeded(&store, &pins)?;
    Ok(stats)
}

/// Remove segments merged into the parent that no pinned reader maps into.
fn remove_unneeded(store: &ReplicaStore, pins: &[super::pin::PinInfo]) -> Result<u64> {
    let parent = store.parent();
    if parent.merging_to.is_some() {
        return Ok(0);
    }
    let upto = pins.iter().map(|p| p.from_seq).fold(parent.seq, u64::min);
    match store.oldest_stored_segment()? {
        Some(oldest) if oldest <= upto => store.remove_segments(oldest, upto),
        _ => Ok(0),
    }
}
