//! Read-only views of the recovery points of the replicas a target site holds:
//! `MOUNT/<machine>/points/<point>/<disk>.img` — and of the orphan points a reprotect
//! kept there (`<machine>/points/orphan-…/<disk>.img`: the old primary's own disks as
//! it left them, read through its fenced journal and parents).
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

use crate::failover::reprotect;
use crate::replica::points::ReplicaPoint;
use crate::replica::replay::PointImage;
use crate::replica::store::{ReplicaManifest, ReplicaStore, Replicas};
use crate::replication::protocol::OrphanReport;
use fuser::{Errno, FileType};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    /// `<machine>/points/orphan-…/`.
    OrphanDir(String, String),
    /// `<machine>/points/orphan-…/<disk>.img`.
    OrphanDisk(String, String, u32),
}

/// What an open file reads.
#[derive(Clone)]
enum Source {
    Point(Arc<PointImage>, u32),
    /// An orphan point's machine (fenced: only read) and the disk's name.
    Orphan(Arc<crate::volume::Machine>, String),
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
type OrphanListing = (Instant, Arc<Vec<OrphanReport>>);

pub(crate) struct PointViews {
    replicas: Replicas,
    table: Mutex<Table>,
    /// The site, whose orphan points are shown too.
    site: Option<PathBuf>,
    handles: Mutex<HashMap<u64, Source>>,
    images: Mutex<HashMap<(String, u64), Weak<PointImage>>>,
    orphan_machines: Mutex<HashMap<(String, String), Weak<crate::volume::Machine>>>,
    lists: Mutex<HashMap<String, Listing>>,
    orphan_lists: Mutex<HashMap<String, OrphanListing>>,
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
            site: None,
            table: Mutex::new(Table::default()),
            handles: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            orphan_machines: Mutex::new(HashMap::new()),
            lists: Mutex::new(HashMap::new()),
            orphan_lists: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// Show the orphan points the site at `site` keeps, beside the replicas' points.
    pub fn with_orphans(mut self, site: &Path) -> Self {
        self.site = Some(site.to_path_buf());
        self
    }

    pub fn is_dynamic(ino: u64) -> bool {
        ino >= DYN_BASE
    }

    /// The machines this site holds replicas or orphan points of.
    pub fn replicas(&self) -> Vec<String> {
        let mut out = self.replicas.machines().unwrap_or_default();
        if let Some(site) = &self.site {
            let dir = site.join(reprotect::ORPHANS_DIR);
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let m = e.file_name().to_string_lossy().into_owned();
                if !out.contains(&m) && !self.orphans(&m).is_empty() {
                    out.push(m);
                }
            }
        }
        out
    }

