//! `replog plan …`: recovery plans — add, list, show, remove; fail over (with
//! `--dry-run`), resume, cleanup-test, commit; plan points (`checkpoint`).

use replog::plan::file::{ActionKind, Plan};
use replog::plan::run::{Ended, Progress};
use replog::plan::{dry, points, run, store};
use replog::protection::FailoverKind;
use replog::{Error, Result, Site};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A progress bar over a run's steps, on a terminal and without --json.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(json: bool) -> Bar {
        if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Bar(indicatif::ProgressBar::hidden());
        }
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("plan {bar:30} {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar(b)
    }
}

impl Progress for Bar {
    fn step(&self, done: usize, total: usize, what: &str) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
        self.0.set_message(what.to_string());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

pub fn add(site: &Path, file: &Path, replace: bool) -> Result<()> {
    Site::read_config(site)?;
    // At most one byte more than a plan may have: /dev/zero is refused, not read.
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?,
            replog::plan::file::MAX_FILE_BYTES as u64 + 1,
        ),
        &mut text,
    )
    .map_err(|e| Error::io("read", file, e))?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::InvalidInput(format!("{}: not UTF-8 text", file.display())))?;
    let plan = store::add(site, &text, &file.display().to_string(), replace)?;
    println!(
        "plan {} stored: {} group(s), {} machine(s)",
        plan.name,
        plan.groups.len(),
        plan.machines().count()
    );
    Ok(())
}

fn action_doc(a: &replog::plan::file::Action) -> serde_json::Value {
    let on: Vec<&str> = a.on.iter().map(|k| k.as_str()).collect();
    match &a.what {
        ActionKind::Run {
            argv,
            timeout_ms,
            line,
        } => serde_json::json!({
            "run": line, "argv": argv, "timeout_s": *timeout_ms as f64 / 1000.0, "on": on,
        }),
        ActionKind::Manual { text } => serde_json::json!({ "manual": text, "on": on }),
    }
}

