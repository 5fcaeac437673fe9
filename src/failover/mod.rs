//! Failover: a replica becomes a machine of this site — promoted (planned or
//! unplanned failover) or as an isolated test copy — and what follows before and at
//! commit (change of point, cancel, commit and the fold, cleanup of a test copy).
//!
//! Promotion copies nothing. The new machine's `machine.meta` (version 3) names its
//! base — the replica and the point's LSN — and each disk's parent is that point
//! (`volume::PointParent`), read through the replay engine; its journal starts
//! after the point (the watermark is set to it), so one LSN space runs through both
//! generations. Order, each step durable before the next:
//!
//! 1. the replica's `promoted.meta` (not for a test copy): from here on the
//!    receiver refuses the old generation as fenced, and the replica's loops stand
//!    still;
//! 2. the machine's directory: journal and disks directories, the watermark at the
//!    point, then the manifest — the commit point: a directory without one is a
//!    promotion that did not happen, removed by the next attempt.
//!
//! Each function works on files, with the machine closed; the [`Host`] (serve's
//! registry, or an offline site) opens and closes machines around it, so the mount
//! shows a promoted machine or a test copy at once.

pub mod planned;
pub mod reprotect;
pub mod run;
pub mod verify;

use crate::error::{Error, Result};
use crate::format::meta::{Manifest, Watermark};
use crate::jobs::{JobHandle, JobKind};
use crate::names::validate_name;
use crate::protection::{Base, FailoverKind, Pending, Role};
use crate::replica::replay::PointImage;
use crate::replica::store::{Promotion, Replicas};
use crate::site::Site;
use crate::storage::write_atomic;
use crate::volume::{Machine, DISKS_DIR, JOURNAL_DIR, MANIFEST_FILE, WATERMARK_FILE};
use std::path::Path;
use std::sync::Arc;

/// Who holds the machines open: serve's registry (the mount follows), or nobody
/// (offline, under the site's lock).
pub trait Host {
    fn site(&self) -> &Site;
    fn replicas(&self) -> &Replicas;
    /// Machine `name` now exists (or changed) on disk: open it, show it.
    fn open(&self, name: &str) -> Result<()>;
    /// Machine `name` is about to change on disk (or go): close it.
    fn close(&self, name: &str) -> Result<()>;
    /// Machine `name` is about to change on disk and opens again right after: close
    /// it, keeping it where people see it meanwhile (serve: under the mount, where a
    /// write in flight waits for the reopened machine, and in status).
    fn close_to_reopen(&self, name: &str) -> Result<()> {
        self.close(name)
    }
    /// Machine `name`, open (serve: the open one; offline: opened now).
    fn machine(&self, name: &str) -> Result<Arc<Machine>>;
    /// Machine `name` was failed over (its fence persisted, in memory too): from now
    /// on it ships and merges nothing, and what its target never acknowledged stays
    /// in its journal. The default closes and opens it again (a failed-over machine
    /// opens without loops); a host that knows its loops stops them in place, which
    /// spares reading the whole journal again.
    fn stop_loops(&self, name: &str) -> Result<()> {
        self.close_to_reopen(name)?;
        self.open(name)
    }
}

/// The default name of a test copy of `machine`.
pub fn test_name(machine: &str) -> String {
    format!("{machine}-test")
}

/// What a promotion made.
#[derive(Debug, Clone)]
pub struct Promoted {
    /// The machine's name at this site (the replica's, or the test copy's).
    pub name: String,
    pub kind: FailoverKind,
    pub lsn: u64,
    pub time_ns: u64,
    pub app_consistent: bool,
    pub generation: u32,
}

