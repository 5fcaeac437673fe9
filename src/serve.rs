//! `replog serve`: run a site in the foreground.
//!
//! Opens every machine (recovering its journal), starts the compactors, mounts the
//! FUSE view if asked, then waits for SIGINT or SIGTERM. On either it flushes every
//! journal, unmounts (lazily if something still holds the mount), closes the machines
//! and returns. After a kill -9 the next `serve` recovers the journals and clears the
//! dead mount point.

use crate::error::{Error, Result};
use crate::frontend::{self, FrontendOptions, LiveFs};
use crate::protection::status::{MachineStatus, SiteStatus, STATUS_FILE};
use crate::replication::receiver::Target;
use crate::replication::relationship::Relationship;
use crate::replication::run::ShipLoop;
use crate::replication::transport;
use crate::site::Site;
use crate::volume::Machine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            mount: None,
            listen: None,
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
    let mut machines: Vec<Arc<Machine>> = Vec::new();
    // Protected machines get a watermark hold before their compactor starts, so that
    // nothing the target lacks is merged before the shipping loop takes over.
    let mut early_holds = Vec::new();
    for name in site.machines()? {
        let m = site.open_machine(&name)?;
        if Relationship::load(site_path, &name)?.is_some() {
            early_holds.push(m.hold_watermark(m.status().watermark.lsn));
        }
        m.start_compactor(policy);
        let s = m.status();
        tracing::info!(machine = %name, disks = ?m.disk_names(), last_lsn = s.last_lsn, "machine open");
        machines.push(Arc::new(m));
    }
    let replicas = crate::replica::store::Replicas::local(site_path)?;
    let interval =
        std::time::Duration::from_millis(site.config().replica.compact_interval_ms.max(10));
    let replica_loops = Arc::new(parking_lot::Mutex::new(Vec::new()));
    for m in replicas.machines()? {
        replica_loops
            .lock()
            .push(crate::replica::maintain::ReplicaLoop::spawn(
                replicas.clone(),
                m,
                interval,
            ));
    }
    if let Some(addr) = &opts.listen {
        let me = crate::identity::Identity::load(site_path)?.id();
        let loops = replica_loops.clone();
        let r = replicas.clone();
        let target = Arc::new(Target::new(me, replicas.clone()).on_new_replica(move |m| {
            loops
                .lock()
                .push(crate::replica::maintain::ReplicaLoop::spawn(
                    r.clone(),
                    m.to_string(),
                    interval,
                ));
        }));
        let bound = transport::listen(site_path, addr, move |mut stream, peer| {
            target.session(&mut stream, peer)
        })?;
        tracing::info!("receiving replicas on {bound} (site ID {me})");
    }
    let background = Background::start(site_path, &machines, site.config().replication.clone());
    drop(early_holds); // the shipping loops hold the watermark now
    let session = match &opts.mount {
        Some(dir) => {
            frontend::prepare_mountpoint(dir)?;
            let fs = LiveFs::new(&machines, opts.frontend, Some(replicas.clone()))?;
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
    // Started last, once nothing above can fail: they stop with the rest below.
    let control = match crate::control::ControlServer::start(site_path, machines.clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("no control socket ({e}); `replog checkpoint` cannot reach this serve");
            None
        }
    };

    tracing::info!("serving {}; SIGINT or SIGTERM stops", site_path.display());
    ready();
    let sig = wait_for_stop_signal(&signals);
    tracing::info!("signal {sig}: flushing and stopping");

    // Compactors first: once a shipping loop stops, its hold is gone, and nothing the
    // target has not acknowledged may be merged.
    for m in &machines {
        m.stop_compactor();
    }
    background.stop();
    drop(control);
    for l in std::mem::take(&mut *replica_loops.lock()) {
        l.stop();
    }
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
        let Ok(m) = Arc::try_unwrap(m) else {
            tracing::error!(machine = %name, "still in use at stop; its journal was flushed");
            continue;
        };
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

/// What `serve` runs besides the mount: a shipping loop per protected machine (picked
/// up within a second of `replog protect`), and the status file.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn start(
        site: &Path,
        machines: &[Arc<Machine>],
        cfg: crate::config::ReplicationConfig,
    ) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let (site, machines, stop2) = (site.to_path_buf(), machines.to_vec(), stop.clone());
        // The machines protected now start shipping before this returns.
        let mut loops: HashMap<String, ShipLoop> = HashMap::new();
        start_new_loops(&site, &machines, &cfg, &mut loops);
        let thread = std::thread::Builder::new()
            .name("serve-background".into())
            .spawn(move || {
                let mut pending_since: HashMap<String, std::time::Instant> = HashMap::new();
                while !stop2.load(Ordering::Acquire) {
                    start_new_loops(&site, &machines, &cfg, &mut loops);
                    write_status(&site, &machines, &loops, &mut pending_since);
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                for (_, l) in loops {
                    l.stop();
                }
                write_status(&site, &machines, &HashMap::new(), &mut pending_since);
            })
            .ok();
        Background { stop, thread }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start a shipping loop for every machine that has a relationship and no loop yet
/// (`replog protect` may add one while serve runs).
fn start_new_loops(
    site: &Path,
    machines: &[Arc<Machine>],
    cfg: &crate::config::ReplicationConfig,
    loops: &mut HashMap<String, ShipLoop>,
) {
    for m in machines {
        if loops.contains_key(m.name()) {
            continue;
        }
        match Relationship::load(site, m.name()) {
            Ok(Some(rel)) => {
                tracing::info!(machine = m.name(), "protecting toward {}", rel.target);
                let l = ShipLoop::spawn(site.to_path_buf(), m.clone(), rel, cfg.clone());
                loops.insert(m.name().to_string(), l);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(machine = m.name(), "relationship: {e}"),
        }
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
            relationship: rel.as_ref(),
            resync: resync.as_ref(),
            ship,
            lag_seconds: lag,
            serve_running: true,
        }),
    )
}

fn write_status(
    site: &Path,
    machines: &[Arc<Machine>],
    loops: &HashMap<String, ShipLoop>,
    pending_since: &mut HashMap<String, std::time::Instant>,
) {
    let as_of_ns = crate::format::now_ns();
    let mut out = Vec::new();
    for m in machines {
        let ship = loops.get(m.name()).map(|l| l.status.lock().clone());
        // Lag: how long the target has been behind (since the first write it lacks).
        let lag = ship.as_ref().map(|l| {
            if l.acked_lsn >= m.status().last_lsn {
                pending_since.remove(m.name());
                0.0
            } else {
                let since = *pending_since
                    .entry(m.name().to_string())
                    .or_insert_with(std::time::Instant::now);
                since.elapsed().as_secs_f64()
            }
        });
        out.push(machine_status(site, m, ship.as_ref(), lag));
    }
    if let Ok(replicas) = crate::replica::store::Replicas::local(site) {
        out.extend(crate::protection::status::replicas_status(&replicas));
    }
    let id = crate::identity::Identity::load(site)
        .map(|i| i.id().to_string())
        .unwrap_or_default();
    let doc = SiteStatus {
        site: id,
        machines: out,
        as_of_ns,
    };
    let Ok(text) = serde_json::to_string(&doc) else {
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
