//! Site identity and trust: every site has a key and a self-signed certificate made at
//! `replog init`; its ID is the SHA-256 fingerprint of that certificate. Sites trust
//! each other by pinning IDs (`replog trust`), and connections between them are mutual
//! TLS 1.3 that accepts only pinned peers, in both directions.
//!
//! ```text
//! SITE/identity/cert.pem        the site's certificate (self-signed, rcgen)
//! SITE/identity/key.pem         its private key (PKCS#8, mode 0600)
//! SITE/trusted-peers            "# replog trusted peers, format 1", then one ID a line
//! ```
//!
//! No certificate authority is involved: the fingerprint is the trust. Names in the
//! certificate are not checked (sites are addressed by IP as often as by name).

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub const IDENTITY_DIR: &str = "identity";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const TRUST_FILE: &str = "trusted-peers";
const TRUST_HEADER: &str = "# replog trusted peers, format 1";

/// A site's ID: the SHA-256 of its certificate, written as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(pub [u8; 32]);

impl SiteId {
    pub fn of_cert(der: &[u8]) -> SiteId {
        SiteId(Sha256::digest(der).into())
    }

    pub fn parse(s: &str) -> Result<SiteId> {
        let s = s.trim();
        let bad = || {
            Error::InvalidInput(format!(
                "{s:?} is not a site ID (64 hex digits, as `replog id SITE` prints)"
            ))
        };
        if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(SiteId(out))
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A site's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.id())
    }
}

impl Identity {
    pub fn id(&self) -> SiteId {
        SiteId::of_cert(&self.cert)
    }

    /// Make a new key and self-signed certificate in `site/identity/`.
    pub fn create(site: &Path) -> Result<Identity> {
        let dir = site.join(IDENTITY_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let made = rcgen::generate_simple_self_signed(vec!["replog-site".to_string()])
            .map_err(|e| Error::InvalidInput(format!("generating the site certificate: {e}")))?;
        // A key without a certificate is a creation that did not finish: replace it.
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() && !dir.join(CERT_FILE).exists() {
            std::fs::remove_file(&key_path).map_err(|e| Error::io("remove", &key_path, e))?;
        }
        write_new(
            &key_path,
            made.signing_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        // The certificate last: its presence is what says "this site has an identity".
        write_new(&dir.join(CERT_FILE), made.cert.pem().as_bytes(), 0o644)?;
        crate::storage::Storage::sync_dir(&crate::storage::FileStorage, &dir)?;
        crate::storage::Storage::sync_dir(&crate::storage::FileStorage, site)?;
        Self::load(site)
    }

    pub fn load(site: &Path) -> Result<Identity> {
        let dir = site.join(IDENTITY_DIR);
        let cert_path = dir.join(CERT_FILE);
        if !cert_path.is_file() {
            return Err(Error::NotFound(format!(
                "site {} has no identity ({} is missing)",
                site.display(),
                cert_path.display()
            )));
        }
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| Error::corruption(&cert_path, 0, format!("certificate: {e}")))?;
        let key_path = dir.join(KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| Error::corruption(&key_path, 0, format!("private key: {e}")))?;
        Ok(Identity { cert, key })
    }
}

/// Create `path` (it must not exist) with `mode`, write `bytes`, fsync.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// The set of peers a site trusts.
pub fn trusted_peers(site: &Path) -> Result<BTreeSet<SiteId>> {
    let path = site.join(TRUST_FILE);
    if !path.exists() {
        return Ok(BTreeSet::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let id = SiteId::parse(line).map_err(|_| {
            Error::InvalidInput(format!("{} line {}: not a site ID", path.display(), n + 1))
        })?;
        out.insert(id);
    }
    Ok(out)
}

/// Pin `peer` in `site`'s trusted peers (idempotent; the file is replaced atomically,
/// so a reader sees either the old or the new set; TLS configurations take a copy
/// when they are built). Returns false if it was trusted already. Concurrent calls
/// are serialised by an flock on `trusted-peers.lock`.
pub fn trust(site: &Path, peer: SiteId) -> Result<bool> {
    let lock_path = site.join(format!("{TRUST_FILE}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("open", &lock_path, e))?;
    lock.lock().map_err(|e| Error::io("lock", &lock_path, e))?;
    let mut peers = trusted_peers(site)?;
    if !peers.insert(peer) {
        return Ok(false);
    }
    let mut text = format!("{TRUST_HEADER}\n");
    for p in &peers {
        text.push_str(&format!("{p}\n"));
    }
    crate::storage::write_atomic(
        &crate::storage::FileStorage,
        &site.join(TRUST_FILE),
        text.as_bytes(),
    )?;
    Ok(true)
}

/// Accepts exactly the certificates whose fingerprints are pinned.
/// A certificate whose site ID is not pinned (the ID is in the message, so a
/// client can tell that it reached itself).
struct NotTrusted(SiteId);

impl std::fmt::Debug for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "site {} is not trusted", self.0)
    }
}

impl std::error::Error for NotTrusted {}

#[derive(Debug)]
struct Pinned {
    peers: BTreeSet<SiteId>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        let id = SiteId::of_cert(cert);
        if self.peers.contains(&id) {
            Ok(())
        } else {
            tracing::warn!("refused a peer that is not trusted: site ID {id}");
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotTrusted(id))),
            )))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(e: rustls::Error) -> Error {
    Error::InvalidInput(format!("TLS configuration: {e}"))
}

/// TLS 1.3 server side: presents `me`, requires a client certificate in `peers`.
pub fn server_config(me: &Identity, peers: BTreeSet<SiteId>) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        peers,
        provider: provider.clone(),
    });
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert.clone()], me.key.clone_key())
        .map_err(tls_error)
}

/// TLS 1.3 client side: presents `me`, accepts only a server certificate in `peers`.
pub fn client_config(me: &Identity, peers: BTreeSet<SiteId>) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        peers,
        provider: provider.clone(),
    });
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![me.cert.clone()], me.key.clone_key())
        .map_err(tls_error)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_refuse_junk() {
        let id = SiteId::of_cert(b"abc");
        assert_eq!(SiteId::parse(&id.to_string()).unwrap(), id);
        for bad in [
            "",
            "zz",
            &"g".repeat(64),
            &"a".repeat(63),
            &"a".repeat(65),
            "../etc",
        ] {
            assert!(SiteId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
