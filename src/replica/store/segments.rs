//! Stored segments: received, verified like the source's recovery verifies its own,
//! encrypted, indexed; read back decrypted and authenticated.

use super::{IndexedPoint, IndexedRecord};
use super::{Receipt, ReplicaManifest, ReplicaStore, SegmentIndex};
use crate::error::{Error, Result};
use crate::format::meta::Watermark;
use crate::format::segment::segment_name;
use crate::format::RecordKind;
use crate::journal::reader::{scan_bytes, Expect, FaultKind};
use crate::replica::crypt;
use std::path::Path;

pub(super) const SEGMENTS: &str = "segments";

pub(super) fn seg_rel(seq: u64) -> String {
    format!("{SEGMENTS}/{}.enc", segment_name(seq))
}

pub(super) fn idx_rel(seq: u64) -> String {
    format!("{SEGMENTS}/{seq:020}.idx.enc")
}

impl ReplicaStore {
    /// Take in (or remove) a segment stored just past the mark by a crash.
    pub(super) fn reconcile(&mut self) -> Result<()> {
        let next = self.received.segment_seq + 1;
        let (seg, idx) = (self.key_of(&seg_rel(next)), self.key_of(&idx_rel(next)));
        let Some(ct) = self.backend().get(&seg)? else {
            self.backend().delete(&[idx])?;
            return Ok(());
        };
        let path = self.locate(&seg_rel(next));
        let taken = self
            .key()
            .open(self.manifest.machine_id, next, ct, &path)
            .and_then(|plain| self.verify(next, &plain));
        match taken {
            Ok(index) => {
                tracing::info!("replica: took in segment {next} stored before a crash");
                self.write_index(next, &index)?;
                self.set_received(Watermark {
                    lsn: index.last_lsn,
                    segment_seq: next,
                })
            }
            Err(e) => {
                tracing::warn!("replica: removing unacknowledged segment {next}: {e}");
                self.backend().delete(&[seg, idx])
            }
        }
    }

    /// Verify a whole sealed segment `seq` that must follow what is stored and index
    /// its records and points. Everything the source's recovery checks is checked.
    fn verify(&self, seq: u64, plain: &[u8]) -> Result<SegmentIndex> {
        index_segment(
            &self.manifest,
            seq,
            Some(self.received.lsn + 1),
            plain,
            &self.locate(&seg_rel(seq)),
        )
    }

    /// Receive segment `seq` (its plain bytes as the source has them). Verified, then
    /// stored durably, then acknowledged; nothing is stored if anything is wrong.
    pub fn receive(&mut self, seq: u64, plain: &[u8]) -> Result<Receipt> {
        let mut framed = Vec::with_capacity(crypt::sealed_len(plain.len()));
        framed.resize(crypt::HEADER_LEN, 0);
        framed.extend_from_slice(plain);
        self.receive_framed(seq, &mut framed)
    }

    /// [`receive`](Self::receive) of a segment held after [`crypt::HEADER_LEN`] bytes
    /// of room in `framed`: it is encrypted in place and written from there (no copy
    /// of a segment that may be 64 MiB; the receiver assembles segments that way, and
    /// reuses the buffer afterwards).
    pub fn receive_framed(&mut self, seq: u64, framed: &mut Vec<u8>) -> Result<Receipt> {
        let plain = framed.get(crypt::HEADER_LEN..).unwrap_or(&[]);
        if seq <= self.received.segment_seq {
            // The target compactor may have merged it since this store was opened.
            if let Some(p) = self.read_parent_mark()? {
                self.parent = p;
            }
            if seq <= self.parent.seq {
                // Merged into the parent already (and perhaps deleted): nothing left to
                // compare it with.
                return Ok(Receipt::Duplicate {
                    lsn: self.received.lsn,
                });
            }
            let stored = self.read_segment(seq);
            if stored.is_err() {
                // Merged and removed since the mark was read above?
                if let Some(p) = self.read_parent_mark()? {
                    self.parent = p;
                }
                if seq <= self.parent.seq {
                    return Ok(Receipt::Duplicate {
                        lsn: self.received.lsn,
                    });
                }
            }
            return match stored {
                Ok(p) if *p == *plain => Ok(Receipt::Duplicate {
                    lsn: self.received.lsn,
                }),
                Ok(_) => Err(Error::BrokenChain(format!(
                    "segment {seq} differs from the one stored under that number"
                ))),
                Err(e) => Err(e),
            };
        }
        if seq != self.received.segment_seq + 1 {
            return Err(Error::BrokenChain(format!(
                "segment {seq} arrived but {} is next (a gap)",
                self.received.segment_seq + 1
            )));
        }
        let index = self.verify(seq, plain)?;
        let idx = self.sealed_index(seq, &index)?;
        self.key()
            .seal_framed(self.manifest.machine_id, seq, framed)?;
        // Index and segment in one batch (one commit in an object store, one directory
        // sync in a directory); the segment's buffer is lent to it, not copied. Both
        // are durable before `received` names them.
        self.backend().put_batch(&[
            (self.key_of(&idx_rel(seq)), &idx[..]),
            (self.key_of(&seg_rel(seq)), &framed[..]),
        ])?;
        self.set_received(Watermark {
            lsn: index.last_lsn,
            segment_seq: seq,
        })?;
        Ok(Receipt::Stored {
            lsn: index.last_lsn,
        })
    }

