//! The read path: index lookup with segment handles taken in the same critical
//! section, reads from segments, zeros or the parent, SEEK_DATA/SEEK_HOLE, prefetch.

use super::*;

/// Pieces of a range, the segment files they read from, and the index's
/// `parent_epoch` at the lookup.
type Resolved = (Vec<Piece>, Vec<(u64, Arc<dyn StorageFile>)>, u64);

impl MachineInner {
    /// Next data (or hole) at or after `offset` of `disk`: the index first, the parent
    /// where the index has nothing.
    pub(crate) fn seek(&self, disk: u32, offset: u64, data: bool) -> Result<Option<u64>> {
        let d = self.disk(disk)?;
        let size = d.size;
        if !self.state.read().lost.is_empty() {
            // Which ranges the damage hides is unknown: no hole is certain. All data,
            // so that a sparse-aware reader reads (and is refused) instead of
            // skipping a hole that may have been written.
            return Ok(if data {
                (offset < size).then_some(offset)
            } else {
                Some(size.max(offset))
            });
        }
        let mut pos = offset;
        while pos < size {
            let ext = {
                let st = self.state.read();
                st.disks.get(disk as usize).and_then(|m| m.at_or_after(pos))
            };
            match ext {
                Some((start, e)) if start <= pos => {
                    let is_data = !e.loc.is_zero();
                    if is_data == data {
                        return Ok(Some(pos));
                    }
                    pos = start + e.len;
                }
                other => {
                    // The parent answers for pos..next (next: the next extent or the end).
                    let next = other.map(|(s, _)| s).unwrap_or(size).min(size);
                    let found = if data {
                        d.parent().seek_data(pos)?
                    } else {
                        Some(d.parent().seek_hole(pos)?)
                    };
                    match found {
                        Some(at) if at < next => return Ok(Some(at.max(pos))),
                        _ => pos = next,
                    }
                }
            }
        }
        Ok(if data { None } else { Some(size.max(offset)) })
    }

    /// Split `offset..offset+len` of `disk` into pieces and take handles to the segment
    /// files they need, in one critical section (see the module documentation).
    pub(super) fn resolve(&self, disk: u32, offset: u64, len: u64) -> Result<Resolved> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut files: Vec<(u64, Arc<dyn StorageFile>)> = Vec::new();
        let lost;
        let epoch;
        {
            let st = self.state.read();
            lost = Self::lost(&st);
            epoch = st.parent_epoch;
            if let Some(map) = st.disks.get(disk as usize) {
                map.lookup(offset, len, &mut pieces);
            }
            for p in &pieces {
                if let Some(loc) = p.loc {
                    if let Some(why) = st.damaged.get(&loc.segment()) {
                        return Err(Error::corruption(&self.dir, p.start, why.clone()));
                    }
                }
                if let Some(Location::Segment { seq, .. }) = p.loc {
                    if !files.iter().any(|(s, _)| *s == seq) {
                        let f = st.files.get(&seq).ok_or_else(|| {
                            Error::corruption(
                                &self.dir,
                                0,
                                format!("index points into unknown segment {seq}"),
                            )
                        })?;
                        files.push((seq, f.clone()));
                    }
                }
            }
        }
        if pieces.is_empty() {
            pieces.push(Piece {
                start: offset,
                len,
                loc: None,
            });
        }
        // Damage recovery could not read past: a range whose newest verified data is
        // that old may have been written after the damage.
        if let Some((seq, why)) = lost {
            if let Some(p) = pieces
                .iter()
                .find(|p| p.loc.is_none_or(|l| l.segment() <= seq))
            {
                return Err(Error::corruption(
                    &self.dir,
                    p.start,
                    format!("may have been written after the damage in segment {seq} ({why})"),
                ));
            }
        }
        Ok((pieces, files, epoch))
    }

    /// Start reading a range into the page cache (for sequential readers); with
    /// `direct`, what the parent answers into the disk's read-ahead slots instead.
    pub(super) fn prefetch(&self, disk: u32, offset: u64, len: u64, direct: bool) -> Result<()> {
        let d = self.disk(disk)?;
        let len = len.min(d.size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let (pieces, files, epoch) = self.resolve(disk, offset, len)?;
        let parent = d.parent();
        for p in pieces {
            match p.loc {
                None if direct => d.ahead.schedule(&parent, epoch, p.start, p.len, d.size),
                None => parent.prefetch(p.start, p.len),
                Some(Location::Segment { seq, offset: at }) => {
                    if let Some((_, f)) = files.iter().find(|(s, _)| *s == seq) {
                        f.prefetch(at, p.len);
                    }
                }
                Some(Location::Zero { .. }) => {}
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of disk `disk`; with `direct`, what the
    /// parent answers is read around the page cache (see `StorageFile::read_direct`).
    pub(super) fn read(&self, disk: u32, offset: u64, buf: &mut [u8], direct: bool) -> Result<()> {
        let d = self.disk(disk)?;
        self.check_range(d, "read", offset, buf.len() as u64)?;
        let (pieces, files, epoch) = self.resolve(disk, offset, buf.len() as u64)?;
        let parent = d.parent();
        for p in pieces {
            let from = (p.start - offset) as usize;
            let Some(dst) = buf.get_mut(from..from + p.len as usize) else {
                continue;
            };
            match p.loc {
                Some(Location::Zero { .. }) => dst.fill(0),
                Some(Location::Segment { seq, offset: at }) => {
                    let f = files.iter().find(|(s, _)| *s == seq).map(|(_, f)| f);
                    if let Some(f) = f {
                        f.read_exact_at(dst, at)?;
                    }
                }
                None if direct => {
                    let hit = d.ahead.read(&parent, epoch, p.start, dst)?;
                    crate::metrics::get().read_ahead(hit as u64, dst.len() as u64);
                }
                None => {
                    let n = parent.read_at(dst, p.start)?;
                    if let Some(rest) = dst.get_mut(n..) {
                        rest.fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}
