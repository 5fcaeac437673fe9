//! Site settings, stored as `site.toml` in the site directory.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The first line of every `site.toml` (its "magic" and format version), without the
/// version: `# replog site configuration, format N`.
pub const CONFIG_MAGIC: &str = "# replog site configuration, format ";
/// The `site.toml` format this build writes, and the newest it reads: 2 added
/// `[replica] store` and `[replica.s3]` (an object-store target); 1 is read the same.
pub const CONFIG_FORMAT: u32 = 2;

/// The format version that the first line of `text` (from `path`) names after
/// `magic`, if this build reads it (1 to `newest`); otherwise a refusal naming both.
pub fn read_format(path: &Path, text: &str, magic: &str, newest: u32) -> Result<u32> {
    let first = text.lines().next().unwrap_or("");
    let unsupported = |what: String| Error::Unsupported {
        path: path.to_path_buf(),
        what,
    };
    let Some(v) = first.strip_prefix(magic) else {
        return Err(unsupported(format!(
            "does not start with {:?}",
            magic.trim_end()
        )));
    };
    match v.trim().parse::<u32>() {
        Ok(n) if (1..=newest).contains(&n) => Ok(n),
        _ => Err(unsupported(format!(
            "format {}; this build reads formats 1 to {newest}",
            v.trim()
        ))),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    pub journal: JournalConfig,
    pub replica: ReplicaConfig,
    pub replication: ReplicationConfig,
}

/// How a source ships its protected machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The active segment of a protected machine is sealed (and shipped) this often,
    /// so the lag stays at seconds.
    pub seal_interval_ms: u64,
    /// Waits after consecutive recoverable failures (network, no space at the
    /// target): 1, 2, 4, 8, 10 minutes…
    pub retry_schedule_ms: Vec<u64>,
    /// …then this, for as long as it takes.
    pub retry_then_ms: u64,
    /// Unshipped journal reaching this share of the machine's total disk size makes a
    /// resync required (and lets the compactor merge it, keeping the journal bounded).
    pub resync_threshold_percent: u64,
    /// When resyncs start by themselves: local "HH:00-HH:00" (may wrap midnight),
    /// "always" or "never" (`replog resync --now` starts one at any time).
    pub resync_window: String,
    /// Saturdays and Sundays count as inside the window.
    pub resync_weekends: bool,
    /// Bytes per compared chunk (a power of two, 4 KiB to 1 MiB). 4 KiB measured best:
    /// fewest bytes sent for scattered changes (see tools/bench).
    pub resync_chunk_bytes: u64,
    /// Bytes of disk compared per resync batch (one round trip; the position is
    /// persisted after each).
    pub resync_batch_bytes: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            seal_interval_ms: 2000,
            retry_schedule_ms: vec![60_000, 120_000, 240_000, 480_000, 600_000],
            retry_then_ms: 1_800_000,
            resync_threshold_percent: 50,
            resync_window: "18:00-08:00".into(),
            resync_weekends: true,
            resync_chunk_bytes: 4096,
            resync_batch_bytes: 64 << 20,
        }
    }
}

impl ReplicationConfig {
    /// The wait before retry number `n` (0-based).
    pub fn retry_delay(&self, n: usize) -> std::time::Duration {
        let ms = self
            .retry_schedule_ms
            .get(n)
            .copied()
            .unwrap_or(self.retry_then_ms);
        std::time::Duration::from_millis(ms)
    }
}

/// Settings for the replicas this site holds as a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Where the key that encrypts replica data at rest lives; empty means
    /// `SITE/identity/replica.key`. Point it outside the store (another volume) so
    /// that a copy of the store alone cannot be read.
    pub key_file: String,
    /// How often the target compactor looks for expired points to fold into the
    /// replica parents (serve).
    pub compact_interval_ms: u64,
    /// Where replicas received here are kept: empty for `SITE/replicas/`, or
    /// `s3://BUCKET[/PREFIX]` for an S3 bucket (settings in `[replica.s3]`).
    pub store: String,
    pub s3: S3Settings,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            key_file: String::new(),
            compact_interval_ms: 10_000,
            store: String::new(),
            s3: S3Settings::default(),
        }
    }
}

