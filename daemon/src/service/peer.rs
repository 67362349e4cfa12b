//! Who asked for an operation: the caller's credentials as the kernel reported them.
//!
//! The local API checks them (`api::peer`) before a request is read; the service only records
//! them, so this type lives here and the service does not depend on the API.

/// The identity of a caller, as the kernel reports it (`SO_PEERCRED`). Recorded with every hold
/// resolution, revocation and reset so the log says who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub user: Option<String>,
}

impl Peer {
    /// `{uid, user, pid}` for attestation records.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"uid": self.uid, "user": self.user, "pid": self.pid})
    }
}
