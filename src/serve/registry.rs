//! The live registry of a running `serve`: every machine it holds open (primaries,
//! test copies) with its loops, and every replica with its maintenance loop. Machines
//! come and go while serve runs — created, removed, protected, reloaded after their
//! role changed — and each one's loops start and stop with it; the mount's tree
//! (`frontend::Tree`) follows, so a machine appears or vanishes under the mount at
//! once.
//!
//! Order, for each machine (the rules the journal's safety rests on):
//! - opening a protected machine: watermark hold first, then the compactor, then the
//!   shipping loop (whose shipper holds from then on), then the early hold goes — so
//!   nothing the target lacks is ever merged;
//! - closing one: compactor first, then the shipping loop (its hold goes with it),
//!   then flush and close.
//!
//! Every command that changes a running site arrives here ([`Handler`]), through the
//! control socket.

use super::name_locks::NameLocks;
use crate::config::SiteConfig;
use crate::control::{Handler, Reply, Request};
use crate::error::{Error, Result};
use crate::frontend::Tree;
use crate::protection::status::{MachineStatus, SiteStatus};
use crate::protection::FailoverKind;
use crate::replica::maintain::ReplicaLoop;
use crate::replica::store::Replicas;
use crate::replication::receiver::Failovers;
use crate::replication::relationship::Relationship;
use crate::replication::run::{ShipHandle, ShipLoop};
use crate::site::Site;
use crate::volume::Machine;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// One open machine and its shipping loop.
struct Entry {
    machine: Arc<Machine>,
    ship: Option<ShipLoop>,
}

/// See the module documentation.
pub struct Registry {
    site: Site,
    config: SiteConfig,
    replicas: Replicas,
    tree: Arc<Tree>,
    machines: Mutex<BTreeMap<String, Entry>>,
    replica_loops: Mutex<BTreeMap<String, ReplicaLoop>>,
    /// Each machine's newest LSN as the status writer saw it, tick by tick (for its
    /// lag; see [`LsnClock`]).
    lsn_seen: Mutex<HashMap<String, LsnClock>>,
    /// Replicas' status, recomputed every few seconds (it reads their marks).
    replica_status: Mutex<(Option<Instant>, Vec<MachineStatus>)>,
    /// Changes to a machine are made one at a time (per name: changes to other
    /// machines go on beside them).
    changing: NameLocks,
    /// Machines closed to open again at once (a failover changed them): status
    /// shows them as they last were meanwhile.
    reloading: Mutex<std::collections::BTreeSet<String>>,
    /// The machines' status as last worked out.
    last_status: Mutex<Vec<MachineStatus>>,
    /// The site's ID and certificate end, read at start.
    identity: crate::protection::status::IdentityFacts,
    /// The directory the disks are mounted under (`serve --mount`).
    mount: Mutex<Option<std::path::PathBuf>>,
    /// Promotions under way and shutdown requests, shared with the receiver.
    failovers: Arc<Failovers>,
    /// This registry, for what its loops call back (a target's shutdown request).
    me: Weak<Registry>,
    /// `status.json` is worked out and written by one at a time (a snapshot taken
    /// before a change never replaces one taken after it).
    publishing: Mutex<()>,
    /// The receiver (`serve --listen`): requests that change a replica take its lock
    /// on the replica's store.
    target: Mutex<Weak<crate::replication::receiver::Target>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.site.path().display())
    }
}

/// How often serve tries again to load the replicas of a store it could not reach.
const REPLICA_LOAD_RETRY: Duration = Duration::from_secs(3);
/// How long `replog pause` waits for the shipping pass in progress to end before it
/// answers that the loop pauses when it does.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// An object store that did not answer (as opposed to one that refused).
fn store_unreachable(e: &Error) -> bool {
    matches!(
        e,
        Error::Store {
            transient: true,
            ..
        }
    )
}

/// How often a replica's status is worked out again.
const REPLICA_STATUS_EVERY: Duration = Duration::from_secs(2);

impl Registry {
    /// The registry of `site` (owned, locked): nothing open yet; see [`Registry::start`].
    pub fn new(site: Site) -> Result<Arc<Registry>> {
        let replicas = Replicas::local(site.path())?;
        let site_path = &site.path().to_path_buf();
        Ok(Arc::new_cyclic(|me| Registry {
            failovers: Arc::default(),
            me: me.clone(),
            publishing: Mutex::new(()),
            target: Mutex::new(Weak::new()),
            config: site.config().clone(),
            site,
            replicas,
            tree: Arc::new(Tree::default()),
            machines: Mutex::new(BTreeMap::new()),
            replica_loops: Mutex::new(BTreeMap::new()),
            lsn_seen: Mutex::new(HashMap::new()),
            replica_status: Mutex::new((None, Vec::new())),
            changing: NameLocks::default(),
            mount: Mutex::new(None),
            reloading: Mutex::default(),
            last_status: Mutex::default(),
            identity: crate::protection::status::IdentityFacts::load(site_path),
        }))
    }

    /// The site's ID and when its certificate ends, as read at start.
    pub fn identity(&self) -> &crate::protection::status::IdentityFacts {
        &self.identity
    }

    /// The disks are mounted under `dir` (what `replog plan` hands its actions as
    /// REPLOG_MOUNT, and checks the failed-over machines' disks under).
    pub fn set_mount(&self, dir: &Path) {
        *self.mount.lock() = Some(dir.to_path_buf());
    }

