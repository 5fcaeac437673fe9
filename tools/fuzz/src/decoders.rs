//! The other decoders: protocol frames and messages, encrypted-file headers (and
//! their authentication), and every metadata file (manifests, marks, progress
//! records, in every version). One check and one generator of valid inputs each; the
//! stable driver (`decoders-mutate`) and the libFuzzer targets (`frame`, `crypt`,
//! `meta`) share them.

use crate::Rng;
use replog::format::meta::{self, DiskEntry, Watermark};
use replog::replica::crypt::ReplicaKey;
use replog::replica::store::{
    decode_meta_file, IndexedPoint, InitialProgress, MetaFile, ParentMark, ReplicaManifest,
    Retention,
};
use replog::replication::protocol::{self, Message, RefusalCode};
use std::path::Path;

/// Which decoder a driver exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Frame,
    Crypt,
    Meta,
    Config,
    Plan,
    State,
    Cert,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "frame" => Some(Target::Frame),
            "crypt" => Some(Target::Crypt),
            "meta" => Some(Target::Meta),
            "config" => Some(Target::Config),
            "plan" => Some(Target::Plan),
            "state" => Some(Target::State),
            "cert" => Some(Target::Cert),
            _ => None,
        }
    }

    pub fn check(self, data: &[u8]) {
        match self {
            Target::Frame => check_frame(data),
            Target::Crypt => check_crypt(data),
            Target::Meta => check_meta(data),
            Target::Config => check_config(data),
            Target::Plan => check_plan(data),
            Target::State => check_state(data),
            Target::Cert => check_cert(data),
        }
    }

    pub fn valid(self, rng: &mut Rng) -> Vec<u8> {
        match self {
            Target::Frame => valid_frames(rng),
            Target::Crypt => valid_crypt(rng),
            Target::Meta => valid_meta(rng),
            Target::Config => valid_config(rng),
            Target::Plan => valid_plan(rng),
            Target::State => valid_state(rng),
            Target::Cert => valid_cert(rng),
        }
    }

    /// Recompute the checksums the format has, so mutations reach the checks
    /// behind them.
    pub fn fix_crcs(self, b: &mut [u8]) {
        match self {
            Target::Frame => fix_frame_crcs(b),
            Target::Crypt => {
                if b.len() >= 40 {
                    let crc = crc32c::crc32c(&b[..36]);
                    b[36..40].copy_from_slice(&crc.to_le_bytes());
                }
            }
            Target::Config | Target::Plan | Target::State | Target::Cert => {}
            Target::Meta => {
                if b.len() >= meta::META_HEADER_LEN {
                    let crc = crc32c::crc32c_append(
                        crc32c::crc32c(&b[..20]),
                        &b[meta::META_HEADER_LEN..],
                    );
                    b[20..24].copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
    }
}

// ------------------------------------------------------------------ frames

/// The bytes are a stream of frames: decode them one after another, as a receiver
/// would. Whatever decodes must re-encode to a frame that decodes the same; the
/// streaming reader must agree with the slice decoder.
pub fn check_frame(data: &[u8]) {
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        let sliced = protocol::decode::<Message>(rest);
        let streamed = protocol::read_frame::<Message>(&mut &rest[..]);
        match (&sliced, &streamed) {
            (Ok((m, used)), Ok(s)) => {
                assert_eq!(m, s, "read_frame and decode disagree");
                // postcard reads overlong varints too, so the bytes need not be the
                // canonical encoding; the value must survive a round trip.
                let again = protocol::encode(m).expect("re-encode");
                let (back, n) = protocol::decode::<Message>(&again).expect("re-decode");
                assert_eq!(
                    (&back, n),
                    (m, again.len()),
                    "re-encoding changed the message"
                );
                assert!(*used <= rest.len());
                // The in-place decoder of segment chunks agrees with the owned one.
                let body = &rest[protocol::FRAME_HEADER_LEN..*used];
                match protocol::segment_chunk_ref(body) {
                    None => assert!(
                        !matches!(m, Message::SegmentChunk { .. }),
                        "a SegmentChunk the in-place decoder did not take"
                    ),
                    Some(Ok(c)) => assert_eq!(
                        &c.to_message(),
                        m,
                        "the in-place decoder read another message"
                    ),
                    Some(Err(e)) => panic!("in place {e} but owned {m:?}"),
                }
                if let Message::Hello {
                    protocol: p,
                    features,
                    required,
                    ..
                } = m
                {
                    let _ = protocol::check_hello(*p, *features, *required);
                }
                at += used;
            }
            (Err(_), Err(_)) => return,
            (a, b) => panic!("decode {a:?} but read_frame {b:?}"),
        }
    }
}

fn name(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => "vm1".into(),
        1 => String::new(),
        2 => "../x".into(),
        _ => "m".repeat(rng.below(70) as usize),
    }
}

