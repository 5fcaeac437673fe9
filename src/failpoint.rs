//! Crash points, for the kill -9 tests of multi-step operations.
//!
//! `REPLOG_FAILPOINT=NAME` makes this process kill itself with SIGKILL — what
//! `kill -9` does: no destructor runs, nothing is flushed — when it reaches the point
//! called NAME. Unset (always, outside tests), [`hit`] costs one environment lookup
//! and the operations it sits in are rare (failover steps, a shipping pass's
//! handshake), never the write or read path.
//!
//! The points of a planned failover, in the order they are reached:
//!
//! | point | side | reached when |
//! |---|---|---|
//! | `planned:after-intent` | primary | the intent is persisted and writes refused |
//! | `planned:after-ship` | primary | the target acknowledged the last LSN |
//! | `planned:after-promote-sent` | primary | `Promote` was sent, no answer read |
//! | `promote:after-verify` | target | the point's digests matched; nothing recorded |
//! | `promote:after-record` | target | the promotion record is written, no manifest |
//! | `promote:after-manifest` | target | the promoted machine's manifest is written |
//! | `promote:before-reply` | target | the machine is open; `Promoted` not sent |
//! | `planned:after-promoted` | primary | `Promoted` read; the fence not persisted |
//!
//! The points of a reprotect:
//!
//! | point | side | reached when |
//! |---|---|---|
//! | `reprotect:seeded` | old primary | its disks are copied into the replica; the tail not kept yet |
//! | `reprotect:delta-sent` | new primary | at least 1 MiB of the blocks that differ sent |
//!
//! `failover:before-verify`: an unplanned or test failover at the target has
//! promoted and opened the machine; its digest check has not run.
//!
//! The points of a recovery plan's run (in the process of `replog plan failover`):
//!
//! | point | reached when |
//! |---|---|
//! | `plan:after-request` | serve answered a machine's failover request; the run has not recorded the outcome |
//! | `plan:action-started` | a `run` action's process group was recorded; its program waits behind the gate (a crash here: it never runs) |
//! | `plan:after-step` | a step's outcome was recorded |
//!
//! `serve:pause-found`: serve found the shipping loop a pause is for (holding the
//! machine's `changing` lock) and has not told it yet.
//!
//! `ship:protected`: a shipper read the target's answer to `Protect` (once a pass).
//!
//! `REPLOG_FAILPOINT=NAME:stall` stops the thread that reaches NAME for good instead
//! (the test looks at the process meanwhile — its status — and kills it itself);
//! `NAME:delay` makes it wait a second each time it reaches NAME (what other threads
//! do meanwhile — a merge — is then sure to happen there).

/// Kill this process (SIGKILL) if `REPLOG_FAILPOINT` names `point`; stall the
/// calling thread for good if it names `point:stall`, for a second if `point:delay`.
pub fn hit(point: &str) {
    let Some(v) = std::env::var_os("REPLOG_FAILPOINT") else {
        return;
    };
    if v == point {
        tracing::error!("failpoint {point}: killing this process");
        // SAFETY: kill(2) on our own pid with a valid signal number.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    if v.to_str().and_then(|v| v.strip_suffix(":delay")) == Some(point) {
        tracing::warn!("failpoint {point}: waiting a second");
        std::thread::sleep(std::time::Duration::from_secs(1));
        return;
    }
    if v.to_str().and_then(|v| v.strip_suffix(":stall")) == Some(point) {
        tracing::error!("failpoint {point}: this thread stalls until the process is killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
