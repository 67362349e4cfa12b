use super::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;

/// RFC 9421 Appendix B.1.4, `test-key-ed25519`: the PKCS #8 private key and the SPKI public key
/// (base64 of the DER; the raw key is each one's last 32 bytes).
const RFC_PRIVATE_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";
const RFC_PUBLIC_SPKI: &str = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";

/// RFC 9421 Appendix B.2.6: the signature base and the signature value.
const RFC_B26_BASE: &str = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\
\"@method\": POST\n\
\"@path\": /foo\n\
\"@authority\": example.com\n\
\"content-type\": application/json\n\
\"content-length\": 18\n\
\"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\"";
const RFC_B26_SIGNATURE: &str =
    "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==";

fn last32(b64: &str) -> [u8; 32] {
    let der = STANDARD.decode(b64).unwrap();
    der[der.len() - 32..].try_into().unwrap()
}

fn rfc_key() -> SigningKey {
    SigningKey::from_bytes(&last32(RFC_PRIVATE_PKCS8))
}

#[test]
fn rfc9421_b26_ed25519_signature_base_and_signature() {
    let key = rfc_key();
    assert_eq!(key.verifying_key().to_bytes(), last32(RFC_PUBLIC_SPKI), "B.1.4's private and public keys pair");
    let lines = [
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("@method", "POST"),
        ("@path", "/foo"),
        ("@authority", "example.com"),
        ("content-type", "application/json"),
        ("content-length", "18"),
    ];
    let params: sf::Params =
        vec![("created".into(), Bare::Int(1618884473)), ("keyid".into(), Bare::Str("test-key-ed25519".into()))];
    let base = signature_base(&lines, &params);
    assert_eq!(base.base, RFC_B26_BASE);
    assert_eq!(
        format!("sig-b26={}", base.params_value),
        r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#
    );
    let sig = key.sign(base.base.as_bytes());
    assert_eq!(STANDARD.encode(sig.to_bytes()), RFC_B26_SIGNATURE);
    let rfc_sig = Signature::from_bytes(&STANDARD.decode(RFC_B26_SIGNATURE).unwrap().try_into().unwrap());
    key.verifying_key().verify_strict(RFC_B26_BASE.as_bytes(), &rfc_sig).unwrap();
}

