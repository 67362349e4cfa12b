//! Attacks on passport verification (docs/passports.md, "What verification rejects"), each with a token crafted here.

use super::*;
use ed25519_dalek::{Signer, Verifier as _, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NOW: i64 = 1_800_000_000;

fn issuer() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn iss_id(key: &SigningKey) -> String {
    IssuerId::from_key(&key.verifying_key()).to_string()
}

/// A well-formed claims object for `key`, to be altered by each test.
fn claims(key: &SigningKey) -> Value {
    json!({
        "iss": iss_id(key), "sub": "agent-1", "jti": "pp_0123456789abcdef0123456789abcdef",
        "iat": NOW, "nbf": NOW, "exp": NOW + 3600, "agent_name": "Test agent",
        "permissions": ["orders:read", "llm:*"], "trust_tier": "L1",
        "constraints": {"core:cost:max_per_action": 500},
        "cnf": {"jkt": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"},
    })
}

fn header(key: &SigningKey) -> Value {
    json!({"alg": "EdDSA", "typ": "agent-passport+jwt", "kid": iss_id(key)})
}

/// Signs raw header and payload text exactly as given.
fn craft_raw(header: &str, payload: &str, key: &SigningKey) -> String {
    let input = format!("{}.{}", b64::encode(header.as_bytes()), b64::encode(payload.as_bytes()));
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64::encode(&sig.to_bytes()))
}

fn craft(header: &Value, payload: &Value, key: &SigningKey) -> String {
    craft_raw(&header.to_string(), &payload.to_string(), key)
}

fn verify(token: &str) -> Result<Passport, PassportError> {
    Verifier::new(&[], &NoRevocations).verify(token, NOW)
}

#[test]
fn a_well_formed_token_verifies() {
    let k = issuer();
    let p = verify(&craft(&header(&k), &claims(&k), &k)).unwrap();
    assert_eq!(p.claims.agent_id, "agent-1");
    assert!(p.claims.permits("llm:chat"));
    assert!(!p.claims.permits("orders:write"));
}

#[test]
fn alg_none_is_refused_in_any_case() {
    let k = issuer();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let mut h = header(&k);
        h["alg"] = alg.into();
        // An unsigned token: empty signature part.
        let unsigned =
            format!("{}.{}.", b64::encode(h.to_string().as_bytes()), b64::encode(claims(&k).to_string().as_bytes()));
        assert!(matches!(verify(&unsigned), Err(PassportError::AlgNone)), "{alg}");
        // And a "signed" one, in case a parser skips the empty-signature path.
        assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::AlgNone)), "{alg}");
    }
}

/// HMAC-SHA256 (RFC 2104), to forge the classic "HS256 keyed with the public key" token.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&ipad).chain_update(msg).finalize();
    Sha256::new().chain_update(&opad).chain_update(inner).finalize().to_vec()
}

#[test]
fn hs256_keyed_with_the_public_key_is_refused() {
    let k = issuer();
    let mut h = header(&k);
    for alg in ["HS256", "HS384", "HS512", "hs256"] {
        h["alg"] = alg.into();
        let input =
            format!("{}.{}", b64::encode(h.to_string().as_bytes()), b64::encode(claims(&k).to_string().as_bytes()));
        let mac = hmac_sha256(k.verifying_key().as_bytes(), input.as_bytes());
        let token = format!("{input}.{}", b64::encode(&mac));
        assert!(matches!(verify(&token), Err(PassportError::AlgHmac(_))), "{alg}");
    }
}

#[test]
fn any_other_alg_is_refused() {
    let k = issuer();
    for alg in [json!("RS256"), json!("ES256"), json!("Ed25519"), json!("eddsa"), json!(["EdDSA"]), json!(null)] {
        let mut h = header(&k);
        h["alg"] = alg.clone();
        assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::AlgUnsupported(_))), "{alg}");
    }
    let mut h = header(&k);
    h.as_object_mut().unwrap().remove("alg");
    assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::AlgUnsupported(_))));
}

#[test]
fn wrong_or_missing_typ_is_refused() {
    let k = issuer();
    for typ in [json!("JWT"), json!("agent-passport+JWT"), json!("at+jwt"), json!(1)] {
        let mut h = header(&k);
        h["typ"] = typ.clone();
        assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::Typ(_))), "{typ}");
    }
    let mut h = header(&k);
    h.as_object_mut().unwrap().remove("typ");
    assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::Typ(_))));
}

