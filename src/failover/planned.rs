//! The primary's half of a planned failover: zero loss, all or nothing.
//!
//! 1. **Fence.** The intent is persisted in `machine.meta` (target, generation + 1,
//!    job) and writes are refused from then on (EROFS; a write in flight completes
//!    first); the journal is flushed and sealed: its last LSN is the point.
//! 2. **Ship** everything and wait for the target's acknowledgement of that LSN.
//! 3. **Promote**: `Promote { lsn, generation + 1 }`; the target promotes at exactly
//!    that LSN, verifies the point's digests and answers `Promoted`.
//! 4. **Fenced for good**: the fence is persisted (the intent goes with it); the
//!    machine is `failed-over`, its loops stop, what its target never acknowledged
//!    (nothing, here) stays in its journal.
//!
//! A failure before the target promoted (unreachable, refused, a step that fails)
//! clears the intent and unfences: the machine is `protected` again, and the job
//! fails with the reason. When the answer to `Promote` is lost, the next contact with
//! the target tells (refused as fenced: promoted; answered: not) — the ship loop
//! resolves it, also after a restart, since the intent is persisted.

use super::Host;
use crate::control::Reply;
use crate::error::{Error, Result};
use crate::jobs::{JobHandle, JobKind, JobSpec};
use crate::protection::{Intent, Role};
use crate::replication::relationship::Relationship;
use crate::replication::shipper::PromoteOutcome;
use crate::volume::Machine;
use std::time::{Duration, Instant};

/// How a primary ships for a planned failover: its running ship loop (serve), or a
/// shipper of its own (offline).
pub trait Shipping {
    /// Seal and ship everything; the LSN the target acknowledged.
    fn ship_all(&self, m: &Machine) -> Result<u64>;
    /// Ask the target to promote.
    fn promote(&self, m: &Machine, lsn: u64, generation: u32) -> PromoteOutcome;
    /// The outcome was lost: find out (contact the target), waiting at most `wait`.
    /// Ok(true): promoted (the fence is persisted); Ok(false): not (the intent is
    /// cleared and the machine unfenced).
    fn resolve(&self, m: &Machine, wait: Duration) -> Result<bool>;
}

/// How long shipping and the target's promotion may take.
const SHIP_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a lost answer is waited for.
const RESOLVE_WAIT: Duration = Duration::from_secs(60);

/// `replog failover SITE MACHINE --planned`; `note` says who asked, in the job (the
/// target, for `--shutdown-source`).
pub fn run(host: &dyn Host, ship: &dyn Shipping, name: &str, note: Option<&str>) -> Result<Reply> {
    run_as(host, ship, name, note, &JobSpec::default())
}

