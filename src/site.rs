//! A site directory: config, lock, machines.
//!
//! ```text
//! SITE/
//!   site.toml                       settings (see config.rs)
//!   identity/cert.pem, key.pem      the site's certificate and key (see identity.rs)
//!   trusted-peers                   IDs of the sites this one trusts
//!   lock                            held (flock) by the process that owns the site;
//!                                   holds "pid <pid> <command>" for error messages
//!   machines/<machine>/machine.meta manifest: machine id, disks
//!   machines/<machine>/disks/<disk>.img      parent images (sparse raw)
//!   machines/<machine>/journal/<seq>.seg     change journal segments
//!   machines/<machine>/journal/watermark     merge watermark
//! ```
//!
//! The lock and the config use the file system directly (they administer the site);
//! everything under `machines/` goes through [`Storage`].

use crate::config::SiteConfig;
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::storage::{FileStorage, Storage, StorageFile};
use crate::volume::Machine;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CONFIG_FILE: &str = "site.toml";
pub const LOCK_FILE: &str = "lock";
pub const MACHINES_DIR: &str = "machines";

/// An open, locked site.
#[derive(Debug)]
pub struct Site {
    path: PathBuf,
    config: SiteConfig,
    storage: Arc<dyn Storage>,
    _lock: File,
}

/// True if `path` looks like a site directory.
pub fn is_site(path: &Path) -> bool {
    path.join(CONFIG_FILE).is_file()
}

impl Site {
    /// Create a new site at `path` (which must not exist or be an empty directory).
    pub fn init(path: &Path) -> Result<()> {
        Self::init_with(path, SiteConfig::default())
    }

    /// Create a new site with `cfg` as its settings. A replica store in an object
    /// store is checked first (reachable, credentials good, create-if-absent
    /// honoured): nothing is created if it fails.
    pub fn init_with(path: &Path, cfg: SiteConfig) -> Result<()> {
        if let Some((key, why)) = cfg.problems().into_iter().next() {
            return Err(Error::InvalidInput(format!("{key}: {why}")));
        }
        if !cfg.replica.store.is_empty() {
            crate::replica::objects::probe(
                &crate::replica::store::object_store(&cfg.replica)?,
                cfg.replica.s3.unfenced,
            )?;
        }
        if path.exists() {
            let empty = fs::read_dir(path)
                .map_err(|e| Error::io("read", path, e))?
                .next()
                .is_none();
            if !empty || !path.is_dir() {
                return Err(Error::AlreadyExists(format!(
                    "{} exists and is not an empty directory",
                    path.display()
                )));
            }
        }
        fs::create_dir_all(path.join(MACHINES_DIR)).map_err(|e| Error::io("create", path, e))?;
        // The identity first: site.toml is what makes the directory a site, so it goes
        // in last and a site never exists without its identity.
        crate::identity::Identity::create(path)?;
        crate::storage::write_atomic(
            &FileStorage,
            &path.join(CONFIG_FILE),
            cfg.to_toml().as_bytes(),
        )
    }

    /// Open and lock a site; fails with a message naming the holder if another process
    /// has it.
    pub fn open(path: &Path) -> Result<Site> {
        Self::open_with(path, Arc::new(FileStorage))
    }

    pub fn open_with(path: &Path, storage: Arc<dyn Storage>) -> Result<Site> {
        let config = Self::read_config(path)?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Locked(format!(
                    "site {} is in use by {}; stop it first",
                    path.display(),
                    if holder.is_empty() {
                        "another process"
                    } else {
                        holder
                    }
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path, e)),
        }
        let me = format!(
            "pid {} ({})\n",
            std::process::id(),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        let _ = lock.set_len(0);
        let _ = lock.seek(SeekFrom::Start(0));
        let _ = lock.write_all(me.as_bytes());
        Ok(Site {
            path: path.to_path_buf(),
            config,
            storage,
            _lock: lock,
        })
    }

