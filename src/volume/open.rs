//! Creating and opening machines: the manifest, disks, journal recovery, the index
//! rebuild, and the stamp that shows a parent changed while replog was not running.

use super::*;

impl Machine {
    /// Create an empty machine directory (no disks yet).
    pub fn create(storage: &dyn Storage, dir: &Path) -> Result<()> {
        if storage.exists(&dir.join(MANIFEST_FILE)) {
            return Err(Error::AlreadyExists(format!(
                "machine {} exists",
                dir.display()
            )));
        }
        storage.create_dir_all(&dir.join(JOURNAL_DIR))?;
        storage.create_dir_all(&dir.join(DISKS_DIR))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| {
            Error::io(
                "random machine id",
                dir,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let manifest = Manifest::new(u64::from_le_bytes(id));
        write_atomic(storage, &dir.join(MANIFEST_FILE), &manifest.encode())
    }

    pub fn read_manifest(storage: &dyn Storage, dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = read_all(
            storage.open(&path, OpenMode::ReadOnly)?.as_ref(),
            META_FILE_LIMIT,
        )?;
        Manifest::decode(&bytes).map_err(|e| Error::corruption(&path, e.offset, e.what))
    }

    pub fn read_watermark(storage: &dyn Storage, dir: &Path) -> Result<Watermark> {
        let path = dir.join(JOURNAL_DIR).join(WATERMARK_FILE);
        Ok(load_meta(storage, &path, Watermark::decode)?.unwrap_or_default())
    }

    /// Add a disk to a machine that is not open. With `import`, copy a raw image into
    /// the new parent, leaving all-zero blocks as holes. Nothing is left behind on error.
    pub fn add_disk(
        storage: &dyn Storage,
        dir: &Path,
        name: &str,
        size: u64,
        import: Option<&mut ImportFn<'_>>,
    ) -> Result<()> {
        validate_name("disk", name)?;
        validate_disk_size(size)?;
        let mut manifest = Self::read_manifest(storage, dir)?;
        if manifest.disks.iter().any(|d| d.name == name) {
            return Err(Error::AlreadyExists(format!(
                "disk {name} exists in machine {}",
                dir.display()
            )));
        }
        let path = dir.join(DISKS_DIR).join(format!("{name}.img"));
        let result = (|| {
            let parent = storage.open(&path, OpenMode::CreateNew)?;
            parent.set_len(size)?;
            if let Some(import) = import {
                import(parent.as_ref())?;
            }
            parent.sync_data()?;
            storage.sync_dir(&dir.join(DISKS_DIR))?;
            let id = manifest.disks.iter().map(|d| d.id + 1).max().unwrap_or(0);
            manifest.disks.push(DiskEntry {
                id,
                name: name.to_string(),
                size,
            });
            write_atomic(storage, &dir.join(MANIFEST_FILE), &manifest.encode())
        })();
        if result.is_err() && storage.exists(&path) {
            let _ = storage.remove_file(&path);
        }
        result
    }

    /// Open a machine: read its manifest and watermark, recover the journal, rebuild the
    /// index. The background compactor is not started; see [`Machine::start_compactor`].
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        cfg: JournalConfig,
    ) -> Result<Self> {
        Self::open_on(storage, dir, name, cfg, None)
    }

    /// Open a machine whose manifest names a base (a replica point): `bases` are its
    /// disks' parents, in disk-id order (see `volume::PointParent`).
    pub fn open_on(
        storage: Arc<dyn Storage>,
        dir: &Path,
        name: &str,
        cfg: JournalConfig,
        bases: Option<Vec<Arc<dyn StorageFile>>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let manifest = Self::read_manifest(storage.as_ref(), dir)?;
        let bases = match (&manifest.base, bases) {
            (Some(_), Some(b)) if b.len() == manifest.disks.len() => Some(b),
            (Some(b), _) => {
                return Err(Error::InvalidInput(format!(
                    "machine {name} stands on replica {} at LSN {}: open it through its site",
                    b.replica, b.lsn
                )))
            }
            (None, _) => None,
        };
        let watermark = Self::read_watermark(storage.as_ref(), dir)?;
        let mut disks = Vec::new();
        for (i, d) in manifest.disks.iter().enumerate() {
            if d.id as usize != i {
                return Err(Error::corruption(
                    dir.join(MANIFEST_FILE),
                    0,
                    "disk ids are not 0..n",
                ));
            }
            // The manifest's names become paths and FUSE entries: never trust them.
            let bad_name = validate_name("disk", &d.name).is_err()
                || manifest.disks.iter().filter(|o| o.name == d.name).count() > 1
                || validate_disk_size(d.size).is_err();
            if bad_name {
                return Err(Error::corruption(
                    dir.join(MANIFEST_FILE),
                    0,
                    format!("disk entry {:?} ({} bytes) is not valid", d.name, d.size),
                ));
            }
            let path = dir.join(DISKS_DIR).join(format!("{}.img", d.name));
            let parent = match bases.as_ref().and_then(|b| b.get(i)) {
                Some(b) => b.clone(),
                None => storage.open(&path, OpenMode::ReadWrite)?,
            };
            let len = parent.len()?;
            if len != d.size {
                return Err(Error::InvalidInput(format!(
                    "parent image {} is {len} bytes but the disk is {} bytes; it was changed \
                     outside replog",
                    path.display(),
                    d.size
                )));
            }
            disks.push(Disk::new(d.id, d.name.clone(), d.size, parent));
        }
        let mut state = IndexState {
            disks: vec![ExtentMap::new(); disks.len()],
            ..Default::default()
        };
        // Damage found before (by this process's predecessors) is not forgotten; a
        // segment mended since holds nothing any range still needs.
        let mut damage_list = super::DamageList::load(storage.as_ref(), dir)?;
        let was_mended = damage_list.mended();
        let jdir = dir.join(JOURNAL_DIR);
        let params = JournalParams {
            machine_id: manifest.machine_id,
            disk_count: disks.len() as u32,
            segment_bytes: cfg.segment_bytes,
            watermark_lsn: watermark.lsn,
            watermark_seq: watermark.segment_seq,
            generation: manifest.generation,
            // A fenced machine (failed over, or an orphan point) takes no writes:
            // spares would never be written again.
            spare_budget: if manifest.fence.is_some() {
                0
            } else {
                cfg.compact_min_bytes
            },
        };
        let sizes: Vec<u64> = disks.iter().map(|d| d.size).collect();
        let mut outside: Option<Error> = None;
        let rec = journal::recover(storage.clone(), &jdir, params, |seq, r| {
            if was_mended.contains(&seq) {
                return; // every range it held was rewritten by newer records
            }
            if let Some(what) = record_outside_disk(&r.header, &sizes) {
                let path = jdir.join(crate::format::segment::segment_name(seq));
                outside.get_or_insert(Error::corruption(path, r.offset, what));
                return;
            }
            apply_to_index(
                &mut state,
                seq,
                r.header.kind,
                r.header.disk,
                r.header.offset,
                r.header.length,
                r.payload_offset,
            );
        })?;
        if let Some(e) = outside {
            return Err(e);
        }
        for note in &rec.repairs {
            tracing::info!(machine = name, "{note}");
        }
        for s in &rec.sealed {
            state.files.insert(s.seq, s.file.clone());
        }
        let damage_note = damage_at_open(&mut state, &mut damage_list, &rec, watermark.segment_seq);
        if damage_note.1 {
            damage_list.save(storage.as_ref(), dir)?;
        }
        let mended = damage_list.mended();
        state
            .files
            .insert(rec.writer.active_seq(), rec.writer.active_file());
        // What recovery found may still be only in the page cache (a killed process
        // leaves it there): make it durable before anyone is told it is.
        rec.writer.active_file().sync_data()?;
        let durable = rec.writer.last_lsn();
        let changed = super::ChangedMap::load(storage.as_ref(), dir)?;
        let inner = Arc::new(MachineInner {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            storage,
            machine_id: manifest.machine_id,
            disks,
            spares: rec.writer.spares(),
            writer: Mutex::new(rec.writer),
            state: RwLock::new(state),
            sealed: Mutex::new(rec.sealed.into_iter().map(|s| (s.seq, s)).collect()),
            points: Mutex::new(rec.points),
            watermark: Mutex::new(watermark),
            holds: Holds::default(),
            compaction: Mutex::new(()),
            sync: Mutex::new(SyncState {
                durable_lsn: durable,
                in_progress: false,
            }),
            sync_cv: Condvar::new(),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            poisoned_by_io: AtomicBool::new(false),
            mended: Mutex::new(mended),
            damage_list: Mutex::new(damage_list),
            mending: Mutex::new(Vec::new()),
            last_append_ns: AtomicU64::new(0),
            compactor_kick: Mutex::new(None),
            digests: Mutex::new(None),
            generation: manifest.generation,
            role: manifest.role,
            failed_over: AtomicBool::new(manifest.fence.is_some()),
            fence_record: Mutex::new(manifest.fence.clone()),
            fence: Mutex::new(match (&manifest.fence, &manifest.intent) {
                (Some(f), _) => Some(super::fence_reason(f)),
                // A planned failover did not finish: fenced until it is known how
                // it ended (see `failover::planned::resolve`).
                (None, Some(i)) => Some(format!(
                    "a planned failover to {} (job {}) has not finished",
                    i.target, i.job
                )),
                (None, None) => None,
            }),
            base: Mutex::new(manifest.base.clone()),
            pending: Mutex::new(manifest.pending.clone()),
            intent: Mutex::new(manifest.intent.clone()),
            manifest_lock: Mutex::new(()),
            changed: Mutex::new(changed),
            closed: AtomicBool::new(false),
        });
        if let Some(e) = damage_note.0 {
            // Until a resync mends it (`replication::run` asks for one now).
            inner.poison_with(&e);
        }
        let base_hold = manifest
            .base
            .as_ref()
            .map(|b| inner.holds.hold(b.lsn.min(watermark.lsn)));
        // Were the parents changed while replog was not running?
        let stamp_path = dir.join(STAMP_FILE);
        let changed_offline = match std::fs::read_to_string(&stamp_path) {
            // A replica point has no file to change (the fold writes the stamp).
            _ if manifest.base.is_some() => None,
            // replog itself was merging when it stopped (the journal still holds what
            // it was writing): the parents as they are now are replog's.
            Ok(old) if old == MERGING_STAMP => {
                inner.write_parents_stamp();
                None
            }
            Ok(old) if old != parents_stamp(dir, &inner.disks) => {
                let names: Vec<&str> = old
                    .lines()
                    .zip(
                        parents_stamp(dir, &inner.disks)
                            .lines()
                            .map(str::to_string)
                            .collect::<Vec<_>>(),
                    )
                    .filter(|(a, b)| a != b)
                    .filter_map(|(a, _)| a.split(' ').next())
                    .collect();
                Some(format!(
                    "disk image(s) {} changed while replog was not running",
                    names.join(", ")
                ))
            }
            _ => None,
        };
        if let Some(why) = &changed_offline {
            tracing::warn!(machine = name, "{why}");
        }
        Ok(Machine {
            inner,
            compactor: Mutex::new(None),
            base_hold: Mutex::new(base_hold),
            changed_offline,
        })
    }
}

/// `parents.stamp`: size, mtime, ctime and inode of every parent image as replog left
/// it (written after every merge and at close). A parent written by anything else
/// while replog was not running no longer matches (ctime cannot be set back). While a
/// merge writes the parents it holds `merging` instead, so that a crash mid-merge is
/// not taken for such a change (found by tools/soak: a kill -9 between a merge's
/// writes and its new stamp forced a needless resync).
const STAMP_FILE: &str = "parents.stamp";
/// The stamp while a merge writes the parents.
const MERGING_STAMP: &str = "merging\n";

fn parents_stamp(dir: &Path, disks: &[Disk]) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut out = String::new();
    for d in disks {
        let p = dir.join(DISKS_DIR).join(format!("{}.img", d.name));
        match std::fs::metadata(&p) {
            Ok(m) => out.push_str(&format!(
                "{} {} {}.{} {}.{} {}\n",
                d.name,
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.ino()
            )),
            Err(_) => out.push_str(&format!("{} missing\n", d.name)),
        }
    }
    out
}

