//! Private keys on disk: created 0600 and never overwritten; refused when group or others can read
//! them, the way ssh refuses a private key with loose permissions.

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Key files are a few hundred bytes; anything larger is not a key.
const MAX_KEY_FILE: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: already exists; refusing to overwrite it (move it away or choose another path)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: mode {mode:04o} lets other users read this private key; run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: not a regular file")]
    NotFile { path: PathBuf },
    #[error("{path}: larger than {MAX_KEY_FILE} bytes, not a key file")]
    TooLarge { path: PathBuf },
    #[error("{path}: not a PKCS#8 PEM Ed25519 private key ({reason})")]
    Format { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io { path: path.to_path_buf(), source }
}

/// Creates `path` with `mode` and writes `bytes`, failing if it exists. A partly written file is
/// removed, so a crash or a full disk never leaves a truncated key behind a valid name.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists { path: path.to_path_buf() }
        } else {
            KeyFileError::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(KeyFileError::Io { path: path.to_path_buf(), source: e });
    }
    Ok(())
}

/// Reads a private key file after checking that only its owner can read it.
pub fn read_private(path: &Path) -> Result<String, KeyFileError> {
    let mut file = File::open(path).map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotFile { path: path.to_path_buf() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: path.to_path_buf(), mode });
    }
    read_bounded(&mut file, path)
}

/// Reads a public file (a public key, a passport), bounded in size.
pub fn read_public(path: &Path, max: u64) -> Result<String, KeyFileError> {
    let file = File::open(path).map_err(io(path))?;
    if file.metadata().map_err(io(path))?.len() > max {
        return Err(KeyFileError::TooLarge { path: path.to_path_buf() });
    }
    let mut s = String::new();
    file.take(max + 1).read_to_string(&mut s).map_err(io(path))?;
    Ok(s)
}

fn read_bounded(file: &mut File, path: &Path) -> Result<String, KeyFileError> {
    let mut s = String::new();
    file.take(MAX_KEY_FILE + 1).read_to_string(&mut s).map_err(io(path))?;
    if s.len() as u64 > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge { path: path.to_path_buf() });
    }
    Ok(s)
}

/// Loads an Ed25519 signing key (PKCS#8 PEM) with the permission check of [`read_private`].
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let pem = read_private(path)?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| KeyFileError::Format { path: path.to_path_buf(), reason: e.to_string() })
}

/// Writes a new signing key as PKCS#8 PEM, mode 0600.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyFileError::Format { path: path.to_path_buf(), reason: e.to_string() })?;
    create_new(path, pem.as_bytes(), 0o600)
}

/// Writes a public key as SPKI PEM, mode 0644.
pub fn write_public_key(path: &Path, key: &VerifyingKey) -> Result<(), KeyFileError> {
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyFileError::Format { path: path.to_path_buf(), reason: e.to_string() })?;
    create_new(path, pem.as_bytes(), 0o644)
}

/// Loads a public key (SPKI PEM).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let pem = read_public(path, MAX_KEY_FILE)?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| KeyFileError::Format { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_0600_refuses_overwrite_and_loose_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let key = SigningKey::from_bytes(&[7u8; 32]);
        write_signing_key(&path, &key).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert!(matches!(write_signing_key(&path, &key), Err(KeyFileError::Exists { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_signing_key(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn public_key_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pub");
        let key = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        write_public_key(&path, &key).unwrap();
        assert_eq!(load_public_key(&path).unwrap(), key);
    }
}
