//! Delta replication: every sealed segment the target lacks, in order, each verified
//! before it is sent (damage found here is never shipped: it stops the machine and
//! calls for a resync), each acknowledged before the next — and only an acknowledged
//! segment's LSN moves the watermark hold.

use super::{Link, ShipReport, Shipper};
use crate::error::{Error, Result};
use crate::replication::protocol::{Message, MAX_CHUNK};
use crate::volume::Machine;

impl Shipper {
    /// Ship the sealed segments after `acked` (LSN, segment).
    pub(super) fn ship_segments(
        &mut self,
        link: &mut Link,
        machine: &Machine,
        acked: (u64, u64),
        report: &mut ShipReport,
    ) -> Result<()> {
        let (mut acked, mut acked_seq) = acked;
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
                link.send(&Message::SegmentChunk {
                    machine: machine.name().to_string(),
                    generation: machine.generation(),
                    seq: seg.seq,
                    segment_len: len,
                    offset,
                    compressed: true,
                    bytes: lz4_flex::block::compress_prepend_size(chunk),
                })?;
                offset += n as u64;
            }
            match link.recv()? {
                Message::Ack { lsn, machine: m } if lsn == seg.last_lsn && m == machine.name() => {
                    acked = lsn;
                    acked_seq = seg.seq;
                }
                other => {
                    return Err(link.unexpected(
                        &format!("the Ack of segment {} (LSN {})", seg.seq, seg.last_lsn),
                        &other,
                    ))
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
        Ok(())
    }
}
