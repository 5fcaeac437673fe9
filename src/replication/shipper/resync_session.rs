//! Resynchronisation at the source: compare fixed-size chunks with the target's and
//! send only those that differ.
//!
//! A [`ResyncRun`] goes through its steps in order:
//!
//! 1. **base** — the end of the newest sealed segment (or the one an interrupted
//!    resync chose, if the journal still holds everything after it); the journal after
//!    it is held and the base persisted (`resync_schedule::SourceResync`), so a
//!    restarted source resumes the same resync;
//! 2. **start** — `ResyncStart`; the target answers where a resync with this base
//!    stopped (its position and counters are persisted there, per batch);
//! 3. **mend** — damage in this source's journal: every damaged range is rewritten,
//!    from the segment where its records verify, else fetched from the replica
//!    (`ResyncFetch`; those writes are lost, and counted);
//! 4. **compare** — per batch: our chunk hashes while the target computes its own, its
//!    1 MiB group hashes, the chunk hashes of the groups that differ (pipelined), the
//!    chunks that differ (LZ4), `ResyncBatchDone` once what was read is durable here;
//! 5. **finish** — a point after every read (`valid_from`: the replica's first
//!    consistent state), sealed so the next pass ships it; `ResyncDone`, whose `Ack`
//!    names the base.

use super::{Link, Shipper};
use crate::chunk_hash::{check_chunk_bytes, group_hashes, hash_chunks};
use crate::error::{Error, Result};
use crate::replication::protocol::Message;
use crate::replication::resync_schedule::SourceResync;
use crate::volume::{DamagedRange, Machine, Volume};

/// What one resync pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Chunks compared before this pass (a resync resumed).
    pub resumed_from: u64,
    /// Chunks compared and chunks (and their bytes) sent, over the whole resync
    /// (persisted at the target, so they carry over an interruption).
    pub compared: u64,
    pub sent_chunks: u64,
    pub sent_bytes: u64,
    /// Of those, what this pass did.
    pub compared_now: u64,
    pub sent_bytes_now: u64,
    /// Bytes of hashes received in this pass.
    pub hash_bytes_now: u64,
    /// The first consistent point after the resync.
    pub valid_from: u64,
    /// Bytes of damaged source ranges rewritten, and of those, taken from the replica
    /// because their records did not verify (those writes are lost).
    pub mended_bytes: u64,
    pub lost_bytes: u64,
}

/// Chunks per group hash: 1 MiB worth.
fn group_of(chunk_bytes: u64) -> u64 {
    ((1 << 20) / chunk_bytes).max(1)
}

/// The target's persisted position and counters (`ResyncState`).
#[derive(Debug, Clone, Copy)]
struct TargetState {
    disk: u32,
    next: u64,
    compared: u64,
    sent_chunks: u64,
    sent_bytes: u64,
}

fn target_state(link: &Link, m: Message) -> Result<TargetState> {
    match m {
        Message::ResyncState {
            disk,
            next,
            compared,
            sent_chunks,
            sent_bytes,
            ..
        } => Ok(TargetState {
            disk,
            next,
            compared,
            sent_chunks,
            sent_bytes,
        }),
        other => Err(link.unexpected("ResyncState", &other)),
    }
}

impl Shipper {
    /// Resynchronise the target's replica with `machine` by comparing chunks of
    /// `chunk_bytes` and sending the ones that differ; resumes a resync that was
    /// interrupted (same base, persisted at both ends). Writes go on meanwhile: the
    /// journal after the base ships as usual afterwards.
    pub fn resync_once(&mut self, machine: &Machine, chunk_bytes: u64) -> Result<ResyncReport> {
        self.resync_batched(
            machine,
            chunk_bytes,
            crate::replication::resync_schedule::BATCH_BYTES,
        )
    }

