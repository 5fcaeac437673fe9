//! A recovery plan's run: group by group, the before-actions in order, the group's
//! machines failed over side by side, then the after-actions — as one job.
//!
//! The runner works in the process of `replog plan failover` (or `plan resume`),
//! holding the plan's lock; each machine's failover is a request to this site's
//! running serve, which records it as a job of its own. The run's state is typed,
//! in `SITE/plans/runs/<job>.json` (format [`FORMAT`]), written atomically before the
//! job shows a change:
//!
//! - the plan as it was when the run began (a later `plan add --replace` does not
//!   change a run under way), the kind, the point rule and the plan point chosen;
//! - `next`: the first step of [`steps`] not done;
//! - each machine's outcome and the ID of its failover job, chosen here and
//!   persisted *before* the request goes to serve. After a crash of this process or
//!   of serve that ID says what happened: no such job — serve never began it, ask
//!   again with the same ID; a job in progress — wait for it; succeeded — the
//!   machine is up; failed — take over what it made, if anything (checked by serve,
//!   [`take_over_made`]), else try again under a new ID;
//! - the action running (its process group), killed by a `resume` if it outlived
//!   the runner: an action interrupted by a crash runs again from its start.
//!
//! Planned and test runs stop at the first failure (state `stopped`; `resume` runs
//! the failed step again — machines already up are not failed over again);
//! unplanned runs go on to the end and fail listing every failure. A manual action
//! leaves the run `waiting` until `replog plan resume`.

use super::action::{self, Started};
use super::file::{Action, ActionKind, Plan};
use crate::control::{Reply, Request};
use crate::error::{Error, Result};
use crate::jobs::{self, Job, JobHandle, JobKind, JobSpec, JobState};
use crate::protection::FailoverKind;
use crate::storage::{write_atomic, FileStorage, Storage};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RUNS_DIR: &str = "runs";
pub const FORMAT: u32 = 1;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// A process works on it — or died doing so (the plan's lock is free then):
    /// `resume` goes on.
    Running,
    /// At a manual action, until `resume`.
    Waiting,
    /// A planned or test run stopped at a failure; `resume` tries the step again.
    Stopped,
    Succeeded,
    /// An unplanned run ended with failures (each one reported).
    Failed,
    /// Cleaned up or given up; nothing more happens to it.
    Ended,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Waiting => "waiting",
            RunState::Stopped => "stopped",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Ended => "ended",
        }
    }

    pub fn unfinished(self) -> bool {
        matches!(
            self,
            RunState::Running | RunState::Waiting | RunState::Stopped
        )
    }
}

/// A machine's part in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRun {
    /// Its name at this site once failed over (the test copy's for a test run).
    pub name: String,
    /// The point its failover asks for (`latest`, `latest-app-consistent`, `pt-N`).
    pub point: String,
    /// Its failover job's ID, chosen before the request was sent.
    pub job: Option<String>,
    pub state: MachineState,
    pub detail: Option<String>,
    /// Its failover made the machine or copy (got past the promotion), known when
    /// the failover ended: what a test run's cleanup removes.
    #[serde(default)]
    pub made: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    Pending,
    Up,
    Failed,
}

/// The persisted state of a run (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub format: u32,
    pub job: String,
    pub plan: Plan,
    pub kind: FailoverKind,
    /// The point rule asked for (`latest`, `latest-app-consistent`, `plan-point`,
    /// `pp-ID`; planned: `last-lsn`).
    pub at: String,
    /// The plan point every machine fails over to, when the rule chose one.
    pub plan_point: Option<u64>,
    /// The first step of `steps(plan, kind)` not done.
    pub next: usize,
    pub state: RunState,
    pub machines: BTreeMap<String, MachineRun>,
    /// What failed (an unplanned run goes on past failures and lists them at its end).
    pub failures: Vec<String>,
    /// The action running now, if any.
    pub action: Option<Started>,
    /// Where serve mounts the disks (REPLOG_MOUNT).
    pub mount: Option<PathBuf>,
}

/// A step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepRef {
    Action {
        group: usize,
        after: bool,
        index: usize,
    },
    Failover {
        group: usize,
    },
}

