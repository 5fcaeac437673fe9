//! Hostile input through the real `replog` binary: bad names and sizes for
//! `disk create`, damaged and random files for `replog inspect`.
//!
//! Invariant 6 (DESIGN.md): bad input gets a clear error and changes nothing. And no
//! input ever makes the binary panic: the exit code is always 0 or 1 (never 101).

use replog::format::meta::Watermark;
use replog::format::{FOOTER_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_replog");

/// Run the binary; return (exit code, stdout, stderr).
fn replog<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out: Output = Command::new(BIN)
        .args(args)
        .env("REPLOG_LOG", "warn")
        .output()
        .expect("run replog");
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        code == 0 || code == 1,
        "replog exited with {code} (a panic is 101)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (code, stdout, stderr)
}

fn ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let (code, stdout, stderr) = replog(args);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout
}

/// What a file or directory looks like, for a byte-for-byte before/after comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File { len: u64, mode: u32, bytes: Vec<u8> },
    Other,
}

/// A recursive listing of `root` with sizes, permissions and contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(root, &path, out);
            } else if meta.is_file() {
                let bytes = fs::read(&path).expect("read");
                out.insert(
                    rel,
                    Entry::File {
                        len: meta.len(),
                        mode: meta.mode(),
                        bytes,
                    },
                );
            } else {
                out.insert(rel, Entry::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        out.insert(PathBuf::new(), Entry::Dir);
        walk(root, root, &mut out);
    }
    out
}

/// The same listing with the contents of the site's `lock` file blanked: every command
/// that opens a site writes its pid there (administration, not data).
fn without_lock_contents(mut s: BTreeMap<PathBuf, Entry>) -> BTreeMap<PathBuf, Entry> {
    if let Some(Entry::File { len, bytes, .. }) = s.get_mut(Path::new("lock")) {
        *len = 0;
        bytes.clear();
    }
    s
}

fn assert_same(before: &BTreeMap<PathBuf, Entry>, after: &BTreeMap<PathBuf, Entry>, what: &str) {
    if before == after {
        return;
    }
    let mut diff = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff.push(format!("removed {}", k.display())),
            Some(w) if w != v => diff.push(format!("changed {}", k.display())),
            _ => {}
        }
    }
    for k in after.keys().filter(|k| !before.contains_key(*k)) {
        diff.push(format!("created {}", k.display()));
    }
    panic!("{what}: the site changed: {diff:?}");
}

/// A site with one machine `vm1` and one disk `os` of 1 MiB.
fn site_with_disk() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("site");
    ok([Path::new("init"), &site]);
    ok([
        "disk".as_ref(),
        "create".as_ref(),
        site.as_os_str(),
        "vm1/os".as_ref(),
        "--size".as_ref(),
        "1M".as_ref(),
    ]);
    (tmp, site)
}

fn disk_create(
    site: &Path,
    disk: &str,
    size_arg: &str,
    import: Option<&Path>,
) -> (i32, String, String) {
    let mut args: Vec<std::ffi::OsString> =
        vec!["disk".into(), "create".into(), site.into(), disk.into()];
    // `--size=VALUE` so that values such as "-1" are not taken for flags.
    args.push(format!("--size={size_arg}").into());
    if let Some(p) = import {
        args.push("--import".into());
        args.push(p.into());
    }
    replog(args)
}

#[test]
fn disk_create_refuses_bad_names_and_changes_nothing() {
    let (_tmp, site) = site_with_disk();
    let before = snapshot(&site);
    let long = format!("vm1/{}", "x".repeat(65));
    let long_machine = format!("{}/os", "m".repeat(65));
    let bad = [
        "../x",
        "../../etc/passwd",
        "vm/..",
        "vm1/..",
        "vm1/.",
        "./os",
        "vm1/../x",
        "vm1/a/b",
        "vm1//os",
        "a b/os",
        "vm1/a b",
        "vm1/\x01",
        "vm1/a\x01b",
        "\x01/os",
        "vm1/a\nb",
        "vm1/a\tb",
        "vm1/.hidden",
        ".hidden/os",
        "vm1/-rf",
        "vm1/é",
        "vm1/os\\x",
        long.as_str(),
        long_machine.as_str(),
        "/os",
        "vm1/",
        "/",
        "",
        "vm1",
        "os.img",
    ];
    for name in bad {
        for machine_is_new in [false, true] {
            let name = if machine_is_new {
                name.replacen("vm1", "vm9", 1)
            } else {
                name.to_string()
            };
            let (code, stdout, stderr) = disk_create(&site, &name, "1M", None);
            assert_eq!(
                code, 1,
                "{name:?} accepted\nstdout: {stdout}\nstderr: {stderr}"
            );
            assert!(
                stderr.contains("invalid") || stderr.contains("MACHINE/DISK"),
                "{name:?}: unclear message: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{name:?}: {stderr}");
            assert_same(&before, &snapshot(&site), &format!("disk create {name:?}"));
        }
    }
    // Nothing escaped the site either.
    assert!(!site.parent().expect("parent").join("x").exists());
    assert!(!site.join("machines").join("x").exists());
}