    fn write_index(&self, seq: u64, index: &SegmentIndex) -> Result<()> {
        let ct = self.sealed_index(seq, index)?;
        self.backend().put(&self.key_of(&idx_rel(seq)), &ct)
    }

    /// The index file of segment `seq`, encrypted.
    fn sealed_index(&self, seq: u64, index: &SegmentIndex) -> Result<Vec<u8>> {
        let (version, body) = index.encode()?;
        self.key()
            .seal_index_as(version, self.manifest.machine_id, seq, &body)
    }

    /// The records and points of stored segment `seq` (from its index, or from the
    /// segment itself when the index is missing).
    pub fn segment_index(&self, seq: u64) -> Result<SegmentIndex> {
        self.segment_index_versioned(seq).map(|(_, i)| i)
    }

    /// [`segment_index`](Self::segment_index) and the version of its index file
    /// (None: no index file, the segment was indexed now).
    fn segment_index_versioned(&self, seq: u64) -> Result<(Option<u16>, SegmentIndex)> {
        if seq == 0 || seq > self.received.segment_seq {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        let rel = idx_rel(seq);
        match self.backend().get(&self.key_of(&rel))? {
            Some(ct) => {
                let path = self.locate(&rel);
                let (version, body) =
                    self.key()
                        .open_index_versioned(self.manifest.machine_id, seq, &ct, &path)?;
                SegmentIndex::decode(version, &body)
                    .map(|i| (Some(version), i))
                    .ok_or_else(|| Error::corruption(&path, 40, "segment index does not decode"))
            }
            None => {
                let plain = self.read_segment(seq)?;
                index_segment(
                    &self.manifest,
                    seq,
                    None,
                    &plain,
                    &self.locate(&seg_rel(seq)),
                )
                .map(|i| (None, i))
            }
        }
    }

    /// Check stored segment `seq` against everything known of it: it decrypts and
    /// authenticates, verifies as the source's recovery would (starting at
    /// `first_lsn`), and its index lists exactly its records and points.
    pub fn verify_segment(&self, seq: u64, first_lsn: u64) -> Result<SegmentIndex> {
        let plain = self.read_segment(seq)?;
        let fresh = index_segment(
            &self.manifest,
            seq,
            Some(first_lsn),
            &plain,
            &self.locate(&seg_rel(seq)),
        )?;
        let (version, stored) = self.segment_index_versioned(seq)?;
        let same_points = stored.points.len() == fresh.points.len()
            && stored.points.iter().zip(&fresh.points).all(|(a, b)| {
                (a.lsn, a.time_ns, a.app, &a.digests) == (b.lsn, b.time_ns, b.app, &b.digests)
            });
        // An index of version 1 (written before plan points, or by a build that
        // wrote version 1 for a segment without any) lists none of them; one of
        // version 2 lists every one.
        let same_plan_points = match version {
            Some(1) => stored.plan_points.is_empty(),
            _ => stored.plan_points == fresh.plan_points,
        };
        if stored.records != fresh.records
            || (stored.first_lsn, stored.last_lsn) != (fresh.first_lsn, fresh.last_lsn)
            || !same_points
            || !same_plan_points
        {
            return Err(Error::corruption(
                self.locate(&idx_rel(seq)),
                0,
                format!("the index of segment {seq} does not list what the segment holds"),
            ));
        }
        Ok(stored)
    }

    /// Remove stored segments `from..=upto` (merged into the parent and needed by no
    /// reader), and their indexes. Returns how many files went.
    pub fn remove_segments(&self, from: u64, upto: u64) -> Result<u64> {
        let stored = self.stored_segment_files()?;
        let keys: Vec<String> = stored
            .into_iter()
            .filter(|(seq, _)| (from..=upto).contains(seq))
            .map(|(_, rel)| self.key_of(&rel))
            .collect();
        self.backend().delete(&keys)?;
        Ok(keys.len() as u64)
    }

    /// Every segment and index file stored: (segment number, name relative to the
    /// replica).
    fn stored_segment_files(&self) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for name in self.backend().list(&self.key_of(SEGMENTS))? {
            let num = name
                .strip_suffix(".seg.enc")
                .or_else(|| name.strip_suffix(".idx.enc"));
            if let Some(seq) = num.and_then(|n| n.parse::<u64>().ok()) {
                out.push((seq, format!("{SEGMENTS}/{name}")));
            }
        }
        Ok(out)
    }

