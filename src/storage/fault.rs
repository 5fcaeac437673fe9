//! Fault injection on top of [`MemStorage`]: fail the Nth write or the Nth sync, or
//! cut the power at the Nth change of any kind (every write, sync, creation, rename,
//! removal and truncation from then on fails), then crash with [`MemStorage::crash`].

use super::{CrashMode, MemStorage, OpenMode, Storage, StorageFile};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::io;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Default)]
struct Countdowns {
    /// Writes (write_at, punch_hole) still allowed before one fails.
    writes: Option<u64>,
    /// Syncs (sync_data, sync_dir) still allowed before one fails.
    syncs: Option<u64>,
    /// Once a fault fired, every later call of that kind fails too (a dead disk).
    sticky: bool,
    fired: bool,
    /// Successful file syncs so far.
    synced: u64,
    /// Every file sync takes this long (to make concurrent callers overlap in tests).
    sync_delay: Option<std::time::Duration>,
    /// The errno an injected failure carries (EIO unless set).
    errno: Option<i32>,
    /// Changes of any kind still allowed before the power goes (then every change
    /// fails, for good).
    cut: Option<u64>,
    /// Changes of any kind made so far.
    changes: u64,
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct FaultyStorage {
    mem: MemStorage,
    faults: Arc<Mutex<Countdowns>>,
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn StorageFile>,
    faults: Arc<Mutex<Countdowns>>,
}

impl FaultyStorage {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn mem(&self) -> &MemStorage {
        &self.mem
    }

    /// Let `n` more writes succeed, then fail the next (and, if `sticky`, all after).
    pub fn fail_write_after(&self, n: u64, sticky: bool) {
        let mut f = self.faults.lock();
        f.writes = Some(n);
        f.sticky = sticky;
        f.fired = false;
    }

    /// Let `n` more syncs succeed, then fail the next (and, if `sticky`, all after).
    pub fn fail_sync_after(&self, n: u64, sticky: bool) {
        let mut f = self.faults.lock();
        f.syncs = Some(n);
        f.sticky = sticky;
        f.fired = false;
    }

    /// Let `n` more changes of any kind (writes, syncs, creations, renames, removals,
    /// truncations) succeed, then cut the power: that change and every later one
    /// fails. With [`FaultyStorage::crash`] after it, a power loss at that moment.
    pub fn cut_after(&self, n: u64) {
        let mut f = self.faults.lock();
        f.cut = Some(n);
        f.fired = false;
    }

    /// Remove every pending fault.
    pub fn heal(&self) {
        let mut f = self.faults.lock();
        let (synced, sync_delay, changes) = (f.synced, f.sync_delay, f.changes);
        *f = Countdowns::default();
        f.synced = synced;
        f.sync_delay = sync_delay;
        f.changes = changes;
    }

    /// Injected failures carry `errno` (say ENOSPC for a full disk) instead of EIO.
    pub fn fail_with(&self, errno: i32) {
        self.faults.lock().errno = Some(errno);
    }

    /// Number of changes of any kind (the unit of [`FaultyStorage::cut_after`]) made
    /// so far.
    pub fn changes(&self) -> u64 {
        self.faults.lock().changes
    }

    /// Number of successful file syncs (fdatasync) so far.
    pub fn sync_count(&self) -> u64 {
        self.faults.lock().synced
    }

    /// Make every file sync sleep this long first.
    pub fn set_sync_delay(&self, delay: Option<std::time::Duration>) {
        self.faults.lock().sync_delay = delay;
    }

    /// True once an injected fault has fired.
    pub fn fired(&self) -> bool {
        self.faults.lock().fired
    }

