//! FUSE figures: the same fio jobs through a `replog serve --mount` disk and on a plain
//! file in the same directory, in the same run, interleaved (plain, replog, plain, …).
//! Both sides are written once before the first figure (the plain file's blocks
//! allocated, replog's journal recycling merged segments), as a disk in use is.
//! Each round starts once the compactor has merged what the rounds before left in the
//! journal, so a figure is the write path's and not the write path's beside the merge
//! of the round before; one more figure runs sequential writes back to back, the merge
//! of each round running beside the next (the rate a guest that never pauses gets).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One fio comparison: value through replog, baseline on a plain file.
pub struct FioFigure {
    pub name: String,
    pub value: f64,
    pub baseline: f64,
    pub unit: &'static str,
    /// Each interleaved round's ratio (replog / plain file run next to it): how far
    /// the disk moved between rounds.
    pub rounds: Vec<f64>,
}

/// A `replog serve` child, stopped (SIGTERM) when dropped.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) mount: PathBuf,
}

impl Serve {
    /// `replog serve SITE --mount MOUNT ARGS…` (its log in `log`), once mounted.
    pub(crate) fn start(
        replog: &Path,
        site: &Path,
        mount: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
        log: &Path,
    ) -> Result<Serve, String> {
        let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let child = Command::new(replog)
            .arg("serve")
            .arg(site)
            .arg("--mount")
            .arg(mount)
            .args(args)
            .env("REPLOG_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn serve: {e}"))?;
        let serve = Serve {
            child,
            mount: mount.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !replog::frontend::is_live_replog_mount(mount) {
            if Instant::now() > deadline {
                return Err("replog serve did not mount within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(serve)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: signal to a child we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = replog::frontend::detach(&self.mount);
    }
}

/// Two trusted sites for a figure through real serves: `DIR/<name>-src` and
/// `DIR/<name>-dst` (made afresh, removed when this is dropped: drop it after the
/// serves).
pub(crate) struct ServedPair {
    pub(crate) src: PathBuf,
    pub(crate) dst: PathBuf,
}

impl Drop for ServedPair {
    fn drop(&mut self) {
        super::util::remove_trees(&[self.src.clone(), self.dst.clone()]);
    }
}

impl ServedPair {
    pub(crate) fn init(dir: &Path, replog: &Path, name: &str) -> Result<ServedPair, String> {
        let (src, dst) = (
            dir.join(format!("{name}-src")),
            dir.join(format!("{name}-dst")),
        );
        for s in [&src, &dst] {
            let _ = std::fs::remove_dir_all(s);
            run(Command::new(replog).arg("init").arg(s))?;
        }
        let id =
            |s: &Path| run(Command::new(replog).arg("id").arg(s)).map(|t| t.trim().to_string());
        run(Command::new(replog).arg("trust").arg(&src).arg(id(&dst)?))?;
        run(Command::new(replog).arg("trust").arg(&dst).arg(id(&src)?))?;
        Ok(ServedPair { src, dst })
    }

    /// Start both serves, each with its mount (`<site>-mnt`), the target listening
    /// on a free port of 127.0.0.1: (address, source serve, target serve).
    pub(crate) fn serve(&self, replog: &Path) -> Result<(String, Serve, Serve), String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dst = Serve::start(
            replog,
            &self.dst,
            &self.dst.with_extension("mnt"),
            &["--listen", &addr],
            &self.dst.with_extension("serve.log"),
        )?;
        let no_args: &[&str] = &[];
        let src = Serve::start(
            replog,
            &self.src,
            &self.src.with_extension("mnt"),
            no_args,
            &self.src.with_extension("serve.log"),
        )?;
        Ok((addr, src, dst))
    }

    /// `replog protect SRC MACHINE --target ADDR`, retried until the target listens
    /// (30 s at most).
    pub(crate) fn protect(&self, replog: &Path, machine: &str, addr: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = run(Command::new(replog)
            .arg("protect")
            .arg(&self.src)
            .arg(machine)
            .args(["--target", addr]))
        {
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

pub(crate) fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// Run one fio job on `file`; returns (write or read) bandwidth in MB/s and IOPS.
fn fio(file: &Path, args: &[String]) -> Result<(f64, f64), String> {
    let out = run(Command::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", file.display()))
        .arg("--output-format=json")
        .args(args))?;
    let doc: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("fio json: {e}"))?;
    let job = &doc["jobs"][0];
    let side = if job["write"]["io_bytes"].as_f64().unwrap_or(0.0) > 0.0 {
        "write"
    } else {
        "read"
    };
    let bw = job[side]["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let iops = job[side]["iops"].as_f64().unwrap_or(0.0);
    Ok((bw, iops))
}

/// Wait until the journal of the served machine holds at most one segment's bytes:
/// what the compactor merges of the writes before is merged (it merges once the
/// journal holds `compact_min_bytes`, or after a lull).
fn merged(replog: &Path, site: &Path) -> Result<(), String> {
    const ONE_SEGMENT: u64 = 64 << 20;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st: serde_json::Value = serde_json::from_str(&run(Command::new(replog)
            .arg("status")
            .arg(site)
            .arg("--json"))?)
        .map_err(|e| format!("status json: {e}"))?;
        let journal = st["machines"][0]["journal_bytes"]
            .as_u64()
            .ok_or_else(|| format!("status names no journal_bytes: {st}"))?;
        if journal <= ONE_SEGMENT {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the journal was not merged within 120 s: {journal} bytes"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Run every FUSE figure. `replog` is the binary to serve with.
pub fn run_all(
    dir: &Path,
    replog: &Path,
    quick: bool,
    serve_args: &[String],
) -> Result<Vec<FioFigure>, String> {
    if Command::new("fio").arg("--version").output().is_err() {
        return Err("fio is not installed (tools/bench installs it on Debian as root)".into());
    }
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let rounds = if quick { 1 } else { 3 };
    let site = dir.join("fio-site");
    let mount = dir.join("fio-mnt");
    let plain = dir.join("fio-plain.img");
    let _ = std::fs::remove_dir_all(&site);
    let _ = std::fs::remove_file(&plain);
    run(Command::new(replog).arg("init").arg(&site))?;
    run(Command::new(replog)
        .args(["disk", "create"])
        .arg(&site)
        .args(["vm1/bench", "--size"])
        .arg(format!("{}", size * 2)))?;
    let f = std::fs::File::create(&plain).map_err(|e| e.to_string())?;
    f.set_len(size * 2).map_err(|e| e.to_string())?;
    drop(f);

    let serve = Serve::start(
        replog,
        &site,
        &mount,
        serve_args,
        &dir.join("fio.serve.log"),
    )?;
    let disk = mount.join("vm1").join("bench.img");

    let s = |v: &str| v.to_string();
    // Sequential 1 MiB direct I/O at a queue depth: psync at 1, libaio at 4 and 16
    // (how qemu aio=native and databases issue it).
    let seq = |rw: &str, depth: u32| {
        let mut a = vec![
            format!("--rw={rw}"),
            s("--bs=1M"),
            format!("--size={size}"),
            s("--direct=1"),
        ];
        if depth == 1 {
            a.push(s("--ioengine=psync"));
        } else {
            a.extend([s("--ioengine=libaio"), format!("--iodepth={depth}")]);
        }
        if rw == "write" {
            a.push(s("--end_fsync=1"));
        }
        a
    };
    let secs = if quick { 3 } else { 10 };
    let rand_write = |jobs: u32| {
        vec![
            s("--rw=randwrite"),
            s("--bs=4k"),
            format!("--size={}", size.min(256 << 20)),
            s("--fdatasync=1"),
            s("--ioengine=psync"),
            format!("--runtime={secs}"),
            s("--time_based"),
            format!("--numjobs={jobs}"),
            s("--group_reporting"),
        ]
    };

    // One unmeasured write of the figures' range on each side first, so that every
    // measured round sees what a disk in use sees: the plain file's blocks allocated
    // (a sparse file's first round allocates each, and ran at half the speed of the
    // later ones), and replog's journal writing into merged segments kept as spares.
    fio(&plain, &seq("write", 4))?;
    fio(&disk, &seq("write", 4))?;

    let mut out = Vec::new();
    // `settle`: each round starts with the journal merged (see the module's doc).
    let mut compare = |name: &str,
                       args: &[String],
                       unit: &'static str,
                       iops: bool,
                       cold: bool,
                       settle: bool|
     -> Result<(), String> {
        let (mut v, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            if settle {
                merged(replog, &site)?;
            }
            if cold {
                drop_caches();
            }
            let (bw, io) = fio(&plain, args)?;
            b.push(if iops { io } else { bw });
            if cold {
                drop_caches();
            }
            let (bw, io) = fio(&disk, args)?;
            v.push(if iops { io } else { bw });
        }
        let ratios = v.iter().zip(&b).map(|(v, b)| v / b).collect();
        out.push(FioFigure {
            name: name.to_string(),
            value: median(v),
            baseline: median(b),
            unit,
            rounds: ratios,
        });
        Ok(())
    };
    for depth in [1u32, 4, 16] {
        let engine = if depth == 1 { "psync" } else { "libaio" };
        compare(
            &format!("FUSE seq write 1MiB direct=1 end_fsync=1, {engine} iodepth {depth} (fio)"),
            &seq("write", depth),
            "MB/s",
            false,
            false,
            true,
        )?;
        compare(
            &format!("FUSE seq read 1MiB direct=1, caches dropped, {engine} iodepth {depth} (fio)"),
            &seq("read", depth),
            "MB/s",
            false,
            true,
            true,
        )?;
    }
    compare(
        "FUSE seq write 1MiB direct=1 end_fsync=1, psync iodepth 1, rounds back to back, \
         each beside the merge of the one before (fio)",
        &seq("write", 1),
        "MB/s",
        false,
        false,
        false,
    )?;
    // Random reads of data written above (the first `size` bytes), from disk.
    compare(
        "FUSE 4KiB rand read direct=1, libaio iodepth 16, caches dropped (fio)",
        &[
            s("--rw=randread"),
            s("--bs=4k"),
            format!("--size={size}"),
            s("--direct=1"),
            s("--ioengine=libaio"),
            s("--iodepth=16"),
            format!("--runtime={secs}"),
            s("--time_based"),
        ],
        "IOPS",
        true,
        true,
        true,
    )?;
    compare(
        "FUSE 4KiB rand write + fdatasync each (fio)",
        &rand_write(1),
        "IOPS",
        true,
        false,
        true,
    )?;
    compare(
        "FUSE 4KiB rand write + fdatasync each, 4 jobs (fio)",
        &rand_write(4),
        "IOPS",
        true,
        false,
        true,
    )?;
    drop(serve);
    let _ = std::fs::remove_dir_all(&site);
    let _ = std::fs::remove_file(&plain);
    Ok(out)
}
