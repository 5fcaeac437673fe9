//! Every refusal the receiver sends, provoked for real through a session, with the
//! class the source gives it: retry later, resynchronise, or stop (Critical). The
//! class comes from the refusal's code, never from its words.

mod common;

use replog::error::{Error, ErrorClass};
use replog::identity::SiteId;
use replog::replica::backend::DirBackend;
use replog::replica::crypt::ReplicaKey;
use replog::replica::store::Replicas;
use replog::replication::protocol::{self, Message, RefusalCode};
use replog::replication::receiver::{Failovers, Target};
use replog::storage::{FaultyStorage, MemStorage, OpenMode, Storage};
use std::path::Path;
use std::sync::Arc;

const PEER: [u8; 32] = [7; 32];

/// A connection's two directions, in memory.
struct Duplex {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl std::io::Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Run a session of `msgs` (after this build's Hello, unless `hello` is false); the
/// refusal that ended it, if one did.
fn session(target: &Target, hello: bool, msgs: &[Message]) -> Option<(RefusalCode, String)> {
    let hello = if hello {
        protocol::encode(&protocol::hello(PEER)).expect("hello")
    } else {
        Vec::new()
    };
    session_after(target, hello, msgs)
}

/// Run a session of `msgs` after the frame bytes `hello`; the refusal that ended it.
fn session_after(
    target: &Target,
    hello: Vec<u8>,
    msgs: &[Message],
) -> Option<(RefusalCode, String)> {
    let mut input = hello;
    for m in msgs {
        input.extend(protocol::encode(m).expect("encode"));
    }
    let mut wire = Duplex {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    target.session(&mut wire, SiteId(PEER));
    let mut at = 0;
    while at < wire.output.len() {
        let (m, used) = protocol::decode::<Message>(&wire.output[at..]).expect("answer");
        if let Message::Error { code, message } = m {
            return Some((code, message));
        }
        at += used;
    }
    None
}

/// Sealed segments of a machine (id, segment bytes), written in memory.
fn segments() -> (u64, Vec<Vec<u8>>) {
    let mem = MemStorage::new();
    let dir = Path::new("/src/vm1");
    common::create_machine(&mem, dir, &[1 << 20]);
    let m = common::open(Arc::new(mem.clone()), dir, 1 << 20).expect("open");
    for i in 0..3u64 {
        m.volume("d0")
            .expect("vol")
            .write(i * 4096, &common::pattern(i, 4096))
            .expect("write");
        m.flush().expect("flush");
        m.seal().expect("seal");
    }
    let segs = (1..=3)
        .map(|s| {
            let p = dir
                .join("journal")
                .join(replog::format::segment::segment_name(s));
            replog::storage::read_all(
                mem.open(&p, OpenMode::ReadOnly).expect("seg").as_ref(),
                1 << 30,
            )
            .expect("read")
        })
        .collect();
    (m.machine_id(), segs)
}

fn protect(machine_id: u64, generation: u32) -> Message {
    Message::Protect {
        machine: "vm1".into(),
        machine_id,
        generation,
        disks: vec![("d0".into(), 1 << 20)],
        base_lsn: 0,
        base_seq: 0,
        retention_ms: 60_000,
        app_retention_ms: 60_000,
    }
}

fn chunk(seq: u64, bytes: &[u8]) -> Message {
    Message::SegmentChunk {
        machine: "vm1".into(),
        generation: 1,
        seq,
        segment_len: bytes.len() as u64,
        offset: 0,
        compressed: false,
        bytes: bytes.to_vec(),
    }
}

/// The refusal's code is `want`, and the source would class it `class`.
fn assert_refused(got: Option<(RefusalCode, String)>, want: RefusalCode, class: ErrorClass) {
    let (code, message) = got.unwrap_or_else(|| panic!("no refusal; wanted {want:?}"));
    assert_eq!(code, want, "{message}");
    let as_source_sees_it = Error::Refused {
        peer: "target".into(),
        code,
        message,
    };
    assert_eq!(as_source_sees_it.class(), class, "{as_source_sees_it}");
}

fn target_in(fs: &FaultyStorage) -> Target {
    Target::new(
        SiteId([8; 32]),
        Replicas::new(
            Arc::new(DirBackend::new(Arc::new(fs.clone()), "/t/replicas")),
            ReplicaKey::from_bytes([3; 32]),
        ),
    )
}

#[test]
fn every_refusal_the_receiver_sends_has_its_class() {
    let (id, segs) = segments();
    let fs = FaultyStorage::new();
    let t = target_in(&fs);

    // Protocol violations: the session is closed, nothing applied, retried.
    assert_refused(
        session(&t, false, &[Message::Probe]),
        RefusalCode::Protocol,
        ErrorClass::Retry,
    );
    assert_refused(
        session(&t, true, &[chunk(1, &segs[0])]),
        RefusalCode::Protocol,
        ErrorClass::Retry,
    );
    let hostile = Message::ResyncHashRequest {
        machine: "vm1".into(),
        disk: 0,
        first: 0,
        count: u64::MAX,
        group: 1,
    };
    assert_refused(
        session(&t, true, &[protect(id, 1), hostile]),
        RefusalCode::Protocol,
        ErrorClass::Retry,
    );
    // After the greeting, a frame whose header (not covered by its checksum) names
    // another version is a damaged frame: Protocol, retried — not Version.
    let mut input = protocol::encode(&protocol::hello(PEER)).expect("hello");
    let mut damaged = protocol::encode(&protect(id, 1)).expect("encode");
    damaged[4] ^= 0x08;
    input.extend(damaged);
    assert_refused(
        session_after(&t, input, &[]),
        RefusalCode::Protocol,
        ErrorClass::Retry,
    );
    // Another protocol version: Critical.
    let old_hello = Message::Hello {
        site_id: PEER,
        software: "replog 0".into(),
        protocol: 3,
        features: protocol::FEATURES,
        required: 0,
    };
    let mut input = protocol::encode(&old_hello).expect("encode");
    input.extend(protocol::encode(&Message::Probe).expect("encode"));
    let mut wire = Duplex {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    t.session(&mut wire, SiteId(PEER));
    let (m, _) = protocol::decode::<Message>(&wire.output).expect("answer");
    match m {
        Message::Error { code, message } => {
            assert_eq!(code, RefusalCode::Version);
            assert!(
                message.contains("version 3") && message.contains("version 2"),
                "{message}"
            );
            assert_eq!(
                Error::Refused {
                    peer: "t".into(),
                    code,
                    message
                }
                .class(),
                ErrorClass::Critical
            );
        }
        other => panic!("{other:?}"),
    }
    // A Hello that names another site than the certificate: Critical.
    let mut wire = Duplex {
        input: std::io::Cursor::new(protocol::encode(&protocol::hello([9; 32])).expect("encode")),
        output: Vec::new(),
    };
    t.session(&mut wire, SiteId(PEER));
    let (m, _) = protocol::decode::<Message>(&wire.output).expect("answer");
    assert!(
        matches!(
            m,
            Message::Error {
                code: RefusalCode::NotOwner,
                ..
            }
        ),
        "{m:?}"
    );

    // The replica is made and takes segment 1; a gap after it: resynchronise.
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(1, &segs[0])]),
        None
    );
    assert_refused(
        session(&t, true, &[protect(id, 1), chunk(3, &segs[2])]),
        RefusalCode::BrokenChain,
        ErrorClass::NeedsResync,
    );
    // Different bytes under a stored number: resynchronise.
    let mut other = segs[0].clone();
    let n = other.len();
    other[n - 60] ^= 1;
    assert_refused(
        session(&t, true, &[protect(id, 1), chunk(1, &other)]),
        RefusalCode::BrokenChain,
        ErrorClass::NeedsResync,
    );
    // Another machine under this replica's name: Critical.
    assert_refused(
        session(&t, true, &[protect(id ^ 1, 1)]),
        RefusalCode::NotOwner,
        ErrorClass::Critical,
    );
    // A newer generation is taken; then the older one is fenced: Critical.
    assert_eq!(session(&t, true, &[protect(id, 2)]), None);
    assert_refused(
        session(&t, true, &[protect(id, 1)]),
        RefusalCode::Fenced,
        ErrorClass::Critical,
    );

    // The target compactor is merging into the replica: busy, retry.
    {
        let r = Replicas::new(
            Arc::new(DirBackend::new(Arc::new(fs.clone()), "/t/replicas")),
            ReplicaKey::from_bytes([3; 32]),
        );
        let mut st = r.open("vm1").expect("store");
        let mut mark = st.parent().clone();
        mark.merging_to = Some((1, 1));
        st.set_parent(mark).expect("mark");
    }
    let fresh = target_in(&fs);
    let resync = Message::ResyncStart {
        machine: "vm1".into(),
        generation: 2,
        base_lsn: 3,
        base_seq: 1,
        chunk_bytes: 4096,
    };
    assert_refused(
        session(&fresh, true, &[protect(id, 2), resync]),
        RefusalCode::Busy,
        ErrorClass::Retry,
    );

    // Out of space at the target: retry when there is room; another I/O error: retry.
    for (errno, code) in [
        (libc::ENOSPC, RefusalCode::NoSpace),
        (libc::EIO, RefusalCode::Unavailable),
    ] {
        let full = FaultyStorage::new();
        let t = target_in(&full);
        full.fail_with(errno);
        full.fail_write_after(0, true);
        assert_refused(
            session(&t, true, &[protect(id, 1)]),
            code,
            ErrorClass::Retry,
        );
        full.heal();
        assert_eq!(
            session(&t, true, &[protect(id, 1), chunk(1, &segs[0])]),
            None
        );
    }
}

/// `--shutdown-source` asks only a primary whose Hello has the shutdown-request bit:
/// one built before it (the v3 fixture's Hello) could not decode the refusal, so it is
/// never sent one, and the request waits for a primary that knows it.
#[test]
fn a_shutdown_request_goes_only_to_a_primary_that_knows_it() {
    let (id, segs) = segments();
    let fs = FaultyStorage::new();
    let failovers = Arc::new(Failovers::default());
    let t = target_in(&fs).with_failovers(failovers.clone());
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(1, &segs[0])]),
        None
    );
    failovers.request_shutdown("vm1");

    let old_hello = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v3/protocol/hello.frame"),
    )
    .expect("fixture");
    match protocol::decode::<Message>(&old_hello).expect("hello").0 {
        Message::Hello { features, .. } => {
            assert_eq!(features & protocol::FEATURE_SHUTDOWN_REQUEST, 0)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        session_after(&t, old_hello, &[protect(id, 1), chunk(2, &segs[1])]),
        None,
        "an older primary goes on replicating"
    );

    assert_refused(
        session(&t, true, &[protect(id, 1)]),
        RefusalCode::FailoverRequested,
        ErrorClass::Retry,
    );
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(3, &segs[2])]),
        None,
        "told once"
    );
    assert!(failovers.withdraw_shutdown("vm1"), "it was told");
}

