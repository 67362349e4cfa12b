//! Ports for the listeners a test, a bench or the demo starts, picked so that nothing else on the
//! machine can take one between the pick and the bind.
//!
//! Std only, with no dependency on the rest of this crate: `daemon/tests/common` and
//! `xtask/src/ports.rs` compile this same file (`#[path]`), since neither can depend on this crate.
//!
//! A port from `bind(:0)`, probed and released, is not reserved: the next `bind(:0)` anywhere (a
//! test running in parallel, another probe) can be handed it again, and the caller's own bind
//! then fails with `EADDRINUSE`. Two calls in a row can even name the same port. So ports come
//! from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), which `bind(:0)` and
//! outgoing connections never use: there only an explicit bind takes a port, and within one
//! process this module never names a port twice.

use std::collections::HashSet;
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

/// The lowest port handed out.
const LOW: u32 = 10_000;

/// A port free for TCP and UDP on 127.0.0.1 and ::1, never handed out twice by this process, or
/// why there is none.
pub fn free_port() -> Result<u16, String> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_low = range.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(32_768);
    if ephemeral_low < LOW + 1_000 {
        return Err(format!(
            "the ephemeral port range starts at {ephemeral_low} (net.ipv4.ip_local_port_range); ports \
             from {LOW} up must be outside it: raise its lower bound"
        ));
    }
    let span = ephemeral_low - LOW;
    // Processes that run at once (a bench and a test binary) start at different places.
    let start = std::process::id().wrapping_mul(7_919) % span;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = (LOW + (start + i) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
            && UdpSocket::bind(("::1", port)).is_ok();
        if free {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(format!("no port from {LOW} to {ephemeral_low} is free for TCP and UDP on 127.0.0.1 and ::1"))
}
