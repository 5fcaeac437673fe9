//! Reprotect and failback through real serves, real TLS on 127.0.0.1 and real FUSE
//! mounts at both sites: an unplanned failover that leaves a tail at the old primary
//! and writes at the new one, the reprotect that sends only the blocks that differ
//! and keeps the tail as an orphan point, a planned failback, the reprotect back,
//! and every refused target.

mod common;

use common::serve::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: u64 = 64 * MIB;

fn out(cmd: &mut std::process::Command) -> Output {
    cmd.output().expect("run replog")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cmd: &mut std::process::Command, what: &str) -> String {
    let o = out(cmd);
    assert!(o.status.success(), "{what}: {}", text(&o));
    text(&o)
}

/// Random 4 KiB blocks (distinct, seeded) written through `img`, each with its own
/// pattern; returns the blocks.
fn scatter(img: &Path, seed: u64, count: usize, model: &mut [u8]) -> BTreeSet<u64> {
    let mut blocks = BTreeSet::new();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while blocks.len() < count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        blocks.insert(x % (DISK / BLOCK));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    for (i, b) in blocks.iter().enumerate() {
        let data = common::pattern(seed * 100_000 + i as u64, BLOCK as usize);
        std::os::unix::fs::FileExt::write_all_at(&f, &data, b * BLOCK).expect("write");
        let at = (b * BLOCK) as usize;
        model[at..at + BLOCK as usize].copy_from_slice(&data);
    }
    f.sync_all().expect("fsync");
    blocks
}

fn restore_to(site: &Path, point: &str, out_dir: &Path) -> Vec<u8> {
    ok(
        replog()
            .arg("restore")
            .arg(site)
            .arg("vm1")
            .args(["--at", point, "--out"])
            .arg(out_dir),
        "restore",
    );
    let img = out_dir.join("os.img");
    let data = read_all(&img);
    std::fs::remove_dir_all(out_dir).expect("clean");
    data
}

fn points(site: &Path) -> serde_json::Value {
    let o = ok(
        replog().arg("points").arg(site).arg("vm1").arg("--json"),
        "points",
    );
    serde_json::from_str(o.lines().next().unwrap_or("")).expect("points json")
}

fn job_detail(o: &str, step: &str) -> String {
    o.lines()
        .find(|l| l.starts_with(&format!("{step}:")))
        .unwrap_or_else(|| panic!("no step {step} in:\n{o}"))
        .to_string()
}

