//! In-memory storage that knows which bytes are durable.
//!
//! Every file keeps two images: `durable` (what survived the last sync) and `live`
//! (what reads see), plus the changes made since the last sync, in order: writes and
//! length changes (`set_len`: a truncation or an extension is no more durable than a
//! write until the file is synced). A [`MemStorage::crash`] rebuilds every file from
//! its durable image and a subset of its unsynced changes chosen by [`CrashMode`],
//! applied in the order they were made — the way a power loss leaves a file whose
//! dirty pages and size were written back partly and in any order.
//!
//! Names are durable only once their directory is synced: creations, renames and
//! removals change the live namespace at once and the durable one at the next
//! [`Storage::sync_dir`] of the directory that holds the name; a crash that drops
//! unsynced writes goes back to the durable namespace (a file created and synced but
//! whose directory was not is gone; a rename not followed by a directory sync is
//! undone). A tearing crash keeps, besides, a prefix of the namespace changes made
//! since (each atomic: a rename moves both names at once), as a journalling file
//! system commits them in order. Directories themselves are durable when made, and
//! when removed (with the removals that emptied them).

use super::{OpenMode, Storage, StorageFile};
use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a simulated crash does with writes that were not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Keep every unsynced write (a process crash: the page cache survives).
    KeepAll,
    /// Drop every unsynced write and length change.
    DropAll,
    /// Keep, drop or cut short each unsynced write independently, keep or drop each
    /// unsynced length change, from this seed; and keep a prefix of the unsynced
    /// namespace changes.
    Tear(u64),
    /// Drop every unsynced write and length change, keep every unsynced namespace
    /// change but the last N: the journal had committed all but the operation in
    /// flight (and N - 1 before it).
    DropLastNames(usize),
}

#[derive(Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    live: Vec<u8>,
    unsynced: Vec<Unsynced>,
}

/// A change to a file not made durable yet.
#[derive(Debug)]
enum Unsynced {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// The file's length set.
    Len(usize),
}

#[derive(Debug)]
pub(super) struct MemFile {
    path: PathBuf,
    state: Arc<Mutex<FileState>>,
    writable: bool,
}

#[derive(Debug, Default)]
struct Fs {
    /// The live namespace: what opens and listings see.
    files: BTreeMap<PathBuf, Arc<Mutex<FileState>>>,
    /// The names a crash keeps: as of each directory's last sync.
    durable_files: BTreeMap<PathBuf, Arc<Mutex<FileState>>>,
    /// The namespace changes not yet made durable by a sync of their directory, in
    /// order; each one atomic (a rename is two names at once). A tearing crash keeps
    /// a prefix of them, as a journalling file system commits them in order.
    pending: Vec<Vec<(PathBuf, Binding)>>,
    dirs: BTreeSet<PathBuf>,
}

type Binding = Option<Arc<Mutex<FileState>>>;

/// Locks held (see [`Storage::lock`]): within this process only, like flocks taken
/// by one process through separate opens.
///
/// A lock belongs to the file, not to its name (as a flock does): it follows the file
/// through a rename. Files are told apart by their state's address, kept alive by
/// the guard.
#[derive(Debug, Default)]
struct Locks {
    held: Mutex<BTreeSet<usize>>,
    freed: parking_lot::Condvar,
}

/// See the module documentation.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    fs: Arc<Mutex<Fs>>,
    locks: Arc<Locks>,
}

#[derive(Debug)]
struct MemLock {
    locks: Arc<Locks>,
    file: Arc<Mutex<FileState>>,
}

impl super::StorageLock for MemLock {}

