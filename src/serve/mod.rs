//! `replog serve`: run a site in the foreground.
//!
//! Opens every machine (recovering its journal) into the live [`Registry`], which
//! starts each one's compactor and shipping loop and each replica's maintenance loop;
//! receives replicas (`--listen`), mounts the FUSE view (`--mount`), answers commands
//! on the control socket, keeps `status.json`; then waits for SIGINT or SIGTERM. On
//! either it flushes every journal, unmounts (lazily if something still holds the
//! mount), stops the loops and closes the machines, and returns. After a kill -9 the
//! next `serve` recovers the journals and clears the dead mount point.

use crate::error::{Error, Result};
use crate::frontend::{self, FrontendOptions, LiveFs};
use crate::protection::status::{MachineStatus, SiteStatus, STATUS_FILE};
use crate::replication::receiver::Target;
use crate::replication::relationship::Relationship;
use crate::replication::transport;
use crate::site::Site;
use crate::volume::Machine;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod name_locks;
mod registry;
pub use registry::Registry;

/// How long a stop waits for the kernel to release a detached mount.
const UNMOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mount: Option<PathBuf>,
    /// Receive replicas from trusted sites on this address (host:port).
    pub listen: Option<String>,
    /// FUSE session threads (each with its own /dev/fuse descriptor).
    pub fuse_threads: usize,
    pub frontend: FrontendOptions,
    /// Serve Prometheus metrics at http://ADDR/metrics (see `crate::metrics`).
    pub metrics: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            mount: None,
            listen: None,
            fuse_threads: 4,
            frontend: FrontendOptions::default(),
            metrics: None,
        }
    }
}

