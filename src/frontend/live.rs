//! The live view: `<machine>/<disk>.img` files backed by volumes.
//!
//! Request handlers call straight into the engine: a write is an append to the page
//! cache plus an index update, a read is index lookup plus `pread`s, an `fsync` or a
//! `flush` (close) is a group commit. No engine lock is held across a reply or a
//! kernel notification: every engine call returns before the reply is sent.

use super::points::{PNode, PointViews};
use super::tree::{Node, Tree, ROOT};
use crate::storage::DirectBuf;
use crate::volume::Volume;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Kernel-facing choices, each measured in `docs/FUSE.md`.
#[derive(Debug, Clone, Copy)]
pub struct FrontendOptions {
    /// Largest write request the kernel sends (bytes).
    pub max_write: u32,
    /// Ask for FUSE_ASYNC_DIO (the kernel submits a direct I/O's pieces in parallel).
    pub async_dio: bool,
    /// Open every file with FOPEN_DIRECT_IO (no page cache in the FUSE layer). When
    /// false, only O_DIRECT opens get it and the others FOPEN_KEEP_CACHE (cached pages
    /// stay valid across opens: all writes come through this mount, so the cache
    /// cannot go stale).
    pub direct_io: bool,
    /// Let the kernel send parallel direct writes to one file.
    pub parallel_direct_writes: bool,
    /// Which reads of openers that asked for O_DIRECT go around the page cache.
    pub reads: ReadPath,
    /// Hand writes to this many worker threads, which append and reply, so the
    /// session thread goes back to reading the next request at once (0: the session
    /// thread appends and replies itself). Costs a copy of the data.
    pub write_workers: usize,
    /// Background (asynchronous) requests the kernel may have outstanding: with
    /// FUSE_ASYNC_DIO every piece of an O_DIRECT request is one, so this bounds the
    /// queue depth the mount sees (the kernel's default is 12). The congestion
    /// threshold is 3/4 of it.
    pub max_background: u16,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            max_write: 1 << 20,
            async_dio: true,
            direct_io: false,
            parallel_direct_writes: true,
            reads: ReadPath::Sequential,
            write_workers: 0,
            max_background: 12,
        }
    }
}

/// How the parent image is read for an opener that asked for O_DIRECT (a VM with
/// cache=none, a database, fio direct=1). Reads of other openers, and data still in
/// the journal, always go through the page cache (docs/FUSE.md, "Reads around the page
/// cache").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// Through the page cache, with readahead for sequential readers.
    Cached,
    /// A sequential run (a read that continues the reader's last ones) around the page
    /// cache, read ahead with O_DIRECT into replog's own buffers (`volume::ahead`);
    /// other reads through the page cache, which keeps what is read again. A stream
    /// takes no page-cache memory, on a host that takes freed memory back (a balloon)
    /// the costly part of a buffered read.
    Sequential,
    /// Every read around the page cache (sequential runs read ahead as above): no
    /// double caching of a guest that caches for itself; random reads go to the disk
    /// each time.
    Direct,
}

const TTL: Duration = Duration::from_secs(60);

thread_local! {
    /// Each session thread's read buffer, reused: no allocation, zeroing or page faults
    /// per request. In huge pages: a direct read into it is one request to the device
    /// (`storage::DirectBuf`).
    static READ_BUF: std::cell::RefCell<Option<DirectBuf>> = const { std::cell::RefCell::new(None) };
}

/// The live file system; see the module documentation.
#[derive(Debug)]
pub struct LiveFs {
    /// The machines' directories and disks, as the registry changes them.
    tree: Arc<Tree>,
    opts: FrontendOptions,
    started: SystemTime,
    uid: u32,
    gid: u32,
    seq_reads: SequentialReads,
    /// Present when writes are handed to workers.
    workers: Option<crossbeam::channel::Sender<WriteJob>>,
    /// The replicas' points (inodes from 2^40 up), on a site that holds replicas.
    views: Option<PointViews>,
}

/// Entries of point views change as points come and expire.
const VIEW_TTL: Duration = Duration::from_secs(1);

/// A write handed to a worker thread.
struct WriteJob {
    ino: u64,
    vol: Volume,
    offset: u64,
    data: Vec<u8>,
    reply: ReplyWrite,
}