fn bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    (0..rng.below(max)).map(|_| rng.next_u64() as u8).collect()
}

fn num(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.below(10),
        1 => u64::MAX - rng.below(3),
        _ => rng.next_u64(),
    }
}

/// A random message of any kind.
pub fn valid_message(rng: &mut Rng) -> Message {
    let machine = name(rng);
    match rng.below(22) {
        0 => Message::Hello {
            site_id: [rng.next_u64() as u8; 32],
            software: "replog".into(),
            protocol: rng.below(4) as u16,
            features: num(rng),
            required: num(rng),
        },
        1 => Message::Protect {
            machine,
            machine_id: num(rng),
            generation: num(rng) as u32,
            disks: vec![(name(rng), num(rng)); rng.below(4) as usize],
            base_lsn: num(rng),
            base_seq: num(rng),
            retention_ms: num(rng),
            app_retention_ms: num(rng),
        },
        2 => Message::Protected {
            machine,
            generation: num(rng) as u32,
            lsn: num(rng),
            seq: num(rng),
            initial_done: rng.chance(2),
            resume_disk: num(rng) as u32,
            resume_offset: num(rng),
            free_bytes: num(rng),
            diverged: rng.chance(2).then(|| "damage".into()),
        },
        3 => Message::ResyncStart {
            machine,
            generation: num(rng) as u32,
            base_lsn: num(rng),
            base_seq: num(rng),
            chunk_bytes: num(rng),
        },
        4 => Message::ResyncState {
            machine,
            disk: num(rng) as u32,
            next: num(rng),
            compared: num(rng),
            sent_chunks: num(rng),
            sent_bytes: num(rng),
        },
        5 => Message::ResyncHashRequest {
            machine,
            disk: num(rng) as u32,
            first: num(rng),
            count: num(rng),
            group: num(rng),
        },
        6 => Message::ResyncHashes {
            machine,
            disk: num(rng) as u32,
            first: num(rng),
            hashes: vec![[rng.next_u64() as u8; 32]; rng.below(5) as usize],
        },
        7 => Message::ResyncChunk {
            machine,
            disk: num(rng) as u32,
            offset: num(rng),
            compressed: rng.chance(2),
            bytes: bytes(rng, 200),
        },
        8 => Message::ResyncBatchDone {
            machine,
            disk: num(rng) as u32,
            next: num(rng),
            compared: num(rng),
            sent_chunks: num(rng),
            sent_bytes: num(rng),
        },
        9 => Message::ResyncFetch {
            machine,
            disk: num(rng) as u32,
            offset: num(rng),
            len: num(rng),
        },
        10 => Message::ResyncData {
            machine,
            compressed: rng.chance(2),
            bytes: bytes(rng, 200),
        },
        11 => Message::ResyncDone {
            machine,
            valid_from: num(rng),
        },
        12 => Message::InitialChunk {
            machine,
            generation: num(rng) as u32,
            disk: num(rng) as u32,
            offset: num(rng),
            compressed: rng.chance(2),
            bytes: bytes(rng, 300),
        },
        13 => Message::InitialDone { machine },
        14 => Message::SegmentChunk {
            machine,
            generation: num(rng) as u32,
            seq: num(rng),
            segment_len: num(rng),
            offset: num(rng),
            compressed: rng.chance(2),
            bytes: bytes(rng, 300),
        },
        15 => Message::Ack {
            machine,
            lsn: num(rng),
        },
        16 => Message::Probe,
        17 => Message::Room {
            free_bytes: num(rng),
        },
        18 => Message::Promote {
            machine,
            machine_id: num(rng),
            generation: num(rng) as u32,
            lsn: num(rng),
        },
        19 => Message::Promoted {
            machine,
            generation: num(rng) as u32,
            lsn: num(rng),
        },
        _ => Message::Error {
            code: RefusalCode::ALL[rng.below(RefusalCode::ALL.len() as u64) as usize],
            message: name(rng),
        },
    }
}