/// Every step of a run of `plan` as `kind`, in order: per group, the before-actions
/// that run for the kind, the failover of the group's machines, the after-actions.
pub fn steps(plan: &Plan, kind: FailoverKind) -> Vec<StepRef> {
    let mut out = Vec::new();
    for (group, g) in plan.groups.iter().enumerate() {
        let actions = |after: bool, list: &[Action]| -> Vec<StepRef> {
            list.iter()
                .enumerate()
                .filter(|(_, a)| a.runs_on(kind))
                .map(|(index, _)| StepRef::Action {
                    group,
                    after,
                    index,
                })
                .collect()
        };
        out.extend(actions(false, &g.before));
        out.push(StepRef::Failover { group });
        out.extend(actions(true, &g.after));
    }
    out
}

impl Run {
    /// The machines of group `group` whose state `keep` accepts, in the plan's order.
    fn group_machines(&self, group: usize, keep: impl Fn(MachineState) -> bool) -> Vec<String> {
        self.plan
            .groups
            .get(group)
            .map(|g| g.machines.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| self.machines.get(m).is_some_and(|mr| keep(mr.state)))
            .collect()
    }
}

impl StepRef {
    /// The step as the job and the dry run name it.
    pub fn name(self, plan: &Plan) -> String {
        match self {
            StepRef::Action {
                group,
                after,
                index,
            } => format!(
                "group {}: {} {}: {}",
                group + 1,
                if after { "after" } else { "before" },
                index + 1,
                plan.action(group, after, index)
                    .map(Action::describe)
                    .unwrap_or_default()
            ),
            StepRef::Failover { group } => format!(
                "group {}: fail over {}",
                group + 1,
                plan.groups
                    .get(group)
                    .map(|g| g.machines.join(", "))
                    .unwrap_or_default()
            ),
        }
    }
}

fn runs_dir(site: &Path) -> PathBuf {
    site.join(super::store::PLANS_DIR).join(RUNS_DIR)
}

fn run_path(site: &Path, job: &str) -> Result<PathBuf> {
    jobs::check_id(job)?;
    Ok(runs_dir(site).join(format!("{job}.json")))
}

/// Persist `run`.
pub fn save(site: &Path, run: &Run) -> Result<()> {
    FileStorage.create_dir_all(&runs_dir(site))?;
    let text = serde_json::to_string_pretty(run).map_err(|e| Error::InvalidInput(e.to_string()))?;
    write_atomic(&FileStorage, &run_path(site, &run.job)?, text.as_bytes())
}

/// The run recorded by job `job`.
pub fn load(site: &Path, job: &str) -> Result<Run> {
    let p = run_path(site, job)?;
    let text = std::fs::read_to_string(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("job {job} is not a plan's run")),
        _ => Error::io("read", &p, e),
    })?;
    let run: Run =
        serde_json::from_str(&text).map_err(|e| Error::corruption(&p, 0, e.to_string()))?;
    if run.format != FORMAT {
        return Err(Error::Unsupported {
            path: p,
            what: format!(
                "plan run format {}; this build reads format {FORMAT}",
                run.format
            ),
        });
    }
    Ok(run)
}

/// Every run of plan `plan` at this site, newest first.
pub fn runs_of(site: &Path, plan: &str) -> Result<Vec<Run>> {
    let mut out = Vec::new();
    for n in jobs::ids_in(&runs_dir(site))? {
        match load(site, &n) {
            Ok(run) if run.plan.name == plan => out.push(run),
            Ok(_) => {}
            // One run that does not read (damaged, or a newer build's) does not stop
            // the others; it is named.
            Err(e) => tracing::warn!("plan run {n}: {e}"),
        }
    }
    Ok(out)
}

/// Finished runs of a plan kept (their state files; their jobs age out with the
/// job history).
pub const RUNS_KEPT: usize = 50;

