//! Resynchronisation at the target: bring a replica whose chain broke back in line
//! with the source by comparing fixed-size chunks and taking only those that differ.
//!
//! ```text
//! begin   fold every segment that still verifies into the parent (stop at the first
//!         that does not), then persist resync.meta (base, chunk size, position 0);
//!         parent.meta says "resyncing": no point can be opened meanwhile
//! hashes  SHA-256 of chunks first..first+count of a disk, from the parent chunks
//! apply   the source's differing chunks of a batch, written as one patch file
//!         (encrypted data + index, temp + fsync + rename), then the new position,
//!         counters and patch count are persisted — an interrupted resync continues
//!         from there. Patches lie on top of the parent (readers map them like
//!         segments) until the target compactor folds them in
//! finish  remove every stored segment, set the received mark to the resync's base,
//!         set the parent mark (base, no point; points before `valid_from` are not
//!         consistent and are never offered), remove resync.meta
//! ```
//!
//! The source reads its chunks at various times after the base; its journal after the
//! base then ships as usual. Replaying those records over any such chunk gives the
//! source's state at every point from `valid_from` (a point the source appends after
//! its last read) on.

use super::pin;
use super::store::{hashes, ChunkEditor, ParentMark, ReplicaStore, CHUNK_BYTES};
use crate::chunk_hash::{check_chunk_bytes, hash_chunks, ChunkHash};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What an operator gave up with `replog accept-loss`: the job that records it and
/// the ranges.
#[derive(Debug, Clone)]
pub struct AcceptedLoss {
    pub job: crate::jobs::Job,
    pub ranges: Vec<GivenUp>,
}

/// One range a replica lists as lost: bytes `start..end` of disk `disk` (named
/// `name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GivenUp {
    pub disk: u32,
    pub name: String,
    pub start: u64,
    pub end: u64,
}

impl std::fmt::Display for GivenUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk {} ({}) bytes {}..{}",
            self.disk, self.name, self.start, self.end
        )
    }
}

/// Bytes in `ranges`.
pub fn bytes_of(ranges: &[GivenUp]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// The ranges a resync under way lists as lost in `store` (`dropped`), named: what
/// `replog accept-loss` would give up. Refused when no resync is under way (a list
/// left then is a crash's leftover, its chunks whole again) or none are listed.
pub fn listed_losses(store: &ReplicaStore) -> Result<Vec<GivenUp>> {
    let machine = store.machine();
    if !store.parent().resyncing {
        return Err(Error::InvalidInput(format!(
            "nothing to accept: no resync of {machine} is under way here (only a resync \
             that found the replica's own copy of a range damaged lists lost ranges)"
        )));
    }
    let ranges: Vec<GivenUp> = store
        .lost_ranges()?
        .into_iter()
        .map(|(disk, start, end)| GivenUp {
            disk,
            name: store
                .manifest()
                .disks
                .get(disk as usize)
                .map_or_else(|| "?".into(), |d| d.name.clone()),
            start,
            end,
        })
        .collect();
    if ranges.is_empty() {
        return Err(Error::InvalidInput(format!(
            "nothing to accept: the replica of {machine} lists no lost ranges (only a \
             resync that found the replica's own copy of a range damaged lists some)"
        )));
    }
    Ok(ranges)
}

/// Give up every range `store`'s resync lists as lost, at an operator's word, at the
/// target site `site`: the replica then serves them as its parent holds them —
/// zeroes where a damaged chunk was removed, older bytes where a fold stopped — so a
/// source mending damage of its own takes those wherever its resync asks, and the
/// comparison after it makes the replica equal to the source. The caller keeps every
/// other writer of the replica out (serve: the receiver's lock on its store; offline:
/// the site's lock); the merge lock keeps the target compactor out. Recorded as an
/// `accept-loss` job naming every range before anything changes; refused, changing
/// nothing (no job either), when [`listed_losses`] is.
pub fn accept_loss(site: &std::path::Path, store: &ReplicaStore) -> Result<AcceptedLoss> {
    let _lock = pin::merge_lock(store)?;
    let machine = store.machine();
    let ranges = listed_losses(store)?;
    let list = ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let bytes = bytes_of(&ranges);
    let mut job =
        crate::jobs::JobHandle::start(site, crate::jobs::JobKind::AcceptLoss, Some(machine))?;
    job.step("give up the ranges no copy is left of");
    job.progress(format!("giving up {bytes} bytes: {list}"));
    if let Err(e) = store.save_lost(&BTreeSet::new()) {
        job.fail(&e);
        return Err(e);
    }
    tracing::warn!(
        machine,
        "an operator gave up {bytes} bytes no copy of which was left: {list}"
    );
    job.step_done(Some(format!("{bytes} bytes given up: {list}")))?;
    let job = job.finish(|| {
        let left = store.lost_ranges()?;
        if left.is_empty() {
            Ok("the replica lists no lost ranges".into())
        } else {
            Err(Error::InvalidInput(format!(
                "the replica still lists {} lost range(s)",
                left.len()
            )))
        }
    })?;
    Ok(AcceptedLoss { job, ranges })
}

/// Where a resync stands (`resync.meta`, kind 7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// The source's chain continues after this LSN and segment once the resync ends.
    pub base_lsn: u64,
    pub base_seq: u64,
    /// Bytes per compared chunk.
    pub chunk_bytes: u64,
    /// Next chunk to compare: disk and chunk number.
    pub disk: u32,
    pub next: u64,
    /// Chunks compared, chunks taken from the source and their bytes, so far.
    pub compared: u64,
    pub sent_chunks: u64,
    pub sent_bytes: u64,
    /// Patch files written so far (each batch's chunks are one).
    pub patches: u64,
}