impl std::fmt::Debug for WriteJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteJob({}+{})", self.offset, self.data.len())
    }
}

/// How long a write waits for a machine that is being reopened (a disk added).
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// Append a write and reply; shared by the session thread and the workers. A write
/// that finds its machine closed (reopened after a change) goes to the machine the
/// tree shows under the same inode now; one removed gets ENOENT.
fn do_write(tree: &Tree, ino: u64, vol: &Volume, offset: u64, data: &[u8], reply: ReplyWrite) {
    let _timed = crate::metrics::get().timed("write");
    let mut vol = vol.clone();
    let started = std::time::Instant::now();
    let result = loop {
        match vol.write(offset, data) {
            Err(crate::Error::Closed { .. }) if started.elapsed() < REOPEN_WAIT => {
                match tree.node(ino) {
                    Some(Node::Disk { vol: now }) if !now.same_machine(&vol) => vol = now,
                    Some(Node::Disk { .. }) => std::thread::sleep(Duration::from_millis(5)),
                    _ => {
                        break Err(crate::Error::Closed {
                            machine: vol.machine().to_string(),
                        })
                    }
                }
            }
            r => break r,
        }
    };
    match result {
        Ok(_) => reply.written(data.len() as u32),
        Err(e) => {
            tracing::warn!(
                "write {}/{} at {offset}+{}: {e}",
                vol.machine(),
                vol.name(),
                data.len()
            );
            reply.error(errno(&e))
        }
    }
}

