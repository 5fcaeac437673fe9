//! Running `replog serve` as a child process for FUSE tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// True when FUSE tests can run here. With REPLOG_REQUIRE_FUSE=1 (set by .ci/run) a
/// missing /dev/fuse, loop device support or root is a failure, not a skip.
pub fn fuse_available(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("/dev/loop-control");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: needs {} for the real FUSE mount",
        missing.join(", ")
    );
    if std::env::var_os("REPLOG_REQUIRE_FUSE").is_some() {
        panic!("{msg} (REPLOG_REQUIRE_FUSE is set, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// The first of `paths` that exists: a program a test needs (systemd-analyze,
/// script). Missing, it is a skip that says so — and a failure where
/// REPLOG_REQUIRE_FUSE is set (CI, whose tools/test installs them).
pub fn tool(test: &str, paths: &[&str]) -> Option<PathBuf> {
    if let Some(p) = paths.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(p);
    }
    let msg = format!("{test}: needs {}", paths.join(" or "));
    if std::env::var_os("REPLOG_REQUIRE_FUSE").is_some() {
        panic!("{msg} (REPLOG_REQUIRE_FUSE is set, so this fails instead of skipping)");
    }
    eprintln!("SKIPPED {msg}");
    None
}

pub fn replog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_replog"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run replog");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `replog accept-loss DST vm1 --yes --json`: checks that the ranges were given up,
/// the first from byte 0, and that `replog jobs` shows the job it names (an
/// `accept-loss` job that says what was given up). Returns the reply.
pub fn accept_loss_yes(dst: &Path) -> serde_json::Value {
    let done = run_ok(
        replog()
            .arg("accept-loss")
            .arg(dst)
            .arg("vm1")
            .args(["--yes", "--json"]),
    );
    let done: serde_json::Value = serde_json::from_str(done.trim()).expect("json");
    assert_eq!(done["given_up"], true, "{done}");
    assert_eq!(done["ranges"][0]["start"], 0, "{done}");
    let job = done["job"].as_str().expect("job");
    let shown = run_ok(replog().arg("jobs").arg(dst).arg(job));
    assert!(
        shown.contains("accept-loss") && shown.contains("bytes given up"),
        "{shown}"
    );
    done
}

/// Flip a bit 100 bytes into the first copy of `data` (its first 64 bytes, found in
/// the segment files) in the journal of machine vm1 at `site`: the source's copy rots.
/// Returns how many segments held a copy (each is flipped).
pub fn rot_in_journal(site: &Path, data: &[u8]) -> usize {
    let journal = site.join("machines/vm1/journal");
    let mut flipped = 0;
    for e in std::fs::read_dir(&journal).expect("journal") {
        let path = e.expect("entry").path();
        let mut seg = std::fs::read(&path).expect("segment");
        if let Some(i) = seg.windows(64).position(|w| w == &data[..64]) {
            seg[i + 100] ^= 0x10;
            std::fs::write(&path, &seg).expect("flip");
            flipped += 1;
        }
    }
    flipped
}

/// A site with machine vm1 and the given disks (name, size).
pub fn make_site(root: &Path, disks: &[(&str, &str)]) -> PathBuf {
    let site = root.join("site");
    run_ok(replog().arg("init").arg(&site));
    for (name, size) in disks {
        run_ok(
            replog()
                .args(["disk", "create"])
                .arg(&site)
                .arg(format!("vm1/{name}"))
                .args(["--size", size]),
        );
    }
    site
}

/// A running `replog serve --mount`.
pub struct Served {
    pub child: Option<Child>,
    pub mount: PathBuf,
    pub log: PathBuf,
    leave_mount: bool,
}

impl Served {
    pub fn start(site: &Path, mount: &Path, extra: &[&str]) -> Served {
        Served::start_with_env(site, mount, extra, &[])
    }

    /// `start`, with environment variables (a failpoint) set for serve.
    pub fn start_with_env(
        site: &Path,
        mount: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let log = site.with_extension(format!("serve-{}.log", std::process::id()));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = replog()
            .arg("serve")
            .arg(site)
            .arg("--mount")
            .arg(mount)
            .args(extra)
            .env("REPLOG_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn serve");
        let s = Served {
            child: Some(child),
            mount: mount.to_path_buf(),
            log,
            leave_mount: false,
        };
        s.wait_mounted();
        s
    }

