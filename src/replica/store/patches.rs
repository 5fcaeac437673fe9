//! Patches: a resync's differing chunks, one encrypted data file and one index per
//! batch, lying on top of the parent chunks (below every segment) until the target
//! compactor folds them in. Point images and restores map them like segments, under
//! the number `PATCH_SEQ + n`.

use super::{IndexedRecord, ReplicaStore, SegmentIndex, PATCH_SEQ};
use crate::error::{Error, Result};
use crate::replica::crypt::HEADER_LEN;
use crate::replica::warm::Header;
use crate::storage::pool::Pooled;
use std::sync::Arc;

pub(super) const PATCHES: &str = "patches";

fn patch_rel(n: u64, what: &str) -> String {
    format!("{PATCHES}/{n:010}.{what}.enc")
}

impl ReplicaStore {
    /// Store patch `n`: `chunks` (disk, offset, data) as one encrypted file of their
    /// bytes and an index of records pointing into it (LSN 0: below every point).
    pub fn write_patch(&self, n: u64, chunks: &[(u32, u64, Vec<u8>)]) -> Result<()> {
        let mut plain = Vec::new();
        let mut index = SegmentIndex::default();
        for (disk, offset, data) in chunks {
            let size = self.disk_size(*disk)?;
            let end = offset.saturating_add(data.len() as u64);
            if end > size {
                return Err(Error::OutOfRange {
                    what: "resync chunk".into(),
                    offset: *offset,
                    end,
                    size,
                });
            }
            index.records.push(IndexedRecord {
                lsn: 0,
                disk: *disk,
                zero: false,
                offset: *offset,
                length: data.len() as u64,
                payload_at: plain.len() as u64,
            });
            plain.extend_from_slice(data);
        }
        let id = PATCH_SEQ + n;
        let (version, body) = index.encode()?;
        let machine_id = self.manifest.machine_id;
        let idx = self.key().seal_index_as(version, machine_id, id, &body)?;
        let data = self.key().seal(machine_id, id, &plain)?;
        self.backend().put_batch(&[
            (self.key_of(&patch_rel(n, "idx")), &idx[..]),
            (self.key_of(&patch_rel(n, "data")), &data[..]),
        ])
    }

    /// The records of patch `n`.
    pub fn patch_index(&self, n: u64) -> Result<SegmentIndex> {
        let rel = patch_rel(n, "idx");
        let path = self.locate(&rel);
        let ct = self
            .backend()
            .get(&self.key_of(&rel))?
            .ok_or_else(|| Error::corruption(&path, 0, "patch index missing from the replica"))?;
        let (version, body) =
            self.key()
                .open_index_versioned(self.manifest.machine_id, PATCH_SEQ + n, &ct, &path)?;
        SegmentIndex::decode(version, &body)
            .ok_or_else(|| Error::corruption(&path, 40, "patch index does not decode"))
    }

    /// The patch files present, whether or not the parent mark counts them.
    pub fn stored_patches(&self) -> Result<Vec<String>> {
        self.backend().list(&self.key_of(PATCHES))
    }

    /// Remove every patch file (folded into the parent, needed by no reader).
    pub fn remove_patches(&self) -> Result<()> {
        let keys: Vec<String> = self
            .stored_patches()?
            .iter()
            .map(|n| self.key_of(&format!("{PATCHES}/{n}")))
            .collect();
        self.backend().delete(&keys)
    }

    /// Whether patch files lie around that the parent mark no longer counts.
    pub fn has_stale_patches(&self) -> Result<bool> {
        Ok(
            self.parent.patches == 0
                && !self.parent.resyncing
                && !self.stored_patches()?.is_empty(),
        )
    }

    /// The index and plain bytes of a layer: stored segment `seq`, or patch `n` as
    /// `PATCH_SEQ + n`.
    pub fn layer(&self, seq: u64) -> Result<(SegmentIndex, Pooled)> {
        let index = if seq > PATCH_SEQ {
            self.patch_index(seq - PATCH_SEQ)?
        } else {
            self.segment_index(seq)?
        };
        Ok((index, self.read_layer(seq)?))
    }

    /// The plain bytes a map location's `seq` names: a stored segment, or a patch
    /// (`PATCH_SEQ + n`), decrypted and authenticated. Read into a recycled buffer,
    /// around the page cache where the store is a directory (`storage::pool`): every
    /// reader holds a layer briefly (a point's check and views, restores, merges,
    /// the scrub), so reading one faults in no fresh memory once the pool holds a
    /// buffer of its size, and what is checked is what the disk holds.
    pub fn read_layer(&self, seq: u64) -> Result<Pooled> {
        self.read_layer_headed(seq).map(|(buf, _)| buf)
    }

    /// [`Self::read_layer`], and the encrypted file's header as read (its random
    /// nonce names this write of the object: see `replica::warm`).
    pub fn read_layer_headed(&self, seq: u64) -> Result<(Pooled, Header)> {
        let (rel, missing) = self.layer_object(seq)?;
        let path = self.locate(&rel);
        let mut buf = self
            .backend()
            .get_pooled(&self.key_of(&rel))?
            .ok_or_else(|| Error::corruption(&path, 0, missing))?;
        let mut header = [0u8; HEADER_LEN];
        if let Some(h) = buf.get(..HEADER_LEN) {
            header.copy_from_slice(h);
        }
        let len = self
            .key()
            .open_segment_slice(self.manifest.machine_id, seq, &mut buf, &path)?;
        buf.set_len(len);
        Ok((buf, header))
    }

    /// Segment `seq` as read ahead for a planned failover's check (`replica::warm`),
    /// if it was and the object is still the one read (its header unchanged); None:
    /// read it.
    pub fn warmed(&self, seq: u64) -> Result<Option<Arc<Pooled>>> {
        let Some((buf, header)) = self.replicas().warm().get(&self.name, seq) else {
            return Ok(None);
        };
        let (rel, _) = self.layer_object(seq)?;
        let now = self.backend().get_head(&self.key_of(&rel), HEADER_LEN)?;
        if now.as_deref() != Some(&header[..]) {
            tracing::debug!(
                machine = self.name,
                seq,
                "read ahead: the segment was replaced"
            );
            return Ok(None);
        }
        Ok(Some(buf))
    }

    /// The object a layer is stored in (relative to the replica), and what to say
    /// when it is missing.
    fn layer_object(&self, seq: u64) -> Result<(String, &'static str)> {
        if seq > PATCH_SEQ {
            return Ok((
                patch_rel(seq - PATCH_SEQ, "data"),
                "patch data missing from the replica",
            ));
        }
        if seq == 0 || seq > self.received.segment_seq {
            return Err(Error::NotFound(format!("segment {seq} is not stored")));
        }
        Ok((
            super::segments::seg_rel(seq),
            "segment missing from the replica (deleted or lost)",
        ))
    }
}