#[test]
fn disk_create_refuses_bad_sizes_and_changes_nothing() {
    let (_tmp, site) = site_with_disk();
    let before = snapshot(&site);
    let bad = [
        "0",
        "0K",
        "1000",
        "511",
        "513",
        "-1",
        "-512",
        "1.5G",
        "0x1000",
        "65T",
        "64T1",
        "1P",
        "1E",
        "99999999999999999999",
        "18446744073709551615",
        "17179869184T",
        "garbage",
        "",
        " ",
        "G",
        "KiB",
        "1 G",
        "1GG",
        "1é",
        "é",
        "٤٠٩٦",
    ];
    for size in bad {
        for disk in ["vm1/data", "vm9/os"] {
            let (code, stdout, stderr) = disk_create(&site, disk, size, None);
            assert_eq!(
                code, 1,
                "size {size:?} accepted\nstdout: {stdout}\nstderr: {stderr}"
            );
            assert!(
                stderr.contains("size"),
                "size {size:?}: unclear message: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{size:?}: {stderr}");
            assert_same(
                &before,
                &snapshot(&site),
                &format!("disk create --size {size:?}"),
            );
        }
    }
}

#[test]
fn disk_create_refuses_oversized_import_and_existing_disk() {
    let (tmp, site) = site_with_disk();
    // Every later command opens the site and so rewrites its lock file's pid: compare
    // everything else byte for byte.
    ok(["disk".as_ref(), "list".as_ref(), site.as_os_str()]);
    let before = without_lock_contents(snapshot(&site));

    // An import one byte larger than the disk, into an existing and into a new machine.
    let big = tmp.path().join("big.raw");
    let f = fs::File::create(&big).expect("create");
    f.set_len((1 << 20) + 1).expect("set_len");
    drop(f);
    for disk in ["vm1/data", "vm2/os"] {
        let (code, _, stderr) = disk_create(&site, disk, "1M", Some(&big));
        assert_eq!(code, 1, "oversized import into {disk} accepted");
        assert!(
            stderr.contains("larger than the disk"),
            "unclear message: {stderr}"
        );
        assert_same(
            &before,
            &without_lock_contents(snapshot(&site)),
            "oversized import",
        );
    }

    // An import that does not exist.
    let missing = tmp.path().join("missing.raw");
    for disk in ["vm1/data", "vm2/os"] {
        let (code, _, stderr) = disk_create(&site, disk, "1M", Some(&missing));
        assert_eq!(code, 1, "missing import accepted");
        assert!(stderr.contains("missing.raw"), "unclear message: {stderr}");
        assert_same(
            &before,
            &without_lock_contents(snapshot(&site)),
            "missing import",
        );
    }

    // An import that is a directory.
    let (code, _, _) = disk_create(&site, "vm2/os", "1M", Some(tmp.path()));
    assert_eq!(code, 1, "directory import accepted");
    assert_same(
        &before,
        &without_lock_contents(snapshot(&site)),
        "directory import",
    );

    // The same disk again, with the same or another size.
    for size in ["1M", "2M"] {
        let (code, _, stderr) = disk_create(&site, "vm1/os", size, None);
        assert_eq!(code, 1, "second create of vm1/os accepted");
        assert!(stderr.contains("exists"), "unclear message: {stderr}");
        assert_same(
            &before,
            &without_lock_contents(snapshot(&site)),
            "second create",
        );
    }
    let small = tmp.path().join("small.raw");
    fs::write(&small, vec![7u8; 4096]).expect("write");
    let (code, _, stderr) = disk_create(&site, "vm1/os", "1M", Some(&small));
    assert_eq!(code, 1, "second create with import accepted");
    assert!(stderr.contains("exists"), "unclear message: {stderr}");
    assert_same(
        &before,
        &without_lock_contents(snapshot(&site)),
        "second create with import",
    );

    // A site that does not exist is not created by `disk create`.
    let nosite = tmp.path().join("nosite");
    let (code, _, stderr) = disk_create(&nosite, "vm1/os", "1M", None);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("not a replog site"),
        "unclear message: {stderr}"
    );
    assert!(!nosite.exists());
}