/// A write or zero record whose range does not fit its disk (a checksum only proves
/// the bytes are the ones written, not that they make sense).
pub(crate) fn record_outside_disk(
    h: &crate::format::RecordHeader,
    sizes: &[u64],
) -> Option<String> {
    if h.kind == RecordKind::Point {
        return None;
    }
    let size = sizes.get(h.disk as usize)?;
    let end = h.offset.checked_add(h.length)?;
    (end > *size).then(|| {
        format!(
            "record for disk {} covers {}..{end}, past the disk's {size} bytes",
            h.disk, h.offset
        )
    })
}

/// Mark damaged what recovery found damaged and what the damage list names (still
/// unmended, still in the journal); drop the list's entries for segments merged past.
/// Returns the first damage (for the poison) and whether the list changed.
fn damage_at_open(
    state: &mut IndexState,
    list: &mut super::DamageList,
    rec: &journal::Recovered,
    watermark_seq: u64,
) -> (Option<Error>, bool) {
    let present = |seq: u64| state.files.contains_key(&seq) || rec.writer.active_seq() == seq;
    let before = list.entries.clone();
    list.entries
        .retain(|e| e.seq > watermark_seq && present(e.seq));
    let mut first = None;
    for d in &rec.damaged {
        if before.iter().any(|e| e.seq == d.seq && e.mended) {
            continue;
        }
        let what = format!(
            "segment {} is damaged at offset {}: {}",
            d.path.display(),
            d.offset,
            d.what
        );
        state.lost.insert(d.seq);
        state.damaged.insert(d.seq, what.clone());
        list.add(d.seq, &what);
        first.get_or_insert_with(|| Error::corruption(&d.path, d.offset, d.what.clone()));
    }
    for e in list.entries.iter().filter(|e| !e.mended) {
        if state.damaged.contains_key(&e.seq) {
            continue;
        }
        state.damaged.insert(e.seq, e.what.clone());
        let path = match state.files.get(&e.seq) {
            Some(f) => f.path().to_path_buf(),
            None => rec.writer.active_file().path().to_path_buf(),
        };
        first.get_or_insert_with(|| Error::corruption(path, 0, e.what.clone()));
    }
    let changed = *list.entries != *before;
    (first, changed)
}