/// Make replica `machine` (at POINT `at`) a machine of this site: promoted as
/// `kind` (planned, unplanned), or as test copy `as_name`. Nothing is copied; see
/// the module documentation for the order.
pub fn promote(
    site: &Site,
    replicas: &Replicas,
    machine: &str,
    at: &str,
    kind: FailoverKind,
    as_name: Option<&str>,
) -> Result<Promoted> {
    validate_name("machine", machine)?;
    let fs = site.storage();
    if !replicas.has(machine) {
        return Err(Error::NotFound(format!(
            "this site holds no replica of {machine}{}",
            if fs.exists(&site.machine_dir(machine)?.join(MANIFEST_FILE)) {
                " (it is a machine of this site: fail it over where its replica is)"
            } else {
                ""
            }
        )));
    }
    let name = match (kind, as_name) {
        (FailoverKind::Test, Some(n)) => n.to_string(),
        (FailoverKind::Test, None) => test_name(machine),
        (_, Some(_)) => {
            return Err(Error::InvalidInput(
                "--as names a test copy; it goes with --test".into(),
            ))
        }
        (_, None) => machine.to_string(),
    };
    validate_name("test copy", &name)?;
    let store = replicas.open_readonly(machine)?;
    if let Some(p) = store.promotion()? {
        return Err(Error::InvalidInput(format!(
            "{machine} was already failed over ({}, at LSN {}, {}){}",
            p.kind,
            p.lsn,
            crate::format::rfc3339(p.at_ns),
            if p.committed {
                "; it is committed"
            } else {
                "; commit it, change its point or cancel it"
            }
        )));
    }
    let dir = site.machine_dir(&name)?;
    if fs.exists(&dir.join(MANIFEST_FILE)) {
        return Err(Error::AlreadyExists(format!(
            "this site already has a machine {name}{}",
            if kind == FailoverKind::Test {
                "; choose another name with --as"
            } else {
                ""
            }
        )));
    }
    if kind == FailoverKind::Test && replicas.has(&name) {
        return Err(Error::AlreadyExists(format!(
            "this site holds a replica named {name}; choose another name with --as"
        )));
    }
    // Resolve and pin the point (refused: no point, initial copy unfinished, a
    // resync under way, an expired or unknown point).
    let image = PointImage::open(store, at)?;
    let point = image.point().clone();
    let manifest_r = image.store().manifest().clone();
    let generation = image.store().generation();
    let me = crate::identity::Identity::load(site.path())?.id();
    let new_generation = match kind {
        FailoverKind::Test => generation,
        _ => generation + 1,
    };
    if kind != FailoverKind::Test {
        image.store().set_promotion(Some(&Promotion {
            kind,
            generation: new_generation,
            from_generation: generation,
            lsn: point.lsn,
            at_ns: crate::format::now_ns(),
            site: me.0,
            committed: false,
        }))?;
        crate::failpoint::hit("promote:after-record");
    }
    let made = (|| -> Result<()> {
        // A promotion that died before its manifest: nothing of it counts.
        fs.remove_tree(&dir)?;
        fs.create_dir_all(&dir.join(JOURNAL_DIR))?;
        fs.create_dir_all(&dir.join(DISKS_DIR))?;
        write_atomic(
            fs.as_ref(),
            &dir.join(JOURNAL_DIR).join(WATERMARK_FILE),
            &Watermark {
                lsn: point.lsn,
                segment_seq: 0,
            }
            .encode(),
        )?;
        let manifest = Manifest {
            disks: manifest_r.disks.clone(),
            role: match kind {
                FailoverKind::Test => Role::Test,
                _ => Role::Primary,
            },
            generation: new_generation,
            base: Some(Base {
                replica: machine.to_string(),
                lsn: point.lsn,
                time_ns: point.time_ns,
            }),
            pending: (kind != FailoverKind::Test).then(|| Pending {
                kind,
                from_generation: generation,
                source_site: manifest_r.source_site,
                started_ns: crate::format::now_ns(),
            }),
            ..Manifest::new(manifest_r.machine_id)
        };
        write_atomic(fs.as_ref(), &dir.join(MANIFEST_FILE), &manifest.encode())?;
        if let Some(parent) = dir.parent() {
            fs.sync_dir(parent)?;
        }
        Ok(())
    })();
    if let Err(e) = made {
        // The machine goes (manifest first) before the record: never a writable
        // machine beside a replica that takes the old generation again. If it cannot
        // go, the record stays and the next start's reconcile decides.
        let gone = remove_machine_dir(site, &dir);
        if kind != FailoverKind::Test && gone.is_ok() {
            let _ = image.store().set_promotion(None);
        }
        return Err(e);
    }
    Ok(Promoted {
        name,
        kind,
        lsn: point.lsn,
        time_ns: point.time_ns,
        app_consistent: point.app_consistent,
        generation: new_generation,
    })
}