/// Two sessions for one machine (a sender that died and came back while the target
/// still drains the old connection): the newer Protect takes the store over, and
/// the older session is refused at its next message instead of writing behind the
/// newer one's position.
#[test]
fn a_newer_session_for_a_machine_takes_it_over_from_the_older() {
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;
    let (id, segs) = segments();
    let fs = FaultyStorage::new();
    let t = Arc::new(target_in(&fs));
    let (mut old_sender, mut old_wire) = UnixStream::pair().expect("pair");
    let t1 = t.clone();
    let old = std::thread::spawn(move || t1.session(&mut old_wire, SiteId(PEER)));
    let send = |s: &mut UnixStream, m: &Message| {
        s.write_all(&protocol::encode(m).expect("encode"))
            .expect("send")
    };
    send(&mut old_sender, &protocol::hello(PEER));
    send(&mut old_sender, &protect(id, 1));
    // Hello and Protected come back: the old session owns the store now.
    for _ in 0..2 {
        let m: Message = protocol::read_frame(&mut old_sender).expect("answer");
        assert!(!matches!(m, Message::Error { .. }), "{m:?}");
    }
    // The newer session: Protect, then the first segment.
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(1, &segs[0])]),
        None
    );
    // The older one's segment is refused, and changes nothing.
    send(&mut old_sender, &chunk(2, &segs[1]));
    let m: Message = protocol::read_frame(&mut old_sender).expect("answer");
    match m {
        Message::Error { code, message } => {
            assert_eq!(code, RefusalCode::Busy, "{message}");
            assert!(message.contains("newer session"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    drop(old_sender);
    old.join().expect("old session");
    // The newer session's position is intact: segment 2 follows segment 1 there.
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(2, &segs[1])]),
        None
    );
}