/// Keep the newest [`RUNS_KEPT`] finished runs of those of one plan, `runs`.
fn prune(site: &Path, runs: &[Run]) {
    for r in runs
        .iter()
        .filter(|r| !r.state.unfinished())
        .skip(RUNS_KEPT)
    {
        if let Ok(p) = run_path(site, &r.job) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whether job `job` is a plan's run (a state file says where it stands).
pub fn is_run(site: &Path, job: &str) -> bool {
    run_path(site, job).is_ok_and(|p| p.is_file())
}

/// The newest run of `plan` that is not finished (running, waiting or stopped).
pub fn unfinished(site: &Path, plan: &str) -> Result<Option<Run>> {
    Ok(runs_of(site, plan)?
        .into_iter()
        .find(|r| r.state.unfinished()))
}

/// What the command that ran the plan reports.
#[derive(Debug)]
pub enum Ended {
    Succeeded(Job),
    /// Paused at a manual action.
    Waiting {
        job: Job,
        text: String,
    },
    Failed {
        job: Job,
        error: String,
    },
}

/// What the runner tells the command as it goes (a progress bar on a terminal).
pub trait Progress: Sync {
    fn step(&self, done: usize, total: usize, what: &str);
}

/// What a run needs while it goes.
struct Ctx<'a> {
    site: PathBuf,
    progress: &'a dyn Progress,
    run: Mutex<Run>,
    job: Mutex<JobHandle>,
}

impl Ctx<'_> {
    /// Change the run and persist it; Err when it could not be persisted.
    fn update<T>(&self, f: impl FnOnce(&mut Run) -> T) -> Result<T> {
        let mut run = self.run.lock();
        let t = f(&mut run);
        save(&self.site, &run)?;
        Ok(t)
    }

    /// Record `id` as machine `m`'s failover job, persisted before anything is asked
    /// (after a crash, it is how the failover is found again: never asked twice);
    /// the spec to ask with.
    fn new_job(&self, m: &str, id: String) -> std::result::Result<JobSpec, String> {
        let plan = self.update(|r| {
            if let Some(mr) = r.machines.get_mut(m) {
                mr.job = Some(id.clone());
            }
            r.plan.name.clone()
        });
        match plan {
            Ok(plan) => Ok(JobSpec {
                id: Some(id),
                plan: Some(plan),
            }),
            Err(e) => Err(format!(
                "the run's state could not be saved, nothing asked: {e}"
            )),
        }
    }

    /// Change the run and persist it, logging a failure to persist: for what a
    /// resume would find out again by itself (an outcome kept in a job, a program
    /// that runs again).
    fn note(&self, f: impl FnOnce(&mut Run)) {
        if let Err(e) = self.update(f) {
            tracing::error!(job = %self.run.lock().job, "plan run state: {e}");
        }
    }
}

/// The mount of the serve running at `site` (None: serve runs without one, which
/// only a planned run may do); an error when no serve runs.
fn serve_mount(site: &Path, kind: FailoverKind) -> Result<Option<PathBuf>> {
    let mount = match crate::control::request(site, &Request::ServeInfo)? {
        Some(reply) => reply.into_result()?.mount,
        None => {
            return Err(Error::InvalidInput(format!(
                "a plan fails machines over through this site's running serve: start \
                 `replog serve {} --mount DIR` first",
                site.display()
            )))
        }
    };
    if kind != FailoverKind::Planned && mount.is_none() {
        return Err(Error::InvalidInput(format!(
            "serve runs without --mount: the failed-over machines would have nowhere to \
             come up; restart it with `replog serve {} --mount DIR`",
            site.display()
        )));
    }
    Ok(mount)
}