impl ResyncProgress {
    /// Version 1 is either layout development builds wrote under it: without
    /// `patches` (1f7c5c7 … b897280) or with it (7fb0b33 … f501a4c, the layout of
    /// version 2).
    pub(crate) fn decode_version(version: u16, body: &[u8]) -> Option<ResyncProgress> {
        use crate::format::meta::body_exact;
        if version >= 2 {
            return body_exact(body);
        }
        if let Some(p) = body_exact::<ResyncProgress>(body) {
            return Some(p);
        }
        #[derive(Deserialize)]
        struct NoPatches {
            base_lsn: u64,
            base_seq: u64,
            chunk_bytes: u64,
            disk: u32,
            next: u64,
            compared: u64,
            sent_chunks: u64,
            sent_bytes: u64,
        }
        body_exact::<NoPatches>(body).map(|p| ResyncProgress {
            base_lsn: p.base_lsn,
            base_seq: p.base_seq,
            chunk_bytes: p.chunk_bytes,
            disk: p.disk,
            next: p.next,
            compared: p.compared,
            sent_chunks: p.sent_chunks,
            sent_bytes: p.sent_bytes,
            patches: 0,
        })
    }
}

const RESYNC: &str = "resync.meta";
const DROPPED: &str = "dropped";

/// The parts of `a..b` that no interval of `covered` covers, in order.
fn remaining(covered: &mut [(u64, u64)], a: u64, b: u64) -> Vec<(u64, u64)> {
    covered.sort_unstable();
    let mut out = Vec::new();
    let mut at = a;
    for &(x, y) in covered.iter() {
        if y <= at {
            continue;
        }
        if x >= b {
            break;
        }
        if x > at {
            out.push((at, x));
        }
        at = at.max(y);
        if at >= b {
            return out;
        }
    }
    if at < b {
        out.push((at, b));
    }
    out
}

impl ReplicaStore {
    /// Where a resync of this replica stands, if one is under way.
    pub fn resync_progress(&self) -> Result<Option<ResyncProgress>> {
        let kind = crate::format::meta::KIND_RESYNC;
        match self.read_meta_version(RESYNC, kind)? {
            None => Ok(None),
            Some((v, body)) => ResyncProgress::decode_version(v, &body)
                .map(Some)
                .ok_or_else(|| {
                    Error::corruption(
                        self.locate(RESYNC),
                        crate::format::meta::META_HEADER_LEN as u64,
                        format!("resync progress version {v} does not decode"),
                    )
                }),
        }
    }

    fn save_resync(&self, p: &ResyncProgress) -> Result<()> {
        self.write_meta(RESYNC, crate::format::meta::KIND_RESYNC, p)
    }