/// A Protect of `vm1` with one disk of 64 MiB (a fresh replica wants its initial copy).
fn protect_64m(machine_id: u64) -> Message {
    match protect(machine_id, 1) {
        Message::Protect {
            machine,
            machine_id,
            generation,
            base_lsn,
            base_seq,
            retention_ms,
            app_retention_ms,
            ..
        } => Message::Protect {
            machine,
            machine_id,
            generation,
            disks: vec![("d0".into(), 64 << 20)],
            base_lsn,
            base_seq,
            retention_ms,
            app_retention_ms,
        },
        other => other,
    }
}

/// Initial-copy chunk `i`: MiB `i` of disk d0, pattern `i`.
fn mib(i: u64) -> Message {
    Message::InitialChunk {
        machine: "vm1".into(),
        generation: 1,
        disk: 0,
        offset: i << 20,
        compressed: false,
        bytes: common::pattern(i, 1 << 20),
    }
}

/// The replica's initial copy as its store keeps it: (done, position).
fn initial_state(fs: &FaultyStorage) -> (bool, (u32, u64)) {
    let r = Replicas::new(
        Arc::new(DirBackend::new(Arc::new(fs.clone()), "/t/replicas")),
        ReplicaKey::from_bytes([3; 32]),
    );
    let st = r.open("vm1").expect("store");
    (st.base_cursor().is_err(), st.base_position())
}