    /// The oldest segment file still stored (None: none).
    pub fn oldest_stored_segment(&self) -> Result<Option<u64>> {
        Ok(self.stored_segment_files()?.iter().map(|(s, _)| *s).min())
    }

    /// The plain bytes of stored segment `seq`, decrypted and authenticated.
    pub fn read_segment(&self, seq: u64) -> Result<crate::storage::pool::Pooled> {
        if seq > super::PATCH_SEQ {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        self.read_layer(seq)
    }
}

/// Verify the plain bytes of sealed segment `seq` of the replica's machine (starting
/// at `first_lsn` when given) and index them; `named` names it in errors.
pub(super) fn index_segment(
    man: &ReplicaManifest,
    seq: u64,
    first_lsn: Option<u64>,
    plain: &[u8],
    named: &Path,
) -> Result<SegmentIndex> {
    let sizes: Vec<u64> = man.disks.iter().map(|d| d.size).collect();
    let mut outside = None;
    let mut index = SegmentIndex::default();
    let expect = Expect {
        machine_id: Some(man.machine_id),
        seq: Some(seq),
        first_lsn,
        disk_count: Some(sizes.len() as u32),
    };
    let scan = scan_bytes(plain, expect, |rec| {
        if let Some(what) = crate::volume::record_outside_disk(&rec.header, &sizes) {
            outside.get_or_insert((rec.offset, what));
        }
        let h = rec.header;
        match h.kind {
            RecordKind::Point => {
                if let Some((time_ns, app)) = rec.point() {
                    if let Some(id) = rec.point_plan() {
                        index.plan_points.push(super::PlanTag { lsn: h.lsn, id });
                    }
                    index.points.push(IndexedPoint {
                        lsn: h.lsn,
                        time_ns,
                        app,
                        digests: rec.point_digests(),
                        received_ns: crate::format::now_ns(),
                    });
                }
            }
            kind => index.records.push(IndexedRecord {
                lsn: h.lsn,
                disk: h.disk,
                zero: kind == RecordKind::Zero,
                offset: h.offset,
                length: h.length,
                payload_at: rec.payload_offset,
            }),
        }
        Ok(())
    })?;
    if let Some(fault) = &scan.fault {
        return Err(match fault.kind {
            FaultKind::Discontinuity => Error::BrokenChain(format!(
                "segment {seq} does not continue the chain (offset {}: {})",
                fault.offset, fault.what
            )),
            FaultKind::Damage | FaultKind::Invalid => {
                Error::corruption(named, fault.offset, fault.what.clone())
            }
        });
    }
    if let Some((offset, what)) = outside {
        return Err(Error::corruption(named, offset, what));
    }
    if let Some(h) = scan.header.filter(|h| h.generation > man.generation) {
        return Err(Error::InvalidInput(format!(
            "segment {seq} was written at generation {} but the replica is at generation {}",
            h.generation, man.generation
        )));
    }
    match (scan.footer, scan.first_lsn, scan.last_lsn) {
        (Some(footer), Some(first), Some(last)) => {
            index.first_lsn = first;
            index.last_lsn = last;
            index.sealed_ns = footer.sealed_ns;
            // A seal is a point (segments written before seals ended on a point record
            // have none there).
            if index.points.last().map(|p| p.lsn) != Some(last) {
                index.points.push(IndexedPoint {
                    lsn: last,
                    time_ns: footer.sealed_ns,
                    app: false,
                    digests: None,
                    received_ns: crate::format::now_ns(),
                });
            }
            Ok(index)
        }
        _ => Err(Error::corruption(
            named,
            scan.end,
            "segment is not sealed or holds no records",
        )),
    }
}
