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
//! The same thread scrubs: every pass authenticates up to 64 MiB more of the stored
//! segments, round robin, so a damaged file is found before a restore needs it. Damage
//! (found here or by a merge) is recorded in the replica's `damaged` file; the next
//! session tells the source, which resynchronises.

use super::pin::{live_pins, merge_lock};
use super::points;
use super::store::{ChunkEditor, ParentMark, ReplicaStore};
use crate::error::Result;
use std::path::Path;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// The parent's new LSN, when it moved.
    pub merged_to: Option<u64>,
    pub segments_merged: u64,
    pub files_removed: u64,
}

/// One pass over the replica of `machine` at the target `site`.
pub fn compact_replica(
    site: &Path,
    machine: &str,
    key: super::crypt::ReplicaKey,
    now_ns: u64,
) -> Result<MergeStats> {
    let mut store = ReplicaStore::open_readonly(site, machine, key)?;
    let mut stats = MergeStats::default();
    if !store.initial().done {
        return Ok(stats);
    }
    let dir = store.dir().to_path_buf();
    let lock = merge_lock(&dir)?;
    store.refresh()?;
    let pins = live_pins(&dir, &lock)?;
    let parent = store.parent().clone();
    if parent.resyncing || store.resync_progress()?.is_some() {
        return Ok(stats); // a resync owns the parent until it has ended
    }
    if store.has_stale_patches() && pins.is_empty() {
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
        let lock = merge_lock(&dir)?;
        let mut fresh = ReplicaStore::open_readonly(site, machine, store.key().clone())?;
        fresh.refresh()?;
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
        let pins = live_pins(&dir, &lock)?;
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

/// Run a pass over every replica at `site` every `interval` until `stop` is set (the
/// target compactor thread of `serve`).
pub fn spawn_loop(
    site: std::path::PathBuf,
    key: super::crypt::ReplicaKey,
    interval: std::time::Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("replica-compactor".into())
        .spawn(move || {
            let mut next = std::time::Instant::now() + interval;
            let mut scrub_at: std::collections::HashMap<String, u64> = Default::default();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                if std::time::Instant::now() < next {
                    std::thread::sleep(std::time::Duration::from_millis(100).min(interval));
                    continue;
                }
                next = std::time::Instant::now() + interval;
                let dir = site.join(super::store::REPLICAS_DIR);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let Some(name) = e.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    let now = crate::format::now_ns();
                    if let Err(err) = compact_replica(&site, &name, key.clone(), now) {
                        tracing::error!(machine = %name, "replica compaction: {err}");
                    }
                    let at = scrub_at.entry(name.clone()).or_default();
                    if let Err(err) = scrub_replica(&site, &name, key.clone(), at, 64 << 20) {
                        tracing::error!(machine = %name, "replica scrub: {err}");
                    }
                }
            }
        })
        .ok()
}

/// Verify stored segments of the replica of `machine` (decrypt and authenticate), at
/// most `budget` bytes this call, from segment `*next` on (wrapping around); damage
/// found is recorded so the source resyncs. A scrub, so that a damaged file is found
/// before anyone needs it.
pub fn scrub_replica(
    site: &Path,
    machine: &str,
    key: super::crypt::ReplicaKey,
    next: &mut u64,
    budget: u64,
) -> Result<()> {
    let store = ReplicaStore::open_readonly(site, machine, key)?;
    let parent = store.parent();
    if parent.resyncing || store.damage()?.is_some() {
        return Ok(());
    }
    let (first, last) = (parent.seq + 1, store.received().segment_seq);
    if first > last {
        return Ok(());
    }
    if *next < first || *next > last {
        *next = first;
    }
    let mut done = 0u64;
    while done < budget {
        let seq = *next;
        match store.read_segment(seq).and_then(|p| {
            store.segment_index(seq)?;
            Ok(p.len() as u64)
        }) {
            Ok(n) => done += n.max(1),
            Err(e @ crate::error::Error::Corruption { .. }) => {
                tracing::error!(machine, "replica segment {seq} is damaged: {e}");
                store.mark_damaged(&e.to_string())?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        *next = if seq >= last { first } else { seq + 1 };
        if *next == first {
            break; // one full round per call at most
        }
    }
    Ok(())
}
