//! The local certificate authority that lets the proxy terminate an agent's TLS.
//!
//! At first start the daemon creates an ECDSA P-256 key (`state_dir/ca.key`, PKCS#8 v1 PEM, mode
//! 0600, written through [`crate::keyfile`], so it is created exclusively and never overwritten,
//! and refused if group or others can read it) and a self-signed CA certificate
//! (`state_dir/ca.pem`, public). Agents trust `ca.pem` through a bundle ([`Ca::write_bundle`]) that
//! the sandbox points `SSL_CERT_FILE` and friends at; the host's own trust store is never touched,
//! so the CA can only ever speak to sandboxed agents.
//!
//! For each TLS server name the proxy sees, [`Ca::leaf`] mints a short-lived leaf certificate
//! (one hour, back-dated five minutes for clock skew, renewed after 45 minutes) with a fresh P-256
//! key, and keeps it in a bounded cache (CLOCK eviction). Concurrent first requests for one name
//! share one mint: the cache hands out a per-name cell and the first caller fills it while the
//! others wait on it.
//!
//! Name constraints: the CA certificate carries a critical `nameConstraints` extension that
//! *excludes every IP address* (`0.0.0.0/0` and `::/0`). Leaves are only ever minted for
//! [`DomainName`]s (which refuse IP literals), and the constraint makes that a property a client
//! checks too: even a leaf minted by mistake (or by someone holding a copy of the key) for an IP
//! address is rejected by conforming verifiers. DNS names cannot be constrained, since the CA must
//! speak for whatever host an agent's passport allows.
//!
//! The CA's subject is derived from its key (`sluice local CA <first 8 hex digits of the SHA-256
//! of its public key>`), so a daemon that finds `ca.key` but lost `ca.pem` re-creates an
//! equivalent certificate (same subject, same key: the same trust anchor) instead of failing.

use crate::domain::DomainName;
use crate::files::{self, FileError, Links};
use crate::keyfile::{self, KeyFileError};
use crate::tls::crypto_provider;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

/// File names inside `state_dir`.
pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.pem";

/// A CA certificate is a few hundred bytes; a system bundle a few hundred KiB.
const MAX_CA_PEM: u64 = 64 * 1024;
const MAX_SYSTEM_BUNDLE: u64 = 8 * 1024 * 1024;
/// TLS 1.3 session tickets sent to an agent per connection, and the most it may ask for.
const TICKETS_PER_CONNECTION: usize = 1;
const MAX_REQUESTED_TICKETS: usize = 4;
/// How long the CA certificate is valid. There is no automatic CA rotation: remove `ca.key` and
/// `ca.pem` (and restart agents) to start a new CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA key: {0}")]
    Key(#[from] KeyFileError),
    #[error("{path}: not an ECDSA P-256 PKCS#8 PEM private key ({reason}); move it away to create a new CA")]
    KeyFormat { path: PathBuf, reason: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: not a PEM certificate ({reason}); delete it and restart to re-create it from ca.key")]
    CertFormat { path: PathBuf, reason: String },
    #[error("{path}: this certificate does not belong to {key}; delete it and restart to re-create it from the key")]
    CertMismatch { path: PathBuf, key: PathBuf },
    #[error("creating the CA certificate: {0}")]
    Generate(rcgen::Error),
    #[error("minting a leaf certificate for {name}: {reason}")]
    Mint { name: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Tunables; [`CaOptions::default`] is what the daemon uses.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Most leaf certificates kept at once (at least 1).
    pub cache_capacity: usize,
    /// A leaf is valid from `now - backdate` to `now + lifetime` ...
    pub leaf_lifetime: Duration,
    pub leaf_backdate: Duration,
    /// ... and re-minted once it is this old, well before clients would reject it.
    pub leaf_renew_after: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            cache_capacity: 4096,
            leaf_lifetime: Duration::from_secs(3600),
            leaf_backdate: Duration::from_secs(300),
            leaf_renew_after: Duration::from_secs(45 * 60),
        }
    }
}

