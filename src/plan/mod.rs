//! Recovery plans: many machines failed over as one operation, group by group, with
//! actions (programs, manual steps) before and after each group — Azure Site
//! Recovery's recovery plans.
//!
//! - [`file`]: the plan file (TOML) and its validation;
//! - [`store`]: the plans a site keeps (`SITE/plans/`), and each plan's lock;
//! - [`run`]: a run as a job, its persisted state, `resume` after a manual step, a
//!   stop or a crash;
//! - [`action`]: one program of a plan, in its own process group, with a timeout;
//! - [`points`]: plan points (one point per machine at one barrier) and the choice
//!   of the point a run fails over to;
//! - [`dry`]: `--dry-run`, every check of a run with nothing changed;
//! - this file: `cleanup-test` and `commit` of a plan's machines.

pub mod action;
pub mod dry;
pub mod file;
pub mod points;
pub mod run;
pub mod store;

use crate::control::Request;
use crate::error::{Error, Result};
use crate::jobs::{Job, JobKind, JobSpec, JobState};
use crate::protection::FailoverKind;
use crate::storage::FileStorage;
use run::RunState;
use std::path::Path;

/// The manifest of machine `name` here, if it is one.
pub(super) fn manifest(site: &Path, name: &str) -> Option<crate::format::meta::Manifest> {
    let dir = site.join(crate::site::MACHINES_DIR).join(name);
    dir.join(crate::volume::MANIFEST_FILE)
        .is_file()
        .then(|| crate::volume::Machine::read_manifest(&FileStorage, &dir).ok())
        .flatten()
}

/// What serve's reply said, and which job recorded it.
fn said(r: crate::control::Reply) -> String {
    format!(
        "{}{}",
        r.detail.unwrap_or_default(),
        r.job.map(|j| format!(" (job {j})")).unwrap_or_default()
    )
}

/// Whether failover job `j` got past its promotion (made its machine or copy).
pub(super) fn got_past_promotion(j: &Job) -> bool {
    j.steps
        .iter()
        .any(|s| s.name == crate::failover::run::PROMOTE_STEP && s.state == JobState::Succeeded)
}

/// `replog plan cleanup-test SITE PLAN`: remove every test copy the newest test run
/// of `name` made (ending that run, if it was waiting or stopped).
pub fn cleanup_test(site: &Path, name: &str) -> Result<Job> {
    let _lock = store::lock(site, name)?;
    let Some(mut test_run) = run::runs_of(site, name)?
        .into_iter()
        .find(|r| r.kind == FailoverKind::Test && r.state != RunState::Ended)
    else {
        return Err(Error::InvalidInput(format!(
            "plan {name} has no test run here with copies to clean up"
        )));
    };
    let mut job = JobSpec::of_plan(name).start(site, JobKind::Plan, None)?;
    job.step(&format!(
        "plan {name}: clean up the test copies of run {}",
        test_run.job
    ));
    job.step_done(Some(format!(
        "run {} was {}",
        test_run.job,
        test_run.state.as_str()
    )))?;
    let mut failed = Vec::new();
    let mut removed = Vec::new();
    for (m, mr) in &test_run.machines {
        // Made by this run: its failover said so when it ended, or its job (waited
        // for, if serve still works on it) got past its promotion. A copy of that
        // name the run did not make (an operator's) is left alone.
        let made = mr.made
            || mr
                .job
                .as_deref()
                .is_some_and(|id| run::ended_job(site, id).is_some_and(|j| got_past_promotion(&j)));
        let copy = manifest(site, &mr.name);
        let exists = copy.is_some();
        let is_copy = copy.is_some_and(|man| crate::failover::made_by(&man, m, FailoverKind::Test));
        let n = job.begin_step(&format!("remove test copy {} of {m}", mr.name));
        if !exists || !made || !is_copy {
            job.end_step(
                n,
                JobState::Succeeded,
                Some(if !exists {
                    "no copy (the run did not make one)".into()
                } else {
                    format!("{} was not made by this run: left alone", mr.name)
                }),
            );
            continue;
        }
        let asked = crate::control::run(
            site,
            &Request::CleanupTest {
                machine: m.clone(),
                as_name: Some(mr.name.clone()),
                note: Some(format!("plan {name}, run {}", test_run.job)),
            },
        );
        match asked {
            Ok(r) => {
                removed.push(mr.name.clone());
                job.end_step(n, JobState::Succeeded, Some(said(r)));
            }
            Err(e) => {
                job.end_step(n, JobState::Failed, Some(e.to_string()));
                failed.push(format!("{}: {e}", mr.name));
            }
        }
    }
    if !failed.is_empty() {
        // The run stays as it was: cleanup-test can be run again.
        let e = Error::InvalidInput(format!(
            "{} test cop{} could not be removed: {}",
            failed.len(),
            if failed.len() == 1 { "y" } else { "ies" },
            failed.join("; ")
        ));
        job.fail(&e);
        return Err(e);
    }
    run::end(
        site,
        &mut test_run,
        &format!("its test copies were cleaned up by job {}", job.id()),
    )?;
    job.finish(|| {
        let left: Vec<&String> = removed
            .iter()
            .filter(|n| site.join(crate::site::MACHINES_DIR).join(n).exists())
            .collect();
        if left.is_empty() {
            Ok(format!(
                "every test copy of the run is gone ({})",
                if removed.is_empty() {
                    "there were none".into()
                } else {
                    removed.join(", ")
                }
            ))
        } else {
            Err(Error::InvalidInput(format!("still there: {left:?}")))
        }
    })
}

/// `replog plan commit SITE PLAN`: commit every machine of plan `name` that has a
/// failover pending here.
pub fn commit(site: &Path, name: &str) -> Result<Job> {
    let _lock = store::lock(site, name)?;
    let plan = store::load(site, name)?;
    if let Some(r) = run::unfinished(site, name)? {
        return Err(Error::InvalidInput(format!(
            "run {} of plan {name} is {}: let it finish (`replog plan resume`) before \
             committing",
            r.job,
            r.state.as_str()
        )));
    }
    let pending: Vec<String> = plan
        .machines()
        .filter(|m| manifest(site, m).is_some_and(|man| man.pending.is_some()))
        .cloned()
        .collect();
    if pending.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no machine of plan {name} has a failover pending here (nothing to commit)"
        )));
    }
    let mut job = JobSpec::of_plan(name).start(site, JobKind::Plan, None)?;
    job.step(&format!("plan {name}: commit"));
    job.step_done(Some(format!(
        "{} of {} machines have a failover pending here",
        pending.len(),
        plan.machines().count()
    )))?;
    let mut failed = Vec::new();
    for m in plan.machines() {
        let n = job.begin_step(&format!("commit {m}"));
        if !pending.contains(m) {
            job.end_step(
                n,
                JobState::Succeeded,
                Some("no failover pending here: nothing to commit".into()),
            );
            continue;
        }
        match crate::control::run(site, &Request::Commit { machine: m.clone() }) {
            Ok(r) => job.end_step(n, JobState::Succeeded, Some(said(r))),
            Err(e) => {
                job.end_step(n, JobState::Failed, Some(e.to_string()));
                failed.push(format!("{m}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        let e = Error::InvalidInput(format!("commit failed for {}", failed.join("; ")));
        job.fail(&e);
        return Err(e);
    }
    job.finish(|| {
        for m in &pending {
            match manifest(site, m) {
                Some(man) if man.pending.is_none() && man.base.is_none() => {}
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "{m} is not a committed primary here"
                    )))
                }
            }
        }
        Ok(format!(
            "{} committed: primaries of this site, unprotected",
            pending.join(", ")
        ))
    })
}