impl Drop for MemLock {
    fn drop(&mut self) {
        self.locks
            .held
            .lock()
            .remove(&(Arc::as_ptr(&self.file) as usize));
        self.locks.freed.notify_all();
    }
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulate a power loss. Handles opened before it keep pointing at the same
    /// files, so callers should drop whatever used them first.
    pub fn crash(&self, mode: CrashMode) {
        let mut fs = self.fs.lock();
        let mut rng = match mode {
            CrashMode::Tear(seed) => seed | 1,
            _ => 1,
        };
        let pending = std::mem::take(&mut fs.pending);
        let kept = match mode {
            CrashMode::KeepAll => pending.len(),
            CrashMode::DropAll => 0,
            CrashMode::DropLastNames(n) => pending.len().saturating_sub(n),
            // Any prefix; half the time one that ends among the last few changes,
            // where the operation the crash interrupted was.
            CrashMode::Tear(_) => {
                let n = pending.len() as u64;
                match xorshift(&mut rng) % 2 {
                    0 => (xorshift(&mut rng) % (n + 1)) as usize,
                    _ => n.saturating_sub(xorshift(&mut rng) % 4) as usize,
                }
            }
        };
        for change in pending.into_iter().take(kept) {
            for (name, binding) in change {
                match binding {
                    Some(st) => fs.durable_files.insert(name, st),
                    None => fs.durable_files.remove(&name),
                };
            }
        }
        if mode == CrashMode::KeepAll {
            fs.durable_files = fs.files.clone();
        } else {
            fs.files = fs.durable_files.clone();
        }
        for state in fs.files.values() {
            let mut st = state.lock();
            let mut image = st.durable.clone();
            for change in std::mem::take(&mut st.unsynced) {
                match change {
                    Unsynced::Write(offset, data) => {
                        let keep = match mode {
                            CrashMode::KeepAll => data.len(),
                            CrashMode::DropAll | CrashMode::DropLastNames(_) => 0,
                            CrashMode::Tear(_) => match xorshift(&mut rng) % 3 {
                                0 => 0,
                                1 => data.len(),
                                _ => (xorshift(&mut rng) % (data.len() as u64 + 1)) as usize,
                            },
                        };
                        if keep > 0 {
                            apply(&mut image, offset, data.get(..keep).unwrap_or(&[]));
                        }
                    }
                    Unsynced::Len(len) => {
                        let keep = match mode {
                            CrashMode::KeepAll => true,
                            CrashMode::DropAll | CrashMode::DropLastNames(_) => false,
                            // (A high bit: the lowest of xorshift's outputs repeats.)
                            CrashMode::Tear(_) => xorshift(&mut rng) >> 40 & 1 == 0,
                        };
                        if keep {
                            image.resize(len, 0);
                        }
                    }
                }
            }
            st.durable = image.clone();
            st.live = image;
        }
    }

    /// Total bytes in live files (for tests that check the journal stays bounded).
    pub fn total_bytes(&self) -> u64 {
        let fs = self.fs.lock();
        fs.files.values().map(|f| f.lock().live.len() as u64).sum()
    }