#[test]
fn rfc9530_content_digest_examples() {
    // RFC 9530 §2's example body and its sha-256.
    let d = ContentDigest::of(br#"{"hello": "world"}"#);
    assert_eq!(d.header_value(), "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:");
    // An empty body has a digest too.
    assert_eq!(ContentDigest::of(b"").header_value(), "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:");
    assert_eq!(ContentDigest::parse(&d.header_value()).unwrap(), d);
    assert_eq!(ContentDigest::parse(&format!(" {} \t", d.header_value())).unwrap(), d);
}

#[test]
fn streaming_digest_equals_whole_body() {
    let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut h = ContentDigestHasher::new();
    for chunk in body.chunks(333) {
        h.update(chunk);
    }
    assert_eq!(h.finish(), ContentDigest::of(&body));
}

#[test]
fn content_digest_parse_refuses_everything_else() {
    let good = ContentDigest::of(b"x").header_value();
    let b64 = &good["sha-256=".len()..];
    type Case = (&'static str, fn(&Error) -> bool);
    let cases: &[Case] = &[
        ("", |e| matches!(e, Error::Malformed { .. })),
        (
            "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
            |e| matches!(e, Error::UnsupportedDigest(a) if a == "sha-512"),
        ),
        ("sha-256=:AAAA:", |e| matches!(e, Error::WrongShape { .. })),
        ("sha-256=\"abc\"", |e| matches!(e, Error::WrongShape { .. })),
        ("sha-256", |e| matches!(e, Error::Malformed { .. })),
        ("sha-256=:not base64!:", |e| matches!(e, Error::Malformed { .. })),
        ("garbage", |e| matches!(e, Error::Malformed { .. })),
        ("SHA-256=:AAAA:", |e| matches!(e, Error::Malformed { .. })),
    ];
    for (value, want) in cases {
        let err = ContentDigest::parse(value).unwrap_err();
        assert!(want(&err), "{value:?}: {err:?}");
    }
    let dup = format!("{good}, {good}");
    assert!(matches!(ContentDigest::parse(&dup), Err(Error::Duplicate { .. })), "duplicate sha-256");
    let with_param = format!("{good};x=1");
    assert!(matches!(ContentDigest::parse(&with_param), Err(Error::WrongShape { .. })));
    let trailing = format!("{good},");
    assert!(matches!(ContentDigest::parse(&trailing), Err(Error::Malformed { .. })));
    let long = format!("sha-256={b64}{}", " ".repeat(MAX_CONTENT_DIGEST_LEN));
    assert!(matches!(ContentDigest::parse(&long), Err(Error::TooLong { .. })));
    // Non-canonical base64: the last character's unused bits set ('U' -> 'V' keeps the length).
    let canonical = STANDARD.encode([0xffu8; 32]);
    assert!(canonical.ends_with("8="));
    let noncanonical = format!("sha-256=:{}9=:", &canonical[..canonical.len() - 2]);
    assert!(matches!(ContentDigest::parse(&noncanonical), Err(Error::Base64 { .. })), "{noncanonical}");
    let unpadded = format!("sha-256=:{}:", canonical.trim_end_matches('='));
    assert!(matches!(ContentDigest::parse(&unpadded), Err(Error::Base64 { .. })));
}

const NONCE: &str = "n0nce-AAAAAAAAAAAAAAAA";
const KEYID: &str = "kN0jJ8a7H9h2Uf0uP8hPq1n1wT5bJ0lZl7tGx5M8vCQ";
const URI: &str = "https://api.example.com/v1/orders?id=7";

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn target(method: &str) -> Target<'_> {
    Target { method, target_uri: URI }
}

fn params() -> SignParams<'static> {
    SignParams { created: 1_764_650_000, nonce: NONCE, keyid: KEYID }
}

fn signed(body: &[u8]) -> Signed {
    sign(&key(1), target("POST"), &ContentDigest::of(body), params()).unwrap()
}

fn received(s: &Signed) -> Received<'_> {
    Received { content_digest: &s.content_digest, signature_input: &s.signature_input, signature: &s.signature }
}