/// How to reach the S3 bucket of `replica.store` (see `replica::objects`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// The store's URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:8333`).
    pub endpoint: String,
    pub region: String,
    /// A file holding `access_key_id = "…"` and `secret_access_key = "…"` (mode 0600);
    /// empty: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` from the environment.
    pub credentials_file: String,
    /// The store ignores `If-None-Match: *` (Garage): no writer fencing. Without this
    /// such a store is refused.
    pub unfenced: bool,
    /// Objects no manifest names any more are deleted this long after (readers on
    /// other hosts may still be reading them).
    pub gc_grace_ms: u64,
    /// Longest wait for a connection or for the first byte of an answer; bodies get
    /// four times as long.
    pub timeout_ms: u64,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: String::new(),
            region: "us-east-1".into(),
            credentials_file: String::new(),
            unfenced: false,
            gc_grace_ms: 3_600_000,
            timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// The active segment is sealed once it holds this many bytes.
    pub segment_bytes: u64,
    /// How often the background compactor looks for sealed segments to merge.
    pub compact_interval_ms: u64,
    /// The compactor merges once sealed, mergeable segments hold this many bytes…
    pub compact_min_bytes: u64,
    /// …or once the machine has taken no write for this long. Merging doubles the
    /// bytes written, so it waits for a lull or a backlog instead of competing with
    /// every burst of guest writes; the journal stays bounded by
    /// `compact_min_bytes + segment_bytes` plus what holds keep (merged segments kept
    /// as spares to be written again count within it: `journal::spare`).
    pub compact_idle_ms: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes: 64 << 20,
            compact_interval_ms: 1000,
            compact_min_bytes: 512 << 20,
            compact_idle_ms: 2000,
        }
    }
}

impl JournalConfig {
    /// The background compactor's policy from these settings.
    pub fn compact_policy(&self) -> crate::compactor::CompactPolicy {
        crate::compactor::CompactPolicy {
            interval: std::time::Duration::from_millis(self.compact_interval_ms.max(1)),
            min_bytes: self.compact_min_bytes,
            idle: std::time::Duration::from_millis(self.compact_idle_ms),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(4096..=(4u64 << 30)).contains(&self.segment_bytes) {
            return Err(Error::InvalidInput(format!(
                "journal.segment_bytes = {} is outside 4096..=4GiB",
                self.segment_bytes
            )));
        }
        Ok(())
    }
}

impl ReplicaConfig {
    /// The first problem of [`ReplicaConfig::problems`], if any.
    pub fn validate(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            None => Ok(()),
            Some((_, why)) => Err(Error::InvalidInput(why)),
        }
    }

    /// What is wrong with these settings: (dotted key, why).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if self.store.is_empty() {
            return p;
        }
        if let Err(e) = crate::replica::objects::S3Location::parse(&self.store) {
            p.push(("replica.store", e.to_string()));
        }
        if self.s3.endpoint.is_empty() {
            p.push((
                "replica.s3.endpoint",
                format!(
                    "replica.store = {:?} needs replica.s3.endpoint (the store's URL)",
                    self.store
                ),
            ));
        } else if !(self.s3.endpoint.starts_with("http://")
            || self.s3.endpoint.starts_with("https://"))
        {
            p.push((
                "replica.s3.endpoint",
                format!(
                    "replica.s3.endpoint = {:?} is not an http:// or https:// URL",
                    self.s3.endpoint
                ),
            ));
        }
        if self.s3.gc_grace_ms < 1000 {
            p.push((
                "replica.s3.gc_grace_ms",
                format!(
                    "replica.s3.gc_grace_ms = {} is less than 1000: readers need at least a \
                     second (an hour is the default)",
                    self.s3.gc_grace_ms
                ),
            ));
        }
        if self.s3.timeout_ms == 0 {
            p.push((
                "replica.s3.timeout_ms",
                "replica.s3.timeout_ms must be more than 0".into(),
            ));
        }
        p
    }
}

