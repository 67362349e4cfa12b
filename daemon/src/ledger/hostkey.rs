//! The host's Ed25519 signing key: it signs every checkpoint of the attestation log, so anyone
//! holding `host.pub` can verify exports and portable attestations offline.
//!
//! Files in the state directory:
//! - `host.key`: PKCS#8 PEM private key, mode 0600. Created with `O_EXCL` under a temporary
//!   name and hard-linked into place, so a crash never leaves a half-written key and two daemons
//!   racing never overwrite each other's key. A key file readable or writable by group or others
//!   is refused.
//! - `host.pub`: SubjectPublicKeyInfo PEM, mode 0644; re-created from the key if missing, and a
//!   mismatch with the key is refused (someone replaced one of the two).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

pub const KEY_FILE: &str = "host.key";
pub const PUB_FILE: &str = "host.pub";

/// Upper bound on a key file; a PKCS#8 Ed25519 PEM is about 120 bytes.
const MAX_KEY_FILE: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is accessible by group or others (mode {mode:o}); the host key must be private: run `chmod 600 {path}`", path = .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a regular file; remove it or point state_dir elsewhere", path = .path.display())]
    NotRegular { path: PathBuf },
    #[error("{path} is larger than {MAX_KEY_FILE} bytes; it is not a host key file", path = .path.display())]
    TooLarge { path: PathBuf },
    #[error("{path} is not a PKCS#8 PEM Ed25519 private key ({reason}); restore it from backup or remove it to create a new host key (old exports then need the old host.pub)", path = .path.display())]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("{path} is not an SPKI PEM Ed25519 public key ({reason})", path = .path.display())]
    BadPublicKey { path: PathBuf, reason: String },
    #[error("{pub_path} does not match {key_path}; one of them was replaced: restore the pair or delete {pub_path} to re-derive it from the key", pub_path = .pub_path.display(), key_path = .key_path.display())]
    Mismatch { key_path: PathBuf, pub_path: PathBuf },
}

/// The host signing key plus the names derived from it.
pub struct HostKey {
    signing: SigningKey,
    origin: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl HostKey {
    /// Wraps an existing key (tests, tools).
    pub fn from_signing_key(signing: SigningKey) -> Self {
        let origin = origin_for(&signing.verifying_key());
        Self { signing, origin }
    }

    /// A fresh random key, kept in memory only (tests).
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The log origin and signed-note key name, see [`origin_for`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.signing.sign(msg)
    }
}

/// The checkpoint origin (and note key name) of the log signed by `key`:
/// `sluice/` followed by the first 8 bytes of SHA-256(raw public key) in lowercase hex.
///
/// It is derived from the key rather than configured so a verifier needs nothing but
/// `host.pub`, and two hosts (or one host after a key change) never share an origin.
pub fn origin_for(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("sluice/{}", crate::ledger::hex::encode(&digest[..8]))
}

/// Loads `state_dir/host.key`, creating it (and `host.pub`) if it does not exist.
pub fn load_or_create(state_dir: &Path) -> Result<HostKey, HostKeyError> {
    let key_path = state_dir.join(KEY_FILE);
    let pub_path = state_dir.join(PUB_FILE);
    if !state_dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(|source| HostKeyError::Io {
            path: state_dir.to_path_buf(),
            action: "create state directory",
            source,
        })?;
    }
    let signing = match read_private(&key_path)? {
        Some(k) => k,
        None => create_private(state_dir, &key_path)?,
    };
    let key = HostKey::from_signing_key(signing);
    ensure_public(&key_path, &pub_path, &key.verifying_key())?;
    Ok(key)
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> HostKeyError + 'a {
    move |source| HostKeyError::Io { path: path.to_path_buf(), action, source }
}

/// Reads a small regular file; in the state directory (`follow == false`) a symlink at the last
/// component is refused, so nobody can point the daemon's key files elsewhere.
fn read_bounded(path: &Path, follow: bool) -> Result<Option<(String, u32)>, HostKeyError> {
    let flags = if follow { libc::O_CLOEXEC } else { libc::O_NOFOLLOW | libc::O_CLOEXEC };
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(HostKeyError::NotRegular { path: path.to_path_buf() })
        }
        Err(e) => return Err(io(path, "open")(e)),
    };
    let meta = file.metadata().map_err(io(path, "stat"))?;
    if !meta.file_type().is_file() {
        return Err(HostKeyError::NotRegular { path: path.to_path_buf() });
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(HostKeyError::TooLarge { path: path.to_path_buf() });
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE + 1).read_to_string(&mut text).map_err(io(path, "read"))?;
    Ok(Some((text, meta.mode())))
}

