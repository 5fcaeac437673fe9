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

pub use live::{FrontendOptions, LiveFs, ReadPath};
pub use tree::Tree;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    replog_mounts().contains(&canon)
}

/// Every replog FUSE mount the kernel lists for this process, from
/// `/proc/self/mountinfo` (empty if it cannot be read).
pub fn replog_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse_replog_mounts(&info))
        .unwrap_or_default()
}

/// The replog mount points in `mountinfo` text: lines `id parent dev root MOUNTPOINT
/// opts ... - FSTYPE SOURCE superopts`, with FSTYPE `fuse*` and SOURCE `replog:*`. The
/// kernel writes a space, tab, newline or backslash in a path as an octal escape
/// (`\040`), undone here.
fn parse_replog_mounts(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // At least six fields (through the mount options) before the separator.
            let sep = f.iter().position(|x| *x == "-").filter(|i| *i >= 6)?;
            let fstype = f.get(sep + 1)?;
            let source = f.get(sep + 2)?;
            (fstype.starts_with("fuse") && source.starts_with("replog:"))
                .then(|| f.get(4).map(|p| unescape_mount_path(p)))
                .flatten()
        })
        .collect()
}

/// Undo the kernel's octal escapes (`\ooo`) in a path from `/proc/*/mountinfo`.
fn unescape_mount_path(text: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let code = b
            .get(i + 1..i + 4)
            .filter(|d| c == b'\\' && d.iter().all(|x| (b'0'..=b'7').contains(x)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Detach (lazily) every replog mount under `dir`, as left by a serve that was
/// killed; errors are ignored (best effort, for clean-ups).
pub fn detach_replog_mounts_under(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for m in replog_mounts() {
        if m.starts_with(&dir) {
            let _ = detach(&m);
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped_and_only_replog_fuse_mounts_listed() {
        let info = "\
36 25 0:32 / /srv/my\\040vms/mnt rw,nosuid - fuse replog:site rw,user_id=0
37 25 0:33 / /srv/tab\\011and\\134back rw - fuse.replog replog:other rw
38 25 0:34 / /srv/plain rw - fuse sshfs:host rw
39 25 8:1 / /srv/ext4 rw shared:1 - ext4 /dev/vda1 rw
40 25 0:35 / /srv/odd\\9x\\0 rw - fuse replog:x rw
41 25 0:36 / /srv/short
1 2 3:4 - fuse replog:x rw
";
        assert_eq!(
            parse_replog_mounts(info),
            vec![
                PathBuf::from("/srv/my vms/mnt"),
                PathBuf::from("/srv/tab\tand\\back"),
                PathBuf::from("/srv/odd\\9x\\0"),
            ]
        );
    }
}