/// The local CA. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Ca {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    provider: Arc<CryptoProvider>,
    opts: CaOptions,
    cache: Mutex<LeafCache>,
    minted: AtomicU64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("leaves_minted", &self.leaves_minted()).finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `state_dir`, creating it at first start. See the module docs.
    pub fn load_or_create(state_dir: &Path) -> Result<Ca, CaError> {
        Ca::load_or_create_with(state_dir, CaOptions::default())
    }

    pub fn load_or_create_with(state_dir: &Path, opts: CaOptions) -> Result<Ca, CaError> {
        let key_path = state_dir.join(CA_KEY_FILE);
        let cert_path = state_dir.join(CA_CERT_FILE);
        let key = match load_key(&key_path) {
            Err(CaError::Key(e)) if e.is_not_found() => match create_key(&key_path) {
                Ok(key) => key,
                // Another process created it meanwhile: use theirs.
                Err(CaError::Key(KeyFileError::File(FileError::Exists { .. }))) => load_key(&key_path)?,
                Err(e) => return Err(e),
            },
            other => other?,
        };
        let params = ca_params(&key);
        let provider = crypto_provider();
        let (cert_der, cert_pem) = match read_ca_cert(&cert_path)? {
            Some((der, pem)) => {
                check_cert_matches_key(&der, &key, &params, &provider, &cert_path, &key_path)?;
                (der, pem)
            }
            None => {
                let cert = params.self_signed(&key).map_err(CaError::Generate)?;
                let pem = cert.pem();
                files::replace(&cert_path, pem.as_bytes(), 0o644)?;
                (cert.der().clone(), pem)
            }
        };
        let cap = opts.cache_capacity.max(1);
        Ok(Ca {
            inner: Arc::new(Inner {
                issuer: Issuer::new(params, key),
                cert_der,
                cert_pem,
                provider,
                opts,
                cache: Mutex::new(LeafCache::new(cap)),
                minted: AtomicU64::new(0),
            }),
        })
    }

    /// The CA certificate (DER), for trust stores in tests and for the bundle.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.inner.cert_der
    }

    /// The CA certificate (PEM), as written to `ca.pem`.
    pub fn cert_pem(&self) -> &str {
        &self.inner.cert_pem
    }

    /// A leaf certificate and key for `name`, from the cache or freshly minted.
    pub fn leaf(&self, name: &DomainName) -> Result<Arc<CertifiedKey>, CaError> {
        let now = Instant::now();
        let cell = self.lock_cache().cell_for(name, now);
        let outcome = cell.get_or_init(|| {
            self.inner.minted.fetch_add(1, Ordering::Relaxed);
            self.mint(name).map(|key| Leaf { key, renew_at: now + self.inner.opts.leaf_renew_after })
        });
        match outcome {
            Ok(leaf) => Ok(leaf.key.clone()),
            Err(reason) => Err(CaError::Mint { name: name.to_string(), reason: reason.clone() }),
        }
    }

    /// How many leaves this CA has minted (cache misses and renewals).
    pub fn leaves_minted(&self) -> u64 {
        self.inner.minted.load(Ordering::Relaxed)
    }

    /// How many leaves the cache holds now (never more than the capacity).
    pub fn cached_leaves(&self) -> usize {
        self.lock_cache().len()
    }

    /// A resolver that picks the leaf by SNI, for a rustls `ServerConfig`.
    pub fn resolver(&self) -> Arc<SniResolver> {
        Arc::new(SniResolver { ca: self.clone() })
    }

    /// The proxy's TLS server configuration: TLS 1.3 and 1.2 with [`crate::tls::crypto_provider`], leaves by SNI,
    /// ALPN `h2` then `http/1.1`. A ClientHello without a usable SNI fails the handshake.
    ///
    /// Agents resume their sessions with stateless tickets (encrypted under a key that lives only
    /// in the daemon's memory and rotates every 6 hours), so a reconnecting agent skips the
    /// certificate and the key exchange's signature. rustls resumes a session only for the
    /// server name it was made for, and the proxy checks the request's name against the SNI of
    /// every connection, resumed or not.
    ///
    /// On a CPU with AES instructions the server picks the suite, AES-128-GCM first
    /// ([`agent_suites_first`]); otherwise the client's order stands.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CaError> {
        let aes = aes_in_hardware();
        let provider =
            if aes { Arc::new(agent_suites_first(&self.inner.provider)) } else { self.inner.provider.clone() };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver());
        config.ignore_client_order = aes;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        // One ticket per connection (rustls sends two by default): a reconnecting agent uses one
        // ticket and gets a new one each time, so a second is encrypted, encoded and written on
        // every connection for nothing (~1% of the daemon's CPU per new connection, measured). A
        // client that opens connections in parallel can ask for more (RFC 9149), up to four.
        config.send_tls13_tickets = TICKETS_PER_CONNECTION;
        config.max_tls13_tickets = MAX_REQUESTED_TICKETS;
        Ok(Arc::new(config))
    }

    /// Writes the agents' trust bundle to `out` (mode 0644, replaced atomically): every
    /// certificate of `system_bundle` (re-encoded; anything in it that is not a certificate is
    /// dropped) followed by the sluice CA. Sandboxes point `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
    /// `NODE_EXTRA_CA_CERTS` and `CURL_CA_BUNDLE` at it.
    pub fn write_bundle(&self, system_bundle: &Path, out: &Path) -> Result<(), CaError> {
        let system = files::read_text(system_bundle, MAX_SYSTEM_BUNDLE, Links::Follow)?;
        let mut bundle = String::with_capacity(system.len() + self.inner.cert_pem.len() + 64);
        for cert in CertificateDer::pem_slice_iter(system.as_bytes()) {
            let cert =
                cert.map_err(|e| CaError::CertFormat { path: system_bundle.to_path_buf(), reason: e.to_string() })?;
            bundle.push_str(&pem_encode(&cert));
        }
        bundle.push_str("# sluice local CA (agents only)\n");
        bundle.push_str(&self.inner.cert_pem);
        Ok(files::replace(out, bundle.as_bytes(), 0o644)?)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LeafCache> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that matters
        // (worst case: one slot points at an unfilled cell, which is minted on next use).
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mint(&self, name: &DomainName) -> Result<Arc<CertifiedKey>, String> {
        let opts = &self.inner.opts;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.not_before = (now - opts.leaf_backdate).into();
        params.not_after = (now + opts.leaf_lifetime).into();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::DnsName(name.as_str().try_into().map_err(|e: rcgen::Error| e.to_string())?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.inner.issuer).map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self.inner.provider.key_provider.load_private_key(der).map_err(|e| e.to_string())?;
        Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)))
    }
}

