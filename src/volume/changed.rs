//! The changed-block map (`machines/<m>/changed.meta`, metadata kind 10): every byte
//! range of every disk a promoted machine changed since its base point, kept from
//! its fold until a reprotect of it is verified, so that reverse replication sends
//! only what differs (see docs/DESIGN.md, "Reprotect and failback").
//!
//! The journal answers for what is not merged yet; the map answers for what was:
//! the compactor adds the ranges of every batch before the merge watermark moves past
//! them (a crash between the two leaves a superset, never less). Ranges are whole
//! granules (4 KiB, coarser when the map would not fit a metadata file).
//!
//! Body (postcard, in field order): `since: u64` (the base point's LSN),
//! `foreign_upto: Option<u64>` (the map also holds the ranges the replica had stored
//! after `since`, up to this LSN: the old primary's writes the point did not take),
//! `granule_shift: u8`, `disks: Vec<Vec<(u64, u64)>>` (per disk, sorted disjoint
//! runs of granules: first granule, count).

use crate::error::{Error, Result};
use crate::format::meta;
use crate::storage::{write_atomic, Storage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const CHANGED_FILE: &str = "changed.meta";
/// The finest granule: one 4 KiB block.
const MIN_SHIFT: u8 = 12;
/// Coarsest granule tried before giving up (1 GiB).
const MAX_SHIFT: u8 = 30;

/// Byte ranges changed since `since`, per disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedMap {
    pub since: u64,
    pub foreign_upto: Option<u64>,
    shift: u8,
    /// Per disk: start granule → end granule (exclusive), disjoint, not touching.
    disks: Vec<BTreeMap<u64, u64>>,
}

#[derive(Serialize, Deserialize)]
struct Body {
    since: u64,
    foreign_upto: Option<u64>,
    granule_shift: u8,
    disks: Vec<Vec<(u64, u64)>>,
}

impl ChangedMap {
    pub fn new(since: u64, foreign_upto: Option<u64>, disks: usize) -> Self {
        ChangedMap {
            since,
            foreign_upto,
            shift: MIN_SHIFT,
            disks: vec![BTreeMap::new(); disks],
        }
    }

    pub fn granule(&self) -> u64 {
        1 << self.shift
    }

    /// Record `len` bytes at `offset` of disk `disk` as changed.
    pub fn add(&mut self, disk: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let shift = self.shift;
        let Some(map) = self.disks.get_mut(disk as usize) else {
            return;
        };
        let mut start = offset >> shift;
        let mut end = (offset.saturating_add(len) + (1 << shift) - 1) >> shift;
        // Runs that overlap or touch [start, end) merge into it.
        let touching: Vec<(u64, u64)> = map
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            map.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        map.insert(start, end);
    }

    /// Every range of `other` too (same disks).
    pub fn union(&mut self, other: &ChangedMap) {
        for (d, map) in other.disks.iter().enumerate() {
            for (s, e) in map {
                self.add(d as u32, s << other.shift, (e - s) << other.shift);
            }
        }
    }

