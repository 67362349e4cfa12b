//! RFC 7638 JWK thumbprints of Ed25519 (OKP, RFC 8037) keys, used for `cnf.jkt`.

use super::b64;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

/// The thumbprint: SHA-256 over the required members in lexicographic order, no whitespace.
pub fn okp_thumbprint(key: &VerifyingKey) -> String {
    let jwk = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64::encode(key.as_bytes()));
    b64::encode(&Sha256::digest(jwk.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037 Appendix A.2 and A.3.
    #[test]
    fn rfc8037_thumbprint_vector() {
        let x = b64::decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        assert_eq!(okp_thumbprint(&key), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }
}
