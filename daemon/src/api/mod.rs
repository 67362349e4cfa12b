//! The local API (docs/api.md): HTTP/1.1 + JSON over a Unix socket, for operators and the CLI.
//!
//! `server` routes requests to the [`crate::service::Service`]; `access` decides who may call
//! at all (root or the API group, never a process inside an agent sandbox); `client` is what the CLI
//! uses. The proxy does not go through this API: it calls the service directly.

pub mod access;
pub mod client;
pub mod server;