    /// Start (or resume) a resync toward the source's base. A resync under way with
    /// the same base and chunk size resumes where it stopped; otherwise the chain is
    /// folded into the parent and the comparison starts from the beginning.
    pub fn begin_resync(
        &mut self,
        base_lsn: u64,
        base_seq: u64,
        chunk_bytes: u64,
    ) -> Result<ResyncProgress> {
        check_chunk_bytes(chunk_bytes)?;
        if let Some(p) = self.resync_progress()? {
            if p.base_lsn == base_lsn && p.base_seq == base_seq && p.chunk_bytes == chunk_bytes {
                return Ok(p);
            }
        }
        let dir = self.dir();
        let lock = pin::merge_lock(self)?;
        self.refresh()?;
        if self.parent().merging_to.is_some() {
            return Err(Error::Busy(format!(
                "the target compactor is merging into the replica at {}; the resync waits",
                dir.display()
            )));
        }
        let readers = pin::live_pins(self, &lock)?;
        if !readers.is_empty() && !self.parent().resyncing {
            return Err(Error::Busy(format!(
                "{} reader(s) (restores or mounted point views) are using the replica at \
                 {}; the resync waits for them",
                readers.len(),
                dir.display()
            )));
        }
        // No resync is under way: a list of what one lost is a leftover of a crash
        // inside `finish_resync` (its chunks are whole again), not this resync's.
        if !self.parent().resyncing {
            self.save_lost(&BTreeSet::new())?;
        }
        // From here on no point can be opened: the parent is about to change in ways
        // no record explains.
        let mut mark = self.parent().clone();
        mark.resyncing = true;
        self.set_parent(mark)?;
        drop(lock);
        if self.damage()?.is_some() {
            self.drop_unreadable_chunks()?;
        }
        self.fold_chain()?;
        let p = ResyncProgress {
            base_lsn,
            base_seq,
            chunk_bytes,
            ..Default::default()
        };
        self.save_resync(&p)?;
        Ok(p)
    }

