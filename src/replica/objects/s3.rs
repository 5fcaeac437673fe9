//! An S3 bucket as an [`ObjectStore`]: requests signed by rusty-s3 (presigned URLs,
//! with the conditional and metadata headers signed too), sent by a ureq agent,
//! synchronous, every request bounded in time.
//!
//! Errors keep the store's own code and message (`AccessDenied`, `NoSuchBucket`,
//! `SignatureDoesNotMatch`) and never the credentials. A transport failure, a 5xx or
//! a 429 is retried a few times at once; a PUT that may have landed is checked first
//! (HEAD: our `x-amz-meta-sha256`), a create-if-absent that meets its own earlier try
//! (412) reads it back and compares. What still fails is `Error::Store { transient:
//! true }` — the caller's retry schedule takes over — or, for a refusal that retrying
//! cannot mend, `transient: false` (Critical).

use super::{ObjectInfo, ObjectStore, S3Location};
use crate::config::S3Settings;
use crate::error::{Error, Result};
use rusty_s3::actions::{ListObjectsV2, ObjectIdentifier};
use rusty_s3::{Bucket, S3Action, UrlStyle};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// How long a signed URL is valid: longer than any request may take.
const SIGN_TTL: Duration = Duration::from_secs(3600);
/// Waits between the tries of one request that fails in passing.
const BACKOFF_MS: [u64; 2] = [100, 500];
/// Tries of such a request (the first included): one more than the waits.
const TRIES: usize = BACKOFF_MS.len() + 1;
/// Objects at least this large go up in parts, several at once (the store's servers
/// overlap their work: measured 0.41x → see README for the figure).
const MULTIPART_FROM: usize = 16 << 20;
/// Bytes per part, and parts in flight at once.
const PART_BYTES: usize = 8 << 20;
const PARTS_AT_ONCE: usize = 4;
/// Largest object read whole (a segment and its envelope; see backend.rs).
const MAX_BODY: u64 = crate::replica::backend::MAX_OBJECT + (1 << 20);

/// HTTP requests sent to S3 stores by this process (benchmarks: requests per GiB).
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many requests this process has sent to S3 stores.
pub fn requests_sent() -> u64 {
    REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An access key: the secret never printed.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, secret hidden)", self.access_key_id)
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
}

impl Credentials {
    pub fn new(access_key_id: &str, secret_access_key: &str) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }

    /// From `file` (TOML: `access_key_id`, `secret_access_key`; refused unless only
    /// its owner may read it), or from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
    /// when `file` is empty.
    pub fn load(file: &str) -> Result<Credentials> {
        if file.is_empty() {
            let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
            let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
            if id.is_empty() || secret.is_empty() {
                return Err(Error::InvalidInput(
                    "the S3 replica store needs credentials: set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or replica.s3.credentials_file in site.toml"
                        .into(),
                ));
            }
            return Ok(Credentials::new(&id, &secret));
        }
        let path = Path::new(file);
        crate::site::check_private(path, "S3 credentials")?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        // The parser's message could quote the secret: say only where it failed.
        let c: CredentialsFile = toml::from_str(&text).map_err(|e| {
            Error::InvalidInput(format!(
                "{file}: not `access_key_id = \"…\"` and `secret_access_key = \"…\"` \
                 (at {:?})",
                e.span()
            ))
        })?;
        Ok(Credentials::new(&c.access_key_id, &c.secret_access_key))
    }
}

/// The bucket of a replica store.
pub struct S3Objects {
    bucket: Bucket,
    credentials: rusty_s3::Credentials,
    prefix: String,
    agent: ureq::Agent,
    url: String,
}

impl fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Objects({} at {})", self.url, self.bucket.base_url())
    }
}

/// An answer: status, the headers asked for, body.
struct Reply {
    status: u16,
    body: Vec<u8>,
    sha256: Option<String>,
    etag: Option<String>,
}

/// One try's failure: `transient` if another try may succeed.
struct Failed {
    what: String,
    transient: bool,
}