/// Whether a machine with manifest `man` is what a failover of `kind` of replica
/// `replica` makes: it stands on the replica, and is a test copy (test) or has that
/// failover pending (planned, unplanned).
pub fn made_by(man: &Manifest, replica: &str, kind: FailoverKind) -> bool {
    man.base.as_ref().is_some_and(|b| b.replica == replica)
        && match kind {
            FailoverKind::Test => man.role == Role::Test,
            _ => man.pending.as_ref().is_some_and(|p| p.kind == kind),
        }
}

/// The manifest of machine `name`, refused unless it exists.
fn manifest_of(site: &Site, name: &str) -> Result<Manifest> {
    let dir = site.machine_dir(name)?;
    if !site.storage().exists(&dir.join(MANIFEST_FILE)) {
        return Err(Error::NotFound(format!("this site has no machine {name}")));
    }
    Machine::read_manifest(site.storage().as_ref(), &dir)
}

fn pending_of(site: &Site, name: &str) -> Result<(Manifest, Pending, Base)> {
    if !site
        .storage()
        .exists(&site.machine_dir(name)?.join(MANIFEST_FILE))
    {
        return Err(Error::InvalidInput(format!(
            "{name} has no failover pending (it is not a machine of this site; nothing to \
             commit, change or cancel)"
        )));
    }
    let m = manifest_of(site, name)?;
    match (&m.pending, &m.base) {
        (Some(p), Some(b)) => {
            let (p, b) = (p.clone(), b.clone());
            Ok((m, p, b))
        }
        _ => Err(Error::InvalidInput(format!(
            "{name} has no failover pending (nothing to commit, change or cancel)"
        ))),
    }
}

/// Remove machine directory `dir` of `site` durably, its manifest first
/// ([`crate::storage::remove_committed_dir`]).
pub(crate) fn remove_machine_dir(site: &Site, dir: &Path) -> Result<()> {
    crate::storage::remove_committed_dir(site.storage().as_ref(), dir, MANIFEST_FILE)
}

/// Bytes machine `name` changed since its point (each byte once, however often it
/// was written): what a change of point or a cancel drops.
fn written_since(host: &dyn Host, name: &str) -> Result<u64> {
    Ok(host.machine(name)?.journal_extent_bytes())
}

/// Cancel an unplanned failover of `name`: the promoted machine goes (with what was
/// written to it), the replica is a replica again and takes the source's
/// replication. Returns the bytes dropped.
pub fn cancel(host: &dyn Host, name: &str) -> Result<u64> {
    let site = host.site();
    let replica = host.replicas().open_readonly(name)?;
    let promotion = replica.promotion()?;
    let dir = site.machine_dir(name)?;
    if !site.storage().exists(&dir.join(MANIFEST_FILE)) {
        // A cancel that died after removing the machine: finish it.
        return match promotion {
            Some(p) if !p.committed => {
                replica.set_promotion(None)?;
                Ok(0)
            }
            _ => Err(Error::InvalidInput(format!(
                "{name} has no failover pending (nothing to cancel)"
            ))),
        };
    }
    let (_, pending, _) = pending_of(site, name)?;
    if promotion.as_ref().is_some_and(|p| p.committed) {
        return Err(Error::InvalidInput(format!(
            "the failover of {name} was committed (a commit stopped before it ended): it \
             cannot be cancelled; finish it with `replog commit`"
        )));
    }
    if pending.kind != FailoverKind::Unplanned {
        return Err(Error::InvalidInput(format!(
            "{name} was failed over by a planned failover: its old primary is fenced, so \
             it cannot be cancelled (commit it, then fail back)"
        )));
    }
    let dropped = written_since(host, name)?;
    host.close(name)?;
    remove_machine_dir(site, &dir)?;
    replica.set_promotion(None)?;
    Ok(dropped)
}

