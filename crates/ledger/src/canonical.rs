//! RFC 8785 (JSON Canonicalization Scheme) for the narrow JSON that records hold.
//!
//! Records contain strings, integers, booleans, null, and nested objects/arrays. This module
//! writes exactly the JCS form of those:
//! - object members sorted by the UTF-16 code units of their names (RFC 8785 §3.2.3), which
//!   differs from UTF-8 byte order for characters above U+FFFF;
//! - strings with the minimal escaping of RFC 8785 §3.2.2.2: `\"`, `\\`, the short forms
//!   `\b \t \n \f \r`, `\u00xx` (lowercase hex) for other controls, everything else literal;
//! - integers in plain decimal.
//!
//! Numbers that are not integers are refused, and so are integers beyond ±(2^53 − 1): JCS
//! serialises numbers as IEEE 754 doubles, so those could not round-trip exactly, and an
//! attestation log must never change a value while hashing it.
//!
//! No crate is used: the canonicalizer crates on crates.io implement the whole of JCS including
//! the ECMAScript double formatting we deliberately refuse, and the piece we need is small
//! enough to read in one sitting.

use serde_json::{Map, Value};

/// Largest integer magnitude representable exactly as an IEEE 754 double (2^53 − 1).
pub const MAX_SAFE_INTEGER: u64 = (1u64 << 53) - 1;

/// Deepest nesting accepted; records are flat in practice, this only stops stack exhaustion.
pub const MAX_DEPTH: usize = 32;

/// Why a value cannot be canonicalized. `path` is a JSON-pointer-like location (`/a/0/b`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("field {path}: number {value} is not an integer; records hold integers only (use cents)")]
    NotAnInteger { path: String, value: String },
    #[error("field {path}: integer {value} is beyond ±(2^53-1) and cannot be represented exactly in RFC 8785 JSON")]
    IntegerOutOfRange { path: String, value: String },
    #[error("field {path}: nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { path: String },
}

/// The RFC 8785 canonical bytes of an object.
pub fn canonicalize_object(obj: &Map<String, Value>) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    let mut path = String::new();
    write_object(&mut out, obj, &mut path, 0)?;
    Ok(out)
}

/// The RFC 8785 canonical bytes of any value.
pub fn canonicalize(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    let mut path = String::new();
    write_value(&mut out, value, &mut path, 0)?;
    Ok(out)
}

fn write_value(out: &mut Vec<u8>, value: &Value, path: &mut String, depth: usize) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i.unsigned_abs() > MAX_SAFE_INTEGER {
                    return Err(CanonicalError::IntegerOutOfRange { path: display_path(path), value: n.to_string() });
                }
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                // Only reached for u64 values above i64::MAX, all beyond the safe range.
                let _ = u;
                return Err(CanonicalError::IntegerOutOfRange { path: display_path(path), value: n.to_string() });
            } else {
                return Err(CanonicalError::NotAnInteger { path: display_path(path), value: n.to_string() });
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(CanonicalError::TooDeep { path: display_path(path) });
            }
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                write_value(out, item, path, depth + 1)?;
                path.truncate(len);
            }
            out.push(b']');
        }
        Value::Object(obj) => {
            if depth >= MAX_DEPTH {
                return Err(CanonicalError::TooDeep { path: display_path(path) });
            }
            write_object(out, obj, path, depth)?;
        }
    }
    Ok(())
}

fn write_object(
    out: &mut Vec<u8>,
    obj: &Map<String, Value>,
    path: &mut String,
    depth: usize,
) -> Result<(), CanonicalError> {
    let mut members: Vec<(&String, &Value)> = obj.iter().collect();
    members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        let len = path.len();
        path.push('/');
        path.push_str(key);
        write_value(out, value, path, depth + 1)?;
        path.truncate(len);
    }
    out.push(b'}');
    Ok(())
}