#[test]
fn sparse_import_keeps_content_and_holes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site = tmp.path().join("site");
    ok([Path::new("init"), &site]);

    const SIZE: u64 = 64 << 20;
    const SRC_LEN: u64 = 40 << 20;
    let src = tmp.path().join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&src).expect("create");
        f.set_len(SRC_LEN).expect("set_len");
        let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
        for at in [0u64, 4096 * 3, 10 << 20, (20 << 20) + 100, SRC_LEN - 4096] {
            f.write_all_at(&block, at).expect("write");
        }
        // An allocated block of zeros: must become a hole too.
        f.write_all_at(&[0u8; 65536], 30 << 20)
            .expect("write zeros");
        // A short, unaligned tail is not a whole block.
        f.write_all_at(b"tail", SRC_LEN - 4).expect("write tail");
        f.sync_all().expect("sync");
    }
    ok([
        "disk".as_ref(),
        "create".as_ref(),
        site.as_os_str(),
        "vm1/os".as_ref(),
        "--size".as_ref(),
        "64M".as_ref(),
        "--import".as_ref(),
        src.as_os_str(),
    ]);
    let img = site.join("machines/vm1/disks/os.img");
    let meta = fs::metadata(&img).expect("image");
    assert_eq!(meta.len(), SIZE);
    let got = fs::read(&img).expect("read image");
    let want = fs::read(&src).expect("read source");
    assert!(
        got[..SRC_LEN as usize] == want[..],
        "imported content differs"
    );
    assert!(
        got[SRC_LEN as usize..].iter().all(|b| *b == 0),
        "bytes past the import are not zero"
    );
    let allocated = meta.blocks() * 512;
    // Five 4 KiB data blocks plus the tail block; allow for file-system slack.
    assert!(
        allocated <= 1 << 20,
        "image has {allocated} bytes allocated for {SIZE} bytes of mostly holes"
    );
    // The disk reads back the same through the engine.
    let out = tmp.path().join("out.raw");
    ok([
        "read".as_ref(),
        site.as_os_str(),
        "vm1/os".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
    ]);
    assert!(
        fs::read(&out).expect("read out") == got,
        "engine read differs from the image"
    );
}

// ---------------------------------------------------------------- inspect

/// Offsets of the records of a segment, by a walk independent of the engine's reader:
/// (record offset, payload offset, payload length).
fn walk_records(seg: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    while pos + 4 <= seg.len() && &seg[pos..pos + 4] == b"RREC" {
        let len = u32::from_le_bytes(seg[pos + 20..pos + 24].try_into().expect("4 bytes")) as usize;
        out.push((pos, pos + RECORD_HEADER_LEN, len));
        pos += RECORD_HEADER_LEN + len;
    }
    out
}

const WRITES: [(u64, usize); 3] = [(0, 1000), (8192, 3000), (100_000, 500)];

/// A site whose machine `vm1` has one sealed segment holding three writes and a flush
/// point, plus an empty active segment. Returns the sealed segment's path.
fn site_with_sealed_segment() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let site_dir = tmp.path().join("site");
    replog::Site::init(&site_dir).expect("init");
    {
        let site = replog::Site::open(&site_dir).expect("open");
        site.create_disk("vm1", "os", 1 << 20, None)
            .expect("create disk");
        let machine = site.open_machine("vm1").expect("open machine");
        let vol = machine.volume("os").expect("volume");
        for (i, (offset, len)) in WRITES.iter().enumerate() {
            let data: Vec<u8> = (0..*len).map(|j| (j as u8) ^ (i as u8 * 0x55)).collect();
            vol.write(*offset, &data).expect("write");
        }
        machine.flush().expect("flush");
        assert!(machine.seal().expect("seal").is_some());
    }
    let journal = site_dir.join("machines/vm1/journal");
    let mut segs: Vec<PathBuf> = fs::read_dir(&journal)
        .expect("journal")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 2, "one sealed and one active segment: {segs:?}");
    let sealed = segs[0].clone();
    let bytes = fs::read(&sealed).expect("read");
    assert_eq!(
        &bytes[bytes.len() - FOOTER_LEN..][..4],
        b"RFTR",
        "first segment is sealed"
    );
    (tmp, site_dir, sealed)
}