impl S3Objects {
    pub fn new(location: &S3Location, settings: &S3Settings, creds: Credentials) -> Result<Self> {
        let endpoint = settings.endpoint.parse().map_err(|e| {
            Error::InvalidInput(format!(
                "replica.s3.endpoint {:?} is not a URL: {e}",
                settings.endpoint
            ))
        })?;
        let bucket = Bucket::new(
            endpoint,
            UrlStyle::Path,
            location.bucket.clone(),
            settings.region.clone(),
        )
        .map_err(|e| Error::InvalidInput(format!("replica store bucket: {e}")))?;
        let t = Duration::from_millis(settings.timeout_ms.max(1));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(t))
            .timeout_recv_response(Some(t))
            .timeout_send_request(Some(t))
            .timeout_send_body(Some(t * 4))
            .timeout_recv_body(Some(t * 4))
            .max_idle_connections_per_host(64)
            .build()
            .into();
        Ok(S3Objects {
            bucket,
            credentials: rusty_s3::Credentials::new(creds.access_key_id, creds.secret_access_key),
            url: format!("s3://{}/{}", location.bucket, location.prefix),
            prefix: location.prefix.clone(),
            agent,
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn err(&self, key: &str, what: String, transient: bool) -> Error {
        Error::Store {
            store: format!("{}{key}", self.url),
            what,
            transient,
        }
    }

    /// One request, tried up to [`TRIES`] times while it fails in passing.
    /// `before_retry` runs before every try after the first: Some(reply) ends the
    /// retries with that answer (the earlier try had landed).
    fn call(
        &self,
        key: &str,
        mut attempt: impl FnMut() -> std::result::Result<Reply, Failed>,
        mut before_retry: impl FnMut() -> std::result::Result<Option<Reply>, Failed>,
    ) -> Result<Reply> {
        let mut last = None;
        for n in 0..TRIES {
            if n > 0 {
                std::thread::sleep(Duration::from_millis(BACKOFF_MS[n - 1]));
                match before_retry() {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(f) if f.transient => {
                        last = Some(f);
                        continue;
                    }
                    Err(f) => return Err(self.err(key, f.what, false)),
                }
            }
            match attempt() {
                Ok(r) => return Ok(r),
                Err(f) if f.transient => {
                    tracing::debug!(key, "replica store request failed, retrying: {}", f.what);
                    last = Some(f);
                }
                Err(f) => return Err(self.err(key, f.what, false)),
            }
        }
        let f = last.unwrap_or(Failed {
            what: "no answer".into(),
            transient: true,
        });
        Err(self.err(key, format!("{} ({TRIES} tries)", f.what), true))
    }

    /// Send one signed request; a status the caller expects comes back as a Reply,
    /// any other as a Failed with the store's code and message.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
        expect: &[u16],
    ) -> std::result::Result<Reply, Failed> {
        REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::get().store_requests.inc();
        let sent = match method {
            "PUT" | "POST" => {
                let mut req = if method == "PUT" {
                    self.agent.put(url)
                } else {
                    self.agent.post(url)
                };
                for (k, v) in headers {
                    req = req.header(*k, v.as_str());
                }
                req.send(body.unwrap_or(&[]))
            }
            _ => {
                let mut req = match method {
                    "GET" => self.agent.get(url),
                    "HEAD" => self.agent.head(url),
                    _ => self.agent.delete(url),
                };
                for (k, v) in headers {
                    req = req.header(*k, v.as_str());
                }
                req.call()
            }
        };
        let mut resp = sent.map_err(|e| Failed {
            what: transport_error(&e),
            transient: true,
        })?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (sha256, etag) = (header("x-amz-meta-sha256"), header("etag"));
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            resp.body_mut()
                .with_config()
                .limit(MAX_BODY)
                .read_to_vec()
                .map_err(|e| Failed {
                    what: format!("reading the answer: {}", transport_error(&e)),
                    transient: true,
                })?
        };
        if expect.contains(&status) {
            return Ok(Reply {
                status,
                body,
                sha256,
                etag,
            });
        }
        let (code, message) = error_of(&body);
        let what = match (code.as_str(), status) {
            ("", 403) => {
                "access denied (403): check the credentials and the bucket's policy".into()
            }
            ("", 404) => "not found (404): does the bucket exist?".into(),
            ("", s) => format!("HTTP {s}"),
            (c, s) => format!("{c} (HTTP {s}): {message}"),
        };
        // 409 ConditionalRequestConflict: two conditional writes of one key at once;
        // 400 RequestTimeout: the body came too slowly. Both pass.
        let transient = status >= 500
            || status == 429
            || status == 408
            || status == 409
            || code == "RequestTimeout";
        Err(Failed { what, transient })
    }

    /// HEAD `key`: its sha256 metadata if it exists.
    fn head_sha(&self, full: &str) -> std::result::Result<Option<Option<String>>, Failed> {
        let url = self
            .bucket
            .head_object(Some(&self.credentials), full)
            .sign(SIGN_TTL);
        let r = self.send("HEAD", url.as_str(), &[], None, &[200, 404])?;
        Ok((r.status == 200).then_some(r.sha256))
    }

