//! What an operator uses beside the data path: shell completions, manual pages, JSON
//! logs.

mod common;

use common::serve::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn completions_are_valid_scripts_for_each_shell() {
    let bash = run_ok(replog().args(["completions", "bash"]));
    assert!(
        bash.contains("_replog()") && bash.contains("complete -F"),
        "{bash}"
    );
    for sub in ["serve", "failover", "reprotect", "completions"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    // bash parses it.
    let f = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(f.path(), &bash).expect("write");
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(f.path())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run_ok(replog().args(["completions", "zsh"])).starts_with("#compdef replog"));
    assert!(run_ok(replog().args(["completions", "fish"])).contains("complete -c replog"));
    let out = replog()
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_are_roff_for_replog_and_each_command() {
    let top = run_ok(replog().arg("man"));
    assert!(top.contains(".TH replog 1"), "{top}");
    assert!(
        top.contains(".SH NAME") && top.contains(".SH SUBCOMMANDS"),
        "{top}"
    );
    let serve = run_ok(replog().args(["man", "serve"]));
    assert!(serve.contains(".TH replog-serve 1"), "{serve}");
    assert!(
        serve.contains("metrics") && serve.contains("log\\-format"),
        "{serve}"
    );
    let out = replog().args(["man", "nope"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no command \"nope\""));
}

#[test]
fn serve_logs_one_json_object_a_line_when_asked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("s");
    run_ok(replog().arg("init").arg(&site));
    let addr = format!("127.0.0.1:{}", free_port());
    // Logged to a file and read as it grows: a serve that says nothing cannot hang the
    // test past its deadline.
    let log = tmp.path().join("serve.log");
    let mut child = replog()
        .arg("serve")
        .arg(&site)
        .args(["--listen", &addr, "--log-format", "json"])
        .env("REPLOG_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline
        && !seen
            .iter()
            .any(|m: &String| m.contains("receiving replicas on"))
    {
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        seen.clear();
        // Only whole lines: the last may still be being written.
        for line in text.lines().take(text.matches('\n').count()) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "{line}"
            );
            seen.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
        }
    }
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(
        seen.iter().any(|m| m.contains("receiving replicas on")),
        "{seen:?}"
    );
}

#[test]
fn serve_tells_a_service_manager_when_it_is_ready_and_when_it_stops() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("s");
    run_ok(replog().arg("init").arg(&site));
    let sock_path = tmp.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = replog()
        .arg("serve")
        .arg(&site)
        .args(["--listen", &addr])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1"), "{msg}");
    // Ready means ready: the listener answers.
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    assert!(child.wait().expect("wait").success());
}

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = tool(
        "the_systemd_unit_verifies",
        &["/usr/bin/systemd-analyze", "/bin/systemd-analyze"],
    ) else {
        return;
    };
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/replog@.service"),
    )
    .expect("unit");
    assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure"));
    // The unit as installed: the binary where the unit says (here, this build's), the
    // man pages aside (they are installed by the operator, see the README).
    let unit: String = unit
        .replace("/usr/local/bin/replog", env!("CARGO_BIN_EXE_replog"))
        .lines()
        .filter(|l| !l.starts_with("Documentation="))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("replog@test.service");
    std::fs::write(&path, unit).expect("write");
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("replog@test"),
        "{text}"
    );
}

#[test]
fn failover_commands_draw_progress_on_a_terminal_and_stay_quiet_off_it() {
    let Some(script) = tool(
        "failover_commands_draw_progress_on_a_terminal_and_stay_quiet_off_it",
        &["/usr/bin/script", "/bin/script"],
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let site = make_site(tmp.path(), &[("os", "1M")]);
    let cmd = format!(
        "{} commit {} vm1",
        env!("CARGO_BIN_EXE_replog"),
        site.display()
    );
    // On a terminal (script(1) gives it one): the spinner, then the refusal.
    let out = std::process::Command::new(script)
        .args(["-qc", &cmd, "/dev/null"])
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vm1: asking the site"), "{text}");
    assert!(text.contains("no failover pending"), "{text}");
    // Off a terminal: only the refusal.
    let out = replog()
        .arg("commit")
        .arg(&site)
        .arg("vm1")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("asking the site"), "{text}");
    assert!(text.contains("no failover pending"), "{text}");
}

#[test]
fn serve_refuses_private_keys_open_to_others() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("s");
    run_ok(replog().arg("init").arg(&site));
    let key = site.join("identity/key.pem");
    let replica_key = site.join("identity/replica.key");
    // The replica key is made on first use; make it now.
    replog::site::replica_key_at(&site).expect("replica key");
    for (file, mode) in [(&key, 0o644), (&replica_key, 0o640)] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = replog().arg("serve").arg(&site).output().expect("serve");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&file.display().to_string()) && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    // With both back to 0600 it starts (and stops on SIGTERM).
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = replog()
        .arg("serve")
        .arg(&site)
        .args(["--listen", &addr])
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "serve never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
}
