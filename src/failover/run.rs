//! The failover commands as jobs: what `replog failover` / `replog commit` do once
//! they reach a site (through serve's control socket, or offline). Each is a job
//! whose last step checks the end state: a promoted machine or test copy succeeds
//! only once its disks are open and the point it stands on matches the source's
//! digests; a cleaned-up test copy only once it is gone and its replica unchanged.

use super::{verify, Host};
use crate::control::Reply;
use crate::error::{Error, Result};
use crate::jobs::{JobHandle, JobKind, JobSpec};
use crate::protection::FailoverKind;
use crate::replica::replay::PointImage;

/// The step of a failover job after which the promoted machine or test copy exists
/// (a plan's cleanup removes the copies of test failovers that got past it).
pub const PROMOTE_STEP: &str = "promote";

/// A job's reply: what was done, the job, the LSN.
fn reply(detail: String, job: &str, lsn: Option<u64>) -> Reply {
    Reply {
        ok: true,
        detail: Some(detail),
        lsn,
        job: Some(job.to_string()),
        ..Default::default()
    }
}

/// Begin the job of `kind` for `machine` as `spec` says, recorded on the site's
/// storage.
fn start(host: &dyn Host, spec: &JobSpec, kind: JobKind, machine: &str) -> Result<JobHandle> {
    let site = host.site();
    spec.start_on(site.storage(), site.path(), kind, Some(machine))
}

/// Run `work` as job `job`; a failure ends the job with it (and names the job).
fn as_job<T>(
    job: JobHandle,
    work: impl FnOnce(&mut JobHandle) -> Result<T>,
) -> Result<(JobHandle, T)> {
    let mut job = job;
    match work(&mut job) {
        Ok(t) => Ok((job, t)),
        Err(e) => {
            let id = job.id().to_string();
            job.fail(&e);
            Err(with_job(e, &id))
        }
    }
}

/// `e`, saying which job recorded it (the class stays).
fn with_job(e: Error, id: &str) -> Error {
    match e {
        Error::InvalidInput(m) => Error::InvalidInput(format!("{m} (job {id})")),
        Error::NotFound(m) => Error::NotFound(format!("{m} (job {id})")),
        Error::AlreadyExists(m) => Error::AlreadyExists(format!("{m} (job {id})")),
        other => other,
    }
}

/// Unplanned or test failover of replica `machine` at POINT `at` (test: as
/// `as_name`).
pub fn failover(
    host: &dyn Host,
    machine: &str,
    kind: FailoverKind,
    at: &str,
    as_name: Option<&str>,
) -> Result<Reply> {
    failover_as(host, machine, kind, at, as_name, &JobSpec::default())
}

/// [`failover`], recorded as `spec` says (a plan's run chooses the job's ID).
pub fn failover_as(
    host: &dyn Host,
    machine: &str,
    kind: FailoverKind,
    at: &str,
    as_name: Option<&str>,
    spec: &JobSpec,
) -> Result<Reply> {
    let job = start(host, spec, super::job_kind(kind), machine)?;
    let (job, promoted) = as_job(job, |job| {
        job.step(PROMOTE_STEP);
        let p = super::promote(host.site(), host.replicas(), machine, at, kind, as_name)?;
        job.step_done(Some(format!(
            "{} at {}, generation {}: nothing copied",
            p.name,
            crate::replica::points::describe(p.lsn, p.time_ns, p.app_consistent),
            p.generation
        )))?;
        job.step("open the disks");
        host.open(&p.name)?;
        let m = host.machine(&p.name)?;
        job.step_done(Some(format!(
            "{} writable: {}",
            p.name,
            m.disk_names().join(", ")
        )))?;
        crate::failpoint::hit("failover:before-verify");
        Ok(p)
    })?;
    let id = job.id().to_string();
    let name = promoted.name.clone();
    finish_verified(host, job, machine, &name, promoted.lsn)?;
    count_failover(machine, kind);
    Ok(reply(
        format!(
            "{} {} failover: {name} is writable at pt-{} (generation {}); {}",
            machine,
            kind,
            promoted.lsn,
            promoted.generation,
            match kind {
                FailoverKind::Test => format!(
                    "replication of {machine} goes on; remove the copy with `replog failover \
                     SITE {machine} --cleanup-test{}`",
                    if name == super::test_name(machine) {
                        String::new()
                    } else {
                        format!(" --as {name}")
                    }
                ),
                _ => format!(
                    "commit it with `replog commit SITE {machine}`, or change its point or \
                     cancel it"
                ),
            }
        ),
        &id,
        Some(promoted.lsn),
    ))
}

