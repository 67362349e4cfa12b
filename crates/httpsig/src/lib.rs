//! sluice's profile of HTTP message signatures (RFC 9421) and digests (RFC 9530): what links an
//! agent's request to the gate that serves it.
//!
//! A signed request carries:
//!
//! ```text
//! Content-Digest: sha-256=:<base64 SHA-256 of the body>:
//! Signature-Input: sluice=("@method" "@target-uri" "content-digest");created=<unix>;nonce="<random>";keyid="<cnf.jkt>";alg="ed25519";tag="sluice"
//! Signature: sluice=:<base64 Ed25519 signature of the signature base>:
//! ```
//!
//! The *signature base* is built exactly per RFC 9421 §2.5 from the three covered components and
//! the `@signature-params` line; the **request hash** is the lowercase hex SHA-256 of that base,
//! which the signer's and the verifier's attestation records both carry.
//!
//! Everything received is parsed strictly: one signature labelled `sluice`, exactly the component
//! list above, exactly the parameters above (any order, each once), `alg="ed25519"`,
//! `tag="sluice"`, canonical base64, bounded sizes. [`verify`] checks the digest against the body
//! and the signature with `verify_strict`, and returns `created`, `nonce` and `keyid`: the caller
//! owns the clock (time window) and the nonce cache (replays), and checks that `keyid` names the
//! key it verified with.
//!
//! Must not: do I/O, know about passports or HTTP libraries, or keep state.

#![forbid(unsafe_code)]
// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod sf;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sf::{Bare, Member};
use sha2::{Digest, Sha256};
use std::fmt;

/// The only signature label sluice signs and accepts.
pub const LABEL: &str = "sluice";
/// The `alg` parameter.
pub const ALG: &str = "ed25519";
/// The `tag` parameter (the application this signature is for).
pub const TAG: &str = "sluice";
/// The covered components, in the order they are signed.
pub const COMPONENTS: [&str; 3] = ["@method", "@target-uri", "content-digest"];

/// Longest `Content-Digest` value accepted (one sha-256 member is 53 bytes).
pub const MAX_CONTENT_DIGEST_LEN: usize = 256;
/// Longest `Signature-Input` value accepted.
pub const MAX_SIGNATURE_INPUT_LEN: usize = 1024;
/// Longest `Signature` value accepted (one Ed25519 signature is 97 bytes with its label).
pub const MAX_SIGNATURE_LEN: usize = 256;
/// Longest `@method` value accepted.
pub const MAX_METHOD_LEN: usize = 32;
/// Longest `@target-uri` value accepted.
pub const MAX_TARGET_URI_LEN: usize = 8192;
/// Longest `nonce` and `keyid` accepted.
pub const MAX_PARAM_LEN: usize = 128;
/// Shortest `nonce` accepted (a nonce must be unguessable to be worth anything).
pub const MIN_NONCE_LEN: usize = 16;

/// The header a parse error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    ContentDigest,
    SignatureInput,
    Signature,
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Header::ContentDigest => "Content-Digest",
            Header::SignatureInput => "Signature-Input",
            Header::Signature => "Signature",
        })
    }
}

/// Why a request could not be signed, or its signature headers were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("{header} is {len} bytes, more than the {max} accepted")]
    TooLong { header: Header, len: usize, max: usize },
    #[error("{header} is not a valid structured field at byte {at}: {what}")]
    Malformed { header: Header, at: usize, what: &'static str },
    #[error("{header} has `{name}` more than once")]
    Duplicate { header: Header, name: String },
    #[error("{header} holds a byte sequence that is not canonical padded base64")]
    Base64 { header: Header },
    #[error("{header} has the member `{label}`; only `sluice` is accepted")]
    OtherLabel { header: Header, label: String },
    #[error("{header} has no `sluice` member")]
    MissingLabel { header: Header },
    #[error("{header}'s `sluice` member has the wrong shape: {what}")]
    WrongShape { header: Header, what: &'static str },
    #[error("Signature-Input covers {found}; sluice signs exactly (\"@method\" \"@target-uri\" \"content-digest\")")]
    WrongComponents { found: String },
    #[error("Signature-Input has the parameter `{0}`, which sluice does not use")]
    UnknownParam(String),
    #[error("Signature-Input lacks the parameter `{0}`")]
    MissingParam(&'static str),
    #[error("Signature-Input parameter `{param}` is invalid: {what}")]
    BadParam { param: &'static str, what: String },
    #[error("Content-Digest has the algorithm `{0}`; only sha-256 is accepted")]
    UnsupportedDigest(String),
    #[error("Content-Digest does not match the body")]
    DigestMismatch,
    #[error("the {component} to sign is invalid: {what}")]
    BadComponent { component: &'static str, what: &'static str },
    #[error("the signature is not 64 bytes ({0} bytes)")]
    SignatureLength(usize),
    #[error(
        "the signature does not verify with the key given (body, method, URI or parameters altered, or another key)"
    )]
    SignatureInvalid,
}

/// The SHA-256 of a body, as sent in `Content-Digest`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContentDigest([u8; 32]);

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentDigest({})", self.header_value())
    }
}

