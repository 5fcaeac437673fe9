//! Initial replication: copy the parent images, frozen at the replica's base by the
//! watermark hold, from where the target's persisted position says — data regions
//! only (SEEK_DATA/SEEK_HOLE), and within them only 4 KiB blocks that are not all
//! zero, LZ4 on the wire.

use super::{Link, Protected, Shipper};
use crate::error::{Error, Result};
use crate::replication::protocol::{Message, MAX_CHUNK};
use crate::volume::Machine;

impl Shipper {
    /// Bring the replica's initial copy to its end; returns the parent bytes sent.
    pub(super) fn initial_replication(
        &self,
        link: &mut Link,
        machine: &Machine,
        p: &Protected,
    ) -> Result<u64> {
        // The parents must stand exactly for the replica's base while they are
        // copied: hold there, let a running merge finish, and check.
        self.hold.set(p.lsn);
        machine.wait_for_merge();
        let frozen = machine.status().watermark;
        if frozen.lsn != p.lsn {
            return Err(Error::BrokenChain(format!(
                "the replica's initial copy is based on LSN {} but this source's parents \
                 stand for LSN {}: resynchronisation required",
                p.lsn, frozen.lsn
            )));
        }
        let seeded = self
            .reprotect
            .as_ref()
            .filter(|r| r.held == crate::replication::protocol::Held::Seeded)
            .cloned();
        let sent = match &seeded {
            Some(r) => self.delta_copy(link, machine, p.resume, r)?,
            None => self.initial_copy(link, machine, p.resume)?,
        };
        if machine.status().watermark != frozen {
            return Err(Error::BrokenChain(
                "the parents changed during the initial copy".into(),
            ));
        }
        link.send(&Message::InitialDone {
            machine: machine.name().to_string(),
        })?;
        match link.recv()? {
            Message::Ack { .. } => {}
            other => return Err(link.unexpected("Ack", &other)),
        }
        if seeded.is_some() {
            // A point to check the seeded replica against, shipped in this pass.
            machine.checkpoint()?;
            machine.seal()?;
        }
        if let Some(r) = seeded.filter(|r| !r.covered) {
            // The old primary merged writes neither journal still names: compare
            // every chunk (a resync, at once).
            let why = format!(
                "reprotect toward {}: the old primary's journal and this site's map do not \
                 cover everything it wrote after LSN {}{}",
                self.target,
                machine.changed_map().map_or(0, |m| m.since),
                r.orphan
                    .as_ref()
                    .map(|o| format!(" (orphan {})", o.id))
                    .unwrap_or_default()
            );
            crate::replication::resync_schedule::SourceResync::require(
                &self.site,
                machine.name(),
                &why,
            )?;
            crate::replication::resync_schedule::request_now(&self.site, machine.name())?;
        }
        Ok(sent)
    }

    /// A reprotect's copy over a replica seeded from the old primary's own disks:
    /// only the 4 KiB blocks that differ — what this machine changed since the point
    /// (its map) and what the old primary wrote after it (its tail) — from the frozen
    /// parents, zero blocks too, from `resume` on. Returns the data bytes sent.
    fn delta_copy(
        &self,
        link: &mut Link,
        machine: &Machine,
        resume: (u32, u64),
        r: &super::ReprotectView,
    ) -> Result<u64> {
        let mut want = machine.changed_map().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} keeps no changed-block map: a reprotect over a seeded replica needs one",
                machine.name()
            ))
        })?;
        for (d, o, l) in &r.tail {
            want.add(*d, *o, *l);
        }
        let disks = machine.disks();
        let runs: Vec<(u32, u64, u64)> = disks
            .iter()
            .enumerate()
            .flat_map(|(i, (_, size))| {
                want.ranges(i as u32, *size)
                    .into_iter()
                    .map(move |(o, l)| (i as u32, o, l))
            })
            .collect();
        let total: u64 = runs.iter().map(|r| r.2).sum();
        let mut done: u64 = 0;
        let mut sent = 0u64;
        let mut buf = vec![0u8; MAX_CHUNK];
        for (disk, start, len) in runs {
            let end = start + len;
            if (disk, end) <= resume {
                done += len;
                continue;
            }
            let parent = machine
                .parent(disk as usize)
                .ok_or_else(|| Error::NotFound(format!("disk {disk}")))?;
            let mut at = if disk == resume.0 {
                start.max(resume.1)
            } else {
                start
            };
            done += at - start;
            while at < end {
                self.stopping()?;
                let n = ((end - at) as usize).min(MAX_CHUNK);
                let chunk = buf.get_mut(..n).unwrap_or(&mut []);
                parent.read_exact_at(chunk, at)?;
                let (compressed, bytes) = super::pack(chunk);
                link.send(&Message::InitialChunk {
                    machine: machine.name().to_string(),
                    generation: machine.generation(),
                    disk,
                    offset: at,
                    compressed,
                    bytes,
                })?;
                sent += n as u64;
                at += n as u64;
                done += n as u64;
                if sent >= 1 << 20 {
                    crate::failpoint::hit("reprotect:delta-sent");
                }
                if let Some(p) = &self.progress {
                    p(done, total);
                }
            }
        }
        if let Some(p) = &self.progress {
            p(total, total);
        }
        Ok(sent)
    }

    /// Copy the frozen parent images from `resume` on.
    fn initial_copy(&self, link: &mut Link, machine: &Machine, resume: (u32, u64)) -> Result<u64> {
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
                                let piece = chunk.get(start..end).unwrap_or(&[]);
                                let (compressed, bytes) = super::pack(piece);
                                link.send(&Message::InitialChunk {
                                    machine: machine.name().to_string(),
                                    generation: machine.generation(),
                                    disk: i as u32,
                                    offset: at + start as u64,
                                    compressed,
                                    bytes,
                                })?;
                                sent += piece.len() as u64;
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
}
