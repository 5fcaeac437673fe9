//! Real files.

use super::{DirectBuf, OpenMode, Storage, StorageFile};
use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Default, Clone, Copy)]
pub struct FileStorage;

impl FileStorage {
    pub fn new() -> Self {
        FileStorage
    }
}

/// Writes from this size on go around the page cache ([`StorageFile::write_bulk`]).
const DIRECT_MIN: usize = 1 << 20;

/// The alignment of O_DIRECT buffers, offsets and lengths here.
const DIRECT_ALIGN: usize = 4096;

/// A second descriptor on `file` opened with O_DIRECT (for writing, or reading),
/// through `/proc/self/fd`, so that a rename of its path cannot redirect it.
fn open_direct(file: &File, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `len` bytes of `scratch` starting at a 4 KiB boundary, `scratch` grown as needed
/// (and kept, so that reusing it costs no allocation or page faults).
pub fn aligned_slice(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if scratch.len() < len + DIRECT_ALIGN {
        scratch.resize(len + DIRECT_ALIGN, 0);
    }
    let skip = scratch
        .as_ptr()
        .align_offset(DIRECT_ALIGN)
        .min(DIRECT_ALIGN);
    scratch.get_mut(skip..skip + len).unwrap_or(&mut [])
}

#[derive(Debug)]
struct RealFile {
    path: PathBuf,
    file: File,
    /// A second descriptor on the same file opened with O_DIRECT, for
    /// [`StorageFile::read_direct`]; opened on first use.
    direct: std::sync::OnceLock<File>,
    /// Set when O_DIRECT was refused, at the open or at a read (EINVAL: the file
    /// system or the device wants otherwise): later reads go buffered at once.
    direct_refused: std::sync::atomic::AtomicBool,
}

impl Storage for FileStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn StorageFile>> {
        let mut opts = OpenOptions::new();
        match mode {
            OpenMode::CreateNew => opts.read(true).write(true).create_new(true),
            OpenMode::ReadWrite => opts.read(true).write(true),
            OpenMode::ReadOnly => opts.read(true),
        };
        let file = opts.open(path).map_err(|e| Error::io("open", path, e))?;
        Ok(Arc::new(RealFile::new(path, file)))
    }

    fn create_dir_all(&self, path: &Path) -> Result<()> {
        fs::create_dir_all(path).map_err(|e| Error::io("create directory", path, e))
    }

    fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            let is_file = entry
                .file_type()
                .map_err(|e| Error::io("stat", entry.path(), e))?
                .is_file();
            if let (true, Some(name)) = (is_file, entry.file_name().to_str()) {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        fs::remove_file(path).map_err(|e| Error::io("remove", path, e))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        fs::rename(from, to).map_err(|e| Error::io("rename", from, e))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
        d.sync_all()
            .map_err(|e| Error::io("sync directory", dir, e))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list_dirs(&self, dir: &Path) -> Result<Vec<String>> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            let kind = entry
                .file_type()
                .map_err(|e| Error::io("stat", entry.path(), e))?;
            // A symbolic link to a directory counts as one (a machine's directory
            // may be a link to another disk).
            let is_dir = kind.is_dir() || (kind.is_symlink() && entry.path().is_dir());
            if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// `remove_dir_all` (any kind of entry, any name): a journalling file system
    /// keeps the removals in order, so no sync is needed between them.
    fn remove_tree(&self, dir: &Path) -> Result<()> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", dir, e)),
        }
    }

    fn remove_dir(&self, dir: &Path) -> Result<()> {
        match fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove directory", dir, e)),
        }
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<bool> {
        match renameat2(from, to, libc::RENAME_NOREPLACE) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(Error::io("rename", from, e)),
        }
    }

    fn lock(&self, path: &Path, wait: bool) -> Result<Option<Box<dyn super::StorageLock>>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        if wait {
            f.lock().map_err(|e| Error::io("lock", path, e))?;
        } else {
            match f.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => return Ok(None),
                Err(fs::TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
            }
        }
        Ok(Some(Box::new(FileLock(f))))
    }

    fn free_bytes(&self, path: &Path) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs fills a zeroed plain-data struct from a valid C path.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut st) != 0 {
                return None;
            }
            Some(st.f_bavail.saturating_mul(st.f_frsize))
        }
    }
}

