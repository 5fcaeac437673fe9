//! `replog disk create`, `replog disk list`.

use replog::names::{parse_disk_ref, parse_disk_size};
use replog::{Result, Site};
use std::path::Path;

pub fn create(path: &Path, disk: &str, size: &str, import: Option<&Path>) -> Result<()> {
    let (machine, disk) = parse_disk_ref(disk)?;
    let size = parse_disk_size(size)?;
    let site = Site::open(path)?;
    site.create_disk(&machine, &disk, size, import)?;
    println!("created disk {machine}/{disk} ({size} bytes)");
    Ok(())
}

pub fn list(path: &Path) -> Result<()> {
    let site = Site::open(path)?;
    for m in site.machines()? {
        let dir = site.machine_dir(&m)?;
        let manifest = replog::Machine::read_manifest(site.storage().as_ref(), &dir)?;
        for d in manifest.disks {
            println!("{m}/{}\t{} bytes", d.name, d.size);
        }
    }
    Ok(())
}