/// `provider` with the AES-128-GCM suites (TLS 1.3's `TLS_AES_128_GCM_SHA256`, TLS 1.2's
/// ECDHE AES-128-GCM) moved to the front, the rest in the provider's order: the same suites, in
/// the order the proxy prefers for agents' connections.
///
/// Why: OpenSSL's default order, which Python, curl and Node agents send, starts with
/// `TLS_AES_256_GCM_SHA384`, and a SHA-384 key schedule and transcript run SHA-512's block
/// function, which x86_64 has no instructions for (SHA-256 has), on every handshake, resumed or
/// not. Served with AES-128-GCM/SHA-256 instead, a resumed handshake costs the server 57 µs
/// rather than 90 (figures in `docs/testing.md`). AES-128-GCM is TLS 1.3's mandatory suite and
/// what browsers, Go and h2load ask for first; the connection never leaves the host.
fn agent_suites_first(provider: &CryptoProvider) -> CryptoProvider {
    use rustls::CipherSuite;
    let mut provider = provider.clone();
    // A stable sort: the provider's order is kept within each group.
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Whether this CPU runs AES-GCM in hardware. Without it ChaCha20-Poly1305 is the faster suite,
/// and clients on such a CPU (the agents run on this host) ask for it first: their order is kept.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Picks the leaf by SNI. No SNI, or an SNI that is not a valid [`DomainName`] (IP literals
/// included), yields no certificate, and rustls then fails the handshake.
pub struct SniResolver {
    ca: Ca,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = DomainName::parse(hello.server_name()?).ok()?;
        match self.ca.leaf(&name) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::error!(error = %e, "no leaf certificate; failing the handshake");
                None
            }
        }
    }
}