fn plan_doc(site: &Path, p: &Plan) -> Result<serde_json::Value> {
    let runs: Vec<serde_json::Value> = run::runs_of(site, &p.name)?
        .iter()
        .map(|r| {
            serde_json::json!({
                "job": r.job, "kind": r.kind, "state": r.state, "at": r.at,
                "plan_point": r.plan_point.map(replog::replica::points::plan_point_id),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "name": p.name,
        "groups": p.groups.iter().map(|g| serde_json::json!({
            "machines": g.machines,
            "before": g.before.iter().map(action_doc).collect::<Vec<_>>(),
            "after": g.after.iter().map(action_doc).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "runs": runs,
    }))
}

pub fn list(site: &Path, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let plans = store::list(site)?;
    if json {
        let docs: Result<Vec<_>> = plans.iter().map(|p| plan_doc(site, p)).collect();
        println!("{}", serde_json::json!({ "plans": docs? }));
        return Ok(());
    }
    if plans.is_empty() {
        println!("no plans at {}", site.display());
    }
    for p in &plans {
        let last = run::runs_of(site, &p.name)?.into_iter().next();
        println!(
            "{:<20} {} group(s), {} machine(s){}",
            p.name,
            p.groups.len(),
            p.machines().count(),
            last.map(|r| format!(
                "; last run {} ({} failover, {})",
                r.job,
                r.kind,
                r.state.as_str()
            ))
            .unwrap_or_default()
        );
    }
    Ok(())
}

pub fn show(site: &Path, name: &str, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let p = store::load(site, name)?;
    if json {
        println!("{}", plan_doc(site, &p)?);
        return Ok(());
    }
    println!("plan {}", p.name);
    for (i, g) in p.groups.iter().enumerate() {
        println!("  group {}: {}", i + 1, g.machines.join(", "));
        for (phase, list) in [("before", &g.before), ("after", &g.after)] {
            for a in list {
                let on: Vec<&str> = a.on.iter().map(|k| k.as_str()).collect();
                let timeout = match &a.what {
                    ActionKind::Run { timeout_ms, .. } => format!(
                        ", timeout {}",
                        humantime::format_duration(Duration::from_millis(*timeout_ms))
                    ),
                    ActionKind::Manual { .. } => String::new(),
                };
                println!(
                    "    {phase}: {} (on {}{timeout})",
                    a.describe(),
                    on.join(", ")
                );
            }
        }
    }
    for r in run::runs_of(site, name)?.iter().take(5) {
        println!("  run {}: {} failover, {}", r.job, r.kind, r.state.as_str());
    }
    Ok(())
}

pub fn remove(site: &Path, name: &str) -> Result<()> {
    Site::read_config(site)?;
    store::remove(site, name)?;
    println!("plan {name} removed");
    Ok(())
}

/// Print how a run ended: Ok when it succeeded or waits, Err (exit 1) when it failed.
fn report(site: &Path, name: &str, ended: Ended, json: bool) -> Result<()> {
    let resume = format!("replog plan resume {} {name}", site.display());
    let (job, state, error, text) = match ended {
        Ended::Succeeded(job) => (job, "succeeded", None, None),
        Ended::Waiting { job, text } => (job, "waiting", None, Some(text)),
        Ended::Failed { job, error } => (job, "failed", Some(error), None),
    };
    let machines = run::load(site, &job.id)
        .map(|r| r.machines)
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "plan": name,
                "job": job.id,
                "state": state,
                "error": error,
                "manual": text,
                "resume": (state == "waiting").then_some(&resume),
                "machines": machines,
            })
        );
    } else {
        for (m, mr) in &machines {
            println!(
                "  {m}: {}{}",
                match mr.state {
                    run::MachineState::Up => "up",
                    run::MachineState::Failed => "FAILED",
                    run::MachineState::Pending => "not reached",
                },
                mr.detail
                    .as_deref()
                    .map(|d| format!(" — {d}"))
                    .unwrap_or_default()
            );
        }
        match state {
            "succeeded" => println!("plan {name}: every machine is up (job {})", job.id),
            "waiting" => {
                println!("plan {name} waits at a manual step (job {}):", job.id);
                println!("  {}", text.unwrap_or_default());
                println!("then go on with: {resume}");
            }
            _ => {}
        }
    }
    match error {
        Some(e) => Err(Error::InvalidInput(format!(
            "plan {name} failed (job {}): {e}",
            job.id
        ))),
        None => Ok(()),
    }
}

/// `at`: POINT (clap refuses it with --planned, which is at each machine's last LSN).
pub fn failover(
    site: &Path,
    name: &str,
    kind: FailoverKind,
    at: Option<&str>,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    Site::read_config(site)?;
    let at = match (kind, at) {
        (FailoverKind::Planned, _) => "last-lsn",
        (_, Some(a)) => a,
        (_, None) => "latest",
    };
    if dry_run {
        return print_dry(&dry::dry_run(site, name, kind, at)?, json);
    }
    let bar = Bar::new(json);
    let ended = run::start(site, name, kind, at, &bar);
    drop(bar);
    report(site, name, ended?, json)
}

/// Print what a dry run found: Err (exit 1) when a check failed.
fn print_dry(r: &dry::Report, json: bool) -> Result<()> {
    if json {
        let mut doc = serde_json::to_value(r).unwrap_or_default();
        doc["ok"] = serde_json::Value::Bool(r.ok());
        println!("{doc}");
    } else {
        println!(
            "dry run of plan {}: {} failover at {} (nothing changed, no program run)",
            r.plan, r.kind, r.at
        );
        for c in &r.steps {
            println!(
                "  {} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.step,
                c.detail
            );
        }
        for s in &r.skipped {
            println!("  skip {s}");
        }
        println!(
            "estimate: failovers about {:.1} s; programs up to {:.0} s (their timeouts){}",
            r.estimate_failovers_s,
            r.actions_up_to_s,
            if r.manual_actions > 0 {
                format!("; {} manual step(s) wait for an operator", r.manual_actions)
            } else {
                String::new()
            }
        );
        if r.ok() {
            println!("every check passed");
        } else {
            println!("{} problem(s):", r.problems.len());
            for p in &r.problems {
                println!("  - {p}");
            }
        }
    }
    if r.ok() {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "the dry run found {} problem(s)",
            r.problems.len()
        )))
    }
}

