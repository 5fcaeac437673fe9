//! The storage seam: every byte the engine reads or writes goes through [`Storage`]
//! and [`StorageFile`].
//!
//! Three implementations:
//! - [`FileStorage`]: real files (`pread`/`pwritev`/`fdatasync`/`fallocate`).
//! - [`MemStorage`]: in memory, tracking which bytes are durable (synced) and which
//!   are only "in the page cache", so that [`MemStorage::crash`] can drop or tear the
//!   unsynced ones the way a power loss would.
//! - [`FaultyStorage`]: wraps a [`MemStorage`] and fails the Nth write or sync, or
//!   cuts the power at the Nth change of any kind (`cut_after`).
//!
//! Namespace operations (create, rename, remove) are durable only after a
//! [`Storage::sync_dir`] of their directory, in the in-memory model as on a real file
//! system: the engine calls it after each of them where they must survive a power loss.

mod direct_buf;
mod fault;
mod file;
mod mem;
pub mod pool;

pub use direct_buf::{DirectBuf, HUGE_PAGE};
pub use fault::FaultyStorage;
pub(crate) use file::renameat2;
pub use file::{aligned_slice, create_file_mode, FileStorage};
pub use mem::{CrashMode, MemStorage};

use crate::error::Result;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How [`Storage::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail if it exists.
    CreateNew,
    /// Open an existing file for reading and writing.
    ReadWrite,
    /// Open an existing file for reading only.
    ReadOnly,
}

/// A file system, real or simulated.
pub trait Storage: Send + Sync + fmt::Debug {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>>;
    fn create_dir_all(&self, path: &Path) -> Result<()>;
    /// Names of the regular files directly inside `dir`, sorted.
    fn list_dir(&self, dir: &Path) -> Result<Vec<String>>;
    fn remove_file(&self, path: &Path) -> Result<()>;
    /// Atomically replace `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// Make creations, renames and removals inside `dir` durable.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Names of the directories directly inside `dir`, sorted (none if `dir` is
    /// missing).
    fn list_dirs(&self, dir: &Path) -> Result<Vec<String>>;
    /// Remove an empty directory (a missing one is fine).
    fn remove_dir(&self, dir: &Path) -> Result<()>;
    /// Rename `from` to `to` only if `to` does not exist: false (and nothing changed)
    /// if it does. Atomic.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<bool>;
    /// An exclusive lock on the file at `path` (created if missing), held until the
    /// returned guard is dropped: across processes for real files (flock), within the
    /// process for the in-memory storage. With `wait`, blocks until it is free;
    /// without, None when another holder has it.
    fn lock(&self, path: &Path, wait: bool) -> Result<Option<Box<dyn StorageLock>>>;
    /// Bytes free for new files where `path` lives (None: unknown).
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// Remove directory `dir` and everything in it (a missing one is fine),
    /// bottom-up: each directory is synced once it is empty and before it goes, so a
    /// crash never brings back a removed directory's files without it. The removal
    /// of `dir` itself is durable after a `sync_dir` of its parent.
    fn remove_tree(&self, dir: &Path) -> Result<()> {
        if !self.exists(dir) {
            return Ok(());
        }
        for d in self.list_dirs(dir)? {
            self.remove_tree(&dir.join(d))?;
        }
        for f in self.list_dir(dir)? {
            self.remove_file(&dir.join(f))?;
        }
        self.sync_dir(dir)?;
        self.remove_dir(dir)
    }
}

/// A held lock (see [`Storage::lock`]); released when dropped.
pub trait StorageLock: Send + Sync + fmt::Debug {}

