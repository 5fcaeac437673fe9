//! The source side of replication: ship a machine's sealed segments to its target,
//! in order, and move the watermark hold to what the target acknowledged — only then
//! may the compactor merge (and delete) a segment.
//!
//! This is delta replication only; initial replication (copying the disks under a
//! frozen parent) comes next, and until it exists the replica's chain starts at the
//! merge watermark the source has when protection starts.

use super::protocol::{read_frame, write_frame, ErrorCode, Message, MAX_CHUNK};
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
#[derive(Debug)]
pub struct Shipper {
    site: PathBuf,
    target: String,
    /// Keeps every segment the target has not acknowledged.
    hold: WatermarkHold,
    acked_lsn: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipReport {
    pub segments: usize,
    pub bytes: u64,
    pub acked_lsn: u64,
}

fn send(s: &mut ClientStream, m: &Message) -> Result<()> {
    write_frame(s, m).map_err(|e| Error::InvalidInput(format!("sending: {e}")))?;
    s.flush()
        .map_err(|e| Error::io("send to", PathBuf::from("target"), e))
}

fn recv(s: &mut ClientStream) -> Result<Message> {
    match read_frame::<Message>(s) {
        Ok(Message::Error { code, message }) => Err(match code {
            ErrorCode::BrokenChain => Error::BrokenChain(format!("target: {message}")),
            _ => Error::InvalidInput(format!("target refused ({code:?}): {message}")),
        }),
        Ok(m) => Ok(m),
        Err(e) => Err(Error::InvalidInput(format!("target: {e}"))),
    }
}

impl Shipper {
    /// Start shipping `machine` from `site` to the target at `target`. From now on the
    /// compactor keeps every segment the target has not acknowledged.
    pub fn new(site: &Path, machine: &Machine, target: &str) -> Shipper {
        let base = machine.status().watermark.lsn;
        Shipper {
            site: site.to_path_buf(),
            target: target.to_string(),
            hold: machine.hold_watermark(base),
            acked_lsn: base,
        }
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
            },
        )?;
        let (mut acked, mut acked_seq) = match recv(&mut s)? {
            Message::Protected { lsn, seq, .. } => (lsn, seq),
            other => {
                return Err(Error::InvalidInput(format!(
                    "expected Protected, got {other:?}"
                )))
            }
        };
        let mut report = ShipReport {
            acked_lsn: acked,
            ..Default::default()
        };
        for seg in machine.sealed_segments() {
            if seg.seq <= acked_seq {
                continue;
            }
            if seg.seq != acked_seq + 1 {
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
                Message::Ack { lsn, .. } => {
                    acked = lsn;
                    acked_seq = seg.seq;
                }
                other => return Err(Error::InvalidInput(format!("expected Ack, got {other:?}"))),
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
