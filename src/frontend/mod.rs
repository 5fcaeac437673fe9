//! The FUSE front end: every disk of the site's machines as
//! `MOUNT/<machine>/<disk>.img`, a fixed-size raw image that a VM, a loop device or fio
//! reads and writes. Every write goes into the machine's change journal. On a site
//! that holds replicas, every recovery point they keep is there too, read-only:
//! `MOUNT/<machine>/points/<point>/<disk>.img` (see `points.rs`).
//!
//! Kernel options and their measured effect are documented in `docs/FUSE.md`.

mod live;
pub(crate) mod points;
mod tree;

pub use live::{FrontendOptions, LiveFs};
pub use tree::Tree;

use crate::error::{Error, Result};
use std::path::Path;

/// Prepare a mount point: create it if missing; detect a dead mount left behind by a
/// killed `serve` (stat fails with ENOTCONN, or the kernel still lists a replog mount
/// there) and detach it, saying so.
pub fn prepare_mountpoint(dir: &Path) -> Result<()> {
    // statfs always reaches the FUSE daemon (stat may be answered from the kernel's
    // attribute cache even on a dead connection).
    let probe = statfs(dir).and_then(|()| std::fs::metadata(dir));
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(
                "{} is a dead FUSE mount left by a replog serve that did not stop cleanly; \
                 detaching it",
                dir.display()
            );
            detach(dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create mount point", dir, e))?;
        }
        Err(e) => return Err(Error::io("stat mount point", dir, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::InvalidInput(format!(
                "mount point {} is not a directory",
                dir.display()
            )))
        }
        Ok(_) => {
            if is_replog_mount(dir) {
                return Err(Error::AlreadyExists(format!(
                    "{} is already a live replog mount (another serve?); stop it first",
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// `statfs(2)`: Ok if the file system at `dir` answers.
pub fn statfs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statfs fills a zeroed plain-data struct from a valid C path.
    let rc = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True if `dir` is a replog mount whose daemon answers.
pub fn is_live_replog_mount(dir: &Path) -> bool {
    is_replog_mount(dir) && statfs(dir).is_ok()
}

/// True if the kernel lists a replog FUSE mount at `dir`.
pub fn is_replog_mount(dir: &Path) -> bool {
    let Ok(canon) = dir
        .canonicalize()
        .or_else(|_| Ok::<_, ()>(dir.to_path_buf()))
    else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // mountinfo: id parent dev root MOUNTPOINT opts ... - FSTYPE SOURCE superopts
        let sep = f.iter().position(|x| *x == "-");
        let fstype = sep.and_then(|i| f.get(i + 1)).copied().unwrap_or("");
        let source = sep.and_then(|i| f.get(i + 2)).copied().unwrap_or("");
        f.get(4).map(|p| Path::new(p) == canon).unwrap_or(false)
            && fstype.starts_with("fuse")
            && source.starts_with("replog:")
    })
}

/// Lazily unmount `dir` (MNT_DETACH): works even while files on it are open.
pub fn detach(dir: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        Error::InvalidInput(format!("mount point {} has a NUL byte", dir.display()))
    })?;
    // SAFETY: umount2 with a valid NUL-terminated path and integer flags.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::io("unmount", dir, e));
        }
    }
    Ok(())
}