// ---- the leaf cache -------------------------------------------------------------------------

struct Leaf {
    key: Arc<CertifiedKey>,
    renew_at: Instant,
}

/// Filled once by whoever asks first; others block on it until it is filled.
type LeafCell = OnceLock<Result<Leaf, String>>;

struct Slot {
    name: DomainName,
    cell: Arc<LeafCell>,
    referenced: bool,
}

/// A fixed-capacity map with CLOCK (second-chance) eviction: O(1) amortised, no per-hit
/// reordering, and a recently used name survives at least one sweep of the hand.
struct LeafCache {
    slots: Vec<Slot>,
    index: HashMap<DomainName, usize>,
    hand: usize,
    cap: usize,
}

impl LeafCache {
    fn new(cap: usize) -> LeafCache {
        LeafCache { slots: Vec::new(), index: HashMap::new(), hand: 0, cap }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// The cell for `name`: the cached one, a new one if the cached one is due for renewal or
    /// failed to mint, or a new one in a free or evicted slot.
    fn cell_for(&mut self, name: &DomainName, now: Instant) -> Arc<LeafCell> {
        if let Some(slot) = self.index.get(name).copied().and_then(|i| self.slots.get_mut(i)) {
            let stale = match slot.cell.get() {
                Some(Ok(leaf)) => leaf.renew_at <= now,
                Some(Err(_)) => true,
                None => false, // being minted right now: wait for it
            };
            if stale {
                slot.cell = Arc::new(OnceLock::new());
            }
            slot.referenced = true;
            return slot.cell.clone();
        }
        let cell = Arc::new(OnceLock::new());
        let slot = Slot { name: name.clone(), cell: cell.clone(), referenced: false };
        if self.slots.len() < self.cap {
            self.index.insert(name.clone(), self.slots.len());
            self.slots.push(slot);
            return cell;
        }
        // Sweep: clear reference bits until an unreferenced slot comes under the hand. Terminates
        // within two turns because every visited slot loses its bit.
        loop {
            let hand = self.hand % self.slots.len().max(1);
            self.hand = (hand + 1) % self.slots.len().max(1);
            let Some(victim) = self.slots.get_mut(hand) else { return cell };
            if victim.referenced {
                victim.referenced = false;
                continue;
            }
            self.index.remove(&victim.name);
            *victim = slot;
            self.index.insert(name.clone(), hand);
            return cell;
        }
    }
}

// ---- files ----------------------------------------------------------------------------------

fn create_key(path: &Path) -> Result<KeyPair, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let pem = Zeroizing::new(key.serialize_pem());
    keyfile::write_private_pem(path, &pem)?;
    Ok(key)
}

fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = keyfile::read_private_pem(path, Links::Refuse)?;
    let key =
        KeyPair::from_pem(&pem).map_err(|e| CaError::KeyFormat { path: path.to_path_buf(), reason: e.to_string() })?;
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::KeyFormat { path: path.to_path_buf(), reason: format!("{:?} key", key.algorithm()) });
    }
    Ok(key)
}

/// The CA certificate's parameters, a function of the key alone (see the module docs).
fn ca_params(key: &KeyPair) -> CertificateParams {
    use rcgen::PublicKeyData;
    let fingerprint = Sha256::digest(key.subject_public_key_info());
    let short: String = fingerprint.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut params = CertificateParams::default();
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + CA_VALIDITY).into();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("sluice local CA {short}"));
    dn.push(DnType::OrganizationName, "sluice");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: Vec::new(),
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params
}