impl ContentDigest {
    /// The digest of a whole body (use [`ContentDigestHasher`] for a body that arrives in parts).
    pub fn of(body: &[u8]) -> ContentDigest {
        let mut h = ContentDigestHasher::new();
        h.update(body);
        h.finish()
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The `Content-Digest` field value: `sha-256=:<base64>:`.
    pub fn header_value(&self) -> String {
        let mut out = String::from("sha-256=");
        sf::serialize_bare(&mut out, &Bare::Bytes(self.0.to_vec()));
        out
    }

    /// Parses a received `Content-Digest` strictly: a dictionary with exactly one member,
    /// `sha-256`, a 32-byte byte sequence without parameters. Several field lines must be combined
    /// with `, ` by the caller first (then a second member is refused as a duplicate or an
    /// unsupported algorithm).
    pub fn parse(value: &str) -> Result<ContentDigest, Error> {
        let header = Header::ContentDigest;
        bound(header, value, MAX_CONTENT_DIGEST_LEN)?;
        let members = sf::parse_dictionary(header, value)?;
        let mut digest = None;
        for (name, member) in members {
            if name != "sha-256" {
                return Err(Error::UnsupportedDigest(name));
            }
            match member {
                Member::Item(Bare::Bytes(bytes), params) if params.is_empty() => {
                    let bytes: [u8; 32] = bytes
                        .try_into()
                        .map_err(|_| Error::WrongShape { header, what: "a sha-256 digest is 32 bytes" })?;
                    digest = Some(ContentDigest(bytes));
                }
                _ => {
                    return Err(Error::WrongShape { header, what: "a byte sequence without parameters expected" });
                }
            }
        }
        digest.ok_or(Error::MissingLabel { header })
    }
}

/// Hashes a body as it streams, so no caller needs the body in one buffer.
#[derive(Clone, Default)]
pub struct ContentDigestHasher(Sha256);

impl ContentDigestHasher {
    pub fn new() -> ContentDigestHasher {
        ContentDigestHasher(Sha256::new())
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.0.update(chunk);
    }

    pub fn finish(self) -> ContentDigest {
        ContentDigest(self.0.finalize().into())
    }
}

/// The request being signed or verified: the values of the covered components.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The request method, as sent (`POST`).
    pub method: &'a str,
    /// The full target URI (RFC 9110 §7.1): `https://api.example.com/v1/orders?id=7`.
    pub target_uri: &'a str,
}

/// The signer's parameters.
#[derive(Clone, Copy, Debug)]
pub struct SignParams<'a> {
    /// Unix seconds when the signature was made.
    pub created: u64,
    /// A fresh random value per request (16 to 128 characters of `A-Z a-z 0-9 - _ . ~ + / =`).
    pub nonce: &'a str,
    /// The key's identifier: the passport's `cnf.jkt` (same character set, 1 to 128).
    pub keyid: &'a str,
}

/// The headers to add to a signed request, and its request hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub content_digest: String,
    pub signature_input: String,
    pub signature: String,
    /// Lowercase hex SHA-256 of the signature base.
    pub request_hash: String,
}

/// What a verified signature says; the caller applies its time window to `created`, its replay
/// cache to `nonce` and checks `keyid` against the key it verified with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub created: u64,
    pub nonce: String,
    pub keyid: String,
    /// Lowercase hex SHA-256 of the signature base.
    pub request_hash: String,
}

/// The received signature headers (each several field lines combined with `, `, if any).
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub content_digest: &'a str,
    pub signature_input: &'a str,
    pub signature: &'a str,
}

