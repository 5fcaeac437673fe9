//! Segments read ahead for a planned failover's check.
//!
//! A planned failover's check (`failover::verify`) reads every segment of the point
//! back from the store, after the last one was stored and `Promote` arrived: reading
//! the point's 128 MiB took about as long as shipping its last 64 MiB, and the
//! failover took about twice its shipping. A primary that starts a planned failover
//! (fenced, shipping the rest) says so first (`Message::PromoteSoon`, feature
//! `FEATURE_PROMOTE_SOON`); the target then reads the segments it holds past the
//! parent's merge point, and each one stored later in that session, into memory
//! while the rest arrives — one reader thread per machine, at most [`BUDGET`] bytes.
//! The check ([`crate::replica::replay::PointImage::segment`]) takes a segment from
//! here instead of reading it again, waiting for one being read.
//!
//! What is kept is what the store gave back, read from the disk (around the page
//! cache where the store is a directory) and authenticated, never the bytes the
//! session received. Before a kept segment is used, the object's 40-byte header is
//! read again and must be the one read with it (its random nonce names that write of
//! the object): a segment replaced since — a replica seeded again, whose numbers
//! start over — is read again. What the check cannot see is damage to a segment in
//! the seconds between its reading here and the check; the scrub reads it again.
//!
//! A set ends when its check has run (`end`), or [`TTL`] after anything last used it
//! (a failover that stopped before `Promote`): its reader stops and the memory goes
//! back to the pool.

use crate::error::Result;
use crate::replica::crypt::HEADER_LEN;
use crate::replica::store::ReplicaStore;
use crate::storage::pool::Pooled;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of segments one machine's set keeps, at most (the readers' segment cache's
/// size: the check keeps no more at once).
pub const BUDGET: usize = crate::replica::replay::SEGMENT_CACHE;
/// A set nothing used for this long ends.
pub const TTL: Duration = Duration::from_secs(30);

/// A segment's encrypted-file header, as read with it.
pub type Header = [u8; HEADER_LEN];

/// The sets of a site's replicas, by machine.
#[derive(Debug, Default)]
pub struct Warm {
    sets: Mutex<HashMap<String, Arc<WarmSet>>>,
    /// Bytes of segments the check took from here (for tests and the job's record).
    served: AtomicU64,
}