fn corruption_line(path: &Path, offset: usize) -> String {
    format!("CORRUPTION in {} at offset {offset}:", path.display())
}

#[test]
fn inspect_valid_segment_site_and_json() {
    let (_tmp, site, sealed) = site_with_sealed_segment();
    for p in [
        &site,
        &sealed,
        &site.join("machines/vm1"),
        &site.join("machines/vm1/journal"),
    ] {
        let out = ok([Path::new("inspect"), p]);
        assert!(
            out.contains("all checksums verified: OK"),
            "{}: {out}",
            p.display()
        );
        let json = ok([Path::new("inspect"), p, Path::new("--json")]);
        let doc: serde_json::Value =
            serde_json::from_str(json.trim()).expect("inspect --json is JSON");
        assert!(doc["corruption"].is_null(), "{doc}");
        assert!(doc["journals"].is_array(), "{doc}");
    }
}

#[test]
fn inspect_names_file_and_offset_of_damaged_record_in_sealed_segment() {
    let (tmp, site, sealed) = site_with_sealed_segment();
    let good = fs::read(&sealed).expect("read");
    let records = walk_records(&good);
    // Three writes and the flush point.
    assert_eq!(records.len(), 4, "{records:?}");
    // The documented layout: 64-byte segment header, 48-byte record headers.
    let mut expect_at = SEGMENT_HEADER_LEN;
    for (i, (at, _, len)) in records.iter().enumerate() {
        assert_eq!(*at, expect_at, "record {i}");
        if let Some((_, wlen)) = WRITES.get(i) {
            assert_eq!(*len, *wlen);
        }
        expect_at += RECORD_HEADER_LEN + len;
    }
    assert_eq!(expect_at + FOOTER_LEN, good.len());

    let copy_dir = tempfile::tempdir_in(tmp.path()).expect("tempdir");
    for (i, (rec_at, payload_at, len)) in records.iter().enumerate() {
        for flip_at in [*payload_at, payload_at + len / 2, payload_at + len - 1] {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[flip_at] ^= bit;
                // In place, inside the site: the segment, the site and the journal.
                fs::write(&sealed, &bad).expect("write");
                let line = corruption_line(&sealed, *rec_at);
                for p in [&sealed, &site, &site.join("machines/vm1/journal")] {
                    let (code, stdout, stderr) = replog([Path::new("inspect"), p]);
                    assert_eq!(
                        code,
                        1,
                        "record {i} flip at {flip_at} not caught via {}",
                        p.display()
                    );
                    assert!(
                        stdout.contains(&line),
                        "record {i} flip at {flip_at} via {}: want {line:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                        p.display()
                    );
                    assert!(stdout.contains("checksum"), "{stdout}");
                }
                // JSON names the same file and offset.
                let (code, stdout, _) =
                    replog([Path::new("inspect"), &sealed, Path::new("--json")]);
                assert_eq!(code, 1);
                let doc: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
                assert_eq!(
                    doc["corruption"]["offset"].as_u64(),
                    Some(*rec_at as u64),
                    "{doc}"
                );
                assert_eq!(doc["corruption"]["path"].as_str(), sealed.to_str(), "{doc}");
                // A lone copy outside any site.
                let copy = copy_dir.path().join("00000000000000000001.seg");
                fs::write(&copy, &bad).expect("write copy");
                let (code, stdout, _) = replog([Path::new("inspect"), &copy]);
                assert_eq!(code, 1, "copy: record {i} flip at {flip_at} not caught");
                assert!(
                    stdout.contains(&corruption_line(&copy, *rec_at)),
                    "copy: {stdout}"
                );
            }
        }
    }
    fs::write(&sealed, &good).expect("restore");
    ok([Path::new("inspect"), &site]);
}