    pub fn crash(&self, mode: CrashMode) {
        self.heal();
        self.mem.crash(mode);
    }
}

fn tick(slot: &mut Option<u64>, sticky: bool, fired: &mut bool) -> bool {
    match slot {
        None => false,
        Some(0) => {
            *fired = true;
            if !sticky {
                *slot = None;
            }
            true
        }
        Some(n) => {
            *n -= 1;
            false
        }
    }
}

/// Count one change; an error if the power is cut (at this change or before).
fn change(faults: &Mutex<Countdowns>, op: &'static str, path: &Path) -> Result<()> {
    let mut f = faults.lock();
    let Countdowns { cut, fired, .. } = &mut *f;
    if tick(cut, true, fired) {
        return Err(injected(op, path, f.errno));
    }
    f.changes += 1;
    Ok(())
}

fn injected(op: &'static str, path: &Path, errno: Option<i32>) -> Error {
    Error::io(
        op,
        path,
        io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO)),
    )
}

impl FaultyFile {
    fn check_write(&self) -> bool {
        let mut f = self.faults.lock();
        let sticky = f.sticky;
        let Countdowns { writes, fired, .. } = &mut *f;
        tick(writes, sticky, fired)
    }
    fn check_sync(&self) -> bool {
        let mut f = self.faults.lock();
        let sticky = f.sticky;
        let Countdowns { syncs, fired, .. } = &mut *f;
        tick(syncs, sticky, fired)
    }
}

impl Storage for FaultyStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        if mode == OpenMode::CreateNew {
            change(&self.faults, "create", path)?;
        }
        Ok(Arc::new(FaultyFile {
            inner: self.mem.open(path, mode)?,
            faults: self.faults.clone(),
        }))
    }
    fn create_dir_all(&self, path: &Path) -> Result<()> {
        if !self.mem.exists(path) {
            change(&self.faults, "create directory", path)?;
        }
        self.mem.create_dir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
        self.mem.list_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> Result<()> {
        change(&self.faults, "remove", path)?;
        self.mem.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        change(&self.faults, "rename", from)?;
        self.mem.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        change(&self.faults, "sync directory", dir)?;
        let mut f = self.faults.lock();
        let sticky = f.sticky;
        let Countdowns { syncs, fired, .. } = &mut *f;
        if tick(syncs, sticky, fired) {
            return Err(injected("sync directory", dir, f.errno));
        }
        drop(f);
        self.mem.sync_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.mem.exists(path)
    }
    fn list_dirs(&self, dir: &Path) -> Result<Vec<String>> {
        self.mem.list_dirs(dir)
    }
    fn remove_dir(&self, dir: &Path) -> Result<()> {
        change(&self.faults, "remove directory", dir)?;
        self.mem.remove_dir(dir)
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<bool> {
        change(&self.faults, "rename", from)?;
        self.mem.rename_noreplace(from, to)
    }
    fn lock(&self, path: &Path, wait: bool) -> Result<Option<Box<dyn super::StorageLock>>> {
        self.mem.lock(path, wait)
    }
    fn free_bytes(&self, path: &Path) -> Option<u64> {
        self.mem.free_bytes(path)
    }
}

impl StorageFile for FaultyFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        change(&self.faults, "write", self.path())?;
        if self.check_write() {
            // A failed write may still have written part of its bytes.
            if let Some(first) = bufs.first() {
                let half = first.get(..first.len() / 2).unwrap_or(&[]);
                self.inner.write_at(&[half], offset)?;
            }
            return Err(injected("write", self.path(), self.faults.lock().errno));
        }
        self.inner.write_at(bufs, offset)
    }
    fn sync_data(&self) -> Result<()> {
        change(&self.faults, "fdatasync", self.path())?;
        if self.check_sync() {
            return Err(injected("fdatasync", self.path(), self.faults.lock().errno));
        }
        let delay = self.faults.lock().sync_delay;
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        self.inner.sync_data()?;
        self.faults.lock().synced += 1;
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        change(&self.faults, "truncate", self.path())?;
        self.inner.set_len(len)
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&self, offset: u64) -> Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        change(&self.faults, "punch hole in", self.path())?;
        if self.check_write() {
            return Err(injected(
                "punch hole in",
                self.path(),
                self.faults.lock().errno,
            ));
        }
        self.inner.punch_hole(offset, len)
    }
}