/// Start `n` write workers; they stop when the sender is dropped (with the file system).
fn spawn_write_workers(n: usize, tree: &Arc<Tree>) -> Option<crossbeam::channel::Sender<WriteJob>> {
    if n == 0 {
        return None;
    }
    let (tx, rx) = crossbeam::channel::bounded::<WriteJob>(64);
    for i in 0..n {
        let rx = rx.clone();
        let tree = tree.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fuse-write-{i}"))
            .spawn(move || {
                for job in rx {
                    do_write(&tree, job.ino, &job.vol, job.offset, &job.data, job.reply);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("could not start write worker: {e}; writing inline");
            return None;
        }
    }
    Some(tx)
}

/// Per inode, a reader's run: how far it has read, how far ahead of that reads were
/// asked for, and whether the run is established (to spot sequential readers and keep
/// a readahead window in front of them).
#[derive(Debug, Default)]
struct SequentialReads(parking_lot::Mutex<std::collections::HashMap<u64, RunState>>);

#[derive(Clone, Copy, Debug)]
struct RunState {
    /// The furthest end read.
    furthest: u64,
    /// The end of what was asked for.
    asked: u64,
    /// A read began exactly where the run had got to: it is a run.
    established: bool,
}

/// The readahead window in front of a sequential reader: at least this much (16 MiB:
/// at queue depth 4 and 16 an 8 MiB window, refilled below half, was mostly requests
/// the kernel had already sent, and the readers read 14–30% of the bytes themselves,
/// docs/FUSE.md)…
const READAHEAD_MIN: u64 = 16 << 20;
/// …or this many of its requests, whichever is more.
const READAHEAD_REQUESTS: u64 = 8;
/// Once a run is established, a read within this many of its own lengths of where
/// the reader has got to still continues it: a reader with several requests in flight
/// (libaio, io_uring) has them answered, and recorded, in any order.
const REORDER_REQUESTS: u64 = 16;

impl SequentialReads {
    /// Record a read of `len` bytes at `offset`. Returns whether it continues an
    /// established run — one in which a read began exactly where the reader had got
    /// to; after that, reads near the furthest end read (reordered ones) continue it,
    /// a jump ends it, and reading the same range again never starts one — and the
    /// range to ask the engine to fetch now, if less than three quarters of the window
    /// are left ahead of the furthest end. A direct reader at queue depth 1 waits for each
    /// request in turn, so the disk must already be reading the next ones (2x the
    /// request, as before, measured 0.4x a plain file; the window keeps several MiB in
    /// flight). Only ranges past what was asked for before are asked for.
    fn record(&self, ino: u64, offset: u64, len: u64) -> (bool, Option<(u64, u64)>) {
        let mut m = self.0.lock();
        let end = offset + len;
        let fresh = RunState {
            furthest: end,
            asked: end,
            established: false,
        };
        let Some(mut run) = m.get(&ino).copied() else {
            m.insert(ino, fresh);
            return (false, None);
        };
        let near = offset.abs_diff(run.furthest) <= REORDER_REQUESTS * len;
        if offset == run.furthest {
            run.established = true;
        } else if !run.established && near && end <= run.furthest {
            // Read again, or answered out of order before the run is known: no run
            // yet, nothing forgotten.
            return (false, None);
        } else if !run.established || !near {
            m.insert(ino, fresh);
            return (false, None);
        }
        run.furthest = run.furthest.max(end);
        let window = READAHEAD_MIN.max(READAHEAD_REQUESTS * len);
        let from = run.asked.max(run.furthest);
        let fetch = (from < run.furthest + window / 4 * 3).then(|| {
            run.asked = run.furthest + window;
            (from, run.asked - from)
        });
        if fetch.is_none() {
            run.asked = from;
        }
        m.insert(ino, run);
        (true, fetch)
    }
}

impl LiveFs {
    /// The file system of the machines `tree` shows (the registry keeps it current);
    /// with `views`, also the read-only points of every replica the site holds (and
    /// its orphan points).
    pub(crate) fn new(
        tree: Arc<Tree>,
        opts: FrontendOptions,
        views: Option<PointViews>,
    ) -> crate::Result<Self> {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(LiveFs {
            tree: tree.clone(),
            opts,
            started: SystemTime::now(),
            uid,
            gid,
            seq_reads: SequentialReads::default(),
            workers: spawn_write_workers(opts.write_workers, &tree),
            views,
        })
    }

    /// Look up `name` in `parent` among the point views.
    fn view_lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let views = self.views.as_ref()?;
        if PointViews::is_dynamic(parent) {
            return views.lookup(parent, name);
        }
        if parent == 1 {
            return views
                .has_replica(name)
                .then(|| views.ino(PNode::MachineDir(name.to_string())));
        }
        let m = self.tree.machine_of_dir(parent)?;
        (name == "points" && views.has_replica(&m)).then(|| views.ino(PNode::PointsDir(m)))
    }

    fn view_attr(&self, ino: u64) -> Option<FileAttr> {
        let e = self.views.as_ref()?.entry(ino)?;
        let (perm, nlink) = match e.kind {
            FileType::Directory => (0o555, 2),
            _ => (0o444, 1),
        };
        Some(self.file_attr(INodeNo(e.ino), e.kind, e.size, perm, nlink, e.time))
    }

    /// The disk behind `ino` (a machine removed meanwhile: ENOENT, even for a file
    /// still open).
    fn volume(&self, ino: INodeNo) -> Result<Volume, Errno> {
        if PointViews::is_dynamic(ino.0) {
            return Err(Errno::EROFS); // the points are read-only
        }
        if ino.0 == ROOT {
            return Err(Errno::EISDIR);
        }
        match self.tree.node(ino.0) {
            Some(Node::Disk { vol }) => Ok(vol),
            Some(Node::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino.0 == ROOT {
            (
                FileType::Directory,
                0,
                0o755,
                2 + self.tree.machines().len() as u32,
            )
        } else {
            match self.tree.node(ino.0)? {
                Node::Dir { children, .. } => {
                    (FileType::Directory, 0, 0o755, 2 + children.len() as u32)
                }
                Node::Disk { vol } => (FileType::RegularFile, vol.size(), 0o644, 1),
            }
        };
        Some(self.file_attr(ino, kind, size, perm, nlink, self.started))
    }

    /// The attributes every entry shares but for these.
    fn file_attr(
        &self,
        ino: INodeNo,
        kind: FileType,
        size: u64,
        perm: u16,
        nlink: u32,
        time: SystemTime,
    ) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn refuse(&self, what: &str, reply_err: impl FnOnce(Errno)) {
        tracing::warn!("refused: {what} (disk images have a fixed set and size)");
        reply_err(Errno::EPERM);
    }
}

fn errno(e: &crate::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl Filesystem for LiveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.opts.max_write) {
            let _ = config.set_max_write(nearest);
        }
        if self.opts.async_dio {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        // Both refuse only 0.
        let bg = self.opts.max_background.max(1);
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold((u32::from(bg) * 3 / 4).max(1) as u16);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = match (PointViews::is_dynamic(parent.0), name.to_str()) {
            (false, Some(n)) => self.tree.lookup(parent.0, n),
            _ => None,
        };
        if let Some(a) = found.and_then(|i| self.attr(INodeNo(i))) {
            return reply.entry(&TTL, &a, fuser::Generation(0));
        }
        let view = name
            .to_str()
            .and_then(|n| self.view_lookup(parent.0, n))
            .and_then(|i| self.view_attr(i));
        match view {
            Some(a) => reply.entry(&VIEW_TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if PointViews::is_dynamic(ino.0) {
            return match self.view_attr(ino.0) {
                Some(a) => reply.attr(&VIEW_TTL, &a),
                None => reply.error(Errno::ENOENT),
            };
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino).or_else(|| self.view_attr(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        if PointViews::is_dynamic(ino.0) && size.is_some() {
            return reply.error(Errno::EROFS);
        }
        if let Some(size) = size {
            if size != attr.size {
                tracing::warn!(
                    "refused: truncate of inode {} to {size} bytes (the disk is {} bytes and \
                     never changes size)",
                    ino.0,
                    attr.size
                );
                return reply.error(Errno::EPERM);
            }
        }
        // Mode, owner and times are not stored: the attributes stay as they are.
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let (true, Some(views)) = (PointViews::is_dynamic(ino.0), &self.views) {
            return match views.open(ino.0, flags.0) {
                // A point never changes: its pages may stay cached.
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(e),
            };
        }
        if let Err(e) = self.volume(ino) {
            return reply.error(e);
        }
        // Per open: an O_DIRECT opener (a VM, fio direct=1) gets FOPEN_DIRECT_IO, which
        // sends its requests to us whole and unserialised; everyone else (a loop
        // device, cp) shares the kernel page cache, kept across opens.
        let direct = self.opts.direct_io || flags.0 & libc::O_DIRECT != 0;
        tracing::debug!("open inode {} flags {:#o} direct {direct}", ino.0, flags.0);
        let mut flags = if direct {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        if self.opts.parallel_direct_writes {
            flags |= FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        reply.opened(FileHandle(0), flags);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _timed = crate::metrics::get().timed("read");
        if let (true, Some(views)) = (PointViews::is_dynamic(ino.0), &self.views) {
            return match views.read(fh.0, offset, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            };
        }
        let vol = match self.volume(ino) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        // Reads past the end return what is there (nothing), like any file.
        let end = (offset + u64::from(size)).min(vol.size());
        let len = end.saturating_sub(offset) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        READ_BUF.with_borrow_mut(|scratch| {
            // Page-aligned (huge-page-aligned): copies between the page cache and a
            // buffer are several times slower when their alignments differ.
            let buf = match DirectBuf::reuse(scratch.take(), len) {
                Ok(b) => scratch.insert(b).as_mut_slice(),
                Err(e) => {
                    tracing::error!("read buffer: {e}");
                    return reply.error(errno(&e));
                }
            };
            // Recorded before the read: whether it continues a run decides its path.
            let (run, fetch) = self.seq_reads.record(ino.0, offset, len as u64);
            let direct = flags.0 & libc::O_DIRECT != 0
                && match self.opts.reads {
                    ReadPath::Cached => false,
                    ReadPath::Sequential => run,
                    ReadPath::Direct => true,
                };
            let read = if direct {
                vol.read_direct(offset, buf)
            } else {
                vol.read(offset, buf)
            };
            match read {
                Ok(()) => {
                    reply.data(buf);
                    // After replying: a sequential reader's next requests find their
                    // data on its way into the page cache, or into read-ahead slots.
                    if let Some((at, n)) = fetch {
                        let _ = if direct {
                            vol.prefetch_direct(at, n)
                        } else {
                            vol.prefetch(at, n)
                        };
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "read {}/{} at {offset}+{len}: {e}",
                        vol.machine(),
                        vol.name()
                    );
                    reply.error(errno(&e))
                }
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let vol = match self.volume(ino) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if data.is_empty() {
            return reply.written(0);
        }
        // Like a block device: a write that starts inside the disk and runs past its
        // end is cut at the end (a short write; the caller's next write gets ENOSPC).
        let inside = vol.size().saturating_sub(offset).min(data.len() as u64) as usize;
        let data = if inside > 0 && inside < data.len() {
            tracing::warn!(
                "short write: {}/{} at {offset}+{} runs past the end of the disk; {inside} bytes written",
                vol.machine(),
                vol.name(),
                data.len()
            );
            data.get(..inside).unwrap_or(data)
        } else {
            data
        };
        match &self.workers {
            Some(tx) => {
                let job = WriteJob {
                    ino: ino.0,
                    vol: vol.clone(),
                    offset,
                    data: data.to_vec(),
                    reply,
                };
                if let Err(crossbeam::channel::SendError(job)) = tx.send(job) {
                    do_write(
                        &self.tree, ino.0, &job.vol, job.offset, &job.data, job.reply,
                    );
                }
            }
            None => do_write(&self.tree, ino.0, &vol, offset, data, reply),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timed = crate::metrics::get().timed("flush");
        if PointViews::is_dynamic(ino.0) {
            return reply.ok();
        }
        self.sync(ino, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let (true, Some(views)) = (PointViews::is_dynamic(ino.0), &self.views) {
            views.release(fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = crate::metrics::get().timed("fsync");
        self.sync(ino, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let vol = match self.volume(ino) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && !keep) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let end = offset.saturating_add(length);
        if end > vol.size() && !keep {
            tracing::warn!(
                "refused: fallocate would grow {}/{} to {end} bytes",
                vol.machine(),
                vol.name()
            );
            return reply.error(Errno::EFBIG);
        }
        if !zero {
            // Plain allocation inside the disk: every block is writable already.
            return reply.ok();
        }
        let end = end.min(vol.size());
        if end <= offset {
            return reply.ok();
        }
        match vol.write_zeroes(offset, end - offset) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if PointViews::is_dynamic(ino.0) {
            // Every byte of a point counts as data.
            let size = self.view_attr(ino.0).map_or(0, |a| a.size);
            return match (u64::try_from(offset), whence) {
                (Ok(o), _) if o >= size => reply.error(Errno::ENXIO),
                (Ok(o), libc::SEEK_DATA) => reply.offset(o as i64),
                (Ok(_), libc::SEEK_HOLE) => reply.offset(size as i64),
                _ => reply.error(Errno::EINVAL),
            };
        }
        let vol = match self.volume(ino) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        if off >= vol.size() {
            return reply.error(Errno::ENXIO);
        }
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match vol.seek(off, data) {
            Ok(Some(at)) => reply.offset(at as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        if PointViews::is_dynamic(ino.0) {
            match self.views.as_ref().and_then(|v| v.children(ino.0)) {
                Some(c) => entries.extend(c),
                None => return reply.error(Errno::ENOTDIR),
            }
        } else {
            let children: Vec<(String, u64, FileType)> = if ino.0 == ROOT {
                self.tree
                    .machines()
                    .into_iter()
                    .map(|(n, i)| (n, i, FileType::Directory))
                    .collect()
            } else {
                match self.tree.node(ino.0) {
                    Some(Node::Dir { children, .. }) => children
                        .into_iter()
                        .map(|(n, i)| (n, i, FileType::RegularFile))
                        .collect(),
                    _ => return reply.error(Errno::ENOTDIR),
                }
            };
            for (name, i, kind) in &children {
                entries.push((*i, *kind, name.clone()));
            }
            if let Some(views) = &self.views {
                if ino.0 == ROOT {
                    // Replicas with no local machine of their name.
                    for m in views.replicas() {
                        if !children.iter().any(|(n, _, _)| *n == m) {
                            let i = views.ino(PNode::MachineDir(m.clone()));
                            entries.push((i, FileType::Directory, m));
                        }
                    }
                } else if let Some(m) = self.tree.machine_of_dir(ino.0) {
                    if views.has_replica(&m) {
                        let i = views.ino(PNode::PointsDir(m));
                        entries.push((i, FileType::Directory, "points".into()));
                    }
                }
            }
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes; ENOSYS tells the kernel to stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        name: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        self.refuse(&format!("create {name:?}"), |e| reply.error(e));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        name: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        self.refuse(&format!("create {name:?}"), |e| reply.error(e));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _p: INodeNo,
        name: &OsStr,
        _m: u32,
        _u: u32,
        reply: ReplyEntry,
    ) {
        self.refuse(&format!("mkdir {name:?}"), |e| reply.error(e));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.refuse(&format!("unlink {name:?}"), |e| reply.error(e));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.refuse(&format!("rmdir {name:?}"), |e| reply.error(e));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        name: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.refuse(&format!("rename {name:?}"), |e| reply.error(e));
    }
}

impl LiveFs {
    /// fsync and close: every write acknowledged so far becomes durable (group commit).
    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        if PointViews::is_dynamic(ino.0) {
            return reply.ok();
        }
        let vol = match self.volume(ino) {
            Ok(v) => v,
            Err(_) => return reply.ok(), // directories: nothing to sync
        };
        match vol.flush() {
            Ok(_) => reply.ok(),
            Err(e) => {
                tracing::error!("fsync {}/{}: {e}", vol.machine(), vol.name());
                reply.error(errno(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_gets_a_readahead_window_refilled_below_three_quarters() {
        const MIB: u64 = 1 << 20;
        let r = SequentialReads::default();
        let ask = |ino, offset, len| r.record(ino, offset, len).1;
        // Whether a read continues a run (it then takes the sequential path).
        assert!(!r.record(5, 0, MIB).0);
        assert!(r.record(5, MIB, MIB).0);
        assert!(r.record(5, 0, MIB).0, "reordered, within 16 requests");
        assert!(!r.record(5, 900 * MIB, MIB).0);
        // Reading a block again never starts a run; a read near but not adjacent to
        // the last one does not either, until one begins where the reader got to.
        assert_eq!(r.record(6, 0, 4096), (false, None));
        assert_eq!(r.record(6, 0, 4096), (false, None));
        assert_eq!(r.record(6, 8192, 4096), (false, None));
        assert_eq!(r.record(6, 12288, 4096), (true, Some((16384, 16 * MIB))));
        // A first read, or one that jumps: nothing to fetch.
        assert_eq!(ask(7, 0, MIB), None);
        assert_eq!(ask(7, 50 * MIB, MIB), None);
        // It goes on where it ended: the window (16 MiB) ahead of it is asked for.
        assert_eq!(ask(7, 51 * MIB, MIB), Some((52 * MIB, 16 * MIB)));
        // While three quarters of the window or more are left, nothing more…
        for k in 52..=55 {
            assert_eq!(ask(7, k * MIB, MIB), None, "read at {k} MiB");
        }
        // …then what makes it whole again, from where the last ask ended.
        assert_eq!(ask(7, 56 * MIB, MIB), Some((68 * MIB, 5 * MIB)));
        // Requests answered out of order (several in flight) continue the run, and
        // what was asked for is not asked for again.
        assert_eq!(ask(7, 58 * MIB, MIB), None);
        assert_eq!(ask(7, 57 * MIB, MIB), None);
        assert_eq!(ask(7, 60 * MIB, MIB), None);
        assert_eq!(ask(7, 61 * MIB, MIB), Some((73 * MIB, 5 * MIB)));
        assert_eq!(ask(7, 59 * MIB, MIB), None);
        // A jump further than 16 requests starts again.
        assert_eq!(ask(7, 100 * MIB, MIB), None);
        assert_eq!(ask(7, 101 * MIB, MIB), Some((102 * MIB, 16 * MIB)));
        // Bigger requests get a bigger window (8 of them), other files their own.
        assert_eq!(ask(9, 0, 4 * MIB), None);
        assert_eq!(ask(9, 4 * MIB, 4 * MIB), Some((8 * MIB, 32 * MIB)));
        // Small random reads far apart are never a run.
        assert_eq!(ask(3, 0, 4096), None);
        assert_eq!(ask(3, 900 * MIB, 4096), None);
        assert_eq!(ask(3, 300 * MIB, 4096), None);
    }
}
