//! Spare segment files: merged segments kept to be written again, so that the journal
//! appends into blocks that are already written.
//!
//! Why: an append to a new segment file extends it (or writes into blocks
//! preallocated but not yet written), so every `fdatasync` of the active segment
//! also writes the inode (its size, its extents). An overwrite of written blocks is
//! data only. Measured with fio on this project's machines (4 KiB writes, an
//! fdatasync each): 6.2–6.7 k IOPS appending or writing into preallocated blocks,
//! 12.9–13.0 k IOPS overwriting written ones.
//!
//! How:
//! - The compactor, instead of removing a merged segment, offers it
//!   ([`Spares::offer`]): it is renamed to `<seq>.spare` in the journal directory and
//!   kept while the sealed segments and the spares together stay within the
//!   journal's budget (`journal.compact_min_bytes`, the size the journal may reach
//!   before a merge anyway: so spares never make the journal's directory larger than
//!   it may grow), at most [`MAX_SPARES`] of them, and while the file system keeps
//!   [`MIN_FREE_BYTES`] free. Small segments are removed ([`MIN_SPARE_BYTES`]), and
//!   segments that were damaged are never kept.
//! - A new segment takes a spare if one is free ([`Spares::take`]: no one else holds
//!   its file, so no reader of the merged segment can see it rewritten). See
//!   `reuse`: the old footer zeroed, the file cut to a 4 KiB multiple before it and
//!   its new last 4 KiB zeroed (so whatever length a crash leaves, it cannot end in a
//!   footer), the new segment's header written with the RECYCLED bit and a fresh salt
//!   (see `format::segment`) and made durable, and only then renamed to the
//!   segment's name. A crash before the rename leaves a spare, after it a segment
//!   whose header is right.
//! - Bytes after the last record of a recycled segment are an earlier segment's:
//!   its records, and payloads that are a guest's data (which may look like records,
//!   with any LSN). The segment's records' CRCs are seeded with its salt
//!   ([`new_salt`], random, chosen after every byte in the spare was written), so
//!   nothing there verifies: a scan stops at them as it stops at a torn tail. The
//!   seal cuts them off before it writes the footer, so a sealed segment ends in its
//!   footer as always.
//! - Spares are kept across a restart: recovery takes back the ones an earlier run
//!   left ([`Spares::adopt`]) within the same budget (`JournalParams::spare_budget`,
//!   the configured `compact_min_bytes`, counted against the sealed segments it
//!   found) and removes the rest. Without that, every restart began with new files,
//!   each fdatasync of them writing the inode, until the compactor had merged a
//!   budget's worth of segments again.

use super::ZERO_PAGE;
use crate::error::{Error, Result};
use crate::format::FOOTER_LEN;
use crate::storage::{Storage, StorageFile};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// At most this many spares per journal.
pub const MAX_SPARES: usize = 16;
/// No spare is kept while the file system has less than this free.
pub const MIN_FREE_BYTES: u64 = 1 << 30;
/// Segments smaller than this (or than half a full segment, if that is less) are
/// removed, not kept: reusing one costs an fdatasync and a rename, more than a new
/// file, and a small one saves little.
pub const MIN_SPARE_BYTES: u64 = 64 << 10;
/// The name suffix of spare files.
pub const SPARE_SUFFIX: &str = ".spare";

/// A spare file taken for a new segment.
#[derive(Debug)]
pub struct Spare {
    pub file: Arc<dyn StorageFile>,
    pub path: PathBuf,
    /// Written bytes to keep: the file is cut to this before reuse.
    pub len: u64,
}

/// The spares of one journal directory, shared by its writer and its compactor.
#[derive(Debug, Clone)]
pub struct Spares {
    kept: Arc<Mutex<Vec<Spare>>>,
    min_bytes: u64,
    budget: Arc<AtomicU64>,
}

