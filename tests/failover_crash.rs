//! kill -9 at every step of a planned failover, of the primary and of the target
//! (real serves, TLS on 127.0.0.1, FUSE mounts at both sites): after the killed
//! side restarts, there is exactly one writable primary — never two, never none —
//! and, when the target ended up promoted, its disk equals the source's last state
//! byte for byte (zero loss); when it did not, replication resumes.
//!
//! Each step's outcome is fixed: before the target has a verified promotion
//! manifest, the primary takes writes again; from then on the target runs it (a
//! `Promote` in flight when the primary dies is either).
//!
//! A failpoint (`REPLOG_FAILPOINT`, see `replog::failpoint`) makes the serve kill
//! itself with SIGKILL at the step.

mod common;

use common::serve::*;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Where the writability probes write (back what is there).
const PROBE: u64 = 15 * MIB;

/// Whether `img` takes a write now: the 4 KiB at PROBE written back and fsynced.
/// EROFS (fenced) and a missing file are "no"; anything else fails the test.
fn writable(img: &Path) -> bool {
    let f = match std::fs::OpenOptions::new().read(true).write(true).open(img) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => return false,
        // A dead mount (its serve was killed and not restarted yet).
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return false,
        Err(e) => panic!("open {}: {e}", img.display()),
    };
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, PROBE).expect("probe read");
    match f.write_all_at(&buf, PROBE).and_then(|()| f.sync_all()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => false,
        Err(e) => panic!("probe write {}: {e}", img.display()),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Primary,
    Target,
}

/// Kill `side` at `point`; `expect`: whether the target must end up promoted (None:
/// either, by a race the step leaves open).
fn crash_at(point: &str, side: Side, expect: Option<bool>) {
    if !fuse_available(point) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let _sweep = MountSweep(tmp.path().to_path_buf());
    let (src, dst, addr) = two_sites(tmp.path(), "16M");
    let (src_mnt, dst_mnt) = (tmp.path().join("src-mnt"), tmp.path().join("dst-mnt"));
    let env = [("REPLOG_FAILPOINT", point)];
    let env_of = |s: Side| if s == side { &env[..] } else { &[][..] };
    let dst_args = ["--listen", addr.as_str()];
    let dst_serve = Served::start_with_env(&dst, &dst_mnt, &dst_args, env_of(Side::Target));
    let src_serve = Served::start_with_env(&src, &src_mnt, &[], env_of(Side::Primary));
    protect_when_listening(&src, &addr);
    wait_shipped(&src);
    let src_img = src_serve.disk("os");
    for i in 0..4u64 {
        write_at(
            &src_img,
            i * 3 * MIB,
            &common::pattern(70 + i, MIB as usize),
        );
    }
    let final_src = read_all(&src_img);

    let mut cli = replog()
        .arg("failover")
        .arg(&src)
        .arg("vm1")
        .arg("--planned")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failover");
    // The side with the failpoint kills itself at the step; it restarts as an
    // operator (or systemd) would restart it.
    let (mut src_serve, mut dst_serve) = (Some(src_serve), Some(dst_serve));
    let (victim, site, mnt, args): (_, &PathBuf, &PathBuf, &[&str]) = match side {
        Side::Primary => (src_serve.take(), &src, &src_mnt, &[]),
        Side::Target => (dst_serve.take(), &dst, &dst_mnt, &dst_args),
    };
    let victim = victim.expect("victim");
    let log = victim.log.clone();
    let st = victim.wait_exit(Duration::from_secs(120));
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the failpoint {point} was not reached: {st:?}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let restarted = Served::start(site, mnt, args);
    match side {
        Side::Primary => src_serve = Some(restarted),
        Side::Target => dst_serve = Some(restarted),
    }
    let cli_status = cli.wait().expect("failover ends");
    let mut cli_text = String::new();
    if let Some(mut o) = cli.stdout.take() {
        let _ = o.read_to_string(&mut cli_text);
    }
    if let Some(mut e) = cli.stderr.take() {
        let _ = e.read_to_string(&mut cli_text);
    }

    // Exactly one writable primary, and it stays so.
    let dst_img = dst_mnt.join("vm1").join("os.img");
    let deadline = Instant::now() + Duration::from_secs(90);
    let promoted = loop {
        let (p, t) = (writable(&src_img), writable(&dst_img));
        assert!(
            !(p && t),
            "{point}: two writable primaries; failover said: {cli_text}"
        );
        if p != t {
            std::thread::sleep(Duration::from_millis(1500));
            let again = (writable(&src_img), writable(&dst_img));
            assert_eq!(again, (p, t), "{point}: the writable primary changed");
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "{point}: no writable primary (source status {}, target status {}); failover \
             said: {cli_text}",
            status(&src),
            status(&dst)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The command's exit code says which happened (a primary killed under it cannot
    // answer at all: an error, whatever the outcome).
    if cli_status.success() {
        assert!(promoted, "{point}: failover said it succeeded: {cli_text}");
    } else if side == Side::Target {
        assert!(
            !promoted,
            "{point}: failover failed but the target promoted: {cli_text}"
        );
    }
    if let Some(e) = expect {
        assert_eq!(promoted, e, "{point}: promoted; failover said: {cli_text}");
    }
    if promoted {
        assert!(
            read_all(&dst_img) == final_src,
            "{point}: the promoted disk differs from the source's last state"
        );
        let st = status(&src);
        assert_eq!(st["machines"][0]["state"], "failed-over", "{point}: {st}");
    } else {
        // The replica is a replica still, and replication goes on.
        write_at(&src_img, 0, &common::pattern(99, MIB as usize));
        wait_shipped(&src);
        let st = status(&dst);
        let roles: Vec<_> = st["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .filter(|m| m["name"] == "vm1")
            .map(|m| m["role"].clone())
            .collect();
        assert_eq!(roles, vec!["replica"], "{point}: {st}");
    }
    drop((src_serve, dst_serve));
}

#[test]
fn primary_killed_after_the_intent() {
    crash_at("planned:after-intent", Side::Primary, Some(false));
}

#[test]
fn primary_killed_after_everything_was_shipped() {
    crash_at("planned:after-ship", Side::Primary, Some(false));
}

#[test]
fn primary_killed_after_sending_promote() {
    crash_at("planned:after-promote-sent", Side::Primary, None);
}

#[test]
fn primary_killed_after_the_answer_before_its_fence_is_persisted() {
    crash_at("planned:after-promoted", Side::Primary, Some(true));
}

#[test]
fn target_killed_after_verifying() {
    crash_at("promote:after-verify", Side::Target, Some(false));
}

#[test]
fn target_killed_after_the_promotion_record() {
    crash_at("promote:after-record", Side::Target, Some(false));
}

#[test]
fn target_killed_after_the_promoted_manifest() {
    crash_at("promote:after-manifest", Side::Target, Some(true));
}

#[test]
fn target_killed_before_its_answer() {
    crash_at("promote:before-reply", Side::Target, Some(true));
}
