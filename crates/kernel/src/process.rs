//! Processes the daemon must follow exactly: `pidfd_open(2)` handles (immune to pid reuse), a
//! wait for a pidfd's process to exit, the identity `/proc` gives a pid (start time and real
//! uid), and the CLI's SIGPIPE disposition. The raw syscalls live here so that the daemon crate
//! needs no `unsafe`.
//!
//! Must not: decide what a process may do; callers (the service's sandboxes) own that.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// `pidfd_open(2)`: a handle on exactly this process, immune to pid reuse.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other(format!("pidfd_open returned {fd}, not an fd")))?;
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolves when the process behind `pidfd` has exited (a pidfd becomes readable then). Must be
/// called inside a tokio runtime. An error means the pidfd could not be registered with the
/// runtime, so its exit cannot be watched.
pub async fn wait_exit(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open and refers to the
    // same pidfd until the AsyncFd is dropped.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    // An error here means the runtime is shutting down: the wait is over either way.
    let _ = fd.readable().await;
    Ok(())
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot), and the real uid from
/// `/proc/PID/status`. `None` if the process is gone or the files do not parse.
pub fn process_identity(pid: i32) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((stat_start_time(&stat)?, status_real_uid(&status)?))
}

/// The start time (field 22) of a `/proc/PID/stat` line.
fn stat_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let after = stat.get(stat.rfind(')')?.checked_add(2)?..)?;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The real uid (first field of `Uid:`) of a `/proc/PID/status` file.
fn status_real_uid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// Restores the default SIGPIPE disposition (terminate quietly), for command-line tools piped
/// into `head`. Rust ignores SIGPIPE by default; the daemon keeps that (a vanished peer must
/// never kill it). Call it before any thread is started.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL is a valid disposition; changing it affects no Rust-managed state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "1234 (a) b) (c) S 1 1234 1234 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(stat_start_time(stat), Some(987654));
        assert_eq!(stat_start_time("1234 (cmd) S 1"), None, "too few fields");
        assert_eq!(stat_start_time("1234 (cmd)"), None, "nothing after the name");
        assert_eq!(stat_start_time("garbage"), None);
    }

    #[test]
    fn real_uid_is_the_first_uid_field() {
        assert_eq!(status_real_uid("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\n"), Some(1000));
        assert_eq!(status_real_uid("Name:\tx\n"), None);
        assert_eq!(status_real_uid("Uid:\tabc\n"), None);
    }

    #[test]
    fn own_process_has_an_identity_and_a_pidfd() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let (_, uid) = process_identity(pid).expect("own /proc entry");
        assert_eq!(uid, nix::unistd::getuid().as_raw());
        pidfd_open(pid).expect("pidfd of self");
        assert!(pidfd_open(-1).is_err());
    }

    #[tokio::test]
    async fn wait_exit_resolves_when_the_child_exits() {
        let mut child = std::process::Command::new("sleep").arg("0.1").spawn().unwrap();
        let pidfd = pidfd_open(i32::try_from(child.id()).unwrap()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), wait_exit(pidfd)).await.unwrap().unwrap();
        child.wait().unwrap();
    }
}
