//! What an operator uses beside the data path: shell completions, manual pages, JSON
//! logs.

mod common;

use common::serve::*;
use std::io::{BufRead, BufReader};
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
    let mut child = replog()
        .arg("serve")
        .arg(&site)
        .args(["--listen", &addr, "--log-format", "json"])
        .env("REPLOG_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        let msg = v["fields"]["message"].as_str().unwrap_or("").to_string();
        seen.push(msg.clone());
        if msg.contains("receiving replicas on") {
            break;
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
