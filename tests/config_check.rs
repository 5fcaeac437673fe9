//! `replog config check SITE`: site.toml and every relationship file checked, each
//! problem named with file, line and key; `serve` refuses a bad config with the same
//! message.

mod common;

use common::serve::*;
use std::path::Path;

fn check(site: &Path) -> (i32, String) {
    let out = replog()
        .args(["config", "check"])
        .arg(site)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(needle))
        .expect("line")
        + 1
}

#[test]
fn every_bad_key_and_value_is_named_with_its_file_line_and_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("s");
    run_ok(replog().arg("init").arg(&site));
    let (code, out) = check(&site);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all good"), "{out}");

    let cfg = site.join("site.toml");
    let good = std::fs::read_to_string(&cfg).expect("read");
    let cases: [(&str, &str, &str, &str); 5] = [
        // (line starting with, replaced by, key named, words of the reason)
        (
            "segment_bytes =",
            "segment_bytes = 12",
            "journal.segment_bytes",
            "outside",
        ),
        (
            "resync_window =",
            "resync_window = \"25:00-08:00\"",
            "replication.resync_window",
            "HH:00",
        ),
        (
            "resync_chunk_bytes =",
            "resync_chunk_bytes = 5000",
            "replication.resync_chunk_bytes",
            "power of two",
        ),
        (
            "seal_interval_ms =",
            "seal_interval_ms = \"soon\"",
            "replication.seal_interval_ms",
            "invalid type",
        ),
        (
            "key_file =",
            "key_file = \"\"\nkey_fil = \"typo\"",
            "replica.key_fil",
            "unknown field",
        ),
    ];
    for (starts, by, key, why) in cases {
        let line = line_of(&good, starts);
        let bad: String = good
            .lines()
            .map(|l| {
                if l.starts_with(starts) {
                    by.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&cfg, &bad).expect("write");
        let (code, out) = check(&site);
        assert_eq!(code, 1, "{key}: {out}");
        let want_line = if key == "replica.key_fil" {
            line + 1
        } else {
            line
        };
        let want = format!("site.toml line {want_line}, key {key}: ");
        assert!(
            out.contains(&want) && out.contains(why),
            "want {want:?} … {why:?} in:\n{out}"
        );
        // serve refuses to start, with the same message.
        let served = replog().arg("serve").arg(&site).output().expect("serve");
        assert_eq!(served.status.code(), Some(1));
        let err = String::from_utf8_lossy(&served.stderr);
        assert!(err.contains(&want), "serve said: {err}");
    }
    std::fs::write(&cfg, &good).expect("restore");

    // A relationship file: a bad target ID and a bad retention, both reported.
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&site)
            .args(["vm1/os", "--size", "1M"]),
    );
    let rel = site.join("machines/vm1/relationship.toml");
    std::fs::write(
        &rel,
        "# replog relationship, format 1\ntarget = \"127.0.0.1:7411\"\ntarget_id = \"nope\"\nretention = \"forever\"\n",
    )
    .expect("write");
    let (code, out) = check(&site);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("relationship.toml line 3, key target_id: "),
        "{out}"
    );
    assert!(
        out.contains("relationship.toml line 4, key retention: "),
        "{out}"
    );
    assert!(out.contains("2 problem(s) in 2 file(s)"), "{out}");
}

#[test]
fn bandwidth_limits_are_checked_kept_and_changed_without_protecting_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = make_site(tmp.path(), &[("os", "1M")]);
    // Bad rates and schedules are refused before anything is tried.
    for (flag, value) in [
        ("--bandwidth", "fast"),
        ("--bandwidth-schedule", "Funday=1MiB/s"),
        ("--rpo", "soon"),
    ] {
        let out = replog()
            .arg("protect")
            .arg(&site)
            .arg("vm1")
            .args(["--target", "127.0.0.1:1", flag, value])
            .output()
            .expect("protect");
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        assert!(!site.join("machines/vm1/relationship.toml").exists());
    }
    // Not protected: nothing to change.
    let out = replog()
        .args(["bandwidth"])
        .arg(&site)
        .args(["vm1", "20MiB/s"])
        .output()
        .expect("bandwidth");
    assert_eq!(out.status.code(), Some(1));
    // A protected machine (its relationship as protect writes it).
    let id = run_ok(replog().arg("id").arg(&site)).trim().to_string();
    let rel = site.join("machines/vm1/relationship.toml");
    std::fs::write(
        &rel,
        format!(
            "# replog relationship, format 1\ntarget = \"127.0.0.1:7411\"\ntarget_id = \"{id}\"\n"
        ),
    )
    .expect("write");
    run_ok(replog().arg("bandwidth").arg(&site).args([
        "vm1",
        "20MiB/s",
        "--schedule",
        "Mon-Fri 08:00-18:00=5MiB/s, *=unlimited",
    ]));
    let text = std::fs::read_to_string(&rel).expect("read");
    assert!(text.contains("bandwidth = \"20MiB/s\""), "{text}");
    assert!(text.contains("bandwidth_schedule = \"Mon-Fri 08:00-18:00=5MiB/s, *=unlimited\""));
    let shown = run_ok(replog().arg("bandwidth").arg(&site).arg("vm1"));
    assert!(
        shown.contains("20MiB/s") && shown.contains("Mon-Fri"),
        "{shown}"
    );
    run_ok(
        replog()
            .arg("bandwidth")
            .arg(&site)
            .args(["vm1", "unlimited", "--schedule", ""]),
    );
    let text = std::fs::read_to_string(&rel).expect("read");
    assert!(!text.contains("bandwidth"), "{text}");
    // A bad schedule written by hand is found by config check, named.
    std::fs::write(
        &rel,
        format!("{text}bandwidth_schedule = \"Mon 9-5=1MiB/s\"\n"),
    )
    .expect("w");
    let (code, out) = check(&site);
    assert_eq!(code, 1);
    assert!(out.contains("key bandwidth_schedule: "), "{out}");
}