    /// Whether `full` is there holding bytes of hash `sha` (an earlier try landed):
    /// then the answer that try should have had.
    fn landed(&self, full: &str, sha: &str) -> std::result::Result<Option<Reply>, Failed> {
        Ok(match self.head_sha(full)? {
            Some(Some(h)) if h == sha => Some(Reply {
                status: 200,
                body: Vec::new(),
                sha256: Some(h),
                etag: None,
            }),
            _ => None,
        })
    }

    fn put_inner(&self, key: &str, bytes: &[u8], if_absent: bool) -> Result<bool> {
        let full = self.full(key);
        let sha = hex(&Sha256::digest(bytes));
        if !if_absent && bytes.len() >= MULTIPART_FROM {
            return self.put_parts(key, &full, bytes, &sha).map(|()| true);
        }
        let mut action = self.bucket.put_object(Some(&self.credentials), &full);
        action
            .headers_mut()
            .insert("x-amz-meta-sha256", sha.clone());
        let mut headers = vec![("x-amz-meta-sha256", sha.clone())];
        if if_absent {
            action.headers_mut().insert("if-none-match", "*");
            headers.push(("if-none-match", "*".to_string()));
        }
        let url = action.sign(SIGN_TTL);
        let expect: &[u16] = if if_absent { &[200, 412] } else { &[200] };
        let reply = self.call(
            key,
            || self.send("PUT", url.as_str(), &headers, Some(bytes), expect),
            // The try before may have landed: if the object is there with our bytes'
            // hash, it is done (and for create-if-absent, created by us).
            || self.landed(&full, &sha),
        )?;
        if reply.status == 412 {
            // Exists: ours only if an earlier try of this request made it, which the
            // check above would have said. Someone else's.
            return Ok(false);
        }
        Ok(true)
    }