#[test]
fn inspect_flipped_header_and_footer_bytes_are_caught_in_sealed_segment() {
    let (_tmp, site, sealed) = site_with_sealed_segment();
    let good = fs::read(&sealed).expect("read");
    let records = walk_records(&good);
    let footer_at = good.len() - FOOTER_LEN;
    let record_headers: Vec<usize> = records
        .iter()
        .flat_map(|(at, _, _)| *at..at + RECORD_HEADER_LEN)
        .collect();
    let want = format!("CORRUPTION in {}", sealed.display());
    // Every byte of the segment header, every record header and the footer. The
    // segment is sealed and a newer one follows it, so no flip can pass for a torn
    // tail: each is corruption (exit 1) naming the file.
    let positions = (0..SEGMENT_HEADER_LEN)
        .chain(record_headers.iter().copied())
        .chain(footer_at..good.len());
    for at in positions {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        fs::write(&sealed, &bad).expect("write");
        let (code, stdout, stderr) = replog([Path::new("inspect"), &site]);
        assert_eq!(
            code, 1,
            "flip at {at} not caught\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.contains(&want), "flip at {at}: {stdout}");
        // Inspected alone the segment still ends in its footer, so damage before the
        // footer is corruption there too.
        if at < footer_at {
            let (code, stdout, _) = replog([Path::new("inspect"), &sealed]);
            assert_eq!(
                code, 1,
                "flip at {at} not caught in the lone segment: {stdout}"
            );
            assert!(stdout.contains(&want), "flip at {at}: {stdout}");
        }
    }
}

#[test]
fn inspect_missing_empty_truncated_and_random_files() {
    let (tmp, _site, sealed) = site_with_sealed_segment();
    let good = fs::read(&sealed).expect("read");
    let dir = tempfile::tempdir_in(tmp.path()).expect("tempdir");

    // Nonexistent.
    let missing = dir.path().join("nope.seg");
    let (code, _, stderr) = replog([Path::new("inspect"), &missing]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("does not exist") && stderr.contains("nope.seg"),
        "{stderr}"
    );
    let (code, _, _) = replog([Path::new("inspect"), &missing, Path::new("--json")]);
    assert_eq!(code, 1);

    // Empty.
    let empty = dir.path().join("empty.seg");
    fs::write(&empty, b"").expect("write");
    let (code, stdout, _) = replog([Path::new("inspect"), &empty]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(&corruption_line(&empty, 0)), "{stdout}");

    // An empty directory is not a site, journal or segment.
    let (code, _, stderr) = replog([Path::new("inspect"), dir.path()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is not a replog"), "{stderr}");

    // Truncated copies.
    let records = walk_records(&good);
    let mut lengths: Vec<usize> = vec![
        1, 4, 8, 9, 12, 40, 59, 60, 63, 64, 65, 67, 68, 100, 111, 112,
    ];
    for (at, payload_at, len) in &records {
        lengths.extend([
            *at + 1,
            *at + 4,
            *at + 47,
            *payload_at,
            payload_at + len / 2,
            payload_at + len - 1,
        ]);
    }
    let footer_at = good.len() - FOOTER_LEN;
    lengths.extend([footer_at, footer_at + 1, footer_at + 4, good.len() - 1]);
    let boundaries: Vec<usize> = records
        .iter()
        .map(|(at, _, _)| *at)
        .chain([footer_at])
        .collect();
    let cut = dir.path().join("00000000000000000001.seg");
    for len in lengths {
        fs::write(&cut, &good[..len]).expect("write");
        let (code, stdout, stderr) = replog([Path::new("inspect"), &cut]);
        let name = cut.display().to_string();
        if len < SEGMENT_HEADER_LEN {
            assert_eq!(code, 1, "len {len}: {stdout}");
            assert!(
                stdout.contains(&corruption_line(&cut, 0)),
                "len {len}: {stdout}"
            );
        } else if boundaries.contains(&len) {
            // Cut at a record boundary: a clean, unsealed segment.
            assert_eq!(code, 0, "len {len}: {stdout}{stderr}");
            assert!(
                stdout.contains("all checksums verified: OK"),
                "len {len}: {stdout}"
            );
        } else {
            // Cut inside a record or the footer of a lone segment: a torn tail (warning,
            // exit 0) or corruption (exit 1), named either way.
            assert!(stdout.contains(&name), "len {len}: {stdout}");
            if code == 0 {
                assert!(stdout.contains("torn tail"), "len {len}: {stdout}");
            } else {
                assert!(stdout.contains("CORRUPTION in"), "len {len}: {stdout}");
            }
        }
        let (_, json, _) = replog([Path::new("inspect"), &cut, Path::new("--json")]);
        serde_json::from_str::<serde_json::Value>(json.trim()).expect("JSON");
    }

    // Random bytes, raw and behind a valid segment header (so the record parser runs).
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let header = &good[..SEGMENT_HEADER_LEN];
    let file = dir.path().join("random.seg");
    for round in 0..40 {
        let len = (xorshift(&mut rng) % 9000) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut rng) as u8).collect();
        if round % 4 == 1 {
            // Random bytes that start like a record.
            bytes.splice(0..0, *b"RREC");
        }
        if round % 2 == 1 {
            bytes.splice(0..0, header.iter().copied());
        }
        if round % 8 == 6 {
            // Random bytes after valid records, ending in the valid footer.
            bytes = good[..footer_at].to_vec();
            bytes.extend((0..len).map(|_| xorshift(&mut rng) as u8));
            bytes.extend_from_slice(&good[footer_at..]);
        }
        fs::write(&file, &bytes).expect("write");
        let (code, stdout, _) = replog([Path::new("inspect"), &file]);
        if round % 2 == 0 && round % 8 != 6 {
            assert_eq!(code, 1, "round {round}: random bytes accepted: {stdout}");
        }
        if code == 1 {
            assert!(
                stdout.contains(&format!("CORRUPTION in {}", file.display())),
                "{stdout}"
            );
        }
        let (code2, json, _) = replog([Path::new("inspect"), &file, Path::new("--json")]);
        assert_eq!(code, code2);
        serde_json::from_str::<serde_json::Value>(json.trim()).expect("JSON");
    }
}

#[test]
fn inspect_damaged_metadata_in_a_site() {
    let (_tmp, site, _sealed) = site_with_sealed_segment();
    let manifest = site.join("machines/vm1/machine.meta");
    let good = fs::read(&manifest).expect("read");
    for at in [0, 9, 16, 20, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        fs::write(&manifest, &bad).expect("write");
        let (code, stdout, _) = replog([Path::new("inspect"), &site]);
        assert_eq!(code, 1, "manifest flip at {at} not caught: {stdout}");
        assert!(
            stdout.contains(&format!("CORRUPTION in {}", manifest.display())),
            "{stdout}"
        );
    }
    for len in [0, 10, good.len() - 1] {
        fs::write(&manifest, &good[..len]).expect("write");
        let (code, _, _) = replog([Path::new("inspect"), &site]);
        assert_eq!(code, 1, "manifest cut to {len} not caught");
    }
    fs::write(&manifest, &good).expect("restore");

    // A damaged watermark.
    let wm = site.join("machines/vm1/journal/watermark");
    let bytes = Watermark {
        lsn: 0,
        segment_seq: 0,
    }
    .encode();
    let mut bad = bytes.clone();
    bad[30] ^= 1;
    fs::write(&wm, &bad).expect("write");
    let (code, stdout, _) = replog([Path::new("inspect"), &site]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("CORRUPTION in {}", wm.display())),
        "{stdout}"
    );
    fs::write(&wm, &bytes).expect("write");
    ok([Path::new("inspect"), &site]);
}

