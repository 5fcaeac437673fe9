//! The scrub: every stored object of a replica — segments and their indexes, parent
//! chunks, patches — is read back, decrypted and authenticated, a budget at a time,
//! round after round, so a damaged file is found before a restore needs it.
//!
//! Damage found is recorded in the replica's `damaged` file (the next session tells
//! the source, which resynchronises; a resync drops the parent chunks and patches
//! that do not authenticate — the comparison brings their bytes back) and in the
//! scrub state. `scrub.meta` (kind 8) keeps where the round stands and, for status,
//! when the last complete round ended and what it found.
//!
//! The scrub only reads. An object the receiver or the compactor removes while the
//! scrub looks at it is missing for a good reason: before anything is called damage,
//! the marks are read again and the object checked against them once more.

use super::store::{ReplicaStore, Replicas, PATCH_SEQ};
use crate::error::{Error, Result};
use crate::format::meta::KIND_SCRUB;
use serde::{Deserialize, Serialize};

const SCRUB: &str = "scrub.meta";

/// Where a replica's scrub stands (`scrub.meta`, kind 8, version 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubState {
    /// The last object checked in the round under way ("" at its start).
    pub after: String,
    /// When the round under way started.
    pub round_started_ns: u64,
    /// Objects and bytes checked in the round under way.
    pub checked: u64,
    pub bytes: u64,
    /// What the round under way found (the first damage).
    pub found: Option<String>,
    /// When the last complete round ended, how many objects it checked, and what
    /// it found (None: everything authenticated).
    pub last_full_ns: Option<u64>,
    pub last_full_checked: u64,
    pub last_found: Option<String>,
}

/// One object the scrub checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Segment(u64),
    Index(u64),
    Chunk(u32, u64),
    PatchIndex(u64),
    PatchData(u64),
}

impl Item {
    /// Its place in the scrub's order (numbers padded so names sort; for the real
    /// object key see the store).
    pub fn name(&self) -> String {
        match self {
            Item::Segment(s) => format!("segments/{s:020}.seg.enc"),
            Item::Index(s) => format!("segments/{s:020}.idx.enc"),
            Item::Chunk(d, n) => format!("parent/{d:010}/{n:010}.enc"),
            Item::PatchIndex(n) => format!("patches/{n:010}.idx.enc"),
            Item::PatchData(n) => format!("patches/{n:010}.data.enc"),
        }
    }

    /// Read, decrypt and authenticate it; the bytes read. Segments and patches are
    /// read around the page cache (where the store is a directory), so the scrub
    /// checks what the disk holds, not a cached copy.
    pub fn check(&self, store: &ReplicaStore) -> Result<u64> {
        Ok(match self {
            Item::Segment(s) => store.read_layer(*s)?.len() as u64,
            Item::Index(s) => store
                .segment_index(*s)
                .map(|i| 48 * i.records.len() as u64)?,
            Item::Chunk(d, n) => store.read_chunk(*d, *n)?.map_or(0, |c| c.len() as u64),
            Item::PatchIndex(n) => store.patch_index(*n).map(|i| 48 * i.records.len() as u64)?,
            Item::PatchData(n) => store.read_layer(PATCH_SEQ + n)?.len() as u64,
        })
    }
}

/// Every object of the replica as its marks say it is now, in the scrub's order.
pub fn items(store: &ReplicaStore) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for (d, _) in store.manifest().disks.iter().enumerate() {
        for n in store.stored_chunks(d as u32)? {
            out.push(Item::Chunk(d as u32, n));
        }
    }
    let patches = match store.resync_progress()? {
        Some(p) => p.patches,
        None => store.parent().patches,
    };
    for n in 1..=patches {
        out.push(Item::PatchIndex(n));
        out.push(Item::PatchData(n));
    }
    for s in store.parent().seq + 1..=store.received().segment_seq {
        out.push(Item::Index(s));
        out.push(Item::Segment(s));
    }
    out.sort_by_key(Item::name);
    Ok(out)
}

/// What one call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub checked: u64,
    pub bytes: u64,
    /// A round ended in this call.
    pub round_completed: bool,
    /// Damage found in this call (recorded in `damaged` too).
    pub damage: Option<String>,
}

impl ReplicaStore {
    /// The scrub's state (a replica never scrubbed has the default).
    pub fn scrub_state(&self) -> Result<ScrubState> {
        Ok(self.read_meta(SCRUB, KIND_SCRUB)?.unwrap_or_default())
    }

    fn save_scrub(&self, s: &ScrubState) -> Result<()> {
        self.write_meta(SCRUB, KIND_SCRUB, s)
    }
}

/// Check up to `budget` bytes more of the replica of `machine`, going on from where
/// the last call stopped; at the end of the objects the round is complete and the
/// next call starts another.
pub fn scrub_replica(replicas: &Replicas, machine: &str, budget: u64) -> Result<ScrubReport> {
    let store = replicas.open_readonly(machine)?;
    let mut report = ScrubReport::default();
    // A resync owns the parent; damage already recorded waits for it.
    if store.parent().resyncing || store.damage()?.is_some() || !store.initial().done {
        return Ok(report);
    }
    let mut st = store.scrub_state()?;
    let now = crate::format::now_ns();
    if st.after.is_empty() {
        st.round_started_ns = now;
        st.checked = 0;
        st.bytes = 0;
        st.found = None;
    }
    let all = items(&store)?;
    let todo: Vec<&Item> = all.iter().filter(|i| i.name() > st.after).collect();
    for item in todo {
        if report.bytes >= budget {
            store.save_scrub(&st)?;
            return Ok(report);
        }
        match item.check(&store) {
            Ok(n) => {
                report.checked += 1;
                report.bytes += n.max(1);
                st.checked += 1;
                st.bytes += n;
                st.after = item.name();
            }
            Err(e) => {
                // Still there, as the marks say now? Otherwise it went for a good
                // reason (merged, a resync ended) and is no damage.
                let fresh = replicas.open_readonly(machine)?;
                if !items(&fresh)?.contains(item) || fresh.parent().resyncing {
                    st.after = item.name();
                    continue;
                }
                let damaged = match e {
                    Error::Corruption { .. } => true,
                    ref other => is_missing(other),
                };
                if !damaged {
                    store.save_scrub(&st)?;
                    return Err(e);
                }
                let why = format!("the scrub found damage: {e}");
                tracing::error!(machine, "replica: {why}");
                store.mark_damaged(&why)?;
                st.found.get_or_insert(why.clone());
                st.after = item.name();
                store.save_scrub(&st)?;
                report.damage = Some(why);
                return Ok(report);
            }
        }
    }
    // Every object checked: the round is complete.
    st.last_full_ns = Some(crate::format::now_ns());
    st.last_full_checked = st.checked;
    st.last_found = st.found.take();
    st.after.clear();
    store.save_scrub(&st)?;
    report.round_completed = true;
    Ok(report)
}

/// An object the marks name but the backend does not have.
fn is_missing(e: &Error) -> bool {
    matches!(e, Error::NotFound(_)) || crate::storage::is_not_found(e)
}
