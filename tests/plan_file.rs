//! `replog plan add / list / show / remove` through the command line, on a site with
//! no serve: bad plan files are refused naming the line and the key, and nothing is
//! stored; a good one is listed, shown, replaced only when asked, removed. (Every
//! rule of the file has its own case in `src/plan/file.rs`'s tests.)

mod common;

use common::serve::{replog, run_ok};
use std::path::Path;

fn site(root: &Path) -> std::path::PathBuf {
    let site = root.join("site");
    run_ok(replog().arg("init").arg(&site));
    for m in ["db", "app", "web"] {
        run_ok(
            replog()
                .args(["disk", "create"])
                .arg(&site)
                .arg(format!("{m}/os"))
                .args(["--size", "1M"]),
        );
    }
    site
}

fn add(site: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    replog()
        .args(["plan", "add"])
        .arg(site)
        .arg(file)
        .args(extra)
        .output()
        .expect("plan add")
}

fn stored(site: &Path) -> Vec<String> {
    match std::fs::read_dir(site.join("plans")) {
        Ok(e) => e
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".toml"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn bad_plan_files_are_refused_with_line_and_key_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = site(tmp.path());
    let not_exec = tmp.path().join("check.sh");
    std::fs::write(&not_exec, "#!/bin/sh\nexit 0\n").expect("write");
    let cases: Vec<(String, &str)> = vec![
        (
            "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\ncolour = \"red\"\n".into(),
            "line 4",
        ),
        (
            "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n[[group]]\nmachines = [\"db\"]\n"
                .into(),
            "line 5, group 2, key `machines`: db is named twice",
        ),
        (
            "name = \"../../etc\"\n[[group]]\nmachines = [\"db\"]\n".into(),
            "line 1, key `name`",
        ),
        (
            "name = \"erp\"\n[[group]]\nmachines = [\"db\", \"ghost\"]\n".into(),
            "no machine and no replica named ghost",
        ),
        (
            "name = \"erp\"\n[[group]]\nmachines = []\n".into(),
            "line 3, group 1, key `machines`: empty",
        ),
        (
            format!(
                "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"{}\"\n",
                not_exec.display()
            ),
            "line 5, group 1, after action 1, key `run`",
        ),
        (
            "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nrun = \"/bin/true\"\ntimeout = \"forever\"\n"
                .into(),
            "line 6, group 1, after action 1, key `timeout`",
        ),
        (
            "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n[[group.after]]\nmanual = \"look\"\non = [\"drill\"]\n"
                .into(),
            "line 6, group 1, after action 1, key `on`",
        ),
    ];
    for (text, want) in cases {
        let f = tmp.path().join("plan.toml");
        std::fs::write(&f, &text).expect("write plan");
        let o = add(&site, &f, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "accepted:\n{text}");
        assert!(
            err.contains(want) && err.contains("plan.toml") && err.contains("nothing was stored"),
            "for\n{text}\nthe error {err:?} lacks {want:?}"
        );
        assert!(stored(&site).is_empty(), "a bad plan was stored");
    }
}

#[test]
fn a_plan_is_stored_listed_shown_replaced_only_when_asked_and_removed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = site(tmp.path());
    let f = tmp.path().join("erp.toml");
    std::fs::write(
        &f,
        "name = \"erp\"\n[[group]]\nmachines = [\"db\"]\n  [[group.after]]\n  run = \"/bin/true --quick\"\n  timeout = \"2m\"\n  on = [\"test\"]\n  [[group.after]]\n  manual = \"Check the database\"\n[[group]]\nmachines = [\"app\", \"web\"]\n",
    )
    .expect("write");
    let o = add(&site, &f, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stored(&site), vec!["erp.toml".to_string()]);

    let list = run_ok(replog().args(["plan", "list"]).arg(&site).arg("--json"));
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list["plans"][0]["name"], "erp");
    let show = run_ok(
        replog()
            .args(["plan", "show"])
            .arg(&site)
            .args(["erp", "--json"]),
    );
    let show: serde_json::Value = serde_json::from_str(&show).expect("json");
    assert_eq!(
        show["groups"][1]["machines"],
        serde_json::json!(["app", "web"])
    );
    let after = &show["groups"][0]["after"];
    assert_eq!(
        after[0]["argv"],
        serde_json::json!(["/bin/true", "--quick"])
    );
    assert_eq!(after[0]["timeout_s"], 120.0);
    assert_eq!(after[0]["on"], serde_json::json!(["test"]));
    assert_eq!(after[1]["manual"], "Check the database");
    let text = run_ok(replog().args(["plan", "show"]).arg(&site).arg("erp"));
    assert!(text.contains("group 2: app, web"), "{text}");

    // The same name again: refused unless --replace.
    let o = add(&site, &f, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--replace"));
    let o = add(&site, &f, &["--replace"]);
    assert!(o.status.success());

    // A plan failover needs a running serve; nothing is recorded without one.
    let o = replog()
        .args(["plan", "failover"])
        .arg(&site)
        .args(["erp", "--test"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("replog serve"));
    assert!(!site.join("plans/runs").exists());
    // --at goes not with --planned; a kind is required (usage errors: exit 2).
    for args in [&["erp", "--planned", "--at", "latest"][..], &["erp"][..]] {
        let o = replog()
            .args(["plan", "failover"])
            .arg(&site)
            .args(args)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }

    run_ok(replog().args(["plan", "remove"]).arg(&site).arg("erp"));
    assert!(stored(&site).is_empty());
    let o = replog()
        .args(["plan", "remove"])
        .arg(&site)
        .arg("erp")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    // Hostile names never reach the file system.
    let o = replog()
        .args(["plan", "show"])
        .arg(&site)
        .arg("../site.toml")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid plan name"));
}
