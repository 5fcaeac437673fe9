//! The replica parent: encrypted chunks of [`CHUNK_BYTES`] per disk (a missing chunk
//! reads as zeroes), and the [`ChunkEditor`] that changes them.

use super::hashes::{ChunkHead, Slot};
use super::{ReplicaStore, SegmentIndex, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::replica::crypt::{sealed_len, ReplicaKey, HEADER_LEN};
use crate::storage::pool::{room_for, Pooled};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub(super) const PARENT: &str = "parent";

/// The biggest room for a write-out's sealed chunks taken from, and given back to,
/// [`crate::storage::pool`]: an initial copy's 16 MiB batch fits, a merge of hundreds
/// of MiB does not (it would hold the pool's room, meant for segments, for a minute).
const SEALED_POOLED_MAX: usize = 32 << 20;

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
///
/// A whole chunk given by [`ChunkEditor::write_borrowed`] is kept as the caller's
/// bytes (`'d`), not copied, until it is sealed or edited again.
pub struct ChunkEditor<'a, 'd> {
    store: &'a ReplicaStore,
    dirty: BTreeMap<(u32, u64), Cow<'d, [u8]>>,
    bytes: usize,
}

/// A dirty chunk: (disk, number) and its plain bytes.
type Dirty<'d> = ((u32, u64), Cow<'d, [u8]>);

/// The bytes of an edit.
#[derive(Clone, Copy)]
enum Edit<'x, 'd> {
    Zero,
    /// Copied into the chunks.
    Copy(&'x [u8]),
    /// Kept as they are for a chunk they cover whole.
    Borrow(&'d [u8]),
}

impl<'x, 'd> Edit<'x, 'd> {
    /// `from..to` of the edit's bytes (None for zeroes).
    fn bytes(self, from: usize, to: usize) -> Option<&'x [u8]>
    where
        'd: 'x,
    {
        match self {
            Edit::Zero => None,
            Edit::Copy(d) | Edit::Borrow(d) => Some(d.get(from..to).unwrap_or(&[])),
        }
    }
}

impl<'a, 'd> ChunkEditor<'a, 'd> {
    pub fn new(store: &'a ReplicaStore) -> Self {
        ChunkEditor {
            store,
            dirty: BTreeMap::new(),
            bytes: 0,
        }
    }

    fn apply(&mut self, disk: u32, offset: u64, len: u64, data: Edit<'_, 'd>) -> Result<()> {
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
                    let chunk: Cow<'d, [u8]> = match data {
                        Edit::Zero => Cow::Owned(vec![0u8; len]),
                        Edit::Copy(d) => {
                            Cow::Owned(d.get(from..from + take).unwrap_or(&[]).to_vec())
                        }
                        Edit::Borrow(d) => Cow::Borrowed(d.get(from..from + take).unwrap_or(&[])),
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
                self.dirty.insert((disk, n), Cow::Owned(chunk));
            }
            if let Some(chunk) = self.dirty.get_mut(&(disk, n)) {
                let dst = chunk
                    .to_mut()
                    .get_mut(within..within + take)
                    .ok_or_else(|| Error::InvalidInput("chunk edit out of range".into()))?;
                match data.bytes(from, from + take) {
                    Some(d) => dst.copy_from_slice(d),
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
        self.apply(disk, offset, data.len() as u64, Edit::Copy(data))
    }

    /// [`Self::write`], keeping the chunks `data` covers whole as `data` itself
    /// (sealed from it, not copied first): it must outlive the editor.
    pub fn write_borrowed(&mut self, disk: u32, offset: u64, data: &'d [u8]) -> Result<()> {
        self.apply(disk, offset, data.len() as u64, Edit::Borrow(data))
    }

    /// `offset..offset+len` of `disk` zeroed.
    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<()> {
        self.apply(disk, offset, len, Edit::Zero)
    }

    /// Seal every dirty chunk (up to four at once) and put them as one batch, all-zero
    /// chunks removed; meanwhile hash their pieces for the hash pages, replaced after
    /// them (in whatever order the two land, a slot counts only while its chunk
    /// carries its nonce). The chunks are sealed into one buffer, a [`Pooled`] one up
    /// to [`SEALED_POOLED_MAX`] (a batch of the initial copy is 16 MiB: memory touched
    /// before costs far less than fresh memory on a VM, see `storage::pool`), so the
    /// plain and the sealed chunks are both held until the batch is down: up to twice
    /// [`EDITOR_BUDGET`].
    fn write_out(&mut self) -> Result<()> {
        let dirty: Vec<Dirty<'d>> = std::mem::take(&mut self.dirty).into_iter().collect();
        self.bytes = 0;
        if dirty.is_empty() {
            return Ok(());
        }
        let store = self.store;
        let total: usize = dirty.iter().map(|(_, c)| sealed_len(c.len())).sum();
        // Every byte of a chunk's room is written before it is put (a pooled
        // buffer's old bytes are never stored).
        let (mut pooled, mut own);
        let room: &mut [u8] = if room_for(total) <= SEALED_POOLED_MAX {
            pooled = Pooled::with_room(total);
            &mut pooled
        } else {
            own = vec![0u8; total];
            &mut own
        };
        let mut jobs: Vec<(&Dirty<'d>, &mut [u8])> = Vec::with_capacity(dirty.len());
        let mut rest = room;
        for item in &dirty {
            let (out, after) = rest
                .split_at_mut_checked(sealed_len(item.1.len()))
                .ok_or_else(|| Error::InvalidInput("no room to seal a chunk".into()))?;
            jobs.push((item, out));
            rest = after;
        }
        // Each chunk's file, sealed in its room, and its nonce; None: all zeroes
        // (removed).
        let nonces = crate::parallel::map_mut(&mut jobs, |(((disk, n), chunk), out)| {
            if chunk.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            let id = chunk_id(*disk, *n);
            let nonce = store
                .key()
                .seal_chunk_into(store.manifest.machine_id, id, chunk, out)?;
            Ok(Some(nonce))
        })?;
        let mut puts = Vec::with_capacity(jobs.len());
        let mut kept = Vec::with_capacity(jobs.len());
        let mut zeroed = Vec::new();
        for ((((disk, n), chunk), out), nonce) in jobs.iter().zip(nonces) {
            let key = store.key_of(&chunk_rel(*disk, *n));
            match nonce {
                None => zeroed.push(key),
                Some(nonce) => {
                    kept.push(((*disk, *n), nonce, chunk.as_ref()));
                    puts.push((key, &**out));
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
        // The chunks are in place; the pages are a cache (a failure is warned).
        store.store_slots(slots);
        Ok(())
    }

    /// Write every edited chunk out, durably.
    pub fn finish(mut self) -> Result<()> {
        self.write_out()
    }
}
