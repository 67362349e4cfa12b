//! The host's Ed25519 signing key: it signs every checkpoint of the attestation log, so anyone
//! holding `host.pub` can verify exports and portable attestations offline.
//!
//! Files in the state directory, written and read through [`sluice_files::keyfile`]:
//! - `host.key`: PKCS#8 v1 PEM private key, mode 0600 (`openssl pkey -in host.key` reads it). Created
//!   exclusively, so a crash never leaves a half-written key and two daemons racing never overwrite
//!   each other's key (the loser uses the winner's). A key file readable or writable by group or
//!   others, or a symlink, is refused.
//! - `host.pub`: SubjectPublicKeyInfo PEM, mode 0644; re-created from the key if missing, and a
//!   mismatch with the key is refused (someone replaced one of the two).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use sluice_files::files::Links;
use sluice_files::keyfile::{self, KeyFileError};

pub const KEY_FILE: &str = "host.key";
pub const PUB_FILE: &str = "host.pub";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("{path}: create state directory: {source}", path = .path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("{0}; restore host.key from backup, or remove it to create a new host key (exports signed before then verify only with the old host.pub)")]
    BadPrivateKey(KeyFileError),
    #[error("{0}; delete it to re-derive it from host.key")]
    BadPublicKey(KeyFileError),
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
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let (head, _) = digest.split_at(8);
    format!("sluice/{}", crate::hex::encode(head))
}

/// Loads `state_dir/host.key`, creating it (and `host.pub`) if it does not exist.
pub fn load_or_create(state_dir: &Path) -> Result<HostKey, HostKeyError> {
    let key_path = state_dir.join(KEY_FILE);
    let pub_path = state_dir.join(PUB_FILE);
    if !state_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| HostKeyError::StateDir { path: state_dir.to_path_buf(), source })?;
    }
    let signing = match load_private(&key_path) {
        Err(HostKeyError::Key(e)) if e.is_not_found() => create_private(&key_path)?,
        other => other?,
    };
    let key = HostKey::from_signing_key(signing);
    ensure_public(&key_path, &pub_path, &key.verifying_key())?;
    Ok(key)
}

fn load_private(key_path: &Path) -> Result<SigningKey, HostKeyError> {
    keyfile::load_signing_key_at(key_path, Links::Refuse).map_err(|e| match e {
        KeyFileError::Format { .. } => HostKeyError::BadPrivateKey(e),
        e => HostKeyError::Key(e),
    })
}

fn create_private(key_path: &Path) -> Result<SigningKey, HostKeyError> {
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    match keyfile::write_signing_key(key_path, &signing) {
        Ok(()) => Ok(signing),
        // Another daemon created it meanwhile: use theirs.
        Err(KeyFileError::File(sluice_files::files::FileError::Exists { .. })) => load_private(key_path),
        Err(e) => Err(e.into()),
    }
}

fn ensure_public(key_path: &Path, pub_path: &Path, vk: &VerifyingKey) -> Result<(), HostKeyError> {
    let found = match keyfile::load_public_key_at(pub_path, Links::Refuse) {
        Ok(found) => found,
        Err(e) if e.is_not_found() => match keyfile::write_public_key(pub_path, vk) {
            Ok(()) => return Ok(()),
            // Written meanwhile by another daemon: check theirs.
            Err(KeyFileError::File(sluice_files::files::FileError::Exists { .. })) => {
                keyfile::load_public_key_at(pub_path, Links::Refuse)?
            }
            Err(e) => return Err(e.into()),
        },
        Err(e @ KeyFileError::Format { .. }) => return Err(HostKeyError::BadPublicKey(e)),
        Err(e) => return Err(e.into()),
    };
    if found != *vk {
        return Err(HostKeyError::Mismatch { key_path: key_path.to_path_buf(), pub_path: pub_path.to_path_buf() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_files::files::FileError;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
        let vk = keyfile::load_public_key(&dir.path().join(PUB_FILE)).unwrap();
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
        assert!(matches!(err, HostKeyError::Key(KeyFileError::TooOpen { .. })), "{msg}");
        assert!(msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
    }

    #[test]
    fn refuses_symlinked_key() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        load_or_create(other.path()).unwrap();
        std::os::unix::fs::symlink(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, HostKeyError::Key(KeyFileError::File(FileError::Symlink { .. }))), "{err}");
    }

    #[test]
    fn refuses_garbage_and_mismatched_pub() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, HostKeyError::BadPrivateKey(_)), "{err}");
        assert!(err.to_string().contains("restore host.key from backup"), "{err}");

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

    #[test]
    fn a_host_key_in_the_old_v2_form_keeps_its_identity() {
        // Daemons before the switch to PKCS#8 v1 wrote OneAsymmetricKey (v2) with the public key.
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[5u8; 32]);
        let v2 = {
            use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
            old.to_pkcs8_pem(LineEnding::LF).unwrap()
        };
        assert!(v2.starts_with("-----BEGIN PRIVATE KEY-----\nMFECAQEw"), "not v2: {}", v2.as_str());
        sluice_files::files::create_new(&dir.path().join(KEY_FILE), v2.as_bytes(), 0o600).unwrap();
        let key = load_or_create(dir.path()).unwrap();
        assert_eq!(key.verifying_key(), old.verifying_key());
        // The file is left as it was (never rewritten), and host.pub is derived from it.
        assert_eq!(fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(), v2.as_str());
        assert_eq!(keyfile::load_public_key(&dir.path().join(PUB_FILE)).unwrap(), old.verifying_key());
    }

    #[test]
    fn a_new_host_key_is_pkcs8_v1() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAw"), "{text}");
    }
}