/// Move the pending failover of `name` to POINT `at`: the writes made since are
/// dropped. Returns (the new point's LSN, the bytes dropped).
pub fn change_point(host: &dyn Host, name: &str, at: &str) -> Result<(u64, u64)> {
    let site = host.site();
    let (manifest, _pending, base) = pending_of(site, name)?;
    let store = host.replicas().open_readonly(&base.replica)?;
    let promotion = store.promotion()?;
    // Resolve (and check) the new point before anything changes.
    let image = PointImage::open(store, at)?;
    let dropped = written_since(host, name)?;
    host.close_to_reopen(name)?;
    let changed = move_to_point(host, name, manifest, base, promotion, image);
    // Open again whatever happened: the machine as it now is on disk (an error
    // leaves the old point or the new, never a mix).
    let reopened = host.open(name);
    let lsn = changed?;
    reopened?;
    Ok((lsn, dropped))
}

/// The files' part of [`change_point`], with the machine closed.
fn move_to_point(
    host: &dyn Host,
    name: &str,
    mut manifest: Manifest,
    base: Base,
    promotion: Option<Promotion>,
    image: PointImage,
) -> Result<u64> {
    let site = host.site();
    let point = image.point().clone();
    let dir = site.machine_dir(name)?;
    let fs = site.storage();
    let jdir = dir.join(JOURNAL_DIR);
    // The journal first (every record of the dropped writes), newest segment first
    // so that what a crash leaves is a prefix of it, then the watermark, then the
    // manifest: a crash leaves the old point with a prefix of its writes (the
    // change not made), or the new point with none.
    for f in fs.list_dir(&jdir)?.into_iter().rev() {
        if f != WATERMARK_FILE {
            fs.remove_file(&jdir.join(f))?;
        }
    }
    fs.sync_dir(&jdir)?;
    write_atomic(
        fs.as_ref(),
        &jdir.join(WATERMARK_FILE),
        &Watermark {
            lsn: point.lsn,
            segment_seq: 0,
        }
        .encode(),
    )?;
    manifest.base = Some(Base {
        lsn: point.lsn,
        time_ns: point.time_ns,
        ..base
    });
    write_atomic(fs.as_ref(), &dir.join(MANIFEST_FILE), &manifest.encode())?;
    if let Some(mut p) = promotion {
        p.lsn = point.lsn;
        image.store().set_promotion(Some(&p))?;
    }
    Ok(point.lsn)
}

/// Commit the pending failover of `name`: no way back; the replica's other points
/// go; the machine is a primary of this site. Then the fold makes its parents
/// local files and the replica is removed.
pub fn commit(host: &dyn Host, name: &str, job: &mut JobHandle) -> Result<()> {
    let site = host.site();
    if let Some(finished) = unfinished_commit(host, name)? {
        job.step("commit");
        job.step_done(Some(finished))?;
        return fold(host, name, job);
    }
    let (_, pending, base) = pending_of(site, name)?;
    let store = host.replicas().open_readonly(&base.replica)?;
    job.step("commit");
    match store.promotion()? {
        Some(mut p) => {
            p.committed = true;
            store.set_promotion(Some(&p))?;
        }
        None => {
            return Err(Error::InvalidInput(format!(
                "replica {} has no promotion record; {name} cannot be committed",
                base.replica
            )))
        }
    }
    let m = host.machine(name)?;
    m.clear_pending()?;
    job.step_done(Some(format!(
        "{} failover at LSN {} committed; generation {}",
        pending.kind,
        base.lsn,
        m.generation()
    )))?;
    drop(m);
    fold(host, name, job)
}

/// A commit of `name` that stopped (a crash, a failed fold) after the replica's
/// promotion record and the machine's manifest said committed: what it left to do
/// is the fold and the replica's removal. Some(what was done) when that is so.
fn unfinished_commit(host: &dyn Host, name: &str) -> Result<Option<String>> {
    let site = host.site();
    if !site
        .storage()
        .exists(&site.machine_dir(name)?.join(MANIFEST_FILE))
    {
        return Ok(None);
    }
    let man = manifest_of(site, name)?;
    if man.pending.is_some() || man.role != Role::Primary {
        return Ok(None);
    }
    // Its own replica (a test copy's base is another name, and a test copy is no
    // primary), promoted to this generation and committed.
    let replica = man.base.as_ref().map_or(name, |b| b.replica.as_str());
    if replica != name || !host.replicas().has(name) {
        return Ok(None);
    }
    let committed = host
        .replicas()
        .open_readonly(name)?
        .promotion()?
        .filter(|p| p.committed && p.generation == man.generation);
    Ok(committed.map(|p| {
        format!(
            "{} failover at LSN {} was committed before; finishing it",
            p.kind, p.lsn
        )
    }))
}