/// The number after `word` in `line` ("123 bytes" → 123).
fn number_before(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no {word} in {line}"));
    words[i - 1].parse().unwrap_or_else(|_| panic!("{line}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Sites {
    tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    addr_a: String,
    addr_b: String,
}

fn sites() -> Sites {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, addr_b) = two_sites(tmp.path(), "64M");
    fast_replication(&b);
    let addr_a = format!("127.0.0.1:{}", free_port());
    Sites {
        a,
        b,
        addr_a,
        addr_b,
        tmp,
    }
}

impl Sites {
    fn mnt(&self, s: &str) -> PathBuf {
        self.tmp.path().join(format!("{s}-mnt"))
    }
    fn serve_a(&self) -> Served {
        Served::start(&self.a, &self.mnt("a"), &["--listen", &self.addr_a])
    }
    fn serve_b(&self) -> Served {
        Served::start(&self.b, &self.mnt("b"), &["--listen", &self.addr_b])
    }
}

#[test]
fn reprotect_after_an_unplanned_failover_sends_only_what_differs_keeps_the_tail_and_fails_back() {
    if !fuse_available("reprotect_after_an_unplanned_failover") {
        return;
    }
    let s = sites();
    let mut sb = Some(s.serve_b());
    let sa = s.serve_a();
    protect_when_listening(&s.a, &s.addr_b);
    wait_shipped(&s.a);
    let img_a = sa.disk("os");
    let mut model_a = vec![0u8; DISK as usize];
    // W1, a point P, W2 (shipped, after P: the old primary's writes the point does
    // not take), W3 (never shipped: the target is down).
    scatter(&img_a, 1, 2000, &mut model_a);
    let cp = ok(
        replog()
            .arg("checkpoint")
            .arg(&s.a)
            .arg("vm1")
            .arg("--json"),
        "checkpoint",
    );
    let p: serde_json::Value = serde_json::from_str(cp.trim()).expect("checkpoint json");
    let p = p["id"].as_str().expect("id").to_string();
    let model_p = model_a.clone();
    let w2 = scatter(&img_a, 2, 300, &mut model_a);
    wait_shipped(&s.a);
    sb.take().expect("b").kill();
    let w3 = scatter(&img_a, 3, 300, &mut model_a);
    assert!(read_all(&img_a) == model_a);
    sa.kill();

    // Unplanned failover at P, commit; the new primary writes W4.
    let sb = s.serve_b();
    ok(
        replog()
            .arg("failover")
            .arg(&s.b)
            .arg("vm1")
            .args(["--at", &p]),
        "failover",
    );
    ok(replog().arg("commit").arg(&s.b).arg("vm1"), "commit");
    let img_b = sb.disk("os");
    assert!(read_all(&img_b) == model_p, "the promoted disk is not P");
    let mut model_b = model_p.clone();
    let w4 = scatter(&img_b, 4, 300, &mut model_b);

    // The old primary comes back (listening) and learns it is fenced.
    let sa = s.serve_a();
    wait_until("the old primary is fenced", || {
        status(&s.a)["machines"][0]["state"] == "failed-over"
    });
    // Refused targets first: the site itself, then a site that does not trust us.
    let me = out(replog()
        .arg("reprotect")
        .arg(&s.b)
        .arg("vm1")
        .args(["--target", &s.addr_b]));
    assert_eq!(me.status.code(), Some(1), "{}", text(&me));
    assert!(text(&me).contains("is this site"), "{}", text(&me));

    // Reprotect toward the old primary.
    let o = ok(
        replog().arg("reprotect").arg(&s.b).arg("vm1").args([
            "--target",
            &s.addr_a,
            "--retention",
            "1h",
            "--rpo",
            "10m",
            "--bandwidth",
            "1GiB/s",
        ]),
        "reprotect",
    );
    // The settings given are the reprotected machine's relationship.
    let rel = replog::replication::relationship::Relationship::load(&s.b, "vm1")
        .expect("relationship")
        .expect("protected");
    assert_eq!(
        (rel.rpo.as_deref(), rel.bandwidth.as_deref()),
        (Some("10m"), Some("1GiB/s"))
    );
    let differ: BTreeSet<u64> = w2.union(&w3).chain(w4.iter()).copied().collect();
    let sent = number_before(&job_detail(&o, "delta"), "bytes");
    assert!(
        sent <= differ.len() as u64 * BLOCK && sent >= w4.len() as u64 * BLOCK,
        "sent {sent} bytes for {} differing blocks:\n{o}",
        differ.len()
    );
    assert!(job_detail(&o, "orphan kept").contains("orphan-g1-"), "{o}");
    assert!(o.contains("reprotected"), "{o}");
    // The original's disks now follow the new primary at every later point.
    wait_shipped(&s.b);
    let r = s.tmp.path().join("r");
    assert!(
        restore_to(&s.a, "latest", &r) == model_b,
        "replica != new primary"
    );
    let w5 = scatter(&img_b, 5, 200, &mut model_b);
    wait_shipped(&s.b);
    assert!(
        restore_to(&s.a, "latest", &r) == model_b,
        "replica != new primary after more writes"
    );
    // The orphan point is the old primary's last state, listed, restorable.
    let pts = points(&s.a);
    let orphan = pts["points"]
        .as_array()
        .expect("points")
        .iter()
        .find(|p| p["kind"] == "orphan")
        .unwrap_or_else(|| panic!("no orphan point: {pts}"));
    let oid = orphan["id"].as_str().expect("id").to_string();
    assert!(
        restore_to(&s.a, &oid, &r) == model_a,
        "orphan != old primary's last state"
    );
    // ... and browsable through the mount without a restore, read-only.
    let browse = |what: &str| {
        let dir = sa.mount.join("vm1").join("points");
        let listed: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{what}: {}: {e}", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(listed.contains(&oid), "{what}: {listed:?}");
        let img = dir.join(&oid).join("os.img");
        assert!(
            read_all(&img) == model_a,
            "{what}: browsed orphan != old primary"
        );
        let w = std::fs::OpenOptions::new().write(true).open(&img);
        assert_eq!(
            w.err().and_then(|e| e.raw_os_error()),
            Some(libc::EROFS),
            "{what}: orphan point opened for writing"
        );
    };
    browse("beside the replica");
    // Only orphans are removed by --remove.
    let bad = out(replog()
        .arg("points")
        .arg(&s.a)
        .arg("vm1")
        .args(["--remove", "latest"]));
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));

    // Failback: planned failover back to the original, commit there, reprotect back.
    ok(
        replog()
            .arg("failover")
            .arg(&s.b)
            .arg("vm1")
            .arg("--planned"),
        "planned failback",
    );
    ok(
        replog().arg("commit").arg(&s.a).arg("vm1"),
        "commit at the original",
    );
    let img_a = sa.disk("os");
    let now_a = read_all(&img_a);
    assert!(now_a == model_b, "the failback lost or kept something");
    browse("beside the promoted machine");
    // None of the rolled-back tail (W3) survives where the new primary did not write.
    for b in w3.difference(&w4.union(&w5).copied().collect()) {
        let at = (*b * BLOCK) as usize;
        assert!(
            now_a[at..at + BLOCK as usize] == model_p[at..at + BLOCK as usize],
            "block {b} of the old tail survived"
        );
    }
    let mut model = model_b.clone();
    let w6 = scatter(&img_a, 6, 100, &mut model);
    let o = ok(
        replog()
            .arg("reprotect")
            .arg(&s.a)
            .arg("vm1")
            .args(["--target", &s.addr_b]),
        "reprotect back",
    );
    let sent = number_before(&job_detail(&o, "delta"), "bytes");
    assert!(
        sent <= w6.len() as u64 * BLOCK,
        "sent {sent} for {} blocks:\n{o}",
        w6.len()
    );
    assert!(job_detail(&o, "orphan kept").contains("none"), "{o}");
    wait_shipped(&s.a);
    assert!(
        restore_to(&s.b, "latest", &r) == model,
        "back replica != original"
    );
    // Removing the orphan point.
    ok(
        replog()
            .arg("points")
            .arg(&s.a)
            .arg("vm1")
            .args(["--remove", &oid]),
        "remove orphan",
    );
    sa.stop();
    sb.stop();
}