/// The end state of a failover of replica `machine` as `name` at `lsn`: `name` is
/// open standing on the replica at `lsn`, and the point matches the source's digests.
fn verify_promoted(host: &dyn Host, machine: &str, name: &str, lsn: u64) -> Result<String> {
    let image = PointImage::open_exact(host.replicas().open_readonly(machine)?, lsn)?;
    let v = verify::verify(&image)?;
    let m = host.machine(name)?;
    let base = m
        .base()
        .ok_or_else(|| Error::InvalidInput(format!("{name} does not stand on the replica")))?;
    if base.replica != machine || base.lsn != lsn {
        return Err(Error::InvalidInput(format!(
            "{name} stands on {} at LSN {}, not {machine} at {lsn}",
            base.replica, base.lsn
        )));
    }
    Ok(if v.digests_matched {
        format!(
            "the disks open; every disk matches the source's digests at pt-{lsn} ({} bytes \
             read)",
            v.bytes
        )
    } else {
        format!(
            "the disks open; pt-{lsn} carries no digests (the initial copy): every one of its \
             {} bytes read was authenticated",
            v.bytes
        )
    })
}

/// A failover of replica `machine` as `name` (its test copy, or itself) whose job did
/// not end well although the promotion was made (serve stopped between the two, or
/// the check failed): check it now, as a job of its own, and say so. A recovery
/// plan's resume takes over what it finds this way instead of failing over twice.
pub fn verify_existing(
    host: &dyn Host,
    machine: &str,
    kind: FailoverKind,
    name: &str,
    spec: &JobSpec,
) -> Result<Reply> {
    crate::names::validate_name("machine", name)?;
    let job = start(host, spec, super::job_kind(kind), machine)?;
    let (job, lsn) = as_job(job, |job| {
        job.step("find the promotion made before");
        let man = super::manifest_of(host.site(), name)?;
        let lsn = match &man.base {
            Some(b) if super::made_by(&man, machine, kind) => b.lsn,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{name} is not the result of a {kind} failover of {machine}"
                )))
            }
        };
        host.open(name)?;
        // A copy whose earlier check failed was fenced then: an operator looks at it.
        if let Some(why) = host.machine(name)?.fenced() {
            return Err(Error::InvalidInput(format!("{name} refuses writes: {why}")));
        }
        job.step_done(Some(format!("{name} stands on {machine} at pt-{lsn}")))?;
        Ok(lsn)
    })?;
    let id = job.id().to_string();
    finish_verified(host, job, machine, name, lsn)?;
    Ok(reply(
        format!("{name} ({kind} failover of {machine}) checked: writable at pt-{lsn}"),
        &id,
        Some(lsn),
    ))
}

/// One more verified failover of `machine` in the metrics.
fn count_failover(machine: &str, kind: FailoverKind) {
    crate::metrics::get()
        .failovers
        .get_or_create(&crate::metrics::FailoverLabel {
            machine: machine.to_string(),
            kind: kind.to_string(),
        })
        .inc();
}

/// End `job` once `name` (promoted from `machine` at `lsn`) checks out
/// ([`verify_promoted`]); if it does not, fence it — no writes until an operator
/// looks — and fail the job.
fn finish_verified(
    host: &dyn Host,
    job: JobHandle,
    machine: &str,
    name: &str,
    lsn: u64,
) -> Result<()> {
    let id = job.id().to_string();
    if let Err(e) = job.finish(|| verify_promoted(host, machine, name, lsn)) {
        if let Ok(m) = host.machine(name) {
            m.fence(&format!("the failover's check failed: {e}"));
        }
        return Err(with_job(e, &id));
    }
    Ok(())
}