    /// Overwrite bytes of a file directly, durably, as a bit rot or an attacker would.
    pub fn corrupt(&self, path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
        let fs = self.fs.lock();
        let state = fs
            .files
            .get(path)
            .ok_or_else(|| Error::io("corrupt", path, io::ErrorKind::NotFound.into()))?;
        let mut st = state.lock();
        apply(&mut st.live, offset, bytes);
        apply(&mut st.durable, offset, bytes);
        Ok(())
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn apply(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    if let Some(dst) = image.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
}

/// The names `durable` says are durable now (their directory was synced, or
/// removed): each pending change that touches one is durable as a whole — a rename
/// moves both of its names at once — so its other names go into `durable_files`
/// (those `durable` covers were taken from the live namespace already), and it
/// leaves the pending list.
fn forget_pending(
    pending: &mut Vec<Vec<(PathBuf, Binding)>>,
    durable_files: &mut BTreeMap<PathBuf, Arc<Mutex<FileState>>>,
    durable: impl Fn(&Path) -> bool,
) {
    pending.retain(|change| {
        if !change.iter().any(|(p, _)| durable(p)) {
            return true;
        }
        for (p, binding) in change.iter().filter(|(p, _)| !durable(p)) {
            match binding {
                Some(st) => durable_files.insert(p.clone(), st.clone()),
                None => durable_files.remove(p),
            };
        }
        false
    });
}

fn not_found(op: &'static str, path: &Path) -> Error {
    Error::io(op, path, io::ErrorKind::NotFound.into())
}

impl Storage for MemStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        let mut fs = self.fs.lock();
        let state = match (mode, fs.files.get(path)) {
            (OpenMode::CreateNew, Some(_)) => {
                return Err(Error::io("open", path, io::ErrorKind::AlreadyExists.into()))
            }
            (OpenMode::CreateNew, None) => {
                let parent = path.parent().unwrap_or(Path::new(""));
                if !fs.dirs.contains(parent) {
                    return Err(not_found("open", path));
                }
                let st = Arc::new(Mutex::new(FileState::default()));
                fs.files.insert(path.to_path_buf(), st.clone());
                fs.pending
                    .push(vec![(path.to_path_buf(), Some(st.clone()))]);
                st
            }
            (_, Some(st)) => st.clone(),
            (_, None) => return Err(not_found("open", path)),
        };
        Ok(Arc::new(MemFile {
            path: path.to_path_buf(),
            state,
            writable: mode != OpenMode::ReadOnly,
        }))
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        let mut fs = self.fs.lock();
        let mut p = Some(path);
        while let Some(dir) = p {
            fs.dirs.insert(dir.to_path_buf());
            p = dir.parent();
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
        let fs = self.fs.lock();
        if !fs.dirs.contains(dir) {
            return Err(not_found("list", dir));
        }
        Ok(fs
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        let mut fs = self.fs.lock();
        fs.files
            .remove(path)
            .ok_or_else(|| not_found("remove", path))?;
        fs.pending.push(vec![(path.to_path_buf(), None)]);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut fs = self.fs.lock();
        let st = fs
            .files
            .remove(from)
            .ok_or_else(|| not_found("rename", from))?;
        fs.files.insert(to.to_path_buf(), st.clone());
        fs.pending.push(vec![
            (from.to_path_buf(), None),
            (to.to_path_buf(), Some(st)),
        ]);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let mut fs = self.fs.lock();
        if !fs.dirs.contains(dir) {
            return Err(not_found("sync directory", dir));
        }
        let Fs {
            files,
            durable_files,
            ..
        } = &mut *fs;
        durable_files.retain(|p, _| p.parent() != Some(dir));
        for (p, st) in files.iter().filter(|(p, _)| p.parent() == Some(dir)) {
            durable_files.insert(p.clone(), st.clone());
        }
        let Fs {
            pending,
            durable_files,
            ..
        } = &mut *fs;
        forget_pending(pending, durable_files, |p| p.parent() == Some(dir));
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        let fs = self.fs.lock();
        fs.files.contains_key(path) || fs.dirs.contains(path)
    }

    fn list_dirs(&self, dir: &Path) -> Result<Vec<String>> {
        let fs = self.fs.lock();
        Ok(fs
            .dirs
            .iter()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn remove_dir(&self, dir: &Path) -> Result<()> {
        let mut fs = self.fs.lock();
        let busy = fs.files.keys().any(|p| p.starts_with(dir))
            || fs.dirs.iter().any(|p| p != dir && p.starts_with(dir));
        if busy {
            return Err(Error::io(
                "remove directory",
                dir,
                io::Error::from_raw_os_error(libc::ENOTEMPTY),
            ));
        }
        // Directories are durable when made and when removed: so are the removals
        // and renames that emptied this one (a journalling file system commits them
        // before the rmdir), and a crash never brings back files without their
        // directory.
        let Fs {
            pending,
            durable_files,
            ..
        } = &mut *fs;
        durable_files.retain(|p, _| !p.starts_with(dir));
        forget_pending(pending, durable_files, |p| p.starts_with(dir));
        fs.dirs.remove(dir);
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<bool> {
        let mut fs = self.fs.lock();
        if fs.files.contains_key(to) {
            return Ok(false);
        }
        let st = fs
            .files
            .remove(from)
            .ok_or_else(|| not_found("rename", from))?;
        fs.files.insert(to.to_path_buf(), st.clone());
        fs.pending.push(vec![
            (from.to_path_buf(), None),
            (to.to_path_buf(), Some(st)),
        ]);
        Ok(true)
    }

    fn lock(&self, path: &Path, wait: bool) -> Result<Option<Box<dyn super::StorageLock>>> {
        if !self.exists(path) {
            self.open(path, OpenMode::CreateNew)?;
        }
        let file = self
            .fs
            .lock()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| not_found("lock", path))?;
        let id = Arc::as_ptr(&file) as usize;
        let mut held = self.locks.held.lock();
        while held.contains(&id) {
            if !wait {
                return Ok(None);
            }
            self.locks.freed.wait(&mut held);
        }
        held.insert(id);
        Ok(Some(Box::new(MemLock {
            locks: self.locks.clone(),
            file,
        })))
    }

    fn free_bytes(&self, _path: &Path) -> Option<u64> {
        None
    }
}

impl StorageFile for MemFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let st = self.state.lock();
        let start = (offset as usize).min(st.live.len());
        let end = (start + buf.len()).min(st.live.len());
        let src = st.live.get(start..end).unwrap_or(&[]);
        if let Some(dst) = buf.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
        Ok(src.len())
    }

    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::io(
                "write",
                &self.path,
                io::Error::from_raw_os_error(libc::EBADF),
            ));
        }
        let data: Vec<u8> = bufs.concat();
        let mut st = self.state.lock();
        apply(&mut st.live, offset, &data);
        st.unsynced.push(Unsynced::Write(offset, data));
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        let mut st = self.state.lock();
        st.durable = st.live.clone();
        st.unsynced.clear();
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        let len = len as usize;
        st.live.resize(len, 0);
        st.unsynced.push(Unsynced::Len(len));
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.state.lock().live.len() as u64)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len()?;
        let end = (offset + len).min(size);
        if end <= offset {
            return Ok(());
        }
        let zeros = vec![0u8; (end - offset) as usize];
        self.write_at(&[&zeros], offset)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(fs: &MemStorage, p: &str, bytes: &[u8]) {
        let f = fs.open(Path::new(p), OpenMode::CreateNew).unwrap();
        f.write_at(&[bytes], 0).unwrap();
        f.sync_data().unwrap();
    }

    /// A length set and not synced is no more durable than a write: a power loss may
    /// keep it or not, each independently of the writes around it, applied in the
    /// order they were made; a sync makes it durable.
    #[test]
    fn a_length_change_is_durable_only_once_synced() {
        // 8 KiB synced; then cut to 4 KiB and a footer-like write at the cut.
        let scenario = || {
            let fs = MemStorage::new();
            fs.create_dir_all(Path::new("/d")).unwrap();
            file(&fs, "/d/a", &[7u8; 8192]);
            fs.sync_dir(Path::new("/d")).unwrap();
            let f = fs.open(Path::new("/d/a"), OpenMode::ReadWrite).unwrap();
            f.set_len(4096).unwrap();
            f.write_at(&[b"end"], 4096).unwrap();
            assert_eq!(f.len().unwrap(), 4099);
            (fs, f)
        };
        let image = |fs: &MemStorage| {
            let f = fs.open(Path::new("/d/a"), OpenMode::ReadOnly).unwrap();
            let mut buf = vec![0u8; f.len().unwrap() as usize];
            f.read_at(&mut buf, 0).unwrap();
            buf
        };
        let (mut cut_lost_end_kept, mut cut_kept_end_lost) = (false, false);
        for seed in 0..64 {
            let (fs, f) = scenario();
            drop(f);
            fs.crash(CrashMode::Tear(seed));
            let got = image(&fs);
            match got.len() {
                // The cut kept, the end not (or only a part of it: a longer file).
                4096 => cut_kept_end_lost = true,
                4097..=4099 => assert!(got[4096..].iter().zip(b"end").all(|(a, b)| a == b)),
                // The cut lost: the old bytes after whatever of the end was kept.
                8192 => {
                    assert!(got[4099..].iter().all(|b| *b == 7), "seed {seed}");
                    cut_lost_end_kept |= got[4096..4099] == b"end"[..];
                }
                n => panic!("seed {seed}: {n} bytes"),
            }
        }
        assert!(
            cut_lost_end_kept && cut_kept_end_lost,
            "64 seeds never tore both ways"
        );
        // A crash that drops what was not synced: the old length and bytes.
        let (fs, f) = scenario();
        drop(f);
        fs.crash(CrashMode::DropAll);
        assert_eq!(image(&fs), vec![7u8; 8192]);
        // Synced: the new length survives anything.
        let (fs, f) = scenario();
        f.sync_data().unwrap();
        drop(f);
        fs.crash(CrashMode::DropAll);
        assert_eq!(image(&fs).len(), 4099);
    }

    #[test]
    fn names_survive_a_power_loss_only_once_their_directory_is_synced() {
        let fs = MemStorage::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        file(&fs, "/d/a", b"a");
        // Synced data, unsynced name: gone.
        fs.crash(CrashMode::DropAll);
        assert!(!fs.exists(Path::new("/d/a")));
        file(&fs, "/d/a", b"a");
        fs.sync_dir(Path::new("/d")).unwrap();
        // A rename and a removal not followed by a directory sync are undone.
        file(&fs, "/d/b", b"b");
        fs.rename(Path::new("/d/b"), Path::new("/d/a")).unwrap();
        fs.crash(CrashMode::DropAll);
        let mut buf = [0u8; 1];
        fs.open(Path::new("/d/a"), OpenMode::ReadOnly)
            .unwrap()
            .read_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"a");
        assert!(!fs.exists(Path::new("/d/b")));
        fs.remove_file(Path::new("/d/a")).unwrap();
        fs.crash(CrashMode::DropAll);
        assert!(fs.exists(Path::new("/d/a")));
        // A process crash (the kernel lives on) keeps every name.
        file(&fs, "/d/c", b"c");
        fs.crash(CrashMode::KeepAll);
        fs.crash(CrashMode::DropAll);
        assert!(fs.exists(Path::new("/d/c")));
    }

    #[test]
    fn namespace_changes_survive_in_order_and_renames_whole() {
        let fs = MemStorage::new();
        for d in ["/x", "/y"] {
            fs.create_dir_all(Path::new(d)).unwrap();
        }
        let names = |fs: &MemStorage| -> Vec<bool> {
            ["/x/1", "/x/2", "/x/3"]
                .iter()
                .map(|p| fs.exists(Path::new(p)))
                .collect()
        };
        // Three creations, none synced: all but the last one or two kept, in order.
        for (drop, want) in [(1, [true, true, false]), (2, [true, false, false])] {
            for n in 1..=3 {
                file(&fs, &format!("/x/{n}"), b"n");
            }
            fs.crash(CrashMode::DropLastNames(drop));
            assert_eq!(names(&fs), want, "all but the last {drop}");
            fs.remove_tree(Path::new("/x")).unwrap();
            fs.create_dir_all(Path::new("/x")).unwrap();
        }
        // A rename across directories is durable whole once either side is synced:
        // the file is never under both names, nor under neither.
        for synced in ["/x", "/y"] {
            file(&fs, "/x/f", b"f");
            fs.sync_dir(Path::new("/x")).unwrap();
            fs.rename(Path::new("/x/f"), Path::new("/y/f")).unwrap();
            fs.sync_dir(Path::new(synced)).unwrap();
            fs.crash(CrashMode::DropAll);
            assert!(!fs.exists(Path::new("/x/f")), "synced {synced}");
            assert!(fs.exists(Path::new("/y/f")), "synced {synced}");
            fs.remove_file(Path::new("/y/f")).unwrap();
            fs.sync_dir(Path::new("/y")).unwrap();
        }
        // A removed directory does not come back, nor do its files.
        fs.create_dir_all(Path::new("/x/sub")).unwrap();
        file(&fs, "/x/sub/g", b"g");
        fs.sync_dir(Path::new("/x/sub")).unwrap();
        fs.remove_tree(Path::new("/x/sub")).unwrap();
        fs.crash(CrashMode::DropAll);
        assert!(!fs.exists(Path::new("/x/sub/g")));
        assert!(!fs.exists(Path::new("/x/sub")));
    }
}
