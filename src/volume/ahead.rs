//! Read-ahead for sequential O_DIRECT readers: the parent image read with O_DIRECT
//! into buffers of replog's own, in front of the reader (`frontend::ReadPath`).
//!
//! An O_DIRECT reader (a VM with cache=none, a database) whose sequential run is read
//! around the page cache (the default; every O_DIRECT read with `--direct-reads`) gets
//! no readahead from the kernel, and at queue depth 1 it would wait for the disk on
//! every request. This keeps up to [`SLOTS`] slots of [`SLOT`] bytes per disk, each
//! filled with O_DIRECT reads on a pool of [`FILLERS`] threads shared by every disk,
//! in front of a reader the front end saw reading sequentially. Each slot's buffer is
//! one huge page (`storage::DirectBuf`), filled in reads of [`FILL_READ`], each one
//! request to the device (from small pages, two). A disk's buffers (at
//! most [`SLOTS`], slots and free list together) are reused from slot to slot, and let
//! go by the first sweep ([`SWEEP_EVERY`]) after its readers have asked for no
//! read-ahead for [`IDLE`]: while a reader streams they are not page-cache memory that
//! is freed and taken again (on a VM whose balloon hands free memory back to its host,
//! taking it again is what made buffered first reads slow, docs/FUSE.md). The
//! fillers' queue is first in, first out across disks; a reader that finds its slot
//! still queued reads for itself rather than wait behind other disks' fills. A slot is
//! let go once readers have copied `len` bytes out of it, or when the disk needs room
//! (never while it is being read, nor for a slot the same prefetch asked for), or
//! when it is stale (another epoch or parent file), or by the sweep.
//!
//! What a slot holds is the parent's bytes as they were when its fill began. A read
//! uses a slot only for the pieces the index says the parent answers, and only if
//! neither the parent's contents nor the parent file changed since: the merge bumps
//! the index's `parent_epoch` in the same critical section that moves reads from its
//! segments to the parents (after writing them), and a read takes the epoch in the
//! critical section of its lookup. A range the index hands to the parent was not
//! written by a merge still in progress (its records are in the index until the
//! bump), so a slot filled at the reader's epoch holds that range's current bytes. A
//! fold that swaps the parent file is caught by the file itself (`Arc::ptr_eq`).

use crate::error::Result;
use crate::storage::{DirectBuf, StorageFile, HUGE_PAGE};
use crossbeam::channel::RecvTimeoutError;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Bytes per slot, one huge page (`storage::DirectBuf`); slots start at multiples of
/// it.
pub(crate) const SLOT: u64 = HUGE_PAGE as u64;
/// A fill reads its slot in O_DIRECT reads of this much, one after the other: from a
/// huge page each is one request to the device, and on the VMs measured 1 MiB
/// requests ran at 2.4–2.5 GB/s at depth 4 where 2 MiB ones ran at 1.6–1.9
/// (docs/FUSE.md).
const FILL_READ: usize = 1 << 20;
/// Slots per disk (32 MiB): a reader at queue depth 16 has 16 MiB of requests in
/// flight, and the front end's window asks for 16 MiB past them.
pub(crate) const SLOTS: usize = 16;
/// Threads that fill slots, for every disk of the process.
const FILLERS: usize = 4;
/// A disk whose readers asked for no read-ahead for this long lets its slots and
/// buffers go…
const IDLE: Duration = Duration::from_secs(10);
/// …found by a sweep this often.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One slot's state.
#[derive(Debug)]
enum Fill {
    /// Its read waits for a filler.
    Queued,
    /// A filler is reading it.
    Reading,
    /// Its read ended: the buffer and how many bytes of the range it holds (fewer
    /// only at the parent's end).
    Ready { buf: DirectBuf, n: usize },
    /// Not read here (its read failed, or a reader found it queued and read for
    /// itself): readers read for themselves (and see any error). The buffer, once
    /// the filler let it go, to be used again.
    Unread(Option<DirectBuf>),
}

#[derive(Debug)]
struct Slot {
    start: u64,
    len: usize,
    epoch: u64,
    parent: Arc<dyn StorageFile>,
    fill: Mutex<Fill>,
    done: Condvar,
    /// The disk's slots, whose free list takes the buffer back if a reader read this
    /// slot's range for itself before a filler came to it.
    home: Weak<Mutex<AheadState>>,
    /// Bytes readers have copied out of it: at `len`, it is let go (requests smaller
    /// than a slot, answered in any order, each take a part).
    taken: AtomicUsize,
}

