//! The signature header parsers of sluice-httpsig (`ContentDigest::parse`, `Parsed::parse`,
//! `verify`), which a gate runs on every request it receives.
//!
//! The first byte picks a mode:
//! * raw: the rest is split at 0xff into `Content-Digest`, `Signature-Input` and `Signature`
//!   values. A parsed `Content-Digest` is exactly its canonical form (surrounding white space
//!   aside); parsed parameters are within the profile's bounds; and since nothing here is signed,
//!   verification never succeeds.
//! * signed: the rest is `method 0xff uri 0xff body`; a request signed here verifies with the
//!   signer's request hash, and any one byte changed in any of the three headers either fails or
//!   leaves the request hash unchanged (only white space the grammar allows can change).
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use sluice_httpsig::{sign, verify, ContentDigest, Parsed, Received, SignParams, Target, MAX_PARAM_LEN};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn parts(rest: &[u8]) -> [String; 3] {
    let mut it = rest.splitn(3, |b| *b == 0xff).map(|p| String::from_utf8_lossy(p).into_owned());
    [it.next().unwrap_or_default(), it.next().unwrap_or_default(), it.next().unwrap_or_default()]
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let body = ContentDigest::of(b"");
    if mode % 2 == 0 {
        let [cd, input, sig] = parts(rest);
        if let Ok(d) = ContentDigest::parse(&cd) {
            assert_eq!(cd.trim_matches([' ', '\t']), d.header_value());
        }
        if let Ok(p) = Parsed::parse(&input, &sig) {
            assert!(p.nonce().len() <= MAX_PARAM_LEN && p.keyid().len() <= MAX_PARAM_LEN);
            let target = Target { method: "GET", target_uri: "https://a.example/" };
            assert!(p.verify(&key().verifying_key(), target, &body.header_value(), &body).is_err());
        }
        let r = Received { content_digest: &cd, signature_input: &input, signature: &sig };
        let target = Target { method: "POST", target_uri: "https://a.example/x" };
        assert!(verify(&key().verifying_key(), target, r, &body).is_err(), "unsigned headers verified");
        return;
    }
    let [method, uri, body] = parts(rest);
    let digest = ContentDigest::of(body.as_bytes());
    let target = Target { method: &method, target_uri: &uri };
    let params = SignParams { created: u64::from(mode) * 1_000_003, nonce: "fuzz-nonce-0123456789", keyid: "fuzz-key" };
    let Ok(s) = sign(&key(), target, &digest, params) else { return };
    let vk = key().verifying_key();
    let r = Received { content_digest: &s.content_digest, signature_input: &s.signature_input, signature: &s.signature };
    let v = verify(&vk, target, r, &digest).expect("a request signed here verifies");
    assert_eq!(v.request_hash, s.request_hash);
    let at = usize::from(mode) * 13;
    for which in 0..3 {
        let original = [&s.content_digest, &s.signature_input, &s.signature][which];
        let mut changed = original.as_bytes().to_vec();
        let i = at % changed.len();
        for delta in [1u8, 0x20] {
            changed[i] ^= delta;
            if let Ok(text) = std::str::from_utf8(&changed) {
                let mut headers = [s.content_digest.as_str(), s.signature_input.as_str(), s.signature.as_str()];
                headers[which] = text;
                let r = Received { content_digest: headers[0], signature_input: headers[1], signature: headers[2] };
                if let Ok(v) = verify(&vk, target, r, &digest) {
                    assert_eq!(v.request_hash, s.request_hash, "byte {i} of header {which} changed and still verified");
                }
            }
            changed[i] ^= delta;
        }
    }
});
