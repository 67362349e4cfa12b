//! Passport claims and constraints (`json::parse_object`, `Claims::from_json`,
//! `Constraints::from_json`), the JSON inside a token's payload.
//!
//! Checks, beyond "never panics": the strict JSON parser accepts only what serde_json accepts,
//! refuses duplicate member names at any depth (checked against an independent count), and
//! whatever claims or constraints parse round-trip exactly through `to_json`. The string
//! `"$ISS"` is replaced by a valid issuer id so the fuzzer gets past `iss`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_passport::{claims::Claims, json, Constraints, IssuerId};

/// Whether any object in `text` repeats a member name, by an independent reading: serde_json's
/// `Value` keeps one member per name, so a document whose object sizes shrink had duplicates.
fn has_duplicates(text: &[u8]) -> Option<bool> {
    #[derive(Default)]
    struct Count(usize);
    fn members(v: &Value) -> usize {
        match v {
            Value::Object(m) => m.len() + m.values().map(members).sum::<usize>(),
            Value::Array(a) => a.iter().map(members).sum(),
            _ => 0,
        }
    }
    let v: Value = serde_json::from_slice(text).ok()?;
    // Count member names in the raw text with serde's own event stream.
    struct Counter<'a>(&'a mut Count);
    impl<'de> serde::de::DeserializeSeed<'de> for Counter<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> serde::de::Visitor<'de> for Counter<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
            while s.next_element_seed(Counter(&mut *self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            while m.next_key::<serde::de::IgnoredAny>()?.is_some() {
                self.0 .0 += 1;
                m.next_value_seed(Counter(&mut *self.0))?;
            }
            Ok(())
        }
    }
    let mut count = Count::default();
    let mut de = serde_json::Deserializer::from_slice(text);
    serde::de::DeserializeSeed::deserialize(Counter(&mut count), &mut de).ok()?;
    Some(count.0 != members(&v))
}

fuzz_target!(|data: &[u8]| {
    let issuer = IssuerId::from_key(&ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key());
    let text = String::from_utf8_lossy(data).replace("$ISS", issuer.as_str());
    let parsed = json::parse_object(text.as_bytes());
    match (&parsed, serde_json::from_str::<Value>(&text)) {
        (Ok(map), Ok(v)) => {
            assert_eq!(&Value::Object(map.clone()), &v);
            assert_eq!(has_duplicates(text.as_bytes()), Some(false), "duplicates accepted");
        }
        (Ok(_), Err(e)) => panic!("strict parser accepted what serde_json refuses: {e}"),
        (Err(json::JsonError::Duplicate(_)), Ok(_)) => {
            assert_eq!(has_duplicates(text.as_bytes()), Some(true), "refused as duplicate without one");
        }
        (Err(json::JsonError::NotObject), Ok(v)) => assert!(!v.is_object()),
        (Err(e @ json::JsonError::Syntax(_)), Ok(_)) => panic!("valid JSON refused as {e}"),
        _ => {}
    }
    let Ok(map) = parsed else { return };

    if let Ok(claims) = Claims::from_json(&map) {
        assert_eq!(Claims::from_json(&claims.to_json()).as_ref(), Ok(&claims), "claims do not round-trip");
    }
    // The same object read as a constraints object, and its `constraints` member if any.
    let objects = [Some(&map), map.get("constraints").and_then(Value::as_object)];
    for c in objects.into_iter().flatten() {
        if let Ok(constraints) = Constraints::from_json(c) {
            let back = Constraints::from_json(&constraints.to_json());
            assert_eq!(back.as_ref(), Ok(&constraints), "constraints do not round-trip");
        }
    }
});
