//! The shipping loop a running `serve` keeps for each protected machine: seal the
//! active segment on a short timer, ship what the target lacks (initial replication
//! first), and keep the machine's health.
//!
//! Recoverable failures (network, the target out of space or busy) are retried on
//! the configured schedule (1, 2, 4, 8, 10 minutes, then every 30) with health Warning.
//! A broken chain (a gap, a damaged segment on either side, a replica that diverged, a
//! source behind its target), unshipped journal past the threshold, or a disk changed
//! while replog was not running make a resync required (Warning, with the reason): it
//! runs in the resync window or at `replog resync --now`, resumes after an
//! interruption, and replication goes on from its end. An authentication or trust
//! failure, or a refusal the target calls fatal, make the machine Critical and stop
//! shipping until an operator acts.

use super::relationship::{CopyMark, Relationship};
use super::resync_schedule::{SourceResync, Window};
use super::shipper::{is_interrupted, Shipper};
use crate::config::ReplicationConfig;
use crate::error::{Error, ErrorClass};
use crate::jobs::{JobHandle, JobKind};
use crate::volume::Machine;
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Replication state of one machine, as status shows it.
pub use crate::protection::status::ShipView as LoopStatus;
use crate::protection::{Health, State};

/// A running shipping loop.
#[derive(Debug)]
pub struct ShipLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub status: Arc<Mutex<LoopStatus>>,
    commands: Sender<ShipCommand>,
    /// What stopped the loop, once a Critical error did (`park`): it ships nothing
    /// until serve stops or an operator's `resync --now` replaces it.
    parked: Arc<Mutex<Option<crate::error::Failure>>>,
    /// Whether an operator paused it (and has not resumed it since): set by the
    /// command handles, read by the loop before each pass; a loop started again in a
    /// stopped one's place shares the stopped one's flag.
    paused: PauseFlag,
}

/// Whether shipping is paused: the one place it is kept (see [`ShipLoop::spawn`]).
pub type PauseFlag = Arc<AtomicBool>;

/// What a paused loop's status says (and `status` adds to a stopped loop's reason).
pub fn paused_reason(target: &str) -> String {
    format!("shipping to {target} is paused")
}

/// What the loop answers a ship request with: the LSN the target acknowledged, or
/// why it could not (with the error's class, so a fenced or refused machine is not
/// mistaken for a passing failure).
pub type ShipAnswer = std::result::Result<u64, crate::error::Failure>;

/// The command channel into a machine's shipping loop.
#[derive(Debug)]
pub enum ShipCommand {
    /// Seal now and ship everything written before the request; answer once the
    /// target has acknowledged it (or with the error that stopped it).
    ShipNow(Sender<ShipAnswer>),
    /// Stop shipping until `Resume` (the watermark hold stays, so nothing unshipped is
    /// merged, until the journal passes the resync threshold and a resync is
    /// required); answered once the pass in progress has ended.
    Pause(Sender<()>),
    Resume,
    /// A planned failover's last step (the machine fenced, everything up to the LSN
    /// acknowledged): ask the target to promote at the LSN to the generation.
    Promote(u64, u32, Sender<super::shipper::PromoteOutcome>),
}

/// The loop's side of the command channel.
struct Control {
    rx: Receiver<ShipCommand>,
    paused: PauseFlag,
    /// Ship requests: the LSN each must see acknowledged, and where to answer.
    waiting: Vec<(u64, Sender<ShipAnswer>)>,
    /// A promotion to ask the target for.
    promote: Option<(u64, u32, Sender<super::shipper::PromoteOutcome>)>,
    /// A planned failover's outcome is not known (this process began it and lost the
    /// answer, or a process that died did): the next contact with the target tells.
    resolve_intent: bool,
    /// Begins a planned failover when the target asks for one.
    on_failover_request: Option<FailoverRequestFn>,
    /// The loop's `parked` record.
    parked: Arc<Mutex<Option<crate::error::Failure>>>,
}

impl Control {
    /// Take the commands that arrived.
    fn drain(&mut self, machine: &Machine) {
        while let Ok(c) = self.rx.try_recv() {
            self.take(c, machine);
        }
    }

    /// Take command `c`; true if a waiting loop is to wake for it.
    fn take(&mut self, c: ShipCommand, machine: &Machine) -> bool {
        match c {
            ShipCommand::ShipNow(tx) => self.waiting.push((machine.status().last_lsn, tx)),
            // The handle set or cleared the flag before it sent these: one answers
            // when the pass in progress has ended, the other wakes a waiting loop
            // (one paused, or waiting to retry: resumed, it ships at once).
            ShipCommand::Pause(tx) => {
                let _ = tx.send(());
                return false;
            }
            ShipCommand::Resume => {}
            ShipCommand::Promote(lsn, g, tx) => self.promote = Some((lsn, g, tx)),
        }
        true
    }

    /// Sleep up to `d`, waking early when `stop` is set or a ship request arrives.
    fn wait(&mut self, stop: &AtomicBool, d: Duration, machine: &Machine) {
        self.wait_until(stop, d, machine, || false);
    }