    /// [`Shipper::resync_once`] comparing `batch_bytes` of disk per round trip.
    pub fn resync_batched(
        &mut self,
        machine: &Machine,
        chunk_bytes: u64,
        batch_bytes: u64,
    ) -> Result<ResyncReport> {
        check_chunk_bytes(chunk_bytes)?;
        // At most as many hashes per request as the target answers.
        let batch_bytes = batch_bytes.clamp(
            chunk_bytes,
            chunk_bytes.saturating_mul(crate::replication::receiver::MAX_HASHES),
        );
        // The handshake first: with the target's copy not complete, the hold must stay
        // where the copy needs the parents (at the replica's base), not move to a
        // resync's base.
        let (link, p) = self.handshake(machine)?;
        if !p.initial_done {
            // Nothing to compare with yet: the initial copy (which the next pass
            // resumes) brings the replica along instead. Damage is mended from the
            // journal alone, if it can be.
            if machine.has_damage() {
                mend_locally(machine)?;
            }
            SourceResync::clear(&self.site, machine.name())?;
            return Ok(ResyncReport::default());
        }
        let base = self.resync_base(machine, chunk_bytes)?;
        let mut run = ResyncRun::start(self, link, machine, base, chunk_bytes)?;
        run.mend_damage(p.seq)?;
        run.compare(batch_bytes)?;
        let report = run.finish()?;
        self.acked_lsn = base.0;
        Ok(report)
    }

    /// Step 1: choose (or keep) the base, hold the journal after it, persist it.
    fn resync_base(&mut self, machine: &Machine, chunk_bytes: u64) -> Result<(u64, u64)> {
        let mut state = SourceResync::load(&self.site, machine.name())?.unwrap_or_default();
        // A base from an interrupted resync stays if the journal still holds
        // everything after it.
        let base = match state.base {
            Some((lsn, seq))
                if state.chunk_bytes == chunk_bytes
                    && machine.status().watermark.lsn <= lsn
                    && machine
                        .sealed_segments()
                        .first()
                        .is_none_or(|g| g.seq <= seq + 1) =>
            {
                (lsn, seq)
            }
            _ => {
                // The end of the newest sealed segment (writes may go on meanwhile: they
                // land in the next segment, which ships afterwards). A machine stopped
                // by damage cannot seal; its sealed segments are what there is.
                if !machine.is_poisoned() {
                    machine.seal()?;
                }
                match machine.sealed_segments().last() {
                    Some(g) => (g.last_lsn, g.seq),
                    None => {
                        let w = machine.status().watermark;
                        (w.lsn, w.segment_seq)
                    }
                }
            }
        };
        // Keep every segment after the base until the target acknowledges it.
        self.hold.set(base.0);
        state.base = Some(base);
        state.chunk_bytes = chunk_bytes;
        state.save(&self.site, machine.name())?;
        Ok(base)
    }
}

/// Mend damage with no replica to take data from (its initial copy is not complete):
/// a segment recovery could read only up to the damage keeps its verified records
/// (what was written after the damage is lost, logged); a range whose only copy is in
/// the unreadable part of a segment cannot be mended, and the machine stays stopped
/// saying so.
fn mend_locally(machine: &Machine) -> Result<()> {
    let ranges = machine.damaged_ranges(0)?;
    let mut batch = Vec::new();
    for r in ranges {
        match r.data.clone() {
            Some(d) => batch.push((r, d)),
            None => {
                return Err(Error::corruption(
                    format!("segment {}", r.seq),
                    0,
                    format!(
                        "disk {} bytes {}..{} are in the damaged part of segment {} and the \
                         replica's initial copy is not complete: they cannot be mended \
                         until it is",
                        r.disk,
                        r.offset,
                        r.offset + r.len,
                        r.seq
                    ),
                ))
            }
        }
    }
    for seq in machine.lost_segments() {
        tracing::warn!(
            machine = machine.name(),
            "segment {seq} never reached the replica: whatever was written after its damage \
             is lost"
        );
    }
    machine.mend(&batch)?;
    machine.finish_mend(0)
}

