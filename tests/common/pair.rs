//! Two sites for replication tests: a source and an in-process target on 127.0.0.1.

use replog::replication::receiver::Target;
use replog::replication::transport;
use replog::Site;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// `replog <verb...> SITE <rest...>`: the site goes after the verb words given in `verb`.
pub fn replog(args: &[&str], site: &Path) -> String {
    let verb = if args[0] == "disk" { 2 } else { 1 };
    let out = Command::new(env!("CARGO_BIN_EXE_replog"))
        .args(&args[..verb])
        .arg(site)
        .args(&args[verb..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Machine vm1 at site `a`: disk os of `os_size` imported from the bytes `raw` (written
/// to a file beside the site first), and an empty disk data of `data_size`.
pub fn create_vm1(a: &Path, raw: &[u8], os_size: &str, data_size: &str) {
    let raw_path = a.with_extension("os.raw");
    std::fs::write(&raw_path, raw).expect("raw");
    let raw_arg = raw_path.to_str().expect("path");
    replog(
        &[
            "disk", "create", "vm1/os", "--size", os_size, "--import", raw_arg,
        ],
        a,
    );
    replog(&["disk", "create", "vm1/data", "--size", data_size], a);
}

/// Listen for replicas at `site` in this process; returns the address.
pub fn start_target(site: &Path) -> String {
    let s = Site::open(site).expect("open target");
    let addr = start_receiver(site);
    std::mem::forget(s); // the target site stays owned by this test process
    addr
}

/// Listen for replicas at `site` in this process without owning the site (a test
/// opens it as a site later, to fail over); returns the address.
pub fn start_receiver(site: &Path) -> String {
    let key = replog::site::replica_key_at(site).expect("key");
    start_receiver_into(site, replog::replica::store::Replicas::with_key(site, key))
}

/// Listen as `site` in this process, keeping what arrives in `replicas`.
pub fn start_receiver_into(site: &Path, replicas: replog::replica::store::Replicas) -> String {
    let me = replog::identity::Identity::load(site).expect("id").id();
    let target = Arc::new(Target::new(me, replicas));
    let addr = transport::listen(site, "127.0.0.1:0", move |mut stream, peer| {
        target.session_tls(&mut stream, peer)
    })
    .expect("listen");
    addr.to_string()
}

/// `replog init` both sites and make each trust the other.
pub fn trusted_pair(a: &Path, b: &Path) {
    replog(&["init"], a);
    replog(&["init"], b);
    let (ida, idb) = (replog(&["id"], a), replog(&["id"], b));
    replog(&["trust", &idb], a);
    replog(&["trust", &ida], b);
}

/// Two trusted sites under a temporary directory: the source `a` with disk vm1/os of
/// `size` (a `replog disk create --size` value), the target `b` listening at `addr`
/// in this process.
pub struct OneDisk {
    pub tmp: tempfile::TempDir,
    pub a: std::path::PathBuf,
    pub b: std::path::PathBuf,
    pub addr: String,
}

pub fn one_disk(size: &str) -> OneDisk {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    trusted_pair(&a, &b);
    replog(&["disk", "create", "vm1/os", "--size", size], &a);
    let addr = start_target(&b);
    OneDisk { tmp, a, b, addr }
}

/// Restore the replica of vm1 at site `b` at POINT `at` into `out`.
pub fn restore(
    b: &Path,
    at: &str,
    out: &Path,
) -> replog::Result<replog::replica::restore::Restored> {
    let key = replog::site::replica_key_at(b)?;
    let store = replog::replica::store::Replicas::with_key(b, key).open_readonly("vm1")?;
    replog::replica::restore::restore_at(store, at, out, &|_, _| {})
}
