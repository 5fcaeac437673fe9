//! Jobs: the record of every long operation — protect, initial replication, resync,
//! restore (and the failovers, reprotects and plans to come) — with its steps, state,
//! times and error, kept under the site so an operator can see what happened.
//!
//! `SITE/jobs/<id>.json`, one file a job (written atomically at every change, so a
//! crash leaves the last state written), as DESIGN.md's `replog jobs --json` shows it,
//! plus `format` (2; 1 before `repeats` and `first_started`), the owner's pid and its start time. IDs sort by start time
//! (`j-<UTC yyyymmddThhmmss>-<microseconds>-<4 hex>`). The history is bounded: the newest
//! [`HISTORY`] ended jobs are kept; jobs in progress or waiting never go.
//!
//! A job is `succeeded` only after its end state was checked: [`JobHandle::finish`]
//! runs the check as the job's last step, and only its success ends the job well.
//! A job whose process died is adopted by the next one that goes on with the work
//! (a restarted serve resumes an initial replication or a resync, and says so in a
//! step); one nobody can resume is failed as interrupted by the next serve.

use crate::error::{Error, Result};
use crate::format::{now_ns, rfc3339};
use crate::storage::{FileStorage, Storage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const JOBS_DIR: &str = "jobs";
/// Ended jobs kept.
pub const HISTORY: usize = 200;
/// Job record format: 2 since records carry `repeats` and `first_started`
/// (2026-12-06); format 1 records (without them) still read.
const FORMAT: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Protect,
    InitialReplication,
    Resync,
    FailoverPlanned,
    FailoverUnplanned,
    FailoverTest,
    CleanupTest,
    ChangePoint,
    Cancel,
    Commit,
    Reprotect,
    Plan,
    Restore,
    AcceptLoss,
}