    /// A large object in parts of [`PART_BYTES`], [`PARTS_AT_ONCE`] in flight; each
    /// part retried on its own, the completion checked (HEAD, our hash) before it is
    /// repeated. An upload that fails is aborted.
    fn put_parts(&self, key: &str, full: &str, bytes: &[u8], sha: &str) -> Result<()> {
        use rusty_s3::actions::CreateMultipartUpload;
        let mut create = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), full);
        create
            .headers_mut()
            .insert("x-amz-meta-sha256", sha.to_string());
        let url = create.sign(SIGN_TTL);
        let headers = [("x-amz-meta-sha256", sha.to_string())];
        let r = self.call(
            key,
            || self.send("POST", url.as_str(), &headers, Some(&[]), &[200]),
            || Ok(None),
        )?;
        let text = String::from_utf8_lossy(&r.body);
        let created = CreateMultipartUpload::parse_response(&text).map_err(|e| {
            self.err(
                key,
                format!("a multipart answer that does not parse: {e}"),
                true,
            )
        })?;
        let upload_id = created.upload_id().to_string();
        let uploaded = self
            .upload_parts(key, full, bytes, &upload_id)
            .and_then(|etags| {
                let action = self.bucket.complete_multipart_upload(
                    Some(&self.credentials),
                    full,
                    &upload_id,
                    etags.iter().map(String::as_str),
                );
                let url = action.sign(SIGN_TTL);
                let body = action.body();
                self.call(
                    key,
                    || self.send("POST", url.as_str(), &[], Some(body.as_bytes()), &[200]),
                    || self.landed(full, sha),
                )
            });
        match uploaded {
            Ok(r) => {
                // A completion can fail inside a 200 (S3 documents it): an Error body.
                let (code, message) = error_of(&r.body);
                if !code.is_empty()
                    && !String::from_utf8_lossy(&r.body).contains("CompleteMultipartUploadResult")
                {
                    return Err(self.err(key, format!("{code}: {message}"), true));
                }
                Ok(())
            }
            Err(e) => {
                let url = self
                    .bucket
                    .abort_multipart_upload(Some(&self.credentials), full, &upload_id)
                    .sign(SIGN_TTL);
                let _ = self.send("DELETE", url.as_str(), &[], None, &[204, 200, 404]);
                Err(e)
            }
        }
    }

    /// Every part of `bytes`, several at once; their ETags in order.
    fn upload_parts(
        &self,
        key: &str,
        full: &str,
        bytes: &[u8],
        upload_id: &str,
    ) -> Result<Vec<String>> {
        let parts: Vec<&[u8]> = bytes.chunks(PART_BYTES).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let etags = parking_lot::Mutex::new(vec![String::new(); parts.len()]);
        std::thread::scope(|sc| -> Result<()> {
            let workers: Vec<_> = (0..PARTS_AT_ONCE.min(parts.len()))
                .map(|_| {
                    sc.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(part) = parts.get(i) else {
                                return Ok(());
                            };
                            let number = u16::try_from(i + 1).map_err(|_| {
                                self.err(key, "an object of more than 65535 parts".into(), false)
                            })?;
                            let url = self
                                .bucket
                                .upload_part(Some(&self.credentials), full, number, upload_id)
                                .sign(SIGN_TTL);
                            let r = self.call(
                                key,
                                || self.send("PUT", url.as_str(), &[], Some(part), &[200]),
                                || Ok(None),
                            )?;
                            let etag = r.etag.ok_or_else(|| {
                                self.err(
                                    key,
                                    format!("part {number} answered without an ETag"),
                                    true,
                                )
                            })?;
                            etags.lock()[i] = etag;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap_or_else(|_| {
                    Err(self.err(key, "a part uploader panicked".into(), false))
                })?;
            }
            Ok(())
        })?;
        Ok(etags.into_inner())
    }

    fn list_pages(&self, prefix: &str, delimiter: bool) -> Result<(Vec<ObjectInfo>, Vec<String>)> {
        let full = self.full(prefix);
        let mut objects = Vec::new();
        let mut dirs = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
            action.with_prefix(full.as_str());
            if delimiter {
                action.with_delimiter("/");
            }
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_TTL);
            let r = self.call(
                prefix,
                || self.send("GET", url.as_str(), &[], None, &[200]),
                || Ok(None),
            )?;
            let text = String::from_utf8_lossy(&r.body);
            let page = ListObjectsV2::parse_response(&text).map_err(|e| {
                self.err(prefix, format!("a listing that does not parse: {e}"), true)
            })?;
            for o in page.contents {
                let Some(key) = o.key.strip_prefix(&self.prefix) else {
                    continue;
                };
                objects.push(ObjectInfo {
                    key: key.to_string(),
                    size: o.size.unwrap_or(0),
                    modified_ns: o
                        .last_modified
                        .as_deref()
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        // A time that does not parse never makes an object old.
                        .map_or(u64::MAX, |d| d.as_nanos() as u64),
                });
            }
            for p in page.common_prefixes {
                if let Some(d) = p.prefix.strip_prefix(&full) {
                    dirs.push(d.trim_end_matches('/').to_string());
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        dirs.sort();
        dirs.dedup();
        Ok((objects, dirs))
    }
}

impl ObjectStore for S3Objects {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &self.full(key))
            .sign(SIGN_TTL);
        let r = self.call(
            key,
            || self.send("GET", url.as_str(), &[], None, &[200, 404]),
            || Ok(None),
        )?;
        if r.status == 404 {
            // NoSuchKey; a missing bucket says NoSuchBucket with 404 too.
            let (code, message) = error_of(&r.body);
            if code == "NoSuchBucket" {
                return Err(self.err(key, format!("NoSuchBucket: {message}"), false));
            }
            return Ok(None);
        }
        Ok(Some(r.body))
    }

    fn get_head(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &self.full(key))
            .sign(SIGN_TTL);
        // At least byte 0 is asked for (a range cannot be empty); cut to `len` below.
        let range = [("Range", format!("bytes=0-{}", len.max(1) - 1))];
        let r = self.call(
            key,
            || self.send("GET", url.as_str(), &range, None, &[200, 206, 404, 416]),
            || Ok(None),
        )?;
        match r.status {
            404 => {
                let (code, message) = error_of(&r.body);
                if code == "NoSuchBucket" {
                    return Err(self.err(key, format!("NoSuchBucket: {message}"), false));
                }
                Ok(None)
            }
            // An empty object has no byte 0.
            416 => Ok(Some(Vec::new())),
            // 206, or 200 from a store that ignores ranges: the whole object.
            _ => {
                let mut b = r.body;
                b.truncate(len);
                Ok(Some(b))
            }
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put_inner(key, bytes, false).map(|_| ())
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.put_inner(key, bytes, true)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self.list_pages(prefix, false)?.0)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.list_pages(prefix, true)?.1)
    }

    fn delete(&self, keys: &[String]) -> Result<()> {
        for part in keys.chunks(1000) {
            let ids: Vec<ObjectIdentifier> = part
                .iter()
                .map(|k| ObjectIdentifier::new(self.full(k)))
                .collect();
            let mut action = self
                .bucket
                .delete_objects(Some(&self.credentials), ids.iter());
            action.set_quiet(true);
            let url = action.sign(SIGN_TTL);
            let (body, md5) = action.body_with_md5();
            let headers = [("content-md5", md5)];
            let first = part.first().map_or("", String::as_str);
            let r = self.call(
                first,
                || {
                    self.send(
                        "POST",
                        url.as_str(),
                        &headers,
                        Some(body.as_bytes()),
                        &[200],
                    )
                },
                || Ok(None),
            )?;
            let (code, message) = error_of(&r.body);
            if !code.is_empty() {
                return Err(self.err(first, format!("delete: {code}: {message}"), true));
            }
        }
        Ok(())
    }

    fn locate(&self, key: &str) -> String {
        format!("{}{key}", self.url)
    }

    fn check_bucket(&self) -> Result<()> {
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(SIGN_TTL);
        let r = self.call(
            "",
            || self.send("HEAD", url.as_str(), &[], None, &[200, 403, 404]),
            || Ok(None),
        )?;
        match r.status {
            404 => Err(self.err(
                "",
                format!("NoSuchBucket: bucket {} does not exist", self.bucket.name()),
                false,
            )),
            403 => Err(self.err(
                "",
                "AccessDenied (HTTP 403): these credentials may not use the bucket (wrong \
                 key, or the bucket's policy)"
                    .into(),
                false,
            )),
            _ => Ok(()),
        }
    }
}