    /// [`wait`](Self::wait), returning early once `done()` holds (checked between
    /// 20 ms slices).
    fn wait_until(
        &mut self,
        stop: &AtomicBool,
        d: Duration,
        machine: &Machine,
        done: impl Fn() -> bool,
    ) {
        let until = Instant::now() + d;
        while !stop.load(Ordering::Acquire) && Instant::now() < until && !done() {
            let slice = Duration::from_millis(20).min(until - Instant::now());
            match self.rx.recv_timeout(slice) {
                Ok(c) => {
                    // A ship request is answered (or, paused, refused) at once; a
                    // resume is acted on at once.
                    if self.take(c, machine) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(slice),
            }
        }
    }

    /// [`wait`](Self::wait), returning early once the journal holds a sealed segment
    /// past `acked` (it sealed one when it filled), or [`SHIP_EARLY_BYTES`] wait in
    /// the active segment: under a steady stream of writes, segments are then sealed
    /// about once per pass, as big as what arrived while the last one shipped — small
    /// when shipping keeps up (a low lag), bigger when it does not (fewer, larger
    /// segments, each fsynced once at the target).
    fn wait_for_sealed(&mut self, stop: &AtomicBool, d: Duration, machine: &Machine, acked: u64) {
        self.wait_until(stop, d, machine, || {
            machine
                .sealed_segments()
                .last()
                .is_some_and(|s| s.last_lsn > acked)
                || machine.active_bytes() >= SHIP_EARLY_BYTES
        });
    }

    /// The target acknowledged `lsn`: answer the requests it covers.
    fn acked(&mut self, lsn: u64) {
        self.waiting.retain(|(want, tx)| {
            if *want <= lsn {
                let _ = tx.send(Ok(lsn));
                false
            } else {
                true
            }
        });
    }

    /// Answer every request with a passing condition (paused, waiting for the resync
    /// window): the caller may try again.
    fn failed(&mut self, why: &str) {
        self.failed_with(crate::error::Failure::retry(why));
    }

    /// Answer every request with the error that stopped the pass.
    fn failed_err(&mut self, e: &Error) {
        self.failed_with(crate::error::Failure::of(e));
    }

    fn failed_with(&mut self, f: crate::error::Failure) {
        for (_, tx) in self.waiting.drain(..) {
            let _ = tx.send(Err(f.clone()));
        }
    }
}

/// What a loop calls when its target asks the machine's primary to shut down for a
/// failover (with the machine's name): begin a planned failover. It must not wait
/// for the loop (the failover drives the loop through its command channel).
pub type FailoverRequestFn = Arc<dyn Fn(&str) + Send + Sync>;

impl ShipLoop {
    /// Start the loop, paused whenever `paused` is set (before its first pass too: a
    /// loop started in a stopped one's place is given that one's flag, so a pause or
    /// resume sent to either holds for both); `on_failover_request` begins a planned
    /// failover when the target asks for one (serve's registry; without it such a
    /// request is retried).
    pub fn spawn(
        site: PathBuf,
        machine: Arc<Machine>,
        rel: Relationship,
        cfg: ReplicationConfig,
        on_failover_request: Option<FailoverRequestFn>,
        paused: PauseFlag,
    ) -> ShipLoop {
        let stop = Arc::new(AtomicBool::new(false));
        // Started paused (kept across a restart, or a stopped loop's flag): the copy
        // mark tells whether the initial copy is done; how far one not done got is
        // not known until a pass has run.
        let starts_paused = paused.load(Ordering::Acquire);
        let copied = CopyMark::holds(&site, machine.name(), &rel, machine.generation());
        let status = Arc::new(Mutex::new(LoopStatus {
            state: if starts_paused && copied {
                State::Protected
            } else {
                State::InitialReplication
            },
            health: Health::Warning,
            reason: if starts_paused {
                paused_reason(&rel.target)
            } else {
                format!("connecting to {}", rel.target)
            },
            progress: (!starts_paused).then_some(0.0),
            acked_lsn: 0,
            target: rel.target.clone(),
            resync: None,
            reprotect: None,
            paused: false,
        }));
        // The shipper (and with it the watermark hold) exists before this returns:
        // from now on nothing the target lacks can be merged away.
        let mut shipper = Shipper::new(&site, &machine, &rel.target);
        shipper.stop_on(stop.clone());
        // A pause gives up an initial copy or a resync between chunks (either may run
        // for hours), not at its end.
        shipper.stop_on(paused.clone());
        match rel.retention_ms() {
            Ok((every, app)) => shipper.set_retention(every, app),
            Err(e) => tracing::error!(machine = machine.name(), "retention: {e}"),
        }
        match rel.target_id() {
            Ok(id) => shipper.expect_target(id),
            Err(e) => tracing::error!(machine = machine.name(), "target_id: {e}"),
        }
        let (commands, rx) = crossbeam::channel::unbounded();
        let parked = Arc::new(Mutex::new(None));
        let control = Control {
            parked: parked.clone(),
            rx,
            paused: paused.clone(),
            waiting: Vec::new(),
            promote: None,
            // A planned failover a process that died began: the first contact tells
            // how it ended (refused as fenced: promoted; answered: not). Read here,
            // under the caller's lock, not in the thread: a failover asked for just
            // after this returns sets an intent of its own.
            resolve_intent: machine.intent().is_some(),
            on_failover_request,
        };
        let thread = {
            let (stop, status) = (stop.clone(), status.clone());
            std::thread::Builder::new()
                .name(format!("ship-{}", machine.name()))
                .spawn(move || run(shipper, machine, rel, cfg, stop, status, control))
                .ok()
        };
        ShipLoop {
            stop,
            thread,
            status,
            commands,
            parked,
            paused,
        }
    }

    /// What stopped the loop, if a Critical error did.
    pub fn parked(&self) -> Option<crate::error::Failure> {
        self.parked.lock().clone()
    }

    /// Its pause flag (to hand to a loop started in its place).
    pub fn pause_flag(&self) -> PauseFlag {
        self.paused.clone()
    }

    /// Its status for `replog status`, with whether it is paused (stopped or not).
    pub fn view(&self) -> LoopStatus {
        let mut v = self.status.lock().clone();
        v.paused = self.paused.load(Ordering::Acquire);
        v
    }

    /// A handle on the loop's command channel (cheap; usable without holding the
    /// loop).
    pub fn handle(&self) -> ShipHandle {
        ShipHandle {
            commands: self.commands.clone(),
            paused: self.paused.clone(),
        }
    }
}

/// The command channel into a shipping loop.
#[derive(Debug, Clone)]
pub struct ShipHandle {
    commands: Sender<ShipCommand>,
    paused: PauseFlag,
}

impl ShipHandle {
    /// Ask the target to promote the machine at `lsn` to `generation` (a planned
    /// failover's last step); how it ended.
    pub fn promote(
        &self,
        lsn: u64,
        generation: u32,
        timeout: Duration,
    ) -> super::shipper::PromoteOutcome {
        use super::shipper::PromoteOutcome;
        let (tx, rx) = crossbeam::channel::bounded(1);
        if self
            .commands
            .send(ShipCommand::Promote(lsn, generation, tx))
            .is_err()
        {
            return PromoteOutcome::NotPromoted(Error::Busy(
                "the shipping loop has stopped".into(),
            ));
        }
        match rx.recv_timeout(timeout) {
            Ok(o) => o,
            Err(_) => PromoteOutcome::Unknown(Error::Busy(format!(
                "no answer from the target within {} s",
                timeout.as_secs()
            ))),
        }
    }

