//! Revocation as a type and a check. The daemon persists revocations in its store (and attests
//! each one); verification only asks "is this passport id revoked?".

use super::PassportId;
use std::collections::HashSet;

/// Something that knows which passports are revoked.
pub trait Revocations {
    fn is_revoked(&self, id: &PassportId) -> bool;
}

/// No revocation information (offline verification of a token by itself).
pub struct NoRevocations;

impl Revocations for NoRevocations {
    fn is_revoked(&self, _: &PassportId) -> bool {
        false
    }
}

/// An in-memory set of revoked passport ids.
#[derive(Debug, Default, Clone)]
pub struct RevocationList {
    revoked: HashSet<PassportId>,
}

impl RevocationList {
    pub fn new() -> Self {
        Self::default()
    }
    /// Returns false if the id was already revoked.
    pub fn revoke(&mut self, id: PassportId) -> bool {
        self.revoked.insert(id)
    }
    pub fn len(&self) -> usize {
        self.revoked.len()
    }
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

impl Revocations for RevocationList {
    fn is_revoked(&self, id: &PassportId) -> bool {
        self.revoked.contains(id)
    }
}