/// `Ok(None)` when the file does not exist.
fn read_ca_cert(path: &Path) -> Result<Option<(CertificateDer<'static>, String)>, CaError> {
    let pem = match files::read_text(path, MAX_CA_PEM, Links::Follow) {
        Ok(pem) => pem.to_string(),
        Err(FileError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CaError::CertFormat { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(Some((der, pem)))
}

fn check_cert_matches_key(
    der: &CertificateDer<'static>,
    key: &KeyPair,
    params: &CertificateParams,
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CaError> {
    let mismatch = || CaError::CertMismatch { path: cert_path.to_path_buf(), key: key_path.to_path_buf() };
    let signer = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .map_err(|e| CaError::KeyFormat { path: key_path.to_path_buf(), reason: e.to_string() })?;
    CertifiedKey::new(vec![der.clone()], signer).keys_match().map_err(|_| mismatch())?;
    // Leaves name the issuer by the subject derived from the key; the certificate must carry it.
    let Some(rcgen::DnValue::Utf8String(cn)) = params.distinguished_name.get(&DnType::CommonName) else {
        return Err(mismatch());
    };
    if !der.as_ref().windows(cn.len()).any(|w| w == cn.as_bytes()) {
        return Err(mismatch());
    }
    Ok(())
}

fn pem_encode(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{ClientConfig, RootCertStore};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn provider() -> Arc<CryptoProvider> {
        crypto_provider()
    }

    fn roots_from_pem_file(path: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(roots)
    }

    fn client_config(roots: Arc<RootCertStore>) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A real handshake over an in-memory duplex, then one message each way. Returns the ALPN the
    /// client negotiated, or the client's error.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<Option<Vec<u8>>, std::io::Error> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let server_side = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(())
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let result = async {
            let mut tls = connector.connect(server_name, c).await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok(tls.get_ref().1.alpn_protocol().map(|p| p.to_vec()))
        }
        .await;
        let server_result = server_side.await.unwrap();
        if result.is_ok() {
            server_result?;
        }
        result
    }

    fn dns(s: &str) -> ServerName<'static> {
        ServerName::try_from(s.to_string()).unwrap()
    }

    /// A client session store that counts the TLS 1.3 tickets it was given.
    #[derive(Debug)]
    struct CountingStore {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: std::sync::atomic::AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(&self, name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
            self.inner.set_tls12_session(name, value)
        }
        fn tls12_session(&self, name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name)
        }
        fn insert_tls13_ticket(&self, name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
            self.tickets.fetch_add(1, Ordering::Relaxed);
            self.inner.insert_tls13_ticket(name, value)
        }
        fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
    }

    /// Each connection, full or resumed, gives the agent exactly one ticket, which is enough for
    /// every later reconnect to resume (each resumed connection hands out the next one).
    #[tokio::test]
    async fn one_ticket_per_connection_keeps_every_reconnect_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let server = ca.server_config().unwrap();
        let store =
            Arc::new(CountingStore { inner: rustls::client::ClientSessionMemoryCache::new(16), tickets: 0.into() });
        let mut client = (*client_config(roots_from_pem_file(&dir.path().join(CA_CERT_FILE)))).clone();
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        assert_eq!(
            handshake_kind(server.clone(), client.clone(), "api.example.test").await,
            rustls::HandshakeKind::Full
        );
        assert_eq!(store.tickets.load(Ordering::Relaxed), 1);
        for n in 2..=5 {
            let kind = handshake_kind(server.clone(), client.clone(), "api.example.test").await;
            assert_eq!(kind, rustls::HandshakeKind::Resumed, "connection {n}");
            assert_eq!(store.tickets.load(Ordering::Relaxed), n, "connection {n}");
        }
    }

    /// The suite a client offering `order` (those suites only, in that order) gets from `server`.
    async fn negotiated(
        server: Arc<ServerConfig>,
        roots: Arc<RootCertStore>,
        order: &[rustls::CipherSuite],
    ) -> rustls::CipherSuite {
        let mut p = (*provider()).clone();
        p.cipher_suites = order
            .iter()
            .map(|want| *provider().cipher_suites.iter().find(|s| s.suite() == *want).expect("a provider suite"))
            .collect();
        let config = ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (tls, theirs) = exchange(server, Arc::new(config), "api.example.test").await;
        let theirs = theirs.expect("suite").suite();
        assert_eq!(Some(theirs), tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()));
        theirs
    }

    /// With AES instructions, agents get AES-128-GCM whatever order they send (OpenSSL's default
    /// puts AES-256-GCM/SHA-384 first); a suite only the client offers is still served, and the
    /// server offers exactly the provider's suites, reordered.
    #[tokio::test]
    async fn agents_get_aes_128_gcm_first_and_no_suite_is_refused() {
        use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let server = ca.server_config().unwrap();
        let roots = roots_from_pem_file(&dir.path().join(CA_CERT_FILE));
        let openssl_order = [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256];
        let first = negotiated(server.clone(), roots.clone(), &openssl_order).await;
        assert_eq!(first, if aes_in_hardware() { TLS13_AES_128_GCM_SHA256 } else { TLS13_AES_256_GCM_SHA384 });
        for only in [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
            assert_eq!(negotiated(server.clone(), roots.clone(), &[only]).await, only);
        }
        let names = |p: &CryptoProvider| {
            let mut v: Vec<String> = p.cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
            v.sort();
            v
        };
        assert_eq!(names(server.crypto_provider()), names(&provider()));
        let ours = agent_suites_first(&provider());
        assert_eq!(ours.cipher_suites.first().map(|s| s.suite()), Some(TLS13_AES_128_GCM_SHA256));
    }

    /// A handshake and a ping/pong over it in memory: the client's stream after the exchange
    /// (the session tickets came before the pong) and the suite the server negotiated.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> (tokio_rustls::client::TlsStream<tokio::io::DuplexStream>, Option<rustls::SupportedCipherSuite>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let server_side = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.flush().await.unwrap();
            tls.get_ref().1.negotiated_cipher_suite()
        });
        let mut tls = tokio_rustls::TlsConnector::from(client).connect(dns(name), c).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        let theirs = server_side.await.unwrap();
        (tls, theirs)
    }

    /// A handshake as [`handshake`] does, returning how it went (full or resumed).
    async fn handshake_kind(server: Arc<ServerConfig>, client: Arc<ClientConfig>, name: &str) -> rustls::HandshakeKind {
        let (tls, _) = exchange(server, client, name).await;
        tls.get_ref().1.handshake_kind().expect("handshake done")
    }

    /// An agent reconnecting resumes its session (no certificate, no signature), and the leaf
    /// for a name is minted once, not per connection.
    #[tokio::test]
    async fn agents_resume_their_sessions_and_a_leaf_is_minted_once_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let server = ca.server_config().unwrap();
        let client = client_config(roots_from_pem_file(&dir.path().join(CA_CERT_FILE)));
        let first = handshake_kind(server.clone(), client.clone(), "api.example.test").await;
        assert_eq!(first, rustls::HandshakeKind::Full);
        for _ in 0..3 {
            let again = handshake_kind(server.clone(), client.clone(), "api.example.test").await;
            assert_eq!(again, rustls::HandshakeKind::Resumed);
        }
        // Another name: a full handshake (sessions are per name), and its own leaf.
        let other = handshake_kind(server.clone(), client.clone(), "other.example.test").await;
        assert_eq!(other, rustls::HandshakeKind::Full);
        assert_eq!(ca.leaves_minted(), 2);
        // A new configuration (a restarted daemon has a new ticket key): the old tickets fail
        // to decrypt and the handshake is a full one, never an error.
        let restarted = ca.server_config().unwrap();
        assert_eq!(handshake_kind(restarted, client, "api.example.test").await, rustls::HandshakeKind::Full);
    }

    #[tokio::test]
    async fn tls_handshake_with_minted_leaf_trusted_through_ca_pem() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let client = client_config(roots_from_pem_file(&dir.path().join(CA_CERT_FILE)));
        let alpn = handshake(ca.server_config().unwrap(), client.clone(), dns("API.Example.test")).await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(ca.leaves_minted(), 1);
        // http/1.1-only clients get http/1.1.
        let mut h1 = (*client).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let alpn = handshake(ca.server_config().unwrap(), Arc::new(h1), dns("api.example.test")).await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        // Same name, different case: one cached leaf.
        assert_eq!(ca.leaves_minted(), 1);
    }

    /// Serves the leaf of one fixed name whatever the client asks for.
    #[derive(Debug)]
    struct FixedLeaf(Arc<CertifiedKey>);
    impl ResolvesServerCert for FixedLeaf {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn fixed_server(ca: &Ca, host: &str) -> Arc<ServerConfig> {
        let leaf = ca.leaf(&name(host)).unwrap();
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(FixedLeaf(leaf))),
        )
    }

    #[tokio::test]
    async fn hostname_verification_fails_for_another_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let client = client_config(roots_from_pem_file(&dir.path().join(CA_CERT_FILE)));
        // Control: the leaf is good for its own name ...
        handshake(fixed_server(&ca, "a.example.test"), client.clone(), dns("a.example.test")).await.unwrap();
        // ... and refused for any other, including a look-alike suffix.
        for other in ["b.example.test", "evila.example.test", "example.test"] {
            let e = handshake(fixed_server(&ca, "a.example.test"), client.clone(), dns(other)).await.unwrap_err();
            assert!(e.to_string().contains("not valid for name"), "{other}: {e}");
        }
    }

    #[tokio::test]
    async fn handshake_fails_without_sni_or_with_an_ip_literal() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let roots = roots_from_pem_file(&dir.path().join(CA_CERT_FILE));
        let mut no_sni = (*client_config(roots.clone())).clone();
        no_sni.enable_sni = false;
        assert!(handshake(ca.server_config().unwrap(), Arc::new(no_sni), dns("a.example.test")).await.is_err());
        // rustls sends no SNI for an IP address: the server has nothing to mint for.
        let ip = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
        assert!(handshake(ca.server_config().unwrap(), client_config(roots), ip).await.is_err());
        assert_eq!(ca.leaves_minted(), 0);
    }

    #[test]
    fn name_constraints_exclude_ip_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        // Sign leaves by hand with the CA's own issuer, bypassing `leaf`'s DomainName guard.
        let sign = |san: SanType| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
            params.not_after = (SystemTime::now() + Duration::from_secs(600)).into();
            params.subject_alt_names = vec![san];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            params.signed_by(&key, &ca.inner.issuer).unwrap().der().clone()
        };
        let now = UnixTime::now();
        let good = sign(SanType::DnsName("ok.example.test".try_into().unwrap()));
        verifier.verify_server_cert(&good, &[], &dns("ok.example.test"), &[], now).unwrap();
        for ip in ["10.0.0.1", "127.0.0.1", "::1"] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            let bad = sign(SanType::IpAddress(addr));
            let e = verifier.verify_server_cert(&bad, &[], &ServerName::IpAddress(addr.into()), &[], now).unwrap_err();
            assert!(format!("{e:?}").contains("NameConstraint"), "{ip}: {e:?}");
        }
    }

    #[test]
    fn leaf_cache_is_bounded_and_keeps_recently_used_names() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions { cache_capacity: 4, ..CaOptions::default() };
        let ca = Ca::load_or_create_with(dir.path(), opts).unwrap();
        let a1 = ca.leaf(&name("a.test")).unwrap();
        assert!(Arc::ptr_eq(&a1, &ca.leaf(&name("A.test.")).unwrap()), "a hit returns the cached leaf");
        for n in ["b.test", "c.test", "d.test"] {
            ca.leaf(&name(n)).unwrap();
        }
        assert_eq!((ca.cached_leaves(), ca.leaves_minted()), (4, 4));
        // a.test was used again after it was cached; e.test evicts the oldest unused name instead.
        ca.leaf(&name("e.test")).unwrap();
        assert_eq!(ca.cached_leaves(), 4);
        assert!(Arc::ptr_eq(&a1, &ca.leaf(&name("a.test")).unwrap()));
        assert_eq!(ca.leaves_minted(), 5);
        for i in 0..50 {
            ca.leaf(&name(&format!("n{i}.test"))).unwrap();
            assert!(ca.cached_leaves() <= 4);
        }
        assert_eq!(ca.leaves_minted(), 55);
    }

    #[test]
    fn concurrent_first_requests_mint_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let leaves: Vec<Arc<CertifiedKey>> = (0..8)
            .map(|_| {
                let (ca, barrier) = (ca.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ca.leaf(&name("same.example.test")).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(ca.leaves_minted(), 1);
        assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
    }

    #[test]
    fn leaves_are_renewed_once_due() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions { leaf_renew_after: Duration::ZERO, ..CaOptions::default() };
        let ca = Ca::load_or_create_with(dir.path(), opts).unwrap();
        let first = ca.leaf(&name("r.test")).unwrap();
        let second = ca.leaf(&name("r.test")).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!((ca.leaves_minted(), ca.cached_leaves()), (2, 1));
    }

    #[test]
    fn key_is_0600_and_a_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join(CA_CERT_FILE)).unwrap().mode() & 0o777, 0o644);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Ca::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, CaError::Key(KeyFileError::TooOpen { .. })), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[tokio::test]
    async fn reload_keeps_the_same_ca_and_a_lost_ca_pem_is_recreated_equivalent() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        let pem_path = dir.path().join(CA_CERT_FILE);
        let original_roots = roots_from_pem_file(&pem_path);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_der(), again.cert_der());
        handshake(again.server_config().unwrap(), client_config(original_roots.clone()), dns("x.test")).await.unwrap();
        // Agents hold the old ca.pem in their bundle; a re-created one is the same trust anchor.
        std::fs::remove_file(&pem_path).unwrap();
        let healed = Ca::load_or_create(dir.path()).unwrap();
        assert!(pem_path.exists());
        handshake(healed.server_config().unwrap(), client_config(original_roots), dns("y.test")).await.unwrap();
    }

    #[test]
    fn refuses_a_ca_pem_of_another_key_and_a_non_p256_key() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        Ca::load_or_create(a.path()).unwrap();
        Ca::load_or_create(b.path()).unwrap();
        std::fs::copy(b.path().join(CA_CERT_FILE), a.path().join(CA_CERT_FILE)).unwrap();
        let e = Ca::load_or_create(a.path()).unwrap_err();
        assert!(matches!(e, CaError::CertMismatch { .. }), "{e}");

        let c = tempfile::tempdir().unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        keyfile::write_private_pem(&c.path().join(CA_KEY_FILE), &ed.serialize_pem()).unwrap();
        let e = Ca::load_or_create(c.path()).unwrap_err();
        assert!(matches!(e, CaError::KeyFormat { .. }), "{e}");
    }

    #[test]
    fn bundle_holds_system_roots_then_the_sluice_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&dir.path().join("")).unwrap();
        let other = tempfile::tempdir().unwrap();
        let system_ca = Ca::load_or_create(other.path()).unwrap();
        let system = dir.path().join("system.pem");
        std::fs::write(&system, format!("# comment line\n{}\ntrailing words\n", system_ca.cert_pem())).unwrap();
        let out = dir.path().join("bundle.pem");
        ca.write_bundle(&system, &out).unwrap();
        let certs: Vec<_> = CertificateDer::pem_file_iter(&out).unwrap().map(|c| c.unwrap()).collect();
        assert_eq!(certs, vec![system_ca.cert_der().clone(), ca.cert_der().clone()]);
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o644);
        // A broken system bundle is an error naming it, not a bundle without roots.
        std::fs::write(&system, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        let e = ca.write_bundle(&system, &out).unwrap_err();
        assert!(e.to_string().contains("system.pem"), "{e}");
        let e = ca.write_bundle(&dir.path().join("missing.pem"), &out).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    /// Figures, not assertions: `cargo test --release -p sluice leaf_figures -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn leaf_figures() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let n = 500;
        let t = Instant::now();
        for i in 0..n {
            ca.leaf(&name(&format!("h{i}.example.test"))).unwrap();
        }
        let mint = t.elapsed() / n;
        let t = Instant::now();
        let hits = 100_000u32;
        for i in 0..hits {
            ca.leaf(&name(&format!("h{}.example.test", i % n))).unwrap();
        }
        let hit = t.elapsed() / hits;
        println!("leaf mint: {mint:?} per leaf; cache hit: {hit:?} per lookup (incl. name formatting)");
    }
}