/// Write the parents of `name` (standing on a replica point) as local parent
/// images, verified against the point's digests, swap them in, and remove the
/// replica once nothing else stands on it.
pub fn fold(host: &dyn Host, name: &str, job: &mut JobHandle) -> Result<()> {
    let site = host.site();
    let manifest = manifest_of(site, name)?;
    let Some(base) = manifest.base.clone() else {
        // Folded before; the replica may be left (a crash before its removal).
        if host.replicas().has(name) && !stands_on(site, name)? {
            job.step("remove replica");
            host.replicas().remove(name)?;
            job.step_done(Some(format!("replica {name} removed")))?;
        }
        return Ok(());
    };
    job.step("fold");
    let dir = site.machine_dir(name)?;
    let work = dir.join("fold");
    let fs = site.storage();
    fs.remove_tree(&work)?;
    let image = PointImage::open_exact(host.replicas().open_readonly(&base.replica)?, base.lsn)?;
    let restored = crate::replica::restore::restore_on(fs.as_ref(), &image, &work, &|_, _| {})?;
    drop(image);
    let mut parents: Vec<Arc<dyn crate::storage::StorageFile>> = Vec::new();
    for d in &manifest.disks {
        let from = work.join(format!("{}.img", d.name));
        let to = dir.join(DISKS_DIR).join(format!("{}.img", d.name));
        fs.rename(&from, &to)?;
        parents.push(fs.open(&to, crate::storage::OpenMode::ReadWrite)?);
    }
    fs.sync_dir(&dir.join(DISKS_DIR))?;
    let _ = fs.remove_dir(&work);
    let m = host.machine(name)?;
    // From here on the machine remembers what it changes since the point — and
    // what the replica had after it, which its old primary wrote — so that a
    // reprotect toward the old primary sends only what differs. Before the hold goes:
    // everything written since the point is still in the journal.
    if m.changed_map().is_none() {
        m.start_tracking(foreign_ranges(
            host.replicas(),
            &base,
            manifest.disks.len(),
        )?)?;
    }
    m.finish_fold(parents)?;
    drop(m);
    job.step_done(Some(format!(
        "{} bytes of parent images written from the replica at LSN {}{}",
        restored.bytes_written,
        base.lsn,
        if restored.verified {
            ", every disk matching the point's digests"
        } else {
            ""
        }
    )))?;
    // The replica goes once nothing stands on it (a test copy may).
    if !stands_on(site, &base.replica)? {
        job.step("remove replica");
        host.replicas().remove(&base.replica)?;
        job.step_done(Some(format!("replica {} removed", base.replica)))?;
    }
    Ok(())
}

/// The ranges replica `base.replica` stored after the promoted point: what its old
/// primary wrote that the point did not take.
fn foreign_ranges(
    replicas: &Replicas,
    base: &Base,
    disks: usize,
) -> Result<crate::volume::ChangedMap> {
    let store = replicas.open_readonly(&base.replica)?;
    let received = store.received();
    let mut map = crate::volume::ChangedMap::new(base.lsn, Some(received.lsn), disks);
    for seq in store.parent().seq + 1..=received.segment_seq {
        let index = store.segment_index(seq)?;
        if index.last_lsn <= base.lsn {
            continue;
        }
        for r in index.records.iter().filter(|r| r.lsn > base.lsn) {
            map.add(r.disk, r.offset, r.length);
        }
    }
    Ok(map)
}