/// An ext4 file system on `img` (through a loop device): e2fsck clean, every file of
/// `sums` intact, then one more file written (`stage.txt`) and its sum added.
fn ext4_stage(img: &Path, dir: &Path, sums: &Path, stage: &str) {
    let lo = Loop::attach(img);
    let fsck = sh("e2fsck", &["-fn", &lo.0]);
    assert!(fsck.status.success(), "{stage}: e2fsck: {}", text(&fsck));
    {
        let _m = FsMount::mount(&lo.0, dir, "rw");
        if sums.exists() {
            let check = std::process::Command::new("sha256sum")
                .args(["--quiet", "-c"])
                .arg(sums)
                .current_dir(dir)
                .output()
                .expect("sha256sum");
            assert!(check.status.success(), "{stage}: files: {}", text(&check));
        }
        let name = format!("{stage}.bin");
        std::fs::write(
            dir.join(&name),
            common::pattern(stage.len() as u64 * 7, 3 << 20),
        )
        .expect("write a file");
        let sum = std::process::Command::new("sha256sum")
            .arg(&name)
            .current_dir(dir)
            .output()
            .expect("sha256sum");
        let mut all = std::fs::read_to_string(sums).unwrap_or_default();
        all.push_str(&String::from_utf8_lossy(&sum.stdout));
        std::fs::write(sums, all).expect("sums");
        assert!(sh("sync", &[]).status.success());
    }
    let fsck = sh("e2fsck", &["-fn", &lo.0]);
    assert!(
        fsck.status.success(),
        "{stage}: e2fsck after: {}",
        text(&fsck)
    );
}