/// Ends a slot's `Reading` state if its read unwinds (a panic), so that no reader
/// waits for it for ever.
struct Unwinding<'a>(&'a Slot);

impl Drop for Unwinding<'_> {
    fn drop(&mut self) {
        let mut fill = self.0.fill.lock();
        if matches!(*fill, Fill::Reading) {
            *fill = Fill::Unread(None);
            self.0.done.notify_all();
        }
    }
}

impl Slot {
    fn matches(&self, parent: &Arc<dyn StorageFile>, epoch: u64) -> bool {
        self.epoch == epoch && Arc::ptr_eq(&self.parent, parent)
    }

    /// Not read yet, or being read.
    fn pending(&self) -> bool {
        matches!(*self.fill.lock(), Fill::Queued | Fill::Reading)
    }

    /// Run on a filler: read the slot's range into `buf` (a new one if None or too
    /// small), unless a reader got there first and read for itself.
    fn run(&self, buf: Option<DirectBuf>) {
        {
            let mut fill = self.fill.lock();
            if !matches!(*fill, Fill::Queued) {
                drop(fill);
                if let (Some(home), Some(buf)) = (self.home.upgrade(), buf) {
                    home.lock().keep(buf);
                }
                return;
            }
            *fill = Fill::Reading;
        }
        let unwinding = Unwinding(self);
        let next = match DirectBuf::reuse(buf, self.len) {
            Err(e) => {
                tracing::debug!("read-ahead buffer: {e}");
                Fill::Unread(None)
            }
            Ok(mut buf) => match read_in_pieces(&*self.parent, buf.as_mut_slice(), self.start) {
                Ok(n) => Fill::Ready { buf, n },
                Err(e) => {
                    tracing::debug!(
                        "read-ahead of {:?} at {}: {e}",
                        self.parent.path(),
                        self.start
                    );
                    Fill::Unread(Some(buf))
                }
            },
        };
        *self.fill.lock() = next;
        self.done.notify_all();
        drop(unwinding);
    }
}

/// Fill `area` from `parent` at `offset` in reads of [`FILL_READ`]; the bytes read
/// (fewer only at the parent's end).
fn read_in_pieces(parent: &dyn StorageFile, area: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    for piece in area.chunks_mut(FILL_READ) {
        let want = piece.len();
        let n = parent.read_direct(piece, offset + done as u64)?;
        done += n;
        if n < want {
            break;
        }
    }
    Ok(done)
}

/// A disk's read-ahead slots and the buffers it keeps for them.
#[derive(Debug, Default)]
pub(crate) struct DirectAhead {
    state: Arc<Mutex<AheadState>>,
}

#[derive(Debug, Default)]
struct AheadState {
    /// Oldest first.
    slots: Vec<Arc<Slot>>,
    /// Buffers of slots let go, to be filled again.
    free: Vec<DirectBuf>,
    /// When a read-ahead was last asked for (None: never).
    used: Option<Instant>,
}

impl AheadState {
    /// Let slot `i` go, keeping its buffer if its read ended.
    fn evict(&mut self, i: usize) {
        let slot = self.slots.remove(i);
        let fill = std::mem::replace(&mut *slot.fill.lock(), Fill::Unread(None));
        if let Fill::Ready { buf, .. } | Fill::Unread(Some(buf)) = fill {
            self.keep(buf);
        }
    }

    /// Keep `buf` to be filled again, as long as the disk's buffers stay within
    /// [`SLOTS`], and none once the disk was swept idle.
    fn keep(&mut self, buf: DirectBuf) {
        if self.used.is_some() && self.slots.len() + self.free.len() < SLOTS {
            self.free.push(buf);
        }
    }
}

/// Every disk that has had read-ahead, for the sweep of idle ones.
static DISKS: Mutex<Vec<Weak<Mutex<AheadState>>>> = Mutex::new(Vec::new());

