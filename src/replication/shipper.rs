//! The source side of replication: ship a machine's sealed segments to its target,
//! in order, and move the watermark hold to what the target acknowledged — only then
//! may the compactor merge (and delete) a segment.
//!
//! A pass first finishes initial replication if the target says it is not done
//! (copying the parents frozen at the replica's base, resuming where the target's
//! persisted position says), then ships every sealed segment the target lacks.

use super::protocol::{read_frame, write_frame, ErrorCode, FrameError, Message, MAX_CHUNK};
use super::receiver::software;
use super::transport::{self, ClientStream};
use crate::compactor::WatermarkHold;
use crate::error::{Error, Result};
use crate::identity::SiteId;
use crate::volume::Machine;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Ships one machine to one target.
pub struct Shipper {
    site: PathBuf,
    target: String,
    /// Keeps every segment the target has not acknowledged.
    hold: WatermarkHold,
    acked_lsn: u64,
    progress: Option<Box<Progress>>,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// What the target keeps: (every point, app-consistent points), in ms.
    retention: (u64, u64),
    /// Where a resync reports its counters as it goes (status shows them).
    resync_counters:
        Option<std::sync::Arc<parking_lot::Mutex<crate::replication::health::ResyncCounters>>>,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Shipper(to {}, acked LSN {})",
            self.target, self.acked_lsn
        )
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipReport {
    pub segments: usize,
    pub bytes: u64,
    pub acked_lsn: u64,
    /// Bytes of parent data sent by initial replication in this pass.
    pub initial_bytes: u64,
    /// Initial replication finished in this pass.
    pub initial_completed: bool,
}

/// What the target answered to Protect.
struct Protected {
    lsn: u64,
    seq: u64,
    initial_done: bool,
    resume: (u32, u64),
    diverged: Option<String>,
    /// The source's watermark announced in Protect.
    base: crate::format::meta::Watermark,
}

/// Called with (bytes of the disks scanned, total bytes of the disks).
pub type Progress = dyn Fn(u64, u64) + Send + Sync;

fn send(s: &mut ClientStream, m: &Message) -> Result<()> {
    send_opt(s, m, true)
}

/// Send without flushing (more follows at once; the last one flushes).
fn send_more(s: &mut ClientStream, m: &Message) -> Result<()> {
    send_opt(s, m, false)
}

fn send_opt(s: &mut ClientStream, m: &Message, flush: bool) -> Result<()> {
    let sent = write_frame(s, m)
        .map_err(|e| match e {
            FrameError::Io(io) => Error::io("send to", PathBuf::from("target"), io),
            other => Error::InvalidInput(format!("sending: {other}")),
        })
        .and_then(|()| {
            if !flush {
                return Ok(());
            }
            s.flush()
                .map_err(|e| Error::io("send to", PathBuf::from("target"), e))
        });
    match sent {
        // The target may have refused something and closed: its Error frame, if it
        // got here, says why (and whether to retry) better than the broken pipe.
        Err(e @ Error::Io { .. }) => match recv(s) {
            Err(refusal @ (Error::BrokenChain(_) | Error::InvalidInput(_))) => Err(refusal),
            _ => Err(e),
        },
        other => other,
    }
}

fn recv(s: &mut ClientStream) -> Result<Message> {
    match read_frame::<Message>(s) {
        Ok(Message::Error { code, message }) => Err(match code {
            ErrorCode::BrokenChain => Error::BrokenChain(format!("target: {message}")),
            _ => Error::InvalidInput(format!("target refused ({code:?}): {message}")),
        }),
        Ok(m) => Ok(m),
        // A cut connection is a network failure (retried), not a protocol one.
        Err(FrameError::Io(io)) => Err(Error::io("receive from", PathBuf::from("target"), io)),
        Err(e) => Err(Error::InvalidInput(format!("target: {e}"))),
    }
}