    pub fn read_config(path: &Path) -> Result<SiteConfig> {
        let cfg_path = path.join(CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::NotFound(format!(
                "{} is not a replog site (no {CONFIG_FILE}); create one with `replog init`",
                path.display()
            )));
        }
        let text = fs::read_to_string(&cfg_path).map_err(|e| Error::io("read", &cfg_path, e))?;
        SiteConfig::from_toml(&cfg_path, &text)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key that encrypts this site's replicas at rest (created on first use).
    pub fn replica_key(&self) -> Result<crate::replica::crypt::ReplicaKey> {
        replica_key_at(&self.path)
    }

    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    pub fn storage(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    pub fn machine_dir(&self, machine: &str) -> Result<PathBuf> {
        validate_name("machine", machine)?;
        Ok(self.path.join(MACHINES_DIR).join(machine))
    }

    /// Names of the site's machines.
    pub fn machines(&self) -> Result<Vec<String>> {
        list_machines_on(self.storage.as_ref(), &self.path)
    }

    /// Remove the machine directories without a manifest (a machine creation,
    /// promotion or test copy that died before its commit point); the names removed.
    /// Only a manifest known to be absent counts (not one that cannot be looked at).
    /// A starting serve calls this before it opens anything.
    pub fn remove_interrupted_creations(&self) -> Result<Vec<String>> {
        let dir = self.path.join(MACHINES_DIR);
        let removed = crate::storage::remove_uncommitted_dirs(
            self.storage.as_ref(),
            &dir,
            crate::volume::MANIFEST_FILE,
        )?;
        for name in &removed {
            tracing::warn!(
                "removed {}: a machine creation, promotion or test copy that died before \
                 its manifest was written",
                dir.join(name).display()
            );
        }
        Ok(removed)
    }

    /// The replicas this site keeps: in its object store if `[replica] store` names
    /// one, else in `SITE/replicas/` on the site's storage; with the site's replica
    /// key.
    pub fn replicas(&self) -> Result<crate::replica::store::Replicas> {
        crate::replica::store::Replicas::local_on(self.storage.clone(), &self.path)
    }

    /// Create disk `machine/disk` (and the machine, if new) of `size` bytes, optionally
    /// importing a raw image whose all-zero 4 KiB blocks stay holes.
    pub fn create_disk(
        &self,
        machine: &str,
        disk: &str,
        size: u64,
        import: Option<&Path>,
    ) -> Result<()> {
        validate_name("disk", disk)?;
        crate::names::validate_disk_size(size)?;
        let dir = self.machine_dir(machine)?;
        let mut src = match import {
            Some(p) => {
                let f = File::open(p).map_err(|e| Error::io("open", p, e))?;
                let meta = f.metadata().map_err(|e| Error::io("stat", p, e))?;
                if !meta.is_file() {
                    return Err(Error::InvalidInput(format!(
                        "{} is not a regular file; import a raw image file (copy a \
                         device or pipe to a file first)",
                        p.display()
                    )));
                }
                let len = meta.len();
                if len > size {
                    return Err(Error::InvalidInput(format!(
                        "{} is {len} bytes, larger than the disk ({size} bytes)",
                        p.display()
                    )));
                }
                Some((f, p.to_path_buf()))
            }
            None => None,
        };
        let new_machine = !self.storage.exists(&dir.join(crate::volume::MANIFEST_FILE));
        if new_machine {
            Machine::create(self.storage.as_ref(), &dir)?;
        }
        let result = match src.as_mut() {
            Some((f, p)) => {
                let mut copy = |dst: &dyn StorageFile| import_sparse(f, p, dst);
                Machine::add_disk(self.storage.as_ref(), &dir, disk, size, Some(&mut copy))
            }
            None => Machine::add_disk(self.storage.as_ref(), &dir, disk, size, None),
        };
        if result.is_err() && new_machine {
            let _ = self.storage.remove_tree(&dir);
        }
        result
    }

    /// Open a machine of this site.
    pub fn open_machine(&self, machine: &str) -> Result<Machine> {
        let dir = self.machine_dir(machine)?;
        if !self.storage.exists(&dir.join(crate::volume::MANIFEST_FILE)) {
            return Err(Error::NotFound(format!(
                "site {} has no machine {machine}",
                self.path.display()
            )));
        }
        let manifest = Machine::read_manifest(self.storage.as_ref(), &dir)?;
        let bases = match &manifest.base {
            Some(base) => Some(self.base_parents(&dir, &manifest, base)?),
            None => None,
        };
        let m = Machine::open_on(
            self.storage.clone(),
            &dir,
            machine,
            self.config.journal,
            bases,
        )?;
        // A protected machine changed behind replog's back: record that a resync is
        // required now (closing rewrites the stamp, and the change would be forgotten).
        if let Some(why) = m.changed_offline() {
            if self
                .storage
                .exists(&dir.join(crate::replication::relationship::FILE))
            {
                crate::replication::resync_schedule::SourceResync::require(
                    &self.path, machine, &why,
                )?;
            }
        }
        // A protected machine's points carry digests, whoever appends them.
        if self
            .storage
            .exists(&dir.join(crate::replication::relationship::FILE))
        {
            if let Err(e) = m.keep_digests() {
                // Its points then carry no digests (restores say so); the machine and
                // the site stay usable.
                tracing::error!(machine, "cannot keep digests: {e}");
            }
        }
        Ok(m)
    }
}

impl Site {
    /// The parents of a machine that stands on a replica point: that point opened
    /// (and pinned) once, one read-only parent per disk.
    fn base_parents(
        &self,
        dir: &Path,
        manifest: &crate::format::meta::Manifest,
        base: &crate::protection::Base,
    ) -> Result<Vec<Arc<dyn crate::storage::StorageFile>>> {
        let store = self.replicas()?.open_readonly(&base.replica)?;
        let image = Arc::new(crate::replica::replay::PointImage::open_exact(
            store, base.lsn,
        )?);
        if image.point().lsn != base.lsn {
            return Err(Error::InvalidInput(format!(
                "replica {} no longer offers the point at LSN {} that machine {} stands on",
                base.replica,
                base.lsn,
                dir.display()
            )));
        }
        let mut parents: Vec<Arc<dyn crate::storage::StorageFile>> = Vec::new();
        for d in &manifest.disks {
            let size = image
                .disks()
                .iter()
                .find(|r| r.id == d.id && r.size == d.size)
                .map(|r| r.size)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "replica {} has no disk {} of {} bytes",
                        base.replica, d.name, d.size
                    ))
                })?;
            parents.push(Arc::new(crate::volume::PointParent::new(
                dir.join(crate::volume::DISKS_DIR)
                    .join(format!("{}.img", d.name)),
                image.clone(),
                d.id,
                size,
            )));
        }
        Ok(parents)
    }
}