/// A flock held on an open file; closing the file releases it.
#[derive(Debug)]
struct FileLock(#[allow(dead_code)] File);

impl super::StorageLock for FileLock {}

impl StorageFile for RealFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let Some(rest) = buf.get_mut(done..) else {
                break;
            };
            match self.file.read_at(rest, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &self.path, e)),
            }
        }
        Ok(done)
    }

    /// Through the O_DIRECT descriptor: straight into `buf` when its address, its
    /// length and `offset` are 4 KiB-aligned (the device's own alignment is at most
    /// that on the file systems replog runs on), else the covering aligned range
    /// into a reused aligned buffer and copied out. Buffered where O_DIRECT is
    /// refused. The kernel writes back any dirty page cache of the range before a
    /// direct read, so what was written buffered is read.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let Some(direct) = self.direct_reader() else {
            return self.read_at(buf, offset);
        };
        let a = DIRECT_ALIGN as u64;
        if buf.len().is_multiple_of(DIRECT_ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(a)
        {
            return self.pread_direct(direct, buf, offset);
        }
        thread_local! {
            static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let start = offset / a * a;
        let end = offset
            .checked_add(buf.len() as u64)
            .map(|e| e.div_ceil(a) * a)
            .ok_or_else(|| Error::InvalidInput(format!("read at {offset} past 2^64")))?;
        let span = (end - start) as usize;
        BOUNCE.with_borrow_mut(|bounce| {
            let area = aligned_slice(bounce, span);
            let n = self.pread_direct(direct, area, start)?;
            let skip = (offset - start) as usize;
            let got = n.saturating_sub(skip).min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..got), area.get(skip..skip + got)) {
                dst.copy_from_slice(src);
            }
            Ok(got)
        })
    }

    fn write_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        if bufs.len() == 1 {
            if let Some(b) = bufs.first() {
                return self
                    .file
                    .write_all_at(b, offset)
                    .map_err(|e| Error::io("write", &self.path, e));
            }
        }
        pwritev_all(&self.file, bufs, offset).map_err(|e| Error::io("write", &self.path, e))
    }

    /// Large writes at an aligned offset go around the page cache: the aligned part
    /// through a second descriptor opened with O_DIRECT on the same file (through
    /// `/proc/self/fd`, so a rename of the path cannot redirect it), in pieces copied
    /// into an aligned buffer (the caller's need not be), the rest buffered. Where
    /// O_DIRECT is refused (tmpfs, some file systems), all of it is written buffered.
    fn write_bulk(&self, data: &[u8], offset: u64) -> Result<()> {
        const PIECE: usize = 8 << 20;
        let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if data.len() < DIRECT_MIN || !offset.is_multiple_of(DIRECT_ALIGN as u64) {
            return self.write_at(&[data], offset);
        }
        let Ok(direct) = open_direct(&self.file, true) else {
            return self.write_at(&[data], offset);
        };
        // Buffers are reused (a fresh one costs page faults), in huge pages: a piece
        // is two requests to the device rather than nine or more (`DirectBuf`).
        static SPARE: parking_lot::Mutex<Vec<DirectBuf>> = parking_lot::Mutex::new(Vec::new());
        let spare = SPARE.lock().pop();
        let Ok(mut bounce) = DirectBuf::reuse(spare, PIECE) else {
            return self.write_at(&[data], offset);
        };
        let mut done = 0usize;
        while done < aligned {
            let n = (aligned - done).min(PIECE);
            let (Some(piece), Some(src)) =
                (bounce.as_mut_slice().get_mut(..n), data.get(done..done + n))
            else {
                break;
            };
            piece.copy_from_slice(src);
            match direct.write_all_at(piece, offset + done as u64) {
                Ok(()) => done += n,
                // Refused after all (EINVAL: an alignment the device wants bigger):
                // the rest buffered.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(Error::io("write", &self.path, e)),
            }
        }
        {
            let mut spare = SPARE.lock();
            if spare.len() < 4 {
                spare.push(bounce);
            }
        }
        match data.get(done..) {
            Some(rest) if !rest.is_empty() => self.write_at(&[rest], offset + done as u64),
            _ => Ok(()),
        }
    }

    fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("set length of", &self.path, e))
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len())
    }

    fn preallocate(&self, len: u64) {
        let Ok(l) = i64::try_from(len) else { return };
        // SAFETY: fallocate on an open descriptor with integer arguments. A hint:
        // failure (no space, unsupported) only means appends allocate as they go.
        unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, l);
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: posix_fadvise on an open descriptor with integer arguments; a hint.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED);
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range on an open descriptor with integer arguments. It is a
        // hint: failure is harmless (sync_data reports real errors).
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, l, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        match self.lseek(offset, libc::SEEK_DATA)? {
            Some(at) => Ok(Some(at)),
            None => Ok(None),
        }
    }

    fn seek_hole(&self, offset: u64) -> Result<u64> {
        Ok(self.lseek(offset, libc::SEEK_HOLE)?.unwrap_or(offset))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::InvalidInput(format!(
                "hole {offset}+{len} too large"
            )));
        };
        // SAFETY: fallocate on a valid, open descriptor with plain integer arguments;
        // no memory is passed to the kernel.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io("punch hole in", &self.path, err));
        }
        // The file system cannot punch holes: write zeros instead.
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            let chunk = zeros.get(..n).unwrap_or(&[]);
            self.file
                .write_all_at(chunk, at)
                .map_err(|e| Error::io("write zeros to", &self.path, e))?;
            at += n as u64;
        }
        Ok(())
    }
}