/// Remove test copy `as_name` (default `MACHINE-test`) of replica `machine`.
pub fn cleanup_test(
    host: &dyn Host,
    machine: &str,
    as_name: Option<&str>,
    note: Option<&str>,
) -> Result<Reply> {
    let name = as_name
        .map(str::to_string)
        .unwrap_or_else(|| super::test_name(machine));
    crate::names::validate_name("test copy", &name)?;
    let job = start(host, &JobSpec::default(), JobKind::CleanupTest, machine)?;
    let replica_before = host
        .replicas()
        .open_readonly(machine)
        .map(|s| (s.manifest().clone(), s.promotion().ok().flatten()));
    let (job, base) = as_job(job, |job| {
        if let Some(n) = note {
            job.step("note");
            job.step_done(Some(n.to_string()))?;
        }
        job.step("remove the test copy");
        let base = super::cleanup_test(host, machine, &name)?;
        job.step_done(Some(format!("{name} removed")))?;
        Ok(base)
    })?;
    let id = job.id().to_string();
    job.finish(|| {
        if host
            .site()
            .storage()
            .exists(&host.site().machine_dir(&name)?)
        {
            return Err(Error::InvalidInput(format!("{name} is still there")));
        }
        let after = host
            .replicas()
            .open_readonly(machine)
            .map(|s| (s.manifest().clone(), s.promotion().ok().flatten()));
        match (&replica_before, &after) {
            (Ok(b), Ok(a)) if a == b => Ok(format!(
                "{name} is gone; replica {machine} is as it was (generation {}, not promoted)",
                a.0.generation
            )),
            _ => Err(Error::InvalidInput(format!(
                "replica {machine} changed while its test copy was removed"
            ))),
        }
    })
    .map_err(|e| with_job(e, &id))?;
    Ok(reply(
        format!(
            "test copy {name} of {machine} (pt-{}) removed; replica unchanged",
            base.lsn
        ),
        &id,
        None,
    ))
}

/// Move the pending failover of `machine` to POINT `at`.
pub fn change_point(host: &dyn Host, machine: &str, at: &str) -> Result<Reply> {
    let job = start(host, &JobSpec::default(), JobKind::ChangePoint, machine)?;
    let (job, (lsn, dropped)) = as_job(job, |job| {
        job.step("change the point");
        let r = super::change_point(host, machine, at)?;
        job.step_done(Some(format!(
            "now at pt-{}; {} bytes written since the failover dropped",
            r.0, r.1
        )))?;
        Ok(r)
    })?;
    let id = job.id().to_string();
    job.finish(|| {
        let m = host.machine(machine)?;
        match m.base() {
            Some(b) if b.lsn == lsn && m.pending().is_some() => {
                let image = PointImage::open_exact(host.replicas().open_readonly(machine)?, lsn)?;
                let v = verify::verify(&image)?;
                Ok(format!(
                    "{machine} stands on pt-{lsn}, commit pending{}",
                    if v.digests_matched {
                        "; every disk matches the source's digests"
                    } else {
                        ""
                    }
                ))
            }
            _ => Err(Error::InvalidInput(format!("{machine} is not at pt-{lsn}"))),
        }
    })
    .map_err(|e| with_job(e, &id))?;
    Ok(reply(
        format!(
            "{machine} moved to pt-{lsn}; {dropped} bytes written since the failover were \
             dropped"
        ),
        &id,
        Some(lsn),
    ))
}

