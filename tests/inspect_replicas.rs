//! `replog inspect` verifies the replicas a site holds: one flipped byte in any kind
//! of replica file — segment, segment index, parent chunk, patch data or index, and
//! the metadata — is found, named, and exits 1; a clean replica passes; a replica
//! file on its own is recognised and checked with its site, or said to need it.

mod common;

use common::serve::{replog, run_ok};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/target-resynced/site")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn inspect(path: &Path) -> (Option<i32>, String) {
    let out = replog().arg("inspect").arg(path).output().expect("inspect");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_clean_replica_passes_and_every_kind_of_damage_is_found() {
    let tmp = tempfile::tempdir().expect("tmp");
    let clean = tmp.path().join("clean");
    copy_dir(&fixture(), &clean);
    let (code, text) = inspect(&clean);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("replica vm1") && text.contains("OK"),
        "{text}"
    );
    assert!(text.contains("patch(es)"), "{text}");

    let mut all = Vec::new();
    files_under(&fixture().join("replicas/vm1"), &mut all);
    let pick = |suffix: &str, dir: &str| -> PathBuf {
        all.iter()
            .find(|p| {
                p.to_string_lossy().ends_with(suffix)
                    && p.parent()
                        .is_some_and(|d| d.to_string_lossy().contains(dir))
            })
            .unwrap_or_else(|| panic!("no {dir}/*{suffix} in the fixture"))
            .strip_prefix(fixture())
            .expect("under the fixture")
            .to_path_buf()
    };
    let kinds = [
        ("a segment", pick(".seg.enc", "segments")),
        ("a segment index", pick(".idx.enc", "segments")),
        ("a parent chunk", pick(".enc", "parent/0")),
        ("a patch's data", pick(".data.enc", "patches")),
        ("a patch's index", pick(".idx.enc", "patches")),
        (
            "the replica manifest",
            PathBuf::from("replicas/vm1/replica.meta"),
        ),
        ("the parent mark", PathBuf::from("replicas/vm1/parent.meta")),
        ("the received mark", PathBuf::from("replicas/vm1/received")),
        (
            "the retention",
            PathBuf::from("replicas/vm1/retention.meta"),
        ),
    ];
    for (what, rel) in kinds {
        for at in ["header", "body"] {
            let site = tmp.path().join(format!("{}-{at}", what.replace(' ', "-")));
            copy_dir(&fixture(), &site);
            let victim = site.join(&rel);
            let mut b = std::fs::read(&victim).expect("read");
            let i = if at == "header" { 20 } else { b.len() - 3 };
            b[i] ^= 0x10;
            std::fs::write(&victim, &b).expect("damage");
            let (code, text) = inspect(&site);
            assert_eq!(code, Some(1), "{what} ({at}) damaged, inspect said: {text}");
            let name = victim
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            assert!(
                text.contains("CORRUPTION") || text.contains("corruption"),
                "{what} ({at}): {text}"
            );
            assert!(text.contains(&name), "{what} ({at}) not named: {text}");
        }
    }
}

#[test]
fn a_replica_file_on_its_own_is_recognised() {
    let tmp = tempfile::tempdir().expect("tmp");
    let site = tmp.path().join("site");
    copy_dir(&fixture(), &site);
    let mut segs = Vec::new();
    files_under(&site.join("replicas/vm1/segments"), &mut segs);
    let seg = segs
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".seg.enc"))
        .expect("a segment")
        .clone();
    // Where it lies, it is checked with its site's key.
    let (code, text) = inspect(&seg);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("encrypted replica segment") && text.contains("checked"),
        "{text}"
    );
    // Alone, it is recognised and the report says what it needs.
    let alone = tmp.path().join("alone.seg.enc");
    std::fs::copy(&seg, &alone).expect("copy");
    let (code, text) = inspect(&alone);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("encrypted replica segment") && text.contains("replog inspect SITE"),
        "{text}"
    );
    assert!(!text.contains("bad magic"), "{text}");
    // A metadata file is decoded, with its kind and version.
    let (code, text) = inspect(&site.join("replicas/vm1/parent.meta"));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("replica parent mark") && text.contains("version 1"),
        "{text}"
    );
    // And a whole replica directory.
    let out = run_ok(replog().arg("inspect").arg(site.join("replicas/vm1")));
    assert!(out.contains("replica vm1"), "{out}");
}