    /// Run `f` again (a few times) while it finds a machine closed: a failover closed
    /// and reopened it meanwhile, and the next lookup finds the new instance.
    fn retry_closed<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        let mut tries = 0;
        loop {
            match f() {
                Err(Error::Closed { .. }) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// The failover state the receiver shares (see [`Failovers`]).
    pub fn failovers(&self) -> Arc<Failovers> {
        self.failovers.clone()
    }

    /// Open every machine of the site and start every replica's loop.
    ///
    /// A replica store in an object store that cannot be reached does not stop
    /// serve: its machines open, and the replicas are taken up once the store
    /// answers (tried every few seconds; senders are refused as unavailable
    /// meanwhile and retry). A store that refuses for good (credentials, bucket)
    /// stops it, saying why.
    pub fn start(&self) -> Result<()> {
        let reconciled = crate::failover::reconcile(&self.site, &self.replicas);
        if let Err(e) = &reconciled {
            if !store_unreachable(e) {
                return reconciled.map(|_| ());
            }
        }
        for name in self.site.machines()? {
            self.open(&name)?;
        }
        match reconciled.and_then(|_| self.add_replicas()) {
            Err(e) if store_unreachable(&e) => {
                tracing::warn!("replicas not loaded, the store is unreachable: {e}; trying again");
                let me = self.me.clone();
                std::thread::Builder::new()
                    .name("replicas-load".into())
                    .spawn(move || loop {
                        std::thread::sleep(REPLICA_LOAD_RETRY);
                        let Some(r) = me.upgrade() else { return };
                        let loaded = crate::failover::reconcile(&r.site, &r.replicas)
                            .and_then(|_| r.add_replicas());
                        match loaded {
                            Ok(()) => {
                                tracing::info!("replica store reachable: replicas loaded");
                                return;
                            }
                            Err(e) if store_unreachable(&e) => {
                                tracing::warn!("replica store still unreachable: {e}")
                            }
                            Err(e) => {
                                tracing::error!("replicas not loaded: {e}");
                                return;
                            }
                        }
                    })
                    .map_err(|e| Error::io("spawn", self.path(), e))?;
                Ok(())
            }
            other => other,
        }
    }

    fn add_replicas(&self) -> Result<()> {
        for name in self.replicas.machines()? {
            self.add_replica(&name);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.site.path()
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// The receiver serve runs (`--listen`), once started.
    pub fn set_target(&self, target: &Arc<crate::replication::receiver::Target>) {
        *self.target.lock() = Arc::downgrade(target);
    }

    /// `accept-loss`: under the receiver's lock on the replica's store when serve
    /// receives (no session writes it meanwhile), else on a store of its own.
    fn accept_loss(&self, machine: &str) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        let site = self.path();
        let target = self.target.lock().upgrade();
        let done = match target {
            Some(t) => t.with_store(machine, |store| {
                crate::replica::resync_apply::accept_loss(site, store)
            })?,
            None => crate::replica::resync_apply::accept_loss(
                site,
                &self.replicas.open_readonly(machine)?,
            )?,
        };
        Ok(Reply::accepted(done))
    }

    /// The tree the mount shows (shared with the file system).
    pub fn tree(&self) -> Arc<Tree> {
        self.tree.clone()
    }

    /// Names of the open machines.
    pub fn names(&self) -> Vec<String> {
        self.machines.lock().keys().cloned().collect()
    }

    pub fn machine(&self, name: &str) -> Option<Arc<Machine>> {
        self.machines.lock().get(name).map(|e| e.machine.clone())
    }

    /// Open machine `name` and start its loops (see the module documentation for
    /// the order); show it under the mount.
    fn open(&self, name: &str) -> Result<()> {
        let opened = self.open_entry(name);
        // A machine closed to be reopened leaves the mount if it does not open again.
        if self.reloading.lock().remove(name) && opened.is_err() {
            self.tree.remove_machine(name);
        }
        opened
    }

    fn open_entry(&self, name: &str) -> Result<()> {
        let m = Arc::new(self.site.open_machine(name)?);
        let rel = Relationship::load(self.path(), name)?;
        // A failed-over machine ships nothing and merges nothing: what its target
        // never acknowledged stays in the journal (the old tail, kept for reprotect).
        let failed_over = m.failed_over();
        let early = rel
            .as_ref()
            .map(|_| m.hold_watermark(m.status().watermark.lsn));
        if !failed_over {
            m.start_compactor(self.config.journal.compact_policy());
        }
        let ship = rel
            .filter(|_| !failed_over)
            .map(|rel| self.new_ship_loop(&m, rel));
        drop(early); // the shipping loop holds the watermark now
        self.tree.add_machine(&m)?;
        tracing::info!(
            machine = name,
            disks = ?m.disk_names(),
            role = %m.role(),
            generation = m.generation(),
            last_lsn = m.status().last_lsn,
            "machine open"
        );
        self.machines
            .lock()
            .insert(name.to_string(), Entry { machine: m, ship });
        Ok(())
    }

    /// A shipping loop of its own: paused if the relationship says so (an operator's
    /// `replog pause` before this serve started).
    fn new_ship_loop(&self, m: &Arc<Machine>, rel: Relationship) -> ShipLoop {
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(rel.paused));
        self.ship_loop(m, rel, paused)
    }

    fn ship_loop(
        &self,
        m: &Arc<Machine>,
        rel: Relationship,
        paused: crate::replication::run::PauseFlag,
    ) -> ShipLoop {
        tracing::info!(machine = m.name(), "protecting toward {}", rel.target);
        ShipLoop::spawn(
            self.path().to_path_buf(),
            m.clone(),
            rel,
            self.config.replication.clone(),
            Some(self.on_failover_request()),
            paused,
        )
    }

    /// What a shipping loop calls when its target asks for a shutdown: a planned
    /// failover, on a thread of its own (it drives the loop that called).
    fn on_failover_request(&self) -> crate::replication::run::FailoverRequestFn {
        let me = self.me.clone();
        Arc::new(move |machine: &str| {
            let (me, machine) = (me.clone(), machine.to_string());
            let thread_name = format!("failover-{machine}");
            let spawned = std::thread::Builder::new()
                .name(thread_name.clone())
                .spawn(move || {
                    let Some(r) = me.upgrade() else { return };
                    let note = "the target asked for it (replog failover --shutdown-source)";
                    match r.planned_failover(&machine, Some(note), &Default::default()) {
                        Ok(reply) => tracing::info!(
                            machine = %machine,
                            "{}",
                            reply.detail.unwrap_or_default()
                        ),
                        Err(e) => tracing::warn!(machine = %machine, "{e}"),
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("start {thread_name}: {e}");
            }
        })
    }

    /// `replog failover SITE MACHINE --planned` here, the primary.
    fn planned_failover(
        &self,
        machine: &str,
        note: Option<&str>,
        spec: &crate::jobs::JobSpec,
    ) -> Result<Reply> {
        if self.machine(machine).is_none() && self.replicas.has(machine) {
            return Err(Error::InvalidInput(format!(
                "{machine} is a replica at this site: a planned failover runs at its primary"
            )));
        }
        let handle = self.with_ship(machine, |h| Ok(h.clone()))?;
        let ship = crate::failover::planned::LoopShipping(handle);
        let _one = self.changing.lock(&[machine]);
        crate::failover::planned::run_as(&Host(self), &ship, machine, note, spec)
    }

    /// `--shutdown-source`: ask the primary, at its next contact, to shut down (a
    /// planned failover it carries out), and wait up to `secs` for the promotion.
    /// Ok(Some): the primary did, and the machine is promoted with nothing lost;
    /// Ok(None, why): it did not in time — promote unplanned, and say `why`.
    fn shutdown_source(
        &self,
        machine: &str,
        secs: u64,
    ) -> Result<std::result::Result<Reply, String>> {
        crate::names::validate_name("machine", machine)?;
        if !self.replicas.has(machine) {
            return Err(Error::NotFound(format!(
                "this site holds no replica of {machine}"
            )));
        }
        let promoted = || -> Result<Option<crate::replica::store::Promotion>> {
            self.replicas.open_readonly(machine)?.promotion()
        };
        if let Some(p) = promoted()? {
            return Err(Error::InvalidInput(format!(
                "{machine} was already failed over ({}, at LSN {})",
                p.kind, p.lsn
            )));
        }
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        self.failovers.request_shutdown(machine);
        tracing::info!(
            machine,
            "asking the primary to shut down for a failover ({secs} s)"
        );
        let done = loop {
            match promoted() {
                // Promoted and open (the planned promotion opens before it answers).
                Ok(Some(p)) if self.machine(machine).is_some() => break Some(p),
                Ok(_) => {}
                Err(e) => tracing::warn!(machine, "{e}"),
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let told = self.failovers.withdraw_shutdown(machine);
        if let Some(p) = done {
            if p.kind != crate::protection::FailoverKind::Planned {
                // Another failover (an operator's unplanned one) promoted it meanwhile.
                return Err(Error::InvalidInput(format!(
                    "{machine} was failed over meanwhile by a {} failover (at LSN {}, \
                     generation {}); the primary's tail was not asked for",
                    p.kind, p.lsn, p.generation
                )));
            }
            return Ok(Ok(Reply {
                ok: true,
                lsn: Some(p.lsn),
                detail: Some(format!(
                    "the primary was reached in {:.1} s: it fenced its writes, shipped \
                     everything and had {machine} promoted here at LSN {} (generation {}): \
                     nothing lost; commit pending (`replog commit`)",
                    started.elapsed().as_secs_f64(),
                    p.lsn,
                    p.generation
                )),
                ..Default::default()
            }));
        }
        Ok(Err(if told {
            format!(
                "the primary was told to shut down but did not finish within {secs} s (it \
                 is fenced at its next contact; what it did not ship stays in its journal)"
            )
        } else {
            format!(
                "the primary did not contact this site within {secs} s (it is down, cut \
                 off, or its shipping is paused: a paused primary makes no contact)"
            )
        }))
    }

    /// Stop machine `name`'s loops, flush and close it; it vanishes from the mount.
    fn close(&self, name: &str) -> Result<()> {
        self.close_keeping(name, false)
    }

    /// Close machine `name`; with `reopening`, it stays under the mount (writes in
    /// flight wait for the machine that reopens under the same inodes).
    fn close_keeping(&self, name: &str, reopening: bool) -> Result<()> {
        let Some(entry) = self.machines.lock().remove(name) else {
            return Err(Error::NotFound(format!(
                "this site has no open machine {name}"
            )));
        };
        if reopening {
            // Under the mount and in status until it opens again (`open`).
            self.reloading.lock().insert(name.to_string());
        } else {
            self.tree.remove_machine(name);
        }
        self.lsn_seen.lock().remove(name);
        let closed = close_entry(name, entry);
        if reopening && closed.is_err() && self.reloading.lock().remove(name) {
            self.tree.remove_machine(name);
        }
        closed
    }

    /// Open machine `name` again (its manifest changed: a disk, its role, a fence).
    pub fn reload(&self, name: &str) -> Result<()> {
        let _one = self.changing.lock(&[name]);
        if self.machines.lock().contains_key(name) {
            self.close_keeping(name, true)?;
        }
        self.open(name)
    }

    /// A replica appeared (created by the receiver): start its loop; show it.
    pub fn add_replica(&self, name: &str) {
        let interval = Duration::from_millis(self.config.replica.compact_interval_ms.max(10));
        let mut loops = self.replica_loops.lock();
        if !loops.contains_key(name) {
            loops.insert(
                name.to_string(),
                ReplicaLoop::spawn(self.replicas.clone(), name.to_string(), interval),
            );
        }
        drop(loops);
        *self.replica_status.lock() = (None, Vec::new());
        self.tree.root_entry_changed(name);
    }

    /// The shipping loop of `name`, or why there is none.
    fn with_ship<T>(&self, name: &str, f: impl FnOnce(&ShipHandle) -> Result<T>) -> Result<T> {
        f(&self.ship_handle(name)?)
    }

    /// A handle on `name`'s shipping loop, taken out of the table (what is done with
    /// it may wait for the target), or why there is none.
    fn ship_handle(&self, name: &str) -> Result<ShipHandle> {
        let machines = self.machines.lock();
        let entry = machines
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("this site has no open machine {name}")))?;
        match &entry.ship {
            Some(l) => Ok(l.handle()),
            None if entry.machine.failed_over() => Err(Error::InvalidInput(format!(
                "{name} was failed over: it ships nothing"
            ))),
            None => Err(Error::InvalidInput(format!("{name} is not protected"))),
        }
    }

    /// `replog pause`: recorded in the relationship (a serve started later keeps the
    /// machine paused), then the loop is told; it stops when the pass in progress ends
    /// (an initial copy between chunks, a resync between batches).
    /// With no loop to tell (not protected, failed over) nothing changes. Under the
    /// machine's `changing` lock: a loop `resync --now` starts in a stopped one's place
    /// (`restart_parked`) is not swapped in between finding the loop and telling it.
    fn pause_shipping(&self, machine: &str) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        let handle = self.ship_handle(machine)?;
        crate::failpoint::hit("serve:pause-found");
        let was = crate::ops::set_shipping_paused(&self.site, machine, true)?;
        match handle.pause(PAUSE_WAIT) {
            Ok(true) => Ok(Reply::done(format!(
                "shipping of {machine} paused: writes go on into its journal; `replog \
                 resume` ships them"
            ))),
            Ok(false) => Ok(Reply::done(format!(
                "shipping of {machine} pauses when the pass in progress ends (it did not \
                 within {} s): writes go on into its journal; `replog resume` ships them",
                PAUSE_WAIT.as_secs()
            ))),
            Err(e) => {
                if !was {
                    crate::ops::set_shipping_paused(&self.site, machine, false)?;
                }
                Err(e)
            }
        }
    }

    /// `replog resume`: the relationship no longer says paused, and the loop ships
    /// again at once. Under `changing`, as [`pause_shipping`](Self::pause_shipping).
    fn resume_shipping(&self, machine: &str) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        let handle = self.ship_handle(machine)?;
        crate::ops::set_shipping_paused(&self.site, machine, false)?;
        handle.resume();
        Ok(Reply::done(format!("shipping of {machine} resumed")))
    }

    /// The target's half of a planned failover: promote replica `machine` at exactly
    /// `lsn` to `generation`, check the point's digests, then open it (the mount
    /// shows it). On any error nothing stays promoted.
    pub fn planned_promote(&self, machine: &str, lsn: u64, generation: u32) -> Result<()> {
        let _one = self.changing.lock(&[machine]);
        let promoted =
            crate::failover::run::planned_target(&Host(self), machine, lsn, generation).map(|_| ());
        // The promoted machine is in `replog status` as soon as the primary hears of it.
        self.publish_status();
        promoted
    }

    /// A reprotect toward this site (the receiver's hook): seed a replica from this
    /// site's own copy of the machine, keep its orphan point; the replica's loop
    /// starts once it is seeded. A job records what this site did.
    pub fn reprotect_answer(
        &self,
        req: &crate::failover::reprotect::Request,
    ) -> Result<crate::failover::reprotect::Answer> {
        use crate::failover::reprotect::{self, SeedState};
        let _one = self.changing.lock(&[&req.machine]);
        let before = reprotect::read_seed(&self.replicas, &req.machine)?.map(|s| s.state);
        let had_machine = self
            .site
            .machine_dir(&req.machine)?
            .join(crate::volume::MANIFEST_FILE)
            .exists();
        let mut job = (!req.probe && had_machine && before != Some(SeedState::OrphanKept))
            .then(|| {
                crate::jobs::JobHandle::start(
                    self.site.path(),
                    crate::jobs::JobKind::Reprotect,
                    Some(&req.machine),
                )
            })
            .transpose()?;
        if let Some(j) = job.as_mut() {
            j.step(&format!(
                "seed a replica of generation {} for site {} from this site's copy",
                req.generation, req.peer
            ));
        }
        let answer = match reprotect::answer(&Host(self), req) {
            Ok(a) => a,
            Err(e) => {
                if let Some(j) = job {
                    j.fail(&e);
                }
                return Err(e);
            }
        };
        if let Some(seed) = answer
            .seed
            .as_ref()
            .filter(|s| s.state == SeedState::OrphanKept)
        {
            self.add_replica(&req.machine);
            if let Some(mut j) = job {
                j.step_done(Some(format!(
                    "{} bytes of data seeded; {} ranges written here after LSN {} go back{}",
                    seed.seeded_bytes,
                    seed.tail.len(),
                    seed.since,
                    if seed.covered {
                        ""
                    } else {
                        "; a resync follows (the journals do not cover everything)"
                    }
                )))?;
                j.step("orphan kept");
                j.step_done(Some(reprotect::orphan_detail(seed.orphan.as_ref())))?;
                let name = req.machine.clone();
                let replicas = self.replicas.clone();
                j.finish(move || {
                    let store = replicas.open_readonly(&name)?;
                    Ok(format!(
                        "replica of {name} at generation {} reads back; its copy is completed by \
                         the sender",
                        store.generation()
                    ))
                })?;
            }
        }
        Ok(answer)
    }

    /// A failover request at this site (see `failover::run::handle`).
    fn failover_request(&self, req: &Request) -> Result<Reply> {
        let _one = self.changing.lock(&failover_names(req));
        let reply = crate::failover::run::handle(&Host(self), req);
        // A committed failover's replica may be gone: its loop and points too.
        let names: Vec<String> = self.replica_loops.lock().keys().cloned().collect();
        for name in names {
            if !self.replicas.has(&name) {
                self.replica_loops.lock().remove(&name);
                self.tree.root_entry_changed(&name);
            }
        }
        *self.replica_status.lock() = (None, Vec::new());
        reply
    }

    /// Write the site's status to `status.json` now.
    pub fn publish_status(&self) {
        let _one = self.publishing.lock();
        super::write_status(self.path(), &self.status());
    }

    /// The site's status now.
    pub fn status(&self) -> SiteStatus {
        let as_of_ns = crate::format::now_ns();
        let mut out = Vec::new();
        {
            let machines = self.machines.lock();
            for (name, e) in machines.iter() {
                let ship = e.ship.as_ref().map(ShipLoop::view);
                // Lag: the age of the oldest write the target lacks.
                let lag = ship.as_ref().map(|l| {
                    self.lsn_seen
                        .lock()
                        .entry(name.clone())
                        .or_default()
                        .lag(l.acked_lsn, e.machine.status().last_lsn, Instant::now())
                        .as_secs_f64()
                });
                out.push(super::machine_status(
                    self.path(),
                    &e.machine,
                    ship.as_ref(),
                    lag,
                ));
            }
        }
        // A machine closed to be opened again at once is still there.
        {
            let reloading = self.reloading.lock();
            let last = self.last_status.lock();
            for name in reloading.iter() {
                if !out.iter().any(|m| &m.name == name) {
                    out.extend(last.iter().filter(|m| &m.name == name).cloned());
                }
            }
        }
        *self.last_status.lock() = out.clone();
        let mut rs = self.replica_status.lock();
        if rs.0.is_none_or(|t| t.elapsed() >= REPLICA_STATUS_EVERY) {
            *rs = (
                Some(Instant::now()),
                crate::protection::status::replicas_status(&self.replicas),
            );
        }
        out.extend(rs.1.iter().cloned());
        drop(rs);
        SiteStatus {
            site: self.identity.id.clone(),
            machines: out,
            as_of_ns,
            warnings: self.identity.warnings(self.path()),
        }
    }

    /// Stop everything, in the order the holds need: every compactor first, then the
    /// shipping and replica loops, then flush and close every machine. The first error.
    pub fn stop(&self) -> Result<()> {
        let entries: Vec<(String, Entry)> = std::mem::take(&mut *self.machines.lock())
            .into_iter()
            .collect();
        for (_, e) in &entries {
            e.machine.stop_compactor();
        }
        for l in std::mem::take(&mut *self.replica_loops.lock()).into_values() {
            l.stop();
        }
        let mut first_err = None;
        for (name, e) in entries {
            if let Err(err) = close_entry(&name, e) {
                tracing::error!(machine = %name, "close: {err}");
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Flush every open machine (before the mount goes).
    pub fn flush_all(&self) -> Result<()> {
        let machines: Vec<Arc<Machine>> = self
            .machines
            .lock()
            .values()
            .map(|e| e.machine.clone())
            .collect();
        let mut first_err = None;
        for m in machines {
            if let Err(e) = m.flush() {
                tracing::error!(machine = m.name(), "flush: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn create_disk(
        &self,
        machine: &str,
        disk: &str,
        size: u64,
        import: Option<&Path>,
    ) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        // The disk is added to the closed machine; then it opens again with it.
        let was_open = self.machines.lock().contains_key(machine);
        if was_open {
            if Relationship::load(self.path(), machine)?.is_some() {
                return Err(Error::InvalidInput(format!(
                    "{machine} is protected: its replica has the disks it had then, so no \
                     disk can be added to it"
                )));
            }
            self.close_keeping(machine, true)?;
        }
        let made = crate::ops::create_disk(&self.site, machine, disk, size, import);
        // (A machine that does not open again leaves the mount: `open`.)
        let opened = if was_open || made.is_ok() {
            self.open(machine)
        } else {
            Ok(())
        };
        made?;
        opened?;
        Ok(Reply::done(format!(
            "created disk {machine}/{disk} ({size} bytes)"
        )))
    }

    fn remove_machine(&self, machine: &str) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        if Relationship::load(self.path(), machine)?.is_some() {
            return Err(Error::InvalidInput(format!(
                "{machine} is protected; it cannot be removed while its replica depends on it"
            )));
        }
        if self.machines.lock().contains_key(machine) {
            self.close(machine)?;
        }
        crate::ops::remove_machine_files(&self.site, machine)?;
        Ok(Reply::done(format!("removed machine {machine}")))
    }

    /// An operator's `resync --now`: a shipping loop a Critical error stopped (a
    /// resync refused, say, until an operator gave up what no copy was left of at the
    /// target) is replaced by a new one, which resyncs. The new loop's shipper holds
    /// the journal before the old one lets go. A machine fenced or failed over, or
    /// one whose loop was stopped by the target's fence, keeps its stopped loop.
    /// Returns what to tell the operator about a stopped loop (None: it was not).
    fn restart_parked(&self, machine: &str) -> Result<Option<String>> {
        let _one = self.changing.lock(&[machine]);
        let Some(rel) = Relationship::load(self.path(), machine)? else {
            return Ok(None);
        };
        let (m, why, paused) = {
            let machines = self.machines.lock();
            let Some(entry) = machines.get(machine) else {
                return Ok(None);
            };
            let Some(old) = entry.ship.as_ref() else {
                return Ok(None);
            };
            let Some(why) = old.parked() else {
                return Ok(None);
            };
            (entry.machine.clone(), why, old.pause_flag())
        };
        let fenced = why.code == Some(crate::replication::protocol::RefusalCode::Fenced);
        if fenced || m.fenced().is_some() || m.failed_over() {
            return Ok(Some(format!(
                "{machine}: its shipping loop stays stopped (\"{}\"): the machine is fenced \
                 or failed over",
                why.message
            )));
        }
        // Built with only `changing` held (the new shipper may wait for a merge in
        // progress before it holds the journal): nobody else replaces the entry's loop.
        // The new loop shares the stopped one's pause flag: a pause the operator sent
        // the stopped loop, or sends either meanwhile, holds for the new one.
        let new = self.ship_loop(&m, rel, paused.clone());
        let old = match self.machines.lock().get_mut(machine) {
            Some(entry) => entry.ship.replace(new),
            None => {
                new.stop();
                return Ok(None);
            }
        };
        tracing::warn!(
            machine,
            "an operator asked for a resync: the stopped shipping loop ({}) starts again",
            why.message
        );
        if let Some(old) = old {
            old.stop();
        }
        Ok(Some(format!(
            "{machine}: its shipping loop, stopped by \"{}\", starts again{}",
            why.message,
            if paused.load(std::sync::atomic::Ordering::Acquire) {
                ", paused as the stopped one was: it resynchronises once shipping is resumed"
            } else {
                ""
            }
        )))
    }

    fn protect(&self, machine: &str, rel: &Relationship) -> Result<Reply> {
        let _one = self.changing.lock(&[machine]);
        crate::ops::record_protection(&self.site, machine, rel)?;
        let mut machines = self.machines.lock();
        let entry = machines
            .get_mut(machine)
            .ok_or_else(|| Error::NotFound(format!("this site has no open machine {machine}")))?;
        if entry.ship.is_none() {
            entry.ship = Some(self.new_ship_loop(&entry.machine, rel.clone()));
        }
        Ok(Reply::done(format!(
            "{machine} is protected toward {}; initial replication has started",
            rel.target
        )))
    }

    fn handle_request(&self, req: &Request) -> Result<Reply> {
        match req {
            Request::Checkpoint {
                machine,
                app_consistent,
            } => {
                let p = self.retry_closed(|| {
                    let m = self.machine(machine).ok_or_else(|| {
                        Error::NotFound(format!("this site has no machine {machine}"))
                    })?;
                    m.point(*app_consistent)
                })?;
                Ok(Reply {
                    ok: true,
                    lsn: Some(p.lsn),
                    time_ns: Some(p.time_ns),
                    ..Default::default()
                })
            }
            Request::CreateDisk {
                machine,
                disk,
                size,
                import,
            } => self.create_disk(machine, disk, *size, import.as_deref()),
            Request::RemoveMachine { machine } => self.remove_machine(machine),
            Request::Protect {
                machine,
                relationship,
            } => self.protect(machine, relationship),
            Request::Resync { machine, now } => {
                let said = crate::ops::require_resync(&self.site, machine, *now)?;
                let restarted = if *now {
                    self.restart_parked(machine)?
                } else {
                    None
                };
                Ok(Reply::done(match restarted {
                    Some(loop_said) => format!("{said}\n{loop_said}"),
                    None => said,
                }))
            }
            Request::Compact { machine } => {
                let names = match machine {
                    Some(m) => vec![m.clone()],
                    None => self.names(),
                };
                let mut lines = Vec::new();
                for name in names {
                    let m = self.machine(&name).ok_or_else(|| {
                        Error::NotFound(format!("this site has no machine {name}"))
                    })?;
                    lines.push(crate::ops::compact(self.path(), &m)?);
                }
                Ok(Reply::done(lines.join("\n")))
            }
            Request::Ship {
                machine,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(*timeout_ms);
                self.with_ship(machine, |l| l.ship_now(timeout))
                    .map(Reply::at)
            }
            Request::PauseShipping { machine } => self.pause_shipping(machine),
            Request::ResumeShipping { machine } => self.resume_shipping(machine),
            Request::Fence { machine, reason } => {
                let m = self.machine(machine).ok_or_else(|| {
                    Error::NotFound(format!("this site has no machine {machine}"))
                })?;
                Ok(Reply::at(m.fence(reason)))
            }
            Request::PlannedFailover { machine, job } => self.planned_failover(machine, None, job),
            Request::PlanCheckpoint {
                machines,
                app_consistent,
                max_pause_ms,
            } => self.retry_closed(|| {
                let mut open = Vec::new();
                for name in machines {
                    open.push(self.machine(name).ok_or_else(|| {
                        Error::NotFound(format!("this site has no open machine {name}"))
                    })?);
                }
                let refs: Vec<&Machine> = open.iter().map(|m| m.as_ref()).collect();
                crate::control::PlanPointReply::record(&refs, *app_consistent, *max_pause_ms)
            }),
            Request::AcceptLoss { machine } => self.accept_loss(machine),
            Request::ServeInfo => Ok(Reply {
                ok: true,
                mount: self.mount.lock().clone(),
                ..Default::default()
            }),
            Request::Failover {
                machine,
                kind: FailoverKind::Unplanned,
                at,
                as_name,
                shutdown_source: Some(secs),
                job,
            } => {
                let why = match self.shutdown_source(machine, *secs)? {
                    Ok(reply) => return Ok(reply),
                    Err(why) => why,
                };
                let unplanned = Request::Failover {
                    machine: machine.clone(),
                    kind: FailoverKind::Unplanned,
                    at: at.clone(),
                    as_name: as_name.clone(),
                    shutdown_source: None,
                    job: job.clone(),
                };
                let mut reply = self.failover_request(&unplanned);
                // A promotion that was under way when the wait ended finished first
                // (it holds `changing`): it stands.
                if let Err(Error::InvalidInput(_)) = &reply {
                    if let Ok(Some(p)) = self.replicas.open_readonly(machine)?.promotion() {
                        if p.kind == FailoverKind::Planned && self.machine(machine).is_some() {
                            reply = Ok(Reply {
                                ok: true,
                                lsn: Some(p.lsn),
                                detail: Some(format!(
                                    "the primary shut down as the wait ended and had \
                                     {machine} promoted here at LSN {}: nothing lost",
                                    p.lsn
                                )),
                                ..Default::default()
                            });
                        }
                    }
                }
                reply.map(|mut r| {
                    r.detail = Some(format!("{why}; {}", r.detail.unwrap_or_default()));
                    r
                })
            }
            Request::Failover { .. }
            | Request::VerifyFailover { .. }
            | Request::CleanupTest { .. }
            | Request::ChangePoint { .. }
            | Request::CancelFailover { .. }
            | Request::Commit { .. } => self.failover_request(req),
            Request::Unfence { machine } => {
                let m = self.machine(machine).ok_or_else(|| {
                    Error::NotFound(format!("this site has no machine {machine}"))
                })?;
                m.unfence();
                Ok(Reply::done(format!("{machine} takes writes again")))
            }
        }
    }
}

impl Handler for Registry {
    fn handle(&self, req: &Request) -> Reply {
        let reply = match self.handle_request(req) {
            Ok(r) => r,
            Err(e) => Reply::failed(&e),
        };
        // What the request changed is in `replog status` as soon as it is answered.
        self.publish_status();
        reply
    }
}

/// The machine names a failover request changes (the replica's, and a test copy's).
fn failover_names(req: &Request) -> Vec<String> {
    match req {
        Request::Failover {
            machine,
            kind: FailoverKind::Test,
            as_name,
            ..
        }
        | Request::CleanupTest {
            machine, as_name, ..
        } => vec![
            machine.clone(),
            as_name
                .clone()
                .unwrap_or_else(|| crate::failover::test_name(machine)),
        ],
        Request::VerifyFailover { machine, name, .. } => vec![machine.clone(), name.clone()],
        Request::Failover { machine, .. }
        | Request::ChangePoint { machine, .. }
        | Request::CancelFailover { machine }
        | Request::Commit { machine }
        | Request::PlannedFailover { machine, .. } => vec![machine.clone()],
        _ => Vec::new(),
    }
}

/// The registry as the failover commands see it: opening a machine shows it under
/// the mount, closing one hides it. (The caller holds `changing`.)
struct Host<'a>(&'a Registry);

impl crate::failover::Host for Host<'_> {
    fn site(&self) -> &Site {
        &self.0.site
    }

    fn replicas(&self) -> &Replicas {
        &self.0.replicas
    }

    fn open(&self, name: &str) -> Result<()> {
        if self.0.machines.lock().contains_key(name) {
            return Ok(());
        }
        self.0.open(name)
    }

    fn close(&self, name: &str) -> Result<()> {
        if !self.0.machines.lock().contains_key(name) {
            return Ok(());
        }
        self.0.close(name)
    }

    fn close_to_reopen(&self, name: &str) -> Result<()> {
        if !self.0.machines.lock().contains_key(name) {
            return Ok(());
        }
        self.0.close_keeping(name, true)
    }

    /// The machine stays open, under the mount and in status, as reopening would
    /// leave it: its compactor and its shipping loop (and with it the loop's
    /// watermark hold) stop.
    fn stop_loops(&self, name: &str) -> Result<()> {
        let (machine, ship) = match self.0.machines.lock().get_mut(name) {
            Some(e) => (e.machine.clone(), e.ship.take()),
            None => return Ok(()),
        };
        machine.stop_compactor();
        if let Some(l) = ship {
            l.stop();
        }
        self.0.lsn_seen.lock().remove(name);
        Ok(())
    }

    fn machine(&self, name: &str) -> Result<Arc<Machine>> {
        self.0
            .machine(name)
            .ok_or_else(|| Error::NotFound(format!("this site has no open machine {name}")))
    }
}

/// Stop an entry's loops (compactor first), flush and close its machine.
fn close_entry(name: &str, e: Entry) -> Result<()> {
    e.machine.stop_compactor();
    if let Some(l) = e.ship {
        l.stop();
    }
    // From here on a write through a handle still held (a FUSE request in flight)
    // gets `Error::Closed` and looks the machine up again: none reaches this journal
    // after its last flush.
    e.machine.mark_closed();
    let flushed = e.machine.flush();
    // Other holders (a control request in flight) let go within moments.
    let mut m = e.machine;
    for _ in 0..200 {
        match Arc::try_unwrap(m) {
            Ok(machine) => return flushed.and(machine.close()),
            Err(back) => {
                m = back;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tracing::error!(machine = %name, "still in use at close; its journal was flushed");
    flushed.map(|_| ())
}

/// The last tick at which each newest LSN of a machine was seen, oldest first: the
/// write after LSN `a` was made after the last tick at which the newest LSN was still
/// `a` or below, so the age of the oldest write a target lacks is (at most) the time
/// since that tick.
/// Samples go in only when the LSN moved; a very long outage thins them to every
/// other one (the lag stays an upper bound, coarser).
#[derive(Debug, Default)]
struct LsnClock(std::collections::VecDeque<(u64, Instant)>);

impl LsnClock {
    const MAX_SAMPLES: usize = 1 << 16;

    fn lag(&mut self, acked: u64, last: u64, now: Instant) -> Duration {
        let q = &mut self.0;
        if acked >= last {
            // Caught up: this tick is where the next write's age starts.
            q.clear();
            q.push_back((last, now));
            return Duration::ZERO;
        }
        // A sample is the last tick at which its LSN was the newest.
        match q.back_mut() {
            Some(b) if b.0 == last => b.1 = now,
            _ => q.push_back((last, now)),
        }
        // The newest sample the target holds is the start; older ones are done with.
        while q.get(1).is_some_and(|s| s.0 <= acked) {
            q.pop_front();
        }
        if q.len() > Self::MAX_SAMPLES {
            let mut keep = 0usize;
            q.retain(|_| {
                keep += 1;
                keep % 2 == 1
            });
        }
        q.front()
            .map_or(Duration::ZERO, |(_, t)| now.saturating_duration_since(*t))
    }
}

#[cfg(test)]
mod lag_tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_write_the_target_lacks() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = LsnClock::default();
        assert_eq!(c.lag(10, 10, at(0)), Duration::ZERO);
        // Writes 11..20 come after the tick at 0 ms.
        assert_eq!(c.lag(10, 20, at(250)), Duration::from_millis(250));
        assert_eq!(c.lag(10, 30, at(500)), Duration::from_millis(500));
        // The target takes 11..20: the oldest write it lacks (21) came after 250 ms.
        assert_eq!(c.lag(20, 40, at(750)), Duration::from_millis(500));
        // Continuously behind, but keeping up: the lag stays bounded (the old
        // "behind since" grew with the wall clock here).
        let mut lsn = 40;
        for k in 4..400u64 {
            lsn += 10;
            let l = c.lag(lsn - 20, lsn, at(250 * k));
            assert!(l <= Duration::from_millis(750), "lag {l:?} at tick {k}");
        }
        // An outage with no new writes: the target behind at LSN 10 while the newest
        // stays 12 for a minute, then it takes 12 just as 13 arrives: the oldest
        // write it lacks is a quarter second old, not a minute.
        let mut o = LsnClock::default();
        assert_eq!(o.lag(10, 10, at(0)), Duration::ZERO);
        for k in 1..=240u64 {
            o.lag(10, 12, at(250 * k));
        }
        assert_eq!(o.lag(10, 12, at(60_000)), Duration::from_millis(60_000));
        assert_eq!(o.lag(12, 13, at(60_250)), Duration::from_millis(250));
        // Caught up: zero, and the next write's age starts at this tick.
        assert_eq!(c.lag(lsn, lsn, at(100_000)), Duration::ZERO);
        assert_eq!(c.lag(lsn, lsn + 1, at(100_250)), Duration::from_millis(250));
    }
}