impl ReplicationConfig {
    /// What is wrong with these settings: (dotted key, why).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if self.seal_interval_ms < 10 {
            p.push((
                "replication.seal_interval_ms",
                format!("{} is less than 10 (ms)", self.seal_interval_ms),
            ));
        }
        if self.retry_schedule_ms.contains(&0) || self.retry_then_ms == 0 {
            p.push((
                "replication.retry_schedule_ms",
                "a wait of 0 ms would retry in a busy loop".into(),
            ));
        }
        // Above 100 is allowed: a journal may hold more than the disks' size (tests set
        // it very high to keep a machine from overflowing).
        if self.resync_threshold_percent == 0 {
            p.push((
                "replication.resync_threshold_percent",
                "0 would make every write overflow the journal".into(),
            ));
        }
        if let Err(e) =
            crate::replication::resync_schedule::Window::parse(&self.resync_window, true)
        {
            p.push(("replication.resync_window", e.to_string()));
        }
        let c = self.resync_chunk_bytes;
        if let Err(e) = crate::chunk_hash::check_chunk_bytes(c) {
            p.push(("replication.resync_chunk_bytes", e.to_string()));
        }
        if self.resync_batch_bytes < c || self.resync_batch_bytes > (1 << 30) {
            p.push((
                "replication.resync_batch_bytes",
                format!(
                    "{} is outside resync_chunk_bytes..=1 GiB",
                    self.resync_batch_bytes
                ),
            ));
        }
        p
    }
}

/// Where in a TOML file something is: line numbers and dotted keys for messages
/// (`site.toml line 12, key journal.segment_bytes: …`).
pub struct TomlAt<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl TomlAt<'_> {
    fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text
            .get(..end)
            .map_or(1, |t| t.matches('\n').count() + 1)
    }

    /// The dotted key line `line` (1-based) sets: its section's name and its own.
    fn key_of_line(&self, line: usize) -> String {
        let mut section = String::new();
        for (i, l) in self.text.lines().enumerate() {
            let l = l.trim();
            if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                section = name
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string();
            }
            if i + 1 == line {
                let key = l.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
                return match (section.is_empty(), key.is_empty()) {
                    (_, true) if !section.is_empty() => format!("[{section}]"),
                    (true, _) => key.to_string(),
                    (false, false) => format!("{section}.{key}"),
                    _ => String::new(),
                };
            }
        }
        String::new()
    }

    /// The line that sets dotted key `key` (None: it is not in the file: a default).
    fn line_of_key(&self, key: &str) -> Option<usize> {
        (1..=self.text.lines().count()).find(|&n| self.key_of_line(n) == key)
    }

    /// A TOML error (syntax, an unknown key, a value of the wrong type), located.
    pub fn parse_error(&self, e: &toml::de::Error) -> Error {
        let line = e.span().map_or(1, |s| self.line_of_offset(s.start));
        let key = self.key_of_line(line);
        self.message(Some(line), &key, e.message().trim())
    }

    /// A value that parsed but is not allowed, located by its key.
    pub fn value_error(&self, key: &str, why: &str) -> Error {
        self.message(self.line_of_key(key), key, why)
    }

    fn message(&self, line: Option<usize>, key: &str, why: &str) -> Error {
        let at = match line {
            Some(n) => format!("{} line {n}", self.file.display()),
            None => format!("{} (default)", self.file.display()),
        };
        Error::InvalidInput(if key.is_empty() {
            format!("{at}: {why}")
        } else {
            format!("{at}, key {key}: {why}")
        })
    }
}

impl SiteConfig {
    /// What is wrong with these settings: (dotted key, why).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if let Err(e) = self.journal.validate() {
            p.push(("journal.segment_bytes", e.to_string()));
        }
        p.extend(self.replication.problems());
        p.extend(self.replica.problems());
        p
    }

    /// Every problem of the settings in `text` (from `path`), each located; empty when
    /// they are good.
    pub fn check(path: &Path, text: &str) -> Vec<Error> {
        if let Err(e) = read_format(path, text, CONFIG_MAGIC, CONFIG_FORMAT) {
            return vec![e];
        }
        let at = TomlAt { file: path, text };
        match toml::from_str::<SiteConfig>(text) {
            Err(e) => vec![at.parse_error(&e)],
            Ok(cfg) => cfg
                .problems()
                .into_iter()
                .map(|(k, why)| at.value_error(k, &why))
                .collect(),
        }
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).unwrap_or_default();
        format!("{CONFIG_MAGIC}{CONFIG_FORMAT}\n{body}")
    }

    /// The settings in `text` (from `path`), or the first problem, located as
    /// `replog config check` reports it.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self> {
        if let Some(e) = Self::check(path, text).into_iter().next() {
            return Err(e);
        }
        toml::from_str(text).map_err(|e| TomlAt { file: path, text }.parse_error(&e))
    }
}