/// [`run`], recorded as `spec` says (a plan's run chooses the job's ID).
pub fn run_as(
    host: &dyn Host,
    ship: &dyn Shipping,
    name: &str,
    note: Option<&str>,
    spec: &JobSpec,
) -> Result<Reply> {
    let site = host.site().path().to_path_buf();
    let m = host.machine(name)?;
    let rel = Relationship::load(&site, name)?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{name} is not protected: there is no target to fail over to"
        ))
    })?;
    if m.role() != Role::Primary {
        return Err(Error::InvalidInput(format!(
            "{name} is a {} here, not a primary: a planned failover runs at the primary",
            m.role()
        )));
    }
    if m.failed_over() {
        return Err(Error::InvalidInput(format!(
            "{name} was already failed over ({})",
            m.fenced().unwrap_or_default()
        )));
    }
    if let Some(i) = m.intent() {
        return Err(Error::Busy(format!(
            "a planned failover of {name} (job {}) has not finished; its outcome is known \
             at the next contact with {}",
            i.job, i.target
        )));
    }
    if m.pending().is_some() {
        return Err(Error::InvalidInput(format!(
            "{name}'s own failover is not committed yet: commit it first"
        )));
    }
    if rel.paused {
        return Err(Error::InvalidInput(format!(
            "shipping of {name} is paused (`replog pause`), and a planned failover ships \
             everything first: `replog resume {} {name}`, then fail over",
            site.display()
        )));
    }
    let target_id = rel.target_id()?;
    let generation = m.generation() + 1;
    let mut job = spec.start_on(
        host.site().storage(),
        &site,
        JobKind::FailoverPlanned,
        Some(name),
    )?;
    let id = job.id().to_string();
    let started = Instant::now();
    if let Some(n) = note {
        job.step("who asked");
        job.step_done(Some(n.to_string()))?;
    }

    job.step("fence writes");
    let fenced = (|| -> Result<u64> {
        m.set_intent(Some(Intent {
            target_site: target_id.0,
            target: rel.target.clone(),
            generation,
            job: id.clone(),
            started_ns: crate::format::now_ns(),
        }))?;
        m.fence(&format!(
            "a planned failover to {} is under way (job {id})",
            rel.target
        ));
        m.flush()?;
        // The promoted point must be a point the replica holds: when the journal
        // holds none at its last LSN (nothing written since the initial copy, whose
        // base is not a point), record one.
        let st = m.status();
        if st.last_point.map(|p| p.lsn) != Some(st.last_lsn) {
            m.checkpoint()?;
        }
        m.seal()?;
        Ok(m.status().last_lsn)
    })();
    let mut lsn = match fenced {
        Ok(l) => l,
        Err(e) => return Err(roll_back(&m, job, e, &id)),
    };
    if let Err(e) = job.step_done(Some(format!("writes refused; the last LSN is {lsn}"))) {
        return Err(roll_back(&m, job, e, &id));
    }
    crate::failpoint::hit("planned:after-intent");

    job.step("ship everything and have it acknowledged");
    match ship_to_the_end(ship, &m, lsn) {
        Ok(acked) if acked >= lsn => {
            let _ = job.step_done(Some(format!(
                "{} acknowledged up to LSN {acked}{}",
                rel.target,
                if acked > lsn {
                    format!(
                        " (after {lsn}, points only: a resync or a checkpoint ran while \
                         writes were refused; the promoted point is LSN {acked})"
                    )
                } else {
                    String::new()
                }
            )));
            lsn = acked;
            crate::failpoint::hit("planned:after-ship");
        }
        Ok(acked) => {
            let e = Error::Busy(format!(
                "{} acknowledged up to LSN {acked}, not {lsn}",
                rel.target
            ));
            return Err(roll_back(&m, job, e, &id));
        }
        Err(e) => return Err(roll_back(&m, job, e, &id)),
    }

    job.step("promote at the target");
    let promoted = match ship.promote(&m, lsn, generation) {
        PromoteOutcome::Promoted => true,
        // The target is at a newer generation already (an unplanned failover there
        // meanwhile, e.g. `--shutdown-source` that stopped waiting): fenced for good.
        PromoteOutcome::NotPromoted(
            e @ Error::Refused {
                code: crate::replication::protocol::RefusalCode::Fenced,
                ..
            },
        ) => {
            let fence = crate::protection::Fence {
                by_site: target_id.0,
                generation,
                at_ns: crate::format::now_ns(),
                reason: format!("{} failed {name} over meanwhile: {e}", rel.target),
            };
            let persisted = m.persist_fence(fence);
            let why = Error::InvalidInput(format!(
                "the planned failover of {name} did not run to its end: {e}; {name} stays \
                 fenced ({}): the unshipped tail is kept in its journal",
                match persisted {
                    Ok(()) => "failed-over".to_string(),
                    Err(e2) => format!("the fence could not be persisted: {e2}"),
                }
            ));
            let _ = job.fail(&why);
            return Err(with_job(why, &id));
        }
        PromoteOutcome::NotPromoted(e) => return Err(roll_back(&m, job, e, &id)),
        PromoteOutcome::Unknown(e) => {
            job.progress(format!(
                "the answer was lost ({e}); asking {} how it ended",
                rel.target
            ));
            match ship.resolve(&m, RESOLVE_WAIT) {
                Ok(p) => p,
                Err(e2) => {
                    let why = Error::Busy(format!(
                        "the planned failover's outcome is not known ({e}; then {e2}): {name} \
                         stays fenced until {} answers (the shipping loop asks at every \
                         contact)",
                        rel.target
                    ));
                    let _ = job.fail(&why);
                    return Err(with_job(why, &id));
                }
            }
        }
    };
    if !promoted {
        let e = Error::Busy(format!("{} did not promote {name}", rel.target));
        let _ = job.fail(&e);
        return Err(with_job(
            Error::Busy(format!(
                "the planned failover of {name} did not happen: {} did not promote it; {name} \
                 takes writes again",
                rel.target
            )),
            &id,
        ));
    }
    // The fence is persisted by whoever learnt of the promotion; make sure.
    if !m.failed_over() {
        let fence = crate::protection::Fence {
            by_site: target_id.0,
            generation,
            at_ns: crate::format::now_ns(),
            reason: format!("planned failover at LSN {lsn}"),
        };
        if let Err(e) = m.persist_fence(fence) {
            let _ = job.fail(&e);
            return Err(with_job(e, &id));
        }
    }
    let _ = job.step_done(Some(format!(
        "{} promoted {name} at LSN {lsn} to generation {generation}",
        rel.target
    )));
    drop(m);
    // A failed-over machine has no loops (its journal is kept).
    host.stop_loops(name)?;
    let job_id = id.clone();
    job.finish(|| {
        let man = Machine::read_manifest(
            host.site().storage().as_ref(),
            &host.site().machine_dir(name)?,
        )?;
        match (&man.fence, &man.intent) {
            (Some(f), None) if f.generation == generation => Ok(format!(
                "{name} is failed-over here (fenced, generation {} runs at {}); zero loss: \
                 everything up to LSN {lsn} was acknowledged before the promotion",
                f.generation, rel.target
            )),
            _ => Err(Error::InvalidInput(format!(
                "{name}'s manifest does not record the failover to generation {generation}"
            ))),
        }
    })
    .map_err(|e| with_job(e, &job_id))?;
    Ok(Reply {
        ok: true,
        lsn: Some(lsn),
        job: Some(id),
        detail: Some(format!(
            "{name} failed over to {} at LSN {lsn} in {:.1} s with zero loss: it runs there \
             now (generation {generation}, commit pending: `replog commit` there); this \
             site's copy is fenced",
            rel.target,
            started.elapsed().as_secs_f64()
        )),
        ..Default::default()
    })
}

