//! Strict JSON for passports: duplicate members refused at every depth.
//!
//! serde_json keeps the *last* of two members with the same name, while other parsers keep the
//! first. A token whose claims read differently to two verifiers is an attack, so any duplicate is
//! an error before the document is interpreted at all.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("not valid JSON: {0}")]
    Syntax(String),
    #[error("duplicate member {0:?}")]
    Duplicate(String),
    #[error("expected a JSON object")]
    NotObject,
}

/// Parses `bytes` as a JSON object, refusing duplicate member names anywhere inside it.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match DupCheck.deserialize(&mut de) {
        Ok(()) => {}
        Err(e) => {
            let msg = e.to_string();
            return Err(match msg.strip_prefix(DUP_PREFIX) {
                Some(rest) => JsonError::Duplicate(rest.split(" at line").next().unwrap_or(rest).to_string()),
                None => JsonError::Syntax(msg),
            });
        }
    }
    de.end().map_err(|e| JsonError::Syntax(e.to_string()))?;
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JsonError::NotObject),
        Err(e) => Err(JsonError::Syntax(e.to_string())),
    }
}

const DUP_PREFIX: &str = "sluice-duplicate-member:";

/// A visitor that walks any JSON value and fails on a repeated member name.
struct DupCheck;

impl<'de> DeserializeSeed<'de> for DupCheck {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DupCheck {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
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
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(DupCheck)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("{DUP_PREFIX}{key}")));
            }
            map.next_value_seed(DupCheck)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_objects() {
        let m = parse_object(br#"{"a":1,"b":{"c":[1,{"d":null}]}}"#).unwrap();
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn refuses_duplicates_at_any_depth() {
        for doc in
            [r#"{"a":1,"a":2}"#, r#"{"a":{"b":1,"b":1}}"#, r#"{"a":[{"x":1,"x":2}]}"#, r#"{"exp":1,"\u0065xp":2}"#]
        {
            assert!(matches!(parse_object(doc.as_bytes()), Err(JsonError::Duplicate(_))), "{doc}");
        }
    }

    #[test]
    fn refuses_non_objects_and_trailing_data() {
        assert!(matches!(parse_object(b"[1]"), Err(JsonError::NotObject)));
        assert!(matches!(parse_object(b"{} {}"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b"{\"a\":1"), Err(JsonError::Syntax(_))));
    }
}