    /// Seal and ship everything written so far; the LSN the target acknowledged.
    pub fn ship_now(&self, timeout: Duration) -> crate::error::Result<u64> {
        let (tx, rx) = crossbeam::channel::bounded(1);
        let gone = || Error::Busy("the shipping loop has stopped".into());
        self.commands
            .send(ShipCommand::ShipNow(tx))
            .map_err(|_| gone())?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(lsn)) => Ok(lsn),
            Ok(Err(f)) => Err(f.into_error("the target")),
            Err(RecvTimeoutError::Timeout) => Err(Error::Busy(format!(
                "the target did not acknowledge within {} s",
                timeout.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }

    /// Stop shipping until [`ShipHandle::resume`]. True once the pass in progress has
    /// ended; false if it had not within `timeout` (the loop pauses when it ends: an
    /// initial copy or a resync may run long).
    pub fn pause(&self, timeout: Duration) -> crate::error::Result<bool> {
        // Set first: the loop pauses when its pass ends, whether or not the answer
        // comes in time. A loop that is gone was not told: the flag goes back to what
        // it was, as the error says.
        let was = self.paused.swap(true, Ordering::AcqRel);
        let (tx, rx) = crossbeam::channel::bounded(1);
        if self.commands.send(ShipCommand::Pause(tx)).is_err() {
            self.paused.store(was, Ordering::Release);
            return Err(Error::Busy("the shipping loop has stopped".into()));
        }
        match rx.recv_timeout(timeout) {
            Ok(()) => Ok(true),
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Error::Busy("the shipping loop has stopped".into()))
            }
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        let _ = self.commands.send(ShipCommand::Resume);
    }
}

impl ShipLoop {
    /// Stop shipping (after the pass in progress).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake a loop waiting for a command (a parked one polls only every 50 ms).
        let _ = self.commands.send(ShipCommand::Resume);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stopped by a Critical error: keep the shipper, and with it the watermark hold,
/// until serve stops or an operator's `resync --now` starts a new loop (whose shipper
/// holds before this one goes) — what the target has not acknowledged must not be
/// merged. Ship requests are answered with `why`.
fn park(stop: &AtomicBool, shipper: Shipper, mut control: Control, why: crate::error::Failure) {
    control.failed_with(why.clone());
    *control.parked.lock() = Some(why.clone());
    while !stop.load(Ordering::Acquire) {
        match control.rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ShipCommand::ShipNow(tx)) => {
                let _ = tx.send(Err(why.clone()));
            }
            Ok(ShipCommand::Pause(tx)) => {
                let _ = tx.send(());
            }
            Ok(ShipCommand::Promote(_, _, tx)) => {
                let _ = tx.send(super::shipper::PromoteOutcome::NotPromoted(
                    why.clone().into_error("the target"),
                ));
            }
            _ => {}
        }
    }
    drop(shipper);
}

/// The target refused the machine as fenced: a newer generation of it runs there.
/// Persist the fence (writes refused for good, never a resync over it), say so in
/// status; true if that is what `e` was. The tail the target never acknowledged stays
/// in the journal: the shipper's hold is kept while parked, and a failed-over machine
/// gets no compactor when it is opened again.
fn fenced_by_target(
    machine: &Machine,
    rel: &Relationship,
    e: &Error,
    status: &Mutex<LoopStatus>,
) -> bool {
    let Error::Refused {
        code: crate::replication::protocol::RefusalCode::Fenced,
        message,
        ..
    } = e
    else {
        return false;
    };
    let fence = crate::protection::Fence {
        by_site: rel.target_id().map(|id| id.0).unwrap_or([0; 32]),
        // At least one more than ours (the target's message says which).
        generation: machine.generation() + 1,
        at_ns: crate::format::now_ns(),
        reason: message.clone(),
    };
    if let Err(e2) = machine.persist_fence(fence) {
        tracing::error!(machine = machine.name(), "cannot record the fence: {e2}");
    }
    tracing::warn!(machine = machine.name(), "failed over elsewhere: {message}");
    let mut s = status.lock();
    s.state = State::FailedOver;
    s.health = Health::Warning;
    s.reason = format!(
        "failed over: {} refused it as fenced ({message}); writes are refused and \
         replication has stopped",
        rel.target
    );
    true
}

/// Journal bytes the target does not have: sealed segments past `acked` and the active
/// one (acknowledged segments waiting to be merged do not count).
fn unshipped_bytes(machine: &Machine, acked: u64) -> u64 {
    let sealed = machine.sealed_segments();
    let sealed_total: u64 = sealed.iter().map(|g| g.bytes).sum();
    let active = machine.status().journal_bytes.saturating_sub(sealed_total);
    sealed
        .iter()
        .filter(|g| g.last_lsn > acked)
        .map(|g| g.bytes)
        .sum::<u64>()
        + active
}

/// A paused loop's resync, as far as it matters while paused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PausedResync {
    /// None on record (the journal is measured at each wait).
    NotRequired,
    /// Required (why) and not begun: nothing need be held.
    Required(String),
    /// Begun: its hold stays until it ends.
    UnderWay,
}

