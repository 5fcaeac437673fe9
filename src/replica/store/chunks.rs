//! The replica parent: encrypted chunks of [`CHUNK_BYTES`] per disk (a missing chunk
//! reads as zeroes), and the [`ChunkEditor`] that changes them.

use super::hashes::{ChunkHead, Slot};
use super::{ReplicaStore, SegmentIndex, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::replica::crypt::{ReplicaKey, HEADER_LEN};
use std::collections::BTreeMap;

pub(super) const PARENT: &str = "parent";

/// Dirty parent chunks a [`ChunkEditor`] keeps in memory before writing them out.
const EDITOR_BUDGET: usize = 256 << 20;

pub(super) fn chunk_rel(disk: u32, n: u64) -> String {
    format!("{PARENT}/{disk}/{n:010}.enc")
}

/// The key-derivation id of chunk `n` of `disk`.
fn chunk_id(disk: u32, n: u64) -> u64 {
    u64::from(disk) << 40 | n
}

impl ReplicaStore {
    /// Length of parent chunk `n` of `disk` (the last one may be short).
    pub fn chunk_len(&self, disk: u32, n: u64) -> Result<usize> {
        let size = self.disk_size(disk)?;
        Ok((size.saturating_sub(n * CHUNK_BYTES)).min(CHUNK_BYTES) as usize)
    }

    /// Parent chunk `n` of `disk`, decrypted and authenticated (None: all zeroes).
    pub fn read_chunk(&self, disk: u32, n: u64) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        Ok(self.read_chunk_into(disk, n, &mut buf)?.then_some(buf))
    }

    /// Parent chunk `n` of `disk` into `buf` (reused: no allocation once it is big
    /// enough); false, and `buf` untouched, when the chunk is all zeroes.
    pub fn read_chunk_into(&self, disk: u32, n: u64, buf: &mut Vec<u8>) -> Result<bool> {
        Ok(self.read_chunk_sealed(disk, n, buf)?.is_some())
    }

    /// [`Self::read_chunk_into`], giving the nonce the chunk was sealed with (None:
    /// no chunk, all zeroes).
    pub(super) fn read_chunk_sealed(
        &self,
        disk: u32,
        n: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<[u8; 12]>> {
        let rel = chunk_rel(disk, n);
        if !self.backend().get_into(&self.key_of(&rel), buf)? {
            return Ok(None);
        }
        let path = self.locate(&rel);
        // A header that names no nonce fails the decryption below.
        let nonce = ReplicaKey::header_nonce(buf);
        self.key()
            .open_chunk_in_place(self.manifest.machine_id, chunk_id(disk, n), buf, &path)?;
        if buf.len() != self.chunk_len(disk, n)? {
            return Err(Error::corruption(
                &path,
                0,
                format!("parent chunk holds {} bytes", buf.len()),
            ));
        }
        nonce
            .map(Some)
            .ok_or_else(|| Error::corruption(&path, 0, "parent chunk header does not check"))
    }

    /// The nonce in the header of parent chunk `n` of `disk`, read without the rest
    /// of the chunk.
    pub(super) fn chunk_head(&self, disk: u32, n: u64) -> Result<ChunkHead> {
        let key = self.key_of(&chunk_rel(disk, n));
        Ok(match self.backend().get_head(&key, HEADER_LEN)? {
            None => ChunkHead::Missing,
            Some(head) => match ReplicaKey::header_nonce(&head) {
                Some(nonce) => ChunkHead::Sealed(nonce),
                None => ChunkHead::Unreadable,
            },
        })
    }

    /// Remove parent chunk `n` of `disk` (it reads as zeroes afterwards).
    pub(crate) fn remove_chunk(&self, disk: u32, n: u64) -> Result<()> {
        self.backend().delete(&[self.key_of(&chunk_rel(disk, n))])
    }

    /// The parent chunks of `disk` that hold data, in order.
    pub fn stored_chunks(&self, disk: u32) -> Result<Vec<u64>> {
        self.numbered(&format!("{PARENT}/{disk}"))
    }

    /// The numbers of the `<n>.enc` objects under `dir`, in order.
    pub(super) fn numbered(&self, dir: &str) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = self
            .backend()
            .list(&self.key_of(dir))?
            .iter()
            .filter_map(|n| n.strip_suffix(".enc")?.parse::<u64>().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }
}

/// Edits parent chunks: writes and zeroes land in decrypted chunks kept in memory,
/// written out (encrypted, as one batch of atomic puts; all-zero chunks removed) when
/// they pass a memory budget and at [`ChunkEditor::finish`]. Replaying records over
/// chunks is idempotent, so a crash in between only leaves chunks somewhere between
/// their old and new states.
pub struct ChunkEditor<'a> {
    store: &'a ReplicaStore,
    dirty: BTreeMap<(u32, u64), Vec<u8>>,
    bytes: usize,
}

impl<'a> ChunkEditor<'a> {
    pub fn new(store: &'a ReplicaStore) -> Self {
        ChunkEditor {
            store,
            dirty: BTreeMap::new(),
            bytes: 0,
        }
    }

