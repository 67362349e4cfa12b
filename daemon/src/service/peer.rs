//! Who asked for an operation: the caller's credentials as the kernel reported them.
//!
//! The local API checks them (`api::peer`) before a request is read; the service only records
//! them, so this type lives here and the service does not depend on the API.

use serde::{Deserialize, Serialize};

/// The identity of a caller, as the kernel reports it (`SO_PEERCRED`). Recorded with every hold
/// resolution, revocation and reset so the log says who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub user: Option<String>,
}

/// Who did something the log and the state record: a caller of the API (`{uid, user, pid}`) or
/// the daemon itself (a bare string: `"timeout"`, `"daemon_restart"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Actor {
    Caller { uid: u32, user: Option<String>, pid: i32 },
    Daemon(String),
}

impl Peer {
    /// The caller as records and stored state name it.
    pub fn actor(&self) -> Actor {
        Actor::Caller { uid: self.uid, user: self.user.clone(), pid: self.pid }
    }

    /// `{uid, user, pid}` for attestation records.
    pub fn to_json(&self) -> serde_json::Value {
        self.actor().to_json()
    }
}

impl Actor {
    /// Its JSON, for attestation record bodies.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Actor::Caller { uid, user, pid } => serde_json::json!({"uid": uid, "user": user, "pid": pid}),
            Actor::Daemon(what) => what.as_str().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_reads_back_what_it_wrote_in_both_forms() {
        let peer = Peer { uid: 1000, gid: 1000, pid: 42, user: Some("ada".into()) };
        let caller = peer.actor();
        assert_eq!(caller.to_json(), serde_json::json!({"uid": 1000, "user": "ada", "pid": 42}));
        assert_eq!(serde_json::to_value(&caller).expect("json"), caller.to_json());
        let back: Actor = serde_json::from_value(caller.to_json()).expect("caller");
        assert_eq!(back, caller);
        let daemon = Actor::Daemon("timeout".into());
        assert_eq!(serde_json::to_value(&daemon).expect("json"), serde_json::json!("timeout"));
        assert_eq!(serde_json::from_value::<Actor>(serde_json::json!("timeout")).expect("daemon"), daemon);
    }
}
