//! Small metadata files: the machine manifest and the merge watermark.
//!
//! ## Envelope (24 bytes, then the body)
//!
//! ```text
//! off len field
//!   0   8 magic: 89 52 4C 4D 0D 0A 1A 0A ("\x89RLM\r\n\x1a\n")
//!   8   2 format version of this kind (see below; each kind has its own)
//!  10   2 kind: 1 = machine manifest, 2 = merge watermark, 3 … 13 (below)
//!  12   4 incompatible feature bits
//!  16   4 body length in bytes
//!  20   4 CRC-32C of bytes 0..20 followed by the body
//!  24   … body
//! ```
//!
//! ## Machine manifest body (kind 1): postcard encoding of [`Manifest`]
//!
//! postcard writes integers as LEB128 varints, strings and sequences as a varint
//! length followed by their bytes, enums as a varint variant index, options as 0 or
//! 1 and the value, fields in declaration order. Version 3: `machine_id: u64, disks:
//! [ { id: u32, name: string, size: u64 } ], role: (0 primary, 1 replica, 2 test),
//! generation: u32, fence: Option<{ by_site: [u8; 32], generation: u32, at_ns: u64,
//! reason: string }>, base: Option<{ replica: string, lsn: u64, time_ns: u64 }>,
//! pending: Option<{ kind: (0 planned, 1 unplanned, 2 test), from_generation: u32,
//! source_site: [u8; 32], started_ns: u64 }>, intent: Option<{ target_site: [u8; 32],
//! target: string, generation: u32, job: string, started_ns: u64 }>`. Version 2 ended
//! after `fence`; version 1 had `machine_id` and `disks` only (a primary at
//! generation 1, not fenced).
//!
//! ## Replica manifest body (kind 3): postcard encoding of
//! `replica::store::ReplicaManifest`: `source_site: [u8; 32], machine_id: u64,
//! disks: [ { id: u32, name: string, size: u64 } ], base_lsn: u64, base_seq: u64`.
//!
//! ## Initial-copy progress body (kind 4): postcard encoding of
//! `replica::store::InitialProgress`: `chunks: u64, disk: u32, offset: u64, done: bool`.
//!
//! ## Replica parent mark body (kind 5): postcard encoding of
//! `replica::store::ParentMark`: `lsn: u64, seq: u64, point: Option<{ lsn: u64,
//! time_ns: u64, app: bool, digests: Option<[u64]>, received_ns: u64 }>, merging_to:
//! Option<(u64, u64)>, resyncing: bool, valid_from: u64, patches: u64`.
//!
//! ## Replica resync progress body (kind 7): postcard encoding of
//! `replica::resync_apply::ResyncProgress`: `base_lsn: u64, base_seq: u64, chunk_bytes: u64,
//! disk: u32, next: u64, compared: u64, sent_chunks: u64, sent_bytes: u64, patches:
//! u64`.
//!
//! ## Replica retention body (kind 6): postcard encoding of
//! `replica::store::Retention`: `window_ms: u64, app_window_ms: u64`.
//!
//! ## Damage list body (kind 13): postcard encoding of `volume::DamageList`:
//! `[ { seq: u64, what: string, mended: bool } ]`, by `seq`, strictly increasing;
//! `what` at most 4096 bytes.
//!
//! ## Merge watermark body (kind 2), 16 bytes (also a replica's "received" mark)
//!
//! ```text
//!   0   8 merge watermark LSN: every record with LSN <= this is in the parents
//!   8   8 sequence number of the last merged segment (0: none)
//! ```
//!
//! Every file is replaced atomically (write temporary, fsync, rename, fsync dir).
//!
//! ## Versions
//!
//! Until f501a4c every kind was written as version 1, even after a body gained
//! fields. Since then each kind has its own version ([`version_of`]), bumped whenever
//! its body changes; a reader reads every older version (or refuses it naming both
//! versions) and refuses newer ones. Bodies must be consumed exactly: bytes left over
//! are corruption, not ignored.
//!
//! | kind | version 1 | version 2 |
//! |---|---|---|
//! | 1 machine manifest | `machine_id, disks` | `+ role, generation, fence` |
//! | 3 replica manifest | `source_site, machine_id, disks, base_lsn, base_seq` | `+ generation` |
//! | 5 parent mark | any of the development layouts (see `replica::store::ParentMark`) | the layout above |
//! | 7 resync progress | without `patches`, or with it | with `patches` |

use super::{check_version, DecodeError, Le, LeMut};
use serde::{Deserialize, Serialize};

