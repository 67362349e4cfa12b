//! Ports for the daemons, gates and services that `demo` and `package` start.

use anyhow::bail;
use std::collections::HashSet;
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

/// A port free for TCP and UDP on 127.0.0.1 and ::1, never handed out twice by this process.
///
/// It comes from below the kernel's ephemeral range (`ip_local_port_range`), not from `bind(:0)`.
/// A port `bind(:0)` gave and this function released can come back from the next `bind(:0)` (two
/// calls in a row could name the same port, and the daemon's proxy and resolver would then
/// collide), or go to an outgoing connection before the process it is meant for binds it. Below
/// the range only an explicit bind takes a port.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const LOW: u32 = 10_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_low = range.split_whitespace().next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(32_768);
    if ephemeral_low < LOW + 1_000 {
        bail!(
            "the ephemeral port range starts at {ephemeral_low} (net.ipv4.ip_local_port_range); ports \
             {LOW} and up must be outside it: raise its lower bound"
        );
    }
    let span = ephemeral_low - LOW;
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
    bail!("no port from {LOW} to {ephemeral_low} is free for TCP and UDP on 127.0.0.1 and ::1")
}
