//! The replay engine: a replica's disks as they were at one recovery point, without
//! copying them.
//!
//! Opening a [`PointImage`] pins the point (see `pin.rs`), then reads the record
//! indexes of the segments between the parent and the point and builds one extent map
//! per disk — which bytes come from which segment's payload, which were zeroed, and
//! which the parent chunks answer for. Opening costs one small index read per segment
//! in the retention window: it does not grow with the size of the disks. Reads then
//! decrypt whole segments and parent chunks on demand (kept in small caches); AES-GCM
//! authenticates every byte, so a damaged file is reported, never served.
//!
//! Restores (restore.rs) and the read-only FUSE view of points both read through here.

use super::pin::{self, Pin, PinInfo};
use super::points::{self, ReplicaPoint};
use super::store::{ReplicaStore, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::format::meta::DiskEntry;
use crate::index::{ExtentMap, Location, Piece};
use crate::storage::pool::Pooled;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;

/// Decrypted segments kept for reads, in bytes.
pub(crate) const SEGMENT_CACHE: usize = 256 << 20;
/// Decrypted parent chunks kept for reads.
const CHUNK_CACHE: usize = 64;

/// A small LRU: a handful of big entries, so a scan is cheaper than a hash map.
struct Lru<K, V> {
    entries: VecDeque<(K, V, usize)>,
    bytes: usize,
    budget: usize,
}

impl<K: PartialEq + Copy, V: Clone> Lru<K, V> {
    fn new(budget: usize) -> Self {
        Lru {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn get(&mut self, k: K) -> Option<V> {
        let i = self.entries.iter().position(|(key, _, _)| *key == k)?;
        let e = self.entries.remove(i)?;
        let v = e.1.clone();
        self.entries.push_front(e);
        Some(v)
    }

    /// Keep `v` for `k` (replacing what `k` had: two readers may load it at once).
    fn put(&mut self, k: K, v: V, size: usize) {
        if let Some(i) = self.entries.iter().position(|(key, _, _)| *key == k) {
            if let Some((_, _, n)) = self.entries.remove(i) {
                self.bytes -= n;
            }
        }
        self.entries.push_front((k, v, size));
        self.bytes += size;
        while self.bytes > self.budget && self.entries.len() > 1 {
            if let Some((_, _, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
    }
}

/// An [`Lru`] whose loads run outside its lock, so readers of different entries
/// (a verification's workers, the readers of a point view) read and decrypt in
/// parallel, while readers of the same entry wait for the one load instead of
/// repeating it.
struct Cache<K, V> {
    lru: Mutex<Lru<K, V>>,
    /// Keys being loaded; `loaded` is signalled whenever one leaves.
    loading: Mutex<Vec<K>>,
    loaded: Condvar,
    /// Readers waiting for another's load (tests watch it).
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

/// A key listed as being loaded, unlisted (and its waiters woken) however the load
/// ends: a value kept, an error, a panic.
struct Loading<'a, K: PartialEq, V> {
    cache: &'a Cache<K, V>,
    key: K,
}

impl<K: PartialEq, V> Drop for Loading<'_, K, V> {
    fn drop(&mut self) {
        self.cache.loading.lock().retain(|k| *k != self.key);
        self.cache.loaded.notify_all();
    }
}

impl<K: PartialEq + Copy, V: Clone> Cache<K, V> {
    fn new(budget: usize) -> Self {
        Cache {
            lru: Mutex::new(Lru::new(budget)),
            loading: Mutex::new(Vec::new()),
            loaded: Condvar::new(),
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The entry for `k`, from the cache or from `load` (the value and its size).
    /// A failed load is not cached: a reader that waited for it loads itself.
    fn get_or_load(&self, k: K, load: impl FnOnce() -> Result<(V, usize)>) -> Result<V> {
        if let Some(v) = self.lru.lock().get(k) {
            return Ok(v);
        }
        let mut loading = self.loading.lock();
        // Looked up again under `loading`: a load that ended meanwhile kept its value
        // before it was unlisted.
        while loading.contains(&k) {
            #[cfg(test)]
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.loaded.wait(&mut loading);
            #[cfg(test)]
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(v) = self.lru.lock().get(k) {
            return Ok(v);
        }
        loading.push(k);
        drop(loading);
        let _listed = Loading {
            cache: self,
            key: k,
        };
        let (v, size) = load()?;
        self.lru.lock().put(k, v.clone(), size);
        Ok(v)
    }
}

/// A parent chunk, decrypted (None: all zeroes), shared by the readers that need it.
type Chunk = Arc<Option<Vec<u8>>>;

/// A replica's disks at one point, read-only.
pub struct PointImage {
    store: ReplicaStore,
    point: ReplicaPoint,
    maps: Vec<ExtentMap>,
    segments: Cache<u64, Arc<Pooled>>,
    chunks: Cache<(u32, u64), Chunk>,
    /// Segments taken from a read-ahead set (`replica::warm`), and their bytes.
    read_ahead: parking_lot::Mutex<(std::collections::BTreeSet<u64>, u64)>,
    _pin: Pin,
}

impl std::fmt::Debug for PointImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointImage")
            .field("dir", &self.store.dir())
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

impl PointImage {
    /// Open `store` (read-only) at POINT `at` (any form `points::resolve` takes).
    pub fn open(store: ReplicaStore, at: &str) -> Result<PointImage> {
        Self::open_with(store, |s| points::resolve(s, at))
    }

    /// Open `store` at the point with LSN `lsn`, retention or not, as long as the
    /// replica can still materialise it (what a promoted machine or a test copy
    /// stands on: pinned while it is open, so never merged away).
    pub fn open_exact(store: ReplicaStore, lsn: u64) -> Result<PointImage> {
        Self::open_with(store, |s| points::exact(s, lsn))
    }

    fn open_with(
        mut store: ReplicaStore,
        resolve: impl FnOnce(&ReplicaStore) -> Result<ReplicaPoint>,
    ) -> Result<PointImage> {
        let lock = pin::merge_lock(&store)?;
        store.refresh()?;
        if !store.initial().done {
            return Err(Error::InvalidInput(
                "the initial replication of this machine is not complete yet; \
                 there is no point to read"
                    .into(),
            ));
        }
        let point = resolve(&store)?;
        let from_seq = store.parent().seq;
        let held = pin::pin(
            &store,
            PinInfo {
                lsn: point.lsn,
                from_seq,
            },
            &lock,
        )?;
        drop(lock);
        let mut maps: Vec<ExtentMap> = store
            .manifest()
            .disks
            .iter()
            .map(|_| ExtentMap::new())
            .collect();
        // A resync's patches lie under every segment (records at "LSN 0").
        for n in 1..=store.parent().patches {
            let index = store.patch_index(n)?;
            for r in &index.records {
                if let Some(map) = maps.get_mut(r.disk as usize) {
                    map.insert(
                        r.offset,
                        r.length,
                        Location::Segment {
                            seq: super::store::PATCH_SEQ + n,
                            offset: r.payload_at,
                        },
                    );
                }
            }
        }
        for seq in from_seq + 1..=store.received().segment_seq {
            let index = store.segment_index(seq)?;
            if index.first_lsn > point.lsn {
                break;
            }
            for r in &index.records {
                if r.lsn > point.lsn {
                    break;
                }
                let Some(map) = maps.get_mut(r.disk as usize) else {
                    continue;
                };
                let loc = if r.zero {
                    Location::Zero { seq }
                } else {
                    Location::Segment {
                        seq,
                        offset: r.payload_at,
                    }
                };
                map.insert(r.offset, r.length, loc);
            }
        }
        Ok(PointImage {
            store,
            point,
            maps,
            segments: Cache::new(SEGMENT_CACHE),
            chunks: Cache::new(CHUNK_CACHE),
            read_ahead: Default::default(),
            _pin: held,
        })
    }

    pub fn point(&self) -> &ReplicaPoint {
        &self.point
    }

    /// Bytes of segments this image took from a planned failover's read-ahead
    /// (`replica::warm`) instead of reading them.
    pub fn read_ahead(&self) -> u64 {
        self.read_ahead.lock().1
    }

    pub fn disks(&self) -> &[DiskEntry] {
        &self.store.manifest().disks
    }

    pub fn store(&self) -> &ReplicaStore {
        &self.store
    }

    /// Disk `disk`'s extent map: where the point's bytes come from (pieces the map
    /// does not cover come from the parent chunks).
    pub fn map(&self, disk: u32) -> Option<&ExtentMap> {
        self.maps.get(disk as usize)
    }

    /// Segment `seq`'s plain bytes, or a patch's (`PATCH_SEQ + n`) (cached; a
    /// segment read ahead for a planned failover's check is taken from there:
    /// `replica::warm`).
    pub fn segment(&self, seq: u64) -> Result<Arc<Pooled>> {
        self.segments.get_or_load(seq, || {
            let plain = match self.store.warmed(seq)? {
                Some(kept) => {
                    let mut taken = self.read_ahead.lock();
                    if taken.0.insert(seq) {
                        taken.1 += kept.len() as u64;
                    }
                    kept
                }
                None => Arc::new(self.store.read_layer(seq)?),
            };
            let size = plain.footprint();
            Ok((plain, size))
        })
    }

    fn chunk(&self, disk: u32, n: u64) -> Result<Chunk> {
        self.chunks.get_or_load((disk, n), || {
            Ok((Arc::new(self.store.read_chunk(disk, n)?), 1))
        })
    }

    /// Read `buf.len()` bytes at `offset` of disk `disk` as they were at the point.
    pub fn read(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self
            .disks()
            .get(disk as usize)
            .map(|d| d.size)
            .ok_or_else(|| Error::NotFound(format!("disk id {disk}")))?;
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= size);
        if end.is_none() {
            return Err(Error::OutOfRange {
                what: "read of a point".into(),
                offset,
                end: offset.saturating_add(buf.len() as u64),
                size,
            });
        }
        let mut pieces: Vec<Piece> = Vec::new();
        if let Some(map) = self.map(disk) {
            map.lookup(offset, buf.len() as u64, &mut pieces);
        }
        for p in pieces {
            let from = (p.start - offset) as usize;
            let Some(dst) = buf.get_mut(from..from + p.len as usize) else {
                continue;
            };
            match p.loc {
                Some(Location::Zero { .. }) => dst.fill(0),
                Some(Location::Segment { seq, offset: at }) => {
                    let seg = self.segment(seq)?;
                    let src = seg
                        .get(at as usize..at as usize + dst.len())
                        .ok_or_else(|| {
                            Error::corruption(
                                self.store.dir().join("segments"),
                                at,
                                format!("payload past the end of segment {seq}"),
                            )
                        })?;
                    dst.copy_from_slice(src);
                }
                None => self.read_parent(disk, p.start, dst)?,
            }
        }
        Ok(())
    }

    fn read_parent(&self, disk: u32, offset: u64, dst: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < dst.len() {
            let at = offset + done as u64;
            let n = at / CHUNK_BYTES;
            let within = (at % CHUNK_BYTES) as usize;
            let take = (dst.len() - done).min(CHUNK_BYTES as usize - within);
            let out = dst.get_mut(done..done + take).unwrap_or(&mut []);
            match &*self.chunk(disk, n)? {
                Some(c) => out.copy_from_slice(c.get(within..within + take).unwrap_or(&[])),
                None => out.fill(0),
            }
            done += take;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn cache_loads_each_entry_once_and_others_in_parallel() {
        let cache: Cache<u64, u64> = Cache::new(1 << 20);
        let loads = AtomicUsize::new(0);
        // Loads that saw the other key's load under way while they ran.
        let overlapped = AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (cache, loads, overlapped, barrier) = (&cache, &loads, &overlapped, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Threads 0 and 1 want key 7, threads 2 and 3 key 8.
                    let k = 7 + t / 2;
                    let v = cache
                        .get_or_load(k, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            // Wait (10 s at most) for the other key's load to begin:
                            // it never does while this one runs if loads are
                            // serialised.
                            let t0 = std::time::Instant::now();
                            while loads.load(Ordering::SeqCst) < 2
                                && t0.elapsed() < std::time::Duration::from_secs(10)
                            {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                            if loads.load(Ordering::SeqCst) >= 2 {
                                overlapped.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok((k * 10, 1))
                        })
                        .unwrap();
                    assert_eq!(v, k * 10);
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 2, "one load per key");
        assert_eq!(
            overlapped.load(Ordering::SeqCst),
            2,
            "the two keys loaded at the same time"
        );
        assert!(cache.loading.lock().is_empty(), "every key unlisted");
    }

    #[test]
    fn a_failed_load_is_not_kept() {
        let cache: Cache<u64, u64> = Cache::new(1 << 20);
        assert!(cache
            .get_or_load(1, || Err(Error::InvalidInput("disk gone".into())))
            .is_err());
        assert_eq!(cache.get_or_load(1, || Ok((5, 1))).unwrap(), 5);
        assert_eq!(
            cache.get_or_load(1, || Ok((6, 1))).unwrap(),
            5,
            "cached now"
        );
        assert!(cache.loading.lock().is_empty());
    }

    #[test]
    fn a_reader_waiting_for_a_load_that_fails_loads_itself() {
        let cache: Cache<u64, u64> = Cache::new(1 << 20);
        let started = std::sync::Barrier::new(2);
        let saw_waiter = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let failing = s.spawn(|| {
                cache.get_or_load(3, || {
                    started.wait();
                    // Until the other reader waits for this load (10 s at most: a
                    // rendezvous, not a time limit; the assertion below says whether
                    // it came).
                    let t0 = std::time::Instant::now();
                    while cache.waiting.load(Ordering::SeqCst) == 0
                        && t0.elapsed() < std::time::Duration::from_secs(10)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    saw_waiter.store(cache.waiting.load(Ordering::SeqCst), Ordering::SeqCst);
                    Err(Error::InvalidInput("read failed".into()))
                })
            });
            started.wait();
            let waiting = cache.get_or_load(3, || Ok((30, 1)));
            assert_eq!(waiting.unwrap(), 30);
            assert!(failing.join().unwrap().is_err());
        });
        assert_eq!(
            saw_waiter.load(Ordering::SeqCst),
            1,
            "the second reader waited for the failing load"
        );
        assert!(cache.loading.lock().is_empty());
        assert_eq!(cache.lru.lock().entries.len(), 1);
    }

    #[test]
    fn putting_a_key_again_replaces_it() {
        let mut lru: Lru<u64, u64> = Lru::new(100);
        lru.put(1, 10, 40);
        lru.put(1, 11, 40);
        assert_eq!(lru.entries.len(), 1);
        assert_eq!(lru.bytes, 40);
        assert_eq!(lru.get(1), Some(11));
    }
}
