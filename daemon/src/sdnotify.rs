//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` units.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`). It is a few lines,
//! so it is written here rather than pulled in as a dependency.
//!
//! The daemon sends `READY=1` only when everything that enforces is in place (eBPF programs
//! attached, proxy and resolver listening, API socket bound), so that units ordered
//! `After=sluice.service` never start an agent against a half-started enforcer, and `STOPPING=1`
//! when it begins to shut down.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` to `$NOTIFY_SOCKET`. `Ok(false)` when not started by systemd (no variable).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        None => Ok(false),
        Some(addr) => {
            let addr = addr
                .into_string()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "$NOTIFY_SOCKET is not UTF-8"))?;
            notify_to(&addr, state).map(|()| true)
        }
    }
}

/// Sends `state` to the notification socket `addr` (`/path` or `@abstract`).
pub fn notify_to(addr: &str, state: &str) -> io::Result<()> {
    let target = socket_addr(addr)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &target)?;
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write to $NOTIFY_SOCKET"));
    }
    Ok(())
}

fn socket_addr(addr: &str) -> io::Result<SocketAddr> {
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if addr.starts_with('/') {
        SocketAddr::from_pathname(addr)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("$NOTIFY_SOCKET {addr:?}: only absolute paths and @abstract names are supported"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1\nSTATUS=up").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sluice-test-notify-{}-{}", std::process::id(), rand::random::<u64>());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn refuses_other_address_forms() {
        for bad in ["", "relative/path", "vsock:2:1234"] {
            assert_eq!(notify_to(bad, "READY=1").unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        // A path nobody listens on is an error, not a silent success.
        assert!(notify_to("/nonexistent/sluice/notify", "READY=1").is_err());
    }
}
