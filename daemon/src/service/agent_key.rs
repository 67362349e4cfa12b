//! Agent keys handed to the daemon by `sluice run --key`, so that the proxy can sign the agent's
//! requests to gates (`[gates] hosts`) without the agent ever handling its key.
//!
//! A key lives only in memory, in the [`AgentKeys`] map of the sandbox it was given for: never
//! written to the store or a file, never logged (its `Debug` shows only the key id), and dropped
//! (zeroed: ed25519-dalek's `SigningKey` zeroizes on drop) when the sandbox ends. After a daemon
//! restart a sandbox has no key: its requests to gates go out unsigned until it is created again.

use super::ServiceError;
use crate::passport::{jwk, Passport};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::SigningKey;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use zeroize::{Zeroize, Zeroizing};

/// One sandbox's agent key, with what a signed request carries besides the signature.
pub struct AgentKey {
    key: SigningKey,
    /// The passport's `cnf.jkt`: the `keyid` of every signature.
    keyid: String,
    /// The passport's compact JWT, sent as `Sluice-Passport`.
    token: String,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey").field("keyid", &self.keyid).finish_non_exhaustive()
    }
}

impl AgentKey {
    /// Reads the key as the API receives it (`agent_key`: base64url without padding of the
    /// 32-byte Ed25519 private key) and checks that it is the key the passport is bound to
    /// (`cnf.jkt`, RFC 7638). The text is zeroed once read.
    pub fn from_api(mut text: String, passport: &Passport) -> Result<AgentKey, ServiceError> {
        let decoded: Zeroizing<Vec<u8>> =
            Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim().as_bytes()).unwrap_or_default());
        text.zeroize();
        if decoded.len() != 32 {
            return Err(ServiceError::invalid(
                "agent_key",
                "must be the 32-byte Ed25519 private key in unpadded base64url (`sluice run --key F` sends it)",
            ));
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&decoded);
        let key = SigningKey::from_bytes(&seed);
        let keyid = jwk::okp_thumbprint(&key.verifying_key());
        if keyid != passport.claims.cnf_jkt {
            return Err(ServiceError::invalid(
                "agent_key",
                format!(
                    "is not the key passport {} is bound to (its cnf.jkt is {}, this key's thumbprint is {keyid}); \
                     pass the passport's own .key file",
                    passport.claims.id, passport.claims.cnf_jkt
                ),
            ));
        }
        Ok(AgentKey { key, keyid, token: passport.token.clone() })
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    pub fn token(&self) -> &str {
        &self.token
    }
}

/// The agent keys of live sandboxes, by cgroup id.
#[derive(Default)]
pub struct AgentKeys(RwLock<HashMap<u64, Arc<AgentKey>>>);

impl AgentKeys {
    pub fn insert(&self, cgroup_id: u64, key: AgentKey) {
        if let Ok(mut m) = self.0.write() {
            m.insert(cgroup_id, Arc::new(key));
        }
    }

    pub fn get(&self, cgroup_id: u64) -> Option<Arc<AgentKey>> {
        self.0.read().ok()?.get(&cgroup_id).cloned()
    }

    /// Drops the sandbox's key (zeroed when the last request signing with it is done).
    pub fn remove(&self, cgroup_id: u64) {
        if let Ok(mut m) = self.0.write() {
            m.remove(&cgroup_id);
        }
    }

    pub fn len(&self) -> usize {
        self.0.read().map(|m| m.len()).unwrap_or_default()
    }
}
