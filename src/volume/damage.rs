//! Damage in a machine's own journal: never served, listed for the resync, persisted
//! so that it outlives the process, and mended by rewriting the ranges as new writes.
//!
//! Two kinds (docs/DESIGN.md, "Segments, sealing, recovery"):
//! - damage found in a segment that was read whole before (the shipper's check, the
//!   compactor): the index knows every range the segment holds, so exactly those are
//!   refused, and mended from the segment itself up to the damage, from the replica
//!   after it;
//! - damage recovery found (`journal::DamagedSegment`): only the records before the
//!   damage were indexed, and which ranges the later ones wrote is unknown, so every
//!   range whose newest verified data is in that segment or older is refused
//!   (`IndexState::lost`). Mended from the replica if the replica holds the segment
//!   (then its data is exact for all of them); otherwise those writes are lost, and the
//!   verified data stands.

use super::*;
use crate::format::meta;
use serde::{Deserialize, Serialize};

/// The damage list's file, in the machine's journal directory.
pub const DAMAGE_FILE: &str = "damage";
/// Longest description kept per entry.
const MAX_WHAT: usize = 4096;
/// The uncertain ranges of a `lost` segment are handed out in pieces of at most this.
const LOST_PIECE: u64 = 8 << 20;

/// One damaged segment of the damage list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageEntry {
    pub seq: u64,
    /// Where and what (for status and logs).
    pub what: String,
    /// Every range it held was rewritten by newer, durable records: recovery indexes
    /// nothing of it and merges skip it.
    pub mended: bool,
}

/// Every damaged segment of a machine still in its journal (`journal/damage`, meta kind
/// 13): what keeps damage found at the source from being forgotten by a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DamageList {
    pub entries: Vec<DamageEntry>,
}

impl DamageList {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body =
            postcard::to_stdvec(&self.entries).map_err(|e| Error::InvalidInput(e.to_string()))?;
        Ok(meta::encode(meta::KIND_DAMAGE, &body))
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Self, crate::format::DecodeError> {
        let (_, body) = meta::decode(meta::KIND_DAMAGE, b)?;
        let bad = |why: &str| crate::format::DecodeError::new(meta::META_HEADER_LEN as u64, why);
        let entries: Vec<DamageEntry> =
            meta::body_exact(body).ok_or_else(|| bad("damage list does not decode"))?;
        if entries.windows(2).any(|w| match w {
            [a, b] => a.seq >= b.seq,
            _ => false,
        }) {
            return Err(bad("damage list entries are not in order"));
        }
        if entries.iter().any(|e| e.what.len() > MAX_WHAT) {
            return Err(bad("damage list entry too long"));
        }
        Ok(DamageList { entries })
    }

    /// The list of the machine at `dir` (empty if it has none).
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<DamageList> {
        let path = dir.join(JOURNAL_DIR).join(DAMAGE_FILE);
        Ok(load_meta(storage, &path, DamageList::decode)?.unwrap_or_default())
    }

    /// Replace the list atomically (removed when empty).
    pub fn save(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        let path = dir.join(JOURNAL_DIR).join(DAMAGE_FILE);
        if self.entries.is_empty() {
            if storage.exists(&path) {
                storage.remove_file(&path)?;
                storage.sync_dir(&dir.join(JOURNAL_DIR))?;
            }
            return Ok(());
        }
        write_atomic(storage, &path, &self.encode()?)
    }

    /// The segments listed as mended.
    pub fn mended(&self) -> std::collections::BTreeSet<u64> {
        self.entries
            .iter()
            .filter(|e| e.mended)
            .map(|e| e.seq)
            .collect()
    }

    /// Add (or keep) an unmended entry for `seq`; false if nothing changed.
    pub fn add(&mut self, seq: u64, what: &str) -> bool {
        match self.entries.binary_search_by_key(&seq, |e| e.seq) {
            Ok(i) => match self.entries.get_mut(i) {
                Some(e) if e.mended => {
                    e.mended = false;
                    true
                }
                _ => false,
            },
            Err(i) => {
                let mut what = what.to_string();
                if what.len() > MAX_WHAT {
                    let mut cut = MAX_WHAT;
                    while !what.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    what.truncate(cut);
                }
                self.entries.insert(
                    i,
                    DamageEntry {
                        seq,
                        what,
                        mended: false,
                    },
                );
                true
            }
        }
    }
}

