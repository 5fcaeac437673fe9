//! Hash pages: the BLAKE3 hash of every 4 KiB piece of every parent chunk, kept at
//! the target so that a resync with the defaults (4 KiB chunks, BLAKE3) reads 40
//! bytes of each parent chunk — its header — instead of reading, decrypting and
//! hashing the whole disk.
//!
//! `<m>/hashes/<disk>/<page>.enc` covers parent chunks `page*64 .. page*64+64` (16 MiB
//! of disk), encrypted like a chunk under a key domain of its own (the hashes of
//! plaintext tell about the plaintext). Its plain bytes, little-endian:
//!
//! ```text
//! off  len  field
//!   0    4  piece bytes (4096)
//!   4    1  hash: 1 = BLAKE3
//!   5    3  reserved, zero
//!   8    …  64 slots of 2061 bytes, one per parent chunk:
//!             0    1  hashes in the slot, 0..=64 (0: empty)
//!             1   12  the AES-GCM nonce of the chunk file they were taken from
//!            13 2048  the hashes of its 4 KiB pieces in order (the last piece of a
//!                     disk may be short), unused ones zero
//! ```
//!
//! [`ChunkEditor`](super::ChunkEditor), the only writer of parent chunks, fills a
//! slot from the plaintext it has just sealed and replaces the page after the
//! chunk's batch, atomically but without an fsync (a failure to is warned: the page
//! is a cache, and a crash may leave it old, missing or torn). A slot counts only while its
//! nonce is the one in its chunk's header (a
//! fresh random nonce at every seal). So a page that landed before its chunk, after
//! it, or never (a crash, two editors racing on one page, an older build rewriting a
//! chunk) is never wrong, only missed; a miss is hashed from the decrypted chunk as
//! before and written back. A page that does not authenticate is a miss for all its
//! slots. A missing chunk is zeroes and needs no slot.
//!
//! What a slot trusts: a chunk whose header is intact holds the bytes it was sealed
//! with. Damage to a chunk's body is for the scrub to find — a resync no longer reads
//! the chunks it has slots for — and a resync of a replica with recorded damage drops
//! the chunks that do not authenticate first. `replog inspect` authenticates every
//! page ([`ReplicaStore::check_hash_page`]).

use super::{ReplicaStore, CHUNK_BYTES};
use crate::chunk_hash::{ChunkHash, MIN_CHUNK};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

const HASHES: &str = "hashes";
/// Parent chunks per page.
pub const PAGE_CHUNKS: u64 = 64;
/// Bytes each hash covers: the smallest (and default) resync chunk.
pub const PIECE: u64 = MIN_CHUNK;
/// The hash pages hold.
pub const ALGO: ChunkHash = ChunkHash::Blake3;
const ALGO_ID: u8 = 1;
const PIECES: usize = (CHUNK_BYTES / PIECE) as usize;
const PAGE_HEAD: usize = 8;
const SLOT: usize = 1 + 12 + PIECES * 32;
const PAGE_LEN: usize = PAGE_HEAD + PAGE_CHUNKS as usize * SLOT;

fn page_rel(disk: u32, page: u64) -> String {
    format!("{HASHES}/{disk}/{page:010}.enc")
}

/// The key-derivation id of page `page` of `disk`.
fn page_id(disk: u32, page: u64) -> u64 {
    u64::from(disk) << 40 | page
}

/// The hashes of a parent chunk's pieces and the nonce of the sealed chunk they
/// were taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub nonce: [u8; 12],
    pub hashes: Vec<[u8; 32]>,
}

impl Slot {
    /// The slot of `plain`, sealed with `nonce`.
    pub fn of(nonce: [u8; 12], plain: &[u8]) -> Slot {
        Slot {
            nonce,
            hashes: piece_hashes(plain),
        }
    }
}

/// The hashes of the pieces of `data`, as a resync with the defaults compares them.
pub(crate) fn piece_hashes(data: &[u8]) -> Vec<[u8; 32]> {
    data.chunks(PIECE as usize).map(|p| ALGO.of(p)).collect()
}

