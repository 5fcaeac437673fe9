//! A parent that is a replica at a point: what a promoted machine (before its fold)
//! and a test copy stand on. Nothing is copied: reads go to the replica's
//! [`PointImage`] (decrypted, authenticated), writes go to the machine's own journal,
//! and nothing is ever merged into it — the compactor is held at the point until the
//! fold (`failover::fold`) has written a parent image file and swapped it in.

use crate::error::{Error, Result};
use crate::replica::replay::PointImage;
use crate::storage::StorageFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Disk `disk` of a replica point, as a read-only parent file.
pub struct PointParent {
    /// Where the fold will put the parent image (for messages).
    path: PathBuf,
    image: Arc<PointImage>,
    disk: u32,
    size: u64,
}

impl std::fmt::Debug for PointParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointParent")
            .field("path", &self.path)
            .field("disk", &self.disk)
            .field("lsn", &self.image.point().lsn)
            .finish_non_exhaustive()
    }
}

impl PointParent {
    pub fn new(path: PathBuf, image: Arc<PointImage>, disk: u32, size: u64) -> PointParent {
        PointParent {
            path,
            image,
            disk,
            size,
        }
    }

    fn read_only(&self) -> Error {
        Error::InvalidInput(format!(
            "{}: the parent is a replica point (read-only) until the fold writes it",
            self.path.display()
        ))
    }
}

impl StorageFile for PointParent {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let dst = buf.get_mut(..n).unwrap_or(&mut []);
        self.image.read(self.disk, offset, dst)?;
        Ok(n)
    }

    fn write_at(&self, _bufs: &[&[u8]], _offset: u64) -> Result<()> {
        Err(self.read_only())
    }

    fn sync_data(&self) -> Result<()> {
        Ok(())
    }

    fn set_len(&self, _len: u64) -> Result<()> {
        Err(self.read_only())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only())
    }
}