    /// The serve process's ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn wait_mounted(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // A dead mount left by a killed serve is listed too, but stat fails on it.
        while !replog::frontend::is_live_replog_mount(&self.mount) {
            assert!(
                Instant::now() < deadline,
                "serve did not mount; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.mount.join("vm1").join(format!("{name}.img"))
    }

    /// SIGTERM and wait: the clean stop.
    pub fn stop(mut self) -> ExitStatus {
        let child = self.child.take().expect("running");
        signal_and_wait(child, libc::SIGTERM)
    }

    /// Wait (at most `timeout`) for serve to end on its own (a failpoint killed it);
    /// its dead mount stays behind, as it would.
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        self.leave_mount = true;
        exited_within(&mut child, timeout).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("serve did not end; log:\n{}", self.log_text());
        })
    }

    /// SIGKILL: the crash. The dead mount stays behind, as it would.
    pub fn kill(mut self) {
        let child = self.child.take().expect("running");
        signal_and_wait(child, libc::SIGKILL);
        self.leave_mount = true;
    }
}

fn signal_and_wait(mut child: Child, sig: i32) -> ExitStatus {
    // SAFETY: kill with a pid we spawned and a valid signal number.
    unsafe { libc::kill(child.id() as i32, sig) };
    exited_within(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("serve did not exit after signal {sig}");
    })
}

/// The exit status of `child` if it ends within `timeout`.
pub fn exited_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            signal_and_wait(c, libc::SIGKILL);
        }
        if !self.leave_mount {
            let _ = replog::frontend::detach(&self.mount);
        }
    }
}

/// A loop device over `file`, detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mounted file system, unmounted on drop.
pub struct FsMount(pub PathBuf);

