//! Segments read ahead for a planned failover's check.
//!
//! A planned failover's check (`failover::verify`) reads every segment of the point
//! back from the store, after the last one was stored and `Promote` arrived: reading
//! the point's 128 MiB took about as long as shipping its last 64 MiB, and the
//! failover took about twice its shipping. A primary that starts a planned failover
//! (fenced, shipping the rest) says so first (`Message::PromoteSoon`, feature
//! `FEATURE_PROMOTE_SOON`); the target then reads the segments it holds past the
//! parent's merge point, newest first, and each one stored later in that session
//! before any older one, into memory while the rest arrives — one reader thread per
//! machine, at most [`MAX_SETS`] machines and [`BUDGET`] bytes for the whole site
//! (the oldest kept segment makes room for a newer one; the newest are the ones no
//! check could have read earlier). The check
//! ([`crate::replica::replay::PointImage::segment`]) takes a segment from here
//! instead of reading it again, waiting for one queued or being read.
//!
//! What is kept is what the store gave back, read from the disk (around the page
//! cache where the store is a directory) and authenticated, never the bytes the
//! session received. Before a kept segment is used, the object's 40-byte header is
//! read again and must be the one read with it (its random nonce names that write of
//! the object): a segment replaced since — a replica seeded again, whose numbers
//! start over — is read again. What the check cannot see is damage to a segment
//! between its reading here and the check (the time the rest took to ship, at most
//! [`MAX_AGE`]); the scrub reads it again.
//!
//! A set ends when its check has run (`end`), [`TTL`] after anything last used it (a
//! failover that stopped before `Promote`), or [`MAX_AGE`] after it began: its reader
//! stops and the memory goes back to the pool.

use crate::error::Result;
use crate::replica::crypt::HEADER_LEN;
use crate::replica::store::ReplicaStore;
use crate::storage::pool::Pooled;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of segments the sets of one site keep, at most (beyond it, the one being
/// read).
pub const BUDGET: usize = 512 << 20;
/// Machines read ahead for at once, at most (a recovery plan fails over a group's
/// machines side by side).
pub const MAX_SETS: usize = 8;
/// A set nothing used for this long ends.
pub const TTL: Duration = Duration::from_secs(30);
/// A set ends this long after it began, used or not.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// A segment's encrypted-file header, as read with it.
pub type Header = [u8; HEADER_LEN];

/// The sets of a site's replicas, by machine.
#[derive(Debug)]
pub struct Warm {
    sets: Mutex<HashMap<String, Arc<WarmSet>>>,
    /// Bytes the sets keep, all machines together.
    held: Arc<AtomicUsize>,
    budget: usize,
}

impl Default for Warm {
    fn default() -> Self {
        Warm::with_budget(BUDGET)
    }
}

/// One machine's segments read ahead.
#[derive(Debug)]
pub struct WarmSet {
    machine: String,
    state: Mutex<State>,
    changed: Condvar,
    held: Arc<AtomicUsize>,
    budget: usize,
    began: Instant,
}

#[derive(Debug)]
struct State {
    entries: HashMap<u64, Entry>,
    /// What the reader reads next first.
    queue: VecDeque<u64>,
    /// Footprint of the segments this set keeps.
    bytes: usize,
    touched: Instant,
    ended: bool,
}

#[derive(Debug)]
enum Entry {
    Queued,
    Loading,
    Ready(Arc<Pooled>, Header),
}

impl Warm {
    /// Sets that keep at most `budget` bytes between them (plus the one being read).
    pub fn with_budget(budget: usize) -> Warm {
        Warm {
            sets: Mutex::new(HashMap::new()),
            held: Arc::default(),
            budget,
        }
    }

    /// Start (or go on with) reading ahead `store`'s segments `seqs` (those it holds,
    /// read newest first) for a check to come. One set and one reader per machine: a
    /// set under way takes the numbers it lacks. None: [`MAX_SETS`] sets are under
    /// way, or no reader could start.
    pub fn begin(
        self: &Arc<Self>,
        store: ReplicaStore,
        seqs: RangeInclusive<u64>,
    ) -> Option<Arc<WarmSet>> {
        let machine = store.machine().to_string();
        let mut sets = self.sets.lock();
        if let Some(set) = sets.get(&machine).filter(|s| !s.state.lock().ended) {
            let set = set.clone();
            drop(sets);
            set.queue_held(seqs);
            return Some(set);
        }
        if sets.values().filter(|s| !s.state.lock().ended).count() >= MAX_SETS {
            tracing::debug!(machine, "no read-ahead: {MAX_SETS} under way");
            return None;
        }
        let set = self.new_set(&machine);
        set.queue_held(seqs);
        sets.insert(machine.clone(), set.clone());
        drop(sets);
        let (warm, reader) = (self.clone(), set.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("warm-{machine}"))
            .spawn(move || {
                // However the reader stops (a panic too), the set ends: nobody waits on
                // an entry no reader will finish.
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.read(store)));
                reader.finish();
                warm.forget(&reader);
            });
        match spawned {
            Ok(_) => Some(set),
            Err(e) => {
                tracing::warn!(machine, "no reader for the failover's check: {e}");
                self.end(&machine);
                None
            }
        }
    }

    /// A set for `machine`, empty, sharing this site's budget (not listed).
    fn new_set(&self, machine: &str) -> Arc<WarmSet> {
        Arc::new(WarmSet {
            machine: machine.to_string(),
            state: Mutex::new(State {
                entries: HashMap::new(),
                queue: VecDeque::new(),
                bytes: 0,
                touched: Instant::now(),
                ended: false,
            }),
            changed: Condvar::new(),
            held: self.held.clone(),
            budget: self.budget,
            began: Instant::now(),
        })
    }

    /// The check of `machine` has run (or will not): drop what was kept.
    pub fn end(&self, machine: &str) {
        let set = self.sets.lock().remove(machine);
        if let Some(set) = set {
            set.finish();
        }
    }

    /// Segment `seq` of `machine` as read ahead, with its header (None: not kept,
    /// and not to be read). Waits for one queued or being read.
    pub fn get(&self, machine: &str, seq: u64) -> Option<(Arc<Pooled>, Header)> {
        let set = self.sets.lock().get(machine).cloned()?;
        let mut st = set.state.lock();
        st.touched = Instant::now();
        loop {
            if st.ended {
                return None;
            }
            match st.entries.get(&seq) {
                Some(Entry::Ready(p, h)) => return Some((p.clone(), *h)),
                Some(Entry::Loading | Entry::Queued) => set.changed.wait(&mut st),
                None => return None,
            }
        }
    }

    /// Wait until `machine`'s set has read everything queued (false: it has not
    /// within `timeout`, or there is no set). For tests, and for a caller that
    /// wants all of it.
    pub fn settle(&self, machine: &str, timeout: Duration) -> bool {
        let Some(set) = self.sets.lock().get(machine).cloned() else {
            return false;
        };
        let until = Instant::now() + timeout;
        let mut st = set.state.lock();
        loop {
            if st.ended {
                return false;
            }
            let busy = st
                .entries
                .values()
                .any(|e| matches!(e, Entry::Loading | Entry::Queued));
            if !busy {
                return true;
            }
            if set.changed.wait_until(&mut st, until).timed_out() {
                return false;
            }
        }
    }

    /// Whether a set of `machine` is under way.
    pub fn active(&self, machine: &str) -> bool {
        self.sets
            .lock()
            .get(machine)
            .is_some_and(|s| !s.state.lock().ended)
    }

    /// Unlist `set` (its reader stopped), unless another took its place.
    fn forget(&self, set: &Arc<WarmSet>) {
        let mut sets = self.sets.lock();
        if sets.get(&set.machine).is_some_and(|s| Arc::ptr_eq(s, set)) {
            sets.remove(&set.machine);
        }
    }
}

