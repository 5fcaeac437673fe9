//! The control socket: how commands reach a running `serve`, which holds the site's
//! lock and its machines open.
//!
//! `SITE/control.sock` is a Unix stream socket (mode 0600: the site's owner only).
//! A client sends one JSON line and reads one JSON line back:
//!
//! ```text
//! → {"op": "checkpoint", "machine": "vm1", "app_consistent": true}
//! ← {"ok": true, "lsn": 1234, "time_ns": 1700000000000000000}
//! ← {"ok": false, "error": "site has no machine vm9"}
//! ```
//!
//! A socket file left by a serve that died is replaced by the next serve (which holds
//! the site lock, so no other serve can be using it).

use crate::error::{Error, Result};
use crate::volume::Machine;
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
}

impl Reply {
    fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            lsn: None,
            time_ns: None,
        }
    }
}

/// Carry out `req` on `machines`.
pub fn handle(machines: &[Arc<Machine>], req: &Request) -> Reply {
    match req {
        Request::Checkpoint {
            machine,
            app_consistent,
        } => {
            let Some(m) = machines.iter().find(|m| m.name() == machine) else {
                return Reply::err(format!("this site has no machine {machine}"));
            };
            let done = m.point(*app_consistent).map(|p| (p.lsn, p.time_ns));
            match done {
                Ok((lsn, time_ns)) => Reply {
                    ok: true,
                    error: None,
                    lsn: Some(lsn),
                    time_ns: Some(time_ns),
                },
                Err(e) => Reply::err(e),
            }
        }
    }
}

/// The listening side, run by `serve`; stops (and removes the socket) when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(site: &Path, machines: Vec<Arc<Machine>>) -> Result<ControlServer> {
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
                        let machines = machines.clone();
                        // One thread per client: a checkpoint waits for an fsync.
                        let _ = std::thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve_client(conn, &machines));
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

fn serve_client(conn: UnixStream, machines: &[Arc<Machine>]) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    let mut r = BufReader::new(&conn);
    // One request of at most 64 KiB.
    if r.by_ref().take(64 << 10).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(machines, &req),
        Err(e) => Reply::err(format!("bad request: {e}")),
    };
    let mut w = &conn;
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = w.write_all(text.as_bytes());
    }
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
    // A checkpoint is one fsync; a serve that does not answer in a minute is stuck.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
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
