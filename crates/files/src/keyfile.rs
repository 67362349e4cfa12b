//! Key files: every private and public key sluice writes or reads goes through here.
//!
//! - Private keys are PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`, RFC 5208) with no embedded
//!   public key: what `openssl genpkey -algorithm ed25519` writes, and what OpenSSL 3.0 and
//!   Python's `cryptography` read. (The v2 form, RFC 5958 `OneAsymmetricKey` with the public key,
//!   is refused by both; sluice wrote it before and still reads it.) A v2 file whose public key
//!   does not belong to its private key is refused.
//! - Public keys are SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
//! - Files are created through [`files::create_new`]: exclusive, never overwritten, never seen
//!   half-written, fsynced with their directory; private keys with mode 0600.
//! - A private key that group or others may read or write is refused, the way ssh refuses one.
//! - Reads are bounded by [`MAX_KEY_FILE`].

use crate::files::{self, FileError, Links};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Key files are a few hundred bytes; anything larger is not a key.
pub const MAX_KEY_FILE: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: mode {mode:04o} lets other users read or change this private key; run `chmod 600 {path}`", path = .path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: not {expected} ({reason}); `openssl pkey -in {path} -noout -text` shows what the file holds", path = .path.display())]
    Format { path: PathBuf, expected: &'static str, reason: String },
}

impl KeyFileError {
    /// True when the file does not exist (callers that create a missing key).
    pub fn is_not_found(&self) -> bool {
        matches!(self, KeyFileError::File(FileError::NotFound { .. }))
    }
}

const PRIVATE_ED25519: &str = "a PKCS#8 PEM Ed25519 private key";
const PUBLIC_ED25519: &str = "an SPKI PEM Ed25519 public key";

// ---- any private key ------------------------------------------------------------------------

/// Writes a new private key file (PEM text), mode 0600. Fails if anything exists at `path`.
pub fn write_private_pem(path: &Path, pem: &str) -> Result<(), KeyFileError> {
    Ok(files::create_new(path, pem.as_bytes(), 0o600)?)
}

/// Reads a private key file, refused if group or others may read or write it.
pub fn read_private_pem(path: &Path, links: Links) -> Result<Zeroizing<String>, KeyFileError> {
    let opened = files::open(path, links)?;
    let mode = opened.meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen { path: path.to_path_buf(), mode });
    }
    Ok(opened.read_text(MAX_KEY_FILE)?)
}

// ---- Ed25519 --------------------------------------------------------------------------------

/// The key as PKCS#8 v1 PEM (no public key inside; see the module docs).
pub fn signing_key_pem(key: &SigningKey) -> Zeroizing<String> {
    let bytes = KeypairBytes { secret_key: key.to_bytes(), public_key: None };
    // Encoding 32 bytes into a fixed structure cannot fail; an empty string would then fail to
    // parse on the next read rather than panic here.
    bytes.to_pkcs8_pem(LineEnding::LF).unwrap_or_default()
}

/// Parses a PKCS#8 PEM Ed25519 private key (v1, or v2 with a matching public key).
pub fn parse_signing_key(path: &Path, pem: &str) -> Result<SigningKey, KeyFileError> {
    SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        expected: PRIVATE_ED25519,
        reason: describe(pem, &e.to_string()),
    })
}

/// Writes a new Ed25519 private key file, mode 0600.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
    write_private_pem(path, &signing_key_pem(key))
}

/// Loads an Ed25519 private key from a path a person named (symlinks followed).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    load_signing_key_at(path, Links::Follow)
}

pub fn load_signing_key_at(path: &Path, links: Links) -> Result<SigningKey, KeyFileError> {
    parse_signing_key(path, &read_private_pem(path, links)?)
}

/// Writes a new public key file (SPKI PEM), mode 0644.
pub fn write_public_key(path: &Path, key: &VerifyingKey) -> Result<(), KeyFileError> {
    let pem = key.to_public_key_pem(LineEnding::LF).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        expected: PUBLIC_ED25519,
        reason: format!("encoding failed: {e}"),
    })?;
    Ok(files::create_new(path, pem.as_bytes(), 0o644)?)
}

/// Parses an SPKI PEM Ed25519 public key.
pub fn parse_public_key(path: &Path, pem: &str) -> Result<VerifyingKey, KeyFileError> {
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        expected: PUBLIC_ED25519,
        reason: describe(pem, &e.to_string()),
    })
}

/// Loads a public key from a path a person named (symlinks followed).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    load_public_key_at(path, Links::Follow)
}

pub fn load_public_key_at(path: &Path, links: Links) -> Result<VerifyingKey, KeyFileError> {
    parse_public_key(path, &files::read_text(path, MAX_KEY_FILE, links)?)
}

