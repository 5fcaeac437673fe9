//! The control channel: how commands that change a site reach it. With a `serve`
//! running (which holds the site's lock and its machines open) they go through its
//! control socket; with none, the command takes the site lock itself and does the
//! same work offline ([`offline`]), through the same functions (`crate::ops`).
//!
//! `SITE/control.sock` is a Unix stream socket (mode 0600: the site's owner only).
//! A client sends one JSON line and reads one JSON line back:
//!
//! ```text
//! → {"op": "checkpoint", "machine": "vm1", "app_consistent": true}
//! ← {"ok": true, "lsn": 1234, "time_ns": 1700000000000000000}
//! ← {"ok": false, "error": "this site has no machine vm9"}
//! ```
//!
//! A socket file left by a serve that died is replaced by the next serve (which holds
//! the site lock, so no other serve can be using it).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const SOCKET: &str = "control.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Record a recovery point of `machine` now: crash-consistent or app-consistent.
    Checkpoint {
        machine: String,
        app_consistent: bool,
    },
    /// Create disk `machine/disk` (and the machine, if new), optionally importing a
    /// raw image; a running serve shows it under its mount at once.
    CreateDisk {
        machine: String,
        disk: String,
        size: u64,
        import: Option<PathBuf>,
    },
    /// Close machine `machine` and remove it from the site (refused for a protected
    /// machine).
    RemoveMachine {
        machine: String,
    },
    /// Record `machine`'s relationship; a running serve starts shipping at once.
    Protect {
        machine: String,
        relationship: crate::replication::relationship::Relationship,
    },
    /// A resync of `machine` is required (`now`: start it at once, window or not; a
    /// running serve also starts again a shipping loop a Critical error stopped).
    Resync {
        machine: String,
        now: bool,
    },
    /// Seal, and merge what may be merged (protected machines: what the target has
    /// acknowledged).
    Compact {
        machine: Option<String>,
    },
    /// Seal and ship everything written to `machine` so far; answer once the target
    /// acknowledged it (`lsn`), or after `timeout_ms`.
    Ship {
        machine: String,
        timeout_ms: u64,
    },
    /// Stop shipping `machine` (its journal is kept) until `resume-shipping`;
    /// recorded in its relationship, so a serve started later keeps it paused.
    PauseShipping {
        machine: String,
    },
    ResumeShipping {
        machine: String,
    },
    /// Refuse writes to `machine` (EROFS) from now on; answers the last LSN written.
    Fence {
        machine: String,
        reason: String,
    },
    Unfence {
        machine: String,
    },
    /// Fail replica `machine` over at POINT `at`: unplanned (promoted, commit
    /// pending) or test (an isolated copy named `as_name`).
    Failover {
        machine: String,
        kind: crate::protection::FailoverKind,
        at: String,
        as_name: Option<String>,
        /// Unplanned: first wait this many seconds for the primary to contact this
        /// site, fence it and take what it still ships.
        #[serde(default)]
        shutdown_source: Option<u64>,
        /// The job's ID (chosen by the caller) and the plan it runs for.
        #[serde(default)]
        job: crate::jobs::JobSpec,
    },
    /// At the primary: a planned failover of `machine` to its target.
    PlannedFailover {
        machine: String,
        #[serde(default)]
        job: crate::jobs::JobSpec,
    },
    /// Record one point in each of `machines` at one barrier (a plan point): writes
    /// to all of them are held at once, at most `max_pause_ms` to take the holds.
    PlanCheckpoint {
        machines: Vec<String>,
        app_consistent: bool,
        max_pause_ms: u64,
    },
    /// What this serve runs with (its mount directory).
    ServeInfo,
    /// A failover of `machine` as `name` whose job did not end well although its
    /// promotion was made: check it now (a plan's resume, instead of failing over
    /// twice).
    VerifyFailover {
        machine: String,
        kind: crate::protection::FailoverKind,
        name: String,
        #[serde(default)]
        job: crate::jobs::JobSpec,
    },
    /// Remove a test copy of `machine` (`as_name`, default `MACHINE-test`).
    CleanupTest {
        machine: String,
        as_name: Option<String>,
        note: Option<String>,
    },
    /// Move `machine`'s pending failover to POINT `at`.
    ChangePoint {
        machine: String,
        at: String,
    },
    /// Cancel `machine`'s pending unplanned failover.
    CancelFailover {
        machine: String,
    },
    /// At a target: give up the ranges `machine`'s replica lists as lost
    /// (`replog accept-loss`), under the receiver's lock on the replica.
    AcceptLoss {
        machine: String,
    },
    /// Make `machine`'s failover final.
    Commit {
        machine: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The job that recorded the operation (`replog jobs SITE JOB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The error's class and refusal code, so the client decides as serve would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::error::Failure>,
    /// `serve-info`: the directory serve mounts the disks under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
    /// `plan-checkpoint`: what the barrier recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_point: Option<PlanPointReply>,
    /// `accept-loss`: the ranges given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_up: Option<Vec<crate::replica::resync_apply::GivenUp>>,
}

/// A plan point as recorded: its ID, each machine's point, how long writes waited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPointReply {
    pub id: u64,
    /// (machine, LSN, time in ns) in name order.
    pub points: Vec<(String, u64, u64)>,
    /// How long writes to the first machine held were held, in µs.
    pub held_us: u64,
    /// How long taking the holds took (writes in flight finishing), in µs.
    pub waited_us: u64,
}

impl PlanPointReply {
    /// `PlanCheckpoint` over `machines`, open here: the barrier, and the reply.
    pub fn record(
        machines: &[&crate::volume::Machine],
        app_consistent: bool,
        max_pause_ms: u64,
    ) -> Result<Reply> {
        let p = crate::volume::plan_point(
            machines,
            app_consistent,
            Duration::from_millis(max_pause_ms),
        )?;
        Ok(Reply {
            ok: true,
            plan_point: Some(PlanPointReply {
                id: p.id,
                points: p
                    .points
                    .iter()
                    .map(|(m, pt)| (m.clone(), pt.lsn, pt.time_ns))
                    .collect(),
                held_us: p.held.as_micros() as u64,
                waited_us: p.waited.as_micros() as u64,
            }),
            ..Default::default()
        })
    }
}

impl Reply {
    pub fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }

    /// `e`, with its class and code.
    pub fn failed(e: &Error) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            failure: Some(crate::error::Failure::of(e)),
            ..Default::default()
        }
    }

    pub fn done(detail: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            detail: Some(detail.into()),
            ..Default::default()
        }
    }

    /// What `accept-loss` did: its job and the ranges given up.
    pub fn accepted(done: crate::replica::resync_apply::AcceptedLoss) -> Reply {
        let bytes = crate::replica::resync_apply::bytes_of(&done.ranges);
        Reply {
            ok: true,
            detail: Some(format!(
                "gave up {bytes} bytes in {} range(s) no copy of which was left",
                done.ranges.len()
            )),
            job: Some(done.job.id),
            given_up: Some(done.ranges),
            ..Default::default()
        }
    }

    pub fn at(lsn: u64) -> Reply {
        Reply {
            ok: true,
            lsn: Some(lsn),
            ..Default::default()
        }
    }

    /// The reply as a result: its error comes back with the class (and refusal code)
    /// it had in serve; one without them becomes `Error::InvalidInput`.
    pub fn into_result(self) -> Result<Reply> {
        if self.ok {
            return Ok(self);
        }
        match self.failure {
            Some(f) => Err(f.into_error("serve")),
            None => Err(Error::InvalidInput(
                self.error.unwrap_or_else(|| "refused".into()),
            )),
        }
    }
}

/// Who carries out requests: a running serve's registry.
pub trait Handler: Send + Sync {
    fn handle(&self, req: &Request) -> Reply;
}

/// The listening side, run by `serve`; stops (and removes the socket) when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(site: &Path, handler: Arc<dyn Handler>) -> Result<ControlServer> {
        let path = site.join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
        let listener = UnixListener::bind(&path).map_err(|e| Error::io("bind", &path, e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("chmod", &path, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let handler = handler.clone();
                        // One thread per client: a checkpoint waits for an fsync, a ship
                        // for the target.
                        let _ = std::thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(conn, handler.as_ref()));
                    }
                })
                .map_err(|e| Error::io("spawn", &path, e))?
        };
        Ok(ControlServer {
            path,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(conn: UnixStream, handler: &dyn Handler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    let mut r = BufReader::new(&conn);
    // One request of at most 64 KiB.
    if r.by_ref().take(64 << 10).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler.handle(&req),
        Err(e) => Reply::err(format!("bad request: {e}")),
    };
    let mut w = &conn;
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = w.write_all(text.as_bytes());
    }
}

/// How long a client waits for serve's answer: a ship waits for the target, the rest
/// for an fsync; failovers, and an accept-loss waiting for the target compactor's
/// merge lock, as long as they take.
fn reply_timeout(req: &Request) -> Duration {
    match req {
        Request::Ship { timeout_ms, .. } => Duration::from_millis(*timeout_ms + 10_000),
        Request::AcceptLoss { .. }
        | Request::CreateDisk { .. }
        | Request::RemoveMachine { .. }
        | Request::Failover { .. }
        | Request::PlannedFailover { .. }
        | Request::PlanCheckpoint { .. }
        | Request::VerifyFailover { .. }
        | Request::CleanupTest { .. }
        | Request::ChangePoint { .. }
        | Request::CancelFailover { .. }
        | Request::Commit { .. } => Duration::from_secs(7200),
        _ => Duration::from_secs(60),
    }
}

/// Whether a serve is listening on `site`'s control socket.
pub fn serve_running(site: &Path) -> bool {
    UnixStream::connect(site.join(SOCKET)).is_ok()
}

/// Send `req` to the serve running on `site`; Ok(None) when none is listening.
pub fn request(site: &Path, req: &Request) -> Result<Option<Reply>> {
    let path = site.join(SOCKET);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io("connect to", &path, e)),
    };
    let _ = conn.set_read_timeout(Some(reply_timeout(req)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let mut text = serde_json::to_string(req).map_err(|e| Error::InvalidInput(e.to_string()))?;
    text.push('\n');
    (&conn)
        .write_all(text.as_bytes())
        .map_err(|e| Error::io("send to", &path, e))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| Error::io("read from", &path, e))?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| Error::InvalidInput(format!("{}: bad reply {line:?}: {e}", path.display())))
}

/// Carry out `req` at `site`: through its running serve, or offline with the site's
/// lock when none runs.
pub fn run(site: &Path, req: &Request) -> Result<Reply> {
    match request(site, req)? {
        Some(reply) => reply.into_result(),
        None => offline(site, req),
    }
}

/// Carry out `req` with no serve running: take the site's lock and do it.
pub fn offline(site: &Path, req: &Request) -> Result<Reply> {
    use crate::ops;
    let s = crate::site::Site::open(site)?;
    match req {
        Request::Checkpoint {
            machine,
            app_consistent,
        } => {
            let m = s.open_machine(machine)?;
            let p = m.point(*app_consistent)?;
            m.close()?;
            Ok(Reply {
                ok: true,
                lsn: Some(p.lsn),
                time_ns: Some(p.time_ns),
                ..Default::default()
            })
        }
        Request::CreateDisk {
            machine,
            disk,
            size,
            import,
        } => {
            ops::create_disk(&s, machine, disk, *size, import.as_deref())?;
            Ok(Reply::done(format!(
                "created disk {machine}/{disk} ({size} bytes)"
            )))
        }
        Request::RemoveMachine { machine } => {
            ops::remove_machine_files(&s, machine)?;
            Ok(Reply::done(format!("removed machine {machine}")))
        }
        Request::Protect {
            machine,
            relationship,
        } => {
            ops::record_protection(&s, machine, relationship)?;
            Ok(Reply::done(format!(
                "{machine} is protected toward {}; a running `replog serve` starts initial \
                 replication",
                relationship.target
            )))
        }
        Request::Resync { machine, now } => {
            Ok(Reply::done(ops::require_resync(&s, machine, *now)?))
        }
        Request::Compact { machine } => {
            let mut lines = Vec::new();
            for name in ops::machines_of(&s, machine.as_deref())? {
                let m = s.open_machine(&name)?;
                lines.push(ops::compact(site, &m)?);
                m.close()?;
            }
            Ok(Reply::done(lines.join("\n")))
        }
        Request::Failover { .. }
        | Request::VerifyFailover { .. }
        | Request::CleanupTest { .. }
        | Request::ChangePoint { .. }
        | Request::CancelFailover { .. }
        | Request::Commit { .. } => {
            let host = crate::failover::Offline::new(s)?;
            crate::failover::run::handle(&host, req)
        }
        Request::PlanCheckpoint {
            machines,
            app_consistent,
            max_pause_ms,
        } => {
            let mut open = Vec::new();
            for name in machines {
                open.push(s.open_machine(name)?);
            }
            let refs: Vec<&crate::volume::Machine> = open.iter().collect();
            let reply = PlanPointReply::record(&refs, *app_consistent, *max_pause_ms);
            for m in open {
                m.close()?;
            }
            reply
        }
        Request::AcceptLoss { machine } => {
            // The site's lock is held (`s`): no serve, so no receiver writes the replica.
            let store = crate::replica::store::Replicas::local(site)?.open_readonly(machine)?;
            Ok(Reply::accepted(crate::replica::resync_apply::accept_loss(
                site, &store,
            )?))
        }
        Request::ServeInfo => Err(Error::InvalidInput(format!(
            "no `replog serve {}` runs",
            site.display()
        ))),
        Request::PlannedFailover { machine, job } => {
            let rel = crate::replication::relationship::Relationship::load(site, machine)?
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{machine} is not protected: there is no target to fail over to"
                    ))
                })?;
            let host = crate::failover::Offline::new(s)?;
            let ship = crate::failover::planned::OfflineShipping::new(site, &rel.target);
            crate::failover::planned::run_as(&host, &ship, machine, None, job)
        }
        Request::PauseShipping { machine } | Request::ResumeShipping { machine } => {
            let pause = matches!(req, Request::PauseShipping { .. });
            ops::set_shipping_paused(&s, machine, pause)?;
            Ok(Reply::done(if pause {
                format!(
                    "shipping of {machine} paused: no serve runs; one started later ships \
                     nothing of it until `replog resume`"
                )
            } else {
                format!("shipping of {machine} resumed: a serve started later ships it")
            }))
        }
        Request::Ship { .. } | Request::Fence { .. } | Request::Unfence { .. } => {
            Err(Error::InvalidInput(format!(
                "{req:?} needs a running `replog serve {}`",
                site.display()
            )))
        }
    }
}
