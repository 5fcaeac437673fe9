//! Sites: init, the ownership lock, disks created and imported from the command line.

use replog::{Error, Site};
use std::process::Command;

fn replog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_replog"))
}

#[test]
fn a_site_has_one_owner_and_the_error_names_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("s");
    Site::init(&path).expect("init");
    let held = Site::open(&path).expect("first open");
    match Site::open(&path) {
        Err(Error::Locked(msg)) => {
            assert!(
                msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
        }
        other => panic!("second open: {other:?}"),
    }
    let out = replog()
        .args(["disk", "create"])
        .arg(&path)
        .args(["vm1/os", "--size", "1M"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by pid"), "{err}");
    assert!(
        !path.join("machines/vm1").exists(),
        "disk create changed a locked site"
    );
    drop(held);
    Site::open(&path).expect("open after release");
}

#[test]
fn init_refuses_a_non_empty_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("x"), b"x").expect("write");
    assert!(matches!(
        Site::init(tmp.path()),
        Err(Error::AlreadyExists(_))
    ));
    let out = replog().arg("init").arg(tmp.path()).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn usage_errors_exit_2() {
    let out = replog().args(["disk", "create"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn write_read_compact_round_trip_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("s");
    let ok = |c: &mut Command| {
        let out = c.output().expect("run");
        assert!(
            out.status.success(),
            "{:?}: {}",
            c,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(replog().arg("init").arg(&site));
    ok(replog()
        .args(["disk", "create"])
        .arg(&site)
        .args(["vm1/os", "--size", "8M"]));
    let data: Vec<u8> = (0..300_001u32).map(|i| (i % 253) as u8).collect();
    let input = tmp.path().join("in");
    std::fs::write(&input, &data).expect("write input");
    ok(replog()
        .arg("write")
        .arg(&site)
        .args(["vm1/os", "--offset", "4097", "--input"])
        .arg(&input));
    ok(replog()
        .arg("write")
        .arg(&site)
        .args(["vm1/os", "--offset", "5000", "--zero", "1000"]));
    let mut want = data.clone();
    want[5000 - 4097..6000 - 4097].fill(0);
    for round in 0..2 {
        let out = ok(replog()
            .arg("read")
            .arg(&site)
            .args(["vm1/os", "--offset", "4097", "--length", "300001"]));
        assert!(out.stdout == want, "round {round}: read differs");
        ok(replog().arg("compact").arg(&site));
    }
    let out = ok(replog().arg("inspect").arg(&site));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checksums verified: OK"));
    let out = ok(replog().arg("status").arg(&site).arg("--json"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(doc["machines"][0]["name"], "vm1");
    assert!(doc["machines"][0]["journal_bytes"].as_u64().is_some());
}

/// A machine directory without a manifest (a creation, promotion or test copy that died
/// before its commit point) is removed when serve starts; real machines are not.
#[test]
fn interrupted_creations_are_removed_and_machines_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("s");
    assert!(replog()
        .arg("init")
        .arg(&site)
        .status()
        .expect("init")
        .success());
    assert!(replog()
        .args(["disk", "create"])
        .arg(&site)
        .args(["vm1/os", "--size", "1M"])
        .status()
        .expect("disk create")
        .success());
    let leftover = site.join("machines/vm1-test");
    std::fs::create_dir_all(leftover.join("journal")).expect("leftover");
    std::fs::create_dir_all(leftover.join("disks")).expect("leftover");
    let opened = Site::open(&site).expect("site");
    let removed = opened.remove_interrupted_creations().expect("remove");
    assert_eq!(removed, vec!["vm1-test".to_string()]);
    assert!(
        !leftover.exists(),
        "the interrupted creation is still there"
    );
    assert!(
        site.join("machines/vm1/machine.meta").exists(),
        "a machine was removed"
    );
    opened.open_machine("vm1").expect("vm1 opens");
}
