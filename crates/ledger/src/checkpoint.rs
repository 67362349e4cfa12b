//! Checkpoints in the C2SP `tlog-checkpoint` format, signed as C2SP `signed-note`s.
//!
//! Body (the signed text):
//! ```text
//! <origin>\n<tree size, decimal>\n<root hash, standard base64>\n
//! ```
//! Signed note: the body, one blank line, then one line per signature:
//! `— <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>\n` (U+2014 em dash).
//!
//! The key name is the origin (`sluice/<16 hex>`, see [`super::hostkey::origin_for`]) and the key
//! id is `SHA-256(name || "\n" || 0x01 || public key)[..4]`, as the signed-note spec recommends
//! for Ed25519. The verifier key can be printed as a C2SP vkey,
//! `<name>+<8 hex key id>+<base64(0x01 || public key)>`.
//!
//! Parsing is strict: bounded size, no control characters but `\n`, exactly three body lines
//! (we never emit extension lines), canonical decimal and base64, at most [`MAX_SIGNATURES`]
//! signature lines. Signatures by other keys (e.g. future witnesses) are ignored as the spec
//! requires, but a line that claims our name and key id and does not verify rejects the note.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use super::hostkey::{origin_for, HostKey};
use super::merkle::Hash;

/// Bound on a whole note; ours are under 300 bytes.
pub const MAX_NOTE_BYTES: usize = 16 * 1024;
/// Bound on signature lines (Go's note package uses 100).
pub const MAX_SIGNATURES: usize = 100;
/// Bound on an origin / key name.
pub const MAX_ORIGIN_BYTES: usize = 256;

const EM_DASH_PREFIX: &str = "\u{2014} ";
const ALG_ED25519: u8 = 0x01;

/// The content of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The signed text: `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }
}

/// A checkpoint with its full signed-note text (what is stored, exported and published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("checkpoint note is larger than {MAX_NOTE_BYTES} bytes")]
    TooLarge,
    #[error("checkpoint note contains a control character other than newline")]
    ControlCharacter,
    #[error("checkpoint note has no blank line separating text and signatures")]
    NoSignatureBlock,
    #[error("checkpoint text is malformed: {0}")]
    BadBody(String),
    #[error("checkpoint signature line {line} is malformed: {reason}")]
    BadSignatureLine { line: usize, reason: String },
    #[error("checkpoint note has more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    #[error("checkpoint origin is {found:?}, expected {expected:?} (the checkpoint is from another log or host key)")]
    WrongOrigin { expected: String, found: String },
    #[error("checkpoint carries no signature by key {key_name}+{key_id} (wrong host key?)")]
    NoSignatureByKey { key_name: String, key_id: String },
    #[error("checkpoint signature by {key_name} does not verify (forged or altered checkpoint)")]
    BadSignature { key_name: String },
}

/// The signed-note key id of an Ed25519 key under `name`.
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(key.as_bytes());
    let d: [u8; 32] = h.finalize().into();
    let [a, b, c, e, ..] = d;
    [a, b, c, e]
}

/// The C2SP verifier key string for the host key: `<name>+<hex key id>+<base64(0x01||pubkey)>`.
pub fn vkey(key: &VerifyingKey) -> String {
    let name = origin_for(key);
    let id = key_id(&name, key);
    let mut material = Vec::with_capacity(33);
    material.push(ALG_ED25519);
    material.extend_from_slice(key.as_bytes());
    format!("{name}+{}+{}", super::hex::encode(&id), B64.encode(material))
}

/// Reads a verifier key written by [`vkey`] back: the name must be the key's origin and the key
/// id must match, so a key string cannot be relabelled. Bounded like a key name.
pub fn parse_vkey(s: &str) -> Result<VerifyingKey, String> {
    if s.len() > MAX_ORIGIN_BYTES + 64 {
        return Err("verifier key is too long".into());
    }
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(material)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("verifier key is not `<name>+<key id>+<key>`".into());
    };
    let material = B64.decode(material).map_err(|_| "verifier key material is not standard base64".to_string())?;
    let Some((&ALG_ED25519, key)) = material.split_first() else {
        return Err("verifier key is not an Ed25519 key (algorithm byte 0x01)".into());
    };
    let key: [u8; 32] = key.try_into().map_err(|_| "verifier key is not 32 bytes".to_string())?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| "verifier key is not a valid Ed25519 point".to_string())?;
    if name != origin_for(&key) {
        return Err(format!("verifier key name {name:?} is not the key's origin {:?}", origin_for(&key)));
    }
    if id_hex != super::hex::encode(&key_id(name, &key)) {
        return Err("verifier key id does not match the key".into());
    }
    Ok(key)
}