/// `replog plan failover SITE PLAN`: run plan `name` as `kind` at point rule `at`.
pub fn start(
    site: &Path,
    name: &str,
    kind: FailoverKind,
    at: &str,
    progress: &dyn Progress,
) -> Result<Ended> {
    let _lock = super::store::lock(site, name)?;
    let plan = super::store::load(site, name)?;
    let runs = runs_of(site, name)?;
    if let Some(old) = runs.iter().find(|r| r.state.unfinished()) {
        return Err(Error::InvalidInput(format!(
            "run {} of plan {name} ({} failover) is {}: go on with `replog plan resume {} \
             {name}`{}",
            old.job,
            old.kind,
            match old.state {
                RunState::Waiting => "waiting at a manual action",
                RunState::Stopped => "stopped at a failure",
                _ => "unfinished (its process stopped)",
            },
            site.display(),
            if old.kind == FailoverKind::Test {
                format!(
                    ", or remove its copies with `replog plan cleanup-test {} {name}`",
                    site.display()
                )
            } else {
                format!(
                    ", or give it up with `replog plan abandon {} {name}`",
                    site.display()
                )
            }
        )));
    }
    prune(site, &runs);
    let mount = serve_mount(site, kind)?;
    let (plan_point, points) = super::points::choose(site, &plan, kind, at)?;
    let machines = plan
        .machines()
        .map(|m| {
            let name = match kind {
                FailoverKind::Test => crate::failover::test_name(m),
                _ => m.clone(),
            };
            let point = points.get(m).cloned().unwrap_or_else(|| at.to_string());
            (
                m.clone(),
                MachineRun {
                    name,
                    point,
                    job: None,
                    state: MachineState::Pending,
                    detail: None,
                    made: false,
                },
            )
        })
        .collect();
    let mut job = JobSpec::of_plan(name).start(site, JobKind::Plan, None)?;
    job.step(&format!("plan {name}: {kind} failover"));
    job.step_done(Some(match plan_point {
        Some(id) => format!(
            "at plan point {} (every machine's point of one barrier)",
            crate::replica::points::plan_point_id(id)
        ),
        None if kind == FailoverKind::Planned => "at each machine's last LSN (zero loss)".into(),
        None => format!("at {at} of each machine"),
    }))?;
    let run = Run {
        format: FORMAT,
        job: job.id().to_string(),
        plan,
        kind,
        at: at.to_string(),
        plan_point,
        next: 0,
        state: RunState::Running,
        machines,
        failures: Vec::new(),
        action: None,
        mount,
    };
    go(site, run, job, progress)
}

/// `replog plan resume SITE PLAN`: go on with the newest unfinished run of `name`.
pub fn resume(site: &Path, name: &str, progress: &dyn Progress) -> Result<Ended> {
    let _lock = super::store::lock(site, name)?;
    let Some(mut run) = unfinished(site, name)? else {
        let newest = runs_of(site, name)?.into_iter().next();
        return Err(Error::InvalidInput(match newest {
            Some(r) => format!(
                "the newest run of plan {name} (job {}) {}: nothing to resume",
                r.job,
                match r.state {
                    RunState::Succeeded => "succeeded".to_string(),
                    RunState::Failed => format!(
                        "ended with failures ({}); fail those machines over one by one",
                        r.failures.join("; ")
                    ),
                    _ => "was cleaned up or given up".to_string(),
                }
            ),
            None => format!("plan {name} has no run at this site"),
        }));
    };
    // Its job ended well but the run's state was not saved after it: done.
    let j = jobs::get(site, &run.job)?;
    if j.state == JobState::Succeeded {
        run.state = RunState::Succeeded;
        save(site, &run)?;
        return Ok(Ended::Succeeded(j));
    }
    let mount = serve_mount(site, run.kind)?;
    let killed = run.action.take().is_some_and(|a| a.kill_if_running());
    let mut job = JobHandle::take_over(site, j)?;
    if killed {
        job.step("stop the action the stopped runner left running");
        job.step_done(Some("its process group was killed; the action runs again"))?;
    }
    run.state = RunState::Running;
    run.mount = mount;
    // The step it stopped at runs again: its group's failed machines are tried again
    // (an unplanned run's failures in groups it went past stay as they were).
    if let Some(StepRef::Failover { group }) = steps(&run.plan, run.kind).get(run.next).copied() {
        for m in run.group_machines(group, |s| s == MachineState::Failed) {
            if let Some(mr) = run.machines.get_mut(&m) {
                mr.state = MachineState::Pending;
            }
        }
    }
    go(site, run, job, progress)
}

/// `replog plan abandon SITE PLAN`: give up the plan's unfinished run (its job is
/// cancelled; what it failed over stays failed over, and is listed).
pub fn abandon(site: &Path, name: &str) -> Result<Job> {
    let _lock = super::store::lock(site, name)?;
    let mut run = unfinished(site, name)?
        .ok_or_else(|| Error::InvalidInput(format!("plan {name} has no unfinished run here")))?;
    if run.kind == FailoverKind::Test {
        return Err(Error::InvalidInput(format!(
            "run {} is a test run: `replog plan cleanup-test {} {name}` ends it and removes \
             its copies",
            run.job,
            site.display()
        )));
    }
    let killed = run.action.take().is_some_and(|a| a.kill_if_running());
    let up: Vec<String> = run
        .machines
        .iter()
        .filter(|(_, mr)| mr.state == MachineState::Up)
        .map(|(m, mr)| format!("{m} (as {})", mr.name))
        .collect();
    let why = format!(
        "abandoned by an operator; failed over and left as they are: {}{}",
        if up.is_empty() {
            "none".to_string()
        } else {
            up.join(", ")
        },
        if killed {
            "; the program it left running was killed"
        } else {
            ""
        }
    );
    run.failures.push(why.clone());
    end(site, &mut run, &why)
}