/// The parser's reason, or a plainer one when the PEM label says what the file is instead.
fn describe(pem: &str, reason: &str) -> String {
    let label =
        pem.lines().find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----")).unwrap_or_default();
    match label {
        "" => "no PEM block found".into(),
        "ENCRYPTED PRIVATE KEY" => {
            "the key is encrypted; sluice reads unencrypted keys (`openssl pkey -in KEY -out PLAIN` decrypts it)".into()
        }
        "OPENSSH PRIVATE KEY" => {
            "an OpenSSH key; create a PKCS#8 one with `sluice issuer init` or `openssl genpkey -algorithm ed25519`"
                .into()
        }
        "PUBLIC KEY" => "this is a public key".into(),
        "PRIVATE KEY" => reason.into(),
        other => format!("a PEM \"{other}\" block; {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// RFC 8410 section 10.3: the example private key (PKCS#8 v1) ...
    const RFC8410_V1: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
-----END PRIVATE KEY-----
";
    /// ... the same key as OneAsymmetricKey (v2) with an attribute and the public key ...
    const RFC8410_V2: &str = "-----BEGIN PRIVATE KEY-----
MHICAQEwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
oB8wHQYKKoZIhvcNAQkJFDEPDA1DdXJkbGUgQ2hhaXJzgSEAGb9ECWmEzf6FQbrB
Z9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PRIVATE KEY-----
";
    /// ... as ed25519-dalek's `to_pkcs8_pem` wrote it (v2, public key, no attribute): the form
    /// of key files sluice wrote before it switched to v1 ...
    const DALEK_V2: &str = "-----BEGIN PRIVATE KEY-----
MFECAQEwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
gSEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PRIVATE KEY-----
";
    /// ... and its public key (RFC 8410 section 10.1).
    const RFC8410_PUB: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PUBLIC KEY-----
";
    const RFC8410_SECRET: &str = "d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn v1_and_v2_test_vectors_load_to_the_same_key() {
        let p = Path::new("vector.key");
        let v1 = parse_signing_key(p, RFC8410_V1).unwrap();
        assert_eq!(hex(&v1.to_bytes()), RFC8410_SECRET);
        for v2 in [RFC8410_V2, DALEK_V2] {
            assert_eq!(parse_signing_key(p, v2).unwrap().to_bytes(), v1.to_bytes());
        }
        assert_eq!(parse_public_key(p, RFC8410_PUB).unwrap(), v1.verifying_key());
        // CRLF line endings (a file edited on Windows) read the same.
        assert_eq!(parse_signing_key(p, &RFC8410_V1.replace('\n', "\r\n")).unwrap().to_bytes(), v1.to_bytes());
    }

    #[test]
    fn writes_v1_byte_for_byte_as_openssl_does() {
        let key = parse_signing_key(Path::new("k"), DALEK_V2).unwrap();
        assert_eq!(signing_key_pem(&key).as_str(), RFC8410_V1);
        // DALEK_V2 is exactly what the earlier writer, `SigningKey::to_pkcs8_pem`, produced.
        assert_eq!(key.to_pkcs8_pem(LineEnding::LF).unwrap().as_str(), DALEK_V2);
    }

    #[test]
    fn a_v2_key_whose_public_key_is_not_its_own_is_refused() {
        use base64::Engine;
        let b64: String = DALEK_V2.lines().filter(|l| !l.starts_with("-----")).collect();
        let mut der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        *der.last_mut().unwrap() ^= 1;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n");
        let e = parse_signing_key(Path::new("k"), &pem).unwrap_err();
        assert!(matches!(e, KeyFileError::Format { .. }), "{e}");
    }

    #[test]
    fn wrong_files_are_named_plainly() {
        let p = Path::new("/etc/sluice/issuer.key");
        let cases = [
            ("", "no PEM block found"),
            ("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n", "OpenSSH"),
            (RFC8410_PUB, "public key"),
        ];
        for (pem, want) in cases {
            let e = parse_signing_key(p, pem).unwrap_err().to_string();
            assert!(e.starts_with("/etc/sluice/issuer.key: not a PKCS#8 PEM Ed25519 private key"), "{e}");
            assert!(e.contains(want), "{want}: {e}");
            assert!(e.contains("openssl pkey -in /etc/sluice/issuer.key"), "{e}");
        }
        assert!(parse_public_key(p, RFC8410_V1).is_err());
    }

    #[test]
    fn creates_v1_0600_refuses_overwrite_and_loose_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let key = SigningKey::from_bytes(&[7u8; 32]);
        write_signing_key(&path, &key).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAw"), "not PKCS#8 v1: {text}");
        assert_eq!(load_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        let e = write_signing_key(&path, &key).unwrap_err();
        assert!(matches!(e, KeyFileError::File(FileError::Exists { .. })), "{e}");
        for mode in [0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_signing_key(&path).unwrap_err();
            assert!(matches!(e, KeyFileError::TooOpen { .. }), "{e}");
            assert!(e.to_string().contains(&format!("chmod 600 {}", path.display())), "{e}");
        }
        assert!(load_signing_key(&dir.path().join("missing.key")).unwrap_err().is_not_found());
    }

    #[test]
    fn state_dir_keys_are_not_read_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        write_signing_key(&real, &SigningKey::from_bytes(&[3u8; 32])).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(load_signing_key(&link).is_ok());
        let e = load_signing_key_at(&link, Links::Refuse).unwrap_err();
        assert!(matches!(e, KeyFileError::File(FileError::Symlink { .. })), "{e}");
    }

    #[test]
    fn oversized_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.key");
        files::create_new(&path, &vec![b'A'; MAX_KEY_FILE as usize + 1], 0o600).unwrap();
        let e = load_signing_key(&path).unwrap_err();
        assert!(matches!(e, KeyFileError::File(FileError::TooLarge { .. })), "{e}");
    }

    #[test]
    fn public_key_round_trips_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pub");
        let key = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        write_public_key(&path, &key).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        assert_eq!(load_public_key(&path).unwrap(), key);
    }
}
