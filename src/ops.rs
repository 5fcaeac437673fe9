//! What the commands that change a site do to its files, once: `serve`'s registry
//! calls these (closing and reopening machines around them) when a command reaches it
//! through the control socket, and the command line calls them with the site's lock
//! when no serve runs (`control::offline`).

use crate::error::{Error, Result};
use crate::replication::relationship::{self, Relationship};
use crate::replication::resync_schedule::{self, SourceResync};
use crate::site::Site;
use crate::volume::Machine;
use std::path::Path;

/// Machine `only`, or every machine of the site.
pub fn machines_of(site: &Site, only: Option<&str>) -> Result<Vec<String>> {
    match only {
        Some(m) => {
            must_exist(site, m)?;
            Ok(vec![m.to_string()])
        }
        None => site.machines(),
    }
}

fn must_exist(site: &Site, machine: &str) -> Result<()> {
    if !site
        .machine_dir(machine)?
        .join(crate::volume::MANIFEST_FILE)
        .exists()
    {
        return Err(Error::NotFound(format!(
            "site {} has no machine {machine}",
            site.path().display()
        )));
    }
    Ok(())
}

fn is_protected(site: &Site, machine: &str) -> Result<bool> {
    Ok(Relationship::load(site.path(), machine)?.is_some())
}

/// Create disk `machine/disk` (and the machine, if new) of `size` bytes, optionally
/// importing a raw image. The machine must not be open. A protected machine's set
/// of disks is its replica's too: adding one is refused.
pub fn create_disk(
    site: &Site,
    machine: &str,
    disk: &str,
    size: u64,
    import: Option<&Path>,
) -> Result<()> {
    crate::names::validate_name("machine", machine)?;
    if is_protected(site, machine)? {
        return Err(Error::InvalidInput(format!(
            "{machine} is protected: its replica has the disks it had then, so no disk can \
             be added to it"
        )));
    }
    site.create_disk(machine, disk, size, import)
}

/// Remove machine `machine`'s directory (disks, journal, everything). The machine must
/// not be open. Refused for a protected machine.
pub fn remove_machine_files(site: &Site, machine: &str) -> Result<()> {
    must_exist(site, machine)?;
    if is_protected(site, machine)? {
        return Err(Error::InvalidInput(format!(
            "{machine} is protected; it cannot be removed while its replica depends on it"
        )));
    }
    let dir = site.machine_dir(machine)?;
    std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
    match dir.parent() {
        Some(parent) => crate::storage::Storage::sync_dir(&crate::storage::FileStorage, parent),
        None => Ok(()),
    }
}

/// Record `machine`'s relationship (refused if it has one already).
pub fn record_protection(site: &Site, machine: &str, rel: &Relationship) -> Result<()> {
    must_exist(site, machine)?;
    if let Some(r) = Relationship::load(site.path(), machine)? {
        return Err(Error::AlreadyExists(format!(
            "{machine} is already protected toward {}",
            r.target
        )));
    }
    rel.target_id()?;
    rel.retention_ms()?;
    rel.save(site.path(), machine)?;
    // Read back: the end state the protect job verifies.
    match Relationship::load(site.path(), machine)? {
        Some(back) if back == *rel => Ok(()),
        _ => Err(Error::InvalidInput(format!(
            "{} did not read back as written",
            site.machine_dir(machine)?
                .join(relationship::FILE)
                .display()
        ))),
    }
}

/// A resync of `machine` is required; with `now`, at once, window or not. Returns
/// what to tell the operator.
pub fn require_resync(site: &Site, machine: &str, now: bool) -> Result<String> {
    must_exist(site, machine)?;
    if !is_protected(site, machine)? {
        return Err(Error::InvalidInput(format!(
            "{machine} is not protected; nothing to resynchronise"
        )));
    }
    SourceResync::require(site.path(), machine, "requested by an operator")?;
    if now {
        resync_schedule::request_now(site.path(), machine)?;
        return Ok(format!(
            "{machine}: resync requested now; a running serve starts it within a second"
        ));
    }
    let cfg = &site.config().replication;
    Ok(format!(
        "{machine}: resync required; it starts in the resync window ({}{})",
        cfg.resync_window,
        if cfg.resync_weekends {
            " and weekends"
        } else {
            ""
        }
    ))
}

/// Record whether shipping of `machine` is paused (`replog pause` / `resume`) in its
/// relationship; returns what it was. Refused for a machine that is not protected or
/// was failed over. Whoever calls it holds what keeps the file from changing under it
/// (the site's lock, or serve's `changing` lock of the machine).
pub fn set_shipping_paused(site: &Site, machine: &str, paused: bool) -> Result<bool> {
    must_exist(site, machine)?;
    let man = Machine::read_manifest(&*site.storage(), &site.machine_dir(machine)?)?;
    if man.fence.is_some() {
        return Err(Error::InvalidInput(format!(
            "{machine} was failed over: it ships nothing"
        )));
    }
    let was = Relationship::update(site.path(), machine, |rel| {
        Ok(std::mem::replace(&mut rel.paused, paused))
    })?;
    was.ok_or_else(|| {
        Error::InvalidInput(format!(
            "{machine} is not protected; there is no shipping to {}",
            if paused { "pause" } else { "resume" }
        ))
    })
}

/// Seal `m` and merge what may be merged; what it did, for people. A protected
/// machine's journal is merged only as its target acknowledges it (by serve).
pub fn compact(site: &Path, m: &Machine) -> Result<String> {
    m.flush()?;
    m.seal()?;
    let name = m.name();
    if Relationship::load(site, name)?.is_some() {
        return Ok(format!(
            "{name}: protected; its journal is merged by `replog serve` as the target \
             acknowledges it"
        ));
    }
    let s = m.compact()?;
    Ok(format!(
        "{name}: merged {} segment(s), {} records, {} bytes; watermark LSN {}",
        s.segments,
        s.records,
        s.bytes,
        m.status().watermark.lsn
    ))
}