/// Tell the service manager (systemd, `Type=notify`) how serve is: one datagram to
/// `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); nothing when it is
/// not set. What systemd does with it is its business: failures are only logged.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(
            "notify the service manager ({}): {e}",
            path.to_string_lossy()
        );
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
    crate::site::check_private(
        &site_path
            .join(crate::identity::IDENTITY_DIR)
            .join(crate::identity::KEY_FILE),
        "a private key",
    )?;
    crate::site::check_private(&crate::site::replica_key_path(site_path)?, "a private key")?;
    crate::identity::finish_rotation(site_path)?;
    site.remove_interrupted_creations()?;
    let registry = Registry::new(site)?;
    for w in registry.identity().warnings(site_path) {
        tracing::warn!("{w}");
    }
    // Jobs a serve that died left behind: the resumable ones are taken over by the
    // loops that go on with them; the others end as interrupted.
    // A plan's run is resumed by `replog plan resume` from its state file; a
    // plan-kind job without one (a commit, a cleanup, a run that died before its
    // state was first saved) is not.
    let plan_run = |j: &crate::jobs::Job| {
        j.kind == crate::jobs::JobKind::Plan && crate::plan::run::is_run(site_path, &j.id)
    };
    match crate::jobs::reap(site_path, plan_run) {
        Ok(0) => {}
        Ok(n) => tracing::warn!("{n} job(s) of a process that stopped ended as interrupted"),
        Err(e) => tracing::warn!("jobs: {e}"),
    }
    registry.start()?;
    if let Some(addr) = &opts.metrics {
        let weak = Arc::downgrade(&registry);
        let bound = crate::metrics::serve(addr, move || weak.upgrade().map(|r| r.status()))?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    if let Some(addr) = &opts.listen {
        let me = crate::identity::Identity::load(site_path)?.id();
        let weak = Arc::downgrade(&registry);
        let target = Arc::new(
            Target::new(me, registry.replicas().clone())
                .at_site(site_path)
                .with_failovers(registry.failovers())
                .on_promote({
                    let weak = Arc::downgrade(&registry);
                    move |m, lsn, generation| match weak.upgrade() {
                        Some(r) => r.planned_promote(m, lsn, generation),
                        None => Err(crate::Error::Busy("serve is stopping".into())),
                    }
                })
                .on_reprotect({
                    let weak = Arc::downgrade(&registry);
                    move |req| match weak.upgrade() {
                        Some(r) => r.reprotect_answer(req),
                        None => Err(crate::Error::Busy("serve is stopping".into())),
                    }
                })
                .on_new_replica(move |m| {
                    if let Some(r) = weak.upgrade() {
                        r.add_replica(m);
                    }
                }),
        );
        registry.set_target(&target);
        let bound = transport::listen(site_path, addr, move |mut stream, peer| {
            target.session_tls(&mut stream, peer)
        })?;
        tracing::info!("receiving replicas on {bound} (site ID {me})");
    }
    let status = StatusWriter::start(registry.clone());
    let session = match &opts.mount {
        Some(dir) => {
            frontend::prepare_mountpoint(dir)?;
            registry.set_mount(&std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()));
            let fs = LiveFs::new(
                registry.tree(),
                opts.frontend,
                Some(
                    frontend::points::PointViews::new(registry.replicas().clone())
                        .with_orphans(site_path),
                ),
            )?;
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
            registry.tree().set_notifier(s.notifier());
            tracing::info!(
                "mounted {} ({} machine(s))",
                dir.display(),
                registry.names().len()
            );
            Some((s, dir.clone()))
        }
        None => None,
    };
    // Started last, once nothing above can fail: it stops first below.
    let handler: Arc<dyn crate::control::Handler> = registry.clone();
    let control = match crate::control::ControlServer::start(site_path, handler) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("no control socket ({e}); commands cannot reach this serve");
            None
        }
    };

    tracing::info!("serving {}; SIGINT or SIGTERM stops", site_path.display());
    sd_notify(&format!("READY=1\nSTATUS=serving {}", site_path.display()));
    ready();
    let sig = wait_for_stop_signal(&signals);
    tracing::info!("signal {sig}: flushing and stopping");
    sd_notify("STOPPING=1\nSTATUS=flushing and stopping");

    drop(control);
    status.stop();
    let mut first_err = registry.flush_all().err();
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
    // Compactors first, then the loops (their holds go), then close.
    if let Err(e) = registry.stop() {
        first_err.get_or_insert(e);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The status of one machine of a running serve as `replog status` reports it.
pub fn machine_status(
    site: &Path,
    m: &Machine,
    ship: Option<&crate::replication::run::LoopStatus>,
    lag: Option<f64>,
) -> MachineStatus {
    use crate::protection::status::{derive, Facts, PrimaryFacts};
    let journal = m.status();
    let rel = Relationship::load(site, m.name()).ok().flatten();
    let resync = crate::replication::resync_schedule::SourceResync::load(site, m.name())
        .ok()
        .flatten();
    derive(
        m.name(),
        &Facts::Primary(PrimaryFacts {
            role: m.role(),
            generation: m.generation(),
            journal: &journal,
            fenced: m.fenced(),
            failed_over: m.failed_over(),
            fence: m.fence_record().map(Box::new),
            relationship: rel.as_ref(),
            resync: resync.as_ref(),
            ship,
            lag_seconds: lag,
            serve_running: true,
            base: m.base(),
            pending: m.pending(),
        }),
    )
}

/// Writes the site's status to `SITE/status.json` four times a second (what `replog
/// status` reads while serve holds the site).
struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusWriter {
    /// Written once before this returns (so that the mount, started after it, never
    /// shows a site whose `replog status` has nothing to read), then by a thread.
    fn start(registry: Arc<Registry>) -> StatusWriter {
        registry.publish_status();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_millis(250));
                        registry.publish_status();
                    }
                })
                .ok()
        };
        StatusWriter { stop, thread }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn write_status(site: &Path, doc: &SiteStatus) {
    let Ok(text) = serde_json::to_string(doc) else {
        return;
    };
    if let Err(e) = crate::storage::write_replace(
        &crate::storage::FileStorage,
        &site.join(STATUS_FILE),
        text.as_bytes(),
    ) {
        tracing::warn!("status: {e}");
    }
}