/// What a parent chunk's header says.
pub(crate) enum ChunkHead {
    /// No chunk: zeroes.
    Missing,
    /// Sealed with this nonce.
    Sealed([u8; 12]),
    /// Not a header (damage: read the chunk, which reports it).
    Unreadable,
}

/// One page's slots, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page {
    slots: Vec<Option<Slot>>,
}

impl Page {
    fn empty() -> Page {
        Page {
            slots: vec![None; PAGE_CHUNKS as usize],
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; PAGE_LEN];
        out[..4].copy_from_slice(&(PIECE as u32).to_le_bytes());
        out[4] = ALGO_ID;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(s) = slot else { continue };
            let at = PAGE_HEAD + i * SLOT;
            out[at] = s.hashes.len().min(PIECES) as u8;
            out[at + 1..at + 13].copy_from_slice(&s.nonce);
            for (j, h) in s.hashes.iter().take(PIECES).enumerate() {
                out[at + 13 + j * 32..at + 13 + (j + 1) * 32].copy_from_slice(h);
            }
        }
        out
    }

    /// None unless `b` is a page of this layout.
    fn decode(b: &[u8]) -> Option<Page> {
        if b.len() != PAGE_LEN
            || b.get(..4)? != (PIECE as u32).to_le_bytes()
            || *b.get(4)? != ALGO_ID
            || b.get(5..8)? != [0u8; 3]
        {
            return None;
        }
        let mut page = Page::empty();
        for (i, slot) in page.slots.iter_mut().enumerate() {
            let s = b.get(PAGE_HEAD + i * SLOT..PAGE_HEAD + (i + 1) * SLOT)?;
            let count = usize::from(*s.first()?);
            if count == 0 {
                continue;
            }
            if count > PIECES {
                return None;
            }
            let hashes = s
                .get(13..13 + count * 32)?
                .chunks_exact(32)
                .map(|h| h.try_into().ok())
                .collect::<Option<Vec<[u8; 32]>>>()?;
            *slot = Some(Slot {
                nonce: s.get(1..13)?.try_into().ok()?,
                hashes,
            });
        }
        Some(page)
    }
}

impl ReplicaStore {
    /// Page `page` of `disk` as stored, and its stored size: None if there is none;
    /// an error if it does not authenticate or is not in this build's layout.
    fn open_page(&self, disk: u32, page: u64) -> Result<Option<(Page, u64)>> {
        let rel = page_rel(disk, page);
        let mut buf = Vec::new();
        if !self.backend().get_into(&self.key_of(&rel), &mut buf)? {
            return Ok(None);
        }
        let len = buf.len() as u64;
        let path = self.locate(&rel);
        self.key().open_hashes_in_place(
            self.manifest.machine_id,
            page_id(disk, page),
            &mut buf,
            &path,
        )?;
        let p = Page::decode(&buf).ok_or_else(|| {
            Error::corruption(&path, 0, "hash page is not in the layout this build reads")
        })?;
        Ok(Some((p, len)))
    }

    /// Page `page` of `disk`; an empty one when there is none or it does not
    /// authenticate or decode (then warned: it is rewritten at its next update).
    fn read_page(&self, disk: u32, page: u64) -> Result<Page> {
        match self.open_page(disk, page) {
            Ok(p) => Ok(p.map_or_else(Page::empty, |(p, _)| p)),
            Err(e) if e.is_corruption() || matches!(e, Error::Unsupported { .. }) => {
                tracing::warn!("hash page {page} of disk {disk}: {e}; rebuilt");
                Ok(Page::empty())
            }
            Err(e) => Err(e),
        }
    }

    /// The hash pages of `disk` that exist, by number.
    pub fn stored_hash_pages(&self, disk: u32) -> Result<Vec<u64>> {
        self.numbered(&format!("{HASHES}/{disk}"))
    }