/// An open file.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait StorageFile: Send + Sync + fmt::Debug {
    fn path(&self) -> &Path;
    /// Read up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    /// [`StorageFile::read_at`] around the page cache where the file system allows it
    /// (`FileStorage`: O_DIRECT, through an aligned buffer of its own when `buf` or
    /// the range is not 4 KiB-aligned), for a reader that asked for uncached I/O:
    /// nothing is read ahead or kept, and no page-cache memory is taken for data the
    /// reader caches itself.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.read_at(buf, offset)
    }
    /// Write all of `bufs`, one after the other, starting at `offset`.
    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()>;
    /// Write `data` at `offset` as [`StorageFile::write_at`] does, for a large write
    /// the page cache need not keep (a file written once and read seldom):
    /// `FileStorage` writes its 4 KiB-aligned part with O_DIRECT where the file
    /// system allows it, sparing the copy into the page cache. Durable, as any
    /// write, only after `sync_data`.
    fn write_bulk(&self, data: &[u8], offset: u64) -> Result<()> {
        self.write_at(&[data], offset)
    }
    /// Make every write so far durable (`fdatasync`).
    fn sync_data(&self) -> Result<()>;
    fn set_len(&self, len: u64) -> Result<()>;
    fn len(&self) -> Result<u64>;
    /// Make `offset..offset+len` read as zeros, releasing the space where the file
    /// system can (a hole). Never changes the length.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()>;
    /// Reserve space for the file to grow to `len` bytes without changing its length
    /// (`fallocate(FALLOC_FL_KEEP_SIZE)`), so appends and their fdatasyncs do not
    /// allocate blocks one by one. A hint only.
    fn preallocate(&self, _len: u64) {}
    /// Start reading `offset..offset+len` into the page cache in the background
    /// (`posix_fadvise(WILLNEED)`). A hint only.
    fn prefetch(&self, _offset: u64, _len: u64) {}
    /// Start writing `offset..offset+len` back to the device without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a later `sync_data` then has little
    /// left to do. A hint only; durability still needs `sync_data`.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// The first offset at or after `offset` that holds data (`SEEK_DATA`), or None if
    /// only holes follow. Files that do not track holes report data everywhere.
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The first offset at or after `offset` in a hole (`SEEK_HOLE`); the end of the
    /// file counts as a hole.
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.len()?.max(offset))
    }
}

impl<'a> dyn StorageFile + 'a {
    /// Read exactly `buf.len()` bytes; a short read is corruption of the caller's
    /// expectations and reported as such.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(crate::error::Error::corruption(
                self.path(),
                offset + n as u64,
                format!("file ends {} bytes early", buf.len() - n),
            ));
        }
        Ok(())
    }
}

/// The runs of `block`-byte blocks of `data` that are not all zero (the last block
/// may be short), in order: what a copy of a disk's data sends or writes.
pub fn nonzero_runs(data: &[u8], block: usize) -> Vec<std::ops::Range<usize>> {
    let block = block.max(1);
    let mut runs = Vec::new();
    let mut start: Option<usize> = None;
    for (b, piece) in data.chunks(block).enumerate() {
        let at = b * block;
        match (piece.iter().any(|v| *v != 0), start) {
            (true, None) => start = Some(at),
            (false, Some(s)) => {
                runs.push(s..at);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..data.len());
    }
    runs
}

/// Read a whole small file (at most `limit` bytes; a bigger one is corruption).
pub fn read_all(file: &dyn StorageFile, limit: u64) -> Result<Vec<u8>> {
    let len = file.len()?;
    if len > limit {
        return Err(crate::error::Error::corruption(
            file.path(),
            limit,
            format!("file is {len} bytes, more than the {limit} it can be"),
        ));
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let n = file.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

/// Write `bytes` to `path` atomically and durably: write a temporary file, sync it,
/// rename it over `path`, sync the directory. The one way replog replaces a file.
pub fn write_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(storage, path, bytes)?;
    storage.rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        storage.sync_dir(dir)?;
    }
    Ok(())
}

/// Remove the files `names` of `dir` (those not there are fine), then sync `dir`: the
/// removal is durable. The undoing of [`write_atomic`] for small state files.
pub fn remove_durably(storage: &dyn Storage, dir: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        match storage.remove_file(&dir.join(name)) {
            Err(e) if !is_not_found(&e) => return Err(e),
            _ => {}
        }
    }
    storage.sync_dir(dir)
}

/// Replace `path` atomically but not durably (no fsync): readers see the old bytes
/// or the new, and after a crash either may be there. Only for derived files whose
/// loss costs nothing, rewritten often (the status a running serve keeps).
pub fn write_replace(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    if storage.exists(&tmp) {
        storage.remove_file(&tmp)?;
    }
    storage
        .open(&tmp, OpenMode::CreateNew)?
        .write_at(&[bytes], 0)?;
    storage.rename(&tmp, path)
}