/// Let go of the slots and buffers of every disk that asked for no read-ahead in the
/// last `idle` (its reader stopped, or moved on): their memory goes back.
fn sweep(idle: Duration) {
    let disks: Vec<_> = {
        let mut all = DISKS.lock();
        all.retain(|d| d.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    for disk in disks {
        sweep_disk(&disk, idle, Instant::now());
    }
}

/// [`sweep`] of one disk, as of `now`. Slots still being read stay, and the disk with
/// them: the next sweep lets them go.
fn sweep_disk(disk: &Mutex<AheadState>, idle: Duration, now: Instant) {
    let mut st = disk.lock();
    if st
        .used
        .is_some_and(|at| now.saturating_duration_since(at) >= idle)
    {
        let mut i = 0;
        while let Some(s) = st.slots.get(i) {
            if s.pending() {
                i += 1;
            } else {
                st.evict(i);
            }
        }
        st.free = Vec::new();
        if st.slots.is_empty() {
            st.used = None;
        }
    }
}

/// The pool's queue (started on first use). The first filler also sweeps idle disks,
/// every [`SWEEP_EVERY`].
fn fillers() -> &'static crossbeam::channel::Sender<(Arc<Slot>, Option<DirectBuf>)> {
    static POOL: OnceLock<crossbeam::channel::Sender<(Arc<Slot>, Option<DirectBuf>)>> =
        OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = crossbeam::channel::unbounded::<(Arc<Slot>, Option<DirectBuf>)>();
        for i in 0..FILLERS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("read-ahead-{i}"))
                .spawn(move || {
                    let mut swept = Instant::now();
                    loop {
                        // Only the sweeper wakes without work.
                        let next = if i == 0 {
                            rx.recv_timeout(SWEEP_EVERY)
                        } else {
                            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                        };
                        match next {
                            Ok((slot, buf)) => {
                                // A panic ends the slot's read (`Unwinding`), not the
                                // filler.
                                let run = std::panic::AssertUnwindSafe(|| slot.run(buf));
                                let _ = std::panic::catch_unwind(run);
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                        if i == 0 && swept.elapsed() >= SWEEP_EVERY {
                            sweep(IDLE);
                            swept = Instant::now();
                        }
                    }
                });
            if let Err(e) = spawned {
                // With no filler at all, every send fails and its slot is unread at
                // once: readers read for themselves.
                tracing::warn!("could not start a read-ahead thread: {e}");
            }
        }
        tx
    })
}

impl DirectAhead {
    /// Start filling the slots that cover `offset..offset+len` of `parent` (a disk of
    /// `size` bytes) and are not there yet, as of index epoch `epoch`. Slots of an
    /// older epoch or another parent file are let go. At most [`SLOTS`] slots from
    /// `offset` on; stops when no slot can make room (every other one is pending:
    /// the reader has not caught up yet).
    pub(crate) fn schedule(
        &self,
        parent: &Arc<dyn StorageFile>,
        epoch: u64,
        offset: u64,
        len: u64,
        size: u64,
    ) {
        let mut at = offset / SLOT * SLOT;
        // At most a disk's worth of slots: more would evict the first of them to make
        // room for the last.
        let begin = at;
        let end = offset
            .saturating_add(len)
            .min(size)
            .min(begin + SLOTS as u64 * SLOT);
        let mut st = self.state.lock();
        if st.used.is_none() {
            let mut disks = DISKS.lock();
            if !disks.iter().any(|d| d.ptr_eq(&Arc::downgrade(&self.state))) {
                disks.push(Arc::downgrade(&self.state));
            }
        }
        st.used = Some(Instant::now());
        // A prefetch that looked the index up before a merge's bump, scheduled after
        // it: the slots of the newer epoch are not stale, and its own would be.
        if st
            .slots
            .iter()
            .any(|s| s.epoch > epoch && Arc::ptr_eq(&s.parent, parent))
        {
            return;
        }
        // Stale slots go first (those being read go once their read ends).
        let mut i = 0;
        while let Some(s) = st.slots.get(i) {
            if !s.matches(parent, epoch) && !s.pending() {
                st.evict(i);
            } else {
                i += 1;
            }
        }
        while at < end {
            if !st
                .slots
                .iter()
                .any(|s| s.start == at && s.matches(parent, epoch))
            {
                if st.slots.len() >= SLOTS {
                    // Room from the oldest slot read, never from those asked for here.
                    let asked = |s: &Slot| (begin..end).contains(&s.start);
                    let Some(i) = st.slots.iter().position(|s| !s.pending() && !asked(s)) else {
                        return;
                    };
                    st.evict(i);
                }
                let slot = Arc::new(Slot {
                    start: at,
                    len: SLOT.min(size - at) as usize,
                    epoch,
                    parent: parent.clone(),
                    fill: Mutex::new(Fill::Queued),
                    done: Condvar::new(),
                    home: Arc::downgrade(&self.state),
                    taken: AtomicUsize::new(0),
                });
                let buf = st.free.pop();
                st.slots.push(slot.clone());
                if let Err(e) = fillers().send((slot.clone(), buf)) {
                    *slot.fill.lock() = Fill::Unread(e.into_inner().1);
                }
            }
            at += SLOT;
        }
    }

