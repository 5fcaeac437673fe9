//! `replog disk create`, `replog disk list`.

use replog::names::{parse_disk_ref, parse_disk_size};
use replog::{Result, Site};
use std::path::Path;

pub fn create(path: &Path, disk: &str, size: &str, import: Option<&Path>) -> Result<()> {
    let (machine, disk) = parse_disk_ref(disk)?;
    let size = parse_disk_size(size)?;
    Site::read_config(path)?;
    // A running serve opens the file to import itself: give it an absolute path.
    let import = match import {
        Some(p) => Some(std::fs::canonicalize(p).map_err(|e| replog::Error::io("open", p, e))?),
        None => None,
    };
    let reply = replog::control::run(
        path,
        &replog::control::Request::CreateDisk {
            machine,
            disk,
            size,
            import,
        },
    )?;
    println!("{}", reply.detail.unwrap_or_default());
    Ok(())
}

/// `replog machine remove`.
pub fn remove_machine(path: &Path, machine: &str) -> Result<()> {
    replog::names::validate_name("machine", machine)?;
    Site::read_config(path)?;
    let reply = replog::control::run(
        path,
        &replog::control::Request::RemoveMachine {
            machine: machine.to_string(),
        },
    )?;
    println!("{}", reply.detail.unwrap_or_default());
    Ok(())
}

/// A read-only listing: works while serve runs.
pub fn list(path: &Path) -> Result<()> {
    Site::read_config(path)?;
    for m in replog::site::list_machines(path)? {
        let dir = path.join(replog::site::MACHINES_DIR).join(&m);
        let manifest = replog::Machine::read_manifest(&replog::storage::FileStorage, &dir)?;
        for d in manifest.disks {
            println!("{m}/{}\t{} bytes", d.name, d.size);
        }
    }
    Ok(())
}
