//! One `run` action of a recovery plan: a program started in a process group of its
//! own (so its timeout, or a crash of the runner followed by `plan resume`, can stop
//! it and everything it started), with the plan's environment, standard input from
//! /dev/null, standard output and error captured together (the last
//! [`OUTPUT_TAIL`] bytes kept for the job), killed when its timeout passes (SIGTERM,
//! then SIGKILL after [`KILL_GRACE`]).

use crate::error::{Error, Result};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The bytes of output an action keeps (its end).
pub const OUTPUT_TAIL: usize = 4096;
/// How long a timed-out action has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How an action ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit code (None: killed by a signal).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub timeout: Duration,
    pub elapsed: Duration,
    /// The end of what it printed (stdout and stderr as they came).
    pub output: String,
    /// How much it printed in all.
    pub output_bytes: u64,
}

impl Finished {
    pub fn succeeded(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// What happened, for the job and the operator.
    pub fn describe(&self) -> String {
        let how = if self.timed_out {
            format!(
                "killed at its timeout of {}",
                humantime::format_duration(self.timeout)
            )
        } else {
            match (self.code, self.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                (None, None) => "ended".into(),
            }
        };
        let out = self.output.trim_end();
        let shown = if out.is_empty() {
            "no output".to_string()
        } else if self.output_bytes as usize > self.output.len() {
            format!(
                "output (the last {} of {} bytes):\n{out}",
                self.output.len(),
                self.output_bytes
            )
        } else {
            format!("output:\n{out}")
        };
        format!("{how} after {:.1} s; {shown}", self.elapsed.as_secs_f64())
    }
}

/// The process group an action runs in: its leader's pid and start time (so a reused
/// pid is not taken for it) and the session it runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Started {
    pub pid: u32,
    pub start: u64,
    #[serde(default)]
    pub session: u32,
}

impl Started {
    /// Kill what is left of the action's process group (after a crash of the runner
    /// that started it): its leader if it still runs, and every live process of the
    /// group in the same session — the leader may have exited while what it started
    /// goes on. Returns whether anything was killed.
    pub fn kill_if_running(&self) -> bool {
        use crate::jobs::proc_stat;
        if crate::jobs::process_start(self.pid) == Some(self.start) {
            // SAFETY: kill(2) of the process group we started (its leader checked by
            // its start time): every member goes with it.
            unsafe { libc::kill(-(self.pid as i32), libc::SIGKILL) };
            return true;
        }
        if self.session == 0 {
            // Started by a build that did not record the session: nothing to tell
            // the group's members from another group of the same number.
            return false;
        }
        let members: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| {
                proc_stat(pid).is_some_and(|p| {
                    p.pgrp == self.pid && p.session == self.session && p.state != 'Z'
                })
            })
            .collect();
        for pid in &members {
            // SAFETY: kill(2) of a process of the group we started, in its session.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        !members.is_empty()
    }
}

