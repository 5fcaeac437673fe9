//! Replicas in an object store: the raw bucket ([`ObjectStore`]: S3 in production,
//! [`MemObjects`] in unit tests) and the [`ObjectBackend`] that keeps a replica
//! store's keys in it — immutable data objects, per-machine manifests as the commit
//! point, fencing of stale writers and collection after a grace period. See
//! docs/DESIGN.md, "Replicas on an object store".

mod backend;
mod s3;

pub use backend::{probe, Entry, Manifest, ObjectBackend};
pub use s3::{requests_sent, Credentials, S3Objects};

use crate::error::{Error, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's prefix.
    pub key: String,
    pub size: u64,
    /// When the store last wrote it (ns since the epoch, the store's clock).
    pub modified_ns: u64,
}

/// A bucket (below a prefix): every call is one or a few requests, each bounded in
/// time. Keys are relative to the prefix.
pub trait ObjectStore: Send + Sync + fmt::Debug {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The first `len` bytes of `key` (fewer if it is shorter); S3 asks for the range.
    fn get_head(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.get(key)?.map(|mut b| {
            b.truncate(len);
            b
        }))
    }
    /// Create or replace; durable on return.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Create only if absent (`If-None-Match: *`): false, nothing written, if it
    /// exists — also when an earlier try of this very request had created it with
    /// other bytes.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool>;
    /// Every object under `prefix` (which ends with `/` or is empty), sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// The names directly under `prefix` that have objects below them (S3's common
    /// prefixes with delimiter `/`), without the trailing `/`, sorted.
    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove objects; missing ones are fine.
    fn delete(&self, keys: &[String]) -> Result<()>;
    /// Where `key` is, for messages (`s3://bucket/prefix/key`).
    fn locate(&self, key: &str) -> String;
    /// Check that the bucket exists and these credentials may use it.
    fn check_bucket(&self) -> Result<()> {
        Ok(())
    }
}

/// `s3://BUCKET[/PREFIX]` of `replica.store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or `a/b/` (ends with `/`).
    pub prefix: String,
}

impl S3Location {
    pub fn parse(url: &str) -> Result<S3Location> {
        let bad = |why: &str| {
            Error::InvalidInput(format!(
                "replica store {url:?} {why}: expected s3://BUCKET or s3://BUCKET/PREFIX"
            ))
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // Bucket names as S3 allows them: 3 to 63 of a-z, 0-9, '.', '-'.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-']);
        if !bucket_ok {
            return Err(bad("has no valid bucket name (3-63 of a-z 0-9 . -)"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            super::backend::check_key(prefix).map_err(|_| bad("has an invalid prefix"))?;
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }
}

/// An in-memory bucket for unit tests: a clock the test moves, a switch that takes
/// it down (every request fails as unreachable), one that makes it ignore
/// `If-None-Match` (as Garage does), and a count of requests.
#[derive(Debug, Default)]
pub struct MemObjects {
    objects: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
    now_ns: AtomicU64,
    down: AtomicBool,
    ignores_if_none_match: AtomicBool,
    pub requests: AtomicU64,
}

impl MemObjects {
    pub fn new() -> Self {
        let m = MemObjects::default();
        m.now_ns.store(crate::format::now_ns(), Ordering::Relaxed);
        m
    }

    /// Move the store's clock on.
    pub fn advance(&self, ns: u64) {
        self.now_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    pub fn set_ignores_if_none_match(&self, yes: bool) {
        self.ignores_if_none_match.store(yes, Ordering::Relaxed);
    }

    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().keys().cloned().collect()
    }

    fn request(&self) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(Error::Store {
                store: "mem://".into(),
                what: "connection refused".into(),
                transient: true,
            });
        }
        Ok(())
    }
}

impl ObjectStore for MemObjects {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.request()?;
        Ok(self.objects.lock().get(key).map(|(b, _)| b.clone()))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.request()?;
        let now = self.now_ns.load(Ordering::Relaxed);
        self.objects
            .lock()
            .insert(key.to_string(), (bytes.to_vec(), now));
        Ok(())
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.request()?;
        let now = self.now_ns.load(Ordering::Relaxed);
        let mut o = self.objects.lock();
        if o.contains_key(key) && !self.ignores_if_none_match.load(Ordering::Relaxed) {
            return Ok(false);
        }
        o.insert(key.to_string(), (bytes.to_vec(), now));
        Ok(true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.request()?;
        Ok(self
            .objects
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, t))| ObjectInfo {
                key: k.clone(),
                size: b.len() as u64,
                modified_ns: *t,
            })
            .collect())
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let mut dirs: Vec<String> = self
            .list(prefix)?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(prefix)?;
                let (dir, _) = rest.split_once('/')?;
                Some(dir.to_string())
            })
            .collect();
        dirs.dedup();
        Ok(dirs)
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        self.request()?;
        let mut o = self.objects.lock();
        for k in keys {
            o.remove(k);
        }
        Ok(())
    }

    fn locate(&self, key: &str) -> String {
        format!("mem://{key}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_and_bad_ones_are_refused() {
        assert_eq!(
            S3Location::parse("s3://replicas").unwrap(),
            S3Location {
                bucket: "replicas".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            S3Location::parse("s3://replicas/site-b/").unwrap().prefix,
            "site-b/"
        );
        for bad in [
            "replicas",
            "s3://",
            "s3://AB",
            "s3://x",
            "s3://ok-bucket/../up",
            "s3://ok-bucket/a//b",
            "http://bucket",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
