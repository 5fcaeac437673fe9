//! Mutual TLS 1.3 over TCP between pinned sites (see [`crate::identity`]).
//!
//! Blocking I/O with timeouts: a session is a thread. The trusted set is read afresh
//! for every connection, so `replog trust` takes effect without a restart.

use crate::error::{Error, Result};
use crate::identity::{self, Identity, SiteId};
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a read or write may block before the session is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unauthenticated peer may take over each step of the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections allowed in their handshake at once.
pub const MAX_HANDSHAKES: usize = 64;

pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;
pub type ServerStream = StreamOwned<ServerConnection, TcpStream>;

/// The site the peer's certificate chain belongs to: its root, the last certificate
/// (the handshake's verifier has checked the pin and every endorsement).
fn peer_id(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>, peer: &str) -> Result<SiteId> {
    certs
        .and_then(|c| c.last())
        .map(|c| SiteId::of_cert(c))
        .ok_or_else(|| Error::Auth {
            peer: peer.to_string(),
            why: "the peer presented no certificate".into(),
            by_peer: false,
        })
}

/// An error on the connection with `peer`: TLS refusing a certificate (ours or the
/// peer's — in TLS 1.3 the peer's refusal of ours arrives as an alert on the first
/// read) is an authentication failure; anything else is the network. Other TLS
/// errors (a record that fails its MAC because a byte was flipped in transit) abort
/// the session but are the network's fault, retried like it.
pub fn net_error(op: &'static str, peer: &str, e: std::io::Error) -> Error {
    match tls_refusal(&e) {
        Some((why, by_peer)) => Error::Auth {
            peer: peer.to_string(),
            why,
            by_peer,
        },
        // A read timeout shows as EAGAIN ("Resource temporarily unavailable"): say
        // what it is.
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            Error::Net {
                op,
                peer: peer.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "nothing for {} s: the session timed out",
                        super::wire_fault::io_timeout().as_secs()
                    ),
                ),
            }
        }
        None => Error::Net {
            op,
            peer: peer.to_string(),
            source: e,
        },
    }
}

/// The certificate refusal inside a socket error, if it is one, and whether it was
/// the peer that refused (an alert it sent) rather than this site.
fn tls_refusal(e: &std::io::Error) -> Option<(String, bool)> {
    use rustls::AlertDescription as A;
    let tls = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())?;
    let refused = matches!(
        tls,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(
                A::AccessDenied
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::CertificateRequired
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
            )
    );
    let by_peer = matches!(tls, rustls::Error::AlertReceived(_));
    refused.then(|| (tls.to_string(), by_peer))
}

fn tls_io(op: &'static str, addr: &str, e: std::io::Error) -> Error {
    net_error(op, addr, e)
}

/// Connect to the site at `addr` as `site` (its identity and trusted peers). The
/// handshake completes before this returns: an untrusted or unreachable peer is an
/// error here, before any data is sent. The stream, the peer's site ID and this
/// site's.
pub fn connect(
    site: &Path,
    addr: &str,
    timeout: Duration,
) -> Result<(ClientStream, SiteId, SiteId)> {
    let me = Identity::load(site)?;
    let cfg = Arc::new(identity::client_config(
        &me,
        identity::trusted_peers(site)?,
    )?);
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| tls_io("resolve", addr, e))?
        .next()
        .ok_or_else(|| Error::InvalidInput(format!("{addr} resolves to no address")))?;
    // (A name that does not resolve is the network's answer too: retried.)
    let tcp =
        TcpStream::connect_timeout(&sock, timeout).map_err(|e| tls_io("connect to", addr, e))?;
    let io_timeout = super::wire_fault::io_timeout();
    tcp.set_read_timeout(Some(io_timeout))
        .map_err(|e| tls_io("configure", addr, e))?;
    tcp.set_write_timeout(Some(io_timeout))
        .map_err(|e| tls_io("configure", addr, e))?;
    tcp.set_nodelay(true)
        .map_err(|e| tls_io("configure", addr, e))?;
    let name = rustls::pki_types::ServerName::try_from("replog-site")
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
    let conn = ClientConnection::new(cfg, name).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| tls_io("TLS handshake with", addr, e))?;
    }
    let peer = peer_id(stream.conn.peer_certificates(), addr)?;
    crate::metrics::get()
        .tls_sessions
        .get_or_create(&crate::metrics::DirectionLabel { direction: "out" })
        .inc();
    Ok((stream, peer, me.id()))
}

