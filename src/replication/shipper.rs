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

/// Called with (bytes of the disks scanned, total bytes of the disks).
pub type Progress = dyn Fn(u64, u64) + Send + Sync;

fn send(s: &mut ClientStream, m: &Message) -> Result<()> {
    let sent = write_frame(s, m)
        .map_err(|e| match e {
            FrameError::Io(io) => Error::io("send to", PathBuf::from("target"), io),
            other => Error::InvalidInput(format!("sending: {other}")),
        })
        .and_then(|()| {
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
        }
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
    pub fn ship_once(&mut self, machine: &Machine) -> Result<ShipReport> {
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
        let (mut acked, mut acked_seq, initial_done, resume) = match recv(&mut s)? {
            Message::Protected {
                lsn,
                seq,
                initial_done,
                resume_disk,
                resume_offset,
                ..
            } => (lsn, seq, initial_done, (resume_disk, resume_offset)),
            other => {
                return Err(Error::InvalidInput(format!(
                    "expected Protected, got {other:?}"
                )))
            }
        };
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
