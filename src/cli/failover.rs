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
    let reply = control::run(site, &req)?;
    print(&reply, json);
    Ok(())
}

pub fn commit(site: &Path, machine: &str, json: bool) -> Result<()> {
    replog::site::Site::read_config(site)?;
    let reply = control::run(
        site,
        &Request::Commit {
            machine: machine.into(),
        },
    )?;
    print(&reply, json);
    Ok(())
}