/// The replica key of the site at `path`, wherever its config places it (no lock
/// needed: restores read replicas while `serve` runs).
pub fn replica_key_at(path: &Path) -> Result<crate::replica::crypt::ReplicaKey> {
    crate::replica::crypt::ReplicaKey::load_or_create(&replica_key_path(path)?)
}

/// Where the replica key of the site at `path` is (`[replica] key_file`, or
/// `SITE/identity/replica.key`).
pub fn replica_key_path(path: &Path) -> Result<PathBuf> {
    let config = Site::read_config(path)?;
    let configured = &config.replica.key_file;
    Ok(if configured.is_empty() {
        path.join(crate::identity::IDENTITY_DIR).join("replica.key")
    } else {
        PathBuf::from(configured)
    })
}

/// Refuse a secret file — a private key (the site's TLS key, the replica key), S3
/// credentials — that anyone but its owner may read or write: `serve` does not start
/// on one. `holds` says what it holds ("a private key"). A missing file is not
/// refused here.
pub fn check_private(file: &Path, holds: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", file, e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InvalidInput(format!(
            "{} holds {holds} and is open to group or others (mode {mode:o}): \
             `chmod 600 {}`, and consider it exposed",
            file.display(),
            file.display()
        )));
    }
    Ok(())
}

/// Machine names under a site directory (no lock needed: a read-only listing).
pub fn list_machines(site: &Path) -> Result<Vec<String>> {
    list_machines_on(&FileStorage, site)
}

/// Machine names under the site directory `site` kept on `storage`.
fn list_machines_on(storage: &dyn Storage, site: &Path) -> Result<Vec<String>> {
    let dir = site.join(MACHINES_DIR);
    if !storage.exists(&dir) {
        return Err(Error::io(
            "list",
            &dir,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut out = Vec::new();
    for name in storage.list_dirs(&dir)? {
        if validate_name("machine", &name).is_err() {
            continue;
        }
        // A directory without a manifest is a creation (or a promotion) that died
        // before its commit point: not a machine.
        let manifest = dir.join(&name).join(crate::volume::MANIFEST_FILE);
        if !storage.exists(&manifest) {
            tracing::warn!(
                "{}: no {}; not a machine (an interrupted creation)",
                dir.join(&name).display(),
                crate::volume::MANIFEST_FILE
            );
            continue;
        }
        out.push(name);
    }
    Ok(out)
}

/// Copy the data regions of `src` into `dst`, skipping holes (SEEK_DATA/SEEK_HOLE)
/// and all-zero 4 KiB blocks, so holes stay holes.
fn import_sparse(src: &mut File, path: &Path, dst: &dyn StorageFile) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    const BLOCK: usize = 4096;
    let len = src
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let fd = src.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on an open descriptor with integer arguments only.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return Err(Error::io("seek data in", path, err));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { len } else { hole as u64 });
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or(&mut []);
            src.read_exact_at(chunk, at)
                .map_err(|e| Error::io("read", path, e))?;
            for (i, block) in chunk.chunks(BLOCK).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    dst.write_at(&[block], at + (i * BLOCK) as u64)?;
                }
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}
