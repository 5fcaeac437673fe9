//! One `run` action of a recovery plan: a program started in a process group of its
//! own (so its timeout, or a crash of the runner followed by `plan resume`, can stop
//! it and everything it started), with the plan's environment, standard input from
//! /dev/null, standard output and error captured together (the last
//! [`OUTPUT_TAIL`] bytes kept for the job), killed when its timeout passes (SIGTERM,
//! then SIGKILL after [`KILL_GRACE`]).
//!
//! An action starts behind a gate: `/bin/sh` waits on a pipe (fd 3) in the new process
//! group and only then `exec`s the program, keeping its pid and start time. The runner
//! records the group (durably, in the run's state) before it opens the gate, so no
//! program runs that `plan abandon` or `plan resume` could not find after a crash of
//! the runner; a runner that dies before opening the gate closes the pipe with it,
//! and the gate exits without running anything. (`Command` cannot hold a child
//! between fork and exec itself: `spawn` returns only once the exec happened.)
//!
//! The program gets the runner's environment with the plan's variables, no more: the
//! gate unsets what a shell exports of its own ([`SHELL_ADDS`]: dash exports PWD,
//! bash PWD and SHLVL) where that environment does not have it. (Where /bin/sh is
//! bash, its `exec` exports SHLVL again, as 0: Debian's /bin/sh is dash.)

use crate::error::{Error, Result};
use std::ffi::OsString;
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

/// What the gate runs (into a variable of its own: not `_`, which the runner's
/// environment may hold): wait for a line on fd 3 (EOF: the runner died before it
/// recorded the group — exit without running the program), close fd 3 and become the
/// program (`$0`, arguments `$@`).
const GATE: &str = r#"read replog_gate <&3 || exit 125; exec "$0" "$@" 3<&-"#;

/// Variables a POSIX shell may export into what it runs without being asked to; the
/// gate unsets each one the action's environment does not have.
const SHELL_ADDS: [&str; 3] = ["PWD", "OLDPWD", "SHLVL"];

/// The gate's script for an action whose whole environment is `env`.
fn gate_script(env: &[(OsString, OsString)]) -> String {
    let added: Vec<&str> = SHELL_ADDS
        .into_iter()
        .filter(|name| !env.iter().any(|(k, _)| k == name))
        .collect();
    if added.is_empty() {
        GATE.to_string()
    } else {
        format!("unset {}; {GATE}", added.join(" "))
    }
}

/// An action's process group, its program not started yet: [`Gated::open`] lets it
/// run; dropped without being opened (an error, a panic), it kills and reaps the
/// gate.
struct Gated {
    /// None once the gate is opened (the child is the caller's then).
    child: Option<std::process::Child>,
    gate: std::io::PipeWriter,
    started: Started,
}