/// The initial copy's chunks are checked as they arrive and stored in batches of
/// 16 MiB on a thread of their own while the next batch arrives: a chunk behind the
/// position is refused as before, the batch already handed on stays stored, and a
/// later session resumes there; a batch the store fails is refused with the store's
/// error and leaves the position where it was.
#[test]
fn initial_chunks_are_checked_on_arrival_and_stored_in_batches() {
    const ID: u64 = 42;
    let fs = FaultyStorage::new();
    let t = target_in(&fs);
    // 20 MiB in order, then MiB 3 again: refused; the first 16 MiB were one batch.
    let mut msgs = vec![protect_64m(ID)];
    msgs.extend((0..20).map(mib));
    msgs.push(mib(3));
    assert_refused(
        session(&t, true, &msgs),
        RefusalCode::BrokenChain,
        ErrorClass::NeedsResync,
    );
    assert_eq!(initial_state(&fs), (false, (0, 16 << 20)));

    // A chunk past the disk's end: refused (a source that sends one is broken),
    // nothing more stored.
    let past = Message::InitialChunk {
        machine: "vm1".into(),
        generation: 1,
        disk: 0,
        offset: 63 << 20,
        compressed: false,
        bytes: vec![1; 2 << 20],
    };
    assert_refused(
        session(&t, true, &[protect_64m(ID), mib(16), past]),
        RefusalCode::Fatal,
        ErrorClass::Critical,
    );
    assert_eq!(initial_state(&fs), (false, (0, 16 << 20)));

    // An empty chunk, plain or compressed, would leave the position where it was,
    // so a source could send them without end: refused, nothing more stored.
    for compressed in [false, true] {
        let empty = Message::InitialChunk {
            machine: "vm1".into(),
            generation: 1,
            disk: 0,
            offset: 17 << 20,
            compressed,
            bytes: if compressed {
                lz4_flex::block::compress_prepend_size(&[])
            } else {
                Vec::new()
            },
        };
        let got = session(&t, true, &[protect_64m(ID), mib(16), empty]);
        assert!(
            got.as_ref()
                .is_some_and(|(_, m)| m.contains("empty initial chunk")),
            "{got:?}"
        );
        assert_refused(got, RefusalCode::Fatal, ErrorClass::Critical);
        assert_eq!(initial_state(&fs), (false, (0, 16 << 20)));
    }

    // The store fails while a batch is stored: its error, and the position stays.
    // Only the first write fails: were the batch's error lost, the chunks after it
    // would be stored and the position would pass the missing ones.
    fs.fail_with(libc::ENOSPC);
    fs.fail_write_after(0, false);
    // (A Protect of a replica that exists writes nothing: what fails below is the
    // batch.)
    assert_eq!(session(&t, true, &[protect_64m(ID)]), None);
    let mut msgs = vec![protect_64m(ID)];
    msgs.extend((16..40).map(mib));
    assert_refused(
        session(&t, true, &msgs),
        RefusalCode::NoSpace,
        ErrorClass::Retry,
    );
    fs.heal();
    assert_eq!(initial_state(&fs), (false, (0, 16 << 20)));

    // The rest, resumed where the store stands, completes the copy.
    let mut msgs = vec![protect_64m(ID)];
    msgs.extend((16..64).map(mib));
    msgs.push(Message::InitialDone {
        machine: "vm1".into(),
    });
    assert_eq!(session(&t, true, &msgs), None);
    assert!(initial_state(&fs).0, "the copy is not complete");
    let r = Replicas::new(
        Arc::new(DirBackend::new(Arc::new(fs.clone()), "/t/replicas")),
        ReplicaKey::from_bytes([3; 32]),
    );
    let st = r.open("vm1").expect("store");
    let chunk = replog::replica::store::CHUNK_BYTES;
    let mut disk = Vec::with_capacity(64 << 20);
    for n in 0..(64 << 20) / chunk {
        disk.extend(st.read_chunk(0, n).expect("read").expect("a stored chunk"));
    }
    for i in 0..64u64 {
        let at = (i << 20) as usize;
        assert!(
            disk[at..at + (1 << 20)] == common::pattern(i, 1 << 20)[..],
            "MiB {i} differs"
        );
    }
}

