//! Readers' pins: how a restore or a mounted point view keeps the target compactor
//! away from what it reads, across processes.
//!
//! A reader takes `merge.lock` (flock, exclusive, briefly), reads the marks, chooses
//! its point and leaves a pin in `pins/`: a file it holds an exclusive flock on for as
//! long as it reads, holding 16 bytes — the point's LSN and the sequence number of the
//! parent mark it started from, both little-endian u64. The target compactor takes
//! `merge.lock` while it decides how far to merge, and:
//!
//! - merges no further than the oldest pinned point (so the point stays), and
//! - deletes no segment after the oldest pinned parent start (so the segments a
//!   reader's map points into stay).
//!
//! Rewriting parent chunks under a reader is safe: a reader reads the parent only
//! where no record between its start and its point wrote, and there the parent is
//! the same at every state in between.
//!
//! A pin whose holder died is unlocked; the compactor removes it.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::{MERGE_LOCK, PINS};

/// `merge.lock`, held exclusively until dropped (the flock goes with the file).
pub struct MergeLock {
    _file: File,
}

/// Take `merge.lock` of the replica in `dir` (waits while another holds it).
pub fn merge_lock(dir: &Path) -> Result<MergeLock> {
    let path = dir.join(MERGE_LOCK);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    f.lock().map_err(|e| Error::io("lock", &path, e))?;
    Ok(MergeLock { _file: f })
}

/// What a pin protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinInfo {
    /// The point read.
    pub lsn: u64,
    /// The parent mark's segment the reader's map starts after.
    pub from_seq: u64,
}

/// A held pin; dropping it releases and removes it.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
    _file: File,
    pub info: PinInfo,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Leave a pin in the replica in `dir`. Call with `merge.lock` held.
pub fn pin(dir: &Path, info: PinInfo, _held: &MergeLock) -> Result<Pin> {
    let pins = dir.join(PINS);
    std::fs::create_dir_all(&pins).map_err(|e| Error::io("create", &pins, e))?;
    let name = format!(
        "{}-{}-{}",
        std::process::id(),
        crate::format::now_ns(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = pins.join(format!(".{name}"));
    let path = pins.join(&name);
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    f.lock().map_err(|e| Error::io("lock", &tmp, e))?;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&info.lsn.to_le_bytes());
    b[8..].copy_from_slice(&info.from_seq.to_le_bytes());
    f.write_all(&b).map_err(|e| Error::io("write", &tmp, e))?;
    // Locked before it has its name: the compactor never sees it unlocked.
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, e))?;
    Ok(Pin {
        path,
        _file: f,
        info,
    })
}

/// The pins of live readers of the replica in `dir`; pins of dead ones are removed.
/// Call with `merge.lock` held.
pub fn live_pins(dir: &Path, _held: &MergeLock) -> Result<Vec<PinInfo>> {
    let pins = dir.join(PINS);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&pins) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("list", &pins, e)),
    };
    for e in entries {
        let e = e.map_err(|e| Error::io("list", &pins, e))?;
        let path = e.path();
        let dead_tmp = e.file_name().to_string_lossy().starts_with('.');
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        match f.try_lock() {
            Ok(()) => {
                // Nobody holds it: its reader is gone.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            Err(TryLockError::WouldBlock) if !dead_tmp => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
        }
        let mut b = [0u8; 16];
        if f.read_exact(&mut b).is_ok() {
            let (l, s) = b.split_at(8);
            out.push(PinInfo {
                lsn: u64::from_le_bytes(l.try_into().unwrap_or([0; 8])),
                from_seq: u64::from_le_bytes(s.try_into().unwrap_or([0; 8])),
            });
        }
    }
    Ok(out)
}
