//! `replog serve`: run a site in the foreground.
//!
//! Opens every machine (recovering its journal), starts the compactors, mounts the
//! FUSE view if asked, then waits for SIGINT or SIGTERM. On either it flushes every
//! journal, unmounts (lazily if something still holds the mount), closes the machines
//! and returns. After a kill -9 the next `serve` recovers the journals and clears the
//! dead mount point.

use crate::error::{Error, Result};
use crate::frontend::{self, FrontendOptions, LiveFs};
use crate::site::Site;
use crate::volume::Machine;
use std::path::{Path, PathBuf};

/// How long a stop waits for the kernel to release a detached mount.
const UNMOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mount: Option<PathBuf>,
    /// FUSE session threads (each with its own /dev/fuse descriptor).
    pub fuse_threads: usize,
    pub frontend: FrontendOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            mount: None,
            fuse_threads: 4,
            frontend: FrontendOptions::default(),
        }
    }
}

/// Block SIGINT and SIGTERM in this thread (and every thread it starts later), so that
/// [`wait_for_stop_signal`] can take them synchronously.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_stop_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Run the site until SIGINT/SIGTERM. `ready` is called once everything is up.
pub fn serve(site_path: &Path, opts: &ServeOptions, ready: impl FnOnce()) -> Result<()> {
    let signals = block_stop_signals();
    let site = Site::open(site_path)?;
    let policy = site.config().journal.compact_policy();
    let mut machines: Vec<Machine> = Vec::new();
    for name in site.machines()? {
        let mut m = site.open_machine(&name)?;
        m.start_compactor(policy);
        let s = m.status();
        tracing::info!(machine = %name, disks = ?m.disk_names(), last_lsn = s.last_lsn, "machine open");
        machines.push(m);
    }
    let session = match &opts.mount {
        Some(dir) => {
            frontend::prepare_mountpoint(dir)?;
            let fs = LiveFs::new(&machines, opts.frontend)?;
            let mut cfg = fuser::Config::default();
            cfg.mount_options = vec![
                fuser::MountOption::FSName(format!("replog:{}", site_path.display())),
                fuser::MountOption::Subtype("replog".into()),
                fuser::MountOption::NoAtime,
                fuser::MountOption::NoDev,
                fuser::MountOption::NoSuid,
            ];
            cfg.acl = fuser::SessionACL::All;
            cfg.n_threads = Some(opts.fuse_threads.max(1));
            cfg.clone_fd = opts.fuse_threads > 1;
            let s = fuser::spawn_mount(fs, dir, &cfg)
                .map_err(|e| Error::io("mount FUSE at", dir, e))?;
            tracing::info!("mounted {} ({} machine(s))", dir.display(), machines.len());
            Some((s, dir.clone()))
        }
        None => None,
    };
    tracing::info!("serving {}; SIGINT or SIGTERM stops", site_path.display());
    ready();
    let sig = wait_for_stop_signal(&signals);
    tracing::info!("signal {sig}: flushing and stopping");

    let mut first_err = None;
    for m in &machines {
        if let Err(e) = m.flush() {
            tracing::error!(machine = m.name(), "flush on stop: {e}");
            first_err.get_or_insert(e);
        }
    }
    if let Some((s, dir)) = session {
        // A plain unmount fails while a loop device or a process holds the mount; the
        // journals are flushed already, so detach lazily then.
        if let Err(e) = frontend::detach(&dir) {
            tracing::error!("unmount {}: {e}", dir.display());
        }
        // The session ends when the kernel lets go of the mount. Something may still
        // hold it (a loop device): then stop waiting; the journals are flushed, and
        // when this process exits the kernel aborts the connection (its users get
        // errors, as they would from a disk that went away).
        let (done_tx, done_rx) = crossbeam::channel::bounded(1);
        std::thread::spawn(move || {
            let _ = done_tx.send(s.join());
        });
        match done_rx.recv_timeout(UNMOUNT_WAIT) {
            Ok(_) => tracing::info!("unmounted {}", dir.display()),
            Err(_) => tracing::warn!(
                "{} is still in use (a loop device or an open file?); detached it and \
                 stopping anyway: its users will see I/O errors",
                dir.display()
            ),
        }
    }
    for m in machines {
        let name = m.name().to_string();
        if let Err(e) = m.close() {
            tracing::error!(machine = %name, "close: {e}");
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