/// Whether the journal the target lacks has reached the resync threshold and a resync
/// is now recorded as required (`context` ends the reason).
fn overflowed(
    machine: &Machine,
    shipper: &Shipper,
    cfg: &ReplicationConfig,
    site: &std::path::Path,
    context: &str,
) -> bool {
    let disk_bytes: u64 = machine.disks().iter().map(|(_, s)| s).sum();
    let unshipped = unshipped_bytes(machine, shipper.acked_lsn());
    if disk_bytes == 0
        || unshipped.saturating_mul(100) < disk_bytes.saturating_mul(cfg.resync_threshold_percent)
    {
        return false;
    }
    let why = format!(
        "unshipped journal reached {} MiB, {}% of the disks{context}",
        unshipped >> 20,
        unshipped.saturating_mul(100) / disk_bytes
    );
    match SourceResync::require(site, machine.name(), &why) {
        Ok(()) => true,
        // Not recorded (the disk full, say): nothing is let go; measured again later.
        Err(e) => {
            tracing::error!(machine = machine.name(), "{e}");
            false
        }
    }
}

/// The jobs a shipping loop runs (`crate::jobs`): the initial replication (begun at
/// its first progress, or resumed from a serve that died), each resync; the end state
/// of each is checked at the next good pass — a handshake in which the target says
/// its copy is complete and in line — and only then do they succeed.
struct LoopJobs {
    site: PathBuf,
    machine: String,
    /// The initial replication in progress (shared with the progress callback) and
    /// when its record was last updated.
    initial: Arc<Mutex<(Option<JobHandle>, Instant)>>,
    resync: Option<JobHandle>,
    to_verify: Vec<JobHandle>,
    /// The machine keeps a changed-block map: its initial copy is a reprotect, one
    /// job with steps seed, delta, orphan kept, caught up.
    reprotecting: bool,
    reprotect: Arc<Mutex<Option<JobHandle>>>,
}

impl LoopJobs {
    fn new(site: &std::path::Path, machine: &str) -> Self {
        LoopJobs {
            site: site.to_path_buf(),
            machine: machine.to_string(),
            initial: Arc::new(Mutex::new((None, Instant::now()))),
            resync: None,
            to_verify: Vec::new(),
            reprotecting: false,
            reprotect: Arc::new(Mutex::new(None)),
        }
    }

    /// The reprotect job: the one `replog reprotect` handed over (or one a stopped
    /// serve left), else a new one.
    fn reprotect_job(
        slot: &Mutex<Option<JobHandle>>,
        site: &std::path::Path,
        machine: &str,
        f: impl FnOnce(&mut JobHandle),
    ) {
        let mut g = slot.lock();
        if g.is_none() {
            match JobHandle::resume_or_start(site, JobKind::Reprotect, machine) {
                Ok(j) => *g = Some(j),
                Err(e) => tracing::warn!(machine, "job record: {e}"),
            }
        }
        if let Some(j) = g.as_mut() {
            f(j);
        }
    }

    /// What the target said at a handshake of a reprotect.
    fn reprotect_seen(
        slot: &Mutex<Option<JobHandle>>,
        site: &std::path::Path,
        machine: &str,
        target: &str,
        r: &super::shipper::ReprotectView,
    ) {
        use super::protocol::Held;
        Self::reprotect_job(slot, site, machine, |j| {
            if j.job().steps.iter().any(|s| s.name == "seed") {
                return;
            }
            j.step("seed");
            let detail = match r.held {
                Held::Seeded => format!(
                    "{target} made its own older copy the replica of generation {}: {} \
                     bytes seeded from its disks, {} ranges it wrote after the \
                     point go back{}",
                    r.generation,
                    r.seeded_bytes,
                    r.tail.len(),
                    if r.covered {
                        ""
                    } else {
                        "; its journal does not cover everything: a resync follows"
                    }
                ),
                Held::Nothing => format!(
                    "{target} holds no copy of {machine}: an alternate location, full initial copy"
                ),
                Held::Replica | Held::OldPrimary => {
                    format!("{target} already holds a replica of this generation")
                }
            };
            let _ = j.step_done(Some(detail));
            j.step("delta");
        });
    }

    /// Take over the jobs a serve that stopped left in progress for this machine: the
    /// work goes on here (or was done: then the next good pass checks it).
    fn adopt(&mut self) {
        let orphans = crate::jobs::list(&self.site).unwrap_or_default();
        for kind in [JobKind::InitialReplication, JobKind::Resync] {
            if kind == JobKind::InitialReplication && self.reprotecting {
                continue;
            }
            let orphan = orphans.iter().any(|j| {
                j.kind == kind
                    && j.machine.as_deref() == Some(self.machine.as_str())
                    && j.state == crate::jobs::JobState::InProgress
                    && j.owner_gone()
            });
            if !orphan {
                continue;
            }
            match JobHandle::resume_or_start(&self.site, kind, &self.machine) {
                Ok(mut j) => {
                    j.step(match kind {
                        JobKind::Resync => "compare chunks and send those that differ",
                        _ => "copy the disks",
                    });
                    match kind {
                        JobKind::Resync => self.resync = Some(j),
                        _ => self.initial.lock().0 = Some(j),
                    }
                }
                Err(e) => tracing::warn!(machine = %self.machine, "job record: {e}"),
            }
        }
    }

    /// A good shipping pass with no resync pending: work adopted from a stopped serve
    /// that needed nothing more is done; its end state is checked at the next pass.
    fn nothing_left(&mut self, initial_bytes: u64) {
        if self.initial.lock().0.is_some() {
            self.initial_copied(initial_bytes);
        }
        if let Some(mut j) = self.resync.take() {
            if let Err(e) = j.step_done(Some("it had ended before the restart")) {
                tracing::warn!(machine = %self.machine, "job record: {e}");
            }
            self.to_verify.push(j);
        }
    }

    /// The initial copy is at `done` of `total` bytes.
    fn initial_progress(
        initial: &Mutex<(Option<JobHandle>, Instant)>,
        site: &std::path::Path,
        machine: &str,
        done: u64,
        total: u64,
    ) {
        let mut g = initial.lock();
        if g.0.is_none() {
            match JobHandle::resume_or_start(site, JobKind::InitialReplication, machine) {
                Ok(mut j) => {
                    j.step("copy the disks");
                    g.0 = Some(j);
                }
                Err(e) => tracing::warn!(machine, "job record: {e}"),
            }
        }
        let now = Instant::now();
        if now.duration_since(g.1) >= Duration::from_secs(1) || done >= total {
            g.1 = now;
            if let Some(j) = g.0.as_mut() {
                j.progress(format!("{done} of {total} bytes scanned"));
            }
        }
    }

