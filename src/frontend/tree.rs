//! The live part of the mount: `<machine>/<disk>.img` for every open machine,
//! changing while the mount runs. `serve`'s registry adds a machine's directory when
//! it opens the machine and removes it when it closes it; the kernel's caches of the
//! entries (names, attributes, directory listings) are invalidated through the
//! session's notifier, so a new machine appears at once and a removed one vanishes.
//!
//! Inode numbers are never reused within a mount for another file (a file handle or
//! cached entry of a removed machine can never reach a new one); a machine reopened
//! after a change (a disk added) keeps its numbers, so its open files go on working.
//! They stay below the point views' numbers (`points.rs`, from 2^40).

use crate::error::Result;
use crate::volume::{Machine, Volume};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;

pub(crate) const ROOT: u64 = 1;

#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// A machine's directory: disk file name → inode.
    Dir {
        machine: String,
        children: BTreeMap<String, u64>,
    },
    Disk {
        vol: Volume,
    },
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<u64, Node>,
    /// Machine name → its directory's inode.
    root: BTreeMap<String, u64>,
    next: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Tree {
    inner: RwLock<Inner>,
    notifier: Mutex<Option<fuser::Notifier>>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            inner: RwLock::new(Inner {
                nodes: HashMap::new(),
                root: BTreeMap::new(),
                next: ROOT + 1,
            }),
            notifier: Mutex::new(None),
        }
    }
}

impl Tree {
    /// The mounted session's notifier: from now on changes reach the kernel's caches.
    pub fn set_notifier(&self, n: fuser::Notifier) {
        *self.notifier.lock() = Some(n);
    }

    /// Show `m` as `<machine>/<disk>.img`, replacing what showed under its name: a
    /// machine reopened (a disk added) keeps its directory's and its disks' inode
    /// numbers, so files open on them go on working.
    pub fn add_machine(&self, m: &Machine) -> Result<()> {
        let mut disks = Vec::new();
        for d in m.disk_names() {
            disks.push((format!("{d}.img"), m.volume(&d)?));
        }
        let mut old = self.take(m.name());
        {
            let mut t = self.inner.write();
            let dir = match &old {
                Some((dir, _)) => *dir,
                None => {
                    t.next += 1;
                    t.next - 1
                }
            };
            let mut children = BTreeMap::new();
            for (name, vol) in disks {
                let kept = old.as_mut().and_then(|(_, kids)| {
                    let i = kids.iter().position(|(n, _)| *n == name)?;
                    Some(kids.swap_remove(i).1)
                });
                let ino = match kept {
                    Some(ino) => ino,
                    None => {
                        t.next += 1;
                        t.next - 1
                    }
                };
                t.nodes.insert(ino, Node::Disk { vol });
                children.insert(name, ino);
            }
            t.nodes.insert(
                dir,
                Node::Dir {
                    machine: m.name().to_string(),
                    children,
                },
            );
            t.root.insert(m.name().to_string(), dir);
        }
        self.forget(m.name(), old);
        Ok(())
    }

    /// Stop showing machine `name` (a no-op if it is not shown).
    pub fn remove_machine(&self, name: &str) {
        let old = self.take(name);
        self.forget(name, old);
    }

    /// Take machine `name`'s nodes out of the tree: (its directory, its disks).
    fn take(&self, name: &str) -> Option<(u64, Vec<(String, u64)>)> {
        let mut t = self.inner.write();
        let dir = t.root.remove(name)?;
        let children = match t.nodes.remove(&dir) {
            Some(Node::Dir { children, .. }) => children.into_iter().collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        for (_, ino) in &children {
            t.nodes.remove(ino);
        }
        Some((dir, children))
    }

    /// Tell the kernel that `name` changed under the root (and that the nodes it had
    /// are gone). Errors (an entry the kernel never cached) mean nothing was stale.
    fn forget(&self, name: &str, old: Option<(u64, Vec<(String, u64)>)>) {
        let guard = self.notifier.lock();
        let Some(n) = guard.as_ref() else {
            return;
        };
        if let Some((dir, children)) = &old {
            for (child, ino) in children {
                let _ = n.inval_entry(fuser::INodeNo(*dir), OsStr::new(child));
                let _ = n.inval_inode(fuser::INodeNo(*ino), 0, 0);
            }
            let _ = n.inval_inode(fuser::INodeNo(*dir), 0, 0);
        }
        self.entry_changed(n, name);
    }

    fn entry_changed(&self, n: &fuser::Notifier, name: &str) {
        let _ = n.inval_entry(fuser::INodeNo(ROOT), OsStr::new(name));
        let _ = n.inval_inode(fuser::INodeNo(ROOT), 0, 0);
    }

    /// Something else appeared or vanished under the root (a replica's points).
    pub fn root_entry_changed(&self, name: &str) {
        if let Some(n) = self.notifier.lock().as_ref() {
            self.entry_changed(n, name);
        }
    }

    pub(crate) fn node(&self, ino: u64) -> Option<Node> {
        if ino == ROOT {
            return None;
        }
        self.inner.read().nodes.get(&ino).cloned()
    }

    /// Machine directories under the root: (name, inode).
    pub(crate) fn machines(&self) -> Vec<(String, u64)> {
        self.inner
            .read()
            .root
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect()
    }

    pub(crate) fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let t = self.inner.read();
        if parent == ROOT {
            return t.root.get(name).copied();
        }
        match t.nodes.get(&parent)? {
            Node::Dir { children, .. } => children.get(name).copied(),
            Node::Disk { .. } => None,
        }
    }

    /// The machine a directory inode stands for.
    pub(crate) fn machine_of_dir(&self, ino: u64) -> Option<String> {
        match self.inner.read().nodes.get(&ino)? {
            Node::Dir { machine, .. } => Some(machine.clone()),
            Node::Disk { .. } => None,
        }
    }
}