/// Signs `checkpoint` with the host key (the key name is the host key's origin).
pub fn sign(checkpoint: Checkpoint, key: &HostKey) -> SignedCheckpoint {
    let body = checkpoint.body();
    let sig = key.sign(body.as_bytes());
    let name = key.origin();
    let id = key_id(name, &key.verifying_key());
    let mut blob = Vec::with_capacity(68);
    blob.extend_from_slice(&id);
    blob.extend_from_slice(&sig.to_bytes());
    let note = format!("{body}\n{EM_DASH_PREFIX}{name} {}\n", B64.encode(blob));
    SignedCheckpoint { checkpoint, note }
}

struct SigLine<'a> {
    name: &'a str,
    key_id: [u8; 4],
    sig: Option<[u8; 64]>,
}

/// Parses a note without checking any signature. Use only to display a checkpoint; trust
/// nothing in it before [`open`].
pub fn parse_unverified(note: &str) -> Result<Checkpoint, NoteError> {
    let (body, _) = split(note)?;
    parse_body(body)
}

/// Verifies `note` against the host public key and returns its checkpoint. The origin must be
/// the one derived from `key`.
pub fn open(note: &str, key: &VerifyingKey) -> Result<SignedCheckpoint, NoteError> {
    let (body, sigs) = split(note)?;
    let checkpoint = parse_body(body)?;
    let expected = origin_for(key);
    if checkpoint.origin != expected {
        return Err(NoteError::WrongOrigin { expected, found: checkpoint.origin });
    }
    let id = key_id(&expected, key);
    let mut verified = false;
    for line in &sigs {
        if line.name != expected || line.key_id != id {
            continue;
        }
        let ok = line.sig.is_some_and(|s| key.verify_strict(body.as_bytes(), &Signature::from_bytes(&s)).is_ok());
        if !ok {
            return Err(NoteError::BadSignature { key_name: expected });
        }
        verified = true;
    }
    if !verified {
        return Err(NoteError::NoSignatureByKey { key_name: expected, key_id: super::hex::encode(&id) });
    }
    Ok(SignedCheckpoint { checkpoint, note: note.to_string() })
}

fn split(note: &str) -> Result<(&str, Vec<SigLine<'_>>), NoteError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(NoteError::TooLarge);
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::ControlCharacter);
    }
    // The text ends at the first blank line; our bodies never contain one.
    let Some(pos) = note.find("\n\n") else {
        return Err(NoteError::NoSignatureBlock);
    };
    let body = &note[..pos + 1];
    let sig_block = &note[pos + 2..];
    if sig_block.is_empty() || !sig_block.ends_with('\n') {
        return Err(NoteError::BadSignatureLine {
            line: 1,
            reason: "signature block must be non-empty and end with a newline".into(),
        });
    }
    let mut sigs = Vec::new();
    for (i, line) in sig_block[..sig_block.len() - 1].split('\n').enumerate() {
        let line_no = i + 1;
        if sigs.len() >= MAX_SIGNATURES {
            return Err(NoteError::TooManySignatures);
        }
        let bad = |reason: &str| NoteError::BadSignatureLine { line: line_no, reason: reason.to_string() };
        let rest =
            line.strip_prefix(EM_DASH_PREFIX).ok_or_else(|| bad("does not start with an em dash and a space"))?;
        let (name, b64) = rest.split_once(' ').ok_or_else(|| bad("expected `— <key name> <signature>`"))?;
        if name.is_empty() || name.len() > MAX_ORIGIN_BYTES || name.contains('+') {
            return Err(bad("invalid key name"));
        }
        if b64.contains(' ') {
            return Err(bad("extra fields after the signature"));
        }
        let blob = B64.decode(b64).map_err(|_| bad("signature is not standard base64"))?;
        if B64.encode(&blob) != b64 {
            return Err(bad("signature base64 is not canonical"));
        }
        let Some((&key_id, sig)) = blob.split_first_chunk::<4>().filter(|(_, sig)| !sig.is_empty()) else {
            return Err(bad("signature too short"));
        };
        // Signatures of other algorithms are opaque to us; only a 64-byte one can be ours.
        let sig: Option<[u8; 64]> = sig.try_into().ok();
        sigs.push(SigLine { name, key_id, sig });
    }
    Ok((body, sigs))
}

