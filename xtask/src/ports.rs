//! Ports for the daemons, gates and services that `demo` and `package` start: free on the
//! loopbacks and from below the kernel's ephemeral range, so nothing takes one before the process
//! it is meant for binds it. The rule and its reasons are in the e2e suites' `ports.rs`, compiled
//! here as well (xtask cannot depend on that crate).

#[path = "../../tests/src/ports.rs"]
mod shared;

/// A port free for TCP and UDP on 127.0.0.1 and ::1, never handed out twice by this process.
pub fn free_port() -> anyhow::Result<u16> {
    shared::free_port().map_err(anyhow::Error::msg)
}
