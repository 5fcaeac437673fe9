//! Whole-segment buffers (tens of MiB) recycled within the process instead of freed.
//!
//! Why: memory the process frees goes back to the kernel, and on a VM with free page
//! reporting (virtio-balloon) from there to the host, which must fault it in again
//! when it is next touched. Measured on the 2-core VMs replog is benchmarked on: the
//! first touch of fresh anonymous memory costs about 2 µs per 4 KiB page (68 ms for
//! 128 MiB), a second touch next to nothing. A planned failover's check reads the
//! point's segments whole (128 MiB in the benchmark): into fresh buffers, through
//! the page cache, it took 107–149 ms; into these buffers, with O_DIRECT, 68–113 ms
//! (docs/DESIGN.md, "Segment buffers"). So the readers of whole segments (a point's
//! check and views, restores, the scrub) and the target's segment assembly take
//! their buffers from here and give them back; so does a parent-chunk write-out of
//! up to 32 MiB sealed (`ChunkEditor::write_out`: an initial copy's 16 MiB batches
//! seal into one ~20 MiB buffer, which then holds one of the idle places between
//! batches and for up to [`IDLE_FOR`] after the copy).
//!
//! Bounded: at most [`MAX_IDLE`] buffers and [`MAX_IDLE_BYTES`] wait here, each of
//! at least [`POOLED_MIN`] bytes (smaller ones are simply freed), and a thread frees
//! any idle for [`IDLE_FOR`] (it runs only while buffers wait): a process that stops
//! reading segments gives the memory back within about a minute.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Buffers with less room than this are not kept (a small segment's buffer costs
/// little to fault in).
pub const POOLED_MIN: usize = 8 << 20;
/// Idle buffers kept at most (two readers' segments and two being assembled, or a
/// chunk write-out's sealed batch in place of one of them).
pub const MAX_IDLE: usize = 4;
/// Idle bytes kept at most (four segments of the default 64 MiB and their room): a
/// buffer that would take the pool past it is freed.
pub const MAX_IDLE_BYTES: usize = 320 << 20;
/// An idle buffer older than this is freed.
pub const IDLE_FOR: Duration = Duration::from_secs(60);
/// The alignment of [`Pooled`] reads (O_DIRECT's, on the file systems replog runs on).
const ALIGN: usize = 4096;
/// Buffers are asked for in multiples of this ([`room_for`]), so that one that held a
/// segment fits the next of about the same size, whoever asks.
const GRAIN: usize = 4 << 20;

/// The room to [`take`] for `len` bytes: enough for them at a 4 KiB boundary, rounded
/// up to the pool's grain (the target's segment assembly and the segment readers ask
/// alike, so their buffers serve each other).
pub fn room_for(len: usize) -> usize {
    len.saturating_add(2 * ALIGN).div_ceil(GRAIN) * GRAIN
}

static IDLE: Mutex<Idle> = Mutex::new(Idle {
    bufs: Vec::new(),
    reaper: false,
});

struct Idle {
    /// Buffers given back, with when.
    bufs: Vec<(Vec<u8>, Instant)>,
    /// A thread frees expired buffers while any wait (it ends when none is left).
    reaper: bool,
}

/// A buffer with room for at least `room` bytes: one given back earlier (the
/// smallest that fits, and no more than two grains bigger — a small reader must not
/// hold, and be counted for, a big segment's buffer; its length and bytes are
/// whatever it held) or None. Give it back with [`give`] when done.
pub fn take_idle(room: usize) -> Option<Vec<u8>> {
    let mut idle = IDLE.lock();
    let old = expire(&mut idle.bufs);
    let best = idle
        .bufs
        .iter()
        .enumerate()
        .filter(|(_, (b, _))| b.capacity() >= room && b.capacity() <= room + 2 * GRAIN)
        .min_by_key(|(_, (b, _))| b.capacity())
        .map(|(i, _)| i);
    let got = best.map(|i| idle.bufs.swap_remove(i).0);
    drop(idle);
    drop(old);
    got
}

/// [`take_idle`], or a new, empty buffer of capacity `room`.
pub fn take(room: usize) -> Vec<u8> {
    take_idle(room).unwrap_or_else(|| Vec::with_capacity(room))
}

/// Keep `buf` for a later [`take`] (kept as it is, length and bytes: a buffer
/// written once needs no zeroing again), unless it is small or enough wait already.
pub fn give(buf: Vec<u8>) {
    if buf.capacity() < POOLED_MIN {
        return;
    }
    let mut idle = IDLE.lock();
    let mut old = expire(&mut idle.bufs);
    let held: usize = idle.bufs.iter().map(|(b, _)| b.capacity()).sum();
    if idle.bufs.len() >= MAX_IDLE || held + buf.capacity() > MAX_IDLE_BYTES {
        // Freed with the expired ones, after the lock.
        old.push((buf, Instant::now()));
    } else {
        idle.bufs.push((buf, Instant::now()));
        if !idle.reaper {
            let spawned = std::thread::Builder::new()
                .name("replog-pool".into())
                .spawn(reap);
            // Without the thread, buffers still expire at the next take or give.
            idle.reaper = spawned.is_ok();
        }
    }
    drop(idle);
    drop(old);
}

/// Free expired buffers until none waits.
fn reap() {
    loop {
        std::thread::sleep(IDLE_FOR / 4);
        let mut idle = IDLE.lock();
        let old = expire(&mut idle.bufs);
        let empty = idle.bufs.is_empty();
        if empty {
            idle.reaper = false;
        }
        drop(idle);
        drop(old);
        if empty {
            return;
        }
    }
}