impl Drop for Gated {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of the process group we started, still our child (not
            // reaped: its pid is not reused before the wait below).
            unsafe { libc::kill(-(self.started.pid as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Gated {
    /// Start the gate of `argv` in a process group of its own, with exactly the
    /// environment `env`, its output into `output`.
    fn spawn(
        argv: &[String],
        env: &[(OsString, OsString)],
        output: std::io::PipeWriter,
    ) -> Result<Gated> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let program = argv
            .first()
            .ok_or_else(|| Error::InvalidInput("an action with no program".into()))?;
        check_program(program)?;
        let (gate_r, gate) = std::io::pipe().map_err(|e| Error::io("pipe for", program, e))?;
        let err_output = output
            .try_clone()
            .map_err(|e| Error::io("pipe for", program, e))?;
        let fd = gate_r.as_raw_fd();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(gate_script(env))
            .args(argv)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(err_output)
            .process_group(0);
        // SAFETY: between fork and exec only dup2(2) and fcntl(2), both
        // async-signal-safe; `fd` stays open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // The pipe is close-on-exec; dup2 gives fd 3 without the flag (and
                // when it already is fd 3, the flag is cleared by hand).
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd.spawn().map_err(|e| Error::io("start", program, e))?;
        drop(gate_r);
        let pid = child.id();
        let stat = crate::jobs::proc_stat(pid);
        Ok(Gated {
            child: Some(child),
            gate,
            started: Started {
                pid,
                start: stat.map_or(0, |p| p.start),
                session: stat.map_or(0, |p| p.session),
            },
        })
    }

    /// Let the program run. An error (the gate is gone: it can only have been
    /// killed) means nothing ran; the gate is reaped.
    fn open(mut self) -> std::io::Result<std::process::Child> {
        use std::io::Write;
        self.gate.write_all(b"go\n")?;
        self.child
            .take()
            .ok_or_else(|| std::io::Error::other("the gate was opened twice"))
    }
}

/// Kill what is left of the group of an action that runs (`child` its leader) and
/// reap the leader: for an error that ends the wait for it.
fn abandon(mut child: std::process::Child) {
    // SAFETY: kill(2) of the process group we started, its leader not reaped yet.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// Refuse a program that cannot be started, as starting it directly would have (the
/// gate would only exit with 127 or 126): one not named by an absolute path (a plan
/// names its programs so, `plan::file`; no search of PATH, and no name a shell's
/// `exec` could take for an option), not there, or not executable by this process —
/// the check a plan's dry run makes ([`super::file::executable`]).
fn check_program(program: &str) -> Result<()> {
    let p = std::path::Path::new(program);
    let refused = |why: String| {
        Error::io(
            "start",
            program,
            std::io::Error::new(std::io::ErrorKind::NotFound, why),
        )
    };
    if !p.is_absolute() {
        return Err(refused("not an absolute path".into()));
    }
    super::file::executable(p).map_err(refused)
}

/// Run `argv` with `env` added to this process's environment, at most `timeout`.
/// `started` learns the process group before the program runs and records it; the
/// program runs only if it returns Ok (its error is this function's otherwise).
pub fn run(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    started: impl FnOnce(Started) -> Result<()>,
) -> Result<Finished> {
    let mut whole: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !env.iter().any(|(name, _)| k == name.as_str()))
        .collect();
    whole.extend(env.iter().map(|(k, v)| (k.into(), v.into())));
    run_in(argv, &whole, timeout, started)
}

/// [`run`] with exactly the environment `env`.
fn run_in(
    argv: &[String],
    env: &[(OsString, OsString)],
    timeout: Duration,
    started: impl FnOnce(Started) -> Result<()>,
) -> Result<Finished> {
    use std::os::unix::process::ExitStatusExt;
    let program = argv
        .first()
        .ok_or_else(|| Error::InvalidInput("an action with no program".into()))?;
    let (mut reader, writer) = std::io::pipe().map_err(|e| Error::io("pipe for", program, e))?;
    let t0 = Instant::now();
    let gated = Gated::spawn(argv, env, writer)?;
    // The output is read as it comes (a full pipe would stop the action), keeping
    // its end. Started before the gate opens: once the program runs, nothing may
    // fail before the wait for it (an error would leave it running, unwaited).
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
    let pid = gated.started.pid;
    // The gate is killed and reaped if this fails (`Gated`'s drop).
    started(gated.started)?;
    let mut child = gated.open().map_err(|e| Error::io("start", program, e))?;
    let deadline = t0 + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                abandon(child);
                return Err(Error::io("wait for", program, e));
            }
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
        run(&argv, &env, timeout, |_| Ok(())).unwrap()
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
    fn the_program_gets_the_environment_it_is_given_and_no_more() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
            pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
        };
        // bash as /bin/sh exports SHLVL=0 from its `exec` whatever the gate unset.
        let bash = std::fs::canonicalize("/bin/sh").is_ok_and(|p| p.ends_with("bash"));
        let printed = |f: Finished| {
            assert!(f.succeeded(), "{}", f.describe());
            let mut lines: Vec<String> = f
                .output
                .lines()
                .filter(|l| !(bash && *l == "SHLVL=0"))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        let argv = vec!["/usr/bin/env".to_string()];
        let timeout = Duration::from_secs(10);
        // No PWD given: the gate's shell exports none (dash would).
        let f = run_in(
            &argv,
            &env(&[("REPLOG_PLAN", "erp"), ("A", "1")]),
            timeout,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(printed(f), ["A=1", "REPLOG_PLAN=erp"]);
        // Given, it is kept.
        let dir = std::env::current_dir().unwrap();
        let pwd = dir.to_str().unwrap();
        let f = run_in(
            &argv,
            &env(&[("PWD", pwd), ("SHLVL", "7")]),
            timeout,
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(printed(f), [format!("PWD={pwd}"), "SHLVL=7".to_string()]);
        // The gate's own read does not touch `_` (dash keeps it as given).
        if !bash {
            let f = run_in(&argv, &env(&[("_", "x")]), timeout, |_| Ok(())).unwrap();
            assert_eq!(printed(f), ["_=x"]);
        }
        // `run` adds the plan's variables to this process's own.
        let f = sh("echo \"$REPLOG_PLAN|$PATH\"", timeout);
        assert!(f.succeeded(), "{}", f.describe());
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(f.output.trim_end(), format!("erp|{path}"));
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
        let f = run(&argv, &[], Duration::from_millis(300), |s| {
            group = Some(s);
            Ok(())
        })
        .unwrap();
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
    }

    /// A script that writes its pid to `marker` (`$$` of a `sh -c` is its own pid).
    fn marking(marker: &std::path::Path) -> Vec<String> {
        vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!("echo $$ > {}", marker.display()),
        ]
    }

    #[test]
    fn the_program_runs_only_once_its_group_is_recorded_and_keeps_the_gates_pid() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut group = None;
        let f = run(&marking(&marker), &[], Duration::from_secs(30), |s| {
            // The group exists and waits: the program has not run.
            std::thread::sleep(Duration::from_millis(300));
            assert!(!marker.exists(), "the program ran before it was recorded");
            assert!(crate::jobs::proc_stat(s.pid).is_some(), "no gate");
            group = Some(s);
            Ok(())
        })
        .unwrap();
        assert!(f.succeeded(), "{}", f.describe());
        let pid: u32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            Some(pid),
            group.map(|g| g.pid),
            "the recorded pid is not the program's"
        );
    }

    #[test]
    fn nothing_runs_when_the_group_cannot_be_recorded_or_the_runner_dies_first() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut gate = None;
        let e = run(&marking(&marker), &[], Duration::from_secs(30), |s| {
            gate = Some(s.pid);
            Err(Error::InvalidInput("no room to record it".into()))
        })
        .expect_err("ran without a record");
        assert!(e.to_string().contains("no room"), "{e}");
        // The gate was killed and reaped before the error came back: nothing can
        // still run it.
        assert!(!marker.exists(), "the program ran");
        assert!(crate::jobs::proc_stat(gate.unwrap()).is_none());
        // A runner that dies holding the gate closed: its end of the pipe closes
        // with it, and the gate exits without running the program.
        let (_reader, writer) = std::io::pipe().unwrap();
        let mut gated = Gated::spawn(&marking(&marker), &[], writer).unwrap();
        let mut child = gated.child.take().unwrap();
        drop(gated);
        let st = child.wait().unwrap();
        assert_eq!(st.code(), Some(125));
        assert!(!marker.exists(), "the program ran behind a closed gate");
    }

    #[test]
    fn a_program_that_cannot_start_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "#!/bin/sh\ntrue\n").unwrap();
        for program in [
            plain.display().to_string(),
            "/no/such/program".to_string(),
            // Not absolute: never searched for in PATH, and never taken by a shell's
            // exec for an option.
            "true".to_string(),
            "-rf".to_string(),
        ] {
            let mut asked = false;
            let e = run(
                std::slice::from_ref(&program),
                &[],
                Duration::from_secs(1),
                |_| {
                    asked = true;
                    Ok(())
                },
            )
            .expect_err(&program);
            assert!(!asked, "{program}: a group was started");
            assert!(e.to_string().contains(&program), "{e}");
        }
        assert!(run(
            &["/bin/true".to_string()],
            &[],
            Duration::from_secs(10),
            |_| { Ok(()) }
        )
        .unwrap()
        .succeeded());
    }
}