    /// Check hash page `page` of `disk` as `replog inspect` does: it authenticates and
    /// is in this build's layout; its size. (Everything else reads a damaged page as
    /// empty and rebuilds it.)
    pub fn check_hash_page(&self, disk: u32, page: u64) -> Result<u64> {
        self.open_page(disk, page)?.map(|(_, n)| n).ok_or_else(|| {
            Error::NotFound(format!(
                "no hash page {}",
                self.locate(&page_rel(disk, page)).display()
            ))
        })
    }

    /// Put `slots` into their pages, atomically but not durably
    /// ([`ReplicaBackend::put_cache_batch`](crate::replica::backend::ReplicaBackend::put_cache_batch)).
    /// A cache: failing to, or a crash after, costs the next resync reading those
    /// chunks, never more.
    pub(super) fn store_slots(&self, slots: Vec<((u32, u64), Slot)>) {
        self.store_slots_over(slots, BTreeMap::new())
    }

    /// [`Self::store_slots`] over the pages in `read` where it has them (read moments
    /// ago), reading the others.
    fn store_slots_over(&self, slots: Vec<((u32, u64), Slot)>, read: BTreeMap<(u32, u64), Page>) {
        if slots.is_empty() {
            return;
        }
        if let Err(e) = self.page_updates(slots, read).and_then(|puts| {
            let puts: Vec<(String, &[u8])> = puts
                .iter()
                .map(|(k, v)| (k.clone(), v.as_slice()))
                .collect();
            self.backend().put_cache_batch(&puts)
        }) {
            tracing::warn!(
                "hash pages of {} not updated ({e}); a resync reads those chunks instead",
                self.dir().display()
            );
        }
    }

    /// The sealed pages that take in `slots` (parent chunk → slot): each page they
    /// touch read (unless `read` has it), changed and sealed again, ready for a batch
    /// put.
    fn page_updates(
        &self,
        slots: Vec<((u32, u64), Slot)>,
        mut read: BTreeMap<(u32, u64), Page>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let mut pages: BTreeMap<(u32, u64), Vec<(u64, Slot)>> = BTreeMap::new();
        for ((disk, n), slot) in slots {
            pages
                .entry((disk, n / PAGE_CHUNKS))
                .or_default()
                .push((n % PAGE_CHUNKS, slot));
        }
        let mut out = Vec::with_capacity(pages.len());
        for ((disk, p), changes) in pages {
            let mut page = match read.remove(&(disk, p)) {
                Some(page) => page,
                None => self.read_page(disk, p)?,
            };
            for (i, slot) in changes {
                if let Some(s) = page.slots.get_mut(i as usize) {
                    *s = Some(slot);
                }
            }
            let sealed = self.key().seal_hashes(
                self.manifest.machine_id,
                page_id(disk, p),
                &page.encode(),
            )?;
            out.push((self.key_of(&page_rel(disk, p)), sealed));
        }
        Ok(out)
    }

