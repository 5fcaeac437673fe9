//! Recovery points through the real kernel: the target's read-only FUSE views
//! (`MOUNT/<machine>/points/<point>/<disk>.img`) equal the source at every point, and
//! ext4 on a replicated disk, written with fsyncs and checkpointed with FIFREEZE, comes
//! back at 20 random points, each clean under e2fsck with every file fsynced before
//! the point intact.

mod common;

use common::pair::trusted_pair;
use common::serve::*;
use replog::replication::shipper::Shipper;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn points_json(site: &Path) -> serde_json::Value {
    let out = run_ok(replog().arg("points").arg(site).arg("vm1").arg("--json"));
    serde_json::from_str(out.trim()).expect("points json")
}

#[test]
fn point_views_match_the_source_and_are_read_only() {
    if !fuse_available("point_views_match_the_source_and_are_read_only") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    common::pair::replog(&["disk", "create", "vm1/os", "--size", "4M"], &a);
    common::pair::replog(&["disk", "create", "vm1/data", "--size", "1M"], &a);
    let addr = format!("127.0.0.1:{}", free_port());
    let target = Served::start(&b, &tmp.path().join("mnt"), &["--listen", &addr]);
    let site = replog::Site::open(&a).expect("source");
    let m = site.open_machine("vm1").expect("machine");
    let mut shipper = Shipper::new(&a, &m, &addr);
    shipper.ship_once(&m).expect("initial replication");

    let sizes = [4usize << 20, 1 << 20];
    let mut model = vec![vec![0u8; sizes[0]], vec![0u8; sizes[1]]];
    let mut states = Vec::new();
    for i in 0..24u64 {
        let d = (i % 2) as usize;
        let vol = m.volume(["os", "data"][d]).expect("vol");
        let len = 1000 + (i * 7919 % 90_000) as usize;
        let off = (i * 104_729) as usize % (sizes[d] - len);
        let data = common::pattern(i + 1, len);
        vol.write(off as u64, &data).expect("write");
        model[d][off..off + len].copy_from_slice(&data);
        if i % 5 == 4 {
            vol.write_zeroes(off as u64 / 2, 5000).expect("zero");
            model[d][off / 2..off / 2 + 5000].fill(0);
        }
        let lsn = if i % 3 == 0 {
            m.checkpoint().expect("checkpoint").lsn
        } else {
            m.flush().expect("flush")
        };
        states.push((lsn, model.clone()));
        if i % 4 == 3 {
            m.seal().expect("seal");
        }
    }
    m.seal().expect("seal");
    shipper.ship_once(&m).expect("ship");

    let points_dir = target.mount.join("vm1").join("points");
    let listed: Vec<String> = std::fs::read_dir(&points_dir)
        .expect("list points")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    for (lsn, want) in &states {
        let dir = points_dir.join(format!("pt-{lsn}"));
        assert!(listed.contains(&format!("pt-{lsn}")), "pt-{lsn} not listed");
        for (d, name) in ["os", "data"].iter().enumerate() {
            let p = dir.join(format!("{name}.img"));
            assert_eq!(std::fs::metadata(&p).expect("stat").len(), sizes[d] as u64);
            let got = std::fs::read(&p).expect("read point view");
            assert!(
                got == want[d],
                "view of {name} at pt-{lsn} differs from the source"
            );
        }
    }
    // Read-only, and strangers are not there.
    let (lsn, _) = states[3];
    let img = points_dir.join(format!("pt-{lsn}")).join("os.img");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect_err("opened a point for writing");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let f = std::fs::File::open(&img).expect("open ro");
    assert!(f.set_len(0).is_err(), "truncated a point");
    drop(f);
    for missing in ["pt-999999", "latest", "../../etc"] {
        assert!(!points_dir.join(missing).exists(), "{missing} exists");
    }
    assert!(!points_dir
        .join(format!("pt-{lsn}"))
        .join("swap.img")
        .exists());
    // The same list as `replog points --json`, which works while serve runs.
    let doc = points_json(&b);
    assert_eq!(doc["points"].as_array().map(Vec::len), Some(listed.len()));
    drop(m);
    assert!(target.stop().success());
}

/// One file written into the ext4: its name, contents and the time its fsync returned.
struct Written {
    name: String,
    data: Vec<u8>,
    synced_ns: u64,
}