    /// `machine` has points to show: a replica's, or orphan points.
    pub fn has_replica(&self, machine: &str) -> bool {
        self.replicas.has(machine) || !self.orphans(machine).is_empty()
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
        if !self.replicas.has(machine) {
            return Arc::new(Vec::new());
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

    /// The orphan points of `machine` (cached for a second).
    fn orphans(&self, machine: &str) -> Arc<Vec<OrphanReport>> {
        let Some(site) = self
            .site
            .as_ref()
            .filter(|_| crate::names::validate_name("machine", machine).is_ok())
        else {
            return Arc::new(Vec::new());
        };
        let mut lists = self.orphan_lists.lock();
        if let Some((at, l)) = lists.get(machine) {
            if at.elapsed() < LIST_TTL {
                return l.clone();
            }
        }
        let l = Arc::new(reprotect::orphans(site, machine).unwrap_or_else(|e| {
            tracing::error!(machine, "listing orphan points: {e}");
            Vec::new()
        }));
        lists.insert(machine.to_string(), (Instant::now(), l.clone()));
        l
    }

    fn orphan(&self, machine: &str, id: &str) -> Option<OrphanReport> {
        self.orphans(machine).iter().find(|o| o.id == id).cloned()
    }

    /// The disks (name, size) of an orphan point, from its manifest.
    fn orphan_disks(&self, machine: &str, id: &str) -> Option<Vec<(String, u64)>> {
        let dir = reprotect::orphan_dir(self.site.as_ref()?, machine, id).ok()?;
        let man = crate::volume::Machine::read_manifest(&crate::storage::FileStorage, &dir).ok()?;
        Some(man.disks.into_iter().map(|d| (d.name, d.size)).collect())
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
            PNode::OrphanDir(m, id) => Entry {
                ino,
                kind: FileType::Directory,
                size: 0,
                time: at(self.orphan(&m, &id)?.last_ns),
            },
            PNode::OrphanDisk(m, id, d) => Entry {
                ino,
                kind: FileType::RegularFile,
                size: self.orphan_disks(&m, &id)?.get(d as usize)?.1,
                time: at(self.orphan(&m, &id)?.last_ns),
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
            PNode::PointsDir(m) => {
                let mut out: Vec<_> = self
                    .points(&m)
                    .iter()
                    .map(|p| {
                        (
                            self.ino(PNode::PointDir(m.clone(), p.lsn)),
                            FileType::Directory,
                            p.id(),
                        )
                    })
                    .collect();
                out.extend(self.orphans(&m).iter().map(|o| {
                    (
                        self.ino(PNode::OrphanDir(m.clone(), o.id.clone())),
                        FileType::Directory,
                        o.id.clone(),
                    )
                }));
                out
            }
            PNode::OrphanDir(m, id) => self
                .orphan_disks(&m, &id)?
                .iter()
                .enumerate()
                .map(|(i, (name, _))| {
                    (
                        self.ino(PNode::OrphanDisk(m.clone(), id.clone(), i as u32)),
                        FileType::RegularFile,
                        format!("{name}.img"),
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
            PNode::PointDisk(..) | PNode::OrphanDisk(..) => return None,
        })
    }

    /// Look `name` up in a directory of ours.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        match self.node(parent)? {
            PNode::MachineDir(m) => (name == "points").then(|| self.ino(PNode::PointsDir(m))),
            PNode::PointsDir(m) if name.starts_with("orphan-") => {
                self.orphan(&m, name)?;
                Some(self.ino(PNode::OrphanDir(m, name.to_string())))
            }
            PNode::OrphanDir(m, id) => {
                let disk = name.strip_suffix(".img")?;
                let i = self
                    .orphan_disks(&m, &id)?
                    .iter()
                    .position(|(n, _)| n == disk)?;
                Some(self.ino(PNode::OrphanDisk(m, id, i as u32)))
            }
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
            PNode::PointDisk(..) | PNode::OrphanDisk(..) => None,
        }
    }

    /// Open a point's disk file: read-only, the point opened and pinned once for all
    /// its open files.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let node = self.node(ino);
        if matches!(node, Some(PNode::PointDisk(..) | PNode::OrphanDisk(..)))
            && flags & libc::O_ACCMODE != libc::O_RDONLY
        {
            return Err(Errno::EROFS);
        }
        let source = match node {
            Some(PNode::PointDisk(m, lsn, disk)) => Source::Point(self.open_point(&m, lsn)?, disk),
            Some(PNode::OrphanDisk(m, id, disk)) => {
                let name = self
                    .orphan_disks(&m, &id)
                    .and_then(|d| d.get(disk as usize).map(|d| d.0.clone()))
                    .ok_or(Errno::ENOENT)?;
                Source::Orphan(self.open_orphan(&m, &id)?, name)
            }
            _ => return Err(Errno::EISDIR),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, source);
        Ok(fh)
    }

    /// An orphan point's machine, opened once for all its open files.
    fn open_orphan(&self, m: &str, id: &str) -> Result<Arc<crate::volume::Machine>, Errno> {
        let site = self.site.as_ref().ok_or(Errno::ENOENT)?;
        let key = (m.to_string(), id.to_string());
        let mut open = self.orphan_machines.lock();
        if let Some(o) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(o);
        }
        let machine = reprotect::open_orphan(site, m, id).map_err(|e| {
            tracing::error!(machine = %m, "open orphan point {id}: {e}");
            errno(&e)
        })?;
        let machine = Arc::new(machine);
        open.insert(key, Arc::downgrade(&machine));
        Ok(machine)
    }

    /// A replica point's image, opened (and pinned) once for all its open files.
    fn open_point(&self, m: &str, lsn: u64) -> Result<Arc<PointImage>, Errno> {
        let key = (m.to_string(), lsn);
        let image = {
            let mut images = self.images.lock();
            match images.get(&key).and_then(Weak::upgrade) {
                Some(i) => i,
                None => {
                    let started = Instant::now();
                    let image = self
                        .store(m)
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
        Ok(image)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let source = self.handles.lock().get(&fh).cloned();
        let (image, disk) = match source {
            None => return Err(Errno::EBADF),
            Some(Source::Point(image, disk)) => (image, disk),
            Some(Source::Orphan(machine, disk)) => {
                return read_orphan(&machine, &disk, offset, size)
            }
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

/// `size` bytes at `offset` of an orphan point's disk (short at its end).
fn read_orphan(
    machine: &crate::volume::Machine,
    disk: &str,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    let vol = machine.volume(disk).map_err(|e| errno(&e))?;
    let end = offset.saturating_add(u64::from(size)).min(vol.size());
    let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
    if !buf.is_empty() {
        vol.read(offset, &mut buf).map_err(|e| {
            tracing::error!(machine = %machine.name(), "read of orphan point disk {disk}: {e}");
            errno(&e)
        })?;
    }
    Ok(buf)
}