/// One machine's segments read ahead.
#[derive(Debug)]
pub struct WarmSet {
    machine: String,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    entries: HashMap<u64, Entry>,
    queue: VecDeque<u64>,
    /// Footprint of the segments kept.
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
    /// Start (or go on with) reading ahead `store`'s segments `seqs` for a check to
    /// come. One set and one reader per machine: a set under way takes the numbers it
    /// lacks.
    pub fn begin(
        self: &Arc<Self>,
        store: ReplicaStore,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Arc<WarmSet> {
        let machine = store.machine().to_string();
        let mut sets = self.sets.lock();
        if let Some(set) = sets.get(&machine).filter(|s| !s.state.lock().ended) {
            let set = set.clone();
            drop(sets);
            for seq in seqs {
                set.push(seq);
            }
            return set;
        }
        let set = Arc::new(WarmSet {
            machine: machine.clone(),
            state: Mutex::new(State {
                entries: HashMap::new(),
                queue: VecDeque::new(),
                bytes: 0,
                touched: Instant::now(),
                ended: false,
            }),
            changed: Condvar::new(),
        });
        for seq in seqs {
            set.push(seq);
        }
        sets.insert(machine.clone(), set.clone());
        drop(sets);
        let (warm, reader) = (self.clone(), set.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("warm-{machine}"))
            .spawn(move || {
                reader.read(store);
                warm.forget(&reader);
            });
        if let Err(e) = spawned {
            tracing::warn!(machine, "no reader for the failover's check: {e}");
            self.end(&machine);
        }
        set
    }

    /// The check of `machine` has run (or will not): drop what was kept.
    pub fn end(&self, machine: &str) {
        let set = self.sets.lock().remove(machine);
        if let Some(set) = set {
            set.finish();
        }
    }

    /// Segment `seq` of `machine` as read ahead, with its header (None: not kept,
    /// and not being read). Waits for one being read.
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
                Some(Entry::Loading) => set.changed.wait(&mut st),
                // Not started: the caller reads it now rather than wait its turn.
                Some(Entry::Queued) => {
                    st.entries.remove(&seq);
                    return None;
                }
                None => return None,
            }
        }
    }

    /// Count `bytes` taken from a set by a check.
    pub fn served(&self, bytes: u64) {
        self.served.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes the checks of this process took from read-ahead sets.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
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
            let busy =
                !st.queue.is_empty() || st.entries.values().any(|e| matches!(e, Entry::Loading));
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
    /// Read segment `seq` too (one stored after the set began).
    pub fn push(&self, seq: u64) {
        let mut st = self.state.lock();
        if st.ended || st.entries.contains_key(&seq) {
            return;
        }
        st.entries.insert(seq, Entry::Queued);
        st.queue.push_back(seq);
        st.touched = Instant::now();
        self.changed.notify_all();
    }

    fn finish(&self) {
        let mut st = self.state.lock();
        st.ended = true;
        st.entries.clear();
        st.queue.clear();
        st.bytes = 0;
        self.changed.notify_all();
    }

    /// The reader: each queued segment in turn, until the set ends or lies unused
    /// for [`TTL`].
    fn read(&self, mut store: ReplicaStore) {
        loop {
            let seq = {
                let mut st = self.state.lock();
                loop {
                    if st.ended {
                        return;
                    }
                    if let Some(seq) = st.queue.pop_front() {
                        // Claimed by a reader meanwhile, or no room left: skipped.
                        if !matches!(st.entries.get(&seq), Some(Entry::Queued)) {
                            continue;
                        }
                        if st.bytes >= BUDGET {
                            st.entries.remove(&seq);
                            continue;
                        }
                        st.entries.insert(seq, Entry::Loading);
                        break seq;
                    }
                    let until = st.touched + TTL;
                    if Instant::now() >= until {
                        drop(st);
                        self.finish();
                        return;
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
                    st.bytes += p.footprint();
                    st.entries.insert(seq, Entry::Ready(Arc::new(p), h));
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

    fn set(machine: &str) -> WarmSet {
        WarmSet {
            machine: machine.into(),
            state: Mutex::new(State {
                entries: HashMap::new(),
                queue: VecDeque::new(),
                bytes: 0,
                touched: Instant::now(),
                ended: false,
            }),
            changed: Condvar::new(),
        }
    }

    #[test]
    fn a_queued_segment_is_claimed_and_a_loading_one_waited_for() {
        let warm = Arc::new(Warm::default());
        let s = Arc::new(set("vm1"));
        warm.sets.lock().insert("vm1".into(), s.clone());
        s.push(3);
        s.push(4);
        s.push(3);
        assert_eq!(s.state.lock().queue.len(), 2, "a number is queued once");
        // Queued, not started: the caller reads it itself, and the reader skips it.
        assert!(warm.get("vm1", 3).is_none());
        assert!(!s.state.lock().entries.contains_key(&3));
        // Being read: the caller waits for it.
        s.state.lock().entries.insert(4, Entry::Loading);
        let waiter = {
            let warm = warm.clone();
            std::thread::spawn(move || warm.get("vm1", 4).map(|(p, h)| (p.to_vec(), h)))
        };
        std::thread::sleep(Duration::from_millis(20));
        let mut p = Pooled::with_room(8);
        p.set_len(8);
        p.copy_from_slice(b"segment4");
        s.state
            .lock()
            .entries
            .insert(4, Entry::Ready(Arc::new(p), [7u8; HEADER_LEN]));
        s.changed.notify_all();
        let (bytes, header) = waiter.join().unwrap().expect("kept");
        assert_eq!(bytes, b"segment4");
        assert_eq!(header, [7u8; HEADER_LEN]);
        // Ended: nothing is served, a waiter is let go, pushes are ignored.
        s.state.lock().entries.insert(5, Entry::Loading);
        let waiter = {
            let warm = warm.clone();
            std::thread::spawn(move || warm.get("vm1", 5).is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
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
}