/// A range whose newest data lies in a damaged segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub seq: u64,
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    /// The data, when its record still verifies (it lies before the damage).
    pub data: Option<Vec<u8>>,
    /// The range may have been written by a record after the damage of a segment
    /// recovery could not read whole (or holds verified data at most as new as that
    /// segment): mended with the replica's data, every piece of it.
    pub uncertain: bool,
}

impl MachineInner {
    /// A segment turned out damaged: stop serving it, persist it in the damage list
    /// and poison the machine (the damage must be mended, by resynchronisation,
    /// before anything continues).
    pub(crate) fn damaged(&self, seq: u64, err: Error) -> Error {
        tracing::error!(machine = %self.name, "segment {seq} is damaged: {err}");
        self.state.write().damaged.insert(seq, err.to_string());
        self.mended.lock().remove(&seq);
        self.list_damage(seq, &err.to_string());
        self.poison_with(&err);
        err
    }

    /// Add `seq` to the persisted damage list (failing to persist it is logged: the
    /// damage is still refused and reported in this process).
    pub(crate) fn list_damage(&self, seq: u64, what: &str) {
        let mut list = self.damage_list.lock();
        if list.add(seq, what) {
            if let Err(e) = list.save(self.storage.as_ref(), &self.dir) {
                tracing::error!(machine = %self.name, "cannot persist the damage list: {e}");
            }
        }
    }

    /// The newest `lost` segment and why, if any.
    pub(super) fn lost(st: &IndexState) -> Option<(u64, String)> {
        let seq = *st.lost.last()?;
        Some((seq, st.damaged.get(&seq).cloned().unwrap_or_default()))
    }
}

impl Machine {
    /// Whether a segment of this machine was found damaged (and is not mended yet).
    pub fn has_damage(&self) -> bool {
        !self.inner.state.read().damaged.is_empty()
    }

    /// The damaged segments recovery could read only up to the damage.
    pub fn lost_segments(&self) -> Vec<u64> {
        self.inner.state.read().lost.iter().copied().collect()
    }

    /// The damaged segments not mended yet, with what was found (for status).
    pub fn damage(&self) -> Vec<(u64, String)> {
        let st = self.inner.state.read();
        st.damaged.iter().map(|(s, w)| (*s, w.clone())).collect()
    }

    /// Whether the machine refuses writes (a failed write or sync, or damage found).
    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// A segment turned out damaged (the shipper's check before sending): its data is
    /// not served any more and the machine stops taking writes until it is mended.
    pub fn report_damage(&self, seq: u64, err: Error) -> Error {
        self.inner.damaged(seq, err)
    }

