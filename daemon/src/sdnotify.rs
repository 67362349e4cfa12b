//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` units, through the
//! `sd-notify` crate.
//!
//! The daemon sends `READY=1` only when everything that enforces is in place (eBPF programs
//! attached, proxy and resolver listening, API socket bound), so that units ordered
//! `After=sluice.service` never start an agent against a half-started enforcer, and `STOPPING=1`
//! when it begins to shut down. [`reloading`] sends `RELOADING=1` with the `MONOTONIC_USEC=` that
//! `Type=notify-reload` requires (systemd 253 and later), for a reload that reports itself.
//!
//! `$NOTIFY_SOCKET` must be a path: systemd has used one (`/run/systemd/notify`, or
//! `/run/host/notify` in containers) since version 216. An abstract `@name` is refused with a
//! message that says so, rather than sent to a file named `@name`.

use std::ffi::OsStr;
use std::io;

pub use sd_notify::NotifyState;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `states` to `$NOTIFY_SOCKET`. `Ok(false)` when not started by systemd (no variable).
pub fn notify(states: &[NotifyState]) -> io::Result<bool> {
    let Some(addr) = std::env::var_os(NOTIFY_SOCKET) else { return Ok(false) };
    check_address(&addr)?;
    sd_notify::notify(states)?;
    Ok(true)
}

/// `READY=1` with a status line for `systemctl status`.
pub fn ready(status: &str) -> io::Result<bool> {
    notify(&[NotifyState::Ready, NotifyState::Status(status)])
}

/// `RELOADING=1` and the current `MONOTONIC_USEC=`; send [`ready`] once the reload is done.
pub fn reloading(status: &str) -> io::Result<bool> {
    notify(&[NotifyState::Reloading, NotifyState::monotonic_usec_now()?, NotifyState::Status(status)])
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) -> io::Result<bool> {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)])
}

/// Refuses the address forms the crate does not speak, naming them.
fn check_address(addr: &OsStr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match addr.as_bytes().first() {
        Some(b'/') => Ok(()),
        Some(b'@') => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("${NOTIFY_SOCKET} {addr:?} is an abstract socket name; only a path is supported"),
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("${NOTIFY_SOCKET} {addr:?}: expected an absolute path"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_paths_are_accepted() {
        assert!(check_address(OsStr::new("/run/systemd/notify")).is_ok());
        let e = check_address(OsStr::new("@/org/freedesktop/systemd1/notify")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("abstract"), "{e}");
        for bad in ["", "relative/path", "vsock:2:1234"] {
            assert_eq!(check_address(OsStr::new(bad)).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn states_are_written_as_systemd_reads_them() {
        // The crate writes each state as one `KEY=VALUE` line; systemd splits on newlines.
        let line = |s: NotifyState| format!("{s}");
        assert_eq!(line(NotifyState::Ready), "READY=1");
        assert_eq!(line(NotifyState::Reloading), "RELOADING=1");
        assert_eq!(line(NotifyState::Stopping), "STOPPING=1");
        assert_eq!(line(NotifyState::Status("enforcing")), "STATUS=enforcing");
        let now = line(NotifyState::monotonic_usec_now().unwrap());
        let usec: u64 = now.strip_prefix("MONOTONIC_USEC=").unwrap().parse().unwrap();
        assert!(usec > 0, "{now}");
    }
}