/// The JCS escape of `b`, if it needs one; `b""` for the control characters written `\u00xx`.
fn escape_of(b: u8) -> Option<&'static [u8]> {
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        0x08 => Some(b"\\b"),
        0x09 => Some(b"\\t"),
        0x0a => Some(b"\\n"),
        0x0c => Some(b"\\f"),
        0x0d => Some(b"\\r"),
        0x00..=0x1f => Some(b""),
        // Non-ASCII bytes are copied verbatim: the input is valid UTF-8 and JCS keeps every
        // non-control code point literal.
        _ => None,
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Runs of bytes that need no escape are copied whole (most strings are one run).
    let mut rest = bytes;
    while let Some((run, tail)) =
        rest.iter().position(|&b| escape_of(b).is_some()).and_then(|at| rest.split_at_checked(at))
    {
        out.extend_from_slice(run);
        let Some((&b, tail)) = tail.split_first() else { break };
        match escape_of(b) {
            Some(b"") | None => {
                out.extend_from_slice(b"\\u00");
                out.push(crate::hex::digit(b >> 4));
                out.push(crate::hex::digit(b));
            }
            Some(escape) => out.extend_from_slice(escape),
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// JCS strings are ECMAScript's `JSON.stringify`: the same escapes as serde_json's
        /// (`"`, `\\`, the short forms, `\u00xx` for other controls, everything else literal).
        #[test]
        fn strings_escape_as_serde_json_does(s in "(\\PC|[\\x00-\\x1f\"\\\\])*") {
            let mut out = Vec::new();
            write_string(&mut out, &s);
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }
    }

    fn canon(v: &Value) -> String {
        String::from_utf8(canonicalize(v).unwrap()).unwrap()
    }

    #[test]
    fn primitives_and_nesting() {
        assert_eq!(canon(&json!(null)), "null");
        assert_eq!(canon(&json!(true)), "true");
        assert_eq!(canon(&json!([1, -2, 0, false, "a", {}])), r#"[1,-2,0,false,"a",{}]"#);
        assert_eq!(canon(&json!({"b": {"d": 1, "c": [null]}, "a": "x"})), r#"{"a":"x","b":{"c":[null],"d":1}}"#);
    }

    /// RFC 8785 §3.2.2.2 example string: controls, quotes, backslash and non-ASCII.
    #[test]
    fn rfc8785_string_escaping() {
        let v = Value::String("\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/".into());
        assert_eq!(canon(&v), "\"€$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"");
        // Every control character below 0x20.
        let all: String = (0u8..0x20).map(char::from).collect();
        assert_eq!(
            canon(&Value::String(all)),
            "\"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\""
        );
        // DEL, U+2028 and U+2029 stay literal.
        assert_eq!(canon(&json!("\u{7f}\u{2028}\u{2029}")), "\"\u{7f}\u{2028}\u{2029}\"");
    }

    /// RFC 8785 §3.2.3 sorting example: keys ordered by UTF-16 code units, so U+1F600 (a
    /// surrogate pair starting 0xD83D) sorts before U+FB33 even though its UTF-8 form is larger.
    #[test]
    fn rfc8785_key_ordering() {
        let v = json!({
            "\u{20ac}": "Euro Sign",
            "\r": "Carriage Return",
            "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\u{1f600}": "Emoji: Grinning Face",
            "\u{0080}": "Control",
            "\u{00f6}": "Latin Small Letter O With Diaeresis"
        });
        let want = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{0080}\":\"Control\",\
                    \"\u{00f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\
                    \"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(canon(&v), want);
    }

    #[test]
    fn integers_exact_floats_refused() {
        assert_eq!(canon(&json!(9007199254740991i64)), "9007199254740991");
        assert_eq!(canon(&json!(-9007199254740991i64)), "-9007199254740991");
        let e = canonicalize(&json!({"a": {"b": 9007199254740992u64}})).unwrap_err();
        assert!(matches!(e, CanonicalError::IntegerOutOfRange { ref path, .. } if path == "/a/b"), "{e}");
        let e = canonicalize(&json!({"cost": 1.5})).unwrap_err();
        assert!(matches!(e, CanonicalError::NotAnInteger { ref path, .. } if path == "/cost"), "{e}");
        assert!(canonicalize(&json!(u64::MAX)).is_err());
        assert!(canonicalize(&json!(1.0)).is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 2) {
            v = json!([v]);
        }
        assert!(matches!(canonicalize(&v), Err(CanonicalError::TooDeep { .. })));
    }

    #[test]
    fn canonical_output_parses_back_to_same_value() {
        let v = json!({"z": "é\u{1}\"", "a": [1, {"y": null, "x": true}], "m": -5});
        let bytes = canonicalize(&v).unwrap();
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, v);
        assert_eq!(canonicalize(&back).unwrap(), bytes);
    }
}
