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
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

/// Decrypted segments kept for reads, in bytes.
const SEGMENT_CACHE: usize = 256 << 20;
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

    fn put(&mut self, k: K, v: V, size: usize) {
        self.entries.push_front((k, v, size));
        self.bytes += size;
        while self.bytes > self.budget && self.entries.len() > 1 {
            if let Some((_, _, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
    }
}

/// A parent chunk, decrypted (None: all zeroes), shared by the readers that need it.
type Chunk = Arc<Option<Vec<u8>>>;

/// A replica's disks at one point, read-only.
pub struct PointImage {
    store: ReplicaStore,
    point: ReplicaPoint,
    maps: Vec<ExtentMap>,
    segments: Mutex<Lru<u64, Arc<Vec<u8>>>>,
    chunks: Mutex<Lru<(u32, u64), Chunk>>,
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
            segments: Mutex::new(Lru::new(SEGMENT_CACHE)),
            chunks: Mutex::new(Lru::new(CHUNK_CACHE)),
            _pin: held,
        })
    }

    pub fn point(&self) -> &ReplicaPoint {
        &self.point
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

    /// Segment `seq`'s plain bytes, or a patch's (`PATCH_SEQ + n`) (cached).
    pub fn segment(&self, seq: u64) -> Result<Arc<Vec<u8>>> {
        let mut cache = self.segments.lock();
        if let Some(s) = cache.get(seq) {
            return Ok(s);
        }
        let plain = Arc::new(self.store.read_layer(seq)?);
        cache.put(seq, plain.clone(), plain.len());
        Ok(plain)
    }

    fn chunk(&self, disk: u32, n: u64) -> Result<Chunk> {
        let mut cache = self.chunks.lock();
        if let Some(c) = cache.get((disk, n)) {
            return Ok(c);
        }
        let c = Arc::new(self.store.read_chunk(disk, n)?);
        cache.put((disk, n), c.clone(), 1);
        Ok(c)
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
