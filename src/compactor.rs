//! The compactor: merges sealed segments into the parent images and deletes them.
//!
//! Order, for crash safety (each step durable before the next begins):
//! 1. write every record of the batch into the parents (in LSN order);
//! 2. fdatasync every parent touched;
//! 3. drop the batch's extents from the index (reads now go to the parents, which hold
//!    the same bytes — so compaction never changes what a read returns);
//! 4. persist the merge watermark (atomic rename);
//! 5. delete the segment files.
//!
//! A crash before 4 leaves the segments in place and they are merged again (merging is
//! idempotent); a crash between 4 and 5 leaves merged segments that recovery deletes.
//!
//! Holds (`crate::holds`) keep the watermark back: only segments whose last LSN is at
//! or below every hold are merged.

use crate::error::{Error, Result};
use crate::format::meta::Watermark;
use crate::format::RecordKind;
use crate::journal::reader::{scan_segment, Expect};
use crate::storage::write_atomic;
use crate::volume::{MachineInner, JOURNAL_DIR, WATERMARK_FILE};
use crossbeam::channel::{bounded, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// When the background compactor merges.
#[derive(Debug, Clone, Copy)]
pub struct CompactPolicy {
    /// How often it looks.
    pub interval: Duration,
    /// Merge once this many bytes of sealed segments may be merged…
    pub min_bytes: u64,
    /// …or once no write came for this long.
    pub idle: Duration,
}

impl CompactPolicy {
    /// Merge every sealed segment as soon as it may be (tests, tools).
    pub fn eager(interval: Duration) -> Self {
        CompactPolicy {
            interval,
            min_bytes: 0,
            idle: Duration::ZERO,
        }
    }

    fn due(&self, m: &MachineInner) -> bool {
        let limit = m.holds.limit();
        let (count, bytes) = m
            .sealed
            .lock()
            .values()
            .take_while(|s| s.last_lsn <= limit)
            .fold((0usize, 0u64), |(c, b), s| (c + 1, b + s.bytes));
        if count == 0 {
            return false;
        }
        let idle_ns = crate::format::now_ns().saturating_sub(m.last_append_ns());
        bytes >= self.min_bytes || u128::from(idle_ns) >= self.idle.as_nanos()
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub watermark: u64,
}

/// Merge every sealed segment that the holds allow.
pub(crate) fn compact_once(m: &MachineInner) -> Result<CompactStats> {
    compact_batch(m, u64::MAX)
}

/// What the background compactor merges in one pass, at most (at least one segment):
/// it goes on at once while merging is due, but between passes other I/O on the disk
/// — the guest's, a target's fsyncs — is not queued behind one sync of everything.
const BACKGROUND_BATCH_BYTES: u64 = 128 << 20;

/// Merge the oldest sealed segments the holds allow, up to `max_bytes` of them (at
/// least one).
fn compact_batch(m: &MachineInner, max_bytes: u64) -> Result<CompactStats> {
    let _one_at_a_time = m.compaction.lock();
    m.check_poison()?;
    let limit = m.holds.limit();
    let mut taken = 0u64;
    let batch: Vec<_> = m
        .sealed
        .lock()
        .values()
        .take_while(|s| s.last_lsn <= limit)
        .take_while(|s| {
            let first = taken == 0;
            taken = taken.saturating_add(s.bytes);
            first || taken <= max_bytes
        })
        .cloned()
        .collect();
    let Some(last) = batch.last() else {
        return Ok(CompactStats::default());
    };
    let new_mark = Watermark {
        lsn: last.last_lsn,
        segment_seq: last.seq,
    };
    let mut stats = CompactStats {
        segments: batch.len(),
        watermark: new_mark.lsn,
        ..Default::default()
    };

    // The parents are about to change: a crash from here until the stamp is written
    // again must not look like a change made while replog was not running.
    m.mark_parents_merging();
    // 1. Parents get every record, oldest first. A record superseded by a newer one
    // is still written: the newer one may not be durable yet.
    let mut touched = vec![false; m.disks.len()];
    // A machine keeping a changed-block map records what it merges (see
    // `volume::ChangedMap`).
    let tracking = m.changed.lock().is_some();
    let mut merged: Vec<(u32, u64, u64)> = Vec::new();
    let sizes: Vec<u64> = m.disks.iter().map(|d| d.size).collect();
    for seg in &batch {
        if m.mended.lock().contains(&seg.seq) {
            // Damaged, and every live range of it was rewritten since: nothing of it
            // is needed (newer records hold its ranges).
            continue;
        }
        let expect = Expect {
            machine_id: Some(m.machine_id),
            seq: Some(seg.seq),
            first_lsn: Some(seg.first_lsn),
            disk_count: Some(m.disks.len() as u32),
        };
        let scan = scan_segment(seg.file.as_ref(), expect, |rec| {
            let h = &rec.header;
            let Some(disk) = m.disks.get(h.disk as usize) else {
                return Ok(());
            };
            if let Some(what) = crate::volume::record_outside_disk(h, &sizes) {
                return Err(Error::corruption(seg.file.path(), rec.offset, what));
            }
            match h.kind {
                // Large aligned records (1 MiB guest writes) go around the page
                // cache: the merge's copy into it cost as much CPU as the append's.
                RecordKind::Write => disk.parent().write_bulk(rec.payload, h.offset)?,
                RecordKind::Zero => disk.parent().punch_hole(h.offset, h.length)?,
                RecordKind::Point => return Ok(()),
            }
            if let Some(t) = touched.get_mut(h.disk as usize) {
                *t = true;
            }
            if tracking {
                merged.push((h.disk, h.offset, h.length));
            }
            stats.records += 1;
            stats.bytes += h.length;
            Ok(())
        })
        .map_err(|e| {
            if e.is_corruption() {
                m.damaged(seg.seq, e)
            } else {
                fail(m, e)
            }
        })?;
        if let Some(err) = scan.fault_error(seg.file.as_ref()) {
            // Damage found after the segment was verified on open: its data must not
            // be served any more, and nothing may be merged past it.
            return Err(m.damaged(seg.seq, err));
        }
        if !scan.is_sealed() {
            return Err(Error::corruption(
                seg.file.path(),
                scan.end,
                "sealed segment lost its footer",
            ));
        }
        // Start writing this segment's share back now (whole file: len 0 is "to the
        // end"), so the sync below is short: one sync of a 512 MiB batch queued it all
        // at once and stalled every other fsync on the disk — the shipping target's
        // among them — for seconds (ext4 commits wait for that data).
        for (disk, t) in m.disks.iter().zip(&touched) {
            if *t {
                disk.parent().start_writeback(0, 0);
            }
        }
    }
    // 2. Parents durable.
    for (disk, t) in m.disks.iter().zip(&touched) {
        if *t {
            disk.parent().sync_data().map_err(|e| fail(m, e))?;
        }
    }
    // 3. Reads move to the parents; what was read from them before is stale
    // (`volume::ahead`).
    {
        let mut st = m.state.write();
        for seg in &batch {
            for map in st.disks.iter_mut() {
                map.remove_segment(seg.seq);
            }
        }
        st.parent_epoch += 1;
    }
    // The parents as replog leaves them (so a change made while it is not running
    // shows).
    m.write_parents_stamp();
    // The changed-block map holds the batch before the journal stops holding it.
    if tracking {
        let mut changed = m.changed.lock();
        if let Some(map) = changed.as_mut() {
            let mut next = map.clone();
            for (d, o, l) in &merged {
                next.add(*d, *o, *l);
            }
            next.save(m.storage.as_ref(), &m.dir)
                .map_err(|e| fail(m, e))?;
            *map = next;
        }
    }
    // 4. Watermark durable.
    let mark_path = m.dir.join(JOURNAL_DIR).join(WATERMARK_FILE);
    write_atomic(m.storage.as_ref(), &mark_path, &new_mark.encode()).map_err(|e| fail(m, e))?;
    *m.watermark.lock() = new_mark;
    m.points.lock().retain(|p| p.lsn > new_mark.lsn);
    // 5. Segments go.
    let sealed_bytes: u64 = {
        let mut st = m.state.write();
        let mut sealed = m.sealed.lock();
        for seg in &batch {
            st.files.remove(&seg.seq);
            sealed.remove(&seg.seq);
        }
        sealed.values().map(|s| s.bytes).sum()
    };
    // Kept as spares to be written again (see `journal::spare`) where they may be,
    // removed otherwise.
    let jdir = m.dir.join(JOURNAL_DIR);
    for seg in &batch {
        // A segment that was damaged (bit rot) is not written again.
        let damaged = m.mended.lock().contains(&seg.seq);
        let kept = !damaged
            && m.spares
                .offer(
                    m.storage.as_ref(),
                    &jdir,
                    seg.seq,
                    &seg.file,
                    seg.bytes,
                    sealed_bytes,
                )
                .map_err(|e| fail(m, e))?;
        if !kept {
            m.storage
                .remove_file(seg.file.path())
                .map_err(|e| fail(m, e))?;
        }
    }
    m.storage
        .sync_dir(&m.dir.join(JOURNAL_DIR))
        .map_err(|e| fail(m, e))?;
    tracing::debug!(machine = %m.name, segments = stats.segments, watermark = stats.watermark, "compacted");
    Ok(stats)
}

/// An I/O failure while merging: parents may hold part of the batch, which is harmless
/// (the segments stay), but after a failed fdatasync nothing later can be trusted. We
/// do not tell a failed sync from other I/O failures here: any of them poisons.
fn fail(m: &MachineInner, e: Error) -> Error {
    if matches!(e, Error::Io { .. }) {
        m.poison(&e)
    } else {
        e
    }
}

/// Run the calling thread at a lower CPU priority (nice 10): merging is background
/// work, and on a machine with few cores it took CPU from the FUSE threads serving
/// the guest (during a 1 GiB fio write the compactor used more CPU than the four
/// FUSE threads together). It still gets its share, so a busy guest cannot starve it
/// and the journal stays bounded.
pub(crate) fn background_priority() {
    // SAFETY: gettid and setpriority take plain integers; PRIO_PROCESS with a thread
    // ID changes that thread only (Linux).
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// The background compactor thread of one machine.
#[derive(Debug)]
pub(crate) struct Compactor {
    stop: crossbeam::channel::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Compactor {
    pub fn spawn(m: Arc<MachineInner>, policy: CompactPolicy) -> Self {
        let interval = policy.interval;
        let (kick_tx, kick_rx) = bounded::<()>(1);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        *m.compactor_kick.lock() = Some(kick_tx);
        let thread = std::thread::Builder::new()
            .name(format!("compactor-{}", m.name))
            .spawn(move || {
                background_priority();
                loop {
                    crossbeam::channel::select! {
                        recv(stop_rx) -> _ => return,
                        recv(kick_rx) -> _ => {}
                        default(interval) => {}
                    }
                    // Batch after batch while merging is due (BACKGROUND_BATCH_BYTES).
                    while !m.is_poisoned() && policy.due(&m) {
                        match compact_batch(&m, BACKGROUND_BATCH_BYTES) {
                            Ok(st) if st.segments > 0 => {}
                            Ok(_) => break,
                            Err(e) => {
                                tracing::error!(machine = %m.name, "compaction failed: {e}");
                                match stop_rx.recv_timeout(interval * 10) {
                                    Err(RecvTimeoutError::Timeout) => break,
                                    _ => return,
                                }
                            }
                        }
                        if stop_rx.try_recv().is_ok() {
                            return;
                        }
                    }
                }
            })
            .ok();
        Compactor {
            stop: stop_tx,
            thread,
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.send(());
            let _ = t.join();
        }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.shutdown();
    }
}
