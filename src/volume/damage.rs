//! Damage found in segments after they were opened: never served, listed for the
//! resync, and mended by rewriting the ranges as new writes.

use super::*;

/// A range whose newest data lies in a damaged segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub seq: u64,
    pub disk: u32,
    pub offset: u64,
    pub len: u64,
    /// The data, when its record still verifies (it lies before the damage).
    pub data: Option<Vec<u8>>,
}

impl MachineInner {
    /// A segment turned out damaged: stop serving it and poison the machine (the
    /// damage must be mended, by resynchronisation, before anything continues).
    pub(crate) fn damaged(&self, seq: u64, err: Error) -> Error {
        tracing::error!(machine = %self.name, "segment {seq} is damaged: {err}");
        self.state.write().damaged.insert(seq, err.to_string());
        self.poison_with(&err);
        err
    }
}

impl Machine {
    /// Whether a segment of this machine was found damaged (and is not mended yet).
    pub fn has_damage(&self) -> bool {
        !self.inner.state.read().damaged.is_empty()
    }

    /// Whether the machine refuses writes (a failed write or sync, or damage found).
    pub fn is_poisoned(&self) -> bool {
        self.inner.is_poisoned()
    }

    /// A segment turned out damaged (the shipper's check before sending): its data is
    /// not served any more and the machine stops taking writes until it is mended.
    pub fn report_damage(&self, seq: u64, err: Error) -> Error {
        self.inner.damaged(seq, err)
    }

    /// Every range whose newest data lies in a damaged segment, with the data where
    /// the segment's records still verify up to it.
    pub fn damaged_ranges(&self) -> Result<Vec<DamagedRange>> {
        let inner = &self.inner;
        let st = inner.state.read();
        let mut out = Vec::new();
        for &seq in st.damaged.keys() {
            let Some(file) = st.files.get(&seq) else {
                continue;
            };
            // Records wholly before the first fault still verify.
            let first_lsn = inner.sealed.lock().get(&seq).map(|g| g.first_lsn);
            let expect = Expect {
                machine_id: Some(inner.machine_id),
                seq: Some(seq),
                first_lsn,
                disk_count: Some(inner.disks.len() as u32),
            };
            let good_until =
                match crate::journal::reader::scan_segment(file.as_ref(), expect, |_| Ok(())) {
                    Ok(scan) => scan.fault.map_or(scan.end, |f| f.offset),
                    Err(_) => 0,
                };
            for (d, map) in st.disks.iter().enumerate() {
                for (start, e) in map.iter() {
                    if e.loc.segment() != seq {
                        continue;
                    }
                    let data = match e.loc {
                        Location::Segment { offset, .. } if offset + e.len <= good_until => {
                            let mut buf = vec![0u8; e.len as usize];
                            file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
                        }
                        _ => None,
                    };
                    out.push(DamagedRange {
                        seq,
                        disk: d as u32,
                        offset: start,
                        len: e.len,
                        data,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Mend damaged segments: rewrite each range (`data` for every range
    /// [`Machine::damaged_ranges`] gave) as new writes — only where the range still
    /// reads from the damaged segment — then let the machine take writes again and
    /// have merges skip those segments. Refused if a write or sync failed too.
    pub fn mend(&self, ranges: &[(DamagedRange, Vec<u8>)]) -> Result<()> {
        let inner = &self.inner;
        if inner.poisoned_by_io.load(Ordering::Acquire) {
            return inner.check_poison();
        }
        let mut w = inner.writer.lock();
        // Digests after every piece is in: a partial block read back before that could
        // still reach into the damaged segment.
        let mut written: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        for (r, data) in ranges {
            if data.len() as u64 != r.len {
                return Err(Error::InvalidInput(format!(
                    "mend of {}+{} with {} bytes",
                    r.offset,
                    r.len,
                    data.len()
                )));
            }
            // Only the pieces still in the damaged segment (a newer write wins).
            let mut pieces = Vec::new();
            if let Some(map) = inner.state.read().disks.get(r.disk as usize) {
                map.lookup(r.offset, r.len, &mut pieces);
            }
            for p in pieces {
                if p.loc.map(Location::segment) != Some(r.seq) {
                    continue;
                }
                let from = (p.start - r.offset) as usize;
                let piece = data.get(from..from + p.len as usize).unwrap_or(&[]);
                inner.append_locked(
                    &mut w,
                    r.disk,
                    RecordKind::Write,
                    p.start,
                    p.len,
                    piece,
                    false,
                )?;
                written.push((r.disk, p.start, piece.to_vec()));
            }
        }
        let still = {
            let st = inner.state.read();
            st.disks.iter().any(|m| {
                m.iter()
                    .any(|(_, e)| st.damaged.contains_key(&e.loc.segment()))
            })
        };
        if still {
            return Err(Error::InvalidInput(
                "damaged ranges remain after mending".into(),
            ));
        }
        {
            let mut st = inner.state.write();
            let seqs: Vec<u64> = st.damaged.keys().copied().collect();
            inner.mended.lock().extend(seqs);
            st.damaged.clear();
        }
        for (disk, at, piece) in &written {
            inner
                .update_digest(*disk, RecordKind::Write, *at, piece.len() as u64, piece)
                .map_err(|e| inner.poison(&e))?;
        }
        *inner.poison_reason.lock() = None;
        inner.poisoned.store(false, Ordering::Release);
        if w.wants_rotation() {
            inner.seal_locked(&mut w)?;
        }
        drop(w);
        tracing::warn!(machine = %inner.name, "damaged segments mended ({} ranges rewritten)", ranges.len());
        inner.flush().map(|_| ())
    }
}