fn read_private(key_path: &Path) -> Result<Option<SigningKey>, HostKeyError> {
    let Some((text, mode)) = read_bounded(key_path, false)? else {
        return Ok(None);
    };
    if mode & 0o077 != 0 {
        return Err(HostKeyError::Permissions { path: key_path.to_path_buf(), mode: mode & 0o7777 });
    }
    SigningKey::from_pkcs8_pem(&text)
        .map(Some)
        .map_err(|e| HostKeyError::BadPrivateKey { path: key_path.to_path_buf(), reason: e.to_string() })
}

fn create_private(state_dir: &Path, key_path: &Path) -> Result<SigningKey, HostKeyError> {
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = signing.to_pkcs8_pem(LineEnding::LF).map_err(|e| HostKeyError::BadPrivateKey {
        path: key_path.to_path_buf(),
        reason: format!("encoding a new key failed: {e}"),
    })?;
    let tmp = state_dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    // A stale temporary from a crashed run of this same pid is garbage; remove it.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.write_all(pem.as_bytes()).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        // `link` fails with EEXIST if another process created the key meanwhile: then use theirs.
        match fs::hard_link(&tmp, key_path) {
            Ok(()) => {
                sync_dir(state_dir)?;
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Some(())),
            Err(e) => Err(io(key_path, "link into place")(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    match result? {
        None => Ok(signing),
        Some(()) => read_private(key_path)?.ok_or_else(|| HostKeyError::Io {
            path: key_path.to_path_buf(),
            action: "read key created concurrently",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), HostKeyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "fsync directory"))
}

fn ensure_public(key_path: &Path, pub_path: &Path, vk: &VerifyingKey) -> Result<(), HostKeyError> {
    if let Some((text, _)) = read_bounded(pub_path, false)? {
        let found = parse_public_key_pem(&text)
            .map_err(|reason| HostKeyError::BadPublicKey { path: pub_path.to_path_buf(), reason })?;
        if found != *vk {
            return Err(HostKeyError::Mismatch { key_path: key_path.to_path_buf(), pub_path: pub_path.to_path_buf() });
        }
        return Ok(());
    }
    let pem = vk.to_public_key_pem(LineEnding::LF).map_err(|e| HostKeyError::BadPublicKey {
        path: pub_path.to_path_buf(),
        reason: format!("encoding failed: {e}"),
    })?;
    let dir = pub_path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{PUB_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.write_all(pem.as_bytes()).map_err(io(&tmp, "write"))?;
        f.set_permissions(fs::Permissions::from_mode(0o644)).map_err(io(&tmp, "chmod"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        fs::rename(&tmp, pub_path).map_err(io(pub_path, "rename into place"))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Parses an SPKI PEM Ed25519 public key (the content of `host.pub`).
pub fn parse_public_key_pem(text: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| e.to_string())
}

/// Reads a `host.pub` file (bounded) for offline verification (`audit verify --host-pub F`).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, HostKeyError> {
    let Some((text, _)) = read_bounded(path, true)? else {
        return Err(HostKeyError::Io {
            path: path.to_path_buf(),
            action: "open",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    };
    parse_public_key_pem(&text).map_err(|reason| HostKeyError::BadPublicKey { path: path.to_path_buf(), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create(dir.path()).unwrap();
        let meta = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let k2 = load_or_create(dir.path()).unwrap();
        assert_eq!(k1.verifying_key(), k2.verifying_key());
        assert_eq!(k1.origin(), k2.origin());
        assert!(k1.origin().starts_with("sluice/") && k1.origin().len() == 7 + 16);
        let vk = read_public_key(&dir.path().join(PUB_FILE)).unwrap();
        assert_eq!(vk, k1.verifying_key());
        // No temporaries left behind.
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn refuses_group_readable_key_and_names_chmod() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HostKeyError::Permissions { .. }), "{msg}");
        assert!(msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
    }

    #[test]
    fn refuses_symlinked_key() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        load_or_create(other.path()).unwrap();
        std::os::unix::fs::symlink(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(HostKeyError::NotRegular { .. })));
    }

    #[test]
    fn refuses_garbage_and_mismatched_pub() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(HostKeyError::BadPrivateKey { .. })));

        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        load_or_create(other.path()).unwrap();
        fs::copy(other.path().join(PUB_FILE), dir.path().join(PUB_FILE)).unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(HostKeyError::Mismatch { .. })));
        // Deleting host.pub re-derives it.
        fs::remove_file(dir.path().join(PUB_FILE)).unwrap();
        load_or_create(dir.path()).unwrap();
    }
}