/// One resync pass, from `ResyncStart` to the `Ack` of `ResyncDone`.
struct ResyncRun<'a> {
    shipper: &'a Shipper,
    link: Link,
    machine: &'a Machine,
    name: String,
    base: (u64, u64),
    chunk_bytes: u64,
    /// Where the target says to go on: disk and chunk.
    resume: (u32, u64),
    /// Totals over the whole resync (carried over an interruption by the target).
    compared: u64,
    sent_chunks: u64,
    sent_bytes: u64,
    report: ResyncReport,
}

impl<'a> ResyncRun<'a> {
    /// Step 2: tell the target; learn where it stands.
    fn start(
        shipper: &'a Shipper,
        mut link: Link,
        machine: &'a Machine,
        base: (u64, u64),
        chunk_bytes: u64,
    ) -> Result<Self> {
        let name = machine.name().to_string();
        link.send(&Message::ResyncStart {
            machine: name.clone(),
            generation: machine.generation(),
            base_lsn: base.0,
            base_seq: base.1,
            chunk_bytes,
        })?;
        let answer = link.recv()?;
        let st = target_state(&link, answer)?;
        Ok(ResyncRun {
            shipper,
            link,
            machine,
            name,
            base,
            chunk_bytes,
            resume: (st.disk, st.next),
            compared: st.compared,
            sent_chunks: st.sent_chunks,
            sent_bytes: st.sent_bytes,
            report: ResyncReport {
                resumed_from: st.compared,
                ..Default::default()
            },
        })
    }

    /// Step 3: rewrite every range still reading from a damaged segment
    /// (`replica_holds`: the newest segment the target holds), in batches of at most
    /// `MEND_BATCH` bytes.
    fn mend_damage(&mut self, replica_holds: u64) -> Result<()> {
        const MEND_BATCH: u64 = 64 << 20;
        let damaged = self.machine.damaged_ranges(replica_holds)?;
        if damaged.is_empty() && !self.machine.has_damage() {
            return Ok(());
        }
        let lost_before: Vec<(u64, String)> = {
            let lost = self.machine.lost_segments();
            self.machine
                .damage()
                .into_iter()
                .filter(|(s, _)| lost.contains(s))
                .collect()
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        let mut uncertain = 0u64;
        for r in damaged {
            let data = match &r.data {
                Some(d) => d.clone(),
                None => {
                    let data = self.fetch_from_replica(&r)?;
                    if r.uncertain {
                        uncertain += r.len;
                    } else {
                        tracing::warn!(
                            machine = %self.name,
                            "disk {} bytes {}..{}: the writes in damaged segment {} are \
                             lost; taken from the replica",
                            r.disk,
                            r.offset,
                            r.offset + r.len,
                            r.seq
                        );
                        self.report.lost_bytes += r.len;
                    }
                    data
                }
            };
            self.report.mended_bytes += r.len;
            batch_bytes += r.len;
            batch.push((r, data));
            if batch_bytes >= MEND_BATCH {
                self.machine.mend(&batch)?;
                batch.clear();
                batch_bytes = 0;
            }
        }
        self.machine.mend(&batch)?;
        if uncertain > 0 {
            tracing::warn!(
                machine = %self.name,
                "{uncertain} bytes whose newest data may lie past damage recovery found \
                 were taken from the replica, which holds the damaged segments"
            );
        }
        for (seq, what) in lost_before {
            if seq > replica_holds {
                tracing::warn!(
                    machine = %self.name,
                    "segment {seq} never reached the replica: whatever was written after \
                     its damage is lost ({what})"
                );
            }
        }
        self.machine.finish_mend(replica_holds)?;
        // Points carry digests again (reading the disks failed while damaged).
        if let Err(e) = self.machine.keep_digests() {
            tracing::warn!(machine = %self.name, "digests after mending: {e}");
        }
        // Merge past the mended segment soon (merges skip it).
        if let Err(e) = self.machine.compact() {
            tracing::warn!(machine = %self.name, "merge after mending: {e}");
        }
        Ok(())
    }

    /// The replica's bytes of a damaged range, in pieces of at most 4 MiB.
    fn fetch_from_replica(&mut self, r: &DamagedRange) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(r.len as usize);
        let mut at = r.offset;
        while at < r.offset + r.len {
            let n = (r.offset + r.len - at).min(4 << 20);
            self.link.send(&Message::ResyncFetch {
                machine: self.name.clone(),
                disk: r.disk,
                offset: at,
                len: n,
            })?;
            let bytes = match self.link.recv()? {
                Message::ResyncData { bytes, .. } => bytes,
                other => return Err(self.link.unexpected("ResyncData", &other)),
            };
            // The size prefix decides the allocation: check it first.
            let claimed = bytes
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .unwrap_or(u32::MAX);
            let wrong_size = || {
                Error::protocol(
                    self.shipper.target(),
                    "the target sent a range of another size",
                )
            };
            if u64::from(claimed) != n {
                return Err(wrong_size());
            }
            let d = crate::format::lz4_unpack(&bytes, n as usize)
                .map_err(|e| Error::protocol(self.shipper.target(), e))?;
            if d.len() as u64 != n {
                return Err(wrong_size());
            }
            out.extend_from_slice(&d);
            at += n;
        }
        Ok(out)
    }