    /// Every range to rewrite to mend the damage. `replica_holds` is the newest segment
    /// the replica holds: a segment recovery could not read whole is mended from the
    /// replica if the replica holds it (every range whose newest verified data is in
    /// it or older, `uncertain`); otherwise the writes after its damage are lost and
    /// only the ranges it verifiably holds are rewritten. Other damaged segments give
    /// the ranges whose newest data lies in them, with the data where the segment's
    /// records still verify up to it.
    pub fn damaged_ranges(&self, replica_holds: u64) -> Result<Vec<DamagedRange>> {
        let inner = &self.inner;
        let st = inner.state.read();
        let mut out = Vec::new();
        let from_replica = st.lost.last().filter(|s| **s <= replica_holds).copied();
        if let Some(lost) = from_replica {
            for (d, map) in st.disks.iter().enumerate() {
                let size = inner.disks.get(d).map_or(0, |x| x.size);
                let mut at = 0u64;
                let mut gaps = Vec::new();
                for (start, e) in map.iter() {
                    if e.loc.segment() <= lost {
                        continue;
                    }
                    if start > at {
                        gaps.push((at, start));
                    }
                    at = at.max(start + e.len);
                }
                if at < size {
                    gaps.push((at, size));
                }
                for (mut from, to) in gaps {
                    while from < to {
                        let len = (to - from).min(LOST_PIECE);
                        out.push(DamagedRange {
                            seq: lost,
                            disk: d as u32,
                            offset: from,
                            len,
                            data: None,
                            uncertain: true,
                        });
                        from += len;
                    }
                }
            }
        }
        for &seq in st.damaged.keys() {
            if from_replica.is_some_and(|l| seq <= l) {
                continue; // every range of it is among the uncertain ones
            }
            let Some(file) = st.files.get(&seq) else {
                continue;
            };
            // Records wholly before the first fault still verify.
            let first_lsn = inner.sealed.lock().get(&seq).map(|g| g.first_lsn);
            let expect = Expect {
                machine_id: Some(inner.machine_id),
                seq: Some(seq),
                first_lsn,
                disk_count: Some(inner.disks.len() as u32),
            };
            let good_until =
                match crate::journal::reader::scan_segment(file.as_ref(), expect, |_| Ok(())) {
                    Ok(scan) => scan.fault.map_or(scan.end, |f| f.offset),
                    Err(_) => 0,
                };
            for (d, map) in st.disks.iter().enumerate() {
                for (start, e) in map.iter() {
                    if e.loc.segment() != seq {
                        continue;
                    }
                    let data = match e.loc {
                        Location::Segment { offset, .. } if offset + e.len <= good_until => {
                            let mut buf = vec![0u8; e.len as usize];
                            file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
                        }
                        _ => None,
                    };
                    out.push(DamagedRange {
                        seq,
                        disk: d as u32,
                        offset: start,
                        len: e.len,
                        data,
                        uncertain: false,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Mend damaged segments, one batch of ranges at a time: rewrite each range
    /// (`data` for every range [`Machine::damaged_ranges`] gave) as new writes — an
    /// uncertain range whole, any other only where it still reads from the damaged
    /// segment (a newer write wins). The machine takes writes again only after
    /// [`Machine::finish_mend`]. Refused if a write or sync failed too.
    pub fn mend(&self, ranges: &[(DamagedRange, Vec<u8>)]) -> Result<()> {
        let inner = &self.inner;
        if inner.poisoned_by_io.load(Ordering::Acquire) {
            return inner.check_poison();
        }
        let mut w = inner.writer.lock();
        let mut written = Vec::new();
        for (r, data) in ranges {
            if data.len() as u64 != r.len {
                return Err(Error::InvalidInput(format!(
                    "mend of {}+{} with {} bytes",
                    r.offset,
                    r.len,
                    data.len()
                )));
            }
            let mut pieces = Vec::new();
            if let Some(map) = inner.state.read().disks.get(r.disk as usize) {
                map.lookup(r.offset, r.len, &mut pieces);
            }
            for p in pieces {
                let here = p.loc.map(Location::segment);
                let stale = if r.uncertain {
                    here.is_none_or(|s| s <= r.seq)
                } else {
                    here == Some(r.seq)
                };
                if !stale {
                    continue;
                }
                let from = (p.start - r.offset) as usize;
                let piece = data.get(from..from + p.len as usize).unwrap_or(&[]);
                inner.append_locked(
                    &mut w,
                    r.disk,
                    RecordKind::Write,
                    p.start,
                    p.len,
                    piece,
                    false,
                )?;
                written.push((r.disk, p.start, p.len));
                if w.wants_rotation() {
                    inner.seal_locked(&mut w)?;
                }
            }
        }
        inner.mending.lock().extend(written);
        Ok(())
    }

    /// End a mend (`replica_holds` as given to [`Machine::damaged_ranges`]): check that
    /// nothing reads from damage any more, make the rewritten ranges durable, record the
    /// segments as mended in the damage list, and only then let the machine take writes
    /// again.
    pub fn finish_mend(&self, replica_holds: u64) -> Result<()> {
        let inner = &self.inner;
        if inner.poisoned_by_io.load(Ordering::Acquire) {
            return inner.check_poison();
        }
        let w = inner.writer.lock();
        {
            let st = inner.state.read();
            let from_replica = st.lost.last().filter(|s| **s <= replica_holds).copied();
            let mut still = None;
            for (d, m) in st.disks.iter().enumerate() {
                let size = inner.disks.get(d).map_or(0, |x| x.size);
                let mut at = 0u64;
                for (start, e) in m.iter() {
                    let seq = e.loc.segment();
                    // Nothing reads from a damaged segment; and after a lost segment
                    // mended from the replica, no range's newest data is that old.
                    let old = from_replica.is_some_and(|l| seq <= l || start > at);
                    if st.damaged.contains_key(&seq) || old {
                        still.get_or_insert((d, start.min(at)));
                    }
                    at = at.max(start + e.len);
                }
                if from_replica.is_some() && at < size {
                    still.get_or_insert((d, at));
                }
            }
            if let Some((d, at)) = still {
                return Err(Error::InvalidInput(format!(
                    "damaged ranges remain after mending (disk {d} at byte {at})"
                )));
            }
        }
        // Durable before the list says mended: from then on recovery drops the segment.
        let res = w.active_file().sync_data();
        if let Err(e) = res {
            return Err(inner.poison(&e));
        }
        let durable = w.last_lsn();
        {
            let mut sync = inner.sync.lock();
            sync.durable_lsn = sync.durable_lsn.max(durable);
        }
        let seqs: Vec<u64> = inner.state.read().damaged.keys().copied().collect();
        {
            let mut list = inner.damage_list.lock();
            for e in list.entries.iter_mut() {
                if seqs.contains(&e.seq) {
                    e.mended = true;
                }
            }
            list.save(inner.storage.as_ref(), &inner.dir)?;
        }
        {
            let mut st = inner.state.write();
            inner.mended.lock().extend(seqs.iter().copied());
            st.damaged.clear();
            st.lost.clear();
        }
        drop(w);
        let written = std::mem::take(&mut *inner.mending.lock());
        for (disk, at, len) in &written {
            let mut buf = vec![0u8; *len as usize];
            inner
                .read(*disk, *at, &mut buf, false)
                .and_then(|()| inner.update_digest(*disk, RecordKind::Write, *at, *len, &buf))
                .map_err(|e| inner.poison(&e))?;
        }
        // Only if nothing else poisoned it meanwhile (a failed sync, new damage).
        if inner.poisoned_by_io.load(Ordering::Acquire) || self.has_damage() {
            return inner.check_poison();
        }
        *inner.poison_reason.lock() = None;
        inner.poisoned.store(false, Ordering::Release);
        tracing::warn!(
            machine = %inner.name,
            "damaged segments {seqs:?} mended ({} ranges rewritten)",
            written.len()
        );
        inner.flush().map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn the_list_round_trips_and_refuses_what_it_never_writes() {
        let mut list = DamageList::default();
        assert!(list.add(7, "segment 7 is damaged at offset 100: bad CRC"));
        assert!(list.add(3, "x"));
        assert!(!list.add(7, "again"), "a second add changed the list");
        list.entries[0].mended = true;
        assert!(
            list.add(3, "found again"),
            "damage in a mended segment was ignored"
        );
        assert!(!list.entries[0].mended);
        let bytes = list.encode().unwrap();
        assert_eq!(DamageList::decode(&bytes).unwrap(), list);

        let out_of_order = DamageList {
            entries: vec![list.entries[1].clone(), list.entries[0].clone()],
        };
        assert!(DamageList::decode(&out_of_order.encode().unwrap()).is_err());
        let mut long = DamageList::default();
        long.add(1, &"é".repeat(MAX_WHAT));
        assert!(
            long.entries[0].what.len() <= MAX_WHAT,
            "add kept an overlong entry"
        );
        long.entries[0].what = "x".repeat(MAX_WHAT + 1);
        assert!(DamageList::decode(&long.encode().unwrap()).is_err());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(DamageList::decode(&flipped).is_err());
    }

    #[test]
    fn an_empty_list_leaves_no_file() {
        let mem = MemStorage::new();
        let dir = Path::new("/m");
        mem.create_dir_all(&dir.join(JOURNAL_DIR)).unwrap();
        let mut list = DamageList::default();
        list.add(2, "damaged");
        list.save(&mem, dir).unwrap();
        assert_eq!(DamageList::load(&mem, dir).unwrap(), list);
        DamageList::default().save(&mem, dir).unwrap();
        assert!(!mem.exists(&dir.join(JOURNAL_DIR).join(DAMAGE_FILE)));
        assert_eq!(DamageList::load(&mem, dir).unwrap(), DamageList::default());
    }
}
