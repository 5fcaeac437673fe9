//! `replog plan failover … --dry-run`: every check a run would make before it
//! changes anything — serve and its mount, each machine's role and state for the
//! kind, a point at the chosen level for each (or the plan point they share),
//! test-copy names free, every program executable — with the steps in order and an
//! estimate. It takes no lock, creates no job, runs no program and writes nothing.

use super::file::{ActionKind, Known, Plan};
use super::run::{steps, StepRef};
use crate::error::Result;
use crate::protection::{FailoverKind, Role};
use serde::Serialize;
use std::path::Path;

/// Reading the data of a point to check its digests, about (an estimate).
const VERIFY_BYTES_PER_S: f64 = 1024.0 * 1024.0 * 1024.0;
/// Shipping what a primary has not sent yet, about (an estimate).
const SHIP_BYTES_PER_S: f64 = 100.0 * 1024.0 * 1024.0;
/// A promotion and its bookkeeping, about.
const FAILOVER_BASE_S: f64 = 0.5;

/// One step of the run and what its check found.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub step: String,
    pub ok: bool,
    pub detail: String,
}

/// What a dry run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plan: String,
    pub kind: FailoverKind,
    pub at: String,
    pub steps: Vec<Check>,
    /// Actions that do not run for this kind.
    pub skipped: Vec<String>,
    pub problems: Vec<String>,
    /// The failovers, about (s).
    pub estimate_failovers_s: f64,
    /// The programs' timeouts added up: the longest they may take (s).
    pub actions_up_to_s: f64,
    /// Manual actions: the run waits for an operator at each.
    pub manual_actions: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Bytes in the files under `dir` (0 if it is not there).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Check machine `m` for a failover of `kind` at `point` (a point rule or `pt-N`);
/// Ok: what will happen and how long it may take (s).
fn check_machine(
    site: &Path,
    m: &str,
    kind: FailoverKind,
    point: &str,
    status: Option<&crate::protection::status::SiteStatus>,
) -> std::result::Result<(String, f64), String> {
    let known = super::store::known(site, m);
    if kind == FailoverKind::Planned {
        if known != Known::Primary {
            return Err(format!(
                "{m} is not a primary here: a planned failover runs at the primary site"
            ));
        }
        let dir = site.join(crate::site::MACHINES_DIR).join(m);
        let man = crate::volume::Machine::read_manifest(&crate::storage::FileStorage, &dir)
            .map_err(|e| e.to_string())?;
        if man.role != Role::Primary {
            return Err(format!("{m} is a {} here, not a primary", man.role));
        }
        if let Some(f) = &man.fence {
            return Err(format!("{m} was failed over already: {}", f.reason));
        }
        if man.intent.is_some() {
            return Err(format!("a planned failover of {m} is under way"));
        }
        if man.pending.is_some() {
            return Err(format!("{m}'s own failover is not committed yet"));
        }
        let rel = crate::replication::relationship::Relationship::load(site, m)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{m} is not protected: there is no target to fail over to"))?;
        if rel.paused {
            return Err(format!(
                "shipping of {m} is paused: `replog resume {} {m}` first",
                site.display()
            ));
        }
        // The failover ships through the machine's replication: it must be working
        // (serve's status says so; the target answered lately).
        if let Some(st) = status {
            let e = st
                .machines
                .iter()
                .find(|x| x.name == m && x.role == Role::Primary)
                .ok_or_else(|| format!("serve has no machine {m} open"))?;
            if e.state != crate::protection::State::Protected
                || e.health != crate::protection::Health::Healthy
            {
                return Err(format!(
                    "its replication is {} / {}: {}",
                    e.state, e.health, e.reason
                ));
            }
        }
        let unshipped = bytes_under(&dir.join(crate::volume::JOURNAL_DIR));
        return Ok((
            format!(
                "{m}: writes stopped, at most {unshipped} bytes of journal shipped, promoted at {}",
                rel.target
            ),
            FAILOVER_BASE_S + unshipped as f64 / SHIP_BYTES_PER_S,
        ));
    }
    if known != Known::Replica {
        return Err(format!(
            "{m} is {} here, not a replica: {kind} failovers run at the site that holds its replica",
            match known {
                Known::Primary => "a machine",
                Known::TestCopy => "a test copy",
                _ => "unknown",
            }
        ));
    }
    let store = crate::replica::store::Replicas::local(site)
        .and_then(|r| r.open_readonly(m))
        .map_err(|e| e.to_string())?;
    if let Some(p) = store.promotion().map_err(|e| e.to_string())? {
        return Err(format!(
            "{m} was failed over already ({}, at LSN {})",
            p.kind, p.lsn
        ));
    }
    if kind == FailoverKind::Test {
        let copy = crate::failover::test_name(m);
        if super::store::known(site, &copy) != Known::Unknown {
            return Err(format!(
                "{copy}, the name of its test copy, is taken (clean up an earlier test)"
            ));
        }
    }
    let p = crate::replica::points::resolve(&store, point).map_err(|e| e.to_string())?;
    let dir = site.join(crate::replica::store::REPLICAS_DIR).join(m);
    let bytes = if dir.is_dir() {
        bytes_under(&dir)
    } else {
        // In an object store: what verification reads is about the disks' size.
        store.manifest().disks.iter().map(|d| d.size).sum()
    };
    Ok((
        format!(
            "{} at {}",
            if kind == FailoverKind::Test {
                crate::failover::test_name(m)
            } else {
                m.to_string()
            },
            crate::replica::points::describe(p.lsn, p.time_ns, p.app_consistent)
        ),
        FAILOVER_BASE_S + bytes as f64 / VERIFY_BYTES_PER_S,
    ))
}

