//! `replog init`, `replog compact`, `replog status`.

use replog::format::rfc3339;
use replog::{Result, Site};
use serde_json::json;
use std::path::Path;

pub fn init(path: &Path) -> Result<()> {
    Site::init(path)?;
    let id = replog::identity::Identity::load(path)?.id();
    println!("created site {} (ID {id})", path.display());
    Ok(())
}

pub fn id(path: &Path) -> Result<()> {
    Site::read_config(path)?;
    println!("{}", replog::identity::Identity::load(path)?.id());
    Ok(())
}

pub fn trust(path: &Path, peer: &str) -> Result<()> {
    Site::read_config(path)?;
    let peer = replog::identity::SiteId::parse(peer)?;
    let me = replog::identity::Identity::load(path)?.id();
    if peer == me {
        return Err(replog::Error::InvalidInput(format!(
            "{peer} is this site's own ID; trust the other site's ID"
        )));
    }
    if replog::identity::trust(path, peer)? {
        println!("{} now trusts {peer}", path.display());
    } else {
        println!("{} already trusts {peer}", path.display());
    }
    Ok(())
}

fn machines(site: &Site, only: Option<&str>) -> Result<Vec<String>> {
    match only {
        Some(m) => {
            site.machine_dir(m)?;
            Ok(vec![m.to_string()])
        }
        None => site.machines(),
    }
}

pub fn compact(path: &Path, only: Option<&str>) -> Result<()> {
    let site = Site::open(path)?;
    for name in machines(&site, only)? {
        let m = site.open_machine(&name)?;
        m.flush()?;
        m.seal()?;
        let s = m.compact()?;
        println!(
            "{name}: merged {} segment(s), {} records, {} bytes; watermark LSN {}",
            s.segments,
            s.records,
            s.bytes,
            m.status().watermark.lsn
        );
        m.close()?;
    }
    Ok(())
}

pub fn status(path: &Path, only: Option<&str>, as_json: bool) -> Result<()> {
    let site = Site::open(path)?;
    let mut out = Vec::new();
    for name in machines(&site, only)? {
        let m = site.open_machine(&name)?;
        let s = m.status();
        out.push(json!({
            "name": name,
            "role": "primary",
            "state": "unprotected",
            "health": if s.poisoned.is_some() { "critical" } else { "healthy" },
            "reason": s.poisoned.clone().unwrap_or_else(|| "not protected yet; journal healthy".into()),
            "lag_seconds": null,
            "journal_bytes": s.journal_bytes,
            "progress": null,
            "last_point": s.last_point.map(|p| json!({"lsn": p.lsn, "time": rfc3339(p.time_ns)})),
            "disks": m.disk_names(),
            "last_lsn": s.last_lsn,
            "watermark_lsn": s.watermark.lsn,
            "sealed_segments": s.sealed_segments,
        }));
    }
    if as_json {
        let doc = json!({"site": path.display().to_string(), "machines": out});
        println!("{doc}");
    } else {
        for m in &out {
            println!(
                "{}: {} / {} — {}; journal {} bytes in {} sealed segment(s) + active; LSN {}, watermark {}; last point {}",
                m["name"].as_str().unwrap_or(""),
                m["state"].as_str().unwrap_or(""),
                m["health"].as_str().unwrap_or(""),
                m["reason"].as_str().unwrap_or(""),
                m["journal_bytes"],
                m["sealed_segments"],
                m["last_lsn"],
                m["watermark_lsn"],
                m["last_point"]["lsn"],
            );
        }
    }
    Ok(())
}