    /// A pass of a reprotect went well: the copy ended (`copied` bytes), or the
    /// target verified a point (then the job succeeds and the map goes).
    fn reprotect_pass(
        &mut self,
        machine: &Machine,
        target: &str,
        r: Option<&super::shipper::ReprotectView>,
        report: &super::shipper::ShipReport,
        initial_done: bool,
    ) {
        use super::protocol::Held;
        let slot = self.reprotect.clone();
        let (site, name) = (self.site.clone(), self.machine.clone());
        let mut g = slot.lock();
        if g.is_none() {
            if !initial_done {
                return;
            }
            drop(g);
            Self::reprotect_job(&slot, &site, &name, |_| {});
            g = slot.lock();
        }
        let Some(j) = g.as_mut() else { return };
        let has = |j: &JobHandle, n: &str| j.job().steps.iter().any(|s| s.name == n);
        if initial_done && !has(j, "orphan kept") {
            let _ = j.step_done(Some(format!(
                "{} bytes of blocks that differ sent",
                report.initial_bytes
            )));
            j.step("orphan kept");
            let _ = j.step_done(Some(match r {
                Some(v) if v.held == Held::Seeded => {
                    crate::failover::reprotect::orphan_detail(v.orphan.as_ref())
                }
                _ => "none: the target held no older copy".into(),
            }));
            j.step("caught up");
        }
        let verified = match r {
            Some(v) if v.held == Held::Seeded => v.verified,
            // A full copy: the target's answer of this pass is the check, as for an
            // initial replication.
            _ if initial_done => Some(report.acked_lsn),
            _ => None,
        };
        let Some(lsn) = verified else {
            j.progress(format!(
                "acknowledged up to LSN {}; waiting for {target} to check a point's digests",
                report.acked_lsn
            ));
            return;
        };
        let Some(j) = g.take() else { return };
        let id = j.id().to_string();
        let seeded = r.is_some_and(|v| v.held == Held::Seeded);
        let done = j.finish(|| {
            machine.stop_tracking()?;
            Ok(if seeded {
                format!(
                    "{target} checked the point at LSN {lsn} against this machine's digests: \
                     every disk matches; acknowledged up to LSN {}",
                    report.acked_lsn
                )
            } else {
                format!(
                    "{target} answered a new session: its copy is complete, not diverged, \
                     acknowledged up to LSN {lsn}"
                )
            })
        });
        if let Err(e) = done {
            tracing::warn!(job = %id, "job record: {e}");
        }
    }

    fn initial_copied(&mut self, bytes: u64) {
        if let Some(mut j) = self.initial.lock().0.take() {
            if let Err(e) = j.step_done(Some(format!("{bytes} bytes of data sent"))) {
                tracing::warn!(machine = %self.machine, "job record: {e}");
            }
            self.to_verify.push(j);
        }
    }

    fn resync_started(&mut self, reason: &str) {
        if self.resync.is_none() {
            match JobHandle::resume_or_start(&self.site, JobKind::Resync, &self.machine) {
                Ok(mut j) => {
                    j.step(&format!(
                        "compare chunks and send those that differ ({reason})"
                    ));
                    self.resync = Some(j);
                }
                Err(e) => tracing::warn!(machine = %self.machine, "job record: {e}"),
            }
        }
    }

    fn resync_done(&mut self, r: &super::shipper::ResyncReport) {
        if let Some(mut j) = self.resync.take() {
            let detail = format!(
                "{} chunks compared, {} sent ({} bytes), {} bytes mended, {} lost; the \
                 replica is consistent from LSN {}",
                r.compared, r.sent_chunks, r.sent_bytes, r.mended_bytes, r.lost_bytes, r.valid_from
            );
            if let Err(e) = j.step_done(Some(detail)) {
                tracing::warn!(machine = %self.machine, "job record: {e}");
            }
            self.to_verify.push(j);
        }
    }

    /// A good pass: the target's handshake said its copy is complete, not diverged,
    /// and in line up to `acked`.
    fn pass_ok(&mut self, acked: u64, target: &str) {
        for j in self.to_verify.drain(..) {
            let id = j.id().to_string();
            let verified = j.finish(|| {
                Ok(format!(
                    "{target} answered a new session: its copy is complete, not diverged, \
                     acknowledged up to LSN {acked}"
                ))
            });
            if let Err(e) = verified {
                tracing::warn!(job = %id, "job record: {e}");
            }
        }
    }

    /// The work stopped for good (Critical) or must start over (the chain broke): the
    /// jobs in flight fail with `e`.
    fn failed(&mut self, e: &Error) {
        let mut all: Vec<JobHandle> = self.to_verify.drain(..).collect();
        all.extend(self.resync.take());
        all.extend(self.initial.lock().0.take());
        all.extend(self.reprotect.lock().take());
        for j in all {
            j.fail(e);
        }
    }
}

/// Unshipped bytes in the active segment that make the loop seal and ship before
/// the seal interval is up (see `Control::wait_for_sealed`).
const SHIP_EARLY_BYTES: u64 = 8 << 20;