impl WarmSet {
    /// Read segment `seq` too (one stored after the set began: the newest, read
    /// before any older one).
    pub fn push(&self, seq: u64) {
        let mut st = self.state.lock();
        if st.ended || st.entries.contains_key(&seq) {
            return;
        }
        st.entries.insert(seq, Entry::Queued);
        st.queue.push_front(seq);
        st.touched = Instant::now();
        self.changed.notify_all();
    }

    /// Queue the segments `seqs` held before the set began, newest first, after what
    /// is queued.
    fn queue_held(&self, seqs: RangeInclusive<u64>) {
        let mut st = self.state.lock();
        if st.ended {
            return;
        }
        for seq in seqs.rev() {
            if let std::collections::hash_map::Entry::Vacant(e) = st.entries.entry(seq) {
                e.insert(Entry::Queued);
                st.queue.push_back(seq);
            }
        }
        st.touched = Instant::now();
        self.changed.notify_all();
    }

    fn finish(&self) {
        let mut st = self.state.lock();
        st.ended = true;
        st.entries.clear();
        st.queue.clear();
        self.held.fetch_sub(st.bytes, Ordering::Relaxed);
        st.bytes = 0;
        self.changed.notify_all();
    }

    /// Make room for `need` more bytes by dropping kept segments older than `seq`,
    /// oldest first; whether there is room now.
    fn room(&self, st: &mut State, seq: u64, need: usize) -> bool {
        while self.held.load(Ordering::Relaxed) + need > self.budget {
            let oldest = st
                .entries
                .iter()
                .filter(|(s, e)| **s < seq && matches!(e, Entry::Ready(..)))
                .map(|(s, _)| *s)
                .min();
            let Some(old) = oldest else {
                return false;
            };
            if let Some(Entry::Ready(p, _)) = st.entries.remove(&old) {
                st.bytes -= p.footprint();
                self.held.fetch_sub(p.footprint(), Ordering::Relaxed);
            }
        }
        true
    }