    /// The hashes of the pieces of parent chunks `from..to` of `disk`, in order: from
    /// the hash pages where a slot matches its chunk, else from the decrypted chunk
    /// (up to four at once; those slots are then written back).
    pub(crate) fn parent_piece_hashes(
        &self,
        disk: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<Vec<[u8; 32]>>> {
        let size = self.disk_size(disk)?;
        let to = to.min(size.div_ceil(CHUNK_BYTES));
        let zero_piece = ALGO.of(&[0u8; PIECE as usize]);
        // A missing chunk's hashes: zeroes, the last piece of the disk maybe short.
        let zeroes = |n: u64| -> Result<Vec<[u8; 32]>> {
            let len = self.chunk_len(disk, n)?;
            let mut h = vec![zero_piece; len / PIECE as usize];
            if len % PIECE as usize != 0 {
                h.push(ALGO.of(&vec![0u8; len % PIECE as usize]));
            }
            Ok(h)
        };
        let mut out: Vec<Option<Vec<[u8; 32]>>> =
            Vec::with_capacity(to.saturating_sub(from) as usize);
        let mut misses = Vec::new();
        let mut pages: BTreeMap<(u32, u64), Page> = BTreeMap::new();
        for n in from..to {
            let want = self.chunk_len(disk, n)?.div_ceil(PIECE as usize);
            let found = match self.chunk_head(disk, n)? {
                ChunkHead::Missing => Some(zeroes(n)?),
                ChunkHead::Unreadable => None,
                ChunkHead::Sealed(nonce) => {
                    let p = n / PAGE_CHUNKS;
                    let page = pages.entry((disk, p)).or_insert_with(|| {
                        // A page that cannot be read is a miss for its chunks.
                        self.read_page(disk, p).unwrap_or_else(|e| {
                            tracing::warn!("hash page {p} of disk {disk}: {e}; chunks read");
                            Page::empty()
                        })
                    });
                    page.slots
                        .get((n % PAGE_CHUNKS) as usize)
                        .and_then(|s| s.as_ref())
                        .filter(|s| s.nonce == nonce && s.hashes.len() == want)
                        .map(|s| s.hashes.clone())
                }
            };
            if found.is_none() {
                misses.push(n);
            }
            out.push(found);
        }
        let hashed = crate::parallel::map(&misses, |n| -> Result<Option<Slot>> {
            let mut buf = Vec::new();
            // None: gone meanwhile, zeroes.
            Ok(self
                .read_chunk_sealed(disk, *n, &mut buf)?
                .map(|nonce| Slot::of(nonce, &buf)))
        })?;
        let mut back = Vec::new();
        for (n, slot) in misses.iter().zip(hashed) {
            let hashes = match slot {
                Some(s) => {
                    let h = s.hashes.clone();
                    back.push(((disk, *n), s));
                    h
                }
                None => zeroes(*n)?,
            };
            if let Some(o) = out.get_mut((n - from) as usize) {
                *o = Some(hashes);
            }
        }
        self.store_slots_over(back, pages);
        out.into_iter()
            .enumerate()
            .map(|(i, h)| {
                h.ok_or_else(|| {
                    Error::InvalidInput(format!("no hashes for parent chunk {}", from + i as u64))
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::format::meta::DiskEntry;
    use crate::replica::backend::{DirBackend, ReplicaBackend};
    use crate::replica::crypt::ReplicaKey;
    use crate::replica::store::{ChunkEditor, ReplicaManifest, Replicas};
    use crate::storage::MemStorage;
    use std::sync::Arc;

    /// A disk that ends in a short parent chunk with a short last piece.
    const SIZE: u64 = 5 * CHUNK_BYTES + 3 * PIECE + 512;
    /// A second disk over three pages, ending the same way.
    const SIZE1: u64 = (2 * PAGE_CHUNKS + 3) * CHUNK_BYTES + 5 * PIECE + 512;

    fn store() -> (Arc<dyn ReplicaBackend>, ReplicaStore) {
        store_on(MemStorage::new())
    }

    fn store_on(mem: MemStorage) -> (Arc<dyn ReplicaBackend>, ReplicaStore) {
        let backend: Arc<dyn ReplicaBackend> = Arc::new(DirBackend::new(Arc::new(mem), "/r"));
        let manifest = ReplicaManifest {
            source_site: [1u8; 32],
            machine_id: 77,
            disks: vec![
                DiskEntry {
                    id: 0,
                    name: "os".into(),
                    size: SIZE,
                },
                DiskEntry {
                    id: 1,
                    name: "data".into(),
                    size: SIZE1,
                },
            ],
            base_lsn: 0,
            base_seq: 0,
            generation: 1,
        };
        let store = Replicas::new(backend.clone(), ReplicaKey::from_bytes([3u8; 32]))
            .create("vm1", manifest, Default::default())
            .unwrap();
        (backend, store)
    }

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// What the resync computed before hash pages: every piece read and hashed.
    fn read_and_hash(s: &ReplicaStore) -> Vec<[u8; 32]> {
        crate::chunk_hash::hash_chunks(
            SIZE,
            PIECE,
            0,
            u64::MAX,
            &|at, buf| s.read_parent(0, at, buf),
            ALGO,
        )
        .unwrap()
    }

    fn via_pages(s: &ReplicaStore, first: u64, count: u64) -> Vec<[u8; 32]> {
        s.resync_hashes(PIECE, 0, first, count, ALGO).unwrap()
    }

    fn write(s: &ReplicaStore, at: u64, d: &[u8]) {
        let mut ed = ChunkEditor::new(s);
        ed.write(0, at, d).unwrap();
        ed.finish().unwrap();
    }

    /// Whole chunks lent to the editor are sealed from the caller's bytes (which it
    /// never changes), a chunk lent and then edited in part is copied first, a lent
    /// chunk of zeroes is removed, and the hash pages describe what was stored. Ten
    /// MiB a batch: the sealed batch comes from the segment-buffer pool and goes
    /// back, so the second round seals into a buffer holding the first's bytes.
    #[test]
    fn lent_chunks_are_sealed_as_given_and_copied_before_an_edit() {
        let (_b, s) = store();
        let c = CHUNK_BYTES as usize;
        let whole = 40 * c;
        for (round, seed) in [(0, 1u8), (1, 2)] {
            let d = data(seed, whole);
            let before = d.clone();
            let last = if round == 0 { data(9, c) } else { vec![0u8; c] };
            let mut ed = ChunkEditor::new(&s);
            ed.write_borrowed(1, CHUNK_BYTES, &d).unwrap();
            ed.write(1, 2 * CHUNK_BYTES + 100, &[0xfe; 300]).unwrap();
            ed.write_borrowed(1, 50 * CHUNK_BYTES, &last).unwrap();
            ed.finish().unwrap();
            assert_eq!(d, before, "the caller's bytes changed");
            let mut want = d.clone();
            want[c + 100..c + 400].fill(0xfe);
            let mut got = vec![0u8; whole];
            s.read_parent(1, CHUNK_BYTES, &mut got).unwrap();
            assert!(got == want, "round {round}: stored bytes differ");
            let mut tail = vec![1u8; c];
            s.read_parent(1, 50 * CHUNK_BYTES, &mut tail).unwrap();
            assert!(tail == last, "round {round}: chunk 50");
            assert_eq!(
                s.stored_chunks(1).unwrap().contains(&50),
                round == 0,
                "a chunk of zeroes is removed"
            );
            let pieces = (51 * CHUNK_BYTES / PIECE) as usize;
            let mut disk = vec![0u8; 51 * c];
            s.read_parent(1, 0, &mut disk).unwrap();
            let read: Vec<[u8; 32]> = disk.chunks(PIECE as usize).map(|p| ALGO.of(p)).collect();
            assert_eq!(
                s.resync_hashes(PIECE, 1, 0, pieces as u64, ALGO).unwrap(),
                read,
                "round {round}: hash pages"
            );
        }
    }

    /// Flip a byte of parent chunk `n`'s body; its sealed bytes as they were.
    fn damage_body(b: &Arc<dyn ReplicaBackend>, n: u64) -> Vec<u8> {
        let key = format!("vm1/parent/0/{n:010}.enc");
        let was = b.get(&key).unwrap().unwrap();
        let mut c = was.clone();
        c[HEADER_AT_BODY] ^= 1;
        b.put(&key, &c).unwrap();
        was
    }
    const HEADER_AT_BODY: usize = crate::replica::crypt::HEADER_LEN + 10;

    #[test]
    fn hashes_from_pages_equal_hashes_read_from_the_chunks() {
        let (_, s) = store();
        // Chunk 0 whole, chunk 2 in part, the short last chunk, chunks 1 and 3 never.
        write(&s, 0, &data(1, CHUNK_BYTES as usize));
        write(&s, 2 * CHUNK_BYTES + 5000, &data(2, 70_000));
        write(
            &s,
            4 * CHUNK_BYTES + 77,
            &data(3, (SIZE - 4 * CHUNK_BYTES - 77) as usize),
        );
        let want = read_and_hash(&s);
        assert_eq!(want.len() as u64, SIZE.div_ceil(PIECE));
        assert_eq!(via_pages(&s, 0, u64::MAX), want);
        // Any window, aligned to nothing.
        for (first, count) in [
            (3, 200),
            (64, 64),
            (300, 1000),
            (0, 1),
            (want.len() as u64 - 1, 9),
        ] {
            let end = (first + count).min(want.len() as u64) as usize;
            assert_eq!(
                via_pages(&s, first, count),
                want[first as usize..end],
                "{first}+{count}"
            );
        }
        assert!(via_pages(&s, want.len() as u64, 5).is_empty());
        // A chunk zeroed whole is removed; its stale slot is never used.
        let mut ed = ChunkEditor::new(&s);
        ed.zero(0, 2 * CHUNK_BYTES, CHUNK_BYTES).unwrap();
        ed.finish().unwrap();
        assert_eq!(via_pages(&s, 0, u64::MAX), read_and_hash(&s));
    }

    #[test]
    fn a_page_is_used_and_a_stale_or_damaged_one_is_never_believed() {
        let (b, s) = store();
        write(&s, 0, &data(1, 2 * CHUNK_BYTES as usize));
        let want = read_and_hash(&s);
        // The page is what answers: with a chunk's body damaged behind its back the
        // answer stays that of the bytes it was sealed with, while reading the chunk
        // reports the damage.
        let chunk1 = damage_body(&b, 1);
        assert_eq!(via_pages(&s, 0, 128), want[..128]);
        let page_key = "vm1/hashes/0/0000000000.enc".to_string();
        let old_page = b.get(&page_key).unwrap().unwrap();
        b.delete(std::slice::from_ref(&page_key)).unwrap();
        let e = s.resync_hashes(PIECE, 0, 0, 128, ALGO).unwrap_err();
        assert!(e.is_corruption(), "{e}");

        // Chunk 0 rewritten and the page put back as it was before: the slot's nonce is
        // the old chunk's, so chunk 0 is read and hashed, and the slot written back.
        b.put("vm1/parent/0/0000000001.enc", &chunk1).unwrap();
        write(&s, 0, &data(9, CHUNK_BYTES as usize));
        let want = read_and_hash(&s);
        b.put(&page_key, &old_page).unwrap();
        assert_eq!(via_pages(&s, 0, u64::MAX), want);
        let mended = b.get(&page_key).unwrap().unwrap();
        assert_ne!(mended, old_page, "the page is written again");
        damage_body(&b, 0);
        assert_eq!(
            via_pages(&s, 0, 64),
            want[..64],
            "now answered from the page"
        );

        // A page that does not authenticate: every slot missed, nothing believed.
        let mut bad = mended.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        b.put(&page_key, &bad).unwrap();
        let e = s.check_hash_page(0, 0).unwrap_err();
        assert!(e.is_corruption(), "inspect reports the page: {e}");
        let e = s.resync_hashes(PIECE, 0, 0, 64, ALGO).unwrap_err();
        assert!(e.is_corruption(), "chunk 0's damage reported: {e}");
        assert_eq!(via_pages(&s, 64, 64), want[64..128]);
    }

    fn read_and_hash_disk(s: &ReplicaStore, disk: u32, size: u64) -> Vec<[u8; 32]> {
        crate::chunk_hash::hash_chunks(
            size,
            PIECE,
            0,
            u64::MAX,
            &|at, buf| s.read_parent(disk, at, buf),
            ALGO,
        )
        .unwrap()
    }

    #[test]
    fn every_page_of_another_disk_answers_for_its_chunks_the_short_last_one_too() {
        let (b, s) = store();
        let last = SIZE1.div_ceil(CHUNK_BYTES) - 1;
        // Chunks in each of the three pages, the page edges and the short last chunk,
        // in one editor (one batch touching three pages).
        let mut ed = ChunkEditor::new(&s);
        for (i, n) in [0, 63, 64, 100, 127, 128, last].into_iter().enumerate() {
            let at = n * CHUNK_BYTES + 512 * i as u64;
            let len = (SIZE1 - at).min(CHUNK_BYTES + 9000) as usize;
            ed.write(1, at, &data(i as u8 + 20, len)).unwrap();
        }
        ed.finish().unwrap();
        write(&s, 0, &data(7, CHUNK_BYTES as usize));
        let want = read_and_hash_disk(&s, 1, SIZE1);
        let want0 = read_and_hash(&s);
        // Every stored chunk's body damaged: only the pages can still answer.
        for n in s.stored_chunks(1).unwrap() {
            let key = format!("vm1/parent/1/{n:010}.enc");
            let mut c = b.get(&key).unwrap().unwrap();
            c[HEADER_AT_BODY] ^= 1;
            b.put(&key, &c).unwrap();
        }
        assert_eq!(s.stored_chunks(1).unwrap().len(), 11);
        assert_eq!(s.stored_hash_pages(1).unwrap(), vec![0, 1, 2]);
        for p in 0..3 {
            assert!(s.check_hash_page(1, p).unwrap() > PAGE_LEN as u64);
        }
        assert_eq!(s.resync_hashes(PIECE, 1, 0, u64::MAX, ALGO).unwrap(), want);
        assert_eq!(
            s.resync_hashes(PIECE, 1, 63 * 64 + 5, 64 * 2, ALGO)
                .unwrap(),
            want[63 * 64 + 5..65 * 64 + 5]
        );
        // Disk 0's page is its own.
        damage_body(&b, 0);
        assert_eq!(via_pages(&s, 0, u64::MAX), want0);
    }

    #[test]
    fn a_page_newer_than_its_chunk_is_not_believed() {
        let (b, s) = store();
        write(&s, 0, &data(1, CHUNK_BYTES as usize));
        let key = "vm1/parent/0/0000000000.enc";
        let old_chunk = b.get(key).unwrap().unwrap();
        write(&s, 100, &data(2, 5000));
        // A crash that kept the page's new slot but not the chunk: the old chunk file.
        b.put(key, &old_chunk).unwrap();
        let want = read_and_hash(&s);
        assert_eq!(via_pages(&s, 0, u64::MAX), want);
        assert_eq!(want[0], ALGO.of(&data(1, CHUNK_BYTES as usize)[..4096]));
    }

    #[test]
    fn a_page_that_cannot_be_read_or_written_costs_a_miss_never_a_failed_edit() {
        use crate::storage::Storage;
        let mem = MemStorage::new();
        let (_, s) = store_on(mem.clone());
        // A file where the pages' directory would go: no page can be put there.
        mem.create_dir_all(std::path::Path::new("/r/vm1/hashes"))
            .unwrap();
        crate::storage::write_atomic(&mem, std::path::Path::new("/r/vm1/hashes/0"), b"x").unwrap();
        write(&s, 0, &data(1, 2 * CHUNK_BYTES as usize));
        assert_eq!(
            s.read_chunk(0, 1).unwrap().unwrap(),
            data(1, 2 * CHUNK_BYTES as usize)[CHUNK_BYTES as usize..]
        );
        assert!(s.check_hash_page(0, 0).is_err(), "no page was written");
        assert_eq!(via_pages(&s, 0, u64::MAX), read_and_hash(&s));
    }

    #[test]
    fn pages_are_not_fsynced_and_whatever_a_crash_leaves_of_them_is_never_believed() {
        use crate::storage::CrashMode;
        for seed in 1..24u64 {
            let mem = MemStorage::new();
            let (b, s) = store_on(mem.clone());
            write(&s, 0, &data(1, 3 * CHUNK_BYTES as usize));
            mem.crash(CrashMode::DropAll);
            // The chunks were durable, the first pages not: rewrite, then tear.
            let s = Replicas::new(b.clone(), ReplicaKey::from_bytes([3u8; 32]))
                .open("vm1")
                .unwrap();
            assert!(
                s.check_hash_page(0, 0).is_err(),
                "the page was written without an fsync and should be gone"
            );
            assert_eq!(via_pages(&s, 0, u64::MAX), read_and_hash(&s));
            write(&s, CHUNK_BYTES + 100, &data(seed as u8, 9000));
            mem.crash(CrashMode::Tear(seed));
            let s = Replicas::new(b, ReplicaKey::from_bytes([3u8; 32]))
                .open("vm1")
                .unwrap();
            let want = read_and_hash(&s);
            assert_eq!(via_pages(&s, 0, u64::MAX), want, "seed {seed}");
            // And the pages written back meanwhile answer the next time.
            assert_eq!(via_pages(&s, 0, u64::MAX), want, "seed {seed}, again");
        }
    }

    #[test]
    fn a_page_round_trips_and_a_foreign_layout_is_refused() {
        let mut p = Page::empty();
        p.slots[0] = Some(Slot::of([1; 12], &data(4, CHUNK_BYTES as usize)));
        p.slots[63] = Some(Slot::of([2; 12], &data(5, 5000)));
        let b = p.encode();
        assert_eq!(b.len(), PAGE_LEN);
        assert_eq!(Page::decode(&b), Some(p.clone()));
        assert_eq!(p.slots[63].as_ref().unwrap().hashes.len(), 2);
        for at in [0, 4, 5, PAGE_HEAD] {
            let mut bad = b.clone();
            bad[at] = if at == PAGE_HEAD { 65 } else { bad[at] ^ 1 };
            assert_eq!(Page::decode(&bad), None, "byte {at}");
        }
        assert_eq!(Page::decode(&b[..b.len() - 1]), None);
    }

    #[test]
    fn a_whole_chunk_edit_reads_nothing_of_it_and_a_partial_one_reports_damage() {
        let (b, s) = store();
        write(&s, 0, &data(1, CHUNK_BYTES as usize));
        write(&s, CHUNK_BYTES, &data(4, CHUNK_BYTES as usize));
        let short = (SIZE - 5 * CHUNK_BYTES) as usize;
        write(&s, 5 * CHUNK_BYTES, &data(6, short));
        damage_body(&b, 0);
        damage_body(&b, 1);
        damage_body(&b, 5);
        // Part of a damaged chunk: the damage is reported, nothing changes.
        let mut ed = ChunkEditor::new(&s);
        let e = ed
            .write(0, CHUNK_BYTES + 10, b"x")
            .expect_err("a damaged chunk edited in part");
        assert!(matches!(e, Error::Corruption { .. }), "{e}");
        drop(ed);
        // The whole of one (the short last one too): what it held is not needed, so
        // not read, and the damage goes with it.
        let mut ed = ChunkEditor::new(&s);
        ed.write(0, 0, &data(2, CHUNK_BYTES as usize)).unwrap();
        ed.write(0, 5 * CHUNK_BYTES, &data(7, short)).unwrap();
        ed.finish().unwrap();
        let mut back = vec![0u8; CHUNK_BYTES as usize];
        s.read_parent(0, 0, &mut back).unwrap();
        assert_eq!(back, data(2, CHUNK_BYTES as usize));
        let mut back = vec![0u8; short];
        s.read_parent(0, 5 * CHUNK_BYTES, &mut back).unwrap();
        assert_eq!(back, data(7, short));
        let mut back = vec![0u8; 10];
        assert!(
            s.read_parent(0, CHUNK_BYTES, &mut back).is_err(),
            "chunk 1 mended"
        );
        // Mended whole too: the hash pages answer for the chunks written whole as
        // reading them does.
        write(&s, CHUNK_BYTES, &data(8, CHUNK_BYTES as usize));
        assert_eq!(via_pages(&s, 0, u64::MAX), read_and_hash(&s));
        // A chunk never written, edited in part after those: zero around the edit.
        write(&s, 3 * CHUNK_BYTES + 100, b"mid");
        let mut back = vec![1u8; CHUNK_BYTES as usize];
        s.read_parent(0, 3 * CHUNK_BYTES, &mut back).unwrap();
        assert_eq!(&back[100..103], b"mid");
        back[100..103].fill(0);
        assert!(
            back.iter().all(|x| *x == 0),
            "stale bytes around a partial edit"
        );
    }
}
