//! `replog init`, `replog compact`, `replog status`.

use replog::{Result, Site};
use std::path::Path;

/// `replog init`'s replica-store options.
pub struct StoreArgs {
    pub replica_store: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_credentials_file: Option<std::path::PathBuf>,
    pub s3_unfenced: bool,
}

pub fn init(path: &Path, args: StoreArgs) -> Result<()> {
    let mut cfg = replog::config::SiteConfig::default();
    if let Some(store) = args.replica_store {
        cfg.replica.store = store;
        cfg.replica.s3.endpoint = args.s3_endpoint.unwrap_or_default();
        cfg.replica.s3.unfenced = args.s3_unfenced;
        if let Some(r) = args.s3_region {
            cfg.replica.s3.region = r;
        }
        if let Some(f) = args.s3_credentials_file {
            let f = std::path::absolute(&f).map_err(|e| replog::Error::io("resolve", &f, e))?;
            cfg.replica.s3.credentials_file = f.display().to_string();
        }
    }
    let store = cfg.replica.store.clone();
    Site::init_with(path, cfg)?;
    let id = replog::identity::Identity::load(path)?.id();
    println!("created site {} (ID {id})", path.display());
    if !store.is_empty() {
        println!("replicas received here are kept in {store}");
    }
    Ok(())
}

pub fn id(path: &Path) -> Result<()> {
    Site::read_config(path)?;
    println!("{}", replog::identity::Identity::load(path)?.id());
    Ok(())
}

pub fn identity_show(path: &Path, json: bool) -> Result<()> {
    Site::read_config(path)?;
    let me = replog::identity::Identity::load(path)?;
    let now = replog::format::now_ns() / 1_000_000_000;
    let end = me.not_after()?;
    let until = replog::identity::date_of(end);
    let warning =
        replog::identity::expiry_warning(path, end, i64::try_from(now).unwrap_or(i64::MAX));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "id": me.id().to_string(),
                "certificate": me.cert_id().to_string(),
                "not_after": until,
                "rotations": me.rotations(),
                "warning": warning,
            })
        );
    } else {
        println!("id           {}", me.id());
        println!("certificate  {}", me.cert_id());
        println!("valid until  {until}");
        println!("rotations    {}", me.rotations());
        if let Some(w) = warning {
            println!("WARNING      {w}");
        }
    }
    Ok(())
}