impl JobKind {
    /// Whether a process that goes on with the work picks up this kind of job
    /// after the one that began it died.
    pub fn resumable(self) -> bool {
        matches!(
            self,
            JobKind::InitialReplication | JobKind::Resync | JobKind::Reprotect
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Protect => "protect",
            JobKind::InitialReplication => "initial-replication",
            JobKind::Resync => "resync",
            JobKind::FailoverPlanned => "failover-planned",
            JobKind::FailoverUnplanned => "failover-unplanned",
            JobKind::FailoverTest => "failover-test",
            JobKind::CleanupTest => "cleanup-test",
            JobKind::ChangePoint => "change-point",
            JobKind::Cancel => "cancel",
            JobKind::Commit => "commit",
            JobKind::Reprotect => "reprotect",
            JobKind::Plan => "plan",
            JobKind::Restore => "restore",
            JobKind::AcceptLoss => "accept-loss",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    InProgress,
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn ended(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InProgress => "in-progress",
            JobState::Waiting => "waiting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub state: JobState,
    pub started: String,
    pub ended: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub format: u32,
    pub id: String,
    pub kind: JobKind,
    pub machine: Option<String>,
    pub plan: Option<String>,
    pub state: JobState,
    pub started: String,
    pub ended: Option<String>,
    pub error: Option<String>,
    pub steps: Vec<Step>,
    /// The process that runs the job: pid and its start time (clock ticks since
    /// boot, from /proc), so a reused pid is not taken for it.
    pub owner_pid: u32,
    pub owner_start: u64,
    /// Jobs of the same kind, machine and plan that failed the same way just before
    /// this one, each right after the one before it, folded into this record (their
    /// records removed): a request retried and refused alike every time leaves one
    /// record, not a history of them pushing every other job out of it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeats: u32,
    /// When the first of those repeated failures started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_started: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn dir(site: &Path) -> PathBuf {
    site.join(JOBS_DIR)
}

/// Refused unless `id` has the form of a job ID (so it names no other file).
pub fn check_id(id: &str) -> Result<()> {
    path_of(Path::new(""), id).map(|_| ())
}

fn path_of(site: &Path, id: &str) -> Result<PathBuf> {
    let ok = id.starts_with("j-")
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'T');
    if !ok {
        return Err(Error::InvalidInput(format!(
            "{id:?} is not a job ID (see `replog jobs`)"
        )));
    }
    Ok(dir(site).join(format!("{id}.json")))
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z` (a zombie: dead, not yet reaped by its parent)…
    pub state: char,
    pub pgrp: u32,
    pub session: u32,
    /// When it started, in clock ticks since boot.
    pub start: u64,
}

/// Process `pid` as /proc has it, if there is one.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; after it,
    // field 3 (state) is the first.
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// When the process `pid` started (clock ticks since boot), if it runs (a zombie
/// does not).
pub fn process_start(pid: u32) -> Option<u64> {
    proc_stat(pid).filter(|p| p.state != 'Z').map(|p| p.start)
}

impl Job {
    /// A new step `name`, in progress (in memory); its number.
    fn push_step(&mut self, name: &str) -> usize {
        self.steps.push(Step {
            name: name.to_string(),
            state: JobState::InProgress,
            started: rfc3339(now_ns()),
            ended: None,
            detail: None,
        });
        self.steps.len() - 1
    }

    /// Step number `n` is now `state` (in memory).
    fn set_step(&mut self, n: usize, state: JobState, detail: Option<String>) {
        if let Some(s) = self.steps.get_mut(n) {
            s.state = state;
            s.ended = state.ended().then(|| rfc3339(now_ns()));
            if detail.is_some() {
                s.detail = detail;
            }
        }
    }

    /// Whether the process that runs it is gone.
    pub fn owner_gone(&self) -> bool {
        process_start(self.owner_pid) != Some(self.owner_start)
    }
}

/// How a caller wants a job it asks for recorded: with an ID it chose (to find the
/// job after a crash) and as part of a plan's run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: Option<String>,
    pub plan: Option<String>,
}

impl JobSpec {
    /// A job of a run (or cleanup, or commit) of plan `plan`, under a new ID.
    pub fn of_plan(plan: &str) -> JobSpec {
        JobSpec {
            id: None,
            plan: Some(plan.to_string()),
        }
    }

    /// Begin the job of `kind` for `machine` as this spec says.
    pub fn start(&self, site: &Path, kind: JobKind, machine: Option<&str>) -> Result<JobHandle> {
        self.start_on(Arc::new(FileStorage), site, kind, machine)
    }

    /// [`JobSpec::start`], the record kept on `storage` (the site's: a failover
    /// records its jobs where it writes its state).
    pub fn start_on(
        &self,
        storage: Arc<dyn Storage>,
        site: &Path,
        kind: JobKind,
        machine: Option<&str>,
    ) -> Result<JobHandle> {
        JobHandle::start_as(
            storage,
            site,
            self.id.as_deref(),
            kind,
            machine,
            self.plan.as_deref(),
        )
    }
}

/// The owner of a job handed over to another process (no process has pid 0).
const HANDED_OVER: u32 = 0;

/// A job this process runs: every change is persisted at once.
#[derive(Debug)]
pub struct JobHandle {
    storage: Arc<dyn Storage>,
    site: PathBuf,
    job: Job,
}

fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start(pid).unwrap_or(0))
}

/// A new job ID (unique: its time to the microsecond and 16 random bits). A caller
/// may choose a job's ID before the job exists ([`JobHandle::start_as`]), so that it
/// can find the job after a crash.
pub fn new_id() -> String {
    let now = std::time::SystemTime::now();
    let t = humantime::format_rfc3339_seconds(now).to_string();
    let stamp: String = t.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let stamp = stamp.trim_end_matches('Z');
    let micros = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_micros())
        .unwrap_or(0);
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    format!("j-{stamp}-{micros:06}-{:02x}{:02x}", r[0], r[1])
}

impl JobHandle {
    /// Begin a job of `kind` (for `machine`), in progress.
    pub fn start(site: &Path, kind: JobKind, machine: Option<&str>) -> Result<JobHandle> {
        JobSpec::default().start(site, kind, machine)
    }

    /// Begin a job of `kind` (for `machine`, as part of a run of `plan`), with the ID
    /// `id` chosen beforehand (refused when a job has it already) or a new one; its
    /// record kept on `storage`.
    fn start_as(
        storage: Arc<dyn Storage>,
        site: &Path,
        id: Option<&str>,
        kind: JobKind,
        machine: Option<&str>,
        plan: Option<&str>,
    ) -> Result<JobHandle> {
        let id = match id {
            Some(id) => {
                if storage.exists(&path_of(site, id)?) {
                    return Err(Error::AlreadyExists(format!(
                        "job {id} exists already: an operation is asked for twice"
                    )));
                }
                id.to_string()
            }
            None => new_id(),
        };
        let (pid, start) = me();
        let h = JobHandle {
            storage,
            site: site.to_path_buf(),
            job: Job {
                format: FORMAT,
                id,
                kind,
                machine: machine.map(str::to_string),
                plan: plan.map(str::to_string),
                state: JobState::InProgress,
                started: rfc3339(now_ns()),
                ended: None,
                error: None,
                steps: Vec::new(),
                owner_pid: pid,
                owner_start: start,
                repeats: 0,
                first_started: None,
            },
        };
        h.save()?;
        Ok(h)
    }

    /// Go on with the newest job of `kind` for `machine` that is in progress and
    /// whose process died, if there is one (saying so in a step); else begin one.
    pub fn resume_or_start(site: &Path, kind: JobKind, machine: &str) -> Result<JobHandle> {
        let orphan = list(site)?.into_iter().find(|j| {
            j.kind == kind
                && j.machine.as_deref() == Some(machine)
                && j.state == JobState::InProgress
                && j.owner_gone()
        });
        let Some(job) = orphan else {
            return JobHandle::start(site, kind, Some(machine));
        };
        JobHandle::adopt(site, job)
    }

    /// Take `job` over (its process died, or it waits for an operator): this
    /// process owns it from now on, in progress; steps its predecessor left in
    /// progress end as interrupted, and a step says who goes on.
    pub fn take_over(site: &Path, job: Job) -> Result<JobHandle> {
        let mut h = JobHandle::adopt(site, job)?;
        h.job.state = JobState::InProgress;
        h.job.ended = None;
        h.job.error = None;
        h.save()?;
        Ok(h)
    }

    fn adopt(site: &Path, mut job: Job) -> Result<JobHandle> {
        let gone = job.owner_pid;
        let was = job.state;
        let (pid, start) = me();
        job.owner_pid = pid;
        job.owner_start = start;
        for s in job
            .steps
            .iter_mut()
            .filter(|s| s.state == JobState::InProgress || s.state == JobState::Waiting)
        {
            s.ended = Some(rfc3339(now_ns()));
            if gone == HANDED_OVER || s.state == JobState::Waiting {
                s.state = JobState::Succeeded;
            } else {
                s.state = JobState::Failed;
                s.detail = Some(format!("interrupted: process {gone} stopped"));
            }
        }
        let mut h = JobHandle {
            storage: Arc::new(FileStorage),
            site: site.to_path_buf(),
            job,
        };
        h.step(&match was {
            JobState::Waiting => format!("resumed by process {pid}"),
            _ if gone == HANDED_OVER => format!("taken over by process {pid}"),
            JobState::Failed => format!("resumed by process {pid} after it stopped"),
            _ => format!("resumed by process {pid} after process {gone} stopped"),
        });
        h.step_done(None::<String>)?;
        Ok(h)
    }

    /// Begin step `name` beside the steps in progress (several go on at once: the
    /// failovers of a plan's group); returns its number for [`end_step`].
    ///
    /// [`end_step`]: JobHandle::end_step
    pub fn begin_step(&mut self, name: &str) -> usize {
        let n = self.job.push_step(name);
        self.save_logged();
        n
    }

    /// End step number `n` (from [`begin_step`](JobHandle::begin_step)) as `state`.
    pub fn end_step(&mut self, n: usize, state: JobState, detail: Option<String>) {
        self.job.set_step(n, state, detail);
        self.save_logged();
    }

    /// Say how step number `n` is going.
    pub fn step_detail(&mut self, n: usize, detail: String) {
        if let Some(s) = self.job.steps.get_mut(n) {
            s.detail = Some(detail);
        }
        self.save_logged();
    }

    /// The job waits for an operator (a plan's manual action): step number `n` waits,
    /// the job is `waiting`, and no process owns it.
    pub fn wait_for_operator(mut self, n: usize) -> Result<Job> {
        if let Some(s) = self.job.steps.get_mut(n) {
            s.state = JobState::Waiting;
        }
        self.job.state = JobState::Waiting;
        self.job.owner_pid = HANDED_OVER;
        self.job.owner_start = 0;
        self.save()?;
        Ok(self.job)
    }

    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Leave the job, in progress, to the process that goes on with it (serve's
    /// shipping loop takes it over with `resume_or_start`).
    pub fn hand_over(&mut self) -> Result<()> {
        self.job.owner_pid = HANDED_OVER;
        self.job.owner_start = 0;
        self.save()
    }

    pub fn job(&self) -> &Job {
        &self.job
    }

    fn save(&self) -> Result<()> {
        let p = path_of(&self.site, &self.job.id)?;
        self.storage.create_dir_all(&dir(&self.site))?;
        let text = serde_json::to_string_pretty(&self.job)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        crate::storage::write_atomic(self.storage.as_ref(), &p, text.as_bytes())
    }

    /// Begin step `name` (an unfinished step before it ends as succeeded). Persisted
    /// by the next change or now if `save` is called; errors writing the record are
    /// logged, never allowed to stop the work itself.
    pub fn step(&mut self, name: &str) {
        self.close_open_step(JobState::Succeeded, None);
        self.begin_step(name);
    }

    /// Say how the step in progress is going.
    pub fn progress(&mut self, detail: impl Into<String>) {
        if let Some(s) = self.job.steps.last_mut() {
            s.detail = Some(detail.into());
        }
        self.save_logged();
    }

    /// The step in progress succeeded.
    pub fn step_done(&mut self, detail: Option<impl Into<String>>) -> Result<()> {
        self.close_open_step(JobState::Succeeded, detail.map(Into::into));
        self.save()
    }

    fn close_open_step(&mut self, state: JobState, detail: Option<String>) {
        if let Some(s) = self
            .job
            .steps
            .last_mut()
            .filter(|s| s.state == JobState::InProgress)
        {
            s.state = state;
            s.ended = Some(rfc3339(now_ns()));
            if detail.is_some() {
                s.detail = detail;
            }
        }
    }

    fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::warn!(job = %self.job.id, "job record: {e}");
        }
    }

    /// Check the end state (`verify`, the job's last step, saying what it found) and
    /// end the job: succeeded only if the check passed.
    pub fn finish(mut self, verify: impl FnOnce() -> Result<String>) -> Result<Job> {
        self.step("verify the end state");
        match verify() {
            Ok(found) => {
                self.close_open_step(JobState::Succeeded, Some(found));
                self.job.state = JobState::Succeeded;
                self.job.ended = Some(rfc3339(now_ns()));
                self.save()?;
                prune(self.storage.as_ref(), &self.site);
                Ok(self.job)
            }
            Err(e) => {
                let why = format!("the end state did not verify: {e}");
                self.fail_with(&why);
                Err(e)
            }
        }
    }

    /// End the job as failed, with the reason (the step in progress fails with it).
    pub fn fail(mut self, e: &Error) -> Job {
        self.fail_with(&e.to_string());
        self.job
    }

    fn fail_with(&mut self, why: &str) {
        self.close_open_step(JobState::Failed, Some(why.to_string()));
        self.job.state = JobState::Failed;
        self.job.error = Some(why.to_string());
        self.job.ended = Some(rfc3339(now_ns()));
        let folded = self.fold_repeat();
        self.save_logged();
        // Removed once this record holds its count: a crash in between leaves both.
        if let Some(id) = folded {
            if let Ok(p) = path_of(&self.site, &id) {
                let _ = self.storage.remove_file(&p);
            }
        }
        prune(self.storage.as_ref(), &self.site);
    }

    /// If the newest ended job of this kind, machine and plan failed with the same
    /// error, count it (and the failures it stands for) into this one; its ID.
    fn fold_repeat(&mut self) -> Option<String> {
        let jobs = list_on(self.storage.as_ref(), &self.site).ok()?;
        let prev = jobs.into_iter().find(|j| {
            j.id != self.job.id
                && j.state.ended()
                && j.kind == self.job.kind
                && j.machine == self.job.machine
                && j.plan == self.job.plan
        })?;
        if prev.state != JobState::Failed || prev.error != self.job.error {
            return None;
        }
        self.job.repeats = prev.repeats.saturating_add(1);
        self.job.first_started = Some(prev.first_started.unwrap_or(prev.started));
        Some(prev.id)
    }
}

/// End job `id`, which no process runs now (it waits for an operator, or its run
/// stopped), as `state`, saying `why` in a last step; saved once. A job that has
/// ended already stays as it is. Returns the job as it is now.
pub fn close(site: &Path, id: &str, state: JobState, why: &str) -> Result<Job> {
    let mut job = get(site, id)?;
    if job.state.ended() {
        return Ok(job);
    }
    for n in 0..job.steps.len() {
        if job.steps.get(n).is_some_and(|s| !s.state.ended()) {
            job.set_step(n, JobState::Cancelled, None);
        }
    }
    let n = job.push_step(why);
    job.set_step(n, JobState::Succeeded, None);
    job.state = state;
    job.ended = Some(rfc3339(now_ns()));
    let h = JobHandle {
        storage: Arc::new(FileStorage),
        site: site.to_path_buf(),
        job,
    };
    h.save()?;
    prune(&FileStorage, site);
    Ok(h.job)
}

/// Every job of the site, newest first (files that do not decode are skipped, with a
/// warning).
pub fn list(site: &Path) -> Result<Vec<Job>> {
    list_on(&FileStorage, site)
}

/// A job record is at most this big (a plan's job lists a few steps per machine).
const RECORD_LIMIT: u64 = 16 << 20;

/// [`list`] of the records kept on `storage`.
pub fn list_on(storage: &dyn Storage, site: &Path) -> Result<Vec<Job>> {
    let d = dir(site);
    let mut out = Vec::new();
    for id in ids_on(storage, &d)? {
        let p = d.join(format!("{id}.json"));
        let bytes = match storage.open(&p, crate::storage::OpenMode::ReadOnly) {
            Ok(f) => match crate::storage::read_all(f.as_ref(), RECORD_LIMIT) {
                Ok(b) => b,
                Err(e @ Error::Corruption { .. }) => {
                    tracing::warn!("{}: not a job record: {e}", p.display());
                    continue;
                }
                Err(e) => return Err(e),
            },
            Err(e) if crate::storage::is_not_found(&e) => continue, // pruned
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Job>(&bytes) {
            Ok(j) if (1..=FORMAT).contains(&j.format) => out.push(j),
            Ok(j) => tracing::warn!(
                "{}: job format {}; this build reads 1 to {FORMAT}",
                p.display(),
                j.format
            ),
            Err(e) => tracing::warn!("{}: not a job record: {e}", p.display()),
        }
    }
    Ok(out)
}

/// The job IDs that name files `<id>.json` in `dir` (job records, plan runs),
/// newest first (IDs sort by start time); none when `dir` is not there.
pub fn ids_in(dir: &Path) -> Result<Vec<String>> {
    ids_on(&FileStorage, dir)
}

/// [`ids_in`] on `storage`.
fn ids_on(storage: &dyn Storage, dir: &Path) -> Result<Vec<String>> {
    let names = match storage.list_dir(dir) {
        Ok(n) => n,
        Err(e) if crate::storage::is_not_found(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids: Vec<String> = names
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .filter(|n| check_id(n).is_ok())
        .collect();
    ids.sort();
    ids.reverse();
    Ok(ids)
}

/// Job `id`.
pub fn get(site: &Path, id: &str) -> Result<Job> {
    let p = path_of(site, id)?;
    let text = std::fs::read_to_string(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("this site has no job {id}")),
        _ => Error::io("read", &p, e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::corruption(&p, 0, e.to_string()))
}

/// Jobs in progress whose process died and which nobody resumes: failed, as
/// interrupted (a starting serve calls this). Resumable kinds are left to the loops
/// that go on with them, and so is every job for which `resumed_elsewhere` holds
/// (a plan's run, which `replog plan resume` continues from its state file).
pub fn reap(site: &Path, resumed_elsewhere: impl Fn(&Job) -> bool) -> Result<usize> {
    let mut n = 0;
    for job in list(site)? {
        let resumable = job.kind.resumable() || resumed_elsewhere(&job);
        if job.state != JobState::InProgress || resumable || !job.owner_gone() {
            continue;
        }
        let gone = job.owner_pid;
        let h = JobHandle {
            storage: Arc::new(FileStorage),
            site: site.to_path_buf(),
            job,
        };
        h.fail(&Error::InvalidInput(format!(
            "interrupted: process {gone} stopped before the job ended"
        )));
        n += 1;
    }
    Ok(n)
}

/// Keep the newest [`HISTORY`] ended jobs.
fn prune(storage: &dyn Storage, site: &Path) {
    let Ok(jobs) = list_on(storage, site) else {
        return;
    };
    for j in jobs.iter().filter(|j| j.state.ended()).skip(HISTORY) {
        if let Ok(p) = path_of(site, &j.id) {
            let _ = storage.remove_file(&p);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_job_succeeds_only_when_its_end_state_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let mut j = JobHandle::start(tmp.path(), JobKind::Restore, Some("vm1")).unwrap();
        j.step("write");
        j.progress("half");
        let id = j.id().to_string();
        assert_eq!(get(tmp.path(), &id).unwrap().state, JobState::InProgress);
        let done = j.finish(|| Ok("checked".into())).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        let back = get(tmp.path(), &id).unwrap();
        assert_eq!(back, done);
        assert_eq!(back.steps.len(), 2);
        assert_eq!(back.steps[1].detail.as_deref(), Some("checked"));

        let j = JobHandle::start(tmp.path(), JobKind::Protect, Some("vm1")).unwrap();
        let id = j.id().to_string();
        let err = j.finish(|| Err(Error::InvalidInput("it was not there".into())));
        assert!(err.is_err());
        let back = get(tmp.path(), &id).unwrap();
        assert_eq!(back.state, JobState::Failed);
        assert!(back
            .error
            .unwrap()
            .contains("did not verify: it was not there"));
        assert_eq!(list(tmp.path()).unwrap().len(), 2);
    }

    #[test]
    fn the_same_failure_again_and_again_is_one_record_with_a_count() {
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path();
        let fail = |kind: JobKind, machine: &str, why: &str| {
            let j = JobHandle::start(site, kind, Some(machine)).unwrap();
            j.fail(&Error::InvalidInput(why.into()))
        };
        let ok = JobHandle::start(site, JobKind::Commit, Some("vm1")).unwrap();
        ok.finish(|| Ok("done".into())).unwrap();
        let first = fail(JobKind::Reprotect, "vm1", "refused");
        for _ in 0..HISTORY + 10 {
            fail(JobKind::Reprotect, "vm1", "refused");
        }
        let all = list(site).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        let newest = &all[0];
        assert_eq!(newest.kind, JobKind::Reprotect);
        assert_eq!(newest.repeats, HISTORY as u32 + 10);
        assert_eq!(
            newest.first_started.as_deref(),
            Some(first.started.as_str())
        );
        assert_eq!(all[1].kind, JobKind::Commit, "the commit was pushed out");
        // Another error, another machine, or a success in between: a record of its
        // own.
        fail(JobKind::Reprotect, "vm1", "refused for another reason");
        fail(JobKind::Reprotect, "vm2", "refused for another reason");
        let j = JobHandle::start(site, JobKind::Reprotect, Some("vm2")).unwrap();
        j.finish(|| Ok(String::new())).unwrap();
        let again = fail(JobKind::Reprotect, "vm2", "refused for another reason");
        assert_eq!(again.repeats, 0);
        assert_eq!(list(site).unwrap().len(), 6);
        // Records without the new fields (older builds) read as no repeats.
        let text = serde_json::to_string(&all[1]).unwrap();
        assert!(!text.contains("repeats"), "{text}");
        let back: Job = serde_json::from_str(&text).unwrap();
        assert_eq!(back.repeats, 0);
    }

    #[test]
    fn history_is_bounded_and_ids_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let keep = JobHandle::start(tmp.path(), JobKind::Resync, Some("vm1")).unwrap();
        for _ in 0..HISTORY + 5 {
            let j = JobHandle::start(tmp.path(), JobKind::Restore, None).unwrap();
            j.finish(|| Ok(String::new())).unwrap();
        }
        let all = list(tmp.path()).unwrap();
        assert_eq!(all.iter().filter(|j| j.state.ended()).count(), HISTORY);
        assert!(
            all.iter().any(|j| j.id == keep.id()),
            "an unfinished job was pruned"
        );
        for bad in ["../x", "j-../../etc/passwd", "", "x"] {
            assert!(get(tmp.path(), bad).is_err(), "{bad}");
        }
    }
}
