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
    /// (`cnf.jkt`, RFC 7638). The caller zeroes `text` (the API's [`AgentKeyText`] does on drop).
    pub fn from_api(text: &str, passport: &Passport) -> Result<AgentKey, ServiceError> {
        let decoded: Zeroizing<Vec<u8>> =
            Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim().as_bytes()).unwrap_or_default());
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

/// An agent key as the API receives it (`agent_key`), zeroed when dropped, whichever way the
/// request ends.
#[derive(serde::Deserialize)]
#[serde(transparent)]
pub struct AgentKeyText(String);

impl AgentKeyText {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Drop for AgentKeyText {
    fn drop(&mut self) {
        self.0.zeroize();
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A passport (`llm:*`, L1, one hour) issued for tests, with its agent key.
#[cfg(test)]
pub(crate) fn issue_for_test(agent: &str) -> crate::passport::Issued {
    use crate::passport::{Constraints, Permission, TrustTier};
    crate::passport::issue(
        crate::passport::IssueRequest {
            agent_id: agent.into(),
            agent_name: None,
            permissions: vec![Permission::parse("llm:*").expect("permission")],
            constraints: Constraints::default(),
            trust_tier: TrustTier::L1,
            lifetime_secs: 3600,
            now: crate::passport::now(),
        },
        &SigningKey::from_bytes(&[3u8; 32]),
    )
    .expect("issue")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passport() -> (Passport, SigningKey) {
        let issued = issue_for_test("key-test");
        (Passport { claims: issued.claims, token: issued.token }, issued.agent_key)
    }

    #[test]
    fn the_passport_s_own_key_is_taken_and_never_shown() {
        let (p, key) = passport();
        let k = AgentKey::from_api(&URL_SAFE_NO_PAD.encode(key.to_bytes()), &p).unwrap();
        assert_eq!(k.keyid(), p.claims.cnf_jkt);
        assert_eq!(k.token(), p.token);
        assert_eq!(k.signing_key().to_bytes(), key.to_bytes());
        let shown = format!("{k:?}");
        assert!(!shown.contains(&URL_SAFE_NO_PAD.encode(key.to_bytes())), "{shown}");
        assert!(shown.contains(&p.claims.cnf_jkt), "{shown}");
    }

    #[test]
    fn another_key_or_garbage_is_refused_naming_the_field() {
        let (p, _) = passport();
        let other = SigningKey::from_bytes(&[8u8; 32]);
        for text in [
            URL_SAFE_NO_PAD.encode(other.to_bytes()),
            String::new(),
            "not base64!".into(),
            URL_SAFE_NO_PAD.encode([1u8; 31]),
            URL_SAFE_NO_PAD.encode([1u8; 64]),
        ] {
            match AgentKey::from_api(&text, &p) {
                Err(ServiceError::Invalid { field: "agent_key", problem }) => {
                    assert!(!problem.contains(&text) || text.is_empty(), "the key is echoed: {problem}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    /// A request the proxy signed for a gate: its decision record (an allow, and a hold) carries
    /// `signed_request_hash` next to the usual `request_hash`, and the log still verifies.
    #[tokio::test]
    async fn decision_records_carry_the_signed_request_hash() {
        use crate::decide::{Decision, HostVerdict};
        use crate::service::testkit;
        use crate::service::{EnforceInput, HoldOrigin};
        let f = testkit::fixture().await;
        let hash = "ab".repeat(32);
        let input = |passport_id: &str, signed: Option<String>| EnforceInput {
            passport_id: passport_id.to_string(),
            action: "llm:chat".into(),
            cost_millicents: Some(10),
            target: Some("gate.example".into()),
            method: Some("POST".into()),
            path: Some("/v1/x".into()),
            signed_request_hash: signed,
            gate_price: None,
            ..Default::default()
        };
        let o =
            f.service.enforce_outcome(input(&f.passport, Some(hash.clone())), HoldOrigin::Proxy, HostVerdict::Allow);
        let o = o.await.unwrap();
        assert_eq!(o.decision, Decision::Allow);
        let r = testkit::record(&f, o.attestation_id);
        assert_eq!(r["signed_request_hash"], hash.as_str(), "{r}");
        assert_eq!(r["request_hash"].as_str().map(str::len), Some(64), "{r}");
        assert_ne!(r["request_hash"], r["signed_request_hash"]);
        let plain = f.service.enforce_outcome(input(&f.passport, None), HoldOrigin::Proxy, HostVerdict::Allow);
        let plain = testkit::record(&f, plain.await.unwrap().attestation_id);
        assert!(plain.get("signed_request_hash").is_none(), "{plain}");
        // A held request's decision record carries it too.
        let constraints = crate::passport::Constraints { approval_required: Some(true), ..Default::default() };
        let held = testkit::register(&f.service, "held-agent", constraints).await;
        let o = f.service.enforce_outcome(input(&held, Some(hash.clone())), HoldOrigin::Proxy, HostVerdict::Allow);
        let o = o.await.unwrap();
        assert_eq!(o.decision, Decision::RequestHold);
        assert_eq!(testkit::record(&f, o.attestation_id)["signed_request_hash"], hash.as_str());
        let report = testkit::verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    #[test]
    fn keys_go_with_their_sandbox() {
        let (p, key) = passport();
        let keys = AgentKeys::default();
        keys.insert(7, AgentKey::from_api(&URL_SAFE_NO_PAD.encode(key.to_bytes()), &p).unwrap());
        assert!(keys.get(7).is_some() && keys.get(8).is_none());
        keys.remove(7);
        assert!(keys.get(7).is_none());
        assert_eq!(keys.len(), 0);
    }
}