impl RealFile {
    fn new(path: &Path, file: File) -> Self {
        RealFile {
            path: path.to_path_buf(),
            file,
            direct: std::sync::OnceLock::new(),
            direct_refused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The O_DIRECT descriptor for [`StorageFile::read_direct`], opened on first use;
    /// None where O_DIRECT is refused (remembered), or for this call only when the
    /// open failed otherwise (out of descriptors, say).
    fn direct_reader(&self) -> Option<&File> {
        if self
            .direct_refused
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        if let Some(d) = self.direct.get() {
            return Some(d);
        }
        match open_direct(&self.file, false) {
            Ok(f) => Some(self.direct.get_or_init(|| f)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                self.direct_refused
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Err(e) => {
                tracing::warn!(
                    "{}: O_DIRECT open failed, reading buffered: {e}",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Read all of `buf` (aligned) at `offset` (aligned) through `direct`, the O_DIRECT
    /// descriptor; fewer bytes only at the end of the file. What is left unaligned by
    /// a short read, or refused after all (EINVAL: an alignment the device wants
    /// bigger), is read buffered.
    fn pread_direct(&self, direct: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            match direct.read_at(rest, offset + done as u64) {
                Ok(0) => return Ok(done),
                Ok(n) => {
                    done += n;
                    if !n.is_multiple_of(DIRECT_ALIGN) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if !self
                        .direct_refused
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "{}: O_DIRECT reads refused (EINVAL); reading it buffered from now on",
                            self.path.display()
                        );
                    }
                    break;
                }
                Err(e) => return Err(Error::io("read", &self.path, e)),
            }
        }
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        Ok(done + self.read_at(rest, offset + done as u64)?)
    }

    /// `lseek` with SEEK_DATA / SEEK_HOLE; None for ENXIO (nothing of that kind after
    /// `offset`).
    fn lseek(&self, offset: u64, whence: i32) -> Result<Option<u64>> {
        let off = i64::try_from(offset)
            .map_err(|_| Error::InvalidInput(format!("offset {offset} too large")))?;
        // SAFETY: lseek on an open descriptor with integer arguments only; it does not
        // move any offset we rely on (all I/O here is positional).
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if at < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::io("seek in", &self.path, err));
        }
        Ok(Some(at as u64))
    }
}

/// `pwritev` until every byte of `bufs` is written.
fn pwritev_all(file: &File, bufs: &[&[u8]], mut offset: u64) -> std::io::Result<()> {
    let mut slices: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    while !slices.is_empty() {
        let iov: Vec<libc::iovec> = slices
            .iter()
            .take(libc::UIO_MAXIOV as usize)
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let off =
            i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: every iovec points into a slice borrowed for the duration of the call;
        // the kernel only reads from them.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let Some(first) = slices.first_mut() else {
                break;
            };
            if n >= first.len() {
                n -= first.len();
                slices.remove(0);
            } else {
                *first = first.get(n..).unwrap_or(&[]);
                n = 0;
            }
        }
    }
    Ok(())
}

