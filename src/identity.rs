//! Site identity and trust: every site has a key and a self-signed certificate made at
//! `replog init`; its ID is the SHA-256 fingerprint of that certificate. Sites trust
//! each other by pinning IDs (`replog trust`), and connections between them are mutual
//! TLS 1.3 that accepts only pinned peers, in both directions.
//!
//! ```text
//! SITE/identity/cert.pem        the certificate the site presents (rcgen)
//! SITE/identity/key.pem         its private key (PKCS#8, mode 0600)
//! SITE/identity/lineage.pem     after a rotation: the certificates it had before,
//!                               newest first, each signed by the next (absent before)
//! SITE/trusted-peers            "# replog trusted peers, format 1", then one ID a line
//! ```
//!
//! No certificate authority is involved: the fingerprint is the trust. Names in the
//! certificate are not checked (sites are addressed by IP as often as by name).
//!
//! **Rotation** (`replog identity rotate`): a new key and certificate, the
//! certificate signed by the old key; the old certificate joins the lineage. The site
//! presents the chain `[current, previous, …, first]`; a peer accepts it when its
//! root — the last certificate, the site's first — is pinned and every certificate is
//! signed by the key of the next (so nobody can borrow another site's public
//! certificate to claim its ID), and knows the site by the root's fingerprint. A
//! site's ID therefore never changes: peers keep trusting it, and relationships and
//! replicas that name it stay valid, with no step on their side. The old key's file
//! is deleted (not securely erased).
//! Certificates are made valid until 4096 unless `--valid-days` says otherwise;
//! [`Identity::expiry_warning`] speaks up [`EXPIRY_WARNING_DAYS`] days before the end.

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
pub const LINEAGE_FILE: &str = "lineage.pem";
pub const TRUST_FILE: &str = "trusted-peers";
/// Rotations a site may make (the chain it presents grows by one certificate each).
pub const MAX_LINEAGE: usize = 16;
/// How long before its certificate ends that a site is warned.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
/// The name every replog certificate carries (not checked: the fingerprint is the trust).
const CERT_NAME: &str = "replog-site";
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
    /// The certificates the site had before, newest first (empty if it never rotated).
    lineage: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.id())
    }
}

impl Identity {
    /// The site's ID: the fingerprint of its first certificate (the lineage root),
    /// the same before and after rotations.
    pub fn id(&self) -> SiteId {
        SiteId::of_cert(self.lineage.last().unwrap_or(&self.cert))
    }

    /// The fingerprint of the certificate the site presents now.
    pub fn cert_id(&self) -> SiteId {
        SiteId::of_cert(&self.cert)
    }

    /// Rotations made so far.
    pub fn rotations(&self) -> usize {
        self.lineage.len()
    }