pub(crate) fn apply_to_index(
    state: &mut IndexState,
    seq: u64,
    kind: RecordKind,
    disk: u32,
    offset: u64,
    length: u64,
    payload_offset: u64,
) {
    let Some(map) = state.disks.get_mut(disk as usize) else {
        return;
    };
    match kind {
        RecordKind::Write => map.insert(
            offset,
            length,
            Location::Segment {
                seq,
                offset: payload_offset,
            },
        ),
        RecordKind::Zero => map.insert(offset, length, Location::Zero { seq }),
        RecordKind::Point => {}
    }
}

impl MachineInner {
    /// Record the parents as they are now (after a merge, at close).
    /// A merge is about to write the parents (see `MERGING_STAMP`).
    pub(crate) fn mark_parents_merging(&self) {
        if !self.dir.exists() {
            return;
        }
        let path = self.dir.join(STAMP_FILE);
        if let Err(e) = write_atomic(
            &crate::storage::FileStorage,
            &path,
            MERGING_STAMP.as_bytes(),
        ) {
            tracing::warn!(machine = %self.name, "{}: {e}", path.display());
        }
    }

    pub(crate) fn write_parents_stamp(&self) {
        if !self.dir.exists() {
            return; // not on the real file system (in-memory storage in tests)
        }
        let path = self.dir.join(STAMP_FILE);
        let stamp = parents_stamp(&self.dir, &self.disks);
        // Atomic: a torn stamp would read as "changed offline" and force a resync.
        if let Err(e) = write_atomic(&crate::storage::FileStorage, &path, stamp.as_bytes()) {
            tracing::warn!(machine = %self.name, "{}: {e}", path.display());
        }
    }
}