/// End `run` for good: its job, if still open, is cancelled saying `why`; the run is
/// saved as ended. Returns the job.
pub(super) fn end(site: &Path, run: &mut Run, why: &str) -> Result<Job> {
    let job = jobs::close(site, &run.job, JobState::Cancelled, why)?;
    run.state = RunState::Ended;
    save(site, run)?;
    Ok(job)
}

/// Save `run` (its job `job`, owned by this process) and drive it.
fn go(site: &Path, run: Run, job: JobHandle, progress: &dyn Progress) -> Result<Ended> {
    save(site, &run)?;
    drive(Ctx {
        site: site.to_path_buf(),
        progress,
        run: Mutex::new(run),
        job: Mutex::new(job),
    })
}

/// Run the steps from `run.next` to the end, a manual action or a stop.
fn drive(ctx: Ctx<'_>) -> Result<Ended> {
    let (all, kind) = {
        let run = ctx.run.lock();
        (steps(&run.plan, run.kind), run.kind)
    };
    loop {
        let next = ctx.run.lock().next;
        let Some(&step) = all.get(next) else { break };
        let name = step.name(&ctx.run.lock().plan);
        ctx.progress.step(next, all.len(), &name);
        let failed = match step {
            StepRef::Action {
                group,
                after,
                index,
            } => {
                let action = ctx.run.lock().plan.action(group, after, index).cloned();
                let Some(action) = action else { break };
                if let ActionKind::Manual { text } = &action.what {
                    return wait_at_manual(ctx, next, &name, text);
                }
                run_action(&ctx, &name, group, &action).err()
            }
            StepRef::Failover { group } => fail_over_group(&ctx, group).err(),
        };
        if let Some(why) = failed {
            if kind == FailoverKind::Unplanned {
                ctx.update(|r| r.failures.push(why))?;
            } else {
                return stop(ctx, why);
            }
        }
        ctx.update(|r| r.next = next + 1)?;
        crate::failpoint::hit("plan:after-step");
    }
    ctx.progress
        .step(all.len(), all.len(), "verify every machine is up");
    finish(ctx)
}

/// A manual action: the run waits for `plan resume` (which goes on after it).
fn wait_at_manual(ctx: Ctx<'_>, next: usize, name: &str, text: &str) -> Result<Ended> {
    let n = ctx.job.lock().begin_step(name);
    ctx.update(|r| {
        r.next = next + 1;
        r.state = RunState::Waiting;
    })?;
    let job = ctx.job.into_inner().wait_for_operator(n)?;
    Ok(Ended::Waiting {
        job,
        text: text.to_string(),
    })
}

/// A planned or test run stops at its first failure.
fn stop(ctx: Ctx<'_>, why: String) -> Result<Ended> {
    ctx.update(|r| r.state = RunState::Stopped)?;
    let job = ctx.job.into_inner();
    let error =
        format!("{why}; the run stopped there (`replog plan resume` tries that step again)");
    let job = job.fail(&Error::InvalidInput(error.clone()));
    Ok(Ended::Failed { job, error })
}