    /// Remove every parent chunk that does not authenticate (damage the scrub or a
    /// merge found): it reads as zeroes from now on, and the comparison that follows
    /// sends whatever of its bytes the source holds. The chunks are listed in
    /// `dropped` first, until the resync ends: their bytes are not the replica's to
    /// give back meanwhile (see [`Self::read_replica`]).
    fn drop_unreadable_chunks(&self) -> Result<()> {
        let mut bad = Vec::new();
        for (d, _) in self.manifest().disks.iter().enumerate() {
            let disk = d as u32;
            for n in self.stored_chunks(disk)? {
                match self.read_chunk(disk, n) {
                    Ok(_) => {}
                    Err(e) if e.is_corruption() => {
                        tracing::warn!(
                            "resync: parent chunk {n} of disk {disk} is damaged ({e}); removed"
                        );
                        bad.push((disk, n));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        let mut lost = self.lost_ranges()?;
        for (disk, n) in &bad {
            let (a, b) = (
                n * CHUNK_BYTES,
                ((n + 1) * CHUNK_BYTES).min(self.disk_size(*disk)?),
            );
            if a < b {
                lost.insert((*disk, a, b));
            }
        }
        self.save_lost(&lost)?;
        for (disk, n) in bad {
            self.remove_chunk(disk, n)?;
        }
        Ok(())
    }

    fn save_lost(&self, lost: &BTreeSet<(u32, u64, u64)>) -> Result<()> {
        if lost.is_empty() {
            return self.backend().delete(&[self.key_of(DROPPED)]);
        }
        let text: String = lost
            .iter()
            .map(|(d, a, b)| format!("{d} {a} {b}\n"))
            .collect();
        self.backend().put(&self.key_of(DROPPED), text.as_bytes())
    }

    /// What this resync lost of the replica's own bytes: the ranges of the parent
    /// chunks it dropped as damaged that no record folded in since has rewritten
    /// (`dropped`: a line "disk start end" each), until the resync ends.
    pub fn lost_ranges(&self) -> Result<BTreeSet<(u32, u64, u64)>> {
        let Some(b) = self.backend().get(&self.key_of(DROPPED))? else {
            return Ok(BTreeSet::new());
        };
        String::from_utf8_lossy(&b)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Vec<Option<u64>> = l.split_whitespace().map(|x| x.parse().ok()).collect();
                match v.as_slice() {
                    [Some(d), Some(a), Some(b)] if *d <= u64::from(u32::MAX) && a < b => {
                        Ok((*d as u32, *a, *b))
                    }
                    _ => Err(Error::corruption(
                        self.locate(DROPPED),
                        0,
                        format!("{l:?} is not a line \"disk start end\""),
                    )),
                }
            })
            .collect()
    }

    /// Merge every stored segment after the parent that still reads and verifies into
    /// the parent, in order; stop at the first that does not (what follows is lost
    /// anyway and the comparison will fetch it).
    fn fold_chain(&mut self) -> Result<()> {
        let from = self.parent().seq;
        let old_patches = self.parent().patches;
        let mut ed = ChunkEditor::new(self);
        // What the folded records rewrite is no longer lost (see `lost_ranges`).
        let mut folded: Vec<(u32, u64, u64)> = Vec::new();
        let mut note = |index: &super::store::SegmentIndex| {
            folded.extend(
                index
                    .records
                    .iter()
                    .map(|r| (r.disk, r.offset, r.offset + r.length)),
            );
        };
        // An earlier resync's patches first (no reader is pinned: checked above). One
        // that does not authenticate is left out: the comparison brings its bytes back.
        for n in 1..=old_patches {
            match self.layer(super::store::PATCH_SEQ + n) {
                Ok((index, plain)) => {
                    ed.apply_layer(&index, &plain)?;
                    note(&index);
                }
                Err(e) if e.is_corruption() => {
                    tracing::warn!("resync: patch {n} is damaged ({e}); left out")
                }
                Err(e) => return Err(e),
            }
        }
        let mut last = None;
        let received = self.received().segment_seq;
        let mut stopped_at = None;
        for seq in from + 1..=received {
            let (index, plain) = match self.layer(seq) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("resync: segment {seq} is not usable ({e}); folding stops");
                    stopped_at = Some(seq);
                    break;
                }
            };
            ed.apply_layer(&index, &plain)?;
            note(&index);
            last = Some((index.last_lsn, seq));
        }
        ed.finish()?;
        // Where the fold stopped, the parent holds older bytes than the replica
        // received for every range a segment from there on wrote: a fetch of them
        // (a source mending its own damage) would get those older bytes as the
        // mended data. They are lost here until a patch brings them back.
        let unfolded = match stopped_at {
            Some(seq) => self.written_by(seq, received)?,
            None => BTreeSet::new(),
        };
        let lost = self.lost_ranges()?;
        if !lost.is_empty() || !unfolded.is_empty() {
            let mut left = BTreeSet::new();
            for (d, a, b) in lost {
                let mut covered: Vec<(u64, u64)> = folded
                    .iter()
                    .filter(|(fd, _, _)| *fd == d)
                    .map(|(_, x, y)| (*x, *y))
                    .collect();
                left.extend(
                    remaining(&mut covered, a, b)
                        .into_iter()
                        .map(|(x, y)| (d, x, y)),
                );
            }
            left.extend(unfolded);
            self.save_lost(&coalesce(left))?;
        }
        let (lsn, seq) = last.unwrap_or((self.parent().lsn, self.parent().seq));
        self.set_parent(ParentMark {
            lsn,
            seq,
            point: None,
            merging_to: None,
            resyncing: true,
            valid_from: 0,
            patches: 0,
        })?;
        self.remove_patches()
    }