/// Ship everything and have it acknowledged, up to the machine's last LSN — which
/// may have grown past `fenced_at` (the last LSN when writes were fenced) by points
/// only: a resync that was under way appends its first consistent point, an
/// operator's checkpoint or a flush a point of their own. The state is the same at
/// all of them, and the target may keep only the newest (a resync hides the points
/// before its end), so the promotion is at the newest, once every record after
/// `fenced_at` is known to be a point. Returns the LSN acknowledged, the last.
fn ship_to_the_end(ship: &dyn Shipping, m: &Machine, fenced_at: u64) -> Result<u64> {
    let mut acked = ship.ship_all(m)?;
    for _ in 0..10 {
        let last = m.status().last_lsn;
        if acked >= last {
            break;
        }
        acked = ship.ship_all(m)?;
    }
    let last = m.status().last_lsn;
    if acked < last {
        return Err(Error::Busy(format!(
            "the journal kept growing while writes were refused (LSN {last}, acknowledged \
             {acked})"
        )));
    }
    if acked > fenced_at {
        let tail = m.records_after(fenced_at)?;
        if !tail.ranges.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{} data records followed LSN {fenced_at} although writes were refused",
                tail.ranges.len()
            )));
        }
    }
    Ok(acked)
}

/// A step before the promotion failed: take writes again, fail the job.
fn roll_back(m: &Machine, job: JobHandle, e: Error, id: &str) -> Error {
    let cleared = m.set_intent(None);
    if cleared.is_ok() {
        m.unfence();
    }
    let _ = job.fail(&e);
    let tail = match cleared {
        // Fenced by the target meanwhile (an unplanned failover there): for good.
        Ok(()) if m.failed_over() => format!(
            "{} stays fenced: {}",
            m.name(),
            m.fenced().unwrap_or_default()
        ),
        Ok(()) => format!("{} takes writes again", m.name()),
        Err(e2) => format!(
            "{} stays fenced: its failover intent could not be cleared ({e2})",
            m.name()
        ),
    };
    with_job(
        Error::Busy(format!(
            "the planned failover of {} did not happen: {e}; {tail}",
            m.name()
        )),
        id,
    )
}