impl Shipper {
    /// Start shipping `machine` from `site` to the target at `target`. From now on the
    /// compactor keeps every segment the target has not acknowledged.
    pub fn new(site: &Path, machine: &Machine, target: &str) -> Shipper {
        // Points from now on carry digests (a no-op when the machine keeps them). What
        // the journal holds from before is sealed and merged into the parents (as far
        // as holds allow: a machine already protected has one at what the target
        // lacks), so the initial copy covers it and every point shipped has digests.
        let fresh = !machine.keeps_digests();
        if let Err(e) = machine.keep_digests() {
            tracing::error!(machine = machine.name(), "digests: {e}");
        }
        if fresh {
            if let Err(e) = machine.seal().and_then(|_| machine.compact()) {
                tracing::warn!(machine = machine.name(), "merge before protection: {e}");
            }
        }
        let base = machine.status().watermark.lsn;
        Shipper {
            site: site.to_path_buf(),
            target: target.to_string(),
            hold: machine.hold_watermark(base),
            acked_lsn: base,
            progress: None,
            stop: None,
            retention: {
                let r = crate::replica::store::Retention::default();
                (r.window_ms, r.app_window_ms)
            },
            resync_counters: None,
        }
    }

    /// Keep `c` current with a resync's counters as it goes.
    pub fn report_resync_to(
        &mut self,
        c: std::sync::Arc<parking_lot::Mutex<crate::replication::health::ResyncCounters>>,
    ) {
        self.resync_counters = Some(c);
    }

    pub fn site(&self) -> &Path {
        &self.site
    }

    /// Stop keeping the journal for the target (a resync will bring it along): the
    /// compactor may merge up to `lsn`.
    pub fn release_hold(&mut self, lsn: u64) {
        self.hold.set(lsn);
    }

    /// How long the target keeps points: (every point, app-consistent ones), in ms.
    pub fn set_retention(&mut self, every_ms: u64, app_ms: u64) {
        self.retention = (every_ms, app_ms.max(every_ms));
    }

    /// Give up a pass (between chunks) once `stop` is set.
    pub fn stop_on(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Some(stop);
    }