fn run(
    mut shipper: Shipper,
    machine: Arc<Machine>,
    rel: Relationship,
    cfg: ReplicationConfig,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<LoopStatus>>,
    mut control: Control,
) {
    let mut jobs = LoopJobs::new(shipper.site(), machine.name());
    jobs.reprotecting = machine.changed_map().is_some();
    jobs.adopt();
    if jobs.reprotecting {
        let (slot, site, mname, target) = (
            jobs.reprotect.clone(),
            shipper.site().to_path_buf(),
            machine.name().to_string(),
            rel.target.clone(),
        );
        let status = status.clone();
        shipper.on_reprotect_state(Box::new(move |r| {
            LoopJobs::reprotect_seen(&slot, &site, &mname, &target, r);
            let mut s = status.lock();
            let c = s.reprotect.get_or_insert_with(Default::default);
            c.stage = "delta".into();
            c.orphan = r.orphan.as_ref().map(|o| o.id.clone());
        }));
    }
    {
        // Status follows each Ack, not only each pass's end (a backlog after an
        // outage ships in one long pass).
        let status = status.clone();
        shipper.on_ack(Box::new(move |lsn| status.lock().acked_lsn = lsn));
    }
    {
        let status = status.clone();
        let (initial, site, mname) = (
            jobs.initial.clone(),
            shipper.site().to_path_buf(),
            machine.name().to_string(),
        );
        let (reprotect, reprotecting) = (jobs.reprotect.clone(), jobs.reprotecting);
        let target = rel.target.clone();
        // A progress bar for the initial copy when a person watches serve's terminal.
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let b = indicatif::ProgressBar::new(1);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} initial replication {bar:30} {bytes}/{total_bytes} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(machine.name().to_string());
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        shipper.on_progress(Box::new(move |done, total| {
            let blocks_left = (total - done.min(total)).div_ceil(4096);
            if reprotecting {
                if let Some(j) = reprotect.lock().as_mut() {
                    j.progress(format!(
                        "{done} of {total} bytes that differ sent, {blocks_left} blocks left"
                    ));
                }
                let mut s = status.lock();
                s.reason = format!(
                    "reprotect toward {target}: sending the blocks that differ ({done} of \
                     {total} bytes)"
                );
                let c = s.reprotect.get_or_insert_with(Default::default);
                c.stage = "delta".into();
                c.bytes_sent = done;
                c.bytes_total = total;
                c.blocks_left = blocks_left;
            } else {
                LoopJobs::initial_progress(&initial, &site, &mname, done, total);
            }
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
            let mut s = status.lock();
            s.state = State::InitialReplication;
            s.progress = Some(if total == 0 {
                1.0
            } else {
                done as f64 / total as f64
            });
        }));
    }
    let mut failures = 0usize;
    let mut initial_done = false;
    // While paused: what of a resync (None: not yet looked at since the pause began).
    let mut paused_resync: Option<PausedResync> = None;
    let site = shipper.site().to_path_buf();
    let name = machine.name().to_string();
    // An initial copy a loop before this one saw complete (the copy mark): what the
    // journal holds is a delta over it, even before this loop reaches the target.
    let mut copied_before = CopyMark::holds(&site, &name, &rel, machine.generation());
    // A mark the target contradicted and not yet removed.
    let mut stale_mark = false;
    let window = match Window::parse(&cfg.resync_window, cfg.resync_weekends) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(machine = %name, "{e}; resyncs start only with --now");
            Window::parse("never", false).unwrap_or(Window {
                from_hour: 0,
                to_hour: 0,
                weekends: false,
            })
        }
    };
    if let Some(why) = machine.changed_offline() {
        let _ = SourceResync::require(&site, &name, &why);
    }
    // Damage found before this process (the damage list) or by recovery stops the
    // machine taking writes: mend it now, not in the window.
    if let Some((seq, what)) = machine.damage().into_iter().next() {
        let why = format!("segment {seq} of the journal is damaged: {what}");
        tracing::warn!(machine = %name, "{why}; resync required now");
        if let Err(e) = SourceResync::require(&site, &name, &why)
            .and_then(|()| super::resync_schedule::request_now(&site, &name))
        {
            tracing::error!(machine = %name, "{e}");
        }
    }
    while !stop.load(Ordering::Acquire) {
        control.drain(&machine);
        // The target says its copy is not complete (its replica was lost and begun
        // again, say): what this loop or the mark knew no longer holds.
        if shipper.target_copy_complete() == Some(false) {
            initial_done = false;
            if copied_before {
                copied_before = false;
                stale_mark = true;
            }
        }
        // Gone for good (a removal that failed is tried again): a mark left behind
        // would say the copy is complete to the next serve.
        if stale_mark {
            match CopyMark::clear(&site, &name) {
                Ok(()) => {
                    stale_mark = false;
                    tracing::warn!(
                        machine = %name,
                        "{} has no complete copy: the copy mark is removed",
                        rel.target
                    );
                }
                Err(e) => tracing::warn!(machine = %name, "copy mark: {e}"),
            }
        }
        if let Some((lsn, generation, tx)) = control.promote.take() {
            use super::shipper::PromoteOutcome;
            let outcome = shipper.promote_at_target(&machine, lsn, generation);
            match &outcome {
                PromoteOutcome::Promoted => {
                    crate::failpoint::hit("planned:after-promoted");
                    let fence = crate::protection::Fence {
                        by_site: rel.target_id().map(|id| id.0).unwrap_or([0; 32]),
                        generation,
                        at_ns: crate::format::now_ns(),
                        reason: format!("planned failover at LSN {lsn}"),
                    };
                    let persisted = machine.persist_fence(fence);
                    let _ = tx.send(match persisted {
                        Ok(()) => outcome,
                        Err(e) => PromoteOutcome::Unknown(e),
                    });
                    let mut s = status.lock();
                    s.state = State::FailedOver;
                    s.health = Health::Healthy;
                    s.reason = format!(
                        "failed over to {} at LSN {lsn} (generation {generation}): writes \
                         are refused and replication has stopped",
                        rel.target
                    );
                    drop(s);
                    let why = crate::error::Failure {
                        class: ErrorClass::Critical,
                        code: Some(crate::replication::protocol::RefusalCode::Fenced),
                        message: format!("{name} was failed over to {}", rel.target),
                    };
                    park(&stop, shipper, control, why);
                    return;
                }
                PromoteOutcome::NotPromoted(_) => {}
                PromoteOutcome::Unknown(_) => control.resolve_intent = true,
            }
            let _ = tx.send(outcome);
            continue;
        }
        if control.paused.load(Ordering::Acquire) {
            control.failed("shipping is paused");
            // The journal grows while nothing ships: past the resync threshold the
            // machine needs a resync, as when its target is unreachable, and then
            // nothing of it need be held (the resync brings the target along). A
            // resync already required and not begun when the pause came counts; one
            // under way (paused between its batches) keeps its hold, as it would. The
            // hold is let go only for a resync on record: read back from its file.
            let why = ", while shipping was paused";
            let look = match &paused_resync {
                None => true,
                Some(PausedResync::NotRequired) => {
                    (initial_done || copied_before)
                        && overflowed(&machine, &shipper, &cfg, &site, why)
                }
                Some(_) => false,
            };
            if look {
                paused_resync = Some(match SourceResync::load(&site, &name) {
                    Ok(Some(req)) if req.base.is_some() => PausedResync::UnderWay,
                    Ok(Some(req)) => PausedResync::Required(req.reason),
                    Ok(None) => PausedResync::NotRequired,
                    Err(e) => {
                        tracing::error!(machine = %name, "resync state: {e}");
                        PausedResync::NotRequired
                    }
                });
            }
            let mut s = status.lock();
            s.reason = paused_reason(&rel.target);
            if let Some(PausedResync::Required(why)) = &paused_resync {
                if shipper.target_copy_complete() != Some(false) {
                    shipper.release_hold(machine.status().last_lsn);
                }
                s.state = State::ResyncRequired;
                s.health = Health::Warning;
                s.progress = None;
                s.reason = format!(
                    "resync required: {why}; {}: it resynchronises once resumed",
                    s.reason
                );
            }
            drop(s);
            control.wait(&stop, Duration::from_millis(50), &machine);
            continue;
        }
        if paused_resync.take().is_some() {
            // Resumed: the paused reason goes now, not at the end of the next pass.
            status.lock().reason = format!("resumed; shipping to {}", rel.target);
        }
        // A resync required: wait for the window (or --now), then run it.
        let pending = match SourceResync::load(&site, &name) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(machine = %name, "resync state: {e}");
                None
            }
        };
        if let Some(req) = pending {
            // Meanwhile the journal must stay bounded: nothing is shipped, so let the
            // compactor merge everything (the resync brings the target along) — unless
            // the target said in this process that its copy is not complete: that copy
            // needs the parents frozen at its base (the resync then finds no copy to
            // compare with, and the copy goes on).
            if req.base.is_none() && shipper.target_copy_complete() != Some(false) {
                shipper.release_hold(machine.status().last_lsn);
            }
            let now = super::resync_schedule::requested_now(&site, &name);
            if !(now || req.base.is_some() || window.open_now()) {
                let mut s = status.lock();
                s.state = State::ResyncRequired;
                s.health = Health::Warning;
                s.progress = None;
                s.reason = format!(
                    "resync required: {}; it starts in the resync window ({}{}) or with \
                     `replog resync --now`",
                    req.reason,
                    cfg.resync_window,
                    if cfg.resync_weekends {
                        " and weekends"
                    } else {
                        ""
                    }
                );
                control.failed(&s.reason);
                drop(s);
                control.wait(
                    &stop,
                    Duration::from_millis(cfg.seal_interval_ms.clamp(100, 1000)),
                    &machine,
                );
                continue;
            }
            {
                let mut s = status.lock();
                s.state = State::Resyncing;
                s.health = Health::Warning;
                s.progress = Some(0.0);
                s.reason = format!("resynchronising: {}", req.reason);
            }
            let st = status.clone();
            shipper.on_progress(Box::new(move |done, total| {
                let mut s = st.lock();
                s.progress = Some(if total == 0 {
                    1.0
                } else {
                    done as f64 / total as f64
                });
            }));
            let st = status.clone();
            shipper.report_resync_to(Box::new(move |c| st.lock().resync = Some(c)));
            jobs.resync_started(&req.reason);
            match shipper.resync_batched(&machine, cfg.resync_chunk_bytes, cfg.resync_batch_bytes) {
                Ok(r) => {
                    failures = 0;
                    jobs.resync_done(&r);
                    tracing::info!(
                        machine = %name,
                        "resynchronised: {} chunks compared, {} sent ({} bytes)",
                        r.compared,
                        r.sent_chunks,
                        r.sent_bytes
                    );
                    let mut s = status.lock();
                    s.resync = Some(crate::protection::status::ResyncCounters {
                        resumed_from: r.resumed_from,
                        chunks_compared: r.compared,
                        chunks_total: r.compared,
                        chunks_sent: r.sent_chunks,
                        bytes_sent: r.sent_bytes,
                    });
                    s.state = State::Protected;
                    s.progress = None;
                    s.health = Health::Healthy;
                    s.reason = format!("resynchronised; replicating to {}", rel.target);
                    continue;
                }
                // Paused mid-resync: given up between batches, resumed from there once
                // shipping is resumed; nothing failed.
                Err(e) if control.paused.load(Ordering::Acquire) && is_interrupted(&e) => {
                    continue;
                }
                Err(e) => match e.class() {
                    ErrorClass::Retry | ErrorClass::NeedsResync => {
                        let wait = cfg.retry_delay(failures);
                        failures += 1;
                        tracing::warn!(machine = %name, "resync failed ({e}); retry {failures} in {wait:?}");
                        let mut s = status.lock();
                        s.health = Health::Warning;
                        s.reason = format!(
                            "resync failed: {e}; retry {failures} in {:.0} s",
                            wait.as_secs_f64()
                        );
                        control.failed(&s.reason);
                        drop(s);
                        control.wait(&stop, wait, &machine);
                        continue;
                    }
                    ErrorClass::Critical => {
                        jobs.failed(&e);
                        let mut s = status.lock();
                        s.health = Health::Critical;
                        s.reason = format!("resync failed: {e}; stopped until an operator acts");
                        drop(s);
                        // Fenced: recorded, and status says failed-over.
                        fenced_by_target(&machine, &rel, &e, &status);
                        park(&stop, shipper, control, crate::error::Failure::of(&e));
                        return;
                    }
                },
            }
        }
        if let Err(e) = machine.seal() {
            let mut s = status.lock();
            s.health = Health::Critical;
            s.reason = format!("the journal failed: {e}");
            drop(s);
            jobs.failed(&e);
            park(&stop, shipper, control, crate::error::Failure::of(&e));
            return;
        }
        // A pass that only asks how a lost answer ended announces no promotion.
        shipper.announce_promotion(!control.resolve_intent);
        match shipper.ship_once(&machine) {
            Ok(report) => {
                failures = 0;
                let metrics = crate::metrics::get();
                let label = metrics.machine(&name);
                metrics
                    .shipped_bytes
                    .get_or_create(&label)
                    .inc_by(report.bytes);
                metrics
                    .shipped_segments
                    .get_or_create(&label)
                    .inc_by(report.segments as u64);
                if control.resolve_intent {
                    // The target took our generation: it did not promote.
                    match machine.set_intent(None) {
                        Ok(()) => {
                            control.resolve_intent = false;
                            machine.unfence();
                            tracing::info!(
                                machine = %name,
                                "the planned failover did not happen at {}: takes writes again",
                                rel.target
                            );
                        }
                        Err(e) => {
                            tracing::error!(machine = %name, "clear the failover intent: {e}")
                        }
                    }
                }
                control.acked(report.acked_lsn);
                jobs.pass_ok(report.acked_lsn, &rel.target);
                initial_done |= report.initial_completed || report.initial_bytes == 0;
                if initial_done && !copied_before {
                    match CopyMark::record(&site, &name, &rel, machine.generation()) {
                        Ok(()) => copied_before = true,
                        Err(e) => tracing::warn!(machine = %name, "copy mark: {e}"),
                    }
                }
                if jobs.reprotecting {
                    let view = shipper.reprotect_state().cloned();
                    jobs.reprotect_pass(
                        &machine,
                        &rel.target,
                        view.as_ref(),
                        &report,
                        initial_done,
                    );
                    let mut s = status.lock();
                    if machine.changed_map().is_none() {
                        jobs.reprotecting = false;
                        s.reprotect = None;
                    } else if initial_done {
                        let c = s.reprotect.get_or_insert_with(Default::default);
                        c.stage = "caught up".into();
                        c.blocks_left = 0;
                        c.bytes_sent = c.bytes_sent.max(report.initial_bytes);
                    }
                } else {
                    jobs.nothing_left(report.initial_bytes);
                }
                let mut s = status.lock();
                s.acked_lsn = report.acked_lsn;
                if initial_done {
                    s.state = State::Protected;
                    s.progress = None;
                }
                s.health = Health::Healthy;
                s.reason = format!("replicating to {}", rel.target);
                drop(s);
                // Too much journal the target lacks: stop holding it, resync later.
                if initial_done && overflowed(&machine, &shipper, &cfg, &site, "") {
                    continue;
                }
            }
            // Paused mid-copy: the initial copy is given up between chunks and goes
            // on from the target's position once resumed; nothing failed.
            Err(e) if control.paused.load(Ordering::Acquire) && is_interrupted(&e) => {
                continue;
            }
            // The target fails the machine over and asks us to shut down first: a
            // planned failover, begun here, ships everything and has it promoted.
            Err(Error::Refused {
                code: super::protocol::RefusalCode::FailoverRequested,
                message,
                ..
            }) => {
                tracing::warn!(machine = %name, "{}: {message}", rel.target);
                match &control.on_failover_request {
                    Some(begin) if machine.intent().is_none() && !machine.failed_over() => {
                        begin(&name)
                    }
                    _ => {}
                }
                control.wait(&stop, Duration::from_millis(50), &machine);
                continue;
            }
            Err(e) => match e.class() {
                ErrorClass::NeedsResync => {
                    control.failed_err(&e);
                    jobs.failed(&e);
                    tracing::warn!(machine = %name, "chain broken: {e}; resync required");
                    if let Err(e2) = SourceResync::require(&site, &name, &e.to_string()) {
                        tracing::error!(machine = %name, "{e2}");
                    }
                    // Damage stops the machine taking writes: mend it now, not in the
                    // window.
                    if machine.has_damage() {
                        let _ = super::resync_schedule::request_now(&site, &name);
                    }
                    control.wait(
                        &stop,
                        Duration::from_millis(cfg.seal_interval_ms.clamp(100, 1000)),
                        &machine,
                    );
                    continue;
                }
                ErrorClass::Critical => {
                    jobs.failed(&e);
                    if fenced_by_target(&machine, &rel, &e, &status) {
                        park(&stop, shipper, control, crate::error::Failure::of(&e));
                        return;
                    }
                    tracing::error!(machine = machine.name(), "replication stopped: {e}");
                    let hint = match &e {
                        Error::Auth { .. } => {
                            " (check that both sites trust each other with `replog trust`)"
                        }
                        _ => "",
                    };
                    let mut s = status.lock();
                    s.state = State::Protected;
                    s.health = Health::Critical;
                    s.reason = format!("{e}{hint}; replication stopped until an operator acts");
                    drop(s);
                    park(&stop, shipper, control, crate::error::Failure::of(&e));
                    return;
                }
                ErrorClass::Retry => {
                    control.failed_err(&e);
                    let wait = cfg.retry_delay(failures);
                    failures += 1;
                    let metrics = crate::metrics::get();
                    metrics.retries.get_or_create(&metrics.machine(&name)).inc();
                    tracing::warn!(
                        machine = machine.name(),
                        "replication failed ({e}); retry {failures} in {wait:?}"
                    );
                    // Unreachable for long with the journal growing: resync later.
                    let why = ", while the target was unreachable";
                    if (initial_done || copied_before)
                        && overflowed(&machine, &shipper, &cfg, &site, why)
                    {
                        continue;
                    }
                    {
                        let mut s = status.lock();
                        s.health = Health::Warning;
                        s.reason = format!("{e}; retry {failures} in {:.0} s", wait.as_secs_f64());
                    }
                    control.wait(&stop, wait, &machine);
                    continue;
                }
            },
        }
        // Until the next seal is due, or at once when the journal sealed a full
        // segment meanwhile: a busy guest fills one in well under the interval, and
        // waiting the whole interval after every pass let the lag grow to several
        // seconds at 100 MB/s.
        control.wait_for_sealed(
            &stop,
            Duration::from_millis(cfg.seal_interval_ms),
            &machine,
            shipper.acked_lsn(),
        );
    }
}