/// Run `argv` with `env` (added to this process's environment), at most `timeout`;
/// `started` learns the process group before the wait begins.
pub fn run(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    started: impl FnOnce(Started),
) -> Result<Finished> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let program = argv
        .first()
        .ok_or_else(|| Error::InvalidInput("an action with no program".into()))?;
    let (mut reader, writer) = std::io::pipe().map_err(|e| Error::io("pipe for", program, e))?;
    let err_writer = writer
        .try_clone()
        .map_err(|e| Error::io("pipe for", program, e))?;
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(argv.get(1..).unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(err_writer)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("start", program, e))?;
    let pid = child.id();
    let stat = crate::jobs::proc_stat(pid);
    started(Started {
        pid,
        start: stat.map_or(0, |p| p.start),
        session: stat.map_or(0, |p| p.session),
    });
    // The output is read as it comes (a full pipe would stop the action), keeping
    // its end.
    let (tx, rx) = crossbeam::channel::bounded(1);
    std::thread::Builder::new()
        .name("plan-action-output".into())
        .spawn(move || {
            let mut tail: Vec<u8> = Vec::new();
            let mut total = 0u64;
            let mut buf = [0u8; 8192];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n as u64;
                        tail.extend_from_slice(buf.get(..n).unwrap_or_default());
                        if tail.len() > 2 * OUTPUT_TAIL {
                            tail.drain(..tail.len() - OUTPUT_TAIL);
                        }
                    }
                }
            }
            let _ = tx.send((tail, total));
        })
        .map_err(|e| Error::io("spawn a reader for", program, e))?;
    let deadline = t0 + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(|e| Error::io("wait for", program, e))?
        {
            break st;
        }
        let now = Instant::now();
        if now >= deadline && !timed_out {
            timed_out = true;
            // SAFETY: signals to the process group we started.
            unsafe { libc::kill(-(pid as i32), libc::SIGTERM) };
        }
        if timed_out && now >= deadline + KILL_GRACE {
            // SAFETY: as above.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t0.elapsed();
    if timed_out {
        // Whatever it left behind goes too.
        // SAFETY: as above.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    // Something the action started in the background may hold the pipe open: what
    // came within a moment is what is kept.
    let (tail, total) = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    let start = tail.len().saturating_sub(OUTPUT_TAIL);
    // Kept for people to read in `replog jobs`: no terminal control sequences.
    let mut output: String = String::from_utf8_lossy(tail.get(start..).unwrap_or_default())
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect();
    if total == 0 {
        output.clear();
    }
    Ok(Finished {
        code: status.code(),
        signal: status.signal(),
        timed_out,
        timeout,
        elapsed,
        output,
        output_bytes: total,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Finished {
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let env = vec![("REPLOG_PLAN".to_string(), "erp".to_string())];
        run(&argv, &env, timeout, |_| {}).unwrap()
    }

    #[test]
    fn output_exit_code_and_environment_are_kept() {
        let f = sh(
            "echo out $REPLOG_PLAN; echo err >&2; exit 3",
            Duration::from_secs(10),
        );
        assert_eq!(f.code, Some(3));
        assert!(!f.succeeded());
        assert!(
            f.output.contains("out erp") && f.output.contains("err"),
            "{f:?}"
        );
        assert!(f.describe().contains("exit code 3"), "{}", f.describe());
        assert!(sh("true", Duration::from_secs(10)).succeeded());
    }

    #[test]
    fn the_end_of_a_long_output_is_kept() {
        let f = sh(
            "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done",
            Duration::from_secs(30),
        );
        assert!(f.succeeded());
        assert!(f.output.len() <= OUTPUT_TAIL);
        assert!(f.output.contains("line-1999"));
        assert!(!f.output.contains("line-0\n"));
        assert!(f.output_bytes > OUTPUT_TAIL as u64);
    }

    #[test]
    fn a_timed_out_action_and_its_children_are_killed() {
        let argv = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            "sleep 30 & sleep 30".to_string(),
        ];
        let mut group = None;
        let f = run(&argv, &[], Duration::from_millis(300), |s| group = Some(s)).unwrap();
        assert!(f.timed_out && !f.succeeded());
        assert!(f.describe().contains("timeout"), "{}", f.describe());
        // Nothing of its process group is left (the background sleep went too).
        let pgid = group.unwrap().pid;
        // Live members of the group (zombies are dead, whoever reaps them).
        let live = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(crate::jobs::proc_stat)
                .filter(|p| p.pgrp == pgid && p.state != 'Z')
                .count()
        };
        let mut left = live();
        for _ in 0..100 {
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            left = live();
        }
        assert_eq!(left, 0, "the action's process group outlived its timeout");
        // A program that is not there fails to start.
        assert!(run(
            &["/no/such/program".to_string()],
            &[],
            Duration::from_secs(1),
            |_| {}
        )
        .is_err());
    }
}
