//! Delta replication: every sealed segment the target lacks, in order, each verified
//! before it is sent (damage found here is never shipped: it stops the machine and
//! calls for a resync) — and only an acknowledged segment's LSN moves the watermark
//! hold.
//!
//! Pipelined, since a serial loop (read, verify, compress, send, wait for the Ack)
//! left each side idle while the other worked: a preparing thread reads, verifies
//! and packs up to [`PREPARED_AHEAD`] segments ahead, while this thread sends and
//! keeps up to [`WINDOW`] segments unacknowledged on the wire (the target stores one
//! while the next arrives). Acks come back in order and each must name its segment's
//! last LSN; an error from the preparing thread (damage, a gap) is returned once every
//! segment sent before it has been acknowledged.

use super::{pack, Link, ShipReport, Shipper};
use crate::error::{Error, Result};
use crate::journal::SealedSegment;
use crate::replication::protocol::{self, Message, MAX_CHUNK};
use crate::volume::Machine;
use std::collections::VecDeque;

/// Segments sent and not yet acknowledged, at most.
pub const WINDOW: usize = 4;
/// Segments read, verified and packed ahead of the sender, at most.
pub const PREPARED_AHEAD: usize = 2;

/// One segment ready to send: its chunks as they travel.
struct Prepared {
    seq: u64,
    last_lsn: u64,
    len: u64,
    chunks: Vec<(u64, bool, Vec<u8>)>,
}

impl Shipper {
    /// Ship the sealed segments after `acked` (LSN, segment).
    pub(super) fn ship_segments(
        &mut self,
        link: &mut Link,
        machine: &Machine,
        acked: (u64, u64),
        report: &mut ShipReport,
    ) -> Result<()> {
        // The target holds everything up to `acked`: so may the hold (a pass that
        // ships nothing must still move it there, or the compactor waits forever and
        // the loop sees "unshipped" segments the target has).
        self.acked_lsn = acked.0;
        self.hold.set(acked.0);
        // A planned failover under way (fenced, shipping the rest): the target may
        // read ahead what its check will read (`replica::warm`) while this ships.
        if self.announce_promotion
            && machine.intent().is_some()
            && link.peer_features() & protocol::FEATURE_PROMOTE_SOON != 0
        {
            link.send(&Message::PromoteSoon {
                machine: machine.name().to_string(),
                generation: machine.generation(),
            })?;
        }
        let todo: Vec<SealedSegment> = machine
            .sealed_segments()
            .into_iter()
            .filter(|s| s.seq > acked.1)
            .collect();
        let (tx, rx) = crossbeam::channel::bounded::<Result<Prepared>>(PREPARED_AHEAD);
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let mut prev = acked;
                for seg in &todo {
                    // A panic here is an error of this pass, not a dead loop thread.
                    let item = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        prepare(machine, seg, prev)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::InvalidInput(format!(
                            "preparing segment {} panicked",
                            seg.seq
                        )))
                    });
                    let failed = item.is_err();
                    prev = (seg.last_lsn, seg.seq);
                    // The sender gone (it failed) or a failure sent: stop reading.
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                }
            });
            let r = self.send_prepared(link, machine, &rx, report);
            // Unblock the preparing thread if the sender stopped early.
            drop(rx);
            r
        })
    }

    fn send_prepared(
        &mut self,
        link: &mut Link,
        machine: &Machine,
        rx: &crossbeam::channel::Receiver<Result<Prepared>>,
        report: &mut ShipReport,
    ) -> Result<()> {
        let name = machine.name().to_string();
        let mut in_flight: VecDeque<(u64, u64, u64)> = VecDeque::new();
        let mut failure = None;
        for item in rx.iter() {
            let seg = match item {
                Ok(seg) => seg,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let last = seg.chunks.len().saturating_sub(1);
            for (i, (offset, compressed, bytes)) in seg.chunks.into_iter().enumerate() {
                let head = Message::SegmentChunk {
                    machine: name.clone(),
                    generation: machine.generation(),
                    seq: seg.seq,
                    segment_len: seg.len,
                    offset,
                    compressed,
                    bytes: Vec::new(),
                };
                link.send_payload(&head, &bytes, i == last)?;
            }
            in_flight.push_back((seg.seq, seg.last_lsn, seg.len));
            while in_flight.len() >= WINDOW {
                self.await_ack(link, &name, &mut in_flight, report)?;
            }
        }
        while !in_flight.is_empty() {
            self.await_ack(link, &name, &mut in_flight, report)?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The Ack of the oldest segment in flight; then, and only then, the compactor may
    /// merge it.
    fn await_ack(
        &mut self,
        link: &mut Link,
        name: &str,
        in_flight: &mut VecDeque<(u64, u64, u64)>,
        report: &mut ShipReport,
    ) -> Result<()> {
        let Some((seq, last_lsn, len)) = in_flight.pop_front() else {
            return Ok(());
        };
        match link.recv()? {
            Message::Ack { lsn, machine: m } if lsn == last_lsn && m == name => {}
            other => {
                return Err(link.unexpected(
                    &format!("the Ack of segment {seq} (LSN {last_lsn})"),
                    &other,
                ))
            }
        }
        self.hold.set(last_lsn);
        self.acked_lsn = last_lsn;
        if let Some(f) = &self.on_ack {
            f(last_lsn);
        }
        report.segments += 1;
        report.bytes += len;
        report.acked_lsn = last_lsn;
        Ok(())
    }
}

/// Segment `seg`, following `prev` (LSN, segment), verified and packed in chunks.
fn prepare(machine: &Machine, seg: &SealedSegment, prev: (u64, u64)) -> Result<Prepared> {
    if seg.seq != prev.1 + 1 || seg.first_lsn != prev.0 + 1 {
        return Err(Error::BrokenChain(format!(
            "the target has up to segment {}, but the source's journal goes on at {}",
            prev.1, seg.seq
        )));
    }
    // Never send what does not verify: damage found here stops the machine serving
    // that segment and calls for a resync (which mends it).
    let expect = crate::journal::reader::Expect {
        machine_id: Some(machine.machine_id()),
        seq: Some(seg.seq),
        first_lsn: Some(seg.first_lsn),
        disk_count: Some(machine.disks().len() as u32),
    };
    let damage = match crate::journal::reader::scan_segment(seg.file.as_ref(), expect, |_| Ok(())) {
        Ok(scan) => scan.fault_error(seg.file.as_ref()).or_else(|| {
            (!scan.is_sealed()).then(|| {
                Error::corruption(seg.file.path(), scan.end, "sealed segment lost its footer")
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
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    while offset < len {
        let n = ((len - offset) as usize).min(MAX_CHUNK);
        // Read into a buffer that travels when the chunk is sent as it is (no copy),
        // and is read into again when it was compressed. A new one comes zeroed from
        // the allocator (`vec!`: fresh pages, no memset of 8 MiB).
        if buf.len() != n {
            buf = vec![0u8; n];
        }
        seg.file.read_exact_at(&mut buf, offset)?;
        let (compressed, packed) = pack(&buf);
        let bytes = match compressed.then(|| packed.into_owned()) {
            Some(packed) => packed,
            None => std::mem::take(&mut buf),
        };
        chunks.push((offset, compressed, bytes));
        offset += n as u64;
    }
    Ok(Prepared {
        seq: seg.seq,
        last_lsn: seg.last_lsn,
        len,
        chunks,
    })
}