fn with_job(e: Error, id: &str) -> Error {
    match e {
        Error::Busy(m) => Error::Busy(format!("{m} (job {id})")),
        Error::InvalidInput(m) => Error::InvalidInput(format!("{m} (job {id})")),
        other => other,
    }
}

/// A shipper of its own, for a planned failover with no serve running.
pub struct OfflineShipping {
    pub site: std::path::PathBuf,
    pub target: String,
    shipper: parking_lot::Mutex<Option<crate::replication::shipper::Shipper>>,
}

impl OfflineShipping {
    pub fn new(site: &std::path::Path, target: &str) -> Self {
        OfflineShipping {
            site: site.to_path_buf(),
            target: target.to_string(),
            shipper: parking_lot::Mutex::new(None),
        }
    }

    fn with<T>(
        &self,
        m: &Machine,
        f: impl FnOnce(&mut crate::replication::shipper::Shipper) -> T,
    ) -> T {
        let mut s = self.shipper.lock();
        let shipper = s.get_or_insert_with(|| {
            crate::replication::shipper::Shipper::new(&self.site, m, &self.target)
        });
        f(shipper)
    }
}

impl Shipping for OfflineShipping {
    fn ship_all(&self, m: &Machine) -> Result<u64> {
        self.with(m, |s| {
            let want = m.status().last_lsn;
            let mut acked = 0;
            for _ in 0..100 {
                acked = s.ship_once(m)?.acked_lsn;
                if acked >= want {
                    break;
                }
            }
            Ok(acked)
        })
    }

    fn promote(&self, m: &Machine, lsn: u64, generation: u32) -> PromoteOutcome {
        self.with(m, |s| s.promote_at_target(m, lsn, generation))
    }

    fn resolve(&self, m: &Machine, _wait: Duration) -> Result<bool> {
        let contact = self.with(m, |s| {
            s.announce_promotion(false);
            s.ship_once(m)
        });
        match contact {
            Ok(_) => {
                m.set_intent(None)?;
                m.unfence();
                Ok(false)
            }
            Err(Error::Refused {
                code: crate::replication::protocol::RefusalCode::Fenced,
                ..
            }) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// A running serve's ship loop (through its handle).
pub struct LoopShipping(pub crate::replication::run::ShipHandle);

impl Shipping for LoopShipping {
    fn ship_all(&self, _m: &Machine) -> Result<u64> {
        self.0.ship_now(SHIP_TIMEOUT)
    }

    fn promote(&self, _m: &Machine, lsn: u64, generation: u32) -> PromoteOutcome {
        self.0.promote(lsn, generation, SHIP_TIMEOUT)
    }

    fn resolve(&self, m: &Machine, wait: Duration) -> Result<bool> {
        // The loop asks at its next contact and clears the intent either way.
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if m.intent().is_none() {
                return Ok(m.failed_over());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::Busy(format!(
            "no contact with the target within {} s",
            wait.as_secs()
        )))
    }
}