/// A promotion that died before its machine's manifest was written did not happen:
/// its record goes (and the source may replicate again); what an interrupted
/// creation or removal left of a replica (no manifest) goes too. Run before a site
/// opens its machines and replicas. Returns the replicas it mended.
pub fn reconcile(site: &Site, replicas: &Replicas) -> Result<Vec<String>> {
    for r in replicas.backend().remove_leftovers()? {
        tracing::warn!(replica = %r, "removed what an interrupted creation or removal left of replica {r}");
    }
    let mut mended = Vec::new();
    for r in replicas.machines()? {
        let store = replicas.open_readonly(&r)?;
        let Some(p) = store.promotion()? else {
            continue;
        };
        let machine = site.machine_dir(&r)?;
        if p.committed || site.storage().exists(&machine.join(MANIFEST_FILE)) {
            continue;
        }
        if site.storage().exists(&machine) {
            remove_machine_dir(site, &machine)?;
        }
        store.set_promotion(None)?;
        tracing::warn!(
            replica = %r,
            "a {} failover of {r} did not complete (no promoted machine): it is a replica again",
            p.kind
        );
        mended.push(r);
    }
    Ok(mended)
}

/// Whether a machine of `site` stands on replica `replica`.
pub fn stands_on(site: &Site, replica: &str) -> Result<bool> {
    for m in site.machines()? {
        // Changes to other machines go on meanwhile (serve locks per name): one
        // removed since the listing stands on nothing.
        let dir = site.machine_dir(&m)?;
        let man = match Machine::read_manifest(site.storage().as_ref(), &dir) {
            Ok(man) => man,
            Err(_) if !site.storage().exists(&dir.join(MANIFEST_FILE)) => continue,
            Err(e) => return Err(e),
        };
        if man.base.as_ref().is_some_and(|b| b.replica == replica) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Remove test copy `name` of replica `replica`; the replica is left as it was. A
/// copy of another replica is refused before anything changes.
pub fn cleanup_test(host: &dyn Host, replica: &str, name: &str) -> Result<Base> {
    let site = host.site();
    let m = manifest_of(site, name)?;
    let base = match (m.role, m.base) {
        (Role::Test, Some(b)) => b,
        _ => {
            return Err(Error::InvalidInput(format!(
                "{name} is not a test copy (role {}); only test copies are cleaned up",
                m.role
            )))
        }
    };
    if base.replica != replica {
        return Err(Error::InvalidInput(format!(
            "{name} is a test copy of {}, not of {replica}",
            base.replica
        )));
    }
    host.close(name)?;
    remove_machine_dir(site, &site.machine_dir(name)?)?;
    Ok(base)
}

/// The job kind of a failover of `kind`.
pub fn job_kind(kind: FailoverKind) -> JobKind {
    match kind {
        FailoverKind::Planned => JobKind::FailoverPlanned,
        FailoverKind::Unplanned => JobKind::FailoverUnplanned,
        FailoverKind::Test => JobKind::FailoverTest,
    }
}

/// A site with no serve running: machines opened as the commands need them, closed
/// when it is dropped.
pub struct Offline {
    site: Site,
    replicas: Replicas,
    open: parking_lot::Mutex<std::collections::BTreeMap<String, Arc<Machine>>>,
}

impl Offline {
    pub fn new(site: Site) -> Result<Offline> {
        let replicas = site.replicas()?;
        Ok(Offline {
            site,
            replicas,
            open: parking_lot::Mutex::new(Default::default()),
        })
    }
}

impl Host for Offline {
    fn site(&self) -> &Site {
        &self.site
    }

    fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    fn open(&self, name: &str) -> Result<()> {
        self.machine(name).map(|_| ())
    }

    fn close(&self, name: &str) -> Result<()> {
        let m = self.open.lock().remove(name);
        match m.map(Arc::try_unwrap) {
            Some(Ok(m)) => m.close(),
            Some(Err(_)) => Err(Error::Busy(format!("{name} is still in use"))),
            None => Ok(()),
        }
    }

    /// An offline site runs no loops (nothing starts a compactor here).
    fn stop_loops(&self, name: &str) -> Result<()> {
        if let Some(m) = self.open.lock().get(name) {
            m.stop_compactor();
        }
        Ok(())
    }

    fn machine(&self, name: &str) -> Result<Arc<Machine>> {
        let mut open = self.open.lock();
        if let Some(m) = open.get(name) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.site.open_machine(name)?);
        open.insert(name.to_string(), m.clone());
        Ok(m)
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        let names: Vec<String> = self.open.lock().keys().cloned().collect();
        for n in names {
            if let Err(e) = Host::close(self, &n) {
                tracing::error!(machine = %n, "close: {e}");
            }
        }
    }
}