#[test]
fn the_planned_four_stage_cycle_keeps_ext4_intact_through_the_mounts() {
    if !fuse_available("the_planned_four_stage_cycle") {
        return;
    }
    let s = sites();
    let sb = s.serve_b();
    let sa = s.serve_a();
    let (dir, sums) = (s.tmp.path().join("fs"), s.tmp.path().join("sums"));
    std::fs::create_dir_all(&dir).expect("dir");
    let mkfs = sh(
        "mkfs.ext4",
        &["-q", "-F", sa.disk("os").to_str().expect("path")],
    );
    assert!(mkfs.status.success(), "mkfs: {}", text(&mkfs));
    ext4_stage(&sa.disk("os"), &dir, &sums, "start");
    protect_when_listening(&s.a, &s.addr_b);
    wait_shipped(&s.a);
    // 1. fail over (planned) to B, commit; 2. reprotect B → A: delta only.
    let stage = |from: &Path, to: &Path, img: &Path, back: &str, label: &str| {
        ok(
            replog()
                .arg("failover")
                .arg(from)
                .arg("vm1")
                .arg("--planned"),
            &format!("failover to {label}"),
        );
        ok(replog().arg("commit").arg(to).arg("vm1"), "commit");
        ext4_stage(img, &dir, &sums, &format!("at-{label}"));
        let o = ok(
            replog()
                .arg("reprotect")
                .arg(to)
                .arg("vm1")
                .args(["--target", back]),
            "reprotect",
        );
        let sent = number_before(&job_detail(&o, "delta"), "bytes");
        assert!(
            sent < 16 * MIB,
            "a delta of {sent} bytes for one file:\n{o}"
        );
        ext4_stage(img, &dir, &sums, &format!("reprotected-from-{label}"));
    };
    stage(&s.a, &s.b, &sb.disk("os"), &s.addr_a, "b");
    wait_shipped(&s.b);
    // 3. fail back (planned), commit at A; 4. reprotect A → B.
    stage(&s.b, &s.a, &sa.disk("os"), &s.addr_b, "a");
    wait_shipped(&s.a);
    let r = s.tmp.path().join("r");
    assert!(restore_to(&s.b, "latest", &r) == read_all(&sa.disk("os")));
    sa.stop();
    sb.stop();
}

fn job_state(site: &Path) -> Option<serde_json::Value> {
    let o = out(replog().arg("jobs").arg(site).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["jobs"]
        .as_array()?
        .iter()
        .find(|j| {
            j["kind"] == "reprotect"
                && j["steps"][0]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("reach"))
        })
        .cloned()
}