/// `renameat2(from, to, flags)` (RENAME_NOREPLACE, RENAME_EXCHANGE) on two paths.
pub(crate) fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: renameat2 with two valid NUL-terminated paths relative to the current
    // directory (AT_FDCWD) and a flag; no memory is retained.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Create `path` (it must not exist) with permission `mode`, write `bytes`, fsync:
/// how keys and certificates are written (a private key never exists, even for a
/// moment, with a mode others may read).
pub fn create_file_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Bulk writes read back the same, whatever their size, offset and alignment,
    /// and over what was there: the direct part, the buffered tail, the fallback.
    #[test]
    fn bulk_writes_read_back_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = FileStorage;
        let data: Vec<u8> = (0..(3usize << 20) + 4567)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        for (n, (offset, len)) in [
            (0u64, data.len()),
            (8192, 2 << 20),
            (100, 1 << 20),
            (0, 4000),
        ]
        .into_iter()
        .enumerate()
        {
            let p = tmp.path().join(format!("f{n}"));
            let f = fs.open(&p, OpenMode::CreateNew).unwrap();
            // Something there first: cached pages the direct write must not leave stale.
            f.write_at(&[&vec![0xEE; len + offset as usize]], 0)
                .unwrap();
            let mut before = vec![0u8; 4096];
            f.read_at(&mut before, offset).unwrap();
            f.write_bulk(&data[..len], offset).unwrap();
            f.sync_data().unwrap();
            let mut back = vec![0u8; len];
            assert_eq!(f.read_at(&mut back, offset).unwrap(), len);
            assert!(
                back == data[..len],
                "write {n} ({offset}, {len}) reads back different"
            );
            assert_eq!(std::fs::read(&p).unwrap()[offset as usize..], data[..len]);
        }
    }

    /// Direct reads return what buffered writes left in the page cache (not yet
    /// written back), whatever the alignment (the unaligned ones through the aligned
    /// bounce buffer), and stop at the end of the file; on this file system they
    /// really go through the O_DIRECT descriptor.
    #[test]
    fn direct_reads_see_buffered_writes_and_stop_at_the_end() {
        // Under the build's directory, on a disk file system whatever TMPDIR is
        // (tmpfs refuses O_DIRECT on older kernels).
        let under = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp");
        std::fs::create_dir_all(under).unwrap();
        let tmp = tempfile::tempdir_in(under).unwrap();
        let path = tmp.path().join("f");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let f = RealFile::new(&path, file);
        let len = (3usize << 20) + 4567;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        f.write_at(&[&data], 0).unwrap();
        let mut scratch = vec![0u8; (4 << 20) + 8192];
        let skip = scratch.as_ptr().align_offset(4096);
        for (offset, n, shift) in [
            (0u64, 1usize << 20, 0usize),
            (1 << 20, 2 << 20, 0),
            (4096, 8192, 0),
            (100, 1 << 20, 0),
            (8192, 4096, 1),
            (4096, 5000, 0),
            // Across the end and past it.
            (3 << 20, 1 << 20, 0),
            ((3 << 20) + 8192, 4096, 0),
        ] {
            let buf = &mut scratch[skip + shift..skip + shift + n];
            buf.fill(0xAA);
            let got = f.read_direct(buf, offset).unwrap();
            let want = len.saturating_sub(offset as usize).min(n);
            assert_eq!(got, want, "read of {n} at {offset} (+{shift})");
            assert!(
                buf[..got] == data[(offset as usize).min(len)..][..got],
                "read of {n} at {offset} (+{shift}) differs"
            );
        }
        assert!(
            f.direct.get().is_some(),
            "O_DIRECT was refused here: the direct path went untested"
        );
        assert!(
            !f.direct_refused.load(std::sync::atomic::Ordering::Relaxed),
            "direct reads were refused after the open: the buffered fallback was tested instead"
        );
    }
}
