//! Encryption at rest of replica segments, their record indexes and parent chunks:
//! AES-256-GCM, with a key derived per file (HKDF-SHA256 from the site's replica key,
//! salted with the machine id, the info "replog segment <n>", "replog segment index
//! <n>", "replog parent chunk <disk << 40 | n>" or "replog chunk hashes <disk << 40 |
//! page>"), so no two files share a key. A
//! parent chunk (or hash page) rewritten by the target compactor keeps its key and
//! gets a fresh random 96-bit nonce (safe far beyond 2^32 rewrites of one chunk).
//!
//! ## Encrypted segment file
//!
//! ```text
//! off len field
//!   0   8 magic: 89 52 4C 45 0D 0A 1A 0A ("\x89RLE\r\n\x1a\n")
//!   8   2 format version (1; an index file: 1, or 2 when it lists plan points —
//!         its plain body then has `plan_points`, see `replica::store::SegmentIndex`)
//!  10   2 reserved, zero
//!  12   4 incompatible feature bits
//!  16   8 segment sequence number (bound into the key and the AAD)
//!  24  12 AES-GCM nonce (random)
//!  36   4 CRC-32C of bytes 0..36
//!  40   … ciphertext + 16-byte tag (AAD: bytes 0..36)
//! ```
//!
//! The replica key is 32 random bytes in `SITE/identity/replica.key` (mode 0600) unless
//! `site.toml`'s `[replica] key_file` points elsewhere (for example to a volume that is
//! not backed up with the store); see `Site::replica_key`.

use crate::error::{Error, Result};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"\x89RLE\r\n\x1a\n";
pub const HEADER_LEN: usize = 40;
/// The AES-GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;

/// The length of an encrypted file whose plain bytes are `plain` long: the header,
/// the bytes, the tag.
pub const fn sealed_len(plain: usize) -> usize {
    HEADER_LEN + plain + TAG_LEN
}
/// HKDF labels: segments and initial-copy chunks never share a key.
const SEGMENT_LABEL: &[u8] = b"replog segment ";
const CHUNK_LABEL: &[u8] = b"replog parent chunk ";
const INDEX_LABEL: &[u8] = b"replog segment index ";
const HASHES_LABEL: &[u8] = b"replog chunk hashes ";
/// The version of every encrypted file but indexes.
const VERSION: u16 = 1;
/// The version of index files this build writes (it reads 1 and 2).
pub const INDEX_VERSION: u16 = 2;

/// The site's replica key.
#[derive(Clone)]
pub struct ReplicaKey([u8; 32]);

impl std::fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaKey(…)")
    }
}