pub fn identity_rotate(path: &Path, valid_days: Option<u32>) -> Result<()> {
    Site::read_config(path)?;
    // No serve may run: it holds the identity, and may create the replica key in it.
    let site = match Site::open(path) {
        Err(replog::Error::Locked(_)) => {
            return Err(replog::Error::Busy(format!(
                "serve is running on {}: stop it, rotate, then start it again",
                path.display()
            )))
        }
        other => other?,
    };
    let (old, new) = replog::identity::Identity::rotate(path, valid_days)?;
    drop(site);
    let id = replog::identity::Identity::load(path)?.id();
    println!("rotated: certificate {old} -> {new}; the site's ID stays {id}");
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

pub fn compact(path: &Path, only: Option<&str>) -> Result<()> {
    Site::read_config(path)?;
    let reply = replog::control::run(
        path,
        &replog::control::Request::Compact {
            machine: only.map(str::to_string),
        },
    )?;
    println!("{}", reply.detail.unwrap_or_default());
    Ok(())
}

pub fn status(path: &Path, only: Option<&str>, as_json: bool) -> Result<()> {
    use replog::protection::status::SiteStatus;
    let doc: SiteStatus = match Site::open(path) {
        // `serve` owns the site: it keeps status.json current.
        Err(replog::Error::Locked(_)) => SiteStatus::load(path)?,
        Err(e) => return Err(e),
        Ok(site) => {
            let mut machines = Vec::new();
            // MACHINE may be a replica only: filtered below, refused if nothing matches.
            let names = site.machines()?;
            for name in names
                .iter()
                .filter(|n| only.is_none_or(|o| o == n.as_str()))
            {
                let m = site.open_machine(name)?;
                machines.push(replog::protection::status::offline_primary(path, &m)?);
            }
            machines.extend(replog::protection::status::replicas_status(
                &replog::replica::store::Replicas::local(path)?,
            ));
            let identity = replog::protection::status::IdentityFacts::load(path);
            SiteStatus {
                site: identity.id.clone(),
                machines,
                as_of_ns: replog::format::now_ns(),
                warnings: identity.warnings(path),
            }
        }
    };
    let mut doc = doc;
    if let Some(m) = only {
        doc.machines.retain(|x| x.name == m);
        if doc.machines.is_empty() {
            return Err(replog::Error::NotFound(format!(
                "site {} has no machine or replica {m}",
                path.display()
            )));
        }
    }
    if as_json {
        println!("{}", serde_json::to_string(&doc).unwrap_or_default());
    } else {
        for w in &doc.warnings {
            println!("site: WARNING {w}");
        }
        for m in &doc.machines {
            let lag = m
                .lag_seconds
                .map(|l| format!("lag {l:.1} s; "))
                .unwrap_or_default();
            let progress = m
                .progress
                .map(|p| {
                    let verb = if m.state == replog::protection::State::Resyncing {
                        "compared"
                    } else {
                        "copied"
                    };
                    format!("{:.0}% {verb}; ", p * 100.0)
                })
                .unwrap_or_default();
            let resync = m
                .resync
                .map(|r| {
                    format!(
                        "resync: {}/{} chunks compared, {} sent ({} bytes){}; ",
                        r.chunks_compared,
                        r.chunks_total,
                        r.chunks_sent,
                        r.bytes_sent,
                        if r.resumed_from > 0 {
                            format!(", resumed at {}", r.resumed_from)
                        } else {
                            String::new()
                        }
                    )
                })
                .unwrap_or_default();
            let reprotect = m
                .reprotect
                .as_ref()
                .map(|r| {
                    format!(
                        "reprotect: {}, {} of {} bytes that differ sent, {} blocks left{}; ",
                        r.stage,
                        r.bytes_sent,
                        r.bytes_total,
                        r.blocks_left,
                        r.orphan
                            .as_ref()
                            .map(|o| format!(", orphan point {o} kept"))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            let scrub = m
                .scrub
                .as_ref()
                .map(|s| match (&s.last_full, &s.found) {
                    (_, Some(found)) => format!("scrub found: {found}; "),
                    (Some(t), None) => {
                        format!("scrub: all {} objects verified at {t}; ", s.objects)
                    }
                    (None, None) => {
                        format!("scrub: first round, {} objects so far; ", s.in_progress)
                    }
                })
                .unwrap_or_default();
            let journal = if m.role == replog::protection::Role::Replica {
                String::new()
            } else if m.journal_spare_bytes > 0 {
                format!(
                    "journal {} bytes (+{} in spare segment files); ",
                    m.journal_bytes, m.journal_spare_bytes
                )
            } else {
                format!("journal {} bytes; ", m.journal_bytes)
            };
            println!(
                "{} ({}, generation {}): {} / {} — {}; {lag}{progress}{resync}{reprotect}{scrub}{journal}last point {}",
                m.name,
                m.role,
                m.generation,
                m.state,
                m.health,
                m.reason,
                m.last_point
                    .as_ref()
                    .map(|p| format!("LSN {} at {}", p.lsn, p.time))
                    .unwrap_or_else(|| "none".into()),
            );
        }
    }
    Ok(())
}

/// `replog config check SITE`: every problem of site.toml and of each relationship,
/// located; exit 1 if there is any.
pub fn config_check(path: &Path) -> std::process::ExitCode {
    let cfg_path = path.join(replog::site::CONFIG_FILE);
    let mut problems = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => replog::config::SiteConfig::check(&cfg_path, &text),
        Err(e) => vec![replog::Error::io("read", &cfg_path, e)],
    };
    let mut files = 1;
    let machines = replog::site::list_machines(path).unwrap_or_default();
    for m in machines {
        let Ok(p) = replog::replication::relationship::Relationship::path_of(path, &m) else {
            continue;
        };
        if !p.exists() {
            continue;
        }
        files += 1;
        match std::fs::read_to_string(&p) {
            Ok(text) => problems.extend(replog::replication::relationship::Relationship::problems(
                &p, &text,
            )),
            Err(e) => problems.push(replog::Error::io("read", &p, e)),
        }
    }
    if problems.is_empty() {
        println!("{}: {files} file(s) checked, all good", path.display());
        return std::process::ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("replog: {p}");
    }
    eprintln!("{} problem(s) in {files} file(s)", problems.len());
    std::process::ExitCode::from(1)
}