pub const META_MAGIC: [u8; 8] = *b"\x89RLM\r\n\x1a\n";
pub const META_HEADER_LEN: usize = 24;
pub const KIND_MANIFEST: u16 = 1;
pub const KIND_WATERMARK: u16 = 2;
pub const KIND_REPLICA_MANIFEST: u16 = 3;
pub const KIND_INITIAL_PROGRESS: u16 = 4;
pub const KIND_PARENT_MARK: u16 = 5;
pub const KIND_RETENTION: u16 = 6;
pub const KIND_RESYNC: u16 = 7;
/// A replica's scrub state (`replica::scrub::ScrubState`).
pub const KIND_SCRUB: u16 = 8;
/// A replica promoted by a failover (`failover`): version 1.
pub const KIND_PROMOTION: u16 = 9;
/// A machine's changed-block map since its base point (`volume::ChangedMap`): version 1.
pub const KIND_CHANGED: u16 = 10;
/// A replica seeded from an old primary's own disks by a reprotect
/// (`failover::reprotect::Seed`): version 1.
pub const KIND_SEED: u16 = 11;
/// A replica's manifest in an object store (`replica::objects::backend::Manifest`):
/// version 1.
pub const KIND_OBJECT_MANIFEST: u16 = 12;
/// A machine's damage list (`volume::DamageList`): version 1.
pub const KIND_DAMAGE: u16 = 13;

/// The version of `kind` this build writes, which is also the newest it reads.
pub fn version_of(kind: u16) -> u16 {
    match kind {
        KIND_MANIFEST => 3,
        KIND_REPLICA_MANIFEST | KIND_PARENT_MARK | KIND_RESYNC => 2,
        _ => 1,
    }
}

/// The name of a kind, for messages.
pub fn kind_name(kind: u16) -> &'static str {
    match kind {
        KIND_MANIFEST => "machine manifest",
        KIND_WATERMARK => "merge watermark",
        KIND_REPLICA_MANIFEST => "replica manifest",
        KIND_INITIAL_PROGRESS => "initial-copy progress",
        KIND_PARENT_MARK => "replica parent mark",
        KIND_RETENTION => "replica retention",
        KIND_RESYNC => "resync progress",
        KIND_SCRUB => "scrub state",
        KIND_PROMOTION => "promotion",
        KIND_CHANGED => "changed-block map",
        KIND_SEED => "reprotect seed",
        KIND_OBJECT_MANIFEST => "object-store replica manifest",
        KIND_DAMAGE => "damage list",
        _ => "unknown kind",
    }
}
/// Largest metadata body accepted (a manifest with thousands of disks fits).
pub const MAX_META_BODY: u32 = 1 << 20;

/// A metadata file of `kind` at the version this build writes.
pub fn encode(kind: u16, body: &[u8]) -> Vec<u8> {
    encode_version(kind, version_of(kind), body)
}

/// A metadata file of `kind` at `version` (fixtures and tests of older versions).
pub fn encode_version(kind: u16, version: u16, body: &[u8]) -> Vec<u8> {
    let mut head = [0u8; META_HEADER_LEN];
    let mut w = LeMut(&mut head);
    w.put(0, &META_MAGIC);
    w.u16(8, version);
    w.u16(10, kind);
    w.u32(12, 0);
    w.u32(16, body.len() as u32);
    let crc = crate::crc::crc32c_append(crate::crc::crc32c(head.get(..20).unwrap_or(&[])), body);
    LeMut(&mut head).u32(20, crc);
    let mut out = head.to_vec();
    out.extend_from_slice(body);
    out
}

/// Check the envelope; return the body's version and the body.
pub fn decode(expect_kind: u16, b: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    let Some(head) = b.get(..META_HEADER_LEN) else {
        return Err(DecodeError::new(
            0,
            format!("file is {} bytes, too short", b.len()),
        ));
    };
    if head.get(..8) != Some(&META_MAGIC[..]) {
        return Err(DecodeError::new(
            0,
            "not a replog metadata file (bad magic)",
        ));
    }
    let r = Le(head);
    let len = r.u32(16);
    if len > MAX_META_BODY {
        return Err(DecodeError::new(16, format!("body length {len} too large")));
    }
    let Some(body) = b.get(META_HEADER_LEN..META_HEADER_LEN + len as usize) else {
        return Err(DecodeError::new(16, "body cut short"));
    };
    let crc = crate::crc::crc32c_append(crate::crc::crc32c(head.get(..20).unwrap_or(&[])), body);
    if crc != r.u32(20) {
        return Err(DecodeError::new(20, "checksum mismatch"));
    }
    if r.u16(10) != expect_kind {
        return Err(DecodeError::new(
            10,
            format!(
                "metadata kind {} ({}), expected {expect_kind} ({})",
                r.u16(10),
                kind_name(r.u16(10)),
                kind_name(expect_kind)
            ),
        ));
    }
    let version = r.u16(8);
    if version == 0 || version > version_of(expect_kind) {
        return Err(DecodeError::new(
            8,
            format!(
                "{} version {version}; this build reads versions 1 to {}",
                kind_name(expect_kind),
                version_of(expect_kind)
            ),
        ));
    }
    check_version(
        kind_name(expect_kind),
        version,
        version_of(expect_kind),
        r.u32(12),
        12,
    )?;
    Ok((version, body))
}