    /// The ranges the stored segments `from..=to` wrote, from their indexes; every
    /// disk whole if one of them cannot say (its index and its data do not read).
    fn written_by(&self, from: u64, to: u64) -> Result<BTreeSet<(u32, u64, u64)>> {
        let mut out = BTreeSet::new();
        for seq in from..=to {
            match self.segment_index(seq) {
                Ok(index) => out.extend(
                    index
                        .records
                        .iter()
                        .filter(|r| r.length > 0)
                        .map(|r| (r.disk, r.offset, r.offset + r.length)),
                ),
                Err(e) if e.is_corruption() => {
                    tracing::warn!(
                        "resync: what segment {seq} wrote cannot be read ({e}); the \
                         replica's every byte is lost until the resync brings it back"
                    );
                    return self
                        .manifest()
                        .disks
                        .iter()
                        .enumerate()
                        .map(|(d, _)| Ok((d as u32, 0, self.disk_size(d as u32)?)))
                        .collect();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The hashes (`algo`) of chunks `first..first+count` of `disk` as the replica
    /// parent holds them: from the hash pages for 4 KiB chunks and BLAKE3 (see
    /// `store::hashes`), else read and hashed.
    pub fn resync_hashes(
        &self,
        chunk_bytes: u64,
        disk: u32,
        first: u64,
        count: u64,
        algo: ChunkHash,
    ) -> Result<Vec<[u8; 32]>> {
        check_chunk_bytes(chunk_bytes)?;
        let size = self.disk_size(disk)?;
        if (chunk_bytes, algo) == (hashes::PIECE, hashes::ALGO) {
            let end = first.saturating_add(count).min(size.div_ceil(chunk_bytes));
            if first >= end {
                return Ok(Vec::new());
            }
            let per = CHUNK_BYTES / chunk_bytes;
            let (from, to) = (first / per, end.div_ceil(per));
            let all: Vec<[u8; 32]> = self
                .parent_piece_hashes(disk, from, to)?
                .into_iter()
                .flatten()
                .collect();
            let skip = (first - from * per) as usize;
            return all
                .get(skip..skip + (end - first) as usize)
                .map(<[_]>::to_vec)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "hash pages gave {} hashes for chunks {first}..{end} of disk {disk}",
                        all.len()
                    ))
                });
        }
        hash_chunks(
            size,
            chunk_bytes,
            first,
            count,
            &|at, buf| self.read_parent(disk, at, buf),
            algo,
        )
    }