/// Check a run of plan `name` as `kind` at `at`, changing nothing.
pub fn dry_run(site: &Path, name: &str, kind: FailoverKind, at: &str) -> Result<Report> {
    let plan: Plan = super::store::load(site, name)?;
    let mut problems = Vec::new();
    if let Some(r) = super::run::unfinished(site, name)? {
        problems.push(format!(
            "run {} of this plan is {}: a new run is refused until it is resumed, cleaned \
             up (test) or abandoned",
            r.job,
            r.state.as_str()
        ));
    }
    let serving = match crate::control::request(site, &crate::control::Request::ServeInfo) {
        Ok(Some(reply)) => {
            match reply.into_result().map(|r| r.mount) {
                Ok(Some(m)) if crate::frontend::is_live_replog_mount(&m) => {}
                Ok(Some(m)) => {
                    problems.push(format!("serve's mount {} does not answer", m.display()))
                }
                Ok(None) if kind == FailoverKind::Planned => {}
                Ok(None) => problems.push(
                    "serve runs without --mount: the machines would have nowhere to come up".into(),
                ),
                Err(e) => problems.push(format!("serve: {e}")),
            }
            true
        }
        Ok(None) => {
            problems.push(format!(
                "no serve runs at {}: start `replog serve SITE --mount DIR`",
                site.display()
            ));
            false
        }
        Err(e) => {
            problems.push(format!("serve: {e}"));
            false
        }
    };
    // What serve says of its machines (their replication's health, for planned runs).
    let status = match (serving, kind) {
        (true, FailoverKind::Planned) => match crate::protection::status::SiteStatus::load(site) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(format!("the replication health cannot be checked: {e}"));
                None
            }
        },
        _ => None,
    };
    let points = match super::points::choose(site, &plan, kind, at) {
        Ok((_, p)) => p,
        Err(e) => {
            problems.push(e.to_string());
            Default::default()
        }
    };
    let mut checks = Vec::new();
    let mut skipped = Vec::new();
    let mut failovers_s = 0.0;
    let mut actions_s = 0.0;
    let mut manual = 0;
    for (gi, g) in plan.groups.iter().enumerate() {
        for (phase, list) in [("before", &g.before), ("after", &g.after)] {
            for (i, a) in list.iter().enumerate() {
                if !a.runs_on(kind) {
                    skipped.push(format!(
                        "group {}: {phase} {}: {} (not for {kind} failovers)",
                        gi + 1,
                        i + 1,
                        a.describe()
                    ));
                }
            }
        }
    }
    for step in steps(&plan, kind) {
        let name = step.name(&plan);
        match step {
            StepRef::Action {
                group,
                after,
                index,
            } => {
                let Some(a) = plan.action(group, after, index) else {
                    continue;
                };
                let (ok, detail) = match &a.what {
                    ActionKind::Run {
                        argv, timeout_ms, ..
                    } => {
                        actions_s += *timeout_ms as f64 / 1000.0;
                        let prog = argv.first().map(String::as_str).unwrap_or_default();
                        match super::file::executable(Path::new(prog)) {
                            Ok(()) => (
                                true,
                                format!(
                                    "executable; killed after {}",
                                    humantime::format_duration(std::time::Duration::from_millis(
                                        *timeout_ms
                                    ))
                                ),
                            ),
                            Err(why) => (false, why),
                        }
                    }
                    ActionKind::Manual { .. } => {
                        manual += 1;
                        (
                            true,
                            "the run pauses here until `replog plan resume`".into(),
                        )
                    }
                };
                if !ok {
                    problems.push(format!("{name}: {detail}"));
                }
                checks.push(Check {
                    step: name,
                    ok,
                    detail,
                });
            }
            StepRef::Failover { group } => {
                let mut slowest: f64 = 0.0;
                let Some(g) = plan.groups.get(group) else {
                    continue;
                };
                for m in &g.machines {
                    let point = points.get(m).cloned().unwrap_or_else(|| at.to_string());
                    let step = format!("group {}: fail over {m} ({kind})", group + 1);
                    match check_machine(site, m, kind, &point, status.as_ref()) {
                        Ok((detail, s)) => {
                            slowest = slowest.max(s);
                            checks.push(Check {
                                step,
                                ok: true,
                                detail,
                            });
                        }
                        Err(why) => {
                            problems.push(format!("{step}: {why}"));
                            checks.push(Check {
                                step,
                                ok: false,
                                detail: why,
                            });
                        }
                    }
                }
                failovers_s += slowest;
            }
        }
    }
    Ok(Report {
        plan: plan.name,
        kind,
        at: at.to_string(),
        steps: checks,
        skipped,
        problems,
        estimate_failovers_s: failovers_s,
        actions_up_to_s: actions_s,
        manual_actions: manual,
    })
}