/// Cancel the pending unplanned failover of `machine`.
pub fn cancel(host: &dyn Host, machine: &str) -> Result<Reply> {
    let job = start(host, &JobSpec::default(), JobKind::Cancel, machine)?;
    let (job, dropped) = as_job(job, |job| {
        job.step("cancel");
        let d = super::cancel(host, machine)?;
        job.step_done(Some(format!(
            "the promoted machine removed ({d} bytes written since dropped)"
        )))?;
        Ok(d)
    })?;
    let id = job.id().to_string();
    job.finish(|| {
        let site = host.site();
        if site.storage().exists(
            &site
                .machine_dir(machine)?
                .join(crate::volume::MANIFEST_FILE),
        ) {
            return Err(Error::InvalidInput(format!(
                "{machine} is still a machine here"
            )));
        }
        let store = host.replicas().open_readonly(machine)?;
        match store.promotion()? {
            None => Ok(format!(
                "{machine} is a replica again (generation {}); replication resumes when \
                 its source connects",
                store.generation()
            )),
            Some(_) => Err(Error::InvalidInput(format!(
                "replica {machine} is still marked promoted"
            ))),
        }
    })
    .map_err(|e| with_job(e, &id))?;
    Ok(reply(
        format!(
            "failover of {machine} cancelled: it is a replica again; {dropped} bytes written \
             since the failover were dropped"
        ),
        &id,
        None,
    ))
}

/// Commit the pending failover of `machine`.
pub fn commit(host: &dyn Host, machine: &str) -> Result<Reply> {
    let job = start(host, &JobSpec::default(), JobKind::Commit, machine)?;
    let (job, ()) = as_job(job, |job| super::commit(host, machine, job))?;
    let id = job.id().to_string();
    job.finish(|| {
        let m = host.machine(machine)?;
        if m.pending().is_some() || m.base().is_some() {
            return Err(Error::InvalidInput(format!(
                "{machine} still has a pending failover or stands on its replica"
            )));
        }
        let gone = !host.replicas().has(machine) || super::stands_on(host.site(), machine)?;
        if !gone {
            return Err(Error::InvalidInput(format!(
                "replica {machine} is still there"
            )));
        }
        Ok(format!(
            "{machine} is a primary of this site (generation {}), its parents local files; \
             the replica's points are gone",
            m.generation()
        ))
    })
    .map_err(|e| with_job(e, &id))?;
    Ok(reply(
        format!(
            "{machine} committed: a primary of this site, unprotected (protect it with \
             `replog reprotect` or `replog protect`)"
        ),
        &id,
        None,
    ))
}

/// Carry out a failover request (`control::Request::Failover` and the rest).
pub fn handle(host: &dyn Host, req: &crate::control::Request) -> Result<Reply> {
    use crate::control::Request;
    match req {
        Request::Failover {
            machine,
            kind,
            at,
            as_name,
            shutdown_source,
            job,
        } => match kind {
            // Served by a running serve (`Registry`): the primary reaches the target,
            // never the other way round, so only a listening target can ask it.
            _ if shutdown_source.is_some() => Err(Error::InvalidInput(
                "--shutdown-source needs this site's `replog serve --listen` running: the \
                 primary is asked to shut down when it next connects; fail over without it \
                 (the old primary learns it is fenced at its first contact)"
                    .into(),
            )),
            FailoverKind::Planned => Err(Error::InvalidInput(
                "a planned failover runs at the primary (`replog failover SITE MACHINE \
                 --planned` there)"
                    .into(),
            )),
            _ => failover_as(host, machine, *kind, at, as_name.as_deref(), job),
        },
        Request::CleanupTest {
            machine,
            as_name,
            note,
        } => cleanup_test(host, machine, as_name.as_deref(), note.as_deref()),
        Request::ChangePoint { machine, at } => change_point(host, machine, at),
        Request::VerifyFailover {
            machine,
            kind,
            name,
            job,
        } => verify_existing(host, machine, *kind, name, job),
        Request::CancelFailover { machine } => cancel(host, machine),
        Request::Commit { machine } => commit(host, machine),
        other => Err(Error::InvalidInput(format!(
            "not a failover request: {other:?}"
        ))),
    }
}