/// Signs a request whose body has the digest `digest`.
pub fn sign(
    key: &SigningKey,
    target: Target<'_>,
    digest: &ContentDigest,
    params: SignParams<'_>,
) -> Result<Signed, Error> {
    let created = i64::try_from(params.created)
        .ok()
        .filter(|c| *c <= MAX_CREATED)
        .ok_or(Error::BadParam { param: "created", what: "beyond 15 digits".into() })?;
    check_value("nonce", params.nonce, MIN_NONCE_LEN)?;
    check_value("keyid", params.keyid, 1)?;
    let sig_params: sf::Params = vec![
        ("created".into(), Bare::Int(created)),
        ("nonce".into(), Bare::Str(params.nonce.into())),
        ("keyid".into(), Bare::Str(params.keyid.into())),
        ("alg".into(), Bare::Str(ALG.into())),
        ("tag".into(), Bare::Str(TAG.into())),
    ];
    let content_digest = digest.header_value();
    let base = profile_base(target, &content_digest, &sig_params)?;
    let signature = key.sign(base.base.as_bytes());
    let mut sig_value = format!("{LABEL}=");
    sf::serialize_bare(&mut sig_value, &Bare::Bytes(signature.to_bytes().to_vec()));
    Ok(Signed {
        content_digest,
        signature_input: format!("{LABEL}={}", base.params_value),
        signature: sig_value,
        request_hash: request_hash(&base.base),
    })
}

/// The parsed `Signature-Input` and `Signature` of a request, before verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    params: sf::Params,
    created: u64,
    nonce: String,
    keyid: String,
    signature: [u8; 64],
}

impl Parsed {
    /// Parses both headers strictly (see the crate documentation for what is refused).
    pub fn parse(signature_input: &str, signature: &str) -> Result<Parsed, Error> {
        let (params, created, nonce, keyid) = parse_signature_input(signature_input)?;
        let signature = parse_signature(signature)?;
        Ok(Parsed { params, created, nonce, keyid, signature })
    }

    pub fn created(&self) -> u64 {
        self.created
    }

    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// Verifies the signature over `target` and the received `Content-Digest` value, after checking
    /// that value against `body` (the digest of the body actually received).
    pub fn verify(
        &self,
        key: &VerifyingKey,
        target: Target<'_>,
        content_digest: &str,
        body: &ContentDigest,
    ) -> Result<Verified, Error> {
        let received = ContentDigest::parse(content_digest)?;
        if received != *body {
            return Err(Error::DigestMismatch);
        }
        // The base holds the canonical serialisation; the strict parse above admits only values
        // that differ from it by surrounding white space, which RFC 9421 §2.1 strips too.
        let base = profile_base(target, &received.header_value(), &self.params)?;
        key.verify_strict(base.base.as_bytes(), &Signature::from_bytes(&self.signature))
            .map_err(|_| Error::SignatureInvalid)?;
        Ok(Verified {
            created: self.created,
            nonce: self.nonce.clone(),
            keyid: self.keyid.clone(),
            request_hash: request_hash(&base.base),
        })
    }
}

/// Parses the received headers and verifies them: [`Parsed::parse`] then [`Parsed::verify`].
pub fn verify(
    key: &VerifyingKey,
    target: Target<'_>,
    received: Received<'_>,
    body: &ContentDigest,
) -> Result<Verified, Error> {
    Parsed::parse(received.signature_input, received.signature)?.verify(key, target, received.content_digest, body)
}

/// Largest `created` (15 decimal digits, RFC 8941's integer bound).
const MAX_CREATED: i64 = 999_999_999_999_999;

fn bound(header: Header, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::TooLong { header, len: value.len(), max });
    }
    Ok(())
}

fn check_value(param: &'static str, value: &str, min: usize) -> Result<(), Error> {
    if value.len() < min || value.len() > MAX_PARAM_LEN {
        return Err(Error::BadParam {
            param,
            what: format!("{} characters, {min} to {MAX_PARAM_LEN} expected", value.len()),
        });
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.~+/=".contains(*c))) {
        return Err(Error::BadParam { param, what: format!("the character {c:?} (A-Z a-z 0-9 - _ . ~ + / = only)") });
    }
    Ok(())
}

type SignatureInput = (sf::Params, u64, String, String);