fn parse_body(body: &str) -> Result<Checkpoint, NoteError> {
    let bad = |s: &str| NoteError::BadBody(s.to_string());
    let lines: Vec<&str> = body.strip_suffix('\n').unwrap_or(body).split('\n').collect();
    let [origin, size, root_b64] = lines.as_slice() else {
        return Err(bad("expected exactly three lines: origin, tree size, root hash"));
    };
    let (origin, size, root_b64) = (*origin, *size, *root_b64);
    if origin.is_empty() || origin.len() > MAX_ORIGIN_BYTES || origin.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(bad("origin is empty, too long, or contains spaces or '+'"));
    }
    if size.is_empty() || !size.bytes().all(|b| b.is_ascii_digit()) || (size.len() > 1 && size.starts_with('0')) {
        return Err(bad("tree size is not a canonical decimal number"));
    }
    let size: u64 = size.parse().map_err(|_| bad("tree size does not fit in 64 bits"))?;
    let root_bytes = B64.decode(root_b64).map_err(|_| bad("root hash is not standard base64"))?;
    let root: Hash = root_bytes.try_into().map_err(|_| bad("root hash is not 32 bytes"))?;
    if B64.encode(root) != root_b64 {
        return Err(bad("root hash base64 is not canonical"));
    }
    Ok(Checkpoint { origin: origin.to_string(), size, root })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{empty_root, leaf_hash};

    fn cp(key: &HostKey, size: u64) -> Checkpoint {
        Checkpoint { origin: key.origin().to_string(), size, root: leaf_hash(&size.to_be_bytes()) }
    }

    #[test]
    fn round_trip() {
        let key = HostKey::generate();
        let signed = sign(cp(&key, 42), &key);
        let opened = open(&signed.note, &key.verifying_key()).unwrap();
        assert_eq!(opened.checkpoint, cp(&key, 42));
        assert_eq!(parse_unverified(&signed.note).unwrap(), cp(&key, 42));
        // Layout: three body lines, blank line, one em-dash signature line.
        let lines: Vec<&str> = signed.note.split('\n').collect();
        assert_eq!(lines.len(), 6, "{}", signed.note);
        assert_eq!(lines[1], "42");
        assert_eq!(lines[3], "");
        assert!(lines[4].starts_with(&format!("\u{2014} {} ", key.origin())));
        // Empty tree.
        let empty = sign(Checkpoint { origin: key.origin().into(), size: 0, root: empty_root() }, &key);
        assert_eq!(open(&empty.note, &key.verifying_key()).unwrap().checkpoint.size, 0);
    }

    #[test]
    fn vkey_format() {
        let key = HostKey::generate();
        let vk = vkey(&key.verifying_key());
        // The base64 part may itself contain '+': name and key id never do.
        let parts: Vec<&str> = vk.splitn(3, '+').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], key.origin());
        assert_eq!(parts[1].len(), 8);
        let material = B64.decode(parts[2]).unwrap();
        assert_eq!(material[0], 1);
        assert_eq!(&material[1..], key.verifying_key().as_bytes());
    }

    #[test]
    fn vkey_round_trips_and_relabelled_keys_are_refused() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let vk = vkey(&key.verifying_key());
        assert_eq!(parse_vkey(&vk).unwrap(), key.verifying_key());
        let theirs = vkey(&other.verifying_key());
        let (_, their_material) = theirs.split_at(theirs.rfind('+').unwrap());
        let (our_label, _) = vk.split_at(vk.rfind('+').unwrap());
        // Our name and key id on their key material.
        assert!(parse_vkey(&format!("{our_label}{their_material}")).is_err());
        let mut wrong_alg = vec![2u8];
        wrong_alg.extend_from_slice(key.verifying_key().as_bytes());
        let wrong_alg = format!("{our_label}+{}", B64.encode(wrong_alg));
        for bad in ["", "a+b", "a+b+c", &wrong_alg, &format!("{vk}A"), &"x".repeat(400)] {
            assert!(parse_vkey(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forged_signature_rejected() {
        let key = HostKey::generate();
        let signed = sign(cp(&key, 7), &key);
        // Replace the signature bytes, keep the key id.
        let sig_line_start = signed.note.find('\u{2014}').unwrap();
        let b64 = signed.note[sig_line_start..].rsplit(' ').next().unwrap().trim_end();
        let mut blob = B64.decode(b64).unwrap();
        blob[10] ^= 1;
        let forged = signed.note.replace(b64, &B64.encode(&blob));
        assert!(matches!(open(&forged, &key.verifying_key()), Err(NoteError::BadSignature { .. })));
    }

    #[test]
    fn short_signatures_and_malformed_bodies_are_errors() {
        let key = HostKey::generate();
        let signed = sign(cp(&key, 7), &key);
        let sig_line_start = signed.note.find('\u{2014}').unwrap();
        let b64 = signed.note[sig_line_start..].rsplit(' ').next().unwrap().trim_end();
        for len in [0usize, 1, 4] {
            let note = signed.note.replace(b64, &B64.encode(vec![1u8; len]));
            assert!(open(&note, &key.verifying_key()).is_err(), "a {len}-byte signature must be refused");
        }
        for body in ["", "origin\n", "origin\n7\n", "origin\n7\nroot\nextra\n"] {
            assert!(parse_body(body).is_err(), "{body:?} is not a checkpoint body");
        }
    }

    #[test]
    fn wrong_key_rejected() {
        let key = HostKey::generate();
        let other = HostKey::generate();
        let signed = sign(cp(&key, 7), &key);
        // Origin is derived from the key, so another key sees a foreign origin.
        assert!(matches!(open(&signed.note, &other.verifying_key()), Err(NoteError::WrongOrigin { .. })));
        // Another key signing a checkpoint claiming our origin: no signature by our key.
        let mut c = cp(&other, 7);
        c.origin = key.origin().to_string();
        let body = c.body();
        let sig = other.sign(body.as_bytes());
        let mut blob = key_id(key.origin(), &other.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        let note = format!("{body}\n\u{2014} {} {}\n", key.origin(), B64.encode(blob));
        assert!(matches!(open(&note, &key.verifying_key()), Err(NoteError::NoSignatureByKey { .. })));
        // Same, but claiming our key id: the signature does not verify.
        let mut blob = key_id(key.origin(), &key.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        let note = format!("{body}\n\u{2014} {} {}\n", key.origin(), B64.encode(blob));
        assert!(matches!(open(&note, &key.verifying_key()), Err(NoteError::BadSignature { .. })));
    }

    #[test]
    fn altered_fields_rejected() {
        let key = HostKey::generate();
        let vk = key.verifying_key();
        let signed = sign(cp(&key, 42), &key);
        let root_b64 = B64.encode(cp(&key, 42).root);
        let other_root = B64.encode(cp(&key, 43).root);
        for altered in [signed.note.replacen("\n42\n", "\n43\n", 1), signed.note.replacen(&root_b64, &other_root, 1)] {
            assert!(matches!(open(&altered, &vk), Err(NoteError::BadSignature { .. })), "{altered}");
        }
        let origin_changed = signed.note.replacen(key.origin(), "sluice/0000000000000000", 1);
        assert!(matches!(open(&origin_changed, &vk), Err(NoteError::WrongOrigin { .. })));
    }

    #[test]
    fn malformed_notes_rejected() {
        let key = HostKey::generate();
        let vk = key.verifying_key();
        let good = sign(cp(&key, 5), &key).note;
        let body_end = good.find("\n\n").unwrap() + 1;
        let sig_block = &good[body_end + 1..];
        let body = &good[..body_end];
        let cases: Vec<(&str, String)> = vec![
            ("no signatures", body.to_string()),
            ("no blank line", format!("{body}{sig_block}")),
            ("missing final newline", good.trim_end_matches('\n').to_string()),
            ("extension line", good.replacen("\n\n", "\nextra\n\n", 1)),
            ("leading zero size", good.replacen("\n5\n", "\n05\n", 1)),
            ("signed size", good.replacen("\n5\n", "\n+5\n", 1)),
            ("huge size", good.replacen("\n5\n", "\n18446744073709551616\n", 1)),
            ("carriage return", good.replacen('\n', "\r\n", 1)),
            ("hyphen instead of em dash", good.replace('\u{2014}', "-")),
            ("two blank lines", good.replacen("\n\n", "\n\n\n", 1)),
            ("oversized", format!("{good}{}", "x".repeat(MAX_NOTE_BYTES))),
            ("empty", String::new()),
        ];
        for (what, note) in cases {
            assert!(open(&note, &vk).is_err(), "accepted malformed note: {what}");
        }
        // Unpadded root base64.
        let root_b64 = B64.encode(cp(&key, 5).root);
        let unpadded = good.replacen(&root_b64, root_b64.trim_end_matches('='), 1);
        assert!(matches!(parse_unverified(&unpadded), Err(NoteError::BadBody(_))));
    }

    #[test]
    fn foreign_signature_lines_are_ignored() {
        let key = HostKey::generate();
        let witness = HostKey::generate();
        let signed = sign(cp(&key, 9), &key);
        let body = cp(&key, 9).body();
        let sig = witness.sign(body.as_bytes());
        let mut blob = key_id("witness.example", &witness.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        let note = format!("{}\u{2014} witness.example {}\n", signed.note, B64.encode(blob));
        assert!(open(&note, &key.verifying_key()).is_ok());
    }
}
