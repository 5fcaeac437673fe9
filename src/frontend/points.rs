//! Read-only views of the recovery points of the replicas a target site holds:
//! `MOUNT/<machine>/points/<point>/<disk>.img`.
//!
//! Directories are listed from the replica's point indexes (cached for a second;
//! points appear and expire as the replica lives). Opening a disk file opens the point
//! through the replay engine (`replica::replay`) — index reads only, so the time does
//! not grow with the disk's size — and pins it, so the target compactor leaves it
//! alone while any file of that point is open. Every file is read-only: writes,
//! truncation and allocation fail with EROFS.
//!
//! Inodes of these entries are allocated on first sight, from 2^40 up, and stay the
//! same for the life of the mount.

use crate::replica::points::ReplicaPoint;
use crate::replica::replay::PointImage;
use crate::replica::store::{ReplicaManifest, ReplicaStore, Replicas};
use fuser::{Errno, FileType};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

/// First inode number of point entries.
pub(crate) const DYN_BASE: u64 = 1 << 40;
/// How long a listing of a replica's points is reused.
const LIST_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PNode {
    /// `<machine>/` of a replica with no local machine of that name.
    MachineDir(String),
    /// `<machine>/points/`.
    PointsDir(String),
    /// `<machine>/points/pt-<lsn>/`.
    PointDir(String, u64),
    /// `<machine>/points/pt-<lsn>/<disk>.img`.
    PointDisk(String, u64, u32),
}

#[derive(Default)]
struct Table {
    by_node: HashMap<PNode, u64>,
    by_ino: HashMap<u64, PNode>,
}

/// What `stat` of an entry shows.
pub(crate) struct Entry {
    pub ino: u64,
    pub kind: FileType,
    pub size: u64,
    pub time: SystemTime,
}

type Listing = (Instant, Arc<Vec<ReplicaPoint>>);

pub(crate) struct PointViews {
    replicas: Replicas,
    table: Mutex<Table>,
    handles: Mutex<HashMap<u64, (Arc<PointImage>, u32)>>,
    images: Mutex<HashMap<(String, u64), Weak<PointImage>>>,
    lists: Mutex<HashMap<String, Listing>>,
    next_fh: AtomicU64,
}

impl std::fmt::Debug for PointViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PointViews({:?})", self.replicas.backend())
    }
}

