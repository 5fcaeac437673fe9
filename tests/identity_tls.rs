//! Site identity and trust: `replog init` makes a key and certificate, `replog id`
//! prints the fingerprint, `replog trust` pins a peer; mutual TLS 1.3 on real TCP
//! accepts only pinned peers, in both directions.

use replog::identity::{self, Identity, SiteId};
use replog::Site;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn replog() -> Command {
    Command::new(env!("CARGO_BIN_EXE_replog"))
}

fn id_of(site: &Path) -> String {
    let out = replog().arg("id").arg(site).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One connection: server (site `srv`) and client (site `cli`), each with its own
/// trusted set. Returns what each side saw.
fn handshake(srv: &Path, cli: &Path) -> (Result<Vec<u8>, String>, Result<Vec<u8>, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_cfg = Arc::new(
        identity::server_config(
            &Identity::load(srv).expect("srv id"),
            identity::trusted_peers(srv).expect("peers"),
        )
        .expect("server config"),
    );
    let server = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        let conn = rustls::ServerConnection::new(server_cfg).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        tls.write_all(b"pong!").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        Ok(buf.to_vec())
    });
    let client_cfg = Arc::new(
        identity::client_config(
            &Identity::load(cli).expect("cli id"),
            identity::trusted_peers(cli).expect("peers"),
        )
        .expect("client config"),
    );
    let client = (|| -> Result<Vec<u8>, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from("replog-site").map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(client_cfg, name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"ping!").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf.to_vec())
    })();
    (server.join().expect("server thread"), client)
}

#[test]
fn sites_have_ids_and_only_pinned_peers_connect() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for s in [&a, &b, &c] {
        let out = replog().arg("init").arg(s).output().expect("init");
        assert!(out.status.success());
    }
    let (ida, idb, idc) = (id_of(&a), id_of(&b), id_of(&c));
    assert_eq!(ida.len(), 64);
    assert_ne!(ida, idb);
    assert_eq!(
        SiteId::parse(&ida).expect("parse"),
        Identity::load(&a).expect("load").id()
    );
    // The key is private to root.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a.join("identity/key.pem"))
            .expect("stat")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Nobody trusts anybody yet: refused.
    let (s, c1) = handshake(&a, &b);
    assert!(
        s.is_err() && c1.is_err(),
        "untrusted peers talked: {s:?} {c1:?}"
    );

    // One direction only: still refused (mutual).
    assert!(replog()
        .arg("trust")
        .arg(&a)
        .arg(&idb)
        .status()
        .expect("trust")
        .success());
    let (s, c1) = handshake(&a, &b);
    assert!(
        s.is_err() && c1.is_err(),
        "server trusted client but not back: {s:?} {c1:?}"
    );

    // Both ways: the bytes cross.
    assert!(replog()
        .arg("trust")
        .arg(&b)
        .arg(&ida)
        .status()
        .expect("trust")
        .success());
    let (s, c1) = handshake(&a, &b);
    assert_eq!(s.expect("server side"), b"ping!");
    assert_eq!(c1.expect("client side"), b"pong!");

    // A third site with its own certificate is refused by a, before any data is read.
    assert!(replog()
        .arg("trust")
        .arg(&c)
        .arg(&ida)
        .status()
        .expect("trust")
        .success());
    let (s, c1) = handshake(&a, &c);
    assert!(s.is_err(), "server accepted an unpinned client: {s:?}");
    assert!(c1.is_err());
    let _ = idc;

    // Trusting twice is idempotent; junk and one's own ID are refused, nothing changes.
    let before = std::fs::read(a.join("trusted-peers")).expect("read");
    assert!(replog()
        .arg("trust")
        .arg(&a)
        .arg(&idb)
        .status()
        .expect("trust")
        .success());
    for bad in ["nothex", "../../etc/passwd", &ida] {
        let out = replog()
            .arg("trust")
            .arg(&a)
            .arg(bad)
            .output()
            .expect("trust");
        assert_eq!(out.status.code(), Some(1), "{bad}");
    }
    assert_eq!(
        std::fs::read(a.join("trusted-peers")).expect("read"),
        before
    );
    Site::open(&a).expect("site still opens");
}

/// Both ends of a replication session send small messages (the handshake's flights,
/// Hello and its answer, acknowledgements) without waiting: TCP_NODELAY on the
/// connecting and the accepting socket. Without it on the accepting one, every
/// session began with a 40 ms stall (the peer's delayed acknowledgement holding back
/// the target's next small write), which a planned failover paid twice.
#[test]
fn both_ends_of_a_session_send_small_writes_at_once() {
    use replog::replication::transport::{connect, listen};
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for s in [&a, &b] {
        Site::init(s).expect("init");
    }
    let (ida, idb) = (
        Identity::load(&a).expect("a").id(),
        Identity::load(&b).expect("b").id(),
    );
    identity::trust(&a, idb).expect("a trusts b");
    identity::trust(&b, ida).expect("b trusts a");
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let addr = listen(&a, "127.0.0.1:0", move |s, _peer| {
        let _ = tx
            .lock()
            .expect("lock")
            .send(s.sock.nodelay().expect("getsockopt"));
    })
    .expect("listen");
    let (client, peer, _) =
        connect(&b, &addr.to_string(), std::time::Duration::from_secs(10)).expect("connect");
    assert_eq!(peer, ida);
    assert!(client.sock.nodelay().expect("getsockopt"), "connecting end");
    let accepted = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the session began");
    assert!(accepted, "accepting end: TCP_NODELAY not set");
}