impl Spares {
    /// Spares for a journal of `segment_bytes` segments, with a budget of two
    /// segments until [`Spares::allow`] raises it.
    pub fn new(segment_bytes: u64) -> Self {
        Spares {
            kept: Arc::new(Mutex::new(Vec::new())),
            min_bytes: MIN_SPARE_BYTES.min(segment_bytes / 2).max(4096),
            budget: Arc::new(AtomicU64::new(segment_bytes.saturating_mul(2))),
        }
    }

    /// Let sealed segments and spares take `bytes` together (the background
    /// compactor's `compact_min_bytes`: the journal may hold that much before a merge
    /// anyway).
    pub fn allow(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// Whether one more spare of `len` kept bytes may join `kept`: worth keeping
    /// (not too small), at most [`MAX_SPARES`], and the sealed segments and the
    /// spares together within `budget`. The rule both [`Spares::offer`] and
    /// [`Spares::adopt`] keep spares by.
    fn admits(&self, kept: &[Spare], len: u64, sealed_bytes: u64, budget: u64) -> bool {
        let kept_bytes: u64 = kept.iter().map(|s| s.len).sum();
        len >= self.min_bytes
            && kept.len() < MAX_SPARES
            && sealed_bytes.saturating_add(kept_bytes).saturating_add(len) <= budget
    }

    /// Keep the merged segment `file` of `bytes` bytes (named `<seq>.seg` in `dir`)
    /// as a spare, while `sealed_bytes` are still in the journal's sealed segments.
    /// True if it was renamed to a spare name (the caller must not remove it); false
    /// if the caller should remove it. The rename is durable after a `sync_dir` of
    /// `dir`, as a removal would be.
    pub fn offer(
        &self,
        storage: &dyn Storage,
        dir: &Path,
        seq: u64,
        file: &Arc<dyn StorageFile>,
        bytes: u64,
        sealed_bytes: u64,
    ) -> Result<bool> {
        let len = kept_len(bytes);
        let room = storage.free_bytes(dir).is_none_or(|f| f >= MIN_FREE_BYTES);
        let mut spares = self.kept.lock();
        let budget = self.budget.load(Ordering::Relaxed);
        if !room || !self.admits(&spares, len, sealed_bytes, budget) {
            return Ok(false);
        }
        let path = dir.join(format!("{seq:020}{SPARE_SUFFIX}"));
        if !storage.rename_noreplace(file.path(), &path)? {
            return Ok(false);
        }
        spares.push(Spare {
            file: file.clone(),
            path,
            len,
        });
        Ok(true)
    }

    /// Take back the spare files an earlier run left in `dir` (`paths`, from
    /// [`leftovers`]), newest first, by the rule [`Spares::offer`] keeps them by
    /// (`admits`, with `sealed_bytes` of sealed segments and `budget`), and only while
    /// the file system has [`MIN_FREE_BYTES`] free. The rest are removed; returns how
    /// many, and the caller syncs `dir` if any were.
    ///
    /// Whatever state a crash left a spare in (its old footer, cut or not, a new
    /// header written but not yet renamed: see `reuse`), it is only ever written
    /// again the way `reuse` writes one: cut to a 4 KiB multiple before its last
    /// footer's bytes, its new last 4 KiB zeroed, a fresh salt chosen after all of
    /// it was written. So its contents never matter, only that they are written blocks.
    pub fn adopt(
        &self,
        storage: &dyn Storage,
        dir: &Path,
        paths: Vec<PathBuf>,
        sealed_bytes: u64,
        budget: u64,
    ) -> Result<usize> {
        let room = storage.free_bytes(dir).is_none_or(|f| f >= MIN_FREE_BYTES);
        let mut spares = self.kept.lock();
        let mut removed = 0;
        for path in paths.into_iter().rev() {
            // One that cannot be opened (or measured) is removed, as every spare
            // was before they were kept: it must not keep the machine from opening.
            let opened = storage
                .open(&path, crate::storage::OpenMode::ReadWrite)
                .and_then(|f| f.len().map(|n| (f, n)));
            let Ok((file, flen)) = opened else {
                storage.remove_file(&path)?;
                removed += 1;
                continue;
            };
            let len = kept_len(flen);
            if room && self.admits(&spares, len, sealed_bytes, budget) {
                spares.push(Spare { file, path, len });
            } else {
                drop(file);
                storage.remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The largest spare that nobody else holds a handle to (a reader that looked up
    /// the merged segment before it was merged may still be reading it).
    pub fn take(&self) -> Option<Spare> {
        let mut spares = self.kept.lock();
        let i = spares
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| Arc::get_mut(&mut s.file).map(|_| (i, s.len)))
            .max_by_key(|(_, len)| *len)
            .map(|(i, _)| i)?;
        Some(spares.swap_remove(i))
    }

    /// How many spares are kept (for tests and status).
    pub fn count(&self) -> usize {
        self.kept.lock().len()
    }

    /// The bytes kept in spares (for status: the disk they take).
    pub fn bytes(&self) -> u64 {
        self.kept.lock().iter().map(|s| s.len).sum()
    }
}

/// The bytes of a spare file of `bytes` bytes that reuse keeps: up to the 4 KiB
/// boundary before its last footer's bytes (see [`Spare::len`]).
fn kept_len(bytes: u64) -> u64 {
    bytes.saturating_sub(FOOTER_LEN as u64) & !4095
}

/// The spare files an earlier run left in `dir`, oldest first.
pub fn leftovers(storage: &dyn Storage, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = storage
        .list_dir(dir)?
        .into_iter()
        .filter(|n| is_spare_name(n))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// True for a name this module gives spares (`<20 digits>.spare`).
pub fn is_spare_name(name: &str) -> bool {
    name.strip_suffix(SPARE_SUFFIX)
        .is_some_and(|d| d.len() == 20 && d.bytes().all(|c| c.is_ascii_digit()))
}

/// A random, non-zero salt for a recycled segment's record CRCs.
pub fn new_salt() -> Result<u32> {
    loop {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)
            .map_err(|e| Error::InvalidInput(format!("no random salt for a segment: {e}")))?;
        let salt = u32::from_le_bytes(b);
        if salt != 0 {
            return Ok(salt);
        }
    }
}

/// Make `spare` the segment file at `path`, starting with `header`: zero its old
/// footer, cut it, zero its new last 4 KiB, write the header, fdatasync, rename,
/// sync the directory. Returns the file opened at its new name. Nothing is renamed
/// unless the header is durable. Whichever length a crash leaves, the file cannot
/// end in what reads as a footer: the old one is zeroes, and the bytes before the
/// new end were a guest's.
pub(super) fn reuse(
    storage: &dyn Storage,
    dir: &Path,
    spare: Spare,
    path: &Path,
    header: &[u8],
) -> Result<Arc<dyn StorageFile>> {
    let old = spare.file.len()?;
    if old >= spare.len + FOOTER_LEN as u64 {
        spare
            .file
            .write_at(&[&ZERO_PAGE[..FOOTER_LEN]], old - FOOTER_LEN as u64)?;
    }
    spare.file.set_len(spare.len)?;
    let last = spare.len.saturating_sub(4096);
    spare
        .file
        .write_at(&[&ZERO_PAGE[..(spare.len - last) as usize]], last)?;
    spare.file.write_at(&[header], 0)?;
    spare.file.sync_data()?;
    if !storage.rename_noreplace(&spare.path, path)? {
        return Err(Error::corruption(
            path,
            0,
            "a segment file of this number exists already",
        ));
    }
    storage.sync_dir(dir)?;
    drop(spare.file);
    storage.open(path, crate::storage::OpenMode::ReadWrite)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::format::{RecordHeader, RecordKind};
    use crate::journal::reader::{scan_segment, Expect};
    use crate::journal::{recover, JournalParams, JournalWriter, SealedSegment};
    use crate::storage::{CrashMode, FaultyStorage, MemStorage, OpenMode};

    const SEGMENT: u64 = 64 << 10;

    fn dir() -> PathBuf {
        PathBuf::from("/m/journal")
    }

    fn params(watermark_lsn: u64, watermark_seq: u64) -> JournalParams {
        JournalParams {
            machine_id: 7,
            disk_count: 1,
            segment_bytes: SEGMENT,
            watermark_lsn,
            watermark_seq,
            generation: 1,
            spare_budget: 0,
        }
    }

    /// Payload of the record with `lsn`: 3000 bytes that name it.
    fn payload(lsn: u64) -> Vec<u8> {
        (0..3000u64)
            .map(|i| (lsn.wrapping_mul(31).wrapping_add(i) % 251) as u8)
            .collect()
    }

    fn append(w: &mut JournalWriter) -> u64 {
        let lsn = w.next_lsn();
        w.append(
            RecordKind::Write,
            0,
            0,
            lsn * 4096 % (1 << 20),
            3000,
            &payload(lsn),
        )
        .unwrap();
        lsn
    }

    /// Fill and seal segments until one is full; return it.
    fn fill_and_seal(w: &mut JournalWriter) -> SealedSegment {
        while !w.wants_rotation() {
            append(w);
        }
        w.seal().unwrap().unwrap()
    }

    fn header_of(file: &Arc<dyn StorageFile>) -> crate::format::SegmentHeader {
        let mut b = [0u8; crate::format::SEGMENT_HEADER_LEN];
        file.read_exact_at(&mut b, 0).unwrap();
        crate::format::SegmentHeader::decode(&b).unwrap()
    }

    /// Fill and seal a segment and offer it as a spare, as the compactor does after
    /// merging it: the watermark it leaves (last LSN, segment number).
    fn merge_into_a_spare(shared: &dyn Storage, w: &mut JournalWriter) -> (u64, u64) {
        let first = fill_and_seal(w);
        assert!(w
            .spares()
            .offer(shared, &dir(), first.seq, &first.file, first.bytes, 0)
            .unwrap());
        let mark = (first.last_lsn, first.seq);
        drop(first);
        shared.sync_dir(&dir()).unwrap();
        mark
    }

    /// A journal whose active segment is a recycled file: segment 1 filled, merged
    /// (watermark) and offered as a spare, segment 2 sealed, segment 3 written into
    /// the spare. Returns the storage, the writer and the watermark.
    fn recycled_journal() -> (FaultyStorage, JournalWriter, (u64, u64)) {
        let storage = FaultyStorage::new();
        storage.create_dir_all(&dir()).unwrap();
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let mut w = recover(shared.clone(), &dir(), params(0, 0), |_, _| {})
            .unwrap()
            .writer;
        let mark = merge_into_a_spare(shared.as_ref(), &mut w);
        let spares = w.spares();
        assert_eq!(
            storage.list_dir(&dir()).unwrap()[0],
            format!("{:020}.spare", 1)
        );
        append(&mut w);
        w.seal().unwrap().unwrap();
        assert_eq!(spares.count(), 0, "segment 3 took the spare");
        assert_eq!(w.active_seq(), 3);
        (storage, w, mark)
    }

    /// DropAll, KeepAll and `Tear(1)` to `Tear(tears - 1)`: the power losses the
    /// crash tests go through.
    fn crash_modes(tears: u64) -> impl Iterator<Item = CrashMode> {
        [CrashMode::DropAll, CrashMode::KeepAll]
            .into_iter()
            .chain((1..tears).map(CrashMode::Tear))
    }

    /// Recover the journal with `params` (after its watermark): the LSNs of the
    /// records it read (each payload checked), and what it found.
    fn recover_lsns(
        storage: &FaultyStorage,
        params: JournalParams,
        mode: CrashMode,
    ) -> (Vec<u64>, crate::journal::Recovered) {
        let mut seen = Vec::new();
        let r = recover(Arc::new(storage.clone()), &dir(), params, |_, rec| {
            assert_eq!(rec.payload, &payload(rec.header.lsn)[..], "{mode:?}");
            seen.push(rec.header.lsn);
        })
        .unwrap();
        (seen, r)
    }

    const ANY: Expect = Expect {
        machine_id: None,
        seq: None,
        first_lsn: None,
        disk_count: None,
    };

    /// A power loss while a recycled segment is sealed — its stale tail cut and its
    /// footer written, neither synced: either, both or none may survive (the cut
    /// lost with the footer kept leaves a footer with the earlier segment's bytes
    /// after it) — and recovery finds exactly the records, every one of them synced
    /// by the seal's first sync, and never one of the earlier segment's.
    #[test]
    fn a_power_loss_in_a_recycled_segments_seal_keeps_exactly_its_records() {
        for mode in crash_modes(40) {
            let (storage, mut w, (mark_lsn, mark_seq)) = recycled_journal();
            let last = (0..3).map(|_| append(&mut w)).last().unwrap();
            // The seal's first sync goes through; the one after the cut and the
            // footer does not (the power went).
            storage.fail_sync_after(1, true);
            assert!(w.seal().is_err(), "{mode:?}: the seal's last sync failed");
            drop(w);
            storage.crash(mode);

            let (seen, r) = recover_lsns(&storage, params(mark_lsn, mark_seq), mode);
            let first = mark_lsn + 1;
            assert_eq!(
                seen,
                (first..=last).collect::<Vec<_>>(),
                "{mode:?}: {:?}",
                r.repairs
            );
            assert!(r.damaged.is_empty(), "{mode:?}");
        }
    }

    /// Leftover spares are kept, newest first, only while the sealed segments
    /// recovery found and they fit in the budget, at most [`MAX_SPARES`], none too
    /// small to be worth it (an empty one, one of a page); the rest are removed.
    #[test]
    fn leftover_spares_are_kept_only_within_the_budget_beside_the_sealed_segments() {
        let storage = MemStorage::new();
        storage.create_dir_all(&dir()).unwrap();
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let name = |n: u64| format!("{n:020}{SPARE_SUFFIX}");
        let leave = |n: u64, len: usize| {
            let f = shared
                .open(&dir().join(name(n)), OpenMode::CreateNew)
                .unwrap();
            f.write_at(&[&vec![0x5a; len]], 0).unwrap();
        };
        let spares_left = || {
            let mut v = storage.list_dir(&dir()).unwrap();
            v.retain(|n| is_spare_name(n));
            v
        };
        let budget = |bytes: u64| JournalParams {
            spare_budget: bytes,
            ..params(0, 0)
        };
        let mut w = recover(shared.clone(), &dir(), params(0, 0), |_, _| {})
            .unwrap()
            .writer;
        let sealed: u64 = (0..2).map(|_| fill_and_seal(&mut w).bytes).sum();
        let active = w.active_seq();
        drop(w);
        // Full ones, then (newer) one of a page and an empty one.
        for n in 100..118 {
            leave(n, SEGMENT as usize + 100);
        }
        leave(118, 4100);
        leave(119, 0);
        // Room for two beside the sealed segments.
        let r = recover(
            shared.clone(),
            &dir(),
            budget(sealed + 2 * SEGMENT),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(spares_left(), vec![name(116), name(117)]);
        assert_eq!(r.writer.spares().count(), 2);
        assert_eq!(r.writer.active_seq(), active, "the active segment is kept");
        drop(r);
        // Room for all of them: at most MAX_SPARES.
        for n in 100..116 {
            leave(n, SEGMENT as usize + 100);
        }
        let r = recover(shared, &dir(), budget(1 << 40), |_, _| {}).unwrap();
        let want: Vec<String> = (102..118).map(name).collect();
        assert_eq!(spares_left(), want);
        assert_eq!(r.writer.spares().count(), MAX_SPARES);
    }

    /// A power loss anywhere in a rotation into a spare (the old footer zeroed, the
    /// cut, the new header, its sync, the rename, the directory's sync), then a
    /// recovery that takes back the spares it finds: exactly the synced records, never
    /// one of the spare's own; and the journal goes on, written into an adopted spare,
    /// and recovers exactly again after another power loss.
    #[test]
    fn a_power_loss_while_reusing_a_spare_then_adopting_it_keeps_exactly_the_records() {
        let modes: Vec<CrashMode> = crash_modes(20).collect();
        let with_budget = |mark: (u64, u64)| JournalParams {
            spare_budget: 8 * SEGMENT,
            ..params(mark.0, mark.1)
        };
        let (mut adopted, mut recycled) = (0, 0);
        for fail_at in 0..6 {
            for &mode in &modes {
                let storage = FaultyStorage::new();
                storage.create_dir_all(&dir()).unwrap();
                let shared: Arc<dyn Storage> = Arc::new(storage.clone());
                let mut w = recover(shared.clone(), &dir(), with_budget((0, 0)), |_, _| {})
                    .unwrap()
                    .writer;
                let mark = merge_into_a_spare(shared.as_ref(), &mut w);
                // Segment 2 full, every record of it synced; its seal rotates into
                // the spare, and the power goes at one of the syncs on the way.
                let mut last = mark.0;
                while !w.wants_rotation() {
                    last = append(&mut w);
                }
                w.active_file().sync_data().unwrap();
                storage.fail_sync_after(fail_at, true);
                let _ = w.seal();
                drop(w);
                storage.crash(mode);

                let (seen, r) = recover_lsns(&storage, with_budget(mark), mode);
                let want: Vec<u64> = (mark.0 + 1..=last).collect();
                assert_eq!(seen, want, "{fail_at} {mode:?}: {:?}", r.repairs);
                adopted += r.writer.spares().count();

                // On from there: a full segment (into the spare, if one was kept),
                // three records synced, and the power goes again.
                let mut w = r.writer;
                let mut last = fill_and_seal(&mut w).last_lsn;
                recycled += usize::from(header_of(&w.active_file()).is_recycled());
                for _ in 0..3 {
                    last = append(&mut w);
                }
                w.active_file().sync_data().unwrap();
                drop(w);
                storage.crash(mode);
                let (seen, r) = recover_lsns(&storage, with_budget(mark), mode);
                let want: Vec<u64> = (mark.0 + 1..=last).collect();
                assert_eq!(seen, want, "{fail_at} {mode:?}, again: {:?}", r.repairs);
                assert!(r.damaged.is_empty(), "{fail_at} {mode:?}");
            }
        }
        assert!(adopted > 0, "no power loss left a spare to take back");
        assert!(recycled > 0, "no adopted spare was written into");
    }

    #[test]
    fn a_recycled_segment_recovers_exactly_its_records_after_any_crash() {
        for mode in crash_modes(40) {
            let (storage, mut w, (mark_lsn, mark_seq)) = recycled_journal();
            let file = w.active_file();
            let header = crate::format::SegmentHeader::decode(&{
                let mut b = [0u8; crate::format::SEGMENT_HEADER_LEN];
                file.read_exact_at(&mut b, 0).unwrap();
                b
            })
            .unwrap();
            assert!(header.is_recycled());
            assert!(
                file.len().unwrap() > w.active_bytes() + 8000,
                "the earlier segment's records follow"
            );
            // Three synced records, then three that may or may not survive.
            let synced: Vec<u64> = (0..3).map(|_| append(&mut w)).collect();
            file.sync_data().unwrap();
            let last = (0..3).map(|_| append(&mut w)).last().unwrap();
            drop((w, file));
            storage.crash(mode);

            let (seen, r) = recover_lsns(&storage, params(mark_lsn, mark_seq), mode);
            // Segment 2's record, then a prefix of segment 3's that holds every
            // synced one: never an earlier segment's record.
            let first = mark_lsn + 1;
            assert_eq!(seen, (first..first + seen.len() as u64).collect::<Vec<_>>());
            assert!(seen.contains(synced.last().unwrap()), "{mode:?}: {seen:?}");
            assert!(*seen.last().unwrap() <= last);
            if mode == CrashMode::KeepAll {
                assert_eq!(*seen.last().unwrap(), last);
            }
            assert!(
                r.repairs.iter().any(|n| n.contains("recycled segment")),
                "{mode:?}: {:?}",
                r.repairs
            );
            assert!(r.damaged.is_empty());
            // The cut segment goes on and seals cleanly.
            let mut w = r.writer;
            append(&mut w);
            let sealed = w.seal().unwrap().unwrap();
            let scan = scan_segment(sealed.file.as_ref(), ANY, |_| Ok(())).unwrap();
            assert!(scan.is_sealed(), "{mode:?}: {:?}", scan.fault);
        }
    }

    #[test]
    fn an_append_into_a_recycled_file_writes_its_last_page_whole() {
        let (_storage, mut w, _) = recycled_journal();
        let file = w.active_file();
        for _ in 0..3 {
            append(&mut w);
            let tail = w.active_bytes();
            let boundary = tail.div_ceil(4096) * 4096;
            let mut after = vec![0xffu8; (boundary - tail) as usize];
            file.read_exact_at(&mut after, tail).unwrap();
            assert!(
                after.iter().all(|b| *b == 0),
                "zeroes from {tail} to {boundary}"
            );
            let mut next = [0u8; 64];
            file.read_exact_at(&mut next, boundary).unwrap();
            assert!(
                next.iter().any(|b| *b != 0),
                "the earlier segment's bytes follow"
            );
        }
    }

    #[test]
    fn a_sealed_recycled_segment_ends_in_its_footer() {
        let (_storage, mut w, _) = recycled_journal();
        for _ in 0..4 {
            append(&mut w);
        }
        let sealed = w.seal().unwrap().unwrap();
        assert_eq!(sealed.file.len().unwrap(), sealed.bytes);
        let scan = scan_segment(sealed.file.as_ref(), ANY, |_| Ok(())).unwrap();
        assert!(scan.is_sealed(), "{:?}", scan.fault);
        assert_eq!(scan.records, 4);
        // A full recycled segment goes past the spare's length and seals too.
        let sealed = fill_and_seal(&mut w);
        let scan = scan_segment(sealed.file.as_ref(), ANY, |_| Ok(())).unwrap();
        assert!(scan.is_sealed(), "{:?}", scan.fault);
    }

    #[test]
    fn a_spare_still_read_is_not_taken_and_leftovers_are_kept_within_the_budget_at_recovery() {
        let storage = MemStorage::new();
        storage.create_dir_all(&dir()).unwrap();
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let spares = Spares::new(SEGMENT);
        let file = |n: u64, len: u64| {
            let p = dir().join(crate::format::segment::segment_name(n));
            let f = shared.open(&p, OpenMode::CreateNew).unwrap();
            f.set_len(len).unwrap();
            f
        };
        // Too small: refused, the caller removes it.
        let small = file(1, 4000);
        assert!(!spares
            .offer(shared.as_ref(), &dir(), 1, &small, 4000, 0)
            .unwrap());
        shared.remove_file(small.path()).unwrap();
        // A reader still holds the file: kept, but not taken until it lets go.
        let a = file(2, 40_000);
        assert!(spares
            .offer(shared.as_ref(), &dir(), 2, &a, 40_000, 0)
            .unwrap());
        assert!(spares.take().is_none(), "a reader holds it");
        drop(a);
        let taken = spares.take().unwrap();
        assert_eq!(taken.len, (40_000 - FOOTER_LEN as u64) & !4095);
        // Spares and sealed segments stay within the budget: two segments by
        // default, the compactor's allowance once raised.
        let offer = |n: u64, sealed: u64| {
            let f = file(n, SEGMENT + 100);
            let kept = spares
                .offer(shared.as_ref(), &dir(), n, &f, SEGMENT + 100, sealed)
                .unwrap();
            if !kept {
                // As the compactor does.
                shared.remove_file(f.path()).unwrap();
            }
            kept
        };
        assert!(
            !offer(3, SEGMENT + 100),
            "the sealed segments fill the budget"
        );
        assert!(offer(4, 0));
        assert!(offer(5, 0));
        assert!(!offer(6, 0), "two segments kept fill the default budget");
        spares.allow(1 << 30);
        let more = (7..7 + MAX_SPARES as u64).filter(|n| offer(*n, 0)).count();
        assert_eq!(spares.count(), MAX_SPARES);
        assert_eq!(more, MAX_SPARES - 2);
        let names = storage.list_dir(&dir()).unwrap();
        assert_eq!(names.len(), MAX_SPARES + 1, "{names:?}"); // and the one taken
        assert!(names.iter().all(|n| is_spare_name(n)), "{names:?}");
        // Recovery keeps, newest first, what fits in its budget (three segments
        // here) and removes the rest: the older spares and the one taken above, left
        // unused. The journal holds no segment, so the one recovery makes is written
        // into one of the three.
        drop((taken, spares));
        let budget = JournalParams {
            spare_budget: 3 * SEGMENT,
            ..params(0, 0)
        };
        let r = recover(shared.clone(), &dir(), budget, |_, _| {}).unwrap();
        let mut names = storage.list_dir(&dir()).unwrap();
        names.retain(|n| is_spare_name(n));
        let newest: Vec<String> = (18..=20)
            .map(|n| format!("{n:020}{SPARE_SUFFIX}"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| newest.contains(n)), "{names:?}");
        let mut w = r.writer;
        assert_eq!(w.active_seq(), 1);
        assert!(header_of(&w.active_file()).is_recycled());
        assert_eq!(w.spares().count(), 2);
        assert_eq!(w.spares().bytes(), 2 * SEGMENT);
        // The next segment is written into another.
        fill_and_seal(&mut w);
        assert_eq!(w.active_seq(), 2);
        assert!(header_of(&w.active_file()).is_recycled());
        assert_eq!(w.spares().count(), 1);
        // With no budget (or the sealed segments filling it), every spare goes.
        drop(w);
        let r = recover(shared, &dir(), params(0, 0), |_, _| {}).unwrap();
        let names = storage.list_dir(&dir()).unwrap();
        assert!(names.iter().all(|n| !is_spare_name(n)), "{names:?}");
        assert_eq!(r.writer.spares().count(), 0);
    }

    /// The bytes after a recycled segment's records are an earlier segment's, and
    /// its payloads are a guest's: a record planted there, checksummed and carrying
    /// exactly the next LSN, must never be read as this segment's. Only a record
    /// salted with this segment's salt continues it (the control case).
    #[test]
    fn a_record_planted_after_a_recycled_segments_records_is_never_read() {
        for (what, own_salt, earlier_salt) in [
            ("unsalted (a guest's or a new file's)", false, 0u32),
            ("another segment's salt", false, 0x5eed_0001),
            ("this segment's own salt (control)", true, 0),
        ] {
            let (storage, mut w, (mark_lsn, mark_seq)) = recycled_journal();
            let file = w.active_file();
            let salt = header_of(&file).salt;
            assert_ne!(salt, 0);
            append(&mut w);
            let (at, next) = (w.active_bytes(), w.next_lsn());
            let data = [0xa5u8; 100];
            let h = RecordHeader::new(RecordKind::Write, 0, next, 0, 0, 100, &[&data])
                .salted(if own_salt { salt } else { earlier_salt });
            file.write_at(&[&h.encode(), &data], at).unwrap();
            file.sync_data().unwrap();
            drop((w, file));
            let mut seen = Vec::new();
            let r = recover(
                Arc::new(storage.clone()) as Arc<dyn Storage>,
                &dir(),
                params(mark_lsn, mark_seq),
                |_, rec| seen.push(rec.header.lsn),
            )
            .unwrap();
            assert_eq!(
                seen.contains(&next),
                own_salt,
                "{what}: {seen:?} {:?}",
                r.repairs
            );
        }
    }
}