/// kill -9 of `who` ("a": the old primary after seeding, "b": the new primary mid-delta),
/// then a restart: the reprotect goes on and the replica equals the new primary.
fn killed_mid_reprotect(who: &str) {
    let s = sites();
    let mut sb = Some(s.serve_b());
    let sa = s.serve_a();
    protect_when_listening(&s.a, &s.addr_b);
    wait_shipped(&s.a);
    let mut model = vec![0u8; DISK as usize];
    scatter(&sa.disk("os"), 7, 500, &mut model);
    wait_shipped(&s.a);
    sb.take().expect("b").kill();
    scatter(&sa.disk("os"), 8, 200, &mut model);
    sa.kill();
    let sb0 = s.serve_b();
    ok(replog().arg("failover").arg(&s.b).arg("vm1"), "failover");
    ok(replog().arg("commit").arg(&s.b).arg("vm1"), "commit");
    let mut model_b = read_all(&sb0.disk("os"));
    scatter(&sb0.disk("os"), 9, 1500, &mut model_b);
    let (sa, sb) = match who {
        "a" => {
            let sa = Served::start_with_env(
                &s.a,
                &s.mnt("a"),
                &["--listen", &s.addr_a],
                &[("REPLOG_FAILPOINT", "reprotect:seeded")],
            );
            (sa, sb0)
        }
        _ => {
            sb0.stop();
            let sb = Served::start_with_env(
                &s.b,
                &s.mnt("b"),
                &["--listen", &s.addr_b],
                &[("REPLOG_FAILPOINT", "reprotect:delta-sent:stall")],
            );
            (s.serve_a(), sb)
        }
    };
    ok(
        replog()
            .arg("reprotect")
            .arg(&s.b)
            .arg("vm1")
            .args(["--target", &s.addr_a, "--no-wait"]),
        "reprotect",
    );
    // The failpoint kills one side; it comes back without it.
    let (sa, sb) = if who == "a" {
        sa.wait_exit(Duration::from_secs(60));
        (s.serve_a(), sb)
    } else {
        // Stalled mid-delta: status shows what is sent and what is left; then kill -9.
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            let v = status(&s.b);
            let seen = v["machines"][0]["reprotect"].clone();
            if seen["stage"] == "delta"
                && seen["bytes_sent"].as_u64().is_some_and(|b| b > 0)
                && seen["blocks_left"].as_u64().is_some_and(|b| b > 0)
            {
                break seen;
            }
            assert!(
                Instant::now() < deadline,
                "never: status shows the delta under way: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            seen["bytes_total"].as_u64() > seen["bytes_sent"].as_u64()
                && seen["orphan"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("orphan-g1-")),
            "{seen}"
        );
        let line = text(&out(replog().arg("status").arg(&s.b)));
        assert!(
            line.contains("reprotect: delta,")
                && line.contains("blocks left")
                && line.contains("sending the blocks that differ"),
            "{line}"
        );
        sb.kill();
        (sa, s.serve_b())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job_state(&s.b).is_some_and(|j| j["state"] == "succeeded") {
        assert!(
            Instant::now() < deadline,
            "never: the reprotect succeeds; job {:?}\nlog a:\n{}\nlog b:\n{}",
            job_state(&s.b),
            sa.log_text(),
            sb.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = job_state(&s.b).expect("job");
    if who == "b" {
        assert!(job.to_string().contains("resumed by process"), "{job}");
    }
    wait_shipped(&s.b);
    let r = s.tmp.path().join("r");
    assert!(
        restore_to(&s.a, "latest", &r) == model_b,
        "replica != new primary"
    );
    sa.stop();
    sb.stop();
}

#[test]
fn kill_9_of_the_old_primary_mid_reprotect_resumes() {
    if fuse_available("kill_9_of_the_old_primary_mid_reprotect") {
        killed_mid_reprotect("a");
    }
}

#[test]
fn kill_9_of_the_new_primary_mid_reprotect_resumes() {
    if fuse_available("kill_9_of_the_new_primary_mid_reprotect") {
        killed_mid_reprotect("b");
    }
}

#[test]
fn refused_reprotects_change_nothing() {
    if !fuse_available("refused_reprotects_change_nothing") {
        return;
    }
    let s = sites();
    let mut sb = Some(s.serve_b());
    let sa = s.serve_a();
    protect_when_listening(&s.a, &s.addr_b);
    wait_shipped(&s.a);
    sa.kill();
    let refused = |site: &Path, target: &str, why: &str| {
        let o = out(replog()
            .arg("reprotect")
            .arg(site)
            .arg("vm1")
            .args(["--target", target]));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(why), "want {why:?}: {}", text(&o));
    };
    // A replica, not a machine of this site; not committed yet.
    refused(&s.b, &s.addr_a, "no machine vm1");
    ok(replog().arg("failover").arg(&s.b).arg("vm1"), "failover");
    refused(&s.b, &s.addr_a, "not committed");
    ok(replog().arg("commit").arg(&s.b).arg("vm1"), "commit");
    // The old primary is fenced: it may not reprotect what it lost.
    let sa = s.serve_a();
    wait_until("fenced", || {
        status(&s.a)["machines"][0]["state"] == "failed-over"
    });
    refused(&s.a, &s.addr_b, "failed over away");
    // The site itself; a site that does not trust this one.
    refused(&s.b, &s.addr_b, "is this site");
    let c = s.tmp.path().join("c");
    ok(replog().arg("init").arg(&c), "init c");
    let addr_c = format!("127.0.0.1:{}", free_port());
    let sc = TargetServe::start(&c, &addr_c);
    refused(&s.b, &addr_c, "trust");
    drop(sc);
    // Nothing changed: B has no relationship, A still holds its fenced machine.
    assert!(!s.b.join("machines/vm1/relationship.toml").exists());
    assert!(s.a.join("machines/vm1/machine.meta").exists());
    assert!(!s.a.join("replicas/vm1").exists());
    // A target holding a newer generation: B's machine made newer at A by hand
    // (generation 5), B at 2 → split brain refused.
    sa.stop();
    let dir = s.a.join("machines/vm1");
    let mut m =
        replog::Machine::read_manifest(&replog::storage::FileStorage, &dir).expect("manifest");
    m.generation = 5;
    replog::storage::write_atomic(
        &replog::storage::FileStorage,
        &dir.join("machine.meta"),
        &m.encode(),
    )
    .expect("write");
    let sa = s.serve_a();
    refused(&s.b, &s.addr_a, "split brain");
    assert!(!s.a.join("replicas/vm1").exists());
    sa.stop();
    sb.take().expect("b").stop();
}
