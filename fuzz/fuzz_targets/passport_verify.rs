//! Passport verification (`sluice_passport::Verifier::verify`, `jws::decode`, `inspect`).
//!
//! The first byte picks a mode:
//! * raw: the rest is a token as an agent or operator would hand it in. It must never verify
//!   (no token here is signed by anyone), and `inspect` must agree with `jws::decode`.
//! * signed: the rest is `header JSON 0xff payload JSON`, signed here with a fixed issuer key
//!   (`"$ISS"` in the payload becomes that issuer's id, so the fuzzer reaches the claim checks).
//!   Checked: a token that verifies carries exactly the pinned header, is from that issuer, its
//!   claims round-trip through `to_json`/`from_json`, re-signing those claims verifies to the
//!   same passport, and changing any one byte of the token makes it fail.
#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use sluice_passport::{b64, claims::Claims, inspect, jws, IssuerId, NoRevocations, PassportError, Verifier};

const NOW: i64 = 1_800_000_000;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn verify(token: &str) -> Result<sluice_passport::Passport, PassportError> {
    Verifier::new(&[], &NoRevocations).verify(token, NOW)
}

fn craft(header: &[u8], payload: &[u8], key: &SigningKey) -> String {
    let input = format!("{}.{}", b64::encode(header), b64::encode(payload));
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64::encode(&sig.to_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else { return };
        let result = verify(token);
        assert!(result.is_err(), "an unsigned fuzz token verified: {token:?}");
        let _ = result.map_err(|e| (e.reason(), e.to_string()));
        match (inspect(token), jws::decode(token)) {
            (Ok((payload, kid)), Ok(u)) => assert!(payload == u.payload && kid == u.kid),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("inspect {:?} and decode {:?} disagree", a.is_ok(), b.is_ok()),
        }
        return;
    }
    let k = key();
    let issuer = IssuerId::from_key(&k.verifying_key());
    let split = rest.iter().position(|b| *b == 0xff).unwrap_or(rest.len());
    let header = &rest[..split];
    let payload = rest.get(split + 1..).unwrap_or_default();
    let payload = String::from_utf8_lossy(payload).replace("$ISS", issuer.as_str());
    let token = craft(header, payload.as_bytes(), &k);
    let Ok(passport) = verify(&token) else { return };

    let h = sluice_passport::json::parse_object(header).expect("the header of a verified token is JSON");
    assert_eq!(h.get("alg").and_then(|v| v.as_str()), Some(jws::ALG));
    assert_eq!(h.get("typ").and_then(|v| v.as_str()), Some(jws::TYP));
    assert!(h.keys().all(|k| matches!(k.as_str(), "alg" | "typ" | "kid")), "{h:?}");
    if let Some(kid) = h.get("kid") {
        assert_eq!(kid.as_str(), Some(issuer.as_str()));
    }
    let claims = &passport.claims;
    assert_eq!(claims.issuer, issuer);
    assert!(claims.not_before < claims.expires_at);
    let json = claims.to_json();
    assert_eq!(&Claims::from_json(&json).expect("to_json of verified claims parses"), claims);
    let again = verify(&jws::sign(&json, issuer.as_str(), &k)).expect("re-signed claims verify");
    assert_eq!(&again.claims, claims);

    // Any one byte changed: refused. The position and the new byte come from the token itself.
    let bytes = token.as_bytes();
    let at = usize::from(mode) * 31 % bytes.len();
    for delta in [1u8, 0x20] {
        let mut changed = bytes.to_vec();
        changed[at] ^= delta;
        if let Ok(t) = std::str::from_utf8(&changed) {
            assert!(verify(t).is_err(), "token with byte {at} changed still verifies");
        }
    }
});
