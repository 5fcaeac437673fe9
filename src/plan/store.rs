//! Where a site keeps its recovery plans: `SITE/plans/<name>.toml`, the text as the
//! operator wrote it, stored (atomically) only after it validated against this
//! site. Plans are per site: a plan is added at every site that will run it (the
//! primary site for a planned failover, the target for unplanned and test ones).
//!
//! `SITE/plans/<name>.lock` is held (flock) by the process that runs, resumes,
//! commits or cleans up a run of the plan, and by `add`/`remove`, so none of them
//! overlap; a killed process lets go of it.

use super::file::{self, Checks, Known, Plan};
use crate::error::{Error, Result};
use crate::names::validate_name;
use crate::storage::{write_atomic, FileStorage, Storage};
use std::path::{Path, PathBuf};

pub const PLANS_DIR: &str = "plans";

fn dir(site: &Path) -> PathBuf {
    site.join(PLANS_DIR)
}

fn path_of(site: &Path, name: &str) -> Result<PathBuf> {
    validate_name("plan", name)?;
    Ok(dir(site).join(format!("{name}.toml")))
}

/// What this site is for `machine` (no lock needed: manifests only).
pub fn known(site: &Path, machine: &str) -> Known {
    if validate_name("machine", machine).is_err() {
        return Known::Unknown;
    }
    let mdir = site.join(crate::site::MACHINES_DIR).join(machine);
    if mdir.join(crate::volume::MANIFEST_FILE).is_file() {
        return match crate::volume::Machine::read_manifest(&FileStorage, &mdir) {
            Ok(m) if m.role == crate::protection::Role::Test => Known::TestCopy,
            _ => Known::Primary,
        };
    }
    if crate::replica::store::held_at(site, machine) {
        return Known::Replica;
    }
    Known::Unknown
}

/// The plan lock, held while it lives.
pub struct PlanLock {
    _file: std::fs::File,
}

/// Take plan `name`'s lock, or say who has it.
pub fn lock(site: &Path, name: &str) -> Result<PlanLock> {
    validate_name("plan", name)?;
    FileStorage.create_dir_all(&dir(site))?;
    let p = dir(site).join(format!("{name}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io("open", &p, e))?;
    match f.try_lock() {
        Ok(()) => Ok(PlanLock { _file: f }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Busy(format!(
            "plan {name} is being run, resumed or changed by another process now"
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &p, e)),
    }
}

/// Validate the plan in `text` (from `file`) against this site and store it;
/// `replace`: an existing plan of that name is replaced.
pub fn add(site: &Path, text: &str, file: &str, replace: bool) -> Result<Plan> {
    let known = |m: &str| known(site, m);
    let plan = file::parse(
        text,
        file,
        &Checks {
            machines: Some(&known),
            executables: true,
        },
    )?;
    let _lock = lock(site, &plan.name)?;
    let p = path_of(site, &plan.name)?;
    if p.exists() && !replace {
        return Err(Error::AlreadyExists(format!(
            "this site has a plan {} already (replace it with --replace, or remove it)",
            plan.name
        )));
    }
    if let Some(run) = super::run::unfinished(site, &plan.name)? {
        return Err(Error::InvalidInput(format!(
            "plan {} has an unfinished run (job {}, {}): finish it (`replog plan resume`) or \
             clean it up before the plan changes",
            plan.name,
            run.job,
            run.state.as_str()
        )));
    }
    FileStorage.create_dir_all(&dir(site))?;
    write_atomic(&FileStorage, &p, text.as_bytes())?;
    Ok(plan)
}

/// Plan `name` as stored here.
pub fn load(site: &Path, name: &str) -> Result<Plan> {
    let p = path_of(site, name)?;
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!(
                "this site has no plan {name} (see `replog plan list`)"
            )))
        }
        Err(e) => return Err(Error::io("read", &p, e)),
    };
    let plan = file::parse(&text, &p.display().to_string(), &Checks::STORED)?;
    if plan.name != name {
        return Err(Error::corruption(
            &p,
            0,
            format!("the file holds plan {}, not {name}", plan.name),
        ));
    }
    Ok(plan)
}

/// Every plan stored here, by name.
pub fn list(site: &Path) -> Result<Vec<Plan>> {
    let d = dir(site);
    let mut names: Vec<String> = match std::fs::read_dir(&d) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".toml").map(str::to_string))
            .filter(|n| validate_name("plan", n).is_ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", &d, e)),
    };
    names.sort();
    names.iter().map(|n| load(site, n)).collect()
}

/// Remove plan `name` (refused while a run of it is unfinished).
pub fn remove(site: &Path, name: &str) -> Result<()> {
    let p = path_of(site, name)?;
    let _lock = lock(site, name)?;
    if !p.exists() {
        return Err(Error::NotFound(format!("this site has no plan {name}")));
    }
    if let Some(run) = super::run::unfinished(site, name)? {
        return Err(Error::InvalidInput(format!(
            "plan {name} has an unfinished run (job {}, {}): finish or clean it up first",
            run.job,
            run.state.as_str()
        )));
    }
    FileStorage.remove_file(&p)?;
    FileStorage.sync_dir(&dir(site))
}
