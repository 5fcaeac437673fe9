//! `replog failover` and `replog commit`: each one request to the site (its running
//! serve, or offline), carried out as a job; the reply says what was done and which
//! job recorded it.

use replog::control::{self, Reply, Request};
use replog::protection::FailoverKind;
use replog::Result;
use std::path::Path;

/// What `replog failover` was asked to do.
#[derive(Debug)]
pub enum Mode {
    Planned,
    /// `shutdown_source`: seconds to wait for the primary.
    Unplanned {
        shutdown_source: Option<u64>,
    },
    Test,
    CleanupTest,
    ChangePoint(String),
    Cancel,
}

fn print(reply: &Reply, json: bool) {
    if json {
        let doc = serde_json::json!({
            "ok": reply.ok,
            "job": reply.job,
            "lsn": reply.lsn,
            "detail": reply.detail,
        });
        println!("{doc}");
    } else {
        if let Some(d) = &reply.detail {
            println!("{d}");
        }
        if let Some(j) = &reply.job {
            println!("job {j}");
        }
    }
}

pub fn run(
    site: &Path,
    machine: &str,
    mode: Mode,
    at: Option<&str>,
    as_name: Option<&str>,
    note: Option<&str>,
    json: bool,
) -> Result<()> {
    replog::site::Site::read_config(site)?;
    let at = at.unwrap_or("latest").to_string();
    let req = match mode {
        Mode::Planned => Request::PlannedFailover {
            machine: machine.into(),
            job: Default::default(),
        },
        Mode::Unplanned { shutdown_source } => Request::Failover {
            machine: machine.into(),
            kind: FailoverKind::Unplanned,
            at,
            as_name: None,
            shutdown_source,
            job: Default::default(),
        },
        Mode::Test => Request::Failover {
            machine: machine.into(),
            kind: FailoverKind::Test,
            at,
            as_name: as_name.map(str::to_string),
            shutdown_source: None,
            job: Default::default(),
        },
        Mode::CleanupTest => Request::CleanupTest {
            machine: machine.into(),
            as_name: as_name.map(str::to_string),
            note: note.map(str::to_string),
        },
        Mode::ChangePoint(p) => Request::ChangePoint {
            machine: machine.into(),
            at: p,
        },
        Mode::Cancel => Request::CancelFailover {
            machine: machine.into(),
        },
    };
    let reply = with_progress(site, machine, json, || control::run(site, &req))?;
    print(&reply, json);
    Ok(())
}

pub fn commit(site: &Path, machine: &str, json: bool) -> Result<()> {
    replog::site::Site::read_config(site)?;
    let req = Request::Commit {
        machine: machine.into(),
    };
    let reply = with_progress(site, machine, json, || control::run(site, &req))?;
    print(&reply, json);
    Ok(())
}

/// Run `f` (a request that carries out jobs) with a spinner on a terminal showing the
/// newest step of the jobs it started for `machine` (a planned failover ships
/// everything first; a verification reads the point); nothing with --json or when
/// standard error is not a terminal.
fn with_progress<T>(site: &Path, machine: &str, json: bool, f: impl FnOnce() -> T) -> T {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return f();
    }
    let dir = site.join("jobs");
    let before: std::collections::HashSet<String> = replog::jobs::ids_in(&dir)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar.set_message(format!("{machine}: asking the site…"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let newest = replog::jobs::ids_in(&dir)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|id| !before.contains(id))
                    .filter_map(|id| replog::jobs::get(site, &id).ok())
                    .find(|j| j.machine.as_deref() == Some(machine));
                if let Some(step) = newest.as_ref().and_then(|j| j.steps.last()) {
                    bar.set_message(format!(
                        "{machine}: {}{}",
                        step.name,
                        step.detail
                            .as_deref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        let out = f();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        bar.finish_and_clear();
        out
    })
}