/// One to four valid frames back to back.
pub fn valid_frames(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(4) {
        out.extend(protocol::encode(&valid_message(rng)).expect("encode"));
    }
    out
}

fn fix_frame_crcs(b: &mut [u8]) {
    let mut at = 0usize;
    while at + protocol::FRAME_HEADER_LEN <= b.len() {
        let len = u32::from_le_bytes([b[at + 8], b[at + 9], b[at + 10], b[at + 11]]) as usize;
        let body = at + protocol::FRAME_HEADER_LEN;
        let Some(end) = body.checked_add(len).filter(|e| *e <= b.len()) else {
            return;
        };
        let crc = crc32c::crc32c(&b[body..end]);
        b[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

// ------------------------------------------------------------------ encrypted files

const KEY: [u8; 32] = [0x5a; 32];

/// The bytes are an encrypted replica file: open them as every kind (segment,
/// index, parent chunk) under the number the header names and a few others. Nothing
/// mutated may authenticate unless it is byte-identical to what was sealed; what
/// opens must seal and open again to the same plain bytes.
pub fn check_crypt(data: &[u8]) {
    let key = ReplicaKey::from_bytes(KEY);
    let p = Path::new("/fuzz/file.enc");
    let named = data
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    for machine in [1u64, 2] {
        for seq in [named, named.wrapping_add(1), 0] {
            let chunk = {
                let mut buf = data.to_vec();
                key.open_chunk_in_place(machine, seq, &mut buf, p)
                    .map(|()| buf)
            };
            for opened in [
                key.open(machine, seq, data.to_vec(), p),
                key.open_index(machine, seq, data, p),
                chunk,
            ] {
                match opened {
                    Ok(plain) => {
                        let again = key.seal(machine, seq, &plain).expect("seal");
                        assert_eq!(key.open(machine, seq, again, p).expect("open"), plain);
                    }
                    Err(e) => assert!(
                        e.is_corruption() || matches!(e, replog::Error::Unsupported { .. }),
                        "an encrypted file failed with {e}"
                    ),
                }
            }
        }
    }
}

/// A sealed segment, index or chunk of a few hundred bytes.
pub fn valid_crypt(rng: &mut Rng) -> Vec<u8> {
    let key = ReplicaKey::from_bytes(KEY);
    let plain = bytes(rng, 400);
    let (machine, seq) = (1 + rng.below(2), num(rng));
    match rng.below(3) {
        0 => key.seal(machine, seq, &plain),
        1 => key.seal_index(machine, seq, &plain),
        _ => key.seal_chunk(machine, seq, &plain),
    }
    .expect("seal")
}

// ------------------------------------------------------------------ metadata files

/// The bytes are a metadata file: every decoder, by the kind the envelope names and
/// by every other kind. What decodes must re-encode (at this build's version) to a
/// file that decodes to the same value.
pub fn check_meta(data: &[u8]) {
    for kind in 0..=meta::KIND_DAMAGE {
        let _ = meta::decode(kind, data);
    }
    // An object-store replica's manifest (kind 12): what decodes re-encodes to a
    // file that decodes to the same manifest.
    if let Ok(m) = replog::replica::objects::Manifest::decode(data, "fuzz") {
        let again = m.encode().expect("a decoded manifest encodes");
        let m2 = replog::replica::objects::Manifest::decode(&again, "fuzz").expect("re-decode");
        assert_eq!(m, m2, "re-encoding changed the manifest");
    }
    let _ = meta::Manifest::decode(data);
    let _ = Watermark::decode(data);
    if let Ok((kind, file)) = decode_meta_file(data) {
        let again = match &file {
            MetaFile::MachineManifest(m) => m.encode(),
            MetaFile::Watermark(w) => w.encode(),
            MetaFile::ReplicaManifest(v) => encode(kind, v),
            MetaFile::InitialProgress(v) => encode(kind, v),
            MetaFile::ParentMark(v) => encode(kind, v),
            MetaFile::Retention(v) => encode(kind, v),
            MetaFile::ResyncProgress(v) => encode(kind, v),
            MetaFile::Scrub(v) => encode(kind, v),
            MetaFile::Promotion(v) => encode(kind, v),
            MetaFile::ChangedMap(v) => v.encode().expect("a decoded map encodes"),
            MetaFile::Seed(v) => encode(kind, v),
            MetaFile::Damage(v) => v.encode().expect("a decoded list encodes"),
            MetaFile::ObjectManifest(m) => m.encode().expect("a decoded manifest encodes"),
        };
        let (k2, file2) = decode_meta_file(&again).expect("re-decode");
        assert_eq!((k2, file2), (kind, file), "re-encoding changed the value");
    }
}

fn encode<T: serde::Serialize>(kind: u16, v: &T) -> Vec<u8> {
    meta::encode(kind, &postcard::to_stdvec(v).expect("postcard"))
}

fn point(rng: &mut Rng) -> Option<IndexedPoint> {
    rng.chance(2).then(|| IndexedPoint {
        lsn: num(rng),
        time_ns: num(rng),
        app: rng.chance(2),
        digests: rng.chance(2).then(|| vec![num(rng); rng.below(4) as usize]),
        received_ns: num(rng),
    })
}

/// A valid metadata file of any kind, at this build's version or (for the kinds
/// that have them) at version 1.
pub fn valid_meta(rng: &mut Rng) -> Vec<u8> {
    let disks = (0..rng.below(4))
        .map(|i| DiskEntry {
            id: i as u32,
            name: name(rng),
            size: num(rng),
        })
        .collect::<Vec<_>>();
    match rng.below(13) {
        12 => {
            let mut list = replog::volume::DamageList::default();
            for _ in 0..rng.below(4) {
                list.add(num(rng), &name(rng));
            }
            if let Some(e) = list.entries.first_mut() {
                e.mended = rng.chance(2);
            }
            list.encode().expect("encode")
        }
        11 => {
            use replog::replica::objects::{Entry, Manifest};
            let mut m = Manifest {
                seq: num(rng),
                writer: num(rng),
                at_ns: num(rng),
                ..Default::default()
            };
            for i in 0..rng.below(6) {
                let e = if rng.chance(2) {
                    Entry::Inline(vec![i as u8; rng.below(40) as usize])
                } else {
                    Entry::Object {
                        name: format!("d/{}~{:016x}-{i}", name(rng), num(rng)),
                        len: num(rng),
                    }
                };
                m.entries.insert(format!("parent/1/{i}.enc"), e);
            }
            if rng.chance(2) {
                m.dropped.push((name(rng), num(rng)));
            }
            m.encode().expect("encode")
        }
        0 => meta::Manifest {
            disks,
            generation: 1 + rng.below(9) as u32,
            ..meta::Manifest::new(num(rng))
        }
        .encode(),
        9 => meta::Manifest {
            disks,
            generation: 1 + rng.below(9) as u32,
            base: Some(replog::protection::Base {
                replica: name(rng),
                lsn: num(rng),
                time_ns: num(rng),
            }),
            pending: rng.chance(2).then(|| replog::protection::Pending {
                kind: replog::protection::FailoverKind::Unplanned,
                from_generation: num(rng) as u32,
                source_site: [4; 32],
                started_ns: num(rng),
            }),
            ..meta::Manifest::new(num(rng))
        }
        .encode(),
        10 => encode(
            meta::KIND_PROMOTION,
            &replog::replica::store::Promotion {
                kind: replog::protection::FailoverKind::Planned,
                generation: num(rng) as u32,
                from_generation: num(rng) as u32,
                lsn: num(rng),
                at_ns: num(rng),
                site: [5; 32],
                committed: rng.chance(2),
            },
        ),
        1 => Watermark {
            lsn: rng.below(1 << 40),
            segment_seq: rng.below(1 << 40),
        }
        .encode(),
        2 => encode(
            meta::KIND_REPLICA_MANIFEST,
            &ReplicaManifest {
                source_site: [3; 32],
                machine_id: num(rng),
                disks,
                base_lsn: num(rng),
                base_seq: num(rng),
                generation: num(rng) as u32,
            },
        ),
        3 => encode(
            meta::KIND_INITIAL_PROGRESS,
            &InitialProgress {
                chunks: num(rng),
                disk: num(rng) as u32,
                offset: num(rng),
                done: rng.chance(2),
            },
        ),
        4 => encode(
            meta::KIND_PARENT_MARK,
            &ParentMark {
                lsn: num(rng),
                seq: num(rng),
                point: point(rng),
                merging_to: rng.chance(2).then(|| (num(rng), num(rng))),
                resyncing: rng.chance(2),
                valid_from: num(rng),
                patches: num(rng),
            },
        ),
        5 => encode(
            meta::KIND_RETENTION,
            &Retention {
                window_ms: num(rng),
                app_window_ms: num(rng),
            },
        ),
        6 => encode(
            meta::KIND_RESYNC,
            &replog::replica::resync_apply::ResyncProgress {
                base_lsn: num(rng),
                base_seq: num(rng),
                chunk_bytes: num(rng),
                disk: num(rng) as u32,
                next: num(rng),
                compared: num(rng),
                sent_chunks: num(rng),
                sent_bytes: num(rng),
                patches: num(rng),
            },
        ),
        7 => encode(
            meta::KIND_SCRUB,
            &replog::replica::scrub::ScrubState {
                after: name(rng),
                round_started_ns: num(rng),
                checked: num(rng),
                bytes: num(rng),
                found: rng.chance(2).then(|| name(rng)),
                last_full_ns: rng.chance(2).then(|| num(rng)),
                last_full_checked: num(rng),
                last_found: None,
            },
        ),
        _ => {
            // Version 1 of the parent mark: the layout before resync fields.
            #[derive(serde::Serialize)]
            struct V1 {
                lsn: u64,
                seq: u64,
                point: Option<IndexedPoint>,
                merging_to: Option<(u64, u64)>,
            }
            meta::encode_version(
                meta::KIND_PARENT_MARK,
                1,
                &postcard::to_stdvec(&V1 {
                    lsn: num(rng),
                    seq: num(rng),
                    point: point(rng),
                    merging_to: None,
                })
                .expect("postcard"),
            )
        }
    }
}

// ------------------------------------------------------------------ config

/// The bytes are a `site.toml` or a `relationship.toml`: checking them never panics,
/// every problem is located (a line inside the file, or "(default)"), and settings
/// that check clean also load.
pub fn check_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count().max(1);
    let located = |e: &replog::Error| assert_located(e, lines);
    let site = Path::new("site.toml");
    let problems = replog::config::SiteConfig::check(site, &text);
    problems.iter().for_each(located);
    if problems.is_empty() {
        replog::config::SiteConfig::from_toml(site, &text).expect("clean settings load");
    }
    let rel = Path::new("relationship.toml");
    replog::replication::relationship::Relationship::problems(rel, &text)
        .iter()
        .for_each(located);
    let _ = replog::replication::bandwidth::parse_rate(&text);
    let _ = replog::replication::bandwidth::Schedule::parse(&text);
}

/// A valid site.toml (settings varied) or relationship.toml.
pub fn valid_config(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(2) {
        let mut c = replog::config::SiteConfig::default();
        c.replication.seal_interval_ms = 10 + rng.below(10_000);
        c.replication.resync_window =
            ["always", "never", "18:00-08:00"][rng.below(3) as usize].into();
        if rng.chance(3) {
            c.replica.store = "s3://replicas/site-b".into();
            c.replica.s3.endpoint = "http://127.0.0.1:8333".into();
        }
        c.to_toml().into_bytes()
    } else {
        replog::replication::relationship::Relationship {
            target: "127.0.0.1:7411".into(),
            target_id: "ab".repeat(32),
            retention: Some("24h".into()),
            app_retention: None,
            rpo: Some("30s".into()),
            bandwidth: Some("50MiB/s".into()),
            bandwidth_schedule: Some("Mon-Fri 08:00-18:00=10MiB/s, *=unlimited".into()),
            paused: true,
        }
        .to_toml()
        .expect("encodes")
        .into_bytes()
    }
}

// ------------------------------------------------------------------ plan

/// Where an error says it is: "FILE line N" inside the text (or no line at all).
fn assert_located(e: &replog::Error, lines: usize) {
    let m = e.to_string();
    if let Some(rest) = m.split(" line ").nth(1) {
        let n: usize = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .expect("a line number");
        assert!((1..=lines + 1).contains(&n), "line {n} of {lines}: {m}");
    }
}

/// What a machine of the fuzzed site is, by its name's length (the generator picks
/// lengths of primaries and replicas).
fn known_by_len(m: &str) -> replog::plan::file::Known {
    use replog::plan::file::Known;
    match m.len() % 4 {
        0 => Known::Primary,
        1 => Known::Replica,
        2 => Known::TestCopy,
        _ => Known::Unknown,
    }
}

/// The bytes are a recovery plan file: parsing never panics, with the machines
/// checked against a site and as a stored plan read back; errors name a line inside
/// the file; a plan that parses lists its steps for every kind of failover, describes
/// itself, and survives the JSON a plan run stores it in.
pub fn check_plan(data: &[u8]) {
    use replog::plan::file::{parse, Checks};
    use replog::protection::FailoverKind;
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count().max(1);
    let site = Checks {
        machines: Some(&known_by_len),
        executables: false,
    };
    for checks in [&site, &Checks::STORED] {
        match parse(&text, "plan.toml", checks) {
            Ok(plan) => {
                let _: Vec<&String> = plan.machines().collect();
                for kind in [
                    FailoverKind::Planned,
                    FailoverKind::Unplanned,
                    FailoverKind::Test,
                ] {
                    for step in replog::plan::run::steps(&plan, kind) {
                        let _ = step.name(&plan);
                    }
                }
                let json = serde_json::to_string(&plan).expect("a plan encodes");
                let back: replog::plan::file::Plan =
                    serde_json::from_str(&json).expect("an encoded plan decodes");
                assert_eq!(back, plan);
            }
            Err(e) => assert_located(&e, lines),
        }
    }
}

/// A valid plan: 1..4 groups of machines, actions before and after some.
pub fn valid_plan(rng: &mut Rng) -> Vec<u8> {
    let mut out = format!("name = \"plan{}\"\n", rng.below(100));
    let mut n = 0;
    for g in 0..1 + rng.below(4) {
        out.push_str("[[group]]\n");
        let machines: Vec<String> = (0..1 + rng.below(3))
            .map(|_| {
                n += 1;
                // Names whose length makes them a primary or a replica (see `known`).
                format!(
                    "\"{}\"",
                    if n % 2 == 0 { "dbxxy" } else { "appx" }.to_string() + &"m".repeat(4 * n)
                )
            })
            .collect();
        out.push_str(&format!("machines = [{}]\n", machines.join(", ")));
        if rng.chance(2) {
            out.push_str(&format!("[[group.before]]\nmanual = \"check group {g}\"\n"));
        }
        if rng.chance(2) {
            out.push_str(&format!(
                "[[group.after]]\nrun = \"/bin/true\"\ntimeout = \"{}s\"\non = [\"unplanned\", \"test\"]\n",
                1 + rng.below(600)
            ));
        }
    }
    out.into_bytes()
}

// ------------------------------------------------------------------ state files

/// The bytes are a JSON state file — status.json, a job record, a plan run's state:
/// decoding never panics; what decodes re-encodes to JSON that decodes to the same
/// encoding, and a status feeds the metrics.
pub fn check_state(data: &[u8]) {
    fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) {
        let a = serde_json::to_string(v).expect("encodes");
        let back: T = serde_json::from_str(&a).expect("re-encoded JSON decodes");
        assert_eq!(serde_json::to_string(&back).expect("encodes"), a);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = serde_json::from_str::<replog::protection::status::SiteStatus>(text) {
        round_trip(&s);
        replog::metrics::get().observe_status(&s);
    }
    if let Ok(j) = serde_json::from_str::<replog::jobs::Job>(text) {
        round_trip(&j);
        let _ = j.state.ended();
    }
    if let Ok(r) = serde_json::from_str::<replog::plan::run::Run>(text) {
        round_trip(&r);
        let _ = replog::plan::run::steps(&r.plan, r.kind);
    }
}

const STATUS_SAMPLE: &str = r#"{"site":"f04325d5e145c254f068da6429ef554b1ec5c60c6e652e0e3677360582dbcde4","machines":[{"name":"vm1","role":"primary","state":"protected","generation":2,"health":"warning","reason":"replication lag 61.2 s is more than the RPO","lag_seconds":61.2,"rpo_seconds":30.0,"journal_bytes":64,"progress":0.5,"last_point":{"lsn":7,"time":"2026-12-04T12:00:00Z"},"target":"127.0.0.1:7411","acked_lsn":5,"last_lsn":9,"resync":{"chunks_compared":3,"chunks_total":10,"chunks_sent":1,"bytes_sent":4096,"resumed_from":0},"source":null,"scrub":null,"failed_over_to":{"site":"ab","generation":2,"at":"2026-12-04T12:00:00Z"},"reprotect":null},{"name":"vm2","role":"replica","state":"protected","generation":1,"health":"healthy","reason":"ok","lag_seconds":null,"journal_bytes":0,"progress":null,"last_point":null,"target":null,"acked_lsn":null,"last_lsn":3,"resync":null,"source":"cd","scrub":{"last_full":null,"objects":4,"found":null,"in_progress":1},"failed_over_to":null,"reprotect":null}],"as_of_ns":1796388030883384181,"warnings":["the site certificate ends soon"]}"#;

const JOB_SAMPLE: &str = r#"{"format":1,"id":"20261204T120000Z-0001","kind":"failover-planned","machine":"vm1","plan":null,"state":"succeeded","started":"2026-12-04T12:00:00Z","ended":"2026-12-04T12:00:03Z","error":null,"steps":[{"name":"stop writes","state":"succeeded","started":"2026-12-04T12:00:00Z","ended":"2026-12-04T12:00:01Z","detail":null}],"owner_pid":4242,"owner_start":99}"#;

/// A status, a job record or a plan run, valid, with its values varied.
pub fn valid_state(rng: &mut Rng) -> Vec<u8> {
    let mut v: serde_json::Value = match rng.below(3) {
        0 => serde_json::from_str(STATUS_SAMPLE).expect("sample"),
        1 => serde_json::from_str(JOB_SAMPLE).expect("sample"),
        _ => {
            let plan = replog::plan::file::parse(
                &String::from_utf8_lossy(&valid_plan(rng)),
                "plan.toml",
                &replog::plan::file::Checks::STORED,
            )
            .expect("a valid plan");
            let kind = ["planned", "unplanned", "test"][rng.below(3) as usize];
            serde_json::json!({
                "format": 1, "job": "20261204T120000Z-0002", "plan": plan,
                "kind": kind,
                "at": "latest", "plan_point": null, "next": rng.below(5),
                "state": "running", "machines": {}, "failures": [], "action": null,
                "mount": null
            })
        }
    };
    if let Some(ms) = v.get_mut("machines").and_then(|m| m.as_array_mut()) {
        for m in ms {
            m["last_lsn"] = serde_json::json!(rng.below(u64::MAX));
            m["journal_bytes"] = serde_json::json!(rng.below(1 << 40));
        }
    }
    serde_json::to_vec(&v).expect("encodes")
}

// ------------------------------------------------------------------ certificates

/// Cut the bytes into certificates: each a 2-byte little-endian length, then DER.
fn split_chain(data: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && out.len() < 20 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let end = (2 + n).min(rest.len());
        out.push(rustls::pki_types::CertificateDer::from(
            rest[2..end].to_vec(),
        ));
        rest = &rest[end..];
    }
    out
}

/// The bytes are a certificate chain a peer presents: the lineage check never
/// panics, and accepts a chain only if each certificate is signed by the next one's
/// key — so a valid chain with any certificate changed is refused unless the change
/// left it the same certificate.
pub fn check_cert(data: &[u8]) {
    let chain = split_chain(data);
    if let Ok(root) = replog::identity::lineage_root(&chain) {
        assert_eq!(
            Some(root),
            chain.last().map(|c| replog::identity::SiteId::of_cert(c))
        );
        // A chain holds only if each of its links holds on its own.
        for pair in chain.windows(2) {
            assert!(replog::identity::lineage_root(pair).is_ok());
        }
        // Mutations of the generator's chains: what is signed cannot change and
        // still hold (the encoding around the signature may: a different
        // fingerprint, the same signed content — which is why the root is pinned by
        // its fingerprint and the others only carry keys).
        if chain.len() >= 2 {
            let signed = |c: &[u8]| {
                x509_parser::parse_x509_certificate(c)
                    .map(|(_, x)| x.tbs_certificate.as_ref().to_vec())
                    .expect("a certificate of a chain that holds parses")
            };
            let known: Vec<Vec<u8>> = sample_chain().iter().map(|c| signed(c)).collect();
            for c in &chain[..chain.len() - 1] {
                assert!(
                    known.contains(&signed(c)),
                    "a certificate whose signed content was changed holds"
                );
            }
        }
    }
}

/// A site rotated twice (tests/fixtures/v6/identity): its chain, current certificate
/// first — the same in every process, so the kept corpus replays.
fn sample_chain() -> &'static [rustls::pki_types::CertificateDer<'static>] {
    use rustls::pki_types::pem::PemObject;
    static CHAIN: std::sync::OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> =
        std::sync::OnceLock::new();
    CHAIN.get_or_init(|| {
        let pem = concat!(
            include_str!("../../../tests/fixtures/v6/identity/cert.pem"),
            include_str!("../../../tests/fixtures/v6/identity/lineage.pem")
        );
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.expect("a fixture certificate"))
            .collect()
    })
}

/// A valid chain (or a prefix, or a suffix of it), length-prefixed.
pub fn valid_cert(rng: &mut Rng) -> Vec<u8> {
    let chain = sample_chain();
    let from = rng.below(chain.len() as u64) as usize;
    let to = from + 1 + rng.below((chain.len() - from) as u64) as usize;
    let mut out = Vec::new();
    for c in &chain[from..to] {
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generators make inputs the decoders accept (or the fuzzing would only
    /// exercise refusals).
    #[test]
    fn generated_plans_and_states_are_valid() {
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let text = String::from_utf8(valid_plan(&mut rng)).unwrap();
            let checks = replog::plan::file::Checks {
                machines: Some(&known_by_len),
                executables: false,
            };
            replog::plan::file::parse(&text, "plan.toml", &checks)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            let state = valid_state(&mut rng);
            let s = std::str::from_utf8(&state).unwrap();
            assert!(
                serde_json::from_str::<replog::protection::status::SiteStatus>(s).is_ok()
                    || serde_json::from_str::<replog::jobs::Job>(s).is_ok()
                    || serde_json::from_str::<replog::plan::run::Run>(s).is_ok(),
                "{s}"
            );
        }
    }
}