#[test]
fn ext4_comes_back_clean_at_twenty_random_points() {
    if !fuse_available("ext4_comes_back_clean_at_twenty_random_points") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    fast_replication(&a);
    common::pair::replog(&["disk", "create", "vm1/os", "--size", "48M"], &a);
    let addr = format!("127.0.0.1:{}", free_port());
    let target = Served::start(&b, &tmp.path().join("mnt-b"), &["--listen", &addr]);
    let source = Served::start(&a, &tmp.path().join("mnt-a"), &[]);
    let disk = source.disk("os");
    let out = sh("mkfs.ext4", &["-F", "-q", disk.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "mkfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = Loop::attach(&disk);
    let fs_dir = tmp.path().join("fs");
    let mnt = FsMount::mount(&lo.0, &fs_dir, "rw");
    let mut written: Vec<Written> = Vec::new();
    let write_files = |from: usize, to: usize, written: &mut Vec<Written>| {
        for i in from..to {
            let name = format!("f{i:03}");
            let data = common::pattern(1000 + i as u64, 20_000 + (i * 7_777) % 300_000);
            let mut f = std::fs::File::create(fs_dir.join(&name)).expect("create");
            f.write_all(&data).expect("write");
            f.sync_all().expect("fsync");
            if i % 4 == 0 {
                std::fs::File::open(&fs_dir)
                    .and_then(|d| d.sync_all())
                    .expect("fsync dir");
            }
            written.push(Written {
                name,
                data,
                synced_ns: replog::format::now_ns(),
            });
            std::thread::sleep(Duration::from_millis(40));
        }
    };
    write_files(0, 8, &mut written);
    protect_when_listening(&a, &addr);
    // Files go on during initial replication and after it.
    write_files(8, 24, &mut written);
    // An app-consistent checkpoint with the file system frozen around it.
    let doc: serde_json::Value = serde_json::from_str(
        run_ok(
            replog()
                .arg("checkpoint")
                .arg(&a)
                .arg("vm1")
                .arg("--app-consistent")
                .arg("--freeze")
                .arg(&fs_dir)
                .arg("--json"),
        )
        .trim(),
    )
    .expect("checkpoint json");
    let frozen_id = doc["id"].as_str().expect("id").to_string();
    let frozen_files = written.len();
    write_files(24, 36, &mut written);
    // A crash-consistent point after the last fsync; wait until the target has it.
    let last: serde_json::Value = serde_json::from_str(
        run_ok(replog().arg("checkpoint").arg(&a).arg("vm1").arg("--json")).trim(),
    )
    .expect("checkpoint json");
    assert_eq!(last["kind"], "crash-consistent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let points = loop {
        let doc = points_json(&b);
        let pts = doc["points"].as_array().cloned().unwrap_or_default();
        if pts.iter().any(|p| p["id"] == last["id"]) {
            break pts;
        }
        assert!(
            Instant::now() < deadline,
            "the target never caught up: {doc}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        points.iter().all(|p| p["digests"] == true),
        "a point without digests reached the target"
    );
    drop(mnt);
    drop(lo);
    assert!(source.stop().success());
    let frozen = points
        .iter()
        .find(|p| p["id"] == frozen_id.as_str())
        .expect("the checkpoint is a point");
    assert_eq!(frozen["kind"], "app-consistent");

    // 20 points, the checkpoint among them, chosen at random (deterministically).
    let mut chosen = vec![frozen.clone()];
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    while chosen.len() < 20.min(points.len()) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let p = &points[(s % points.len() as u64) as usize];
        if !chosen.iter().any(|c| c["id"] == p["id"]) {
            chosen.push(p.clone());
        }
    }
    assert!(chosen.len() >= 20, "only {} points", points.len());
    for p in &chosen {
        let id = p["id"].as_str().expect("id");
        let time_ns = humantime::parse_rfc3339(p["time"].as_str().expect("time"))
            .expect("rfc3339")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_nanos() as u64;
        let out_dir = tmp.path().join(format!("r-{id}"));
        let doc: serde_json::Value = serde_json::from_str(
            run_ok(
                replog()
                    .arg("restore")
                    .arg(&b)
                    .arg("vm1")
                    .args(["--at", id, "--out"])
                    .arg(&out_dir)
                    .arg("--json"),
            )
            .trim(),
        )
        .expect("restore json");
        assert_eq!(doc["verified"], true, "{id}: {doc}");
        let img = out_dir.join("os.img");
        let img_s = img.to_str().expect("path");
        // What a mount would do first: replay the ext4 journal. Then a full check.
        let replay = sh("e2fsck", &["-fy", "-E", "journal_only", img_s]);
        assert!(
            replay.status.code().unwrap_or(8) <= 1,
            "{id}: journal replay: {}",
            String::from_utf8_lossy(&replay.stdout)
        );
        let check = sh("e2fsck", &["-fn", img_s]);
        assert!(
            check.status.success(),
            "{id}: e2fsck -fn:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // Every file fsynced before the point's time is intact.
        for w in written.iter().filter(|w| w.synced_ns <= time_ns) {
            let dumped = tmp.path().join("dump");
            let _ = std::fs::remove_file(&dumped);
            let cmd = format!("dump /{} {}", w.name, dumped.display());
            let out = sh("debugfs", &["-R", &cmd, img_s]);
            let got = std::fs::read(&dumped).unwrap_or_else(|_| {
                panic!(
                    "{id}: {} (fsynced before the point) missing: {}",
                    w.name,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            assert!(got == w.data, "{id}: {} differs", w.name);
        }
        std::fs::remove_dir_all(&out_dir).expect("clean");
    }

    // The checkpoint browsed without a restore: loop-mounted read-only from the view.
    let view = target
        .mount
        .join("vm1")
        .join("points")
        .join(&frozen_id)
        .join("os.img");
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&view)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "losetup -r: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ro = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let view_dir = tmp.path().join("view");
    let m = FsMount::mount(&ro.0, &view_dir, "ro,noload");
    for w in &written[..frozen_files] {
        let got = std::fs::read(view_dir.join(&w.name)).expect("file in the view");
        assert!(got == w.data, "{} differs in the checkpoint view", w.name);
    }
    for w in &written[frozen_files..] {
        assert!(
            !view_dir.join(&w.name).exists(),
            "{} was written after the checkpoint but is in it",
            w.name
        );
    }
    let mut buf = [0u8; 4096];
    std::fs::File::open(&view)
        .expect("open view")
        .read_exact_at(&mut buf, 1024)
        .expect("read view");
    drop(m);
    drop(ro);
    assert!(target.stop().success());
}
