//! Processes the daemon must follow exactly: `pidfd_open(2)` handles (immune to pid reuse), a
//! wait for a pidfd's process to exit, the identity `/proc` gives a pid (start time and real
//! uid), the CLI's SIGPIPE disposition and the long-running servers' malloc bounds. The raw
//! syscalls live here so that the daemon crate needs no `unsafe`.
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

/// glibc malloc settings for a long-running server (the daemon, a gate), as `(tunable, value)`:
/// - at most two arenas (glibc's default is eight per core; the daemon runs a proxy runtime
///   thread per core besides tokio's workers and the ledger's threads, and each arena keeps its
///   own freed memory);
/// - freed memory above 128 KiB at the top of a heap given back to the system;
/// - blocks up to 1 MiB served from the heap, a fixed threshold (glibc's moving one rises after
///   the first large buffer is freed and from then on keeps such buffers for good).
///
/// Measured with `bench proxy` (RSS with 1,000 idle agent connections / after the load runs):
/// glibc's defaults 64.7 / 72.8 MiB, two arenas alone 59.4 / 78.7 MiB, all three 57.5 / 60.2
/// MiB, with no mmap/munmap per request and CPU per request unchanged within the noise.
pub const MALLOC_BOUNDS: [(&str, i32); 3] = [
    ("glibc.malloc.arena_max", 2),
    ("glibc.malloc.trim_threshold", 128 * 1024),
    ("glibc.malloc.mmap_threshold", 1024 * 1024),
];

/// The older environment variable glibc still reads for each of [`MALLOC_BOUNDS`].
fn legacy_variable(tunable: &str) -> &'static str {
    match tunable {
        "glibc.malloc.arena_max" => "MALLOC_ARENA_MAX",
        "glibc.malloc.trim_threshold" => "MALLOC_TRIM_THRESHOLD_",
        _ => "MALLOC_MMAP_THRESHOLD_",
    }
}

/// Which of [`MALLOC_BOUNDS`] to apply, given the process's `GLIBC_TUNABLES` and whether a
/// variable is set (`is_set`, for glibc's older `MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`
/// and `MALLOC_MMAP_THRESHOLD_`): each one the operator set in neither (their value wins; glibc
/// has already applied it).
pub fn malloc_bounds_to_apply(glibc_tunables: Option<&str>, is_set: impl Fn(&str) -> bool) -> Vec<(&'static str, i32)> {
    let set: Vec<&str> = glibc_tunables
        .unwrap_or("")
        .split(':')
        .filter_map(|t| t.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    MALLOC_BOUNDS.iter().copied().filter(|(name, _)| !set.contains(name) && !is_set(legacy_variable(name))).collect()
}

/// What [`bound_malloc`] did: the tunables applied, and those glibc refused.
#[derive(Debug, Default)]
pub struct MallocBounds {
    pub applied: Vec<&'static str>,
    pub refused: Vec<&'static str>,
}

/// Applies [`MALLOC_BOUNDS`] with `mallopt(3)`, except those the environment sets, so that a
/// server started by hand is bounded as the shipped unit's is. Call it first thing, before any
/// thread starts (a thread takes its arena when it first allocates). A no-op on other C
/// libraries.
pub fn bound_malloc() -> MallocBounds {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let env = std::env::var("GLIBC_TUNABLES").ok();
        let mut done = MallocBounds::default();
        for (name, value) in malloc_bounds_to_apply(env.as_deref(), |v| std::env::var_os(v).is_some()) {
            let param = match name {
                "glibc.malloc.arena_max" => libc::M_ARENA_MAX,
                "glibc.malloc.trim_threshold" => libc::M_TRIM_THRESHOLD,
                _ => libc::M_MMAP_THRESHOLD,
            };
            // SAFETY: mallopt takes two integers and changes only the allocator's parameters;
            // it returns 0 when it refuses a value.
            if unsafe { libc::mallopt(param, value) } == 0 {
                done.refused.push(name);
            } else {
                done.applied.push(name);
            }
        }
        done
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        MallocBounds::default()
    }
}

/// Hands every whole free page inside malloc's heaps back to the kernel (`malloc_trim(0)`), and
/// says whether there was any. glibc returns a heap's free memory on its own only from the top
/// of the heap (`trim_threshold`); pages freed below a live block stay in the process's RSS
/// until reused. This call releases those too, but it takes each arena's lock while it walks
/// the arena's free lists (milliseconds for a heap of tens of MiB), so a server calls it when
/// it is quiet, not on a request's path. Returns glibc's own flag, true whenever some free chunk
/// spans a whole page (even one already given back), so it says little; the RSS says more. A
/// no-op returning `false` on other C libraries.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes an integer (the bytes to keep free at the top of the heap)
        // and only gives pages no allocation uses back to the kernel.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn malloc_bounds_leave_the_operators_tunables_alone() {
        let all: Vec<&str> = super::MALLOC_BOUNDS.iter().map(|(n, _)| *n).collect();
        let names = |t: Option<&str>| {
            super::malloc_bounds_to_apply(t, |_| false).into_iter().map(|(n, _)| n).collect::<Vec<_>>()
        };
        assert_eq!(names(None), all);
        assert_eq!(names(Some("")), all);
        assert_eq!(names(Some("glibc.malloc.tcache_count=0")), all);
        assert_eq!(
            names(Some("glibc.malloc.arena_max=8:glibc.malloc.mmap_threshold=65536")),
            vec!["glibc.malloc.trim_threshold"]
        );
        // glibc's older variables count as set too.
        let legacy = super::malloc_bounds_to_apply(None, |v| v == "MALLOC_ARENA_MAX" || v == "MALLOC_TRIM_THRESHOLD_");
        assert_eq!(legacy.into_iter().map(|(n, _)| n).collect::<Vec<_>>(), vec!["glibc.malloc.mmap_threshold"]);
        // The shipped unit's own line: nothing left to apply.
        assert!(names(Some(
            "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=131072:glibc.malloc.mmap_threshold=1048576"
        ))
        .is_empty());
    }

    #[test]
    fn bound_malloc_applies_what_glibc_accepts() {
        // mallopt in a test process changes only its allocator's parameters; every value is one
        // glibc accepts, so this fails only if a value is out of its range.
        let done = super::bound_malloc();
        assert!(done.refused.is_empty(), "{done:?}");
        let legacy = ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"];
        if std::env::var_os("GLIBC_TUNABLES").is_none()
            && legacy.iter().all(|v| std::env::var_os(v).is_none())
            && cfg!(target_env = "gnu")
        {
            assert_eq!(done.applied.len(), super::MALLOC_BOUNDS.len());
        }
        // And it still allocates.
        assert_eq!(vec![7u8; 2 << 20].len(), 2 << 20);
    }

    #[test]
    fn release_free_heap_finds_freed_pages_and_leaves_live_blocks_alone() {
        // Blocks under the mmap threshold come from a heap; freeing every other one leaves free
        // pages below live blocks, which only a trim gives back. The call must not disturb the
        // live blocks.
        let mut blocks: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; 64 * 1024]).collect();
        for b in blocks.iter_mut().step_by(2) {
            *b = Vec::new();
        }
        let released = super::release_free_heap();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "64 KiB blocks freed between live ones leave whole free pages to release");
        } else {
            assert!(!released);
        }
        for (i, b) in blocks.iter().enumerate().skip(1).step_by(2) {
            assert!(b.len() == 64 * 1024 && b.iter().all(|&x| x == i as u8), "block {i} changed");
        }
    }

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