    /// What the site presents in TLS: its certificate, then its lineage.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        std::iter::once(self.cert.clone())
            .chain(self.lineage.iter().cloned())
            .collect()
    }

    /// When the certificate the site presents stops being valid (seconds since the
    /// epoch).
    pub fn not_after(&self) -> Result<i64> {
        let (_, x) = x509_parser::parse_x509_certificate(&self.cert)
            .map_err(|e| Error::InvalidInput(format!("the site certificate: {e}")))?;
        Ok(x.validity().not_after.timestamp())
    }

    /// A warning when the certificate ends within [`EXPIRY_WARNING_DAYS`] of `now`
    /// (seconds since the epoch), or has ended; the certificate is pinned, not
    /// checked for time, so peers go on accepting it, but a rotation is due.
    pub fn expiry_warning(&self, site: &Path, now: i64) -> Option<String> {
        expiry_warning(site, self.not_after().ok()?, now)
    }

    /// Make a new key and self-signed certificate in `site/identity/`.
    pub fn create(site: &Path) -> Result<Identity> {
        let dir = site.join(IDENTITY_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let made = rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()])
            .map_err(|e| Error::InvalidInput(format!("generating the site certificate: {e}")))?;
        // A key without a certificate is a creation that did not finish: replace it.
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() && !dir.join(CERT_FILE).exists() {
            std::fs::remove_file(&key_path).map_err(|e| Error::io("remove", &key_path, e))?;
        }
        crate::storage::create_file_mode(
            &key_path,
            made.signing_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        // The certificate last: its presence is what says "this site has an identity".
        crate::storage::create_file_mode(&dir.join(CERT_FILE), made.cert.pem().as_bytes(), 0o644)?;
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
        Self::load_dir(&dir)
    }

    /// The identity in `dir` (an identity directory): certificate, key and lineage,
    /// the lineage verified and the key checked against the certificate.
    fn load_dir(dir: &Path) -> Result<Identity> {
        let cert_path = dir.join(CERT_FILE);
        let cert = CertificateDer::from_pem_file(&cert_path)
            .map_err(|e| Error::corruption(&cert_path, 0, format!("certificate: {e}")))?;
        let key_path = dir.join(KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| Error::corruption(&key_path, 0, format!("private key: {e}")))?;
        let lineage_path = dir.join(LINEAGE_FILE);
        let mut lineage = Vec::new();
        if lineage_path.exists() {
            for c in CertificateDer::pem_file_iter(&lineage_path)
                .map_err(|e| Error::corruption(&lineage_path, 0, format!("lineage: {e}")))?
            {
                lineage.push(
                    c.map_err(|e| Error::corruption(&lineage_path, 0, format!("lineage: {e}")))?,
                );
            }
        }
        let me = Identity { cert, key, lineage };
        // Peers check the chain; check it here first, so a damaged lineage is named
        // at this site instead of as a refusal at every peer.
        lineage_root(&me.chain())
            .map_err(|why| Error::corruption(&lineage_path, 0, format!("lineage: {why}")))?;
        rustls::sign::CertifiedKey::from_der(me.chain(), me.key.clone_key(), &provider())
            .map_err(|e| Error::corruption(&key_path, 0, format!("private key: {e}")))?;
        Ok(me)
    }

    /// Replace the site's key and certificate by new ones, the certificate signed by
    /// the current key, whose file is then deleted (see the module documentation). The
    /// new certificate is valid for `valid_days` (None: until 4096). Crash-safe: the
    /// new identity directory is built and synced beside the current one and
    /// exchanged with it in one `renameat2(RENAME_EXCHANGE)`. Returns the
    /// fingerprints of the old and the new certificate. The caller holds the site
    /// (no serve runs): the directory's other files (the replica key) move along.
    pub fn rotate(site: &Path, valid_days: Option<u32>) -> Result<(SiteId, SiteId)> {
        let dir = site.join(IDENTITY_DIR);
        let next = site.join(format!("{IDENTITY_DIR}.next"));
        finish_rotation(site)?;
        let cur = Self::load(site)?;
        if cur.lineage.len() >= MAX_LINEAGE {
            return Err(Error::InvalidInput(format!(
                "site {} has rotated its certificate {MAX_LINEAGE} times, the most a \
                 lineage holds",
                site.display()
            )));
        }
        let gen_err = |e: rcgen::Error| Error::InvalidInput(format!("making the certificate: {e}"));
        let old_key = rcgen::KeyPair::try_from(&cur.key).map_err(gen_err)?;
        let new_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut params =
            rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).map_err(gen_err)?;
        if let Some(days) = valid_days {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(1);
            params.not_after = now
                .checked_add(time::Duration::days(i64::from(days)))
                .filter(|t| t.year() < 9999)
                .ok_or_else(|| Error::InvalidInput(format!("{days} days is past the year 9999")))?;
        }
        // The issuer's name is the default one every replog certificate has.
        let issuer = rcgen::Issuer::new(
            rcgen::CertificateParams::new(vec![CERT_NAME.to_string()]).map_err(gen_err)?,
            old_key,
        );
        let cert = params.signed_by(&new_key, &issuer).map_err(gen_err)?;
        std::fs::create_dir_all(&next).map_err(|e| Error::io("create", &next, e))?;
        // Everything else the directory holds (the replica key) goes along as the
        // same files (hard links), never copies that could drift.
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name();
            if [KEY_FILE, CERT_FILE, LINEAGE_FILE]
                .iter()
                .any(|n| name.as_os_str() == *n)
            {
                continue;
            }
            let from = entry.path();
            let kind = entry.file_type().map_err(|e| Error::io("stat", &from, e))?;
            if !kind.is_file() {
                return Err(Error::InvalidInput(format!(
                    "{} is not a regular file: move it out of {} before rotating",
                    from.display(),
                    dir.display()
                )));
            }
            std::fs::hard_link(&from, next.join(&name)).map_err(|e| Error::io("link", &from, e))?;
        }
        crate::storage::create_file_mode(
            &next.join(KEY_FILE),
            new_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        let mut lineage = pem_of(&cur.cert);
        for c in &cur.lineage {
            lineage.push_str(&pem_of(c));
        }
        crate::storage::create_file_mode(&next.join(LINEAGE_FILE), lineage.as_bytes(), 0o644)?;
        crate::storage::create_file_mode(&next.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
        let fs = crate::storage::FileStorage;
        crate::storage::Storage::sync_dir(&fs, &next)?;
        // The new identity must load as written (its chain verified, its key its
        // certificate's) and keep the site's ID before it replaces the old.
        let made = Self::load_dir(&next)?;
        if made.id() != cur.id() {
            return Err(Error::InvalidInput(
                "the new certificate does not lead back to the site's ID".into(),
            ));
        }
        exchange(&next, &dir)?;
        crate::storage::Storage::sync_dir(&fs, site)?;
        // `next` now holds the old identity: its key goes.
        std::fs::remove_dir_all(&next).map_err(|e| Error::io("remove", &next, e))?;
        crate::storage::Storage::sync_dir(&fs, site)?;
        Ok((cur.cert_id(), made.cert_id()))
    }
}