/// The end: an unplanned run with failures fails listing them; otherwise every
/// machine's state is checked again and only then does the job succeed.
fn finish(ctx: Ctx<'_>) -> Result<Ended> {
    let run = ctx.run.lock().clone();
    let job = ctx.job.into_inner();
    if !run.failures.is_empty() {
        let error = format!(
            "{} of the plan's steps failed (the run went on to its end): {}",
            run.failures.len(),
            run.failures.join("; ")
        );
        let mut done = run;
        done.state = RunState::Failed;
        save(&ctx.site, &done)?;
        let job = job.fail(&Error::InvalidInput(error.clone()));
        return Ok(Ended::Failed { job, error });
    }
    let site = ctx.site.clone();
    let checked = job.finish(|| {
        let mut lines = Vec::new();
        for (m, mr) in &run.machines {
            lines.push(up(&site, &run, m, &mr.name)?);
        }
        Ok(lines.join("; "))
    });
    let mut done = run;
    match checked {
        Ok(job) => {
            done.state = RunState::Succeeded;
            save(&site, &done)?;
            Ok(Ended::Succeeded(job))
        }
        Err(e) => {
            done.state = RunState::Failed;
            save(&site, &done)?;
            let job = jobs::get(&site, &done.job)?;
            Ok(Ended::Failed {
                job,
                error: format!("the end state did not verify: {e}"),
            })
        }
    }
}

/// Run action `action` (a `run`), recording it as step `name`.
fn run_action(
    ctx: &Ctx<'_>,
    name: &str,
    group: usize,
    action: &Action,
) -> std::result::Result<(), String> {
    let ActionKind::Run {
        argv, timeout_ms, ..
    } = &action.what
    else {
        return Ok(());
    };
    let n = ctx.job.lock().begin_step(name);
    let env = environment(ctx, group);
    let ran = action::run(argv, &env, Duration::from_millis(*timeout_ms), |started| {
        // Recorded before the program runs (it waits behind its gate): a program
        // whose group is not in the run's state never runs.
        ctx.update(|r| r.action = Some(started)).map_err(|e| {
            Error::InvalidInput(format!(
                "the run's state could not be saved, the program not started: {e}"
            ))
        })?;
        ctx.job
            .lock()
            .step_detail(n, format!("running (process {})", started.pid));
        crate::failpoint::hit("plan:action-started");
        Ok(())
    });
    ctx.note(|r| r.action = None);
    match ran {
        Ok(f) if f.succeeded() => {
            ctx.job
                .lock()
                .end_step(n, JobState::Succeeded, Some(f.describe()));
            Ok(())
        }
        Ok(f) => {
            let d = f.describe();
            ctx.job
                .lock()
                .end_step(n, JobState::Failed, Some(d.clone()));
            Err(format!(
                "{name} failed: {}",
                d.lines().next().unwrap_or_default()
            ))
        }
        Err(e) => {
            ctx.job
                .lock()
                .end_step(n, JobState::Failed, Some(e.to_string()));
            Err(format!("{name} did not start: {e}"))
        }
    }
}

/// The environment an action of group `group` gets.
fn environment(ctx: &Ctx<'_>, group: usize) -> Vec<(String, String)> {
    let run = ctx.run.lock();
    let site = std::fs::canonicalize(&ctx.site).unwrap_or_else(|_| ctx.site.clone());
    let machines = run
        .plan
        .groups
        .get(group)
        .map(|g| g.machines.join(" "))
        .unwrap_or_default();
    vec![
        ("REPLOG_SITE".into(), site.display().to_string()),
        ("REPLOG_PLAN".into(), run.plan.name.clone()),
        ("REPLOG_GROUP".into(), (group + 1).to_string()),
        ("REPLOG_FAILOVER".into(), run.kind.as_str().into()),
        ("REPLOG_MACHINES".into(), machines),
        (
            "REPLOG_MOUNT".into(),
            run.mount
                .as_ref()
                .map(|m| m.display().to_string())
                .unwrap_or_default(),
        ),
        ("REPLOG_JOB".into(), run.job.clone()),
    ]
}