    /// The reader: each queued segment in turn, until the set ends, lies unused for
    /// [`TTL`] or reaches [`MAX_AGE`].
    fn read(&self, mut store: ReplicaStore) {
        loop {
            let seq = {
                let mut st = self.state.lock();
                loop {
                    if st.ended {
                        return;
                    }
                    let until = (st.touched + TTL).min(self.began + MAX_AGE);
                    if Instant::now() >= until {
                        return;
                    }
                    if let Some(seq) = st.queue.pop_front() {
                        if !matches!(st.entries.get(&seq), Some(Entry::Queued)) {
                            continue;
                        }
                        // No room, even without the older ones: left to the check.
                        if !self.room(&mut st, seq, 1) {
                            st.entries.remove(&seq);
                            self.changed.notify_all();
                            continue;
                        }
                        st.entries.insert(seq, Entry::Loading);
                        break seq;
                    }
                    self.changed.wait_until(&mut st, until);
                }
            };
            let read = (|| -> Result<(Pooled, Header)> {
                if seq > store.received().segment_seq {
                    store.refresh()?;
                }
                store.read_layer_headed(seq)
            })();
            let mut st = self.state.lock();
            match read {
                Ok((p, h)) if matches!(st.entries.get(&seq), Some(Entry::Loading)) => {
                    let size = p.footprint();
                    if self.room(&mut st, seq, size) {
                        st.bytes += size;
                        self.held.fetch_add(size, Ordering::Relaxed);
                        st.entries.insert(seq, Entry::Ready(Arc::new(p), h));
                    } else {
                        st.entries.remove(&seq);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // The check reads it itself, and reports what it finds.
                    tracing::debug!(machine = self.machine, seq, "read ahead: {e}");
                    st.entries.remove(&seq);
                }
            }
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(warm: &Warm, machine: &str) -> Arc<WarmSet> {
        let s = warm.new_set(machine);
        warm.sets.lock().insert(machine.into(), s.clone());
        s
    }

    fn kept(bytes: &[u8]) -> Entry {
        let mut p = Pooled::with_room(bytes.len());
        p.set_len(bytes.len());
        p.copy_from_slice(bytes);
        Entry::Ready(Arc::new(p), [7u8; HEADER_LEN])
    }

    #[test]
    fn a_queued_or_loading_segment_is_waited_for_and_an_ended_set_serves_nothing() {
        let warm = Arc::new(Warm::default());
        let s = set(&warm, "vm1");
        s.queue_held(2..=3);
        s.push(4);
        s.push(3);
        assert_eq!(
            s.state.lock().queue.iter().copied().collect::<Vec<_>>(),
            vec![4, 3, 2],
            "newest first, each once"
        );
        for seq in [3u64, 4] {
            if seq == 4 {
                s.state.lock().entries.insert(4, Entry::Loading);
            }
            let waiter = {
                let warm = warm.clone();
                std::thread::spawn(move || warm.get("vm1", seq).map(|(p, h)| (p.to_vec(), h)))
            };
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "segment {seq}: not waited for");
            s.state.lock().entries.insert(seq, kept(b"segment"));
            s.changed.notify_all();
            let (bytes, header) = waiter.join().unwrap().expect("kept");
            assert_eq!((&bytes[..], header), (&b"segment"[..], [7u8; HEADER_LEN]));
        }
        // Ended: a waiter is let go, nothing is served, pushes are ignored.
        let waiter = {
            let warm = warm.clone();
            std::thread::spawn(move || warm.get("vm1", 2).is_none())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "segment 2: not waited for");
        warm.end("vm1");
        assert!(
            waiter.join().unwrap(),
            "a waiter gets nothing once the set ends"
        );
        assert!(warm.get("vm1", 4).is_none());
        s.push(9);
        assert!(s.state.lock().entries.is_empty());
        assert!(!warm.active("vm1"));
    }

    #[test]
    fn the_oldest_kept_segment_makes_room_for_a_newer_one_never_the_reverse() {
        let one = Pooled::with_room(8).footprint();
        let warm = Warm::with_budget(2 * one);
        let s = set(&warm, "vm1");
        let mut st = s.state.lock();
        for seq in [5u64, 7] {
            assert!(s.room(&mut st, seq, one));
            st.bytes += one;
            s.held.fetch_add(one, Ordering::Relaxed);
            st.entries.insert(seq, kept(b"x"));
        }
        // Full: an older segment gets no room, a newer one takes the oldest's.
        assert!(!s.room(&mut st, 3, one));
        assert!(s.room(&mut st, 9, one));
        assert!(!st.entries.contains_key(&5) && st.entries.contains_key(&7));
        assert_eq!((st.bytes, warm.held.load(Ordering::Relaxed)), (one, one));
        drop(st);
        s.finish();
        assert_eq!(
            warm.held.load(Ordering::Relaxed),
            0,
            "an ended set gives its bytes back"
        );
    }
}