pub fn resume(site: &Path, name: &str, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let bar = Bar::new(json);
    let ended = run::resume(site, name, &bar);
    drop(bar);
    report(site, name, ended?, json)
}

fn print_job(job: &replog::jobs::Job, json: bool, what: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({"job": job.id, "state": job.state, "steps": job.steps})
        );
    } else {
        for s in job.steps.iter().skip(1) {
            println!(
                "  {}: {}",
                s.name,
                s.detail.as_deref().unwrap_or(s.state.as_str())
            );
        }
        println!("{what} (job {})", job.id);
    }
}

pub fn abandon(site: &Path, name: &str, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let job = run::abandon(site, name)?;
    print_job(&job, json, &format!("plan {name}: the run is given up"));
    Ok(())
}

pub fn cleanup_test(site: &Path, name: &str, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let job = replog::plan::cleanup_test(site, name)?;
    print_job(
        &job,
        json,
        &format!("plan {name}: the test copies are gone"),
    );
    Ok(())
}

pub fn commit(site: &Path, name: &str, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let job = replog::plan::commit(site, name)?;
    print_job(&job, json, &format!("plan {name}: committed"));
    Ok(())
}

pub fn checkpoint(
    site: &Path,
    name: &str,
    app_consistent: bool,
    freeze: &[PathBuf],
    max_pause: &str,
    json: bool,
) -> Result<()> {
    Site::read_config(site)?;
    let max_pause = humantime::parse_duration(max_pause)
        .map_err(|e| Error::InvalidInput(format!("--max-pause {max_pause:?}: {e}")))?;
    let plan = store::load(site, name)?;
    let t = std::time::Instant::now();
    // Frozen in the order given, thawed in the reverse order whatever happens.
    let mut frozen = Vec::new();
    let taken = (|| {
        for dir in freeze {
            frozen.push(super::replicate::Frozen::freeze(dir)?);
        }
        points::checkpoint(site, &plan, app_consistent, max_pause)
    })();
    while let Some(f) = frozen.pop() {
        drop(f);
    }
    let frozen_ms = (!freeze.is_empty()).then(|| t.elapsed().as_secs_f64() * 1000.0);
    let p = taken?;
    let id = replog::replica::points::plan_point_id(p.id);
    if json {
        let pts: Vec<_> = p
            .points
            .iter()
            .map(|(m, lsn, t)| {
                serde_json::json!({
                    "machine": m, "id": format!("pt-{lsn}"), "lsn": lsn,
                    "time": replog::format::rfc3339(*t),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "plan": name, "plan_point": id, "app_consistent": app_consistent,
                "points": pts, "writes_held_us": p.held_us, "waited_us": p.waited_us,
                "frozen_ms": frozen_ms,
            })
        );
    } else {
        println!(
            "plan {name}: {} plan point {id}",
            if app_consistent {
                "app-consistent"
            } else {
                "crash-consistent"
            }
        );
        for (m, lsn, _) in &p.points {
            println!("  {m}: pt-{lsn}");
        }
        println!(
            "writes held {:.3} ms (taking the holds: {:.3} ms){}",
            p.held_us as f64 / 1000.0,
            p.waited_us as f64 / 1000.0,
            frozen_ms
                .map(|ms| format!("; file systems frozen {ms:.1} ms"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