    fn apply(&mut self, disk: u32, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let size = self.store.disk_size(disk)?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= size)
            .ok_or_else(|| Error::OutOfRange {
                what: "parent chunk edit".into(),
                offset,
                end: offset.saturating_add(len),
                size,
            })?;
        let mut at = offset;
        while at < end {
            let n = at / CHUNK_BYTES;
            let within = (at % CHUNK_BYTES) as usize;
            let take = ((end - at) as usize).min(CHUNK_BYTES as usize - within);
            let from = (at - offset) as usize;
            if !self.dirty.contains_key(&(disk, n)) {
                let len = self.store.chunk_len(disk, n)?;
                if within == 0 && take == len {
                    // The edit covers the whole chunk: what it held is not read, and
                    // the chunk is written once (not zeroed first).
                    let chunk = match data {
                        Some(d) => d.get(from..from + take).unwrap_or(&[]).to_vec(),
                        None => vec![0u8; len],
                    };
                    if chunk.len() != len {
                        return Err(Error::InvalidInput("chunk edit out of range".into()));
                    }
                    self.bytes += len;
                    self.dirty.insert((disk, n), chunk);
                    at += take as u64;
                    continue;
                }
                let chunk = match self.store.read_chunk(disk, n)? {
                    Some(c) => c,
                    None => vec![0u8; len],
                };
                self.bytes += chunk.len();
                self.dirty.insert((disk, n), chunk);
            }
            if let Some(chunk) = self.dirty.get_mut(&(disk, n)) {
                let dst = chunk
                    .get_mut(within..within + take)
                    .ok_or_else(|| Error::InvalidInput("chunk edit out of range".into()))?;
                match data {
                    Some(d) => dst.copy_from_slice(d.get(from..from + take).unwrap_or(&[])),
                    None => dst.fill(0),
                }
            }
            at += take as u64;
        }
        if self.bytes > EDITOR_BUDGET {
            self.write_out()?;
        }
        Ok(())
    }

    /// Apply every record of a layer (a stored segment or a patch: its index and its
    /// plain bytes, as [`ReplicaStore::layer`] gives them), in order.
    pub fn apply_layer(&mut self, index: &SegmentIndex, plain: &[u8]) -> Result<()> {
        for r in &index.records {
            if r.zero {
                self.zero(r.disk, r.offset, r.length)?;
                continue;
            }
            let data = plain
                .get(r.payload_at as usize..(r.payload_at + r.length) as usize)
                .ok_or_else(|| {
                    Error::corruption(
                        self.store.dir(),
                        r.payload_at,
                        format!("record at LSN {} runs past the end of its file", r.lsn),
                    )
                })?;
            self.write(r.disk, r.offset, data)?;
        }
        Ok(())
    }

    /// `data` written at `offset` of `disk`.
    pub fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.apply(disk, offset, data.len() as u64, Some(data))
    }

    /// `offset..offset+len` of `disk` zeroed.
    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<()> {
        self.apply(disk, offset, len, None)
    }

    /// Seal every dirty chunk (up to four at once) and put them as one batch, all-zero
    /// chunks removed; meanwhile hash their pieces for the hash pages, replaced after
    /// them (in whatever order the two land, a slot counts only while its chunk
    /// carries its nonce). The plain and the sealed chunks are both held until the
    /// batch is down: up to twice [`EDITOR_BUDGET`].
    fn write_out(&mut self) -> Result<()> {
        let dirty: Vec<((u32, u64), Vec<u8>)> =
            std::mem::take(&mut self.dirty).into_iter().collect();
        let store = self.store;
        let seal = |((disk, n), chunk): &((u32, u64), Vec<u8>)| -> Result<Option<Vec<u8>>> {
            if chunk.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            store
                .key()
                .seal_chunk(store.manifest.machine_id, chunk_id(*disk, *n), chunk)
                .map(Some)
        };
        let sealed = crate::parallel::map(&dirty, seal)?;
        let mut puts = Vec::with_capacity(sealed.len());
        let mut kept = Vec::with_capacity(sealed.len());
        let mut zeroed = Vec::new();
        for ((at, chunk), s) in dirty.iter().zip(sealed) {
            let key = store.key_of(&chunk_rel(at.0, at.1));
            match s {
                None => zeroed.push(key),
                Some(ct) => {
                    if let Some(nonce) = ReplicaKey::header_nonce(&ct) {
                        kept.push((*at, nonce, chunk.as_slice()));
                    }
                    puts.push((key, ct));
                }
            }
        }
        let slots = std::thread::scope(|s| -> Result<Vec<((u32, u64), Slot)>> {
            let hashing = s.spawn(|| {
                crate::parallel::map(&kept, |(at, nonce, plain)| {
                    Ok((*at, Slot::of(*nonce, plain)))
                })
            });
            let stored = store.backend().put_batch(&puts);
            let slots = hashing
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidInput("hash worker panicked".into())));
            stored?;
            slots
        })?;
        store.backend().delete(&zeroed)?;
        self.bytes = 0;
        // The chunks are in place; the pages are a cache (a failure is warned).
        store.store_slots(slots);
        Ok(())
    }

    /// Write every edited chunk out, durably.
    pub fn finish(mut self) -> Result<()> {
        self.write_out()
    }
}