    /// The changed byte ranges of disk `disk`, in order, clipped to `size`.
    pub fn ranges(&self, disk: u32, size: u64) -> Vec<(u64, u64)> {
        let Some(map) = self.disks.get(disk as usize) else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(s, e)| {
                let (a, b) = ((s << self.shift).min(size), (e << self.shift).min(size));
                (b > a).then_some((a, b - a))
            })
            .collect()
    }

    /// Bytes the map covers on every disk.
    pub fn bytes(&self) -> u64 {
        self.disks
            .iter()
            .flat_map(|m| m.iter().map(|(s, e)| (e - s) << self.shift))
            .sum()
    }

    /// Coarser granules: a superset in fewer runs.
    fn coarsen(&self) -> ChangedMap {
        let mut out = ChangedMap {
            shift: self.shift + 1,
            disks: vec![BTreeMap::new(); self.disks.len()],
            ..self.clone()
        };
        out.union(self);
        out
    }

    /// A superset in at most `runs` runs (coarser granules as needed).
    pub fn coarsened_to(&self, runs: usize) -> ChangedMap {
        let mut m = self.clone();
        while m.disks.iter().map(BTreeMap::len).sum::<usize>() > runs && m.shift < MAX_SHIFT {
            m = m.coarsen();
        }
        m
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut m = self.clone();
        loop {
            let body = Body {
                since: m.since,
                foreign_upto: m.foreign_upto,
                granule_shift: m.shift,
                disks: m
                    .disks
                    .iter()
                    .map(|d| d.iter().map(|(s, e)| (*s, e - s)).collect())
                    .collect(),
            };
            let bytes =
                postcard::to_stdvec(&body).map_err(|e| Error::InvalidInput(e.to_string()))?;
            if bytes.len() <= meta::MAX_META_BODY as usize || m.shift >= MAX_SHIFT {
                return Ok(meta::encode(meta::KIND_CHANGED, &bytes));
            }
            m = m.coarsen();
        }
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Self, crate::format::DecodeError> {
        let (_, body) = meta::decode(meta::KIND_CHANGED, b)?;
        let bad = |why: &str| crate::format::DecodeError::new(meta::META_HEADER_LEN as u64, why);
        let body: Body =
            meta::body_exact(body).ok_or_else(|| bad("changed-block map does not decode"))?;
        if !(MIN_SHIFT..=MAX_SHIFT).contains(&body.granule_shift) {
            return Err(bad("changed-block map granule out of range"));
        }
        let mut disks = Vec::with_capacity(body.disks.len());
        for d in body.disks {
            let mut map = BTreeMap::new();
            let mut prev_end = 0u64;
            for (i, (s, n)) in d.into_iter().enumerate() {
                let end = s.checked_add(n).filter(|_| n > 0);
                match end {
                    Some(end) if i == 0 || s > prev_end => {
                        map.insert(s, end);
                        prev_end = end;
                    }
                    _ => return Err(bad("changed-block map runs overlap or are empty")),
                }
            }
            disks.push(map);
        }
        Ok(ChangedMap {
            since: body.since,
            foreign_upto: body.foreign_upto,
            shift: body.granule_shift,
            disks,
        })
    }

    /// The map of the machine at `dir`, if it keeps one.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<ChangedMap>> {
        super::load_meta(storage, &dir.join(CHANGED_FILE), ChangedMap::decode)
    }

    pub fn save(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        write_atomic(storage, &dir.join(CHANGED_FILE), &self.encode()?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_merge_and_round_trip() {
        let mut m = ChangedMap::new(7, Some(9), 2);
        m.add(0, 4096, 1);
        m.add(0, 8192, 4096);
        m.add(0, 100 << 12, 3 << 12);
        m.add(1, 5, 10);
        assert_eq!(
            m.ranges(0, 1 << 30),
            vec![(4096, 8192), (100 << 12, 3 << 12)]
        );
        assert_eq!(m.ranges(1, 1 << 30), vec![(0, 4096)]);
        assert_eq!(m.bytes(), 8192 + (3 << 12) + 4096);
        let back = ChangedMap::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(back, m);
    }

    proptest! {
        /// Every byte added is covered, whatever the order; the runs stay disjoint.
        #[test]
        fn covers_every_byte_added(adds in proptest::collection::vec((0u64..1 << 20, 1u64..20_000), 1..60)) {
            let mut m = ChangedMap::new(0, None, 1);
            for (o, l) in &adds {
                m.add(0, *o, *l);
            }
            let ranges = m.ranges(0, u64::MAX);
            for w in ranges.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0);
            }
            for (o, l) in adds {
                prop_assert!(ranges.iter().any(|(s, n)| *s <= o && o + l <= s + n));
            }
            let coarse = m.coarsen();
            for (o, n) in m.ranges(0, u64::MAX) {
                prop_assert!(coarse.ranges(0, u64::MAX).iter().any(|(s, k)| *s <= o && o + n <= s + k));
            }
        }
    }
}