    /// Step 4: every disk from where the target stands, batch by batch.
    fn compare(&mut self, batch_bytes: u64) -> Result<()> {
        let disks = self.machine.disks();
        let total_chunks: u64 = disks
            .iter()
            .map(|(_, sz)| sz.div_ceil(self.chunk_bytes))
            .sum();
        let group = group_of(self.chunk_bytes);
        let batch = (batch_bytes / self.chunk_bytes).max(group) / group * group;
        for (d, (dname, size)) in disks.iter().enumerate() {
            let d = d as u32;
            if d < self.resume.0 {
                continue;
            }
            let vol = self.machine.volume(dname)?;
            let chunks = size.div_ceil(self.chunk_bytes);
            let mut c = if d == self.resume.0 { self.resume.1 } else { 0 };
            while c < chunks {
                self.shipper.stopping()?;
                let count = batch.min(chunks - c);
                self.compare_batch(&vol, d, *size, c, count, group)?;
                c += count;
                if let Some(sink) = &self.shipper.resync_counters {
                    sink(crate::protection::status::ResyncCounters {
                        resumed_from: self.report.resumed_from,
                        chunks_compared: self.compared,
                        chunks_total: total_chunks,
                        chunks_sent: self.sent_chunks,
                        bytes_sent: self.sent_bytes,
                    });
                }
                if let Some(progress) = &self.shipper.progress {
                    progress(self.compared.min(total_chunks), total_chunks);
                }
            }
        }
        Ok(())
    }