/// The warning of [`Identity::expiry_warning`] for a certificate ending at `end`
/// (seconds since the epoch), at `now`.
pub fn expiry_warning(site: &Path, end: i64, now: i64) -> Option<String> {
    let left = end.saturating_sub(now);
    if left > EXPIRY_WARNING_DAYS * 86_400 {
        return None;
    }
    let when = date_of(end);
    let state = if left <= 0 {
        format!("ended on {when}")
    } else {
        format!("ends on {when}, in {} days", (left + 86_399) / 86_400)
    };
    Some(format!(
        "the site certificate {state}: run `replog identity rotate {}` (peers keep \
         trusting the site; see README, \"Rotating a site's certificate\")",
        site.display()
    ))
}

/// `secs` since the epoch as a date (YYYY-MM-DD).
pub fn date_of(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| secs.to_string())
}

/// Remove what an interrupted rotation left: `identity.next/`, a new identity never
/// put in place, or the old one (with its key) after the exchange. Neither is in use.
/// Only with the site held (serve's start, a rotation): never beside a rotation.
pub fn finish_rotation(site: &Path) -> Result<()> {
    let next = site.join(format!("{IDENTITY_DIR}.next"));
    if std::fs::symlink_metadata(&next).is_ok() {
        std::fs::remove_dir_all(&next).map_err(|e| Error::io("remove", &next, e))?;
        crate::storage::Storage::sync_dir(&crate::storage::FileStorage, site)?;
    }
    Ok(())
}

fn pem_of(cert: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

/// Swap two directories atomically.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    crate::storage::renameat2(a, b, libc::RENAME_EXCHANGE).map_err(|e| Error::io("exchange", b, e))
}

fn parse_cert<'a>(
    c: &'a CertificateDer<'_>,
) -> std::result::Result<x509_parser::certificate::X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(c) {
        Ok(([], x)) => Ok(x),
        Ok((rest, _)) => Err(format!(
            "certificate {}: {} bytes after its end",
            SiteId::of_cert(c),
            rest.len()
        )),
        Err(e) => Err(format!("certificate {}: {e}", SiteId::of_cert(c))),
    }
}

