//! `replog jobs SITE [JOB] [--json]`.

use replog::jobs::{self, Job};
use replog::{Result, Site};
use std::path::Path;

pub fn show(site: &Path, id: Option<&str>, json: bool) -> Result<()> {
    Site::read_config(site)?;
    let list: Vec<Job> = match id {
        Some(id) => vec![jobs::get(site, id)?],
        None => jobs::list(site)?,
    };
    if json {
        let docs: Vec<serde_json::Value> = list.iter().map(document).collect();
        println!("{}", serde_json::json!({ "jobs": docs }));
        return Ok(());
    }
    if list.is_empty() {
        println!("no jobs at {}", site.display());
        return Ok(());
    }
    for j in &list {
        let state = if j.state == jobs::JobState::InProgress && j.owner_gone() {
            format!(
                "in-progress (its process {} stopped{})",
                j.owner_pid,
                if j.kind == jobs::JobKind::Plan {
                    "; `replog plan resume` goes on"
                } else {
                    ""
                }
            )
        } else if j.repeats > 0 {
            format!(
                "{} (the same way {} time{} before, since {})",
                j.state.as_str(),
                j.repeats,
                if j.repeats == 1 { "" } else { "s" },
                j.first_started.as_deref().unwrap_or("?")
            )
        } else {
            j.state.as_str().to_string()
        };
        println!(
            "{}  {:<20} {:<16} {:<12} started {}{}{}",
            j.id,
            j.kind.as_str(),
            match (&j.machine, &j.plan) {
                (Some(m), _) => m.clone(),
                (None, Some(p)) => format!("plan {p}"),
                (None, None) => "-".into(),
            },
            state,
            j.started,
            j.ended
                .as_deref()
                .map(|e| format!(", ended {e}"))
                .unwrap_or_default(),
            j.error
                .as_deref()
                .map(|e| format!("\n    error: {e}"))
                .unwrap_or_default()
        );
        if id.is_some() {
            for s in &j.steps {
                println!(
                    "    - {:<11} {}{}",
                    s.state.as_str(),
                    s.name,
                    s.detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// A job as DESIGN.md's `replog jobs --json` documents it.
fn document(j: &Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id,
        "kind": j.kind,
        "machine": j.machine,
        "plan": j.plan,
        "state": j.state,
        "started": j.started,
        "ended": j.ended,
        "error": j.error,
        "steps": j.steps,
        "owner_pid": j.owner_pid,
        "owner_gone": j.state == jobs::JobState::InProgress && j.owner_gone(),
        "repeats": j.repeats,
        "first_started": j.first_started,
    })
}