fn parse_signature_input(value: &str) -> Result<SignatureInput, Error> {
    let header = Header::SignatureInput;
    bound(header, value, MAX_SIGNATURE_INPUT_LEN)?;
    let member = only_sluice(header, sf::parse_dictionary(header, value)?)?;
    let (items, params) = match member {
        Member::InnerList(items, params) => (items, params),
        Member::Item(..) => return Err(Error::WrongShape { header, what: "an inner list of components expected" }),
    };
    let names: Vec<&str> = items
        .iter()
        .map(|(item, p)| match item {
            Bare::Str(s) if p.is_empty() => Some(s.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or(Error::WrongShape { header, what: "components must be strings without parameters" })?;
    if names != COMPONENTS {
        return Err(Error::WrongComponents { found: sf::serialize_inner_list(&names, &[]) });
    }
    let (mut created, mut nonce, mut keyid, mut alg, mut tag) = (None, None, None, None, None);
    for (name, v) in &params {
        match (name.as_str(), v) {
            ("created", Bare::Int(n)) => {
                created =
                    Some(u64::try_from(*n).map_err(|_| Error::BadParam { param: "created", what: "negative".into() })?)
            }
            ("nonce", Bare::Str(s)) => nonce = Some(s.clone()),
            ("keyid", Bare::Str(s)) => keyid = Some(s.clone()),
            ("alg", Bare::Str(s)) => alg = Some(s.clone()),
            ("tag", Bare::Str(s)) => tag = Some(s.clone()),
            ("created", _) => return Err(Error::BadParam { param: "created", what: "not an integer".into() }),
            (p @ ("nonce" | "keyid" | "alg" | "tag"), _) => {
                let param = match p {
                    "nonce" => "nonce",
                    "keyid" => "keyid",
                    "alg" => "alg",
                    _ => "tag",
                };
                return Err(Error::BadParam { param, what: "not a string".into() });
            }
            (other, _) => return Err(Error::UnknownParam(other.to_string())),
        }
    }
    let created = created.ok_or(Error::MissingParam("created"))?;
    let nonce = nonce.ok_or(Error::MissingParam("nonce"))?;
    let keyid = keyid.ok_or(Error::MissingParam("keyid"))?;
    let alg = alg.ok_or(Error::MissingParam("alg"))?;
    let tag = tag.ok_or(Error::MissingParam("tag"))?;
    check_value("nonce", &nonce, MIN_NONCE_LEN)?;
    check_value("keyid", &keyid, 1)?;
    if alg != ALG {
        return Err(Error::BadParam { param: "alg", what: format!("{alg:?}, only \"ed25519\" is accepted") });
    }
    if tag != TAG {
        return Err(Error::BadParam { param: "tag", what: format!("{tag:?}, only \"sluice\" is accepted") });
    }
    Ok((params, created, nonce, keyid))
}

fn parse_signature(value: &str) -> Result<[u8; 64], Error> {
    let header = Header::Signature;
    bound(header, value, MAX_SIGNATURE_LEN)?;
    match only_sluice(header, sf::parse_dictionary(header, value)?)? {
        Member::Item(Bare::Bytes(bytes), params) if params.is_empty() => {
            let len = bytes.len();
            bytes.try_into().map_err(|_| Error::SignatureLength(len))
        }
        _ => Err(Error::WrongShape { header, what: "a byte sequence without parameters expected" }),
    }
}

fn only_sluice(header: Header, members: Vec<(String, Member)>) -> Result<Member, Error> {
    let mut found = None;
    for (label, member) in members {
        if label != LABEL {
            return Err(Error::OtherLabel { header, label });
        }
        found = Some(member);
    }
    found.ok_or(Error::MissingLabel { header })
}

struct Base {
    base: String,
    params_value: String,
}

/// The signature base of sluice's profile.
fn profile_base(target: Target<'_>, content_digest: &str, params: &[(String, Bare)]) -> Result<Base, Error> {
    if target.method.is_empty()
        || target.method.len() > MAX_METHOD_LEN
        || !target.method.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
    {
        return Err(Error::BadComponent { component: "@method", what: "not an HTTP method token (RFC 9110 §9.1)" });
    }
    if target.target_uri.is_empty() || target.target_uri.len() > MAX_TARGET_URI_LEN {
        return Err(Error::BadComponent { component: "@target-uri", what: "empty or longer than 8192 bytes" });
    }
    if !target.target_uri.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(Error::BadComponent {
            component: "@target-uri",
            what: "holds a space, control or non-ASCII byte (a URI is percent-encoded)",
        });
    }
    let lines = [("@method", target.method), ("@target-uri", target.target_uri), ("content-digest", content_digest)];
    Ok(signature_base(&lines, params))
}

/// RFC 9421 §2.5: one line per covered component, `"<id>": <value>`, then the
/// `"@signature-params"` line, lines separated by `\n` and no newline at the end. Component names
/// are already lowercase; values must be free of CR/LF (checked by the callers).
fn signature_base(lines: &[(&str, &str)], params: &[(String, Bare)]) -> Base {
    let names: Vec<&str> = lines.iter().map(|(n, _)| *n).collect();
    let params_value = sf::serialize_inner_list(&names, params);
    let mut base = String::new();
    for (name, value) in lines {
        sf::serialize_bare(&mut base, &Bare::Str((*name).to_string()));
        base.push_str(": ");
        base.push_str(value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(&params_value);
    Base { base, params_value }
}

/// Lowercase hex SHA-256 of a signature base.
fn request_hash(base: &str) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(64);
    for b in Sha256::digest(base.as_bytes()) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests;