/// The site a presented chain belongs to: `chain[0]` is the certificate whose key the
/// peer proved it holds; every later one must have signed the one before it (a
/// rotation's endorsement). The site's ID is the last one's fingerprint.
pub fn lineage_root(chain: &[CertificateDer<'_>]) -> std::result::Result<SiteId, String> {
    let last = chain.last().ok_or("no certificate")?;
    if chain.len() > MAX_LINEAGE + 1 {
        return Err(format!(
            "a chain of {} certificates, more than {} rotations",
            chain.len(),
            MAX_LINEAGE
        ));
    }
    for pair in chain.windows(2) {
        let (Some(child), Some(parent)) = (pair.first(), pair.get(1)) else {
            continue;
        };
        let (c, p) = (parse_cert(child)?, parse_cert(parent)?);
        // Only what replog makes (rcgen: ECDSA P-256 with SHA-256), or Ed25519.
        let alg = &c.signature_algorithm.algorithm;
        if *alg != x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
            && *alg != x509_parser::oid_registry::OID_SIG_ED25519
        {
            return Err(format!(
                "certificate {} is signed with {alg}, which replog does not accept",
                SiteId::of_cert(child)
            ));
        }
        c.verify_signature(Some(p.public_key())).map_err(|e| {
            format!(
                "certificate {} is not signed by the key of {} before it: {e}",
                SiteId::of_cert(child),
                SiteId::of_cert(parent)
            )
        })?;
    }
    Ok(SiteId::of_cert(last))
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
    /// Accept `end_entity` (whose key the peer proves it holds) when it, or a
    /// certificate of its lineage that endorses it, is pinned.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        lineage: &[CertificateDer<'_>],
    ) -> std::result::Result<(), rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(lineage.iter().cloned())
            .collect();
        let refuse = |e: Arc<dyn std::error::Error + Send + Sync>| {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(e),
            )))
        };
        // The pin first (a fingerprint is cheap; an unauthenticated peer gets no
        // signature checks out of an unpinned chain): the site is the chain's root.
        let Some(root) = chain.last() else {
            return refuse(Arc::new(NotTrusted(SiteId::of_cert(end_entity))));
        };
        let id = SiteId::of_cert(root);
        if !self.peers.contains(&id) {
            tracing::warn!("refused a peer that is not trusted: site ID {id}");
            return refuse(Arc::new(NotTrusted(id)));
        }
        match lineage_root(&chain) {
            Ok(_) => Ok(()),
            Err(why) => {
                tracing::warn!("refused site {id}: its certificate lineage does not hold: {why}");
                refuse(Arc::new(NotTrusted(id)))
            }
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
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
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
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
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
        .with_single_cert(me.chain(), me.key.clone_key())
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
        .with_client_auth_cert(me.chain(), me.key.clone_key())
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

    #[test]
    fn rotation_keeps_the_id_and_presents_an_endorsed_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Identity::create(tmp.path()).unwrap();
        assert_eq!(first.id(), first.cert_id());
        let (old, new) = Identity::rotate(tmp.path(), None).unwrap();
        assert_eq!(old, first.cert_id());
        let now = Identity::load(tmp.path()).unwrap();
        assert_eq!(now.cert_id(), new);
        assert_ne!(new, old);
        assert_eq!(now.id(), first.id(), "the ID survives a rotation");
        assert_eq!(now.rotations(), 1);
        assert_eq!(lineage_root(&now.chain()).unwrap(), first.id());
        // Twice more: the chain grows and still leads to the first certificate.
        Identity::rotate(tmp.path(), None).unwrap();
        Identity::rotate(tmp.path(), None).unwrap();
        let third = Identity::load(tmp.path()).unwrap();
        assert_eq!(third.rotations(), 3);
        assert_eq!(lineage_root(&third.chain()).unwrap(), first.id());
        // The old key is gone: only the current identity is on disk.
        assert!(!tmp.path().join("identity.next").exists());
        // Other files of the directory (the replica key) are kept, as they were.
        let rk = tmp.path().join(IDENTITY_DIR).join("replica.key");
        std::fs::write(&rk, b"replica key bytes").unwrap();
        Identity::rotate(tmp.path(), None).unwrap();
        assert_eq!(std::fs::read(&rk).unwrap(), b"replica key bytes");
        // Both directions accept the chain when only the first ID is pinned.
        let pinned = Pinned {
            peers: [first.id()].into_iter().collect(),
            provider: provider(),
        };
        let chain = third.chain();
        pinned.check(&chain[0], &chain[1..]).unwrap();
        // Not pinned at all: refused, naming the site's ID.
        let other = Pinned {
            peers: BTreeSet::new(),
            provider: provider(),
        };
        let e = other.check(&chain[0], &chain[1..]).unwrap_err();
        assert!(e.to_string().contains(&first.id().to_string()), "{e}");
        // A chain is known by its root: pinning a later certificate does not let a
        // chain ending in another (unpinned) certificate through.
        let later = Pinned {
            peers: [third.cert_id()].into_iter().collect(),
            provider: provider(),
        };
        assert!(later.check(&chain[0], &chain[1..]).is_err());
    }

    #[test]
    fn a_borrowed_lineage_is_refused() {
        // Site B appends site A's (public) certificate to its own to pass for A.
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ia = Identity::create(a.path()).unwrap();
        let ib = Identity::create(b.path()).unwrap();
        let forged = vec![ib.cert.clone(), ia.cert.clone()];
        let why = lineage_root(&forged).unwrap_err();
        assert!(why.contains("not signed"), "{why}");
        let pinned = Pinned {
            peers: [ia.id()].into_iter().collect(),
            provider: provider(),
        };
        assert!(pinned.check(&forged[0], &forged[1..]).is_err());
        // Even a pinned certificate with a bogus lineage behind it is refused.
        let pinned_b = Pinned {
            peers: [ib.id()].into_iter().collect(),
            provider: provider(),
        };
        assert!(pinned_b.check(&forged[0], &forged[1..]).is_err());
        // A site whose lineage file was tampered with does not load.
        Identity::rotate(b.path(), None).unwrap();
        std::fs::write(
            b.path().join(IDENTITY_DIR).join(LINEAGE_FILE),
            pem_of(&ia.cert),
        )
        .unwrap();
        let e = Identity::load(b.path()).unwrap_err().to_string();
        assert!(e.contains("lineage"), "{e}");
    }

    #[test]
    fn a_certificate_ending_soon_is_warned_about() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Identity::create(tmp.path()).unwrap();
        let now = i64::try_from(crate::format::now_ns() / 1_000_000_000).unwrap();
        assert_eq!(
            first.expiry_warning(tmp.path(), now),
            None,
            "valid until 4096"
        );
        Identity::rotate(tmp.path(), Some(10)).unwrap();
        let short = Identity::load(tmp.path()).unwrap();
        let w = short.expiry_warning(tmp.path(), now).unwrap();
        assert!(
            w.contains("in 10 days") && w.contains("identity rotate"),
            "{w}"
        );
        let w = short.expiry_warning(tmp.path(), now + 20 * 86_400).unwrap();
        assert!(w.contains("ended on"), "{w}");
        // Rotating again with the default validity clears it.
        Identity::rotate(tmp.path(), None).unwrap();
        let fine = Identity::load(tmp.path()).unwrap();
        assert_eq!(fine.expiry_warning(tmp.path(), now), None);
        assert_eq!(fine.id(), first.id());
    }

    #[test]
    fn an_interrupted_rotation_is_cleaned_up() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Identity::create(tmp.path()).unwrap();
        // A half-built next identity (the crash came before the exchange).
        let next = tmp.path().join("identity.next");
        std::fs::create_dir_all(&next).unwrap();
        std::fs::write(next.join(KEY_FILE), b"junk").unwrap();
        assert_eq!(
            Identity::load(tmp.path()).unwrap().cert_id(),
            first.cert_id()
        );
        Identity::rotate(tmp.path(), None).unwrap();
        assert!(!next.exists());
        assert_eq!(Identity::load(tmp.path()).unwrap().id(), first.id());
    }
}