#[test]
fn sign_writes_the_profile_headers_and_the_hash_of_the_base() {
    let s = signed(b"{\"qty\":1}");
    assert_eq!(
        s.signature_input,
        format!(
            "sluice=(\"@method\" \"@target-uri\" \"content-digest\");created=1764650000;nonce=\"{NONCE}\";keyid=\"{KEYID}\";alg=\"ed25519\";tag=\"sluice\""
        )
    );
    assert!(s.signature.starts_with("sluice=:") && s.signature.ends_with(':'), "{}", s.signature);
    let base = format!(
        "\"@method\": POST\n\"@target-uri\": {URI}\n\"content-digest\": {}\n\"@signature-params\": {}",
        s.content_digest,
        &s.signature_input["sluice=".len()..]
    );
    let hash: String = Sha256::digest(base.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(s.request_hash, hash);
    let sig = STANDARD.decode(&s.signature["sluice=:".len()..s.signature.len() - 1]).unwrap();
    key(1).verifying_key().verify_strict(base.as_bytes(), &Signature::from_bytes(&sig.try_into().unwrap())).unwrap();

    let v = verify(&key(1).verifying_key(), target("POST"), received(&s), &ContentDigest::of(b"{\"qty\":1}")).unwrap();
    assert_eq!(
        v,
        Verified {
            created: 1_764_650_000,
            nonce: NONCE.into(),
            keyid: KEYID.into(),
            request_hash: s.request_hash.clone()
        }
    );
}

#[test]
fn empty_body_is_signed_and_verified() {
    let s = signed(b"");
    assert_eq!(s.content_digest, "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:");
    verify(&key(1).verifying_key(), target("POST"), received(&s), &ContentDigest::of(b"")).unwrap();
}

#[test]
fn parameters_in_another_order_verify_with_that_order_in_the_base() {
    // RFC 9421 lets a signer order parameters freely; the base keeps the received order.
    let params: sf::Params = vec![
        ("tag".into(), Bare::Str(TAG.into())),
        ("alg".into(), Bare::Str(ALG.into())),
        ("keyid".into(), Bare::Str(KEYID.into())),
        ("nonce".into(), Bare::Str(NONCE.into())),
        ("created".into(), Bare::Int(5)),
    ];
    let digest = ContentDigest::of(b"b");
    let base = profile_base(target("GET"), &digest.header_value(), &params).unwrap();
    let sig = key(2).sign(base.base.as_bytes());
    let input = format!("sluice={}", base.params_value);
    let sig_value = format!("sluice=:{}:", STANDARD.encode(sig.to_bytes()));
    let r = Received { content_digest: &digest.header_value(), signature_input: &input, signature: &sig_value };
    let v = verify(&key(2).verifying_key(), target("GET"), r, &digest).unwrap();
    assert_eq!(v.created, 5);
    assert_eq!(v.request_hash, request_hash(&base.base));
}

#[test]
fn tampering_is_refused() {
    let body = b"{\"qty\":1}";
    let s = signed(body);
    let vk = key(1).verifying_key();
    let d = ContentDigest::of(body);
    // Another body than the one digested.
    assert_eq!(
        verify(&vk, target("POST"), received(&s), &ContentDigest::of(b"{\"qty\":9}")),
        Err(Error::DigestMismatch)
    );
    // Another body with its own (honest) digest but the old signature.
    let d9 = ContentDigest::of(b"{\"qty\":9}").header_value();
    let r = Received { content_digest: &d9, ..received(&s) };
    assert_eq!(verify(&vk, target("POST"), r, &ContentDigest::of(b"{\"qty\":9}")), Err(Error::SignatureInvalid));
    // Another method, another URI.
    assert_eq!(verify(&vk, target("GET"), received(&s), &d), Err(Error::SignatureInvalid));
    assert_eq!(verify(&vk, target("post"), received(&s), &d), Err(Error::SignatureInvalid));
    let other = Target { method: "POST", target_uri: "https://api.example.com/v1/orders?id=8" };
    assert_eq!(verify(&vk, other, received(&s), &d), Err(Error::SignatureInvalid));
    // Another key.
    assert_eq!(verify(&key(3).verifying_key(), target("POST"), received(&s), &d), Err(Error::SignatureInvalid));
    // Altered parameters: created, nonce, keyid.
    for (from, to) in
        [("created=1764650000", "created=1764650001"), (NONCE, "n0nce-BBBBBBBBBBBBBBBB"), (KEYID, "another-key-id")]
    {
        let input = s.signature_input.replace(from, to);
        let r = Received { signature_input: &input, ..received(&s) };
        assert_eq!(verify(&vk, target("POST"), r, &d), Err(Error::SignatureInvalid), "{to}");
    }
    // A flipped signature bit.
    let mut raw = STANDARD.decode(&s.signature["sluice=:".len()..s.signature.len() - 1]).unwrap();
    raw[10] ^= 1;
    let sig = format!("sluice=:{}:", STANDARD.encode(&raw));
    let r = Received { signature: &sig, ..received(&s) };
    assert_eq!(verify(&vk, target("POST"), r, &d), Err(Error::SignatureInvalid));
}

#[test]
fn a_signature_over_another_component_list_is_refused() {
    // A genuine signature by the right key, but over a list that leaves the body out.
    let params: sf::Params = vec![
        ("created".into(), Bare::Int(1)),
        ("nonce".into(), Bare::Str(NONCE.into())),
        ("keyid".into(), Bare::Str(KEYID.into())),
        ("alg".into(), Bare::Str(ALG.into())),
        ("tag".into(), Bare::Str(TAG.into())),
    ];
    let base = signature_base(&[("@method", "POST"), ("@target-uri", URI)], &params);
    let sig = format!("sluice=:{}:", STANDARD.encode(key(1).sign(base.base.as_bytes()).to_bytes()));
    let input = format!("sluice={}", base.params_value);
    let d = ContentDigest::of(b"");
    let r = Received { content_digest: &d.header_value(), signature_input: &input, signature: &sig };
    assert!(matches!(verify(&key(1).verifying_key(), target("POST"), r, &d), Err(Error::WrongComponents { .. })));
    for list in [
        "(\"@method\" \"content-digest\" \"@target-uri\")",
        "(\"@method\" \"@target-uri\" \"content-digest\" \"date\")",
        "(\"@method\" \"@target-uri\" \"Content-Digest\")",
        "(\"@method\" \"@path\" \"content-digest\")",
        "()",
    ] {
        let input = format!("sluice={list};created=1;nonce=\"{NONCE}\";keyid=\"k\";alg=\"ed25519\";tag=\"sluice\"");
        assert!(matches!(parse_signature_input(&input), Err(Error::WrongComponents { .. })), "{list}");
    }
}

fn input_with(params: &str) -> String {
    format!("sluice=(\"@method\" \"@target-uri\" \"content-digest\"){params}")
}

const GOOD_PARAMS: &str = ";created=1;nonce=\"n0nce-AAAAAAAAAAAAAAAA\";keyid=\"k\";alg=\"ed25519\";tag=\"sluice\"";

#[test]
fn signature_input_parameters_are_exact() {
    assert!(parse_signature_input(&input_with(GOOD_PARAMS)).is_ok());
    let err = |p: &str| parse_signature_input(&input_with(p)).unwrap_err();
    assert!(matches!(err(&format!("{GOOD_PARAMS};created=2")), Error::Duplicate { name, .. } if name == "created"));
    assert!(matches!(err(&format!("{GOOD_PARAMS};expires=9")), Error::UnknownParam(p) if p == "expires"));
    assert_eq!(
        err(";nonce=\"n0nce-AAAAAAAAAAAAAAAA\";keyid=\"k\";alg=\"ed25519\";tag=\"sluice\""),
        Error::MissingParam("created")
    );
    assert_eq!(err(";created=1;keyid=\"k\";alg=\"ed25519\";tag=\"sluice\""), Error::MissingParam("nonce"));
    assert_eq!(
        err(";created=1;nonce=\"n0nce-AAAAAAAAAAAAAAAA\";alg=\"ed25519\";tag=\"sluice\""),
        Error::MissingParam("keyid")
    );
    assert_eq!(
        err(";created=1;nonce=\"n0nce-AAAAAAAAAAAAAAAA\";keyid=\"k\";tag=\"sluice\""),
        Error::MissingParam("alg")
    );
    assert_eq!(
        err(";created=1;nonce=\"n0nce-AAAAAAAAAAAAAAAA\";keyid=\"k\";alg=\"ed25519\""),
        Error::MissingParam("tag")
    );
    for (bad, param) in [
        (GOOD_PARAMS.replace("ed25519", "rsa-pss-sha512"), "alg"),
        (GOOD_PARAMS.replace("tag=\"sluice\"", "tag=\"other\""), "tag"),
        (GOOD_PARAMS.replace("created=1", "created=-1"), "created"),
        (GOOD_PARAMS.replace("created=1", "created=\"1\""), "created"),
        (GOOD_PARAMS.replace("keyid=\"k\"", "keyid=7"), "keyid"),
        (GOOD_PARAMS.replace("n0nce-AAAAAAAAAAAAAAAA", "short"), "nonce"),
        (GOOD_PARAMS.replace("n0nce-AAAAAAAAAAAAAAAA", "n0nce AAAAAAAAAAAAAAAA"), "nonce"),
        (GOOD_PARAMS.replace("keyid=\"k\"", "keyid=\"\""), "keyid"),
        (GOOD_PARAMS.replace("keyid=\"k\"", "keyid=\"a\\\"b\""), "keyid"),
        (GOOD_PARAMS.replace("keyid=\"k\"", &format!("keyid=\"{}\"", "k".repeat(MAX_PARAM_LEN + 1))), "keyid"),
    ] {
        assert!(matches!(err(&bad), Error::BadParam { param: p, .. } if p == param), "{bad}: {:?}", err(&bad));
    }
    // Types the profile does not use.
    assert!(matches!(err(&GOOD_PARAMS.replace("created=1", "created=1.5")), Error::Malformed { .. }));
    assert!(matches!(err(&GOOD_PARAMS.replace("alg=\"ed25519\"", "alg=ed25519")), Error::Malformed { .. }));
    assert!(matches!(err(&GOOD_PARAMS.replace("tag=\"sluice\"", "tag=?1")), Error::Malformed { .. }));
    assert!(matches!(err(&GOOD_PARAMS.replace(";tag=\"sluice\"", ";tag")), Error::Malformed { .. }));
    assert!(matches!(err(&GOOD_PARAMS.replace("created=1", "created=1234567890123456")), Error::Malformed { .. }));
    // Parameters on a component.
    let on_item = format!("sluice=(\"@method\";req \"@target-uri\" \"content-digest\"){GOOD_PARAMS}");
    assert!(parse_signature_input(&on_item).is_err());
    let on_item = format!("sluice=(\"@method\";req=1 \"@target-uri\" \"content-digest\"){GOOD_PARAMS}");
    assert!(matches!(parse_signature_input(&on_item), Err(Error::WrongShape { .. })));
}

#[test]
fn labels_are_exact() {
    let good = input_with(GOOD_PARAMS);
    let other = good.replacen("sluice=", "sig1=", 1);
    assert!(matches!(parse_signature_input(&other), Err(Error::OtherLabel { label, .. }) if label == "sig1"));
    assert!(matches!(parse_signature_input(&format!("{good}, {other}")), Err(Error::OtherLabel { .. })));
    assert!(
        matches!(parse_signature_input(&format!("{good}, {good}")), Err(Error::Duplicate { name, .. }) if name == "sluice")
    );
    assert!(matches!(parse_signature_input(&format!("{good},{good}")), Err(Error::Duplicate { .. })));
    assert!(matches!(parse_signature_input("sluice=:AAAA:"), Err(Error::WrongShape { .. })));
    assert!(matches!(parse_signature_input(""), Err(Error::Malformed { .. })));

    let s = signed(b"");
    let sig_b64 = &s.signature["sluice=".len()..];
    assert!(parse_signature(&s.signature).is_ok());
    assert!(matches!(parse_signature(&format!("sig1={sig_b64}")), Err(Error::OtherLabel { .. })));
    assert!(matches!(parse_signature(&format!("sluice={sig_b64}, sluice={sig_b64}")), Err(Error::Duplicate { .. })));
    assert!(matches!(parse_signature(&format!("sluice={sig_b64};x=1")), Err(Error::WrongShape { .. })));
    assert!(matches!(parse_signature("sluice=(\"a\")"), Err(Error::WrongShape { .. })));
    assert!(matches!(parse_signature("sluice=:AAAA:"), Err(Error::SignatureLength(3))));
    assert!(matches!(
        parse_signature(&format!("sluice={}", &sig_b64[..sig_b64.len() - 1])),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn oversize_and_garbage_are_refused_without_panicking() {
    let long = input_with(&format!("{GOOD_PARAMS}{}", " ".repeat(MAX_SIGNATURE_INPUT_LEN)));
    assert!(matches!(parse_signature_input(&long), Err(Error::TooLong { header: Header::SignatureInput, .. })));
    let long_sig = format!("sluice=:{}:", "A".repeat(MAX_SIGNATURE_LEN));
    assert!(matches!(parse_signature(&long_sig), Err(Error::TooLong { header: Header::Signature, .. })));
    for garbage in [
        "sluice",
        "sluice=",
        "sluice=(",
        "sluice=(\"@method\"",
        "sluice=(\"@method\"\"x\")",
        "=",
        ",",
        "sluice=\"\\x\"",
        "sluice=\"a\u{7f}\"",
        "sluice=\"é\"",
    ] {
        assert!(parse_signature_input(garbage).is_err(), "{garbage}");
        assert!(parse_signature(garbage).is_err(), "{garbage}");
        assert!(ContentDigest::parse(garbage).is_err(), "{garbage}");
    }
}

#[test]
fn signing_refuses_values_that_would_break_the_base() {
    let d = ContentDigest::of(b"");
    for (method, uri) in [
        ("", URI),
        ("PO ST", URI),
        ("POST\n", URI),
        ("POST", ""),
        ("POST", "https://a/\nx"),
        ("POST", "https://a/ b"),
        ("POST", "https://a/é"),
    ] {
        let t = Target { method, target_uri: uri };
        assert!(matches!(sign(&key(1), t, &d, params()), Err(Error::BadComponent { .. })), "{method:?} {uri:?}");
    }
    let long_uri = format!("https://a/{}", "x".repeat(MAX_TARGET_URI_LEN));
    assert!(sign(&key(1), Target { method: "GET", target_uri: &long_uri }, &d, params()).is_err());
    let p = SignParams { nonce: "a\"b-AAAAAAAAAAAAAAAAAAA", ..params() };
    assert!(matches!(sign(&key(1), target("GET"), &d, p), Err(Error::BadParam { param: "nonce", .. })));
    let p = SignParams { keyid: "", ..params() };
    assert!(matches!(sign(&key(1), target("GET"), &d, p), Err(Error::BadParam { param: "keyid", .. })));
    let p = SignParams { created: u64::MAX, ..params() };
    assert!(matches!(sign(&key(1), target("GET"), &d, p), Err(Error::BadParam { param: "created", .. })));
}

#[test]
fn white_space_the_grammar_allows_is_accepted() {
    let s = signed(b"x");
    let input = s.signature_input.replace("(\"@method\" \"@target-uri\"", "(  \"@method\"   \"@target-uri\"");
    let r =
        Received { signature_input: &format!(" {input} "), signature: &format!("{}\t", s.signature), ..received(&s) };
    let v = verify(&key(1).verifying_key(), target("POST"), r, &ContentDigest::of(b"x")).unwrap();
    // The base is built from the parsed structure, so the hash is the signer's.
    assert_eq!(v.request_hash, s.request_hash);
}

proptest! {
    #[test]
    fn parsers_never_panic(input in ".{0,300}") {
        let _ = ContentDigest::parse(&input);
        let _ = Parsed::parse(&input, &input);
    }

    #[test]
    fn parsers_never_panic_on_near_valid_input(cut in 0usize..200, byte in 0u8..128, at in 0usize..200) {
        let s = signed(b"body");
        for value in [&s.signature_input, &s.signature, &s.content_digest] {
            let mut v = value.as_bytes().to_vec();
            v.truncate(cut.min(v.len()));
            let _ = Parsed::parse(&String::from_utf8_lossy(&v), &s.signature);
            let mut w = value.as_bytes().to_vec();
            let i = at.min(w.len().saturating_sub(1));
            if !w.is_empty() { w[i] = byte; }
            let w = String::from_utf8_lossy(&w).into_owned();
            let _ = Parsed::parse(&w, &w);
            let _ = ContentDigest::parse(&w);
        }
    }

    #[test]
    fn sign_then_verify_round_trips(body in proptest::collection::vec(any::<u8>(), 0..512), created in 0u64..10_000_000_000, seed in any::<[u8; 32]>()) {
        let k = SigningKey::from_bytes(&seed);
        let d = ContentDigest::of(&body);
        let s = sign(&k, target("PUT"), &d, SignParams { created, nonce: NONCE, keyid: KEYID }).unwrap();
        let v = verify(&k.verifying_key(), target("PUT"), received(&s), &d).unwrap();
        prop_assert_eq!(v.created, created);
        prop_assert_eq!(v.request_hash, s.request_hash);
    }
}