fn errno(e: &crate::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl PointViews {
    pub fn new(replicas: Replicas) -> Self {
        PointViews {
            replicas,
            table: Mutex::new(Table::default()),
            handles: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            lists: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    pub fn is_dynamic(ino: u64) -> bool {
        ino >= DYN_BASE
    }

    /// The machines this site holds replicas of.
    pub fn replicas(&self) -> Vec<String> {
        self.replicas.machines().unwrap_or_default()
    }

    pub fn has_replica(&self, machine: &str) -> bool {
        self.replicas.has(machine)
    }

    pub fn ino(&self, node: PNode) -> u64 {
        let mut t = self.table.lock();
        if let Some(i) = t.by_node.get(&node) {
            return *i;
        }
        let ino = DYN_BASE + t.by_ino.len() as u64;
        t.by_ino.insert(ino, node.clone());
        t.by_node.insert(node, ino);
        ino
    }

    fn node(&self, ino: u64) -> Option<PNode> {
        self.table.lock().by_ino.get(&ino).cloned()
    }

    fn store(&self, machine: &str) -> crate::Result<ReplicaStore> {
        self.replicas.open_readonly(machine)
    }

    fn manifest(&self, machine: &str) -> Option<ReplicaManifest> {
        self.store(machine).ok().map(|s| s.manifest().clone())
    }

    /// The points kept now (cached for a second).
    fn points(&self, machine: &str) -> Arc<Vec<ReplicaPoint>> {
        let mut lists = self.lists.lock();
        if let Some((at, l)) = lists.get(machine) {
            if at.elapsed() < LIST_TTL {
                return l.clone();
            }
        }
        let l = Arc::new(
            self.store(machine)
                .and_then(|s| crate::replica::points::list(&s))
                .unwrap_or_else(|e| {
                    tracing::error!(machine, "listing points: {e}");
                    Vec::new()
                }),
        );
        lists.insert(machine.to_string(), (Instant::now(), l.clone()));
        l
    }

    fn point(&self, machine: &str, lsn: u64) -> Option<ReplicaPoint> {
        self.points(machine).iter().find(|p| p.lsn == lsn).cloned()
    }

    pub fn entry(&self, ino: u64) -> Option<Entry> {
        let node = self.node(ino)?;
        let now = SystemTime::now();
        let at = |ns: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
        Some(match node {
            PNode::MachineDir(_) | PNode::PointsDir(_) => Entry {
                ino,
                kind: FileType::Directory,
                size: 0,
                time: now,
            },
            PNode::PointDir(m, lsn) => Entry {
                ino,
                kind: FileType::Directory,
                size: 0,
                time: self.point(&m, lsn).map_or(now, |p| at(p.time_ns)),
            },
            PNode::PointDisk(m, lsn, d) => Entry {
                ino,
                kind: FileType::RegularFile,
                size: self.manifest(&m)?.disks.get(d as usize)?.size,
                time: self.point(&m, lsn).map_or(now, |p| at(p.time_ns)),
            },
        })
    }

    /// The entries of a directory of ours.
    pub fn children(&self, ino: u64) -> Option<Vec<(u64, FileType, String)>> {
        Some(match self.node(ino)? {
            PNode::MachineDir(m) => vec![(
                self.ino(PNode::PointsDir(m)),
                FileType::Directory,
                "points".to_string(),
            )],
            PNode::PointsDir(m) => self
                .points(&m)
                .iter()
                .map(|p| {
                    (
                        self.ino(PNode::PointDir(m.clone(), p.lsn)),
                        FileType::Directory,
                        p.id(),
                    )
                })
                .collect(),
            PNode::PointDir(m, lsn) => self
                .manifest(&m)?
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        self.ino(PNode::PointDisk(m.clone(), lsn, i as u32)),
                        FileType::RegularFile,
                        format!("{}.img", d.name),
                    )
                })
                .collect(),
            PNode::PointDisk(..) => return None,
        })
    }

    /// Look `name` up in a directory of ours.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match self.node(parent)? {
            PNode::MachineDir(m) => (name == "points").then(|| self.ino(PNode::PointsDir(m))),
            PNode::PointsDir(m) => {
                let lsn: u64 = name.strip_prefix("pt-")?.parse().ok()?;
                self.point(&m, lsn)?;
                Some(self.ino(PNode::PointDir(m, lsn)))
            }
            PNode::PointDir(m, lsn) => {
                let disk = name.strip_suffix(".img")?;
                let i = self
                    .manifest(&m)?
                    .disks
                    .iter()
                    .position(|d| d.name == disk)?;
                Some(self.ino(PNode::PointDisk(m, lsn, i as u32)))
            }
            PNode::PointDisk(..) => None,
        }
    }

    /// Open a point's disk file: read-only, the point opened and pinned once for all
    /// its open files.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let Some(PNode::PointDisk(m, lsn, disk)) = self.node(ino) else {
            return Err(Errno::EISDIR);
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(Errno::EROFS);
        }
        let key = (m.clone(), lsn);
        let image = {
            let mut images = self.images.lock();
            match images.get(&key).and_then(Weak::upgrade) {
                Some(i) => i,
                None => {
                    let started = Instant::now();
                    let image = self
                        .store(&m)
                        .and_then(|s| PointImage::open(s, &format!("pt-{lsn}")))
                        .map_err(|e| {
                            tracing::error!(machine = %m, "open point pt-{lsn}: {e}");
                            errno(&e)
                        })?;
                    tracing::info!(
                        machine = %m,
                        "opened point pt-{lsn} in {:?}",
                        started.elapsed()
                    );
                    let image = Arc::new(image);
                    images.insert(key, Arc::downgrade(&image));
                    image
                }
            }
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, (image, disk));
        Ok(fh)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let Some((image, disk)) = self.handles.lock().get(&fh).cloned() else {
            return Err(Errno::EBADF);
        };
        let disk_size = image
            .disks()
            .get(disk as usize)
            .map(|d| d.size)
            .ok_or(Errno::EIO)?;
        let end = offset.saturating_add(u64::from(size)).min(disk_size);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        if !buf.is_empty() {
            image.read(disk, offset, &mut buf).map_err(|e| {
                tracing::error!("read of point {}: {e}", image.point().id());
                errno(&e)
            })?;
        }
        Ok(buf)
    }

    /// The file is closed: the point is unpinned when its last file closes.
    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }
}