    /// Fill `dst` with `offset..offset+dst.len()` of `parent` as of index epoch
    /// `epoch`: from slots where they hold it (waiting for one still being read),
    /// with `read_direct` where none does. Bytes past the parent's end read as zeros.
    /// Returns how many bytes came from slots.
    pub(crate) fn read(
        &self,
        parent: &Arc<dyn StorageFile>,
        epoch: u64,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<usize> {
        let mut done = 0usize;
        let mut from_slots = 0usize;
        while done < dst.len() {
            let at = offset + done as u64;
            let chunk = at / SLOT * SLOT;
            let want = ((chunk + SLOT - at) as usize).min(dst.len() - done);
            let part = &mut dst[done..done + want];
            if self.take(parent, epoch, chunk, at, part) {
                from_slots += want;
            } else {
                let n = parent.read_direct(part, at)?;
                if let Some(rest) = part.get_mut(n..) {
                    rest.fill(0);
                }
            }
            done += want;
        }
        Ok(from_slots)
    }

    /// Copy `at..at+part.len()` (inside the slot starting at `chunk`) from that slot if
    /// it matches; a slot read to its end is let go. False if no slot holds it.
    fn take(
        &self,
        parent: &Arc<dyn StorageFile>,
        epoch: u64,
        chunk: u64,
        at: u64,
        part: &mut [u8],
    ) -> bool {
        let slot = {
            let st = self.state.lock();
            match st
                .slots
                .iter()
                .find(|s| s.start == chunk && s.matches(parent, epoch))
            {
                Some(s) => s.clone(),
                None => return false,
            }
        };
        let skip = (at - chunk) as usize;
        let copied = {
            let mut fill = slot.fill.lock();
            if matches!(*fill, Fill::Queued) {
                // Behind other disks' fills in the fillers' queue: reading it here is
                // sooner than waiting for them. The slot goes (the filler hands its
                // buffer back when it comes to it), so that the range can be read
                // ahead again.
                *fill = Fill::Unread(None);
                drop(fill);
                let mut st = self.state.lock();
                if let Some(i) = st.slots.iter().position(|s| Arc::ptr_eq(s, &slot)) {
                    st.evict(i);
                }
                return false;
            }
            while matches!(*fill, Fill::Reading) {
                slot.done.wait(&mut fill);
            }
            match &mut *fill {
                Fill::Ready { buf, n } => {
                    let n = *n;
                    let area = buf.as_slice();
                    let have = n.saturating_sub(skip).min(part.len());
                    let (head, rest) = part.split_at_mut(have);
                    match area.get(skip..skip + have) {
                        Some(s) => head.copy_from_slice(s),
                        None => return false,
                    }
                    rest.fill(0);
                    true
                }
                _ => false,
            }
        };
        let taken = slot.taken.fetch_add(part.len(), Ordering::Relaxed) + part.len();
        if copied && taken >= slot.len {
            let mut st = self.state.lock();
            if let Some(i) = st.slots.iter().position(|s| Arc::ptr_eq(s, &slot)) {
                st.evict(i);
            }
        }
        copied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemStorage, OpenMode, Storage};
    use std::path::Path;

    fn parent(storage: &MemStorage, name: &str, bytes: &[u8]) -> Arc<dyn StorageFile> {
        storage.create_dir_all(Path::new("/d")).expect("mkdir");
        let f = storage
            .open(&Path::new("/d").join(name), OpenMode::CreateNew)
            .expect("create");
        f.write_at(&[bytes], 0).expect("write");
        f
    }

    /// A parent of `size` bytes of `pattern(seed)` on storage of its own (kept for
    /// more files), and those bytes.
    fn filled(seed: u8, size: usize) -> (MemStorage, Arc<dyn StorageFile>, Vec<u8>) {
        let storage = MemStorage::new();
        let data = pattern(seed, size);
        let p = parent(&storage, "p.img", &data);
        (storage, p, data)
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Wait until every slot of `ahead` has ended its read.
    fn settled(ahead: &DirectAhead) {
        loop {
            let pending = ahead.state.lock().slots.iter().any(|s| s.pending());
            if !pending {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn reads_come_from_the_slots_and_equal_the_parent_at_any_alignment() {
        let size = 5 * SLOT as usize + 1000;
        let (_storage, p, data) = filled(7, size);
        let ahead = DirectAhead::default();
        ahead.schedule(&p, 0, 0, size as u64, size as u64);
        settled(&ahead);
        assert_eq!(ahead.state.lock().slots.len(), 6);
        // Unaligned, across slot boundaries, and past the parent's end (zeros).
        let mut got = vec![0u8; 3 * SLOT as usize];
        let hit = ahead.read(&p, 0, 12_345, &mut got).expect("read");
        assert_eq!(hit, got.len(), "not all from the slots");
        assert!(got == data[12_345..12_345 + got.len()]);
        let mut tail = vec![9u8; 2000];
        ahead
            .read(&p, 0, size as u64 - 1000, &mut tail)
            .expect("read the tail");
        assert!(tail[..1000] == data[size - 1000..]);
        assert!(
            tail[1000..].iter().all(|b| *b == 0),
            "past the end is not zeros"
        );
        // A slot read in parts, the later part first, goes once both are read.
        let mut half = vec![0u8; SLOT as usize / 2];
        for at in [4 * SLOT + SLOT / 2, 4 * SLOT] {
            assert_eq!(ahead.read(&p, 0, at, &mut half).expect("read"), half.len());
            assert!(half == data[at as usize..at as usize + half.len()]);
        }
        // Slots read whole were let go, their buffers kept; those read in part stay.
        let st = ahead.state.lock();
        let starts: Vec<u64> = st.slots.iter().map(|s| s.start / SLOT).collect();
        assert_eq!(starts, [0, 3], "slots left");
        assert_eq!(st.free.len(), 4);
    }

    #[test]
    fn a_fill_reads_its_slot_in_pieces_up_to_the_parents_end() {
        // A last slot of one piece and 1000 bytes: two reads, the second short.
        let size = SLOT as usize + FILL_READ + 1000;
        let (_storage, p, data) = filled(3, size);
        let mut area = vec![7u8; SLOT as usize];
        let n = read_in_pieces(&*p, &mut area, SLOT).expect("read");
        assert_eq!(n, FILL_READ + 1000);
        assert!(area[..n] == data[SLOT as usize..]);
        // Whole pieces from the start.
        let n = read_in_pieces(&*p, &mut area, 0).expect("read");
        assert_eq!(n, SLOT as usize);
        assert!(area == data[..SLOT as usize]);
        // And through the slots.
        let ahead = DirectAhead::default();
        ahead.schedule(&p, 0, 0, size as u64, size as u64);
        settled(&ahead);
        let mut got = vec![9u8; size + 4096];
        assert_eq!(ahead.read(&p, 0, 0, &mut got).expect("read"), got.len());
        assert!(got[..size] == data[..]);
        assert!(got[size..].iter().all(|b| *b == 0));
    }

    #[test]
    fn a_slot_of_another_epoch_or_parent_file_is_never_read() {
        let size = 2 * SLOT as usize;
        let (storage, p, old) = filled(1, size);
        let ahead = DirectAhead::default();
        ahead.schedule(&p, 4, 0, size as u64, size as u64);
        settled(&ahead);
        // The parent changes (a merge), and the epoch with it.
        let new = pattern(2, size);
        p.write_at(&[&new], 0).expect("write");
        let mut got = vec![0u8; size];
        assert_eq!(ahead.read(&p, 5, 0, &mut got).expect("read"), 0);
        assert!(got == new, "a stale slot was read");
        // Another parent file (a fold swapped it in) at the same epoch.
        ahead.schedule(&p, 5, 0, size as u64, size as u64);
        settled(&ahead);
        let q = parent(&storage, "q.img", &old);
        assert_eq!(ahead.read(&q, 5, 0, &mut got).expect("read"), 0);
        assert!(got == old, "another file's slot was read");
        // Scheduling at the new epoch let the old slots go.
        ahead.schedule(&p, 6, 0, SLOT, size as u64);
        assert!(ahead.state.lock().slots.iter().all(|s| s.epoch == 6));
        // A prefetch that looked the index up before the bump lets them be.
        settled(&ahead);
        ahead.schedule(&p, 5, 0, size as u64, size as u64);
        let st = ahead.state.lock();
        assert!(st.slots.len() == 1 && st.slots.iter().all(|s| s.epoch == 6));
    }

    #[test]
    fn a_reader_reads_a_queued_slot_itself_and_its_buffer_is_kept() {
        let size = SLOT as usize;
        let (_storage, p, data) = filled(5, size);
        let ahead = DirectAhead::default();
        // A slot still in the fillers' queue (none picks it up here).
        let slot = Arc::new(Slot {
            start: 0,
            len: size,
            epoch: 1,
            parent: p.clone(),
            fill: Mutex::new(Fill::Queued),
            done: Condvar::new(),
            home: Arc::downgrade(&ahead.state),
            taken: AtomicUsize::new(0),
        });
        {
            let mut st = ahead.state.lock();
            st.slots.push(slot.clone());
            st.used = Some(Instant::now());
        }
        let mut got = vec![0u8; size];
        assert_eq!(ahead.read(&p, 1, 0, &mut got).expect("read"), 0);
        assert!(got == data);
        // The filler comes to it later: it reads nothing and hands its buffer to the
        // disk's free list, where the next slot takes it.
        let buf = DirectBuf::new(size).expect("buffer");
        let at = buf.as_slice().as_ptr();
        slot.run(Some(buf));
        assert!(matches!(*slot.fill.lock(), Fill::Unread(None)));
        assert_eq!(ahead.state.lock().free.len(), 1);
        ahead.schedule(&p, 2, 0, SLOT, size as u64);
        settled(&ahead);
        {
            let st = ahead.state.lock();
            assert!(st.free.is_empty(), "the buffer was not used again");
            let fill = st.slots.last().map(|s| s.fill.lock());
            assert!(
                matches!(fill.as_deref(), Some(Fill::Ready { buf, .. }) if buf.as_slice().as_ptr() == at),
                "the new slot was not filled into the kept buffer"
            );
        }
        assert!(ahead.read(&p, 2, 0, &mut got).expect("read") == size);
    }

    #[test]
    fn an_idle_disk_lets_its_slots_and_buffers_go() {
        let size = 4 * SLOT as usize;
        let (_storage, p, _) = filled(9, size);
        let idle = DirectAhead::default();
        let busy = DirectAhead::default();
        for a in [&idle, &busy] {
            a.schedule(&p, 0, 0, size as u64, size as u64);
            settled(a);
            let mut got = vec![0u8; SLOT as usize];
            a.read(&p, 0, 0, &mut got).expect("read");
        }
        // The busy disk asks for more read-ahead; the sweep then runs at that moment,
        // with an idle time shorter than the idle disk's and longer than the busy
        // one's (no clock waited for). One disk at a time: `sweep` would also sweep
        // other tests' disks.
        busy.schedule(&p, 0, SLOT, SLOT, size as u64);
        let used = |a: &DirectAhead| a.state.lock().used.expect("used");
        let (then, now) = (used(&idle), used(&busy));
        assert!(now > then, "the busy disk's schedule did not count as use");
        for a in [&idle, &busy] {
            sweep_disk(&a.state, (now - then) / 2, now);
        }
        let st = idle.state.lock();
        assert!(
            st.slots.is_empty() && st.free.is_empty(),
            "the idle disk kept its buffers"
        );
        assert_eq!(
            busy.state.lock().slots.len(),
            3,
            "the busy disk lost its slots"
        );
    }

    #[test]
    fn slots_are_bounded_and_pending_ones_are_kept() {
        let size = 40 * SLOT as usize;
        let (_storage, p, _) = filled(3, size);
        let ahead = DirectAhead::default();
        ahead.schedule(&p, 0, 0, size as u64, size as u64);
        assert!(ahead.state.lock().slots.len() <= SLOTS);
        settled(&ahead);
        ahead.schedule(&p, 0, 20 * SLOT, 20 * SLOT, size as u64);
        settled(&ahead);
        // 20 slots asked for: the first 16 of them, in place of the old ones.
        let st = ahead.state.lock();
        let starts: Vec<u64> = st.slots.iter().map(|s| s.start / SLOT).collect();
        assert_eq!(starts, (20..36).collect::<Vec<u64>>());
    }
}