    fn stopping(&self) -> Result<()> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire))
        {
            return Err(Error::io(
                "ship to",
                PathBuf::from(&self.target),
                std::io::Error::from(std::io::ErrorKind::Interrupted),
            ));
        }
        Ok(())
    }

    /// Report initial-replication progress to `f`.
    pub fn on_progress(&mut self, f: Box<Progress>) {
        self.progress = Some(f);
    }

    /// Copy the frozen parent images from `resume` on: only data regions (SEEK_DATA),
    /// and within them only 4 KiB blocks that are not all zero, LZ4 on the wire.
    fn initial_copy(
        &self,
        s: &mut ClientStream,
        machine: &Machine,
        resume: (u32, u64),
    ) -> Result<u64> {
        const BLOCK: usize = 4096;
        let disks = machine.disks();
        let total: u64 = disks.iter().map(|(_, size)| size).sum();
        let mut scanned_before: u64 = disks
            .iter()
            .take(resume.0 as usize)
            .map(|(_, size)| size)
            .sum();
        let mut sent = 0u64;
        let mut buf = vec![0u8; MAX_CHUNK];
        for (i, (_, size)) in disks.iter().enumerate().skip(resume.0 as usize) {
            let parent = machine
                .parent(i)
                .ok_or_else(|| Error::NotFound(format!("disk {i}")))?;
            let mut pos = if i as u32 == resume.0 { resume.1 } else { 0 };
            while pos < *size {
                let Some(data) = parent.seek_data(pos)? else {
                    break;
                };
                if data >= *size {
                    break;
                }
                let hole = parent.seek_hole(data)?.min(*size);
                let mut at = data;
                while at < hole {
                    let n = ((hole - at) as usize).min(MAX_CHUNK);
                    self.stopping()?;
                    let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                    parent.read_exact_at(chunk, at)?;
                    // Send each run of non-zero blocks.
                    let mut run: Option<usize> = None;
                    for b in 0..=n.div_ceil(BLOCK) {
                        let block = chunk.get(b * BLOCK..((b + 1) * BLOCK).min(n));
                        let nonzero = block.is_some_and(|x| x.iter().any(|v| *v != 0));
                        match (nonzero, run) {
                            (true, None) => run = Some(b * BLOCK),
                            (false, Some(start)) => {
                                let end = (b * BLOCK).min(n);
                                let bytes = chunk.get(start..end).unwrap_or(&[]);
                                send(
                                    s,
                                    &Message::InitialChunk {
                                        machine: machine.name().to_string(),
                                        disk: i as u32,
                                        offset: at + start as u64,
                                        compressed: true,
                                        bytes: lz4_flex::block::compress_prepend_size(bytes),
                                    },
                                )?;
                                sent += bytes.len() as u64;
                                run = None;
                            }
                            _ => {}
                        }
                    }
                    at += n as u64;
                    if let Some(p) = &self.progress {
                        p(scanned_before + at, total);
                    }
                }
                pos = hole;
            }
            scanned_before += size;
            if let Some(p) = &self.progress {
                p(scanned_before, total);
            }
        }
        Ok(sent)
    }

    pub fn acked_lsn(&self) -> u64 {
        self.acked_lsn
    }

    /// Connect, protect, and ship every sealed segment the target lacks.
    /// Connect, greet and announce `machine`: the stream and the target's answer.
    fn handshake(&self, machine: &Machine) -> Result<(ClientStream, Protected)> {
        let (mut s, peer) = transport::connect(&self.site, &self.target, Duration::from_secs(10))?;
        let me = crate::identity::Identity::load(&self.site)?.id();
        send(
            &mut s,
            &Message::Hello {
                site_id: me.0,
                software: software(),
            },
        )?;
        match recv(&mut s)? {
            Message::Hello { site_id, .. } if SiteId(site_id) == peer => {}
            _ => {
                return Err(Error::InvalidInput(
                    "target did not answer Hello as its certificate says".into(),
                ))
            }
        }
        let w = machine.status().watermark;
        send(
            &mut s,
            &Message::Protect {
                machine: machine.name().to_string(),
                machine_id: machine.machine_id(),
                disks: machine.disks(),
                base_lsn: w.lsn,
                base_seq: w.segment_seq,
                retention_ms: self.retention.0,
                app_retention_ms: self.retention.1,
            },
        )?;
        match recv(&mut s)? {
            Message::Protected {
                lsn,
                seq,
                initial_done,
                resume_disk,
                resume_offset,
                diverged,
                ..
            } => Ok((
                s,
                Protected {
                    lsn,
                    seq,
                    initial_done,
                    resume: (resume_disk, resume_offset),
                    diverged,
                    base: w,
                },
            )),
            other => Err(Error::InvalidInput(format!(
                "expected Protected, got {other:?}"
            ))),
        }
    }

    pub fn ship_once(&mut self, machine: &Machine) -> Result<ShipReport> {
        let (mut s, p) = self.handshake(machine)?;
        if let Some(why) = p.diverged {
            return Err(Error::BrokenChain(format!(
                "the target's replica diverged: {why}"
            )));
        }
        let (mut acked, mut acked_seq, initial_done, resume, w) =
            (p.lsn, p.seq, p.initial_done, p.resume, p.base);
        // The target's position must be a point of this machine's own history.
        let newest_seq = machine.sealed_segments().last().map(|g| g.seq).unwrap_or(0);
        if acked_seq > newest_seq.max(w.segment_seq) || acked > machine.status().last_lsn {
            return Err(Error::BrokenChain(format!(
                "the target's replica of {} is ahead of this source (segment {acked_seq}, LSN \
                 {acked}): it holds another history",
                machine.name()
            )));
        }
        let mut report = ShipReport {
            acked_lsn: acked,
            ..Default::default()
        };
        if !initial_done {
            // The parents must stand exactly for the replica's base while they are
            // copied: hold there, let a running merge finish, and check.
            self.hold.set(acked);
            machine.wait_for_merge();
            let frozen = machine.status().watermark;
            if frozen.lsn != acked {
                return Err(Error::BrokenChain(format!(
                    "the replica's initial copy is based on LSN {acked} but this source's \
                     parents stand for LSN {}: resynchronisation required",
                    frozen.lsn
                )));
            }
            report.initial_bytes = self.initial_copy(&mut s, machine, resume)?;
            if machine.status().watermark != frozen {
                return Err(Error::BrokenChain(
                    "the parents changed during the initial copy".into(),
                ));
            }
            send(
                &mut s,
                &Message::InitialDone {
                    machine: machine.name().to_string(),
                },
            )?;
            match recv(&mut s)? {
                Message::Ack { .. } => {}
                other => return Err(Error::InvalidInput(format!("expected Ack, got {other:?}"))),
            }
            report.initial_completed = true;
        }
        for seg in machine.sealed_segments() {
            if seg.seq <= acked_seq {
                continue;
            }
            if seg.seq != acked_seq + 1 || seg.first_lsn != acked + 1 {
                return Err(Error::BrokenChain(format!(
                    "the target has up to segment {acked_seq}, but the source's journal starts at {}",
                    seg.seq
                )));
            }
            // Never send what does not verify: damage found here stops the machine
            // serving that segment and calls for a resync (which mends it).
            let expect = crate::journal::reader::Expect {
                machine_id: Some(machine.machine_id()),
                seq: Some(seg.seq),
                first_lsn: Some(seg.first_lsn),
                disk_count: Some(machine.disks().len() as u32),
            };
            let damage =
                match crate::journal::reader::scan_segment(seg.file.as_ref(), expect, |_| Ok(())) {
                    Ok(scan) => scan.fault_error(seg.file.as_ref()).or_else(|| {
                        (!scan.is_sealed()).then(|| {
                            Error::corruption(
                                seg.file.path(),
                                scan.end,
                                "sealed segment lost its footer",
                            )
                        })
                    }),
                    Err(e) => Some(e),
                };
            if let Some(e) = damage {
                let e = machine.report_damage(seg.seq, e);
                return Err(Error::BrokenChain(format!(
                    "this source's journal segment {} is damaged: {e}",
                    seg.seq
                )));
            }
            let len = seg.file.len()?;
            let mut offset = 0u64;
            let mut buf = vec![0u8; MAX_CHUNK];
            while offset < len {
                let n = ((len - offset) as usize).min(MAX_CHUNK);
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                seg.file.read_exact_at(chunk, offset)?;
                send(
                    &mut s,
                    &Message::SegmentChunk {
                        machine: machine.name().to_string(),
                        seq: seg.seq,
                        segment_len: len,
                        offset,
                        compressed: true,
                        bytes: lz4_flex::block::compress_prepend_size(chunk),
                    },
                )?;
                offset += n as u64;
            }
            match recv(&mut s)? {
                Message::Ack { lsn, machine: m } if lsn == seg.last_lsn && m == machine.name() => {
                    acked = lsn;
                    acked_seq = seg.seq;
                }
                other => {
                    return Err(Error::InvalidInput(format!(
                        "expected the Ack of segment {} (LSN {}), got {other:?}",
                        seg.seq, seg.last_lsn
                    )))
                }
            }
            // Acknowledged: now, and only now, the compactor may merge it.
            self.hold.set(acked);
            self.acked_lsn = acked;
            report.segments += 1;
            report.bytes += len;
            report.acked_lsn = acked;
        }
        self.hold.set(acked);
        self.acked_lsn = acked;
        Ok(report)
    }
}

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