/// A transport error in words, without the URL (which carries the signature).
fn transport_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => format!("unreachable: {io}"),
        ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        other => {
            let s = other.to_string();
            // Never echo a signed URL.
            match s.find("X-Amz-") {
                Some(i) => format!("{}…", &s[..i]),
                None => s,
            }
        }
    }
}

/// `<Code>` and `<Message>` of an S3 error document (empty if none).
fn error_of(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        text.find(&open)
            .and_then(|i| {
                let rest = &text[i + open.len()..];
                rest.find(&close).map(|j| rest[..j].to_string())
            })
            .unwrap_or_default()
    };
    (tag("Code"), tag("Message"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};

    /// PUTs received, and the sha256 metadata of the last.
    type Seen = (u32, Option<String>);

    /// A one-object HTTP server that stores PUTs and answers HEADs with the stored
    /// sha256 metadata, and drops the connection instead of answering the first PUT
    /// (which it keeps): a request that succeeded with its answer lost.
    fn lossy_server() -> (String, Arc<Mutex<Seen>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new((0u32, None::<String>)));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let method = line.split_whitespace().next().unwrap_or("").to_string();
                let (mut len, mut sha, mut expect) = (0usize, None, false);
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-amz-meta-sha256" => sha = Some(v.trim().to_string()),
                        "expect" => expect = true,
                        _ => {}
                    }
                }
                if expect {
                    conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let mut g = st.lock().unwrap();
                let reply: &[u8] = match method.as_str() {
                    "PUT" => {
                        g.0 += 1;
                        g.1 = sha;
                        if g.0 == 1 {
                            continue; // stored; the answer is lost
                        }
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    }
                    _ => match &g.1 {
                        Some(h) => {
                            let r = format!(
                                "HTTP/1.1 200 OK\r\nx-amz-meta-sha256: {h}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            );
                            let _ = conn.write_all(r.as_bytes());
                            continue;
                        }
                        None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    },
                };
                let _ = conn.write_all(reply);
            }
        });
        (addr, state)
    }

    #[test]
    fn a_put_whose_answer_was_lost_is_checked_not_sent_again() {
        let (endpoint, state) = lossy_server();
        let settings = crate::config::S3Settings {
            endpoint,
            timeout_ms: 2000,
            ..Default::default()
        };
        let store = S3Objects::new(
            &S3Location::parse("s3://bucket").unwrap(),
            &settings,
            Credentials::new("id", "secret"),
        )
        .unwrap();
        store.put("vm1/d/x", b"the bytes").unwrap();
        // One PUT reached the server; the retry found it there (HEAD, same hash).
        assert_eq!(state.lock().unwrap().0, 1);
    }

    #[test]
    fn error_documents_give_code_and_message() {
        let doc = b"<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>\
            <Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            error_of(doc),
            (
                "NoSuchBucket".to_string(),
                "The specified bucket does not exist".to_string()
            )
        );
        assert_eq!(error_of(b""), (String::new(), String::new()));
    }

    #[test]
    fn credentials_files_readable_by_others_are_refused_and_secrets_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("creds");
        std::fs::write(
            &f,
            "access_key_id = \"AKID\"\nsecret_access_key = \"very-secret\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::load(f.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::load(f.to_str().unwrap()).unwrap();
        assert_eq!(c.access_key_id, "AKID");
        assert!(!format!("{c:?}").contains("very-secret"));
        std::fs::write(&f, "secret_access_key = \"very-secret\"\nnope = 1\n").unwrap();
        let e = Credentials::load(f.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("very-secret"), "{e}");
    }
}