/// Whether a read of `s` would find data without waiting: plaintext rustls holds
/// already, or bytes (or the peer's close) waiting on the socket.
pub fn input_ready(s: &mut ServerStream) -> bool {
    match s.conn.process_new_packets() {
        Ok(st) if st.plaintext_bytes_to_read() > 0 => return true,
        Ok(_) => {}
        // The next read reports it.
        Err(_) => return true,
    }
    let mut p = libc::pollfd {
        fd: std::os::unix::io::AsRawFd::as_raw_fd(&s.sock),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Accept TLS sessions on `addr` for `site`, running `session` on a thread for each
/// one whose handshake succeeds (untrusted peers are refused in the handshake, before
/// `session` sees a byte). Returns the bound address; the listener runs until the
/// process exits.
pub fn listen(
    site: &Path,
    addr: &str,
    session: impl Fn(ServerStream, SiteId) + Send + Sync + 'static,
) -> Result<SocketAddr> {
    let me = Arc::new(Identity::load(site)?);
    let listener = TcpListener::bind(addr).map_err(|e| tls_io("listen on", addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| tls_io("listen on", addr, e))?;
    let site = site.to_path_buf();
    let session = Arc::new(session);
    let handshaking = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("replication-listener".into())
        .spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                // Unauthenticated peers get a bounded number of threads, each for a
                // bounded time.
                if handshaking.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                    tracing::warn!("too many connections in their handshake; refusing one");
                    continue;
                }
                handshaking.fetch_add(1, Ordering::AcqRel);
                let counter = handshaking.clone();
                let (me, site, session) = (me.clone(), site.clone(), session.clone());
                let spawned = std::thread::Builder::new()
                    .name("replication-session".into())
                    .spawn(move || {
                        let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        let accepted = accept(&me, &site, tcp);
                        counter.fetch_sub(1, Ordering::AcqRel);
                        match accepted {
                            Ok((stream, peer)) => session(stream, peer),
                            Err(e) => tracing::warn!("refused a connection from {from}: {e}"),
                        }
                    });
                if spawned.is_err() {
                    handshaking.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|e| net_error("start the listener thread for", addr, e))?;
    Ok(bound)
}

fn accept(me: &Identity, site: &Path, tcp: TcpStream) -> Result<(ServerStream, SiteId)> {
    let cfg = Arc::new(identity::server_config(me, identity::trusted_peers(site)?)?);
    let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let timeouts = |t: &TcpStream, d: Duration| {
        t.set_read_timeout(Some(d))
            .and_then(|()| t.set_write_timeout(Some(d)))
            .map_err(|e| tls_io("configure", &from, e))
    };
    timeouts(&tcp, HANDSHAKE_TIMEOUT)?;
    // As at the connecting end: without it the target's small writes (the handshake's
    // last flight, a reply after another unacknowledged one) waited for the peer's
    // delayed acknowledgement, 40 ms on Linux — at every session's start.
    tcp.set_nodelay(true)
        .map_err(|e| tls_io("configure", &from, e))?;
    let conn = ServerConnection::new(cfg).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| tls_io("TLS handshake with", &from, e))?;
    }
    let peer = peer_id(stream.conn.peer_certificates(), &from)?;
    timeouts(&stream.sock, super::wire_fault::io_timeout())?;
    crate::metrics::get()
        .tls_sessions
        .get_or_create(&crate::metrics::DirectionLabel { direction: "in" })
        .inc();
    Ok((stream, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_timeout_says_it_timed_out_and_is_retried() {
        let e = net_error(
            "receive from",
            "127.0.0.1:1",
            std::io::Error::from(std::io::ErrorKind::WouldBlock),
        );
        let text = e.to_string();
        assert!(text.contains("timed out"), "{text}");
        assert!(!text.contains("temporarily unavailable"), "{text}");
        assert_eq!(e.class(), crate::error::ErrorClass::Retry);
    }
}