    /// One batch: chunks `c..c+count` of disk `d`.
    fn compare_batch(
        &mut self,
        vol: &Volume,
        d: u32,
        size: u64,
        c: u64,
        count: u64,
        group: u64,
    ) -> Result<()> {
        let chunk_bytes = self.chunk_bytes;
        // Our hashes while the target computes its own.
        let read = |at: u64, buf: &mut [u8]| vol.read(at, buf);
        let algo = crate::replication::protocol::chunk_hash_for(self.link.peer_features());
        let (ours, theirs) = std::thread::scope(|sc| -> Result<_> {
            let h = sc.spawn(move || hash_chunks(size, chunk_bytes, c, count, &read, algo));
            self.link.send(&Message::ResyncHashRequest {
                machine: self.name.clone(),
                disk: d,
                first: c,
                count,
                group,
            })?;
            let theirs = match self.link.recv()? {
                Message::ResyncHashes { hashes, .. } => hashes,
                other => return Err(self.link.unexpected("ResyncHashes", &other)),
            };
            let ours = h
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidInput("hashing panicked".into())))?;
            Ok((ours, theirs))
        })?;
        self.report.hash_bytes_now += 32 * theirs.len() as u64;
        let our_groups = group_hashes(&ours, group as usize, algo);
        if our_groups.len() != theirs.len() {
            return Err(Error::protocol(
                self.shipper.target(),
                format!(
                    "the target sent {} group hashes for {} chunks",
                    theirs.len(),
                    ours.len()
                ),
            ));
        }
        // The groups that differ: ask for all their chunk hashes at once (the answers
        // come back in order), then send the chunks that differ.
        let differing: Vec<u64> = our_groups
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(g, _)| c + g as u64 * group)
            .collect();
        for (k, &g0) in differing.iter().enumerate() {
            let m = Message::ResyncHashRequest {
                machine: self.name.clone(),
                disk: d,
                first: g0,
                count: group.min(c + count - g0),
                group: 1,
            };
            if k + 1 == differing.len() {
                self.link.send(&m)?;
            } else {
                self.link.send_more(&m)?;
            }
        }
        let mut data = vec![0u8; chunk_bytes as usize];
        for &g0 in &differing {
            let gn = group.min(c + count - g0);
            let detail = match self.link.recv()? {
                Message::ResyncHashes { hashes, first, .. }
                    if hashes.len() as u64 == gn && first == g0 =>
                {
                    hashes
                }
                other => {
                    return Err(self
                        .link
                        .unexpected(&format!("{gn} chunk hashes from {g0}"), &other))
                }
            };
            self.report.hash_bytes_now += 32 * gn;
            for (k, theirs) in detail.iter().enumerate() {
                let i = g0 + k as u64;
                if ours.get((i - c) as usize) == Some(theirs) {
                    continue;
                }
                let at = i * chunk_bytes;
                let len = chunk_bytes.min(size - at) as usize;
                let buf = data.get_mut(..len).unwrap_or(&mut []);
                vol.read(at, buf)?;
                let (compressed, bytes) = super::pack(buf);
                self.report.sent_bytes_now += bytes.len() as u64;
                self.sent_bytes += bytes.len() as u64;
                self.sent_chunks += 1;
                // Flushed with the batch's end.
                let head = Message::ResyncChunk {
                    machine: self.name.clone(),
                    disk: d,
                    offset: at,
                    compressed,
                    bytes: Vec::new(),
                };
                self.link.send_payload(&head, &bytes, false)?;
            }
        }
        self.compared += count;
        self.report.compared_now += count;
        // What was read must be durable here before the target keeps it: a crash
        // could otherwise take back a write the replica already has.
        self.machine.flush()?;
        self.link.send(&Message::ResyncBatchDone {
            machine: self.name.clone(),
            disk: d,
            next: c + count,
            compared: self.compared,
            sent_chunks: self.sent_chunks,
            sent_bytes: self.sent_bytes,
        })?;
        // The target persisted the batch before it answered.
        let m = self.link.recv()?;
        target_state(&self.link, m)?;
        Ok(())
    }

    /// Step 5: the first consistent point, `ResyncDone`, the base acknowledged.
    fn finish(mut self) -> Result<ResyncReport> {
        // A point after every read: the first consistent state of the replica; sealed,
        // so the next pass ships it.
        let valid_from = self.machine.point(false)?.lsn;
        self.machine.seal()?;
        self.link.send(&Message::ResyncDone {
            machine: self.name.clone(),
            valid_from,
        })?;
        match self.link.recv()? {
            Message::Ack { lsn, .. } if lsn == self.base.0 => {}
            other => {
                return Err(self.link.unexpected(
                    &format!("the Ack of the resync at LSN {}", self.base.0),
                    &other,
                ))
            }
        }
        SourceResync::clear(self.shipper.site(), &self.name)?;
        self.report.compared = self.compared;
        self.report.sent_chunks = self.sent_chunks;
        self.report.sent_bytes = self.sent_bytes;
        self.report.valid_from = valid_from;
        Ok(self.report)
    }
}