impl ReplicaKey {
    /// Load the key at `path`, creating it (32 random bytes, 0600) if it is missing.
    pub fn load_or_create(path: &Path) -> Result<ReplicaKey> {
        if !path.exists() {
            let mut k = [0u8; 32];
            getrandom::fill(&mut k)
                .map_err(|e| Error::io("random key", path, std::io::Error::other(e.to_string())))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
            }
            // Written under a temporary name and linked into place without replacing:
            // two processes that race both end up with the one key that won.
            let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
            crate::storage::create_file_mode(&tmp, &k, 0o600)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("link", path, e)),
            }
            if let Some(dir) = path.parent() {
                crate::storage::Storage::sync_dir(&crate::storage::FileStorage, dir)?;
            }
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let k: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::corruption(
                path,
                0,
                format!("replica key is {} bytes, not 32", bytes.len()),
            )
        })?;
        Ok(ReplicaKey(k))
    }

    /// A key from its bytes (tests, tools; a site's key comes from its key file).
    pub fn from_bytes(k: [u8; 32]) -> Self {
        ReplicaKey(k)
    }

    /// The AEAD key of one file. AES-256-GCM through ring: 9.3 GiB/s here against
    /// 1.28 GiB/s for RustCrypto's `aes-gcm`, with the same bytes on disk (`cargo
    /// bench --bench aead` measures both and checks that).
    fn cipher(&self, label: &[u8], machine_id: u64, seq: u64) -> Result<LessSafeKey> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&machine_id.to_le_bytes()), &self.0);
        let mut info = label.to_vec();
        info.extend_from_slice(&seq.to_le_bytes());
        let mut okm = [0u8; 32];
        hk.expand(&info, &mut okm)
            .map_err(|_| Error::InvalidInput("key derivation failed".into()))?;
        UnboundKey::new(&AES_256_GCM, &okm)
            .map(LessSafeKey::new)
            .map_err(|_| Error::InvalidInput("bad key length".into()))
    }

    /// Encrypt segment `seq` of machine `machine_id`.
    pub fn seal(&self, machine_id: u64, seq: u64, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_as(SEGMENT_LABEL, VERSION, machine_id, seq, plain)
    }

    /// Encrypt replica parent chunk `id` (`disk << 40 | chunk number`; a key domain
    /// of its own).
    pub fn seal_chunk(&self, machine_id: u64, id: u64, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_as(CHUNK_LABEL, VERSION, machine_id, id, plain)
    }

    /// Encrypt hash page `id` (`disk << 40 | page number`; see
    /// `replica::store::hashes`).
    pub fn seal_hashes(&self, machine_id: u64, id: u64, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_as(HASHES_LABEL, VERSION, machine_id, id, plain)
    }

    /// Decrypt and authenticate hash page `id` held in `buf`, in place.
    pub fn open_hashes_in_place(
        &self,
        machine_id: u64,
        id: u64,
        buf: &mut Vec<u8>,
        path: &Path,
    ) -> Result<()> {
        self.open_in_place(HASHES_LABEL, VERSION, machine_id, id, buf, path)
            .map(|_| ())
    }

    /// Encrypt the record index of segment `seq` (its body in this build's layout).
    pub fn seal_index(&self, machine_id: u64, seq: u64, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_as(INDEX_LABEL, INDEX_VERSION, machine_id, seq, plain)
    }

    /// Encrypt the record index of segment `seq` whose body is in the layout of
    /// index `version` (1 or 2).
    pub fn seal_index_as(
        &self,
        version: u16,
        machine_id: u64,
        seq: u64,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        self.seal_as(INDEX_LABEL, version, machine_id, seq, plain)
    }

    /// Decrypt and authenticate the record index of segment `seq` (whichever
    /// version).
    pub fn open_index(
        &self,
        machine_id: u64,
        seq: u64,
        bytes: &[u8],
        path: &Path,
    ) -> Result<Vec<u8>> {
        self.open_index_versioned(machine_id, seq, bytes, path)
            .map(|(_, body)| body)
    }

    /// Decrypt and authenticate the record index of segment `seq`: its version and
    /// plain body.
    pub fn open_index_versioned(
        &self,
        machine_id: u64,
        seq: u64,
        bytes: &[u8],
        path: &Path,
    ) -> Result<(u16, Vec<u8>)> {
        let mut buf = bytes.to_vec();
        let v = self.open_in_place(INDEX_LABEL, INDEX_VERSION, machine_id, seq, &mut buf, path)?;
        Ok((v, buf))
    }

    fn seal_as(
        &self,
        label: &[u8],
        version: u16,
        machine_id: u64,
        seq: u64,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        let mut out = vec![0u8; sealed_len(plain.len())];
        self.seal_into(label, version, machine_id, seq, plain, &mut out)?;
        Ok(out)
    }

    /// Encrypt segment `seq` in place: `buf` holds [`HEADER_LEN`] bytes of room, then
    /// the plain segment; afterwards it holds the encrypted file (the header written,
    /// the tag appended). Keep [`TAG_LEN`] bytes of spare capacity to avoid a copy.
    pub fn seal_framed(&self, machine_id: u64, seq: u64, buf: &mut Vec<u8>) -> Result<()> {
        let (_, tag) = self.seal_slice(SEGMENT_LABEL, VERSION, machine_id, seq, buf)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypt replica parent chunk `id` (`plain`) into `out`, which must be
    /// [`sealed_len`] of it: the whole encrypted file. Returns the nonce it was sealed
    /// with. For a caller that keeps one buffer for many chunks (nothing allocated).
    pub fn seal_chunk_into(
        &self,
        machine_id: u64,
        id: u64,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; 12]> {
        self.seal_into(CHUNK_LABEL, VERSION, machine_id, id, plain, out)
    }

    /// `plain` sealed into `out` ([`sealed_len`] of it), giving the nonce.
    fn seal_into(
        &self,
        label: &[u8],
        version: u16,
        machine_id: u64,
        seq: u64,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; 12]> {
        if out.len() != sealed_len(plain.len()) {
            return Err(Error::InvalidInput(format!(
                "{} bytes of room to seal {} bytes",
                out.len(),
                plain.len()
            )));
        }
        let (framed, tail) = out.split_at_mut(HEADER_LEN + plain.len());
        framed
            .get_mut(HEADER_LEN..)
            .unwrap_or(&mut [])
            .copy_from_slice(plain);
        let (nonce, tag) = self.seal_slice(label, version, machine_id, seq, framed)?;
        tail.copy_from_slice(&tag);
        Ok(nonce)
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `buf` and encrypt
    /// the rest in place; the nonce and the tag (which goes after it) are returned.
    fn seal_slice(
        &self,
        label: &[u8],
        version: u16,
        machine_id: u64,
        seq: u64,
        buf: &mut [u8],
    ) -> Result<([u8; 12], [u8; TAG_LEN])> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::InvalidInput(format!("random nonce: {e}")))?;
        let mut head = [0u8; HEADER_LEN];
        head[..8].copy_from_slice(&MAGIC);
        head[8..10].copy_from_slice(&version.to_le_bytes());
        head[16..24].copy_from_slice(&seq.to_le_bytes());
        head[24..36].copy_from_slice(&nonce);
        let crc = crate::crc::crc32c(&head[..36]);
        head[36..40].copy_from_slice(&crc.to_le_bytes());
        let Some((room, plain)) = buf.split_at_mut_checked(HEADER_LEN) else {
            return Err(Error::InvalidInput("no room for the header".into()));
        };
        room.copy_from_slice(&head);
        let tag = self
            .cipher(label, machine_id, seq)?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..36]),
                plain,
            )
            .map_err(|_| Error::InvalidInput("encryption failed".into()))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok((nonce, out))
    }

    /// Decrypt and authenticate an encrypted segment, read into `buf`; `path` names
    /// it in errors. Decrypted in place: no second copy of a segment that may be
    /// 64 MiB.
    pub fn open(
        &self,
        machine_id: u64,
        seq: u64,
        mut buf: Vec<u8>,
        path: &Path,
    ) -> Result<Vec<u8>> {
        self.open_in_place(SEGMENT_LABEL, VERSION, machine_id, seq, &mut buf, path)?;
        // A buffer grown by doubling (an HTTP body read to its end) may hold twice
        // what it carries; callers cache it by its length.
        if buf.capacity() > buf.len() + buf.len() / 8 {
            buf.shrink_to_fit();
        }
        Ok(buf)
    }

    /// Decrypt and authenticate replica parent chunk `id` held in `buf`, in place:
    /// `buf` then holds the plain bytes (no copy, no allocation).
    pub fn open_chunk_in_place(
        &self,
        machine_id: u64,
        id: u64,
        buf: &mut Vec<u8>,
        path: &Path,
    ) -> Result<()> {
        self.open_in_place(CHUNK_LABEL, VERSION, machine_id, id, buf, path)
            .map(|_| ())
    }

    /// The AES-GCM nonce in the header of an encrypted file (its first
    /// [`HEADER_LEN`] bytes), if they are a header: the magic and the header's
    /// checksum hold. A parent chunk gets a fresh random nonce at every seal, so the
    /// nonce names the sealed bytes without reading them.
    pub fn header_nonce(head: &[u8]) -> Option<[u8; 12]> {
        let head = head.get(..HEADER_LEN)?;
        if head.get(..8)? != MAGIC
            || crate::crc::crc32c(head.get(..36)?).to_le_bytes() != *head.get(36..40)?
        {
            return None;
        }
        head.get(24..36)?.try_into().ok()
    }

    /// Check the header of the encrypted file in `buf` (versions 1 to `newest`), then
    /// decrypt the rest in place; returns the file's version.
    fn open_in_place(
        &self,
        label: &[u8],
        newest: u16,
        machine_id: u64,
        seq: u64,
        buf: &mut Vec<u8>,
        path: &Path,
    ) -> Result<u16> {
        let (version, plain_len) =
            self.open_slice(label, newest, machine_id, seq, buf.as_mut_slice(), path)?;
        buf.truncate(plain_len);
        Ok(version)
    }

    /// Decrypt and authenticate segment `seq` held in `buf` (a pooled buffer), in
    /// place: its first `len` bytes are then the plain bytes, `len` returned.
    pub fn open_segment_slice(
        &self,
        machine_id: u64,
        seq: u64,
        buf: &mut [u8],
        path: &Path,
    ) -> Result<usize> {
        self.open_slice(SEGMENT_LABEL, VERSION, machine_id, seq, buf, path)
            .map(|(_, len)| len)
    }

    /// [`Self::open_in_place`] over a slice: the version and the plain length (the
    /// plain bytes start the slice).
    fn open_slice(
        &self,
        label: &[u8],
        newest: u16,
        machine_id: u64,
        seq: u64,
        buf: &mut [u8],
        path: &Path,
    ) -> Result<(u16, usize)> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Err(Error::corruption(
                path,
                0,
                "encrypted segment header cut short",
            ));
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(head);
        if h.get(..8) != Some(&MAGIC[..]) {
            return Err(Error::corruption(
                path,
                0,
                "not an encrypted replog segment",
            ));
        }
        let field = |a: usize, b: usize| h.get(a..b).unwrap_or(&[]);
        if crate::crc::crc32c(field(0, 36)).to_le_bytes() != field(36, 40) {
            return Err(Error::corruption(
                path,
                36,
                "encrypted segment header checksum mismatch",
            ));
        }
        let version = u16::from_le_bytes([
            h.get(8).copied().unwrap_or(0),
            h.get(9).copied().unwrap_or(0),
        ]);
        if !(1..=newest).contains(&version) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: if newest == 1 {
                    format!("encrypted file version {version}; this build reads version 1")
                } else {
                    format!(
                        "encrypted file version {version}; this build reads versions 1 to \
                         {newest}"
                    )
                },
            });
        }
        if field(10, 16) != [0u8; 6] {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "encrypted file feature bits {:02x?} that this build does not know",
                    field(10, 16)
                ),
            });
        }
        if field(16, 24) != seq.to_le_bytes() {
            return Err(Error::corruption(
                path,
                16,
                "encrypted segment is not the one named",
            ));
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(field(24, 36));
        let plain_len = self
            .cipher(label, machine_id, seq)?
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(field(0, 36)),
                buf,
                HEADER_LEN..,
            )
            .map_err(|_| {
                Error::corruption(
                    path,
                    HEADER_LEN as u64,
                    "authentication failed (damaged, or another key)",
                )
            })?
            .len();
        Ok((version, plain_len))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_evidence() {
        let k = ReplicaKey::from_bytes([7u8; 32]);
        let p = Path::new("x");
        let plain = b"segment bytes".repeat(100);
        let ct = k.seal(9, 3, &plain).unwrap();
        assert_eq!(k.open(9, 3, ct.clone(), p).unwrap(), plain);
        assert!(
            !ct.windows(13).any(|w| w == b"segment bytes"),
            "plaintext visible"
        );
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert!(k.open(9, 3, bad, p).is_err(), "flip at {i} accepted");
        }
        assert!(
            k.open(9, 4, ct.clone(), p).is_err(),
            "a segment opened under another number"
        );
        assert!(
            k.open(8, 3, ct.clone(), p).is_err(),
            "a segment opened for another machine"
        );
        assert!(ReplicaKey::from_bytes([8u8; 32]).open(9, 3, ct, p).is_err());
    }

    #[test]
    fn a_chunk_sealed_in_a_callers_room_opens_as_a_chunk() {
        let k = ReplicaKey::from_bytes([7u8; 32]);
        let p = Path::new("x");
        let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut room = vec![0xee; sealed_len(plain.len())];
        let nonce = k.seal_chunk_into(9, 3, &plain, &mut room).unwrap();
        assert_eq!(ReplicaKey::header_nonce(&room), Some(nonce));
        assert_eq!(room.len(), k.seal_chunk(9, 3, &plain).unwrap().len());
        let mut as_segment = room.clone();
        assert!(k.open(9, 3, std::mem::take(&mut as_segment), p).is_err());
        let mut wrong_id = room.clone();
        assert!(k.open_chunk_in_place(9, 4, &mut wrong_id, p).is_err());
        k.open_chunk_in_place(9, 3, &mut room, p).unwrap();
        assert_eq!(room, plain);
        // Room of any other size: refused.
        for len in [0, sealed_len(plain.len()) - 1, sealed_len(plain.len()) + 1] {
            assert!(k
                .seal_chunk_into(9, 3, &plain, &mut vec![0u8; len])
                .is_err());
        }
    }

    #[test]
    fn a_header_names_its_seal_and_hash_pages_are_a_key_domain_of_their_own() {
        let k = ReplicaKey::from_bytes([7u8; 32]);
        let p = Path::new("x");
        let plain = vec![5u8; 4096];
        let (a, b) = (
            k.seal_chunk(9, 3, &plain).unwrap(),
            k.seal_chunk(9, 3, &plain).unwrap(),
        );
        let na = ReplicaKey::header_nonce(&a).unwrap();
        assert_eq!(&a[24..36], &na);
        assert_ne!(
            Some(na),
            ReplicaKey::header_nonce(&b),
            "same bytes, same nonce"
        );
        // A damaged header names nothing.
        for i in 0..HEADER_LEN {
            let mut bad = a.clone();
            bad[i] ^= 1;
            assert_eq!(ReplicaKey::header_nonce(&bad), None, "flip at {i}");
        }
        assert_eq!(ReplicaKey::header_nonce(&a[..HEADER_LEN - 1]), None);
        // A hash page opens as one, never as the chunk of the same id (or back).
        let mut page = k.seal_hashes(9, 3, &plain).unwrap();
        let mut as_chunk = page.clone();
        assert!(k.open_chunk_in_place(9, 3, &mut as_chunk, p).is_err());
        let mut chunk_as_page = a.clone();
        assert!(k.open_hashes_in_place(9, 3, &mut chunk_as_page, p).is_err());
        k.open_hashes_in_place(9, 3, &mut page, p).unwrap();
        assert_eq!(page, plain);
    }
}