/// Fail over every machine of group `group` that is not up yet, side by side; Err
/// names every one that failed.
fn fail_over_group(ctx: &Ctx<'_>, group: usize) -> std::result::Result<(), String> {
    let machines = ctx
        .run
        .lock()
        .group_machines(group, |s| s != MachineState::Up);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = machines
            .iter()
            .map(|m| {
                s.spawn(move || {
                    let kind = ctx.run.lock().kind;
                    let n = ctx
                        .job
                        .lock()
                        .begin_step(&format!("group {}: fail over {m} ({kind})", group + 1));
                    let outcome = fail_over(ctx, m);
                    let (state, detail) = match &outcome {
                        Ok(d) => (MachineState::Up, d.clone()),
                        Err(e) => (MachineState::Failed, e.clone()),
                    };
                    let job_id = ctx.run.lock().machines.get(m).and_then(|mr| mr.job.clone());
                    let made = state == MachineState::Up
                        || job_id.is_some_and(|id| {
                            jobs::get(&ctx.site, &id).is_ok_and(|j| super::got_past_promotion(&j))
                        });
                    ctx.note(|r| {
                        if let Some(mr) = r.machines.get_mut(m) {
                            mr.state = state;
                            mr.detail = Some(detail.clone());
                            mr.made |= made;
                        }
                    });
                    let js = if state == MachineState::Up {
                        JobState::Succeeded
                    } else {
                        JobState::Failed
                    };
                    ctx.job.lock().end_step(n, js, Some(detail));
                    outcome.err().map(|e| format!("{m}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Some("a failover thread panicked".into()))
            })
            .collect()
    });
    let up = ctx
        .run
        .lock()
        .group_machines(group, |s| s == MachineState::Up);
    let mut job = ctx.job.lock();
    let n = job.begin_step(&format!("group {}: machines up", group + 1));
    if failures.is_empty() {
        job.end_step(n, JobState::Succeeded, Some(up.join(", ")));
        Ok(())
    } else {
        job.end_step(
            n,
            JobState::Failed,
            Some(format!(
                "up: {}; failed: {}",
                if up.is_empty() {
                    "none".into()
                } else {
                    up.join(", ")
                },
                failures.join("; ")
            )),
        );
        Err(format!("failover of {}", failures.join("; ")))
    }
}

/// Fail machine `m` over (or find that it was, after a crash); Ok says how it is up.
fn fail_over(ctx: &Ctx<'_>, m: &str) -> std::result::Result<String, String> {
    let (kind, point, name, earlier) = {
        let run = ctx.run.lock();
        let mr = run
            .machines
            .get(m)
            .ok_or_else(|| format!("{m} is not in the run"))?;
        (run.kind, mr.point.clone(), mr.name.clone(), mr.job.clone())
    };
    let site = ctx.site.clone();
    // A failover asked for before a crash: its job says how it went.
    let mut id = None;
    if let Some(earlier) = earlier {
        match ended_job(&site, &earlier) {
            Some(j) if j.state == JobState::Succeeded => {
                return up(&site, &ctx.run.lock(), m, &name)
                    .map(|d| format!("job {earlier} (before the restart): {d}"))
                    .map_err(|e| e.to_string());
            }
            // Never begun by serve: ask again under the same ID (a request still in
            // flight then finds its job taken and waits for it below).
            None => id = Some(earlier),
            // It failed — perhaps after its promotion was made (serve stopped before
            // the check): take over what was made rather than fail over twice.
            Some(_) => {
                if let Some(done) = take_over_made(ctx, m, kind, &name)? {
                    return Ok(done);
                }
            }
        }
    }
    let id = id.unwrap_or_else(jobs::new_id);
    let spec = ctx.new_job(m, id.clone())?;
    let req = match kind {
        FailoverKind::Planned => Request::PlannedFailover {
            machine: m.to_string(),
            job: spec,
        },
        _ => Request::Failover {
            machine: m.to_string(),
            kind,
            at: point,
            as_name: (kind == FailoverKind::Test).then_some(name.clone()),
            shutdown_source: None,
            job: spec,
        },
    };
    ask(&site, &req, &id)?;
    up(&site, &ctx.run.lock(), m, &name)
        .map(|d| format!("job {id}: {d}"))
        .map_err(|e| e.to_string())
}

/// Send `req` (whose job is `id`) to serve and wait for that job to end: Ok once it
/// succeeded; Err says why not. The job is the truth when there is one — serve may
/// have carried the request out for an earlier one with the same ID — and the reply
/// only when serve refused before it began a job.
fn ask(site: &Path, req: &Request, id: &str) -> std::result::Result<(), String> {
    let reply: Result<Reply> = match crate::control::request(site, req) {
        Ok(Some(r)) => r.into_result(),
        Ok(None) => Err(Error::InvalidInput("serve stopped running".into())),
        Err(e) => Err(e),
    };
    crate::failpoint::hit("plan:after-request");
    match ended_job(site, id) {
        Some(j) if j.state == JobState::Succeeded => Ok(()),
        Some(j) => Err(format!(
            "{} (job {id})",
            j.error
                .unwrap_or_else(|| format!("the job ended {}", j.state.as_str()))
        )),
        None => Err(match reply {
            Err(e) => e.to_string(),
            Ok(_) => format!("serve answered but recorded no job {id}"),
        }),
    }
}

/// After machine `m`'s failover job failed: what that failover made, checked and
/// taken over, if it made anything. A planned one: the target promoted the machine
/// after all (the primary learns it at its next contact: waited for, at most two
/// minutes, while the intent stands). An unplanned or test one: the promoted
/// machine or copy stands on the replica — serve checks it now, as a job of its own
/// (`Request::VerifyFailover`). Ok(None): nothing was made, fail over again.
fn take_over_made(
    ctx: &Ctx<'_>,
    m: &str,
    kind: FailoverKind,
    name: &str,
) -> std::result::Result<Option<String>, String> {
    let site = ctx.site.clone();
    if kind == FailoverKind::Planned {
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while super::manifest(&site, m).is_some_and(|man| man.intent.is_some())
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        let run = ctx.run.lock().clone();
        return Ok(up(&site, &run, m, name)
            .ok()
            .map(|d| format!("promoted at the target although its job failed: {d}")));
    }
    if !super::manifest(&site, name).is_some_and(|man| crate::failover::made_by(&man, m, kind)) {
        return Ok(None);
    }
    let id = jobs::new_id();
    let req = Request::VerifyFailover {
        machine: m.to_string(),
        kind,
        name: name.to_string(),
        job: ctx.new_job(m, id.clone())?,
    };
    ask(&site, &req, &id)
        .map_err(|e| format!("{name} was made before the restart but does not check out: {e}"))?;
    up(&site, &ctx.run.lock(), m, name)
        .map(|d| {
            Some(format!(
                "made before the restart, checked now (job {id}): {d}"
            ))
        })
        .map_err(|e| e.to_string())
}

/// Job `id` once it has ended (waiting while serve works on it); None when there is
/// no such job. A job whose process died ends as failed here.
pub(super) fn ended_job(site: &Path, id: &str) -> Option<Job> {
    let mut unreadable = 0;
    loop {
        match jobs::get(site, id) {
            Ok(j) if j.state.ended() => return Some(j),
            Ok(mut j) if j.owner_gone() => {
                j.state = JobState::Failed;
                j.error = Some(format!(
                    "the process that ran it ({}) stopped before it ended",
                    j.owner_pid
                ));
                return Some(j);
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(Error::NotFound(_)) => return None,
            Err(e) => {
                tracing::warn!("job {id}: {e}");
                unreadable += 1;
                if unreadable > 50 {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Check that machine `m` of `run` is up as `name` now: its failover recorded here
/// and, where it runs here, every disk under the mount with its size.
pub fn up(site: &Path, run: &Run, m: &str, name: &str) -> Result<String> {
    let man = super::manifest(site, name)
        .ok_or_else(|| Error::InvalidInput(format!("{name} is not a machine of this site")))?;
    if run.kind == FailoverKind::Planned {
        return match &man.fence {
            Some(f) => Ok(format!(
                "{m} runs at the target now (generation {}); failed-over here",
                f.generation
            )),
            None => Err(Error::InvalidInput(format!(
                "{m} is not failed over: this site still runs it"
            ))),
        };
    }
    let base = man
        .base
        .as_ref()
        .filter(|b| b.replica == m)
        .ok_or_else(|| Error::InvalidInput(format!("{name} does not stand on replica {m}")))?;
    let mount = run
        .mount
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("no mount to find the disks under".into()))?;
    let mut disks = Vec::new();
    for d in &man.disks {
        let img = mount.join(name).join(format!("{}.img", d.name));
        let md = std::fs::metadata(&img)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", img.display())))?;
        if md.len() != d.size {
            return Err(Error::InvalidInput(format!(
                "{} is {} bytes, not {}",
                img.display(),
                md.len(),
                d.size
            )));
        }
        disks.push(d.name.clone());
    }
    Ok(format!(
        "{name} up at pt-{} ({} under {})",
        base.lsn,
        disks.join(", "),
        mount.join(name).display()
    ))
}