    /// Read `buf.len()` bytes of the parent of `disk` at `offset` (missing chunks are
    /// zeroes).
    pub fn read_parent(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        let mut chunk = Vec::new();
        let mut have: Option<u64> = None;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = at / CHUNK_BYTES;
            let within = (at % CHUNK_BYTES) as usize;
            let take = (buf.len() - done).min(CHUNK_BYTES as usize - within);
            let dst = buf.get_mut(done..done + take).unwrap_or(&mut []);
            if have != Some(n) {
                if !self.read_chunk_into(disk, n, &mut chunk)? {
                    chunk.clear();
                }
                have = Some(n);
            }
            match chunk.get(within..within + take) {
                Some(src) if !chunk.is_empty() => dst.copy_from_slice(src),
                _ => dst.fill(0),
            }
            done += take;
        }
        Ok(())
    }

    /// Read the replica's bytes at `offset` of `disk` as the parent and the patches
    /// written so far hold them (a range the source lost, mended from here). Bytes of
    /// a parent chunk this resync dropped as damaged, not since brought back by a
    /// patch, are lost here too: an error naming them, never zeroes.
    pub fn read_replica(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.disk_size(disk)?;
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= size);
        let Some(end) = end else {
            return Err(Error::OutOfRange {
                what: "fetch from the replica".into(),
                offset,
                end: offset.saturating_add(buf.len() as u64),
                size,
            });
        };
        self.read_parent(disk, offset, buf)?;
        let patches = match self.resync_progress()? {
            Some(p) => p.patches,
            None => self.parent().patches,
        };
        let mut patched = Vec::new();
        for n in 1..=patches {
            let index = self.patch_index(n)?;
            let mut plain = None;
            for r in index.records.iter().filter(|r| r.disk == disk) {
                let (a, b) = (r.offset.max(offset), (r.offset + r.length).min(end));
                if a >= b {
                    continue;
                }
                if plain.is_none() {
                    plain = Some(self.read_layer(super::store::PATCH_SEQ + n)?);
                }
                let src_at = (r.payload_at + (a - r.offset)) as usize;
                let len = (b - a) as usize;
                match (
                    plain.as_ref().and_then(|p| p.get(src_at..src_at + len)),
                    buf.get_mut((a - offset) as usize..(a - offset) as usize + len),
                ) {
                    (Some(src), Some(dst)) => {
                        dst.copy_from_slice(src);
                        patched.push((a, b));
                    }
                    _ => {
                        return Err(Error::corruption(
                            self.dir(),
                            r.payload_at,
                            format!(
                                "patch {n}'s record at disk offset {} runs past its data",
                                r.offset
                            ),
                        ))
                    }
                }
            }
        }
        for (d, a, b) in self.lost_ranges()? {
            let (a, b) = (a.max(offset), b.min(end));
            if d != disk || a >= b {
                continue;
            }
            if let Some((x, y)) = remaining(&mut patched, a, b).first() {
                return Err(Error::Lost(format!(
                    "disk {disk} bytes {x}..{y}: the replica lost them too (the parent chunk \
                     holding them did not authenticate and was dropped when this resync \
                     began, see {}); no copy of them is left here — `replog accept-loss` \
                     for {} at the target site gives them up (they then read as zeroes)",
                    self.locate(DROPPED).display(),
                    self.machine()
                )));
            }
        }
        Ok(())
    }

    /// Apply the source's chunks of one batch and persist the new position.
    pub fn apply_resync(
        &mut self,
        chunks: &[(u32, u64, Vec<u8>)],
        progress: ResyncProgress,
    ) -> Result<()> {
        let Some(cur) = self.resync_progress()? else {
            return Err(Error::InvalidInput("no resync is under way".into()));
        };
        if (progress.base_lsn, progress.base_seq, progress.chunk_bytes)
            != (cur.base_lsn, cur.base_seq, cur.chunk_bytes)
        {
            return Err(Error::InvalidInput(
                "resync batch for another resync".into(),
            ));
        }
        // The chunks become one patch file (written once, not merged into 256 KiB
        // parent chunks now: the compactor folds patches in later, off the resync's
        // path).
        let mut progress = ResyncProgress {
            patches: cur.patches,
            ..progress
        };
        if !chunks.is_empty() {
            progress.patches = cur.patches + 1;
            self.write_patch(progress.patches, chunks)?;
        }
        self.save_resync(&progress)
    }

    /// The resync is complete: the replica's chain continues after the base; points
    /// before `valid_from` are never offered.
    pub fn finish_resync(&mut self, valid_from: u64) -> Result<()> {
        let Some(p) = self.resync_progress()? else {
            return Err(Error::InvalidInput("no resync is under way".into()));
        };
        if let Some(oldest) = self.oldest_stored_segment()? {
            let newest = self.received().segment_seq.max(oldest);
            self.remove_segments(oldest, newest)?;
        }
        self.set_received(crate::format::meta::Watermark {
            lsn: p.base_lsn,
            segment_seq: p.base_seq,
        })?;
        self.set_parent(ParentMark {
            lsn: p.base_lsn,
            seq: p.base_seq,
            point: None,
            merging_to: None,
            resyncing: false,
            valid_from,
            patches: p.patches,
        })?;
        self.clear_damage()?;
        self.backend()
            .delete(&[self.key_of(DROPPED), self.key_of(RESYNC)])?;
        tracing::info!(
            "replica: resynchronised ({} of {} chunks taken, {} bytes); chain continues after LSN {}",
            p.sent_chunks,
            p.compared,
            p.sent_bytes,
            p.base_lsn
        );
        Ok(())
    }
}