/// Decode a postcard body that must be consumed exactly (None: it does not decode, or
/// bytes are left over).
pub fn body_exact<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Some(v),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub machine_id: u64,
    pub disks: Vec<DiskEntry>,
    /// What this site is for the machine.
    pub role: crate::protection::Role,
    /// The machine's generation (1 when created, +1 per promotion).
    pub generation: u32,
    /// Set when a newer generation took the machine over: its writes are refused.
    pub fence: Option<crate::protection::Fence>,
    /// The parents are a replica at a point (version 3).
    pub base: Option<crate::protection::Base>,
    /// A promotion not committed yet (version 3).
    pub pending: Option<crate::protection::Pending>,
    /// A planned failover under way at this primary (version 3).
    pub intent: Option<crate::protection::Intent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub id: u32,
    pub name: String,
    pub size: u64,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_stdvec(self).unwrap_or_default();
        encode(KIND_MANIFEST, &body)
    }
    /// A new primary's manifest: generation 1, not fenced.
    pub fn new(machine_id: u64) -> Self {
        Manifest {
            machine_id,
            disks: Vec::new(),
            role: crate::protection::Role::Primary,
            generation: 1,
            fence: None,
            base: None,
            pending: None,
            intent: None,
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let (version, body) = decode(KIND_MANIFEST, b)?;
        let bad = || DecodeError::new(META_HEADER_LEN as u64, "manifest body does not decode");
        if version >= 3 {
            let m: Manifest = body_exact(body).ok_or_else(bad)?;
            if m.generation == 0 {
                return Err(DecodeError::new(META_HEADER_LEN as u64, "generation 0"));
            }
            return Ok(m);
        }
        if version == 2 {
            #[derive(Deserialize)]
            struct V2 {
                machine_id: u64,
                disks: Vec<DiskEntry>,
                role: crate::protection::Role,
                generation: u32,
                fence: Option<crate::protection::Fence>,
            }
            let v2: V2 = body_exact(body).ok_or_else(bad)?;
            if v2.generation == 0 {
                return Err(DecodeError::new(META_HEADER_LEN as u64, "generation 0"));
            }
            return Ok(Manifest {
                disks: v2.disks,
                role: v2.role,
                generation: v2.generation,
                fence: v2.fence,
                ..Manifest::new(v2.machine_id)
            });
        }
        #[derive(Deserialize)]
        struct V1 {
            machine_id: u64,
            disks: Vec<DiskEntry>,
        }
        let v1: V1 = body_exact(body).ok_or_else(bad)?;
        Ok(Manifest {
            disks: v1.disks,
            ..Manifest::new(v1.machine_id)
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermark {
    pub lsn: u64,
    pub segment_seq: u64,
}

impl Watermark {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = [0u8; 16];
        let mut w = LeMut(&mut body);
        w.u64(0, self.lsn);
        w.u64(8, self.segment_seq);
        encode(KIND_WATERMARK, &body)
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let (_, body) = decode(KIND_WATERMARK, b)?;
        if body.len() != 16 {
            return Err(DecodeError::new(
                META_HEADER_LEN as u64,
                "watermark body is not 16 bytes",
            ));
        }
        let r = Le(body);
        if r.u64(0) >= super::record::MAX_LSN || r.u64(8) >= super::segment::MAX_SEGMENT_SEQ {
            return Err(DecodeError::new(
                META_HEADER_LEN as u64,
                "watermark out of range",
            ));
        }
        Ok(Watermark {
            lsn: r.u64(0),
            segment_seq: r.u64(8),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip_and_damage() {
        let m = Manifest {
            disks: vec![DiskEntry {
                id: 0,
                name: "os".into(),
                size: 1 << 30,
            }],
            ..Manifest::new(5)
        };
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 4;
            assert!(Manifest::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(Manifest::decode(&b[..b.len() - 1]).is_err());
        assert!(Watermark::decode(&b).is_err(), "kind is checked");
    }
}
