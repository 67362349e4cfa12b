//! Strict base64url (RFC 4648 §5) without padding, as JWS compact serialisation requires.
//!
//! Refused: `=` padding, the standard alphabet's `+` and `/`, whitespace, and encodings whose
//! unused trailing bits are not zero (two strings must never decode to the same bytes, or a
//! signature could be "re-encoded" without breaking it).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes strict unpadded base64url. The error says what was wrong, never echoes the input.
pub fn decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            assert_eq!(decode(&encode(&data)).unwrap(), data);
        }
    }

    #[test]
    fn refuses_padding_standard_alphabet_and_whitespace() {
        assert!(decode("YQ==").is_err());
        assert!(decode("YQ").is_ok());
        assert!(decode("+/8").is_err());
        assert!(decode("-_8").is_ok());
        assert!(decode("YW Jj").is_err());
        assert!(decode("YWJj\n").is_err());
    }

    #[test]
    fn refuses_non_zero_trailing_bits() {
        // "YQ" is 'a'; "YR" carries the same byte with a non-zero unused bit.
        assert!(decode("YR").is_err());
    }
}
