//! A machine's replication relationship, `SITE/machines/<m>/relationship.toml`:
//!
//! ```text
//! # replog relationship, format 1
//! target = "10.0.0.2:7000"
//! target_id = "<the target site's ID, 64 hex digits>"
//! ```
//!
//! Written by `replog protect` (atomically, without the site lock, so it works while
//! `serve` runs); a running `serve` picks it up within a second.

use crate::error::{Error, Result};
use crate::identity::SiteId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FILE: &str = "relationship.toml";
const HEADER: &str = "# replog relationship, format 1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relationship {
    pub target: String,
    pub target_id: String,
}

fn path(site: &Path, machine: &str) -> Result<PathBuf> {
    crate::names::validate_name("machine", machine)?;
    Ok(site
        .join(crate::site::MACHINES_DIR)
        .join(machine)
        .join(FILE))
}

impl Relationship {
    pub fn target_id(&self) -> Result<SiteId> {
        SiteId::parse(&self.target_id)
    }

    /// The relationship of `machine`, if it is protected.
    pub fn load(site: &Path, machine: &str) -> Result<Option<Relationship>> {
        let p = path(site, machine)?;
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
        if !text.starts_with(HEADER) {
            return Err(Error::Unsupported {
                path: p,
                what: format!("does not start with {HEADER:?}"),
            });
        }
        let r: Relationship = toml::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", p.display())))?;
        r.target_id()?;
        Ok(Some(r))
    }

    pub fn save(&self, site: &Path, machine: &str) -> Result<()> {
        let p = path(site, machine)?;
        let body = toml::to_string(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{HEADER}\n{body}"))
            .map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::io("rename", &tmp, e))?;
        if let Some(dir) = p.parent() {
            crate::storage::Storage::sync_dir(&crate::storage::FileStorage, dir)?;
        }
        Ok(())
    }
}