#[test]
fn key_carrying_and_critical_headers_are_refused() {
    let k = issuer();
    let attacker = SigningKey::from_bytes(&[7u8; 32]);
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(attacker.verifying_key().as_bytes())});
    for (name, value) in [
        ("crit", json!(["exp"])),
        ("jwk", jwk),
        ("jku", json!("https://127.0.0.1/keys")),
        ("x5u", json!("https://127.0.0.1/cert")),
        ("x5c", json!(["MIIB"])),
    ] {
        let mut h = header(&k);
        h[name] = value;
        match verify(&craft(&h, &claims(&k), &attacker)) {
            Err(PassportError::ForbiddenHeader(n)) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn json_serialized_jws_is_refused() {
    let k = issuer();
    let compact = craft(&header(&k), &claims(&k), &k);
    let parts: Vec<&str> = compact.split('.').collect();
    let general = json!({"payload": parts[1], "signatures": [{"protected": parts[0], "signature": parts[2]}]});
    let flattened = json!({"payload": parts[1], "protected": parts[0], "signature": parts[2]});
    for doc in [general, flattened] {
        assert!(matches!(verify(&doc.to_string()), Err(PassportError::JsonSerialization)));
    }
}

#[test]
fn padded_or_standard_alphabet_base64_is_refused() {
    let k = issuer();
    // Find claims whose payload encoding needs padding and contains '-' or '_' somewhere.
    let token = craft(&header(&k), &claims(&k), &k);
    let parts: Vec<&str> = token.split('.').collect();
    let padded_sig = format!("{}.{}.{}==", parts[0], parts[1], parts[2]);
    assert!(matches!(verify(&padded_sig), Err(PassportError::Base64("signature"))));
    let std_alphabet = token.replace('-', "+").replace('_', "/");
    if std_alphabet != token {
        assert!(matches!(verify(&std_alphabet), Err(PassportError::Base64(_))));
    }
    // A header re-encoded with padding: still the same bytes, must still be refused.
    let padded_header = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
    assert!(matches!(verify(&padded_header), Err(PassportError::Base64("header"))));
    // Standard-alphabet characters inserted explicitly.
    let with_plus = format!("{}.{}+.{}", parts[0], parts[1], parts[2]);
    assert!(matches!(verify(&with_plus), Err(PassportError::Base64("payload"))));
}

#[test]
fn duplicate_members_are_refused_even_when_signed() {
    let k = issuer();
    let c = claims(&k).to_string();
    let dup_payload = c.replacen('{', &format!("{{\"exp\":{},", NOW + 999_999), 1);
    let token = craft_raw(&header(&k).to_string(), &dup_payload, &k);
    assert!(matches!(verify(&token), Err(PassportError::Json("payload", m)) if m.contains("duplicate")));
    let dup_header = r#"{"alg":"EdDSA","alg":"none","typ":"agent-passport+jwt"}"#;
    let token = craft_raw(dup_header, &c, &k);
    assert!(matches!(verify(&token), Err(PassportError::Json("header", _))));
    let nested = c.replacen(
        "\"core:cost:max_per_action\":500",
        "\"core:cost:max_per_action\":500,\"core:cost:max_per_action\":99999",
        1,
    );
    assert_ne!(nested, c);
    assert!(matches!(verify(&craft_raw(&header(&k).to_string(), &nested, &k)), Err(PassportError::Json("payload", _))));
}

#[test]
fn non_numeric_times_are_refused() {
    let k = issuer();
    for (field, value) in [
        ("exp", json!("1900000000")),
        ("nbf", json!("0")),
        ("exp", json!(1.9e9)),
        ("iat", json!(null)),
        ("exp", json!(-1)),
    ] {
        let mut c = claims(&k);
        c[field] = value.clone();
        match verify(&craft(&header(&k), &c, &k)) {
            Err(PassportError::Claim { name, .. }) => assert_eq!(name, field, "{value}"),
            other => panic!("{field}={value}: {other:?}"),
        }
    }
}

#[test]
fn expiry_and_not_before_respect_the_skew_boundary() {
    let k = issuer();
    let token = craft(&header(&k), &claims(&k), &k);
    let v = Verifier::new(&[], &NoRevocations);
    let exp = NOW + 3600;
    let skew = DEFAULT_SKEW_SECS;
    assert!(v.verify(&token, exp + skew - 1).is_ok());
    assert!(matches!(v.verify(&token, exp + skew), Err(PassportError::Expired { .. })));
    assert!(v.verify(&token, NOW - skew).is_ok());
    assert!(matches!(v.verify(&token, NOW - skew - 1), Err(PassportError::NotYetValid { .. })));
    assert_eq!(v.verify(&token, exp + skew).unwrap_err().reason(), "passport_expired");
}

#[test]
fn exp_must_follow_nbf() {
    let k = issuer();
    let mut c = claims(&k);
    c["exp"] = NOW.into();
    assert!(matches!(verify(&craft(&header(&k), &c, &k)), Err(PassportError::Claim { name: "exp", .. })));
}

#[test]
fn unknown_or_untrusted_issuers_are_refused_for_pinned_tiers() {
    let k = issuer();
    let other = SigningKey::from_bytes(&[43u8; 32]);
    let token = craft(&header(&k), &claims(&k), &k);
    let pinned = [IssuerId::from_key(&other.verifying_key())];
    let e = Verifier::new(&pinned, &NoRevocations).verify(&token, NOW).unwrap_err();
    assert!(matches!(e, PassportError::UntrustedIssuer { .. }));
    assert_eq!(e.reason(), "issuer_untrusted");
    let mine = [IssuerId::from_key(&k.verifying_key())];
    assert!(Verifier::new(&mine, &NoRevocations).verify(&token, NOW).is_ok());
    // An L2 passport cannot be accepted by a verifier that pins nothing.
    let mut c = claims(&k);
    c["trust_tier"] = "L2".into();
    let l2 = craft(&header(&k), &c, &k);
    assert!(matches!(verify(&l2), Err(PassportError::TierNeedsPinnedIssuers { tier: "L2" })));
    assert!(Verifier::new(&mine, &NoRevocations).verify(&l2, NOW).is_ok());
}

#[test]
fn a_signature_by_another_key_is_refused() {
    let k = issuer();
    let attacker = SigningKey::from_bytes(&[7u8; 32]);
    // Claims name the real issuer, but the attacker signs.
    assert!(matches!(verify(&craft(&header(&k), &claims(&k), &attacker)), Err(PassportError::BadSignature)));
}

#[test]
fn kid_must_name_the_issuer() {
    let k = issuer();
    let mut h = header(&k);
    h["kid"] = "iss_someone_else".into();
    assert!(matches!(verify(&craft(&h, &claims(&k), &k)), Err(PassportError::KidMismatch { .. })));
}

#[test]
fn revoked_passports_are_refused() {
    let k = issuer();
    let token = craft(&header(&k), &claims(&k), &k);
    let mut list = RevocationList::new();
    list.revoke(PassportId::parse("pp_0123456789abcdef0123456789abcdef").unwrap());
    let e = Verifier::new(&[], &list).verify(&token, NOW).unwrap_err();
    assert!(matches!(e, PassportError::Revoked(_)));
    assert_eq!(e.reason(), "passport_revoked");
}

#[test]
fn oversized_tokens_are_refused_before_decoding() {
    let k = issuer();
    let mut c = claims(&k);
    c["agent_name"] = "x".repeat(jws::MAX_TOKEN_LEN).into();
    assert!(matches!(verify(&craft(&header(&k), &c, &k)), Err(PassportError::TooLarge { .. })));
}

#[test]
fn wrong_segment_counts_are_refused() {
    for t in ["", "a", "a.b", "a.b.c.d", "a.b.c.d.e"] {
        assert!(matches!(verify(t), Err(PassportError::Segments(_))), "{t}");
    }
}

#[test]
fn tampered_payload_fails_the_signature() {
    let k = issuer();
    let token = craft(&header(&k), &claims(&k), &k);
    let mut c = claims(&k);
    c["constraints"]["core:cost:max_per_action"] = 500_000.into();
    let forged_payload = b64::encode(c.to_string().as_bytes());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert!(matches!(verify(&forged), Err(PassportError::BadSignature)));
}

/// The group order L of edwards25519.
const ORDER_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// Little-endian 256-bit addition.
fn add_le(a: &[u8], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut carry = 0u16;
    for i in 0..32 {
        let s = a[i] as u16 + b[i] as u16 + carry;
        out[i] = s as u8;
        carry = s >> 8;
    }
    out
}

#[test]
fn non_canonical_signatures_are_refused() {
    let k = issuer();
    let token = craft(&header(&k), &claims(&k), &k);
    let parts: Vec<&str> = token.split('.').collect();
    let mut sig = b64::decode(parts[2]).unwrap();
    // S' = S + L is the same scalar mod L: a malleated signature that lax verifiers accept.
    let s_plus_l = add_le(&sig[32..], &ORDER_L);
    sig[32..].copy_from_slice(&s_plus_l);
    let forged = format!("{}.{}.{}", parts[0], parts[1], b64::encode(&sig));
    assert!(matches!(verify(&forged), Err(PassportError::BadSignature)));
}

#[test]
fn small_order_keys_are_refused() {
    // The identity point as the public key and (R = identity, S = 0) as the signature: the lax
    // equation [S]B = R + [k]A holds for every message.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = VerifyingKey::from_bytes(&identity).unwrap();
    let mut sig = [0u8; 64];
    sig[0] = 1;
    let msg = b"anything";
    assert!(weak.verify(msg, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok(), "lax verify accepts it");
    assert!(weak.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig)).is_err());

    let mut c = claims(&issuer());
    c["iss"] = format!("iss_{}", b64::encode(&identity)).into();
    let h = json!({"alg": "EdDSA", "typ": "agent-passport+jwt"});
    let input = format!("{}.{}", b64::encode(h.to_string().as_bytes()), b64::encode(c.to_string().as_bytes()));
    let token = format!("{input}.{}", b64::encode(&sig));
    match verify(&token) {
        Err(PassportError::Claim { name: "iss", problem }) => assert!(problem.contains("small-order")),
        other => panic!("{other:?}"),
    }
    // And the signature layer refuses it on its own, should a weak key ever get that far.
    let u = jws::decode(&token).unwrap();
    assert!(matches!(u.verify_signature(&token, &weak), Err(PassportError::WeakKey)));
}

/// RFC 8037 Appendix A.4: the Ed25519 JWS example (alg only, so checked at the signature layer).
#[test]
fn rfc8037_jws_vector_verifies_strictly() {
    let x = b64::decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
    let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
    let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
    let sig =
        b64::decode("hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg").unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
    assert!(key.verify_strict(input.as_bytes(), &sig).is_ok());
    // The private key of the same appendix signs to the same bytes (Ed25519 is deterministic).
    let d = b64::decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap();
    let sk = SigningKey::from_bytes(&d.try_into().unwrap());
    assert_eq!(sk.sign(input.as_bytes()), sig);
}

#[test]
fn unknown_constraints_and_claims_are_errors_at_verification() {
    let k = issuer();
    let mut c = claims(&k);
    c["constraints"]["core:cost:max_per_acton"] = 5.into();
    match verify(&craft(&header(&k), &c, &k)) {
        Err(PassportError::Constraint(e)) => assert_eq!(e.key, "core:cost:max_per_acton"),
        other => panic!("{other:?}"),
    }
    let mut c = claims(&k);
    c["aud"] = "someone".into();
    assert!(matches!(verify(&craft(&header(&k), &c, &k)), Err(PassportError::UnknownClaim(n)) if n == "aud"));
}

#[test]
fn issue_then_verify_round_trips_every_constraint_key() {
    use constraints::*;
    let k = issuer();
    let cases = [
        json!({MAX_PER_ACTION: 500}),
        json!({MAX_CUMULATIVE: 10_000}),
        json!({MAX_CUMULATIVE: 10_000, CUMULATIVE_WINDOW: "monthly"}),
        json!({APPROVAL_THRESHOLD: 2_500}),
        json!({APPROVAL_REQUIRED: true}),
        json!({RATE_PER_MINUTE: 10}),
        json!({RATE_PER_HOUR: 100}),
        json!({RATE_PER_DAY: 1000}),
        json!({DOMAIN_ALLOWLIST: ["api.example.com", "*.example.org"]}),
        json!({CEL_RULES: [{"expr": "cost_cents > 100", "decision": "request_hold", "reason": "big_spend"}]}),
    ];
    for case in cases {
        let constraints = Constraints::from_json(case.as_object().unwrap()).unwrap();
        let issued = issue(
            IssueRequest {
                agent_id: "agent-7".into(),
                agent_name: Some("Seven".into()),
                permissions: vec![Permission::parse("llm:*").unwrap()],
                constraints: constraints.clone(),
                trust_tier: TrustTier::L1,
                lifetime_secs: 86_400,
                now: NOW,
            },
            &k,
        )
        .unwrap();
        let p = verify(&issued.token).unwrap();
        assert_eq!(p.claims.constraints, constraints, "{case}");
        assert_eq!(p.claims, issued.claims);
        assert_eq!(p.claims.cnf_jkt, jwk::okp_thumbprint(&issued.agent_key.verifying_key()));
        assert_eq!(Value::Object(p.claims.constraints.to_json()), case);
    }
}

#[test]
fn issue_refuses_bad_input() {
    let k = issuer();
    let req = |agent_id: &str, lifetime_secs| IssueRequest {
        agent_id: agent_id.into(),
        agent_name: None,
        permissions: vec![],
        constraints: Constraints::default(),
        trust_tier: TrustTier::L1,
        lifetime_secs,
        now: NOW,
    };
    assert!(issue(req("bad id", 60), &k).is_err());
    assert!(issue(req("ok", 0), &k).is_err());
    assert!(issue(req("ok", MAX_LIFETIME_SECS + 1), &k).is_err());
    assert!(issue(req("ok", 60), &k).is_ok());
}