impl Shipper {
    /// Resynchronise the target's replica with `machine` by comparing chunks of
    /// `chunk_bytes` and sending the ones that differ; resumes a resync that was
    /// interrupted (same base, persisted at both ends). Writes go on meanwhile: the
    /// journal after the base ships as usual afterwards.
    pub fn resync_once(&mut self, machine: &Machine, chunk_bytes: u64) -> Result<ResyncReport> {
        self.resync_batched(machine, chunk_bytes, super::resync::BATCH_BYTES)
    }

    /// [`Shipper::resync_once`] comparing `batch_bytes` of disk per round trip.
    pub fn resync_batched(
        &mut self,
        machine: &Machine,
        chunk_bytes: u64,
        batch_bytes: u64,
    ) -> Result<ResyncReport> {
        use super::resync::SourceResync;
        crate::replica::resync::check_chunk_bytes(chunk_bytes)?;
        // At most as many hashes per request as the target answers.
        let batch_bytes = batch_bytes.clamp(
            chunk_bytes,
            chunk_bytes.saturating_mul(super::receiver::MAX_HASHES),
        );
        let mut state = SourceResync::load(&self.site, machine.name())?.unwrap_or_default();
        // The base: where the chain continues afterwards. A base from an interrupted
        // resync stays if the journal still holds everything after it.
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

        let (mut s, p) = self.handshake(machine)?;
        if !p.initial_done {
            // Nothing to compare with yet: the initial copy (which the next pass
            // resumes) brings the replica along instead.
            SourceResync::clear(&self.site, machine.name())?;
            return Ok(ResyncReport::default());
        }
        let name = machine.name().to_string();
        send(
            &mut s,
            &Message::ResyncStart {
                machine: name.clone(),
                base_lsn: base.0,
                base_seq: base.1,
                chunk_bytes,
            },
        )?;
        let expect_state = |m: Message| -> Result<(u32, u64, u64, u64, u64)> {
            match m {
                Message::ResyncState {
                    disk,
                    next,
                    compared,
                    sent_chunks,
                    sent_bytes,
                    ..
                } => Ok((disk, next, compared, sent_chunks, sent_bytes)),
                other => Err(Error::InvalidInput(format!(
                    "expected ResyncState, got {other:?}"
                ))),
            }
        };
        let (disk0, next0, mut compared, mut sent_chunks, mut sent_bytes) =
            expect_state(recv(&mut s)?)?;
        let mut report = ResyncReport {
            resumed_from: compared,
            ..Default::default()
        };
        // Damage in this source's journal: rewrite each damaged range — from the
        // segment itself where its records still verify, else from the replica (the
        // writes it held are lost then, and said so).
        let damaged = machine.damaged_ranges()?;
        if !damaged.is_empty() || machine.has_damage() {
            let mut mended = Vec::new();
            for r in damaged {
                let data = match &r.data {
                    Some(d) => d.clone(),
                    None => {
                        let mut out = Vec::with_capacity(r.len as usize);
                        let mut at = r.offset;
                        while at < r.offset + r.len {
                            let n = (r.offset + r.len - at).min(4 << 20);
                            send(
                                &mut s,
                                &Message::ResyncFetch {
                                    machine: name.clone(),
                                    disk: r.disk,
                                    offset: at,
                                    len: n,
                                },
                            )?;
                            match recv(&mut s)? {
                                Message::ResyncData { bytes, .. } => {
                                    // The size prefix decides the allocation: check it.
                                    let claimed = bytes
                                        .get(..4)
                                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                        .unwrap_or(u32::MAX);
                                    if u64::from(claimed) != n {
                                        return Err(Error::InvalidInput(
                                            "the target sent a range of another size".into(),
                                        ));
                                    }
                                    let d = lz4_flex::block::decompress_size_prepended(&bytes)
                                        .map_err(|e| Error::InvalidInput(format!("LZ4: {e}")))?;
                                    if d.len() as u64 != n {
                                        return Err(Error::InvalidInput(
                                            "the target sent a range of another size".into(),
                                        ));
                                    }
                                    out.extend_from_slice(&d);
                                }
                                other => {
                                    return Err(Error::InvalidInput(format!(
                                        "expected ResyncData, got {other:?}"
                                    )))
                                }
                            }
                            at += n;
                        }
                        tracing::warn!(
                            machine = %name,
                            "disk {} bytes {}..{}: the writes in damaged segment {} are lost; \
                             taken from the replica",
                            r.disk,
                            r.offset,
                            r.offset + r.len,
                            r.seq
                        );
                        report.lost_bytes += r.len;
                        out
                    }
                };
                report.mended_bytes += r.len;
                mended.push((r, data));
            }
            machine.mend(&mended)?;
            // Merge past the mended segment soon (merges skip it): a damaged segment
            // left in the journal would fail the next open's recovery.
            if let Err(e) = machine.compact() {
                tracing::warn!(machine = %name, "merge after mending: {e}");
            }
        }
        let disks = machine.disks();
        let total_chunks: u64 = disks.iter().map(|(_, sz)| sz.div_ceil(chunk_bytes)).sum();
        let group = group_of(chunk_bytes);
        let batch = (batch_bytes / chunk_bytes).max(group) / group * group;
        for (d, (dname, size)) in disks.iter().enumerate() {
            let d = d as u32;
            if d < disk0 {
                continue;
            }
            let vol = machine.volume(dname)?;
            let chunks = size.div_ceil(chunk_bytes);
            let mut c = if d == disk0 { next0 } else { 0 };
            while c < chunks {
                self.stopping()?;
                let count = batch.min(chunks - c);
                // Our hashes while the target computes its own.
                let read = |at: u64, buf: &mut [u8]| vol.read(at, buf);
                let (ours, theirs) = std::thread::scope(|sc| -> Result<_> {
                    let h = sc.spawn(|| {
                        crate::replica::resync::hash_chunks(*size, chunk_bytes, c, count, &read)
                    });
                    send(
                        &mut s,
                        &Message::ResyncHashRequest {
                            machine: name.clone(),
                            disk: d,
                            first: c,
                            count,
                            group,
                        },
                    )?;
                    let theirs = match recv(&mut s)? {
                        Message::ResyncHashes { hashes, .. } => hashes,
                        other => {
                            return Err(Error::InvalidInput(format!(
                                "expected ResyncHashes, got {other:?}"
                            )))
                        }
                    };
                    let ours = h
                        .join()
                        .unwrap_or_else(|_| Err(Error::InvalidInput("hashing panicked".into())))?;
                    Ok((ours, theirs))
                })?;
                report.hash_bytes_now += 32 * theirs.len() as u64;
                let our_groups = crate::replica::resync::group_hashes(&ours, group as usize);
                if our_groups.len() != theirs.len() {
                    return Err(Error::InvalidInput(format!(
                        "the target sent {} group hashes for {} chunks",
                        theirs.len(),
                        ours.len()
                    )));
                }
                // The groups that differ: ask for all their chunk hashes at once (the
                // answers come back in order), then send the chunks that differ.
                let differing: Vec<u64> = our_groups
                    .iter()
                    .zip(&theirs)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(g, _)| c + g as u64 * group)
                    .collect();
                for (k, &g0) in differing.iter().enumerate() {
                    let m = Message::ResyncHashRequest {
                        machine: name.clone(),
                        disk: d,
                        first: g0,
                        count: group.min(c + count - g0),
                        group: 1,
                    };
                    if k + 1 == differing.len() {
                        send(&mut s, &m)?;
                    } else {
                        send_more(&mut s, &m)?;
                    }
                }
                let mut data = vec![0u8; chunk_bytes as usize];
                for &g0 in &differing {
                    let gn = group.min(c + count - g0);
                    let detail = match recv(&mut s)? {
                        Message::ResyncHashes { hashes, first, .. }
                            if hashes.len() as u64 == gn && first == g0 =>
                        {
                            hashes
                        }
                        other => {
                            return Err(Error::InvalidInput(format!(
                                "expected {gn} chunk hashes from {g0}, got {other:?}"
                            )))
                        }
                    };
                    report.hash_bytes_now += 32 * gn;
                    for (k, theirs) in detail.iter().enumerate() {
                        let i = g0 + k as u64;
                        if ours.get((i - c) as usize) == Some(theirs) {
                            continue;
                        }
                        let at = i * chunk_bytes;
                        let len = chunk_bytes.min(size - at) as usize;
                        let buf = data.get_mut(..len).unwrap_or(&mut []);
                        vol.read(at, buf)?;
                        let bytes = lz4_flex::block::compress_prepend_size(buf);
                        report.sent_bytes_now += bytes.len() as u64;
                        sent_bytes += bytes.len() as u64;
                        sent_chunks += 1;
                        // Flushed with the batch's end.
                        send_more(
                            &mut s,
                            &Message::ResyncChunk {
                                machine: name.clone(),
                                disk: d,
                                offset: at,
                                compressed: true,
                                bytes,
                            },
                        )?;
                    }
                }
                compared += count;
                report.compared_now += count;
                // What was read must be durable here before the target keeps it: a crash
                // could otherwise take back a write the replica already has.
                machine.flush()?;
                send(
                    &mut s,
                    &Message::ResyncBatchDone {
                        machine: name.clone(),
                        disk: d,
                        next: c + count,
                        compared,
                        sent_chunks,
                        sent_bytes,
                    },
                )?;
                // The target persisted the batch before it answered.
                expect_state(recv(&mut s)?)?;
                c += count;
                if let Some(rc) = &self.resync_counters {
                    *rc.lock() = crate::replication::health::ResyncCounters {
                        resumed_from: report.resumed_from,
                        chunks_compared: compared,
                        chunks_total: total_chunks,
                        chunks_sent: sent_chunks,
                        bytes_sent: sent_bytes,
                    };
                }
                if let Some(progress) = &self.progress {
                    progress(compared.min(total_chunks), total_chunks);
                }
            }
        }
        // A point after every read: the first consistent state of the replica; sealed,
        // so the next pass ships it.
        let valid_from = machine.point(false)?.lsn;
        machine.seal()?;
        send(
            &mut s,
            &Message::ResyncDone {
                machine: name.clone(),
                valid_from,
            },
        )?;
        match recv(&mut s)? {
            Message::Ack { lsn, .. } if lsn == base.0 => {}
            other => {
                return Err(Error::InvalidInput(format!(
                    "expected the Ack of the resync at LSN {}, got {other:?}",
                    base.0
                )))
            }
        }
        SourceResync::clear(&self.site, machine.name())?;
        self.acked_lsn = base.0;
        report.compared = compared;
        report.sent_chunks = sent_chunks;
        report.sent_bytes = sent_bytes;
        report.valid_from = valid_from;
        Ok(report)
    }
}