/// Like [`write_atomic`], but only if `path` does not exist yet: false (and nothing
/// left behind) if it does.
pub fn write_new(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<bool> {
    let tmp = write_temp(storage, path, bytes)?;
    let created = storage.rename_noreplace(&tmp, path)?;
    if !created {
        storage.remove_file(&tmp)?;
    }
    if let Some(dir) = path.parent() {
        storage.sync_dir(dir)?;
    }
    Ok(created)
}

/// `bytes` written and synced to a temporary name of `path` of its own (two writers
/// of one file never share a temporary: the winner of a `write_new` race holds its
/// own bytes, and concurrent `write_atomic`s of one file each rename whole files).
pub fn write_temp(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = unique_temp_name(path);
    let file = storage.open(&tmp, OpenMode::CreateNew)?;
    file.write_bulk(bytes, 0)?;
    file.sync_data()?;
    Ok(tmp)
}

/// [`write_temp`] without the sync: `bytes` written to a temporary name of `path` of
/// its own and their writeback started, the file returned so that the caller syncs it
/// (`sync_data`) before it renames — for many files at once, whose writebacks then go
/// to the device together instead of one flush after each file's write.
pub fn write_temp_unsynced(
    storage: &dyn Storage,
    path: &Path,
    bytes: &[u8],
) -> Result<(PathBuf, Arc<dyn StorageFile>)> {
    let tmp = unique_temp_name(path);
    let file = storage.open(&tmp, OpenMode::CreateNew)?;
    file.write_bulk(bytes, 0)?;
    file.start_writeback(0, bytes.len() as u64);
    Ok((tmp, file))
}

/// `NAME.<pid>-<n>.tmp` beside `path`: unique within this host's live processes.
fn unique_temp_name(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}-{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// The temporary name `write_replace` writes under before it renames into place:
/// `NAME.tmp` beside it.
pub fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Remove directory `dir`, whose file `commit` says it is there (a machine's or a
/// replica's manifest, written last when it was made): `commit` first, durably —
/// from then on the directory is nothing, and a crash never leaves it with parts
/// missing — then the rest, then the removal made durable in its parent.
pub fn remove_committed_dir(storage: &dyn Storage, dir: &Path, commit: &str) -> Result<()> {
    let c = dir.join(commit);
    if storage.exists(&c) {
        storage.remove_file(&c)?;
        storage.sync_dir(dir)?;
    }
    storage.remove_tree(dir)?;
    match dir.parent() {
        Some(p) => storage.sync_dir(p),
        None => Ok(()),
    }
}

/// Remove the directories in `parent` whose names are machine names and that hold no
/// file `commit` — known to be absent, not merely unreadable: what a creation or a
/// removal cut short left (see [`remove_committed_dir`]). Only while nothing else
/// creates such directories (a starting serve). Returns the names removed.
pub fn remove_uncommitted_dirs(
    storage: &dyn Storage,
    parent: &Path,
    commit: &str,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in storage.list_dirs(parent)? {
        if crate::names::validate_name("machine", &name).is_err() {
            continue;
        }
        let dir = parent.join(&name);
        match storage.open(&dir.join(commit), OpenMode::ReadOnly) {
            Ok(_) => continue,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        storage.remove_tree(&dir)?;
        removed.push(name);
    }
    if !removed.is_empty() {
        storage.sync_dir(parent)?;
    }
    Ok(removed)
}

/// True when `e` says a file or directory does not exist.
pub fn is_not_found(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_are_the_blocks_with_data_the_short_last_one_too() {
        let mut d = vec![0u8; 10 * 4096 + 100];
        assert!(nonzero_runs(&d, 4096).is_empty());
        d[5] = 1; // block 0
        d[4096 * 2 + 4095] = 1; // block 2, its last byte
        d[4096 * 3] = 1; // block 3: one run with 2
        d[4096 * 10 + 99] = 1; // the short last block
        assert_eq!(
            nonzero_runs(&d, 4096),
            vec![0..4096, 2 * 4096..4 * 4096, 10 * 4096..10 * 4096 + 100]
        );
        d[4096 * 9] = 1; // block 9 joins the short last one
        assert_eq!(
            nonzero_runs(&d, 4096).last(),
            Some(&(9 * 4096..10 * 4096 + 100))
        );
        assert!(nonzero_runs(&[], 4096).is_empty());
    }
}