/// `PromoteSoon` (a planned failover has begun at the primary): a target that can
/// promote reads ahead the segments it holds and each one stored after it in that
/// session, as the store gives them back; one before Protect, for another machine or
/// generation, or a second in a session ends the session as a protocol error and
/// reads nothing; a target that cannot promote takes it and reads nothing.
#[test]
fn promote_soon_reads_ahead_what_the_replica_stored() {
    use std::time::Duration;
    let (id, segs) = segments();
    let fs = FaultyStorage::new();
    let replicas = Replicas::new(
        Arc::new(DirBackend::new(Arc::new(fs.clone()), "/t/replicas")),
        ReplicaKey::from_bytes([3; 32]),
    );
    let t = Target::new(SiteId([8; 32]), replicas.clone()).on_promote(|_, _, _| Ok(()));
    let soon = |machine: &str, generation| Message::PromoteSoon {
        machine: machine.into(),
        generation,
    };
    assert_eq!(
        session(&t, true, &[protect(id, 1), chunk(1, &segs[0])]),
        None
    );
    let warm = replicas.warm();
    for (msgs, why) in [
        (vec![soon("vm1", 1)], "before Protect"),
        (vec![protect(id, 1), soon("vm2", 1)], "vm2"),
        (vec![protect(id, 1), soon("vm1", 2)], "generation 2"),
    ] {
        let (code, message) = session(&t, true, &msgs).expect("refused");
        assert_eq!(code, RefusalCode::Protocol, "{why}: {message}");
        assert!(!warm.active("vm1"), "{why}: read ahead anyway");
    }

    assert_eq!(
        session(
            &t,
            true,
            &[protect(id, 1), soon("vm1", 1), chunk(2, &segs[1])]
        ),
        None
    );
    assert!(warm.active("vm1"));
    assert!(warm.settle("vm1", Duration::from_secs(60)), "not read");
    let store = replicas.open_readonly("vm1").expect("replica");
    for seq in [1u64, 2] {
        let (kept, header) = warm.get("vm1", seq).expect("kept");
        assert_eq!(
            &kept[..],
            &store.read_segment(seq).expect("read")[..],
            "segment {seq}"
        );
        assert_eq!(&header[..4], &replog::replica::crypt::MAGIC[..4]);
        assert_eq!(kept[..], segs[seq as usize - 1][..], "segment {seq}");
    }
    assert!(warm.get("vm1", 3).is_none(), "not stored, not kept");
    // A second in one session: a protocol error.
    let (code, message) =
        session(&t, true, &[protect(id, 1), soon("vm1", 1), soon("vm1", 1)]).expect("refused");
    assert_eq!(code, RefusalCode::Protocol, "{message}");
    warm.end("vm1");
    assert!(!warm.active("vm1") && warm.get("vm1", 1).is_none());

    // A target that cannot promote reads nothing ahead.
    let fs2 = FaultyStorage::new();
    let replicas2 = Replicas::new(
        Arc::new(DirBackend::new(Arc::new(fs2.clone()), "/t/replicas")),
        ReplicaKey::from_bytes([3; 32]),
    );
    let plain = Target::new(SiteId([8; 32]), replicas2.clone());
    assert_eq!(
        session(&plain, true, &[protect(id, 1), chunk(1, &segs[0])]),
        None
    );
    assert_eq!(
        session(&plain, true, &[protect(id, 1), soon("vm1", 1)]),
        None
    );
    assert!(!replicas2.warm().active("vm1"));
}
