//! The intercepting proxy: accept a redirected connection, sniff what it speaks, terminate TLS
//! with a leaf from the local CA, and hand each request to policy.

pub mod ca;
pub mod sniff;