/// Engine bug (found by this test): a well-formed watermark whose LSN is u64::MAX
/// makes `replog inspect` overflow `w.lsn + 1` (src/inspect.rs, `next_lsn`) and panic in
/// debug builds (exit 101). The same `+ 1` sits in `journal::recover`
/// (`params.watermark_lsn + 1`) and after the last record in
/// `journal::reader::scan_segment` (`next_lsn = rh.lsn + 1`).
#[test]

fn inspect_survives_extreme_lsns() {
    let (_tmp, site, _sealed) = site_with_sealed_segment();
    let wm = site.join("machines/vm1/journal/watermark");
    fs::write(
        &wm,
        Watermark {
            lsn: u64::MAX,
            segment_seq: 0,
        }
        .encode(),
    )
    .expect("write");
    // `replog` asserts the exit code is 0 or 1.
    let _ = replog([Path::new("inspect"), &site]);
    let _ = replog([Path::new("inspect"), &site.join("machines/vm1/journal")]);
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `accept-loss` names a replica: a hostile or unknown name, or a site that holds no
/// replica of it, is refused with a clear message, and nothing changes (no job either).
#[test]
fn accept_loss_refuses_bad_and_unknown_machines_and_changes_nothing() {
    let (_tmp, site) = site_with_disk();
    let before = snapshot(&site);
    for name in ["../x", "vm1/..", "a b", "", "-rf", "vm9", "vm1"] {
        let (code, stdout, stderr) = replog([
            "accept-loss".as_ref(),
            site.as_os_str(),
            "--".as_ref(),
            name.as_ref(),
        ]);
        assert_eq!(
            code, 1,
            "{name:?} accepted\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert!(
            stderr.contains("invalid") || stderr.contains("no replica"),
            "{name:?}: unclear message: {stderr}"
        );
        assert_same(&before, &snapshot(&site), &format!("accept-loss {name:?}"));
    }
}