/// The target's half of a planned failover: promote replica `machine` at exactly
/// `lsn` to `generation`, verify the point's digests before anyone can write, then
/// open it. All or nothing: on any error the promotion is undone (and the source,
/// told so, takes writes again).
pub fn planned_target(host: &dyn Host, machine: &str, lsn: u64, generation: u32) -> Result<Reply> {
    let job = start(host, &JobSpec::default(), JobKind::FailoverPlanned, machine)?;
    let undo = |what: &str| {
        // The machine goes durably before the promotion record: never a writable
        // machine beside a replica that takes the old generation again.
        let gone = host
            .site()
            .machine_dir(machine)
            .and_then(|d| host.close(machine).map(|()| d))
            .and_then(|d| super::remove_machine_dir(host.site(), &d));
        if let (Ok(()), Ok(s)) = (gone, host.replicas().open_readonly(machine)) {
            let _ = s.set_promotion(None);
        }
        tracing::warn!(machine, "planned failover undone: {what}");
    };
    // Once the promotion is made, any error undoes it (the source, told the failover
    // failed, takes writes again).
    let promoted = std::cell::Cell::new(false);
    let result = as_job(job, |job| {
        // Verified before anything is recorded: a crash at any step leaves either no
        // promotion (the primary takes writes again) or a verified one.
        job.step("verify the point's digests");
        // The primary said `PromoteSoon` as it began: the segments were read ahead
        // while the last ones shipped (`replica::warm`).
        let warm = host.replicas().warm();
        let reading_ahead = warm.active(machine);
        let v = PointImage::open_exact(host.replicas().open_readonly(machine)?, lsn)
            .and_then(|image| verify::verify(&image));
        // What was read ahead for this check goes, whatever it found.
        warm.end(machine);
        let v = v?;
        let ahead = if reading_ahead {
            format!(
                "; {} bytes of segments read ahead while the last ones shipped",
                v.read_ahead
            )
        } else {
            String::new()
        };
        job.step_done(Some(if v.digests_matched {
            format!(
                "every disk matches the source's digests ({} bytes read{ahead})",
                v.bytes
            )
        } else {
            format!(
                "no digests at this point; {} bytes authenticated{ahead}",
                v.bytes
            )
        }))?;
        crate::failpoint::hit("promote:after-verify");
        job.step("promote");
        let p = super::promote(
            host.site(),
            host.replicas(),
            machine,
            &lsn.to_string(),
            FailoverKind::Planned,
            None,
        )?;
        promoted.set(true);
        if p.generation != generation || p.lsn != lsn {
            return Err(Error::InvalidInput(format!(
                "asked for generation {generation} at LSN {lsn}; the replica gives generation \
                 {} at LSN {}",
                p.generation, p.lsn
            )));
        }
        crate::failpoint::hit("promote:after-manifest");
        job.step_done(Some(format!(
            "{machine} at pt-{lsn}, generation {generation}: nothing copied"
        )))?;
        job.step("open the disks");
        host.open(machine)?;
        job.step_done(Some(format!("{machine} writable")))?;
        Ok(())
    });
    let (job, ()) = result.inspect_err(|e| {
        if promoted.get() {
            undo(&e.to_string());
        }
    })?;
    let id = job.id().to_string();
    job.finish(|| {
        let m = host.machine(machine)?;
        match (m.base(), m.pending()) {
            (Some(b), Some(_)) if b.lsn == lsn && m.generation() == generation => Ok(format!(
                "{machine} is open at pt-{lsn}, generation {generation}, commit pending"
            )),
            _ => Err(Error::InvalidInput(format!(
                "{machine} is not open as promoted at pt-{lsn}"
            ))),
        }
    })
    .map_err(|e| {
        undo(&e.to_string());
        with_job(e, &id)
    })?;
    count_failover(machine, FailoverKind::Planned);
    Ok(reply(
        format!("{machine} promoted at pt-{lsn} (generation {generation})"),
        &id,
        Some(lsn),
    ))
}