impl FsMount {
    pub fn mount(dev: &str, dir: &Path, opts: &str) -> FsMount {
        std::fs::create_dir_all(dir).expect("mkdir");
        let st = Command::new("mount")
            .args(["-o", opts, dev])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount {dev} on {}", dir.display());
        FsMount(dir.to_path_buf())
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

pub fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    replog::testkit::free_port()
}

/// Seal every 200 ms and retry quickly, for tests.
pub fn fast_replication(site: &Path) {
    edit_config(site, |cfg| {
        cfg.replication.seal_interval_ms = 200;
        cfg.replication.retry_schedule_ms = vec![100, 200, 400];
        cfg.replication.retry_then_ms = 500;
    });
}

/// Change a site's site.toml.
pub fn edit_config(site: &Path, f: impl FnOnce(&mut replog::config::SiteConfig)) {
    let p = site.join("site.toml");
    let text = std::fs::read_to_string(&p).expect("cfg");
    let mut cfg = replog::config::SiteConfig::from_toml(&p, &text).expect("parse cfg");
    f(&mut cfg);
    std::fs::write(&p, cfg.to_toml()).expect("write cfg");
}

/// `replog status SITE --json`.
pub fn status(site: &Path) -> serde_json::Value {
    let out = replog()
        .arg("status")
        .arg(site)
        .arg("--json")
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// A status written after now (a running serve rewrites it every quarter second).
pub fn fresh_status(site: &Path) -> serde_json::Value {
    let since = replog::format::now_ns();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status(site);
        if st["as_of_ns"].as_u64().unwrap_or(0) > since || Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a status taken after now in which machine 0 satisfies `ok`.
pub fn wait_for(
    src: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let since = replog::format::now_ns();
    loop {
        let st = status(src);
        if st["as_of_ns"].as_u64().unwrap_or(0) > since && ok(&st["machines"][0]) {
            return st;
        }
        assert!(Instant::now() < deadline, "never {what}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until machine 0 of `src` is Critical; its reason.
pub fn critical_reason(src: &Path) -> String {
    let st = wait_for(src, "critical", |m| m["health"] == "critical");
    st["machines"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A target: `replog serve DST --listen ADDR`, listening when `start` returns; SIGTERM
/// (a clean stop) when dropped.
pub struct TargetServe(Option<std::process::Child>);

impl TargetServe {
    /// `replog serve DST --listen ADDR`, its log appended to `DST.target-<pid>.log`
    /// ([`TargetServe::log_text`]).
    pub fn start(dst: &Path, addr: &str) -> TargetServe {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Self::log(dst))
            .expect("log");
        let t = TargetServe(Some(
            replog()
                .arg("serve")
                .arg(dst)
                .args(["--listen", addr])
                .env("REPLOG_LOG", "info")
                .stderr(logf)
                .spawn()
                .expect("target serve"),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "target never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }

    fn log(dst: &Path) -> PathBuf {
        dst.with_extension(format!("target-{}.log", std::process::id()))
    }

    /// What the target serves of `dst` logged so far.
    pub fn log_text(dst: &Path) -> String {
        std::fs::read_to_string(Self::log(dst)).unwrap_or_default()
    }

    /// kill -9: the crash.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TargetServe {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signal to a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Two sites under `root`, `src` (fast replication) and `dst`, that trust each other.
pub fn trusted_sites(root: &Path) -> (PathBuf, PathBuf) {
    let (src, dst) = (root.join("src"), root.join("dst"));
    run_ok(replog().arg("init").arg(&src));
    run_ok(replog().arg("init").arg(&dst));
    fast_replication(&src);
    trust_each_other(&src, &dst);
    (src, dst)
}

/// `replog trust` both ways between two sites.
pub fn trust_each_other(a: &Path, b: &Path) {
    let id_a = run_ok(replog().arg("id").arg(a)).trim().to_string();
    let id_b = run_ok(replog().arg("id").arg(b)).trim().to_string();
    run_ok(replog().arg("trust").arg(a).arg(&id_b));
    run_ok(replog().arg("trust").arg(b).arg(&id_a));
}

/// Two sites under `root` that trust each other: `src` (fast replication) with
/// machine vm1 and one disk `os` of `size`, and `dst`; returns (src, dst, an address
/// for dst to listen on).
pub fn two_sites(root: &Path, size: &str) -> (PathBuf, PathBuf, String) {
    let (src, dst) = trusted_sites(root);
    run_ok(
        replog()
            .args(["disk", "create"])
            .arg(&src)
            .args(["vm1/os", "--size", size]),
    );
    (src, dst, format!("127.0.0.1:{}", free_port()))
}

/// `replog protect SRC vm1 --target ADDR`, again until the target answers (it may
/// take a moment to listen).
pub fn protect_when_listening(src: &Path, addr: &str) {
    protect_when_listening_with(src, addr, &[]);
}

/// `protect_when_listening` with more options (`--retention 2s`, say).
/// `replog protect SRC vm1 --target ADDR`, once (the target listens already).
pub fn protect_vm1(src: &Path, addr: &str) {
    run_ok(
        replog()
            .arg("protect")
            .arg(src)
            .arg("vm1")
            .args(["--target", addr]),
    );
}

/// Disk `name` of vm1 under a running serve's mount, open for reading and writing.
pub fn open_disk(served: &Served, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(served.disk(name))
        .unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// Write `len` bytes of pattern `seed` at `off` into `f`, then fsync it.
pub fn write_synced(f: &std::fs::File, seed: u64, len: usize, off: u64) {
    std::os::unix::fs::FileExt::write_all_at(f, &super::pattern(seed, len), off).expect("write");
    f.sync_all().expect("fsync");
}

/// Wait until machine 0 of `src` is protected with nothing left to ship.
pub fn wait_caught_up(src: &Path, what: &str) -> serde_json::Value {
    wait_for(src, what, |m| {
        m["state"] == "protected" && m["lag_seconds"] == 0.0
    })
}

pub fn protect_when_listening_with(src: &Path, addr: &str, extra: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = replog()
            .arg("protect")
            .arg(src)
            .arg("vm1")
            .args(["--target", addr])
            .args(extra)
            .output()
            .expect("protect");
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "protect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn write_at(img: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("open {}: {e}", img.display()));
    f.write_all_at(data, off).expect("write");
    f.sync_all().expect("fsync");
}

pub fn read_all(img: &Path) -> Vec<u8> {
    std::fs::read(img).unwrap_or_else(|e| panic!("read {}: {e}", img.display()))
}

/// Wait until the source's target has acknowledged everything written so far.
pub fn wait_shipped(src: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let since = replog::format::now_ns();
    loop {
        let st = status(src);
        let m = &st["machines"][0];
        let (acked, last) = (m["acked_lsn"].as_u64(), m["last_lsn"].as_u64());
        let fresh = st["as_of_ns"].as_u64().unwrap_or(0) > since;
        if fresh && m["state"] == "protected" && acked.is_some() && acked >= last {
            return;
        }
        assert!(Instant::now() < deadline, "never shipped: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Detaches every replog mount under a directory when dropped: a test that killed a
/// serve leaves its dead mount behind, as a crash would, and the next test run would
/// find it still listed.
pub struct MountSweep(pub PathBuf);

impl Drop for MountSweep {
    fn drop(&mut self) {
        replog::frontend::detach_replog_mounts_under(&self.0);
    }
}

/// GET `path` from `addr`: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Every sample line `name{labels} value` of the text, checked for form.
pub fn metric_samples(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("name and value");
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(
            name.starts_with("replog_")
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "bad metric name in {line:?}"
        );
        if name_end < key.len() {
            assert!(key.ends_with('}'), "bad labels in {line:?}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(key.to_string(), v);
    }
    out
}