/// Take the buffers idle for [`IDLE_FOR`] out of `bufs`; the caller frees them after
/// it lets go of the pool's lock (freeing hundreds of MiB takes a while).
#[must_use]
fn expire(bufs: &mut Vec<(Vec<u8>, Instant)>) -> Vec<(Vec<u8>, Instant)> {
    let (keep, old) = std::mem::take(bufs)
        .into_iter()
        .partition(|(_, since)| since.elapsed() < IDLE_FOR);
    *bufs = keep;
    old
}

/// Bytes held in a pooled buffer, starting at a 4 KiB boundary in it (so that a
/// file can be read into them with O_DIRECT); the buffer goes back to the pool when
/// this is dropped.
#[derive(Debug)]
pub struct Pooled {
    buf: Vec<u8>,
    start: usize,
    /// The aligned area's length (a multiple of 4 KiB; the bytes' for `from_vec`).
    area: usize,
    len: usize,
}

impl Pooled {
    /// Room for `len` bytes at a 4 KiB boundary (and up to the next 4 KiB boundary
    /// after them, which an O_DIRECT read of a file's last block may fill): the
    /// room's bytes are whatever the buffer held. [`Pooled::room`] is that area;
    /// [`Pooled::set_len`] says how much of it counts.
    pub fn with_room(len: usize) -> Pooled {
        let span = len.div_ceil(ALIGN) * ALIGN;
        let room = room_for(len);
        let buf = match take_idle(room) {
            Some(mut b) => {
                if b.len() < span + ALIGN {
                    // Zeroed once, the first time a buffer is this long; kept
                    // initialised.
                    b.resize(span + ALIGN, 0);
                }
                b
            }
            // Fresh zeroed pages from the allocator (nothing written before the read
            // fills them), as long as the grain, so that it serves the next reader
            // of about this size.
            None => vec![0u8; room],
        };
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Pooled {
            buf,
            start,
            area: span,
            len,
        }
    }

    /// Bytes already in memory, not read from a file (no copy: the vector is kept;
    /// one grown by doubling, an HTTP body read to its end, is cut to its length
    /// first, since readers count it by its length).
    pub fn from_vec(mut buf: Vec<u8>) -> Pooled {
        if buf.capacity() > buf.len() + buf.len() / 8 {
            buf.shrink_to_fit();
        }
        let len = buf.len();
        Pooled {
            buf,
            start: 0,
            area: len,
            len,
        }
    }

    /// The whole aligned area (a multiple of 4 KiB, at least the length asked for).
    pub fn room(&mut self) -> &mut [u8] {
        self.buf
            .get_mut(self.start..self.start + self.area)
            .unwrap_or(&mut [])
    }

    /// Count the first `len` bytes of the room (no more than the room: never bytes
    /// past it, which are another reader's leftovers).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.area);
    }

    /// The memory this holds (its buffer's capacity): what a cache of these counts.
    pub fn footprint(&self) -> usize {
        self.buf.capacity()
    }
}

impl std::ops::Deref for Pooled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf
            .get_mut(self.start..self.start + self.len)
            .unwrap_or(&mut [])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// One test (the pool is process-wide; tests run on threads of one process).
    #[test]
    fn buffers_come_back_aligned_and_bounded() {
        let mut p = Pooled::with_room(POOLED_MIN + 100);
        assert_eq!(p.as_ptr() as usize % ALIGN, 0, "not aligned");
        assert_eq!(p.room().len() % ALIGN, 0);
        assert!(p.room().len() >= POOLED_MIN + 100);
        p.room()[..5].copy_from_slice(b"hello");
        p.set_len(5);
        assert_eq!(&p[..], b"hello");
        let area = p.room().len();
        p.set_len(usize::MAX);
        assert_eq!(p.len(), area, "set_len clamps to the room");
        let addr = p.buf.as_ptr() as usize;
        drop(p);
        // The same buffer again (other tests may take it first: then a new one).
        let mut again = Pooled::with_room(POOLED_MIN);
        if again.buf.as_ptr() as usize == addr {
            assert_eq!(&again.room()[..5], b"hello", "kept as it was");
        }
        drop(again);
        // Small buffers are not kept; no more than MAX_IDLE are.
        give(vec![0u8; 10]);
        for _ in 0..MAX_IDLE + 2 {
            give(Vec::with_capacity(POOLED_MIN));
        }
        give(Vec::with_capacity(MAX_IDLE_BYTES + 1));
        {
            let idle = IDLE.lock();
            assert!(idle.bufs.len() <= MAX_IDLE);
            let held: usize = idle.bufs.iter().map(|(b, _)| b.capacity()).sum();
            assert!(held <= MAX_IDLE_BYTES);
            assert!(idle.bufs.iter().all(|(b, _)| b.capacity() >= POOLED_MIN));
            assert!(idle.reaper, "no thread frees them when they expire");
        }
        let v = take(POOLED_MIN);
        assert!(v.capacity() >= POOLED_MIN);
        // A small reader never gets a far bigger buffer (it would hold it, counted
        // by its own small length).
        give(Vec::with_capacity(64 << 20));
        let small = room_for(1 << 20);
        if let Some(b) = take_idle(small) {
            assert!(b.capacity() <= small + 2 * GRAIN, "{}", b.capacity());
        }
    }
}