/// `ranges` (disk, start, end) with the overlapping and touching ones of a disk made
/// one.
fn coalesce(ranges: BTreeSet<(u32, u64, u64)>) -> BTreeSet<(u32, u64, u64)> {
    let mut out: Vec<(u32, u64, u64)> = Vec::new();
    for (d, a, b) in ranges {
        match out.last_mut() {
            Some((ld, _, lb)) if *ld == d && a <= *lb => *lb = (*lb).max(b),
            _ => out.push((d, a, b)),
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::format::meta::DiskEntry;
    use crate::replica::backend::{DirBackend, ReplicaBackend};
    use crate::replica::crypt::ReplicaKey;
    use crate::replica::store::{ReplicaManifest, Replicas};
    use crate::storage::MemStorage;
    use std::sync::Arc;

    #[test]
    fn a_dropped_chunk_is_lost_until_a_patch_brings_it_back_and_the_list_ends_with_the_resync() {
        let backend: Arc<dyn ReplicaBackend> =
            Arc::new(DirBackend::new(Arc::new(MemStorage::new()), "/r"));
        let manifest = ReplicaManifest {
            source_site: [1u8; 32],
            machine_id: 5,
            disks: vec![DiskEntry {
                id: 0,
                name: "os".into(),
                size: 2 * CHUNK_BYTES,
            }],
            base_lsn: 0,
            base_seq: 0,
            generation: 1,
        };
        let mut s = Replicas::new(backend.clone(), ReplicaKey::from_bytes([4u8; 32]))
            .create("vm1", manifest, Default::default())
            .unwrap();
        let mut ed = ChunkEditor::new(&s);
        ed.write(0, 0, &vec![7u8; 2 * CHUNK_BYTES as usize])
            .unwrap();
        ed.finish().unwrap();
        // A leftover list (a crash inside an earlier finish) does not outlive a new
        // resync's start.
        backend.put("vm1/dropped", b"0 0 4096\n").unwrap();
        // Chunk 0 rots; the scrub's finding is recorded.
        let key = "vm1/parent/0/0000000000.enc";
        let mut c = backend.get(key).unwrap().unwrap();
        let at = c.len() - 5;
        c[at] ^= 1;
        backend.put(key, &c).unwrap();
        s.mark_damaged("parent chunk 0 does not authenticate")
            .unwrap();
        let p = s.begin_resync(0, 0, 4096).unwrap();
        assert_eq!(
            s.lost_ranges().unwrap(),
            BTreeSet::from([(0, 0, CHUNK_BYTES)])
        );
        let mut buf = vec![0u8; 4096];
        let e = s.read_replica(0, 8192, &mut buf).unwrap_err();
        assert!(matches!(e, Error::Lost(_)), "{e}");
        assert!(e.to_string().contains("bytes 8192..12288"), "{e}");
        s.read_replica(0, CHUNK_BYTES, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 4096], "chunk 1 is whole");
        // A patch brings 4096..12288 back from the source: those bytes are served;
        // the rest of the chunk is not.
        s.apply_resync(&[(0, 4096, vec![9u8; 8192])], p).unwrap();
        s.read_replica(0, 8192, &mut buf).unwrap();
        assert_eq!(buf, vec![9u8; 4096]);
        let mut two = vec![0u8; 8192];
        let e = s.read_replica(0, 0, &mut two).unwrap_err();
        assert!(e.to_string().contains("bytes 0..4096"), "{e}");
        let e = s.read_replica(0, 8192, &mut two).unwrap_err();
        assert!(e.to_string().contains("bytes 12288..16384"), "{e}");
        // The resync ends: the list goes with it.
        s.finish_resync(1).unwrap();
        assert!(s.lost_ranges().unwrap().is_empty());
        assert_eq!(backend.get("vm1/dropped").unwrap(), None);
    }

    #[test]
    fn touching_and_overlapping_ranges_of_a_disk_are_made_one() {
        let c = coalesce(BTreeSet::from([
            (0, 10, 20),
            (0, 20, 30),
            (0, 25, 28),
            (0, 40, 50),
            (1, 0, 5),
            (1, 5, 6),
        ]));
        assert_eq!(c, BTreeSet::from([(0, 10, 30), (0, 40, 50), (1, 0, 6)]));
    }

    #[test]
    fn the_uncovered_parts_of_a_range_are_found() {
        assert_eq!(remaining(&mut [], 10, 20), vec![(10, 20)]);
        assert_eq!(remaining(&mut [(0, 30)], 10, 20), vec![]);
        assert_eq!(
            remaining(&mut [(15, 18), (0, 12)], 10, 20),
            vec![(12, 15), (18, 20)]
        );
        assert_eq!(
            remaining(&mut [(12, 15), (0, 12), (15, 20)], 10, 20),
            vec![]
        );
        assert_eq!(remaining(&mut [(10, 14)], 10, 20), vec![(14, 20)]);
        assert_eq!(remaining(&mut [(14, 25)], 10, 20), vec![(10, 14)]);
        assert_eq!(remaining(&mut [(21, 30), (0, 5)], 10, 20), vec![(10, 20)]);
        assert_eq!(
            remaining(&mut [(11, 12), (11, 13), (16, 17)], 10, 20),
            vec![(10, 11), (13, 16), (17, 20)]
        );
    }
}
