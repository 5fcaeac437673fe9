//! The write path: appends (records into the active segment, extents into the index,
//! digests kept current), points, seals, and flush as a group commit.

use super::*;

impl MachineInner {
    /// Append records for a write or zero range, update the index, rotate if due.
    pub(super) fn append(
        &self,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<u64> {
        let d = self.disk(disk)?;
        self.check_range(
            d,
            if kind == RecordKind::Write {
                "write"
            } else {
                "zero"
            },
            offset,
            len,
        )?;
        if len == 0 {
            return Ok(self.writer.lock().last_lsn());
        }
        let mut w = self.writer.lock();
        self.check_poison()?;
        self.check_fence()?;
        self.append_locked(&mut w, disk, kind, offset, len, data, true)?;
        let lsn = w.last_lsn();
        if w.wants_rotation() {
            self.seal_locked(&mut w)?;
        }
        let writeback = w.take_writeback();
        drop(w);
        if let Some((file, from, len)) = writeback {
            file.start_writeback(from, len);
        }
        self.last_append_ns
            .store(crate::format::now_ns(), Ordering::Relaxed);
        Ok(lsn)
    }

    /// Append records for a range and index them, the writer lock held (`append`'s
    /// core; also used to mend damaged ranges).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn append_locked(
        &self,
        w: &mut JournalWriter,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        digest: bool,
    ) -> Result<()> {
        let mut placed = Vec::new();
        let step = u64::from(MAX_PAYLOAD);
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(if kind == RecordKind::Write { step } else { len });
            let payload = match kind {
                RecordKind::Write => data.get(at as usize..(at + n) as usize).unwrap_or(&[]),
                _ => &[],
            };
            let a = w
                .append(kind, 0, disk, offset + at, n, payload)
                .map_err(|e| self.poison(&e))?;
            placed.push((a, offset + at, n));
            at += n;
        }
        {
            let mut st = self.state.write();
            for (a, off, n) in &placed {
                apply_to_index(&mut st, a.seq, kind, disk, *off, *n, a.payload_offset);
            }
        }
        if digest {
            self.update_digest(disk, kind, offset, len, data)
                .map_err(|e| self.poison(&e))?;
        }
        Ok(())
    }

    /// Keep the disk's digest current after a write or zero range was indexed (the
    /// writer lock is held, so no other write can come between). Partial blocks are
    /// read back through the index.
    pub(super) fn update_digest(
        &self,
        disk: u32,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<()> {
        let mut g = self.digests.lock();
        let Some(d) = g.as_mut().and_then(|v| v.get_mut(disk as usize)) else {
            return Ok(());
        };
        let mut read = |at: u64, buf: &mut [u8]| self.read(disk, at, buf, false);
        match kind {
            RecordKind::Write => d.write(offset, data, &mut read),
            _ => d.zero(offset, len, &mut read),
        }
    }

    /// The digests a point appended now carries.
    pub(super) fn point_digests(&self) -> Option<Vec<u64>> {
        self.digests
            .lock()
            .as_ref()
            .map(|v| v.iter().map(DiskDigest::value).collect())
    }

    /// Append a point record (the writer lock held).
    pub(super) fn append_point_locked(&self, w: &mut JournalWriter, app: bool) -> Result<Point> {
        self.append_tagged_point_locked(w, app, None)
    }

    /// Append a point record that belongs to plan point `plan_point` (the writer lock
    /// held).
    pub(super) fn append_tagged_point_locked(
        &self,
        w: &mut JournalWriter,
        app: bool,
        plan_point: Option<u64>,
    ) -> Result<Point> {
        let p = w
            .append_point(app, self.point_digests(), plan_point)
            .map_err(|e| self.poison(&e))?;
        self.points.lock().push(p);
        Ok(p)
    }

    /// Start keeping digests: compute every disk's from its contents (reading only
    /// where there is data), with the writer lock held so no write slips past.
    pub(crate) fn keep_digests(&self) -> Result<()> {
        let w = self.writer.lock();
        if self.digests.lock().is_some() {
            return Ok(());
        }
        let mut all = Vec::new();
        for (id, d) in self.disks.iter().enumerate() {
            let id = id as u32;
            let mut ranges = Vec::new();
            let mut pos = 0;
            while pos < d.size {
                let Some(start) = self.seek(id, pos, true)? else {
                    break;
                };
                let end = self.seek(id, start, false)?.unwrap_or(d.size).min(d.size);
                ranges.push((start, end));
                pos = end.max(start + 1);
            }
            let mut dd = DiskDigest::zeroed(d.size);
            // The per-block CRCs of the data ranges (each block read once, only as much
            // as the range needs); the rest stay zero blocks.
            let step = 1u64 << 20;
            let mut buf = vec![0u8; step as usize];
            let mut next = 0u64; // first block not yet read
            for &(start, end) in &ranges {
                let mut at = (start / crate::digest::BLOCK).max(next) * crate::digest::BLOCK;
                let stop = (end.div_ceil(crate::digest::BLOCK) * crate::digest::BLOCK).min(d.size);
                while at < stop {
                    let n = step.min(stop - at) as usize;
                    let b = buf.get_mut(..n).unwrap_or(&mut []);
                    self.read(id, at, b, false)?;
                    for (k, blk) in b.chunks(crate::digest::BLOCK as usize).enumerate() {
                        dd.set(
                            at / crate::digest::BLOCK + k as u64,
                            crate::crc::crc32c(blk),
                        );
                    }
                    at += n as u64;
                }
                next = stop.div_ceil(crate::digest::BLOCK);
            }
            all.push(dd);
        }
        *self.digests.lock() = Some(all);
        drop(w);
        Ok(())
    }

    /// Seal with the writer lock held. A segment always ends on a point record, so
    /// every seal is a point with digests.
    pub(crate) fn seal_locked(&self, w: &mut JournalWriter) -> Result<Option<u64>> {
        if w.has_unpointed_writes() {
            self.append_point_locked(w, false)?;
        }
        let sealed = match w.seal() {
            Ok(s) => s,
            Err(e) => return Err(self.poison(&e)),
        };
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let last = sealed.last_lsn;
        self.state
            .write()
            .files
            .insert(w.active_seq(), w.active_file());
        self.points.lock().push(Point {
            lsn: last,
            time_ns: sealed.sealed_ns,
            kind: PointKind::Seal,
        });
        self.sealed.lock().insert(sealed.seq, sealed);
        {
            let mut s = self.sync.lock();
            s.durable_lsn = s.durable_lsn.max(last);
        }
        self.sync_cv.notify_all();
        if let Some(kick) = self.compactor_kick.lock().as_ref() {
            let _ = kick.try_send(());
        }
        Ok(Some(last))
    }

    /// Group commit: see the module documentation.
    pub(crate) fn flush(&self) -> Result<u64> {
        self.check_poison()?;
        let target = {
            let mut w = self.writer.lock();
            self.check_poison()?;
            if w.has_unpointed_writes() {
                self.append_point_locked(&mut w, false)?;
            }
            let t = w.last_lsn();
            if w.wants_rotation() {
                self.seal_locked(&mut w)?;
            }
            t
        };
        self.sync_to(target)?;
        Ok(target)
    }

    /// Append a point (app-consistent or not) and make it durable.
    pub(crate) fn checkpoint(&self, app: bool) -> Result<Point> {
        let p = {
            let mut w = self.writer.lock();
            self.check_poison()?;
            // A point, unlike a write, is taken from a fenced machine; a closed one
            // takes none through this handle.
            self.check_closed()?;
            self.append_point_locked(&mut w, app)?
        };
        self.sync_to(p.lsn)?;
        Ok(p)
    }

    pub(super) fn sync_to(&self, target: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            self.check_poison()?;
            if s.durable_lsn >= target {
                return Ok(());
            }
            if !s.in_progress {
                s.in_progress = true;
                break;
            }
            self.sync_cv.wait(&mut s);
        }
        drop(s);
        // This caller leads: one fdatasync covers every record appended so far, its own
        // and those of every caller now waiting.
        let (file, lsn) = {
            let w = self.writer.lock();
            (w.active_file(), w.last_lsn())
        };
        let res = file.sync_data();
        let mut s = self.sync.lock();
        s.in_progress = false;
        let out = match res {
            Ok(()) => {
                s.durable_lsn = s.durable_lsn.max(lsn);
                Ok(())
            }
            Err(e) => Err(self.poison(&e)),
        };
        drop(s);
        self.sync_cv.notify_all();
        out
    }
}
