//! What `sluice run` puts around an agent besides its cgroup: its own PID namespace with a fresh
//! `/proc`, so that no process outside the sandbox can be named, traced, signalled or read, and
//! the [`seccomp`] filters (socket families, io_uring).
//!
//! ```text
//! sluice run [non-root]: unshare(user), first thing, before it asks for the sandbox
//! sluice run: then in the sandbox's cgroup (the daemon moved it there)
//!   unshare(pid)
//!   fork ─────────────▶ PID 1 of the new PID namespace
//!   forwards signals      unshare(mount); / made a slave; a fresh /proc; the caller's bind mounts;
//!   to PID 1, waits,      not dumpable
//!   exits with its        fork, seccomp + no_new_privs, exec ──▶ the agent
//!   status                reaps every orphan, forwards signals to the agent, exits with the
//!                         agent's status (code N, or 128 + signal)
//! ```
//!
//! The order matters: the user namespace is made before the sandbox is asked for, so the daemon
//! can register it with the Unix socket filter (`unix.rs`) before anything runs in the sandbox;
//! the cgroup is joined next (children inherit it, and a socket's cgroup is fixed when it is
//! created), then the PID and mount namespaces, then `exec`.
//!
//! Non-root callers get a user namespace that maps their own uid and gid to themselves (nothing
//! else, `setgroups` denied): that is what lets an unprivileged process create the PID and mount
//! namespaces. The agent's uid does not change, and it has no capabilities after `exec`. Root
//! gets PID and mount namespaces without a user namespace. When PID 1 exits, the kernel kills
//! whatever is left in the namespace; the daemon also kills the cgroup when `sluice run` exits.
//!
//! Signals: SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2 and SIGWINCH sent to `sluice run`
//! are passed to PID 1 and from it to the agent. One that the terminal sent to the whole
//! foreground process group is not passed on when the agent is in that group (it got it already).
//!
//! Must not: talk to the daemon or decide anything; the caller (the CLI) owns both.

pub mod seccomp;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getegid, geteuid, getpgid, getpgrp, ForkResult, Pid};
use seccomp::{Filters, Ptrace};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The namespaces the agent gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// Non-root: a user namespace (the caller's uid and gid mapped to themselves), a mount
    /// namespace and a PID namespace.
    User,
    /// Root: a mount namespace and a PID namespace.
    Root,
    /// None (`sluice run --no-pid-namespace`): the agent can reach every process of the caller's
    /// user that the kernel lets that user reach. The ptrace-family syscalls are refused, but
    /// `kill(2)` and `/proc/PID/mem` are not.
    Off,
}

impl Namespaces {
    /// [`Namespaces::Root`] for root, else [`Namespaces::User`].
    pub fn for_caller() -> Namespaces {
        if geteuid().is_root() {
            Namespaces::Root
        } else {
            Namespaces::User
        }
    }
}

/// Why an agent could not be started confined. Nothing was started then.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "cannot create a user namespace ({source}): sluice run needs one to give the agent its own PID namespace, \
         so that it cannot trace, signal or read your other processes. Allow unprivileged user namespaces \
         (sysctl user.max_user_namespaces > 0; kernel.unprivileged_userns_clone=1 where it exists; on Ubuntu \
         kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile that allows `userns` for sluice), \
         run as root, or pass --no-pid-namespace to run the agent without that protection"
    )]
    UserNamespaces {
        #[source]
        source: io::Error,
    },

    #[error("sluice run must start the agent from a single thread, but {threads} run (a bug in sluice)")]
    Threads { threads: usize },

    #[error("{op} failed: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("seccomp: {0}")]
    Seccomp(String),

    #[error("setting up the agent's namespaces: {0}")]
    Setup(String),

    /// The command could not be executed (not found, not executable): its text names it.
    #[error("{0}")]
    Start(String),
}

/// Bind mounts to make in the agent's private mount namespace (the CA bundle). Runs in PID 1 of
/// the new namespace, or, with [`Namespaces::Off`] as root, in this process after it has made a
/// private mount namespace of its own. An error stops the start.
pub type Mounts<'a> = &'a mut dyn FnMut() -> Result<(), String>;

/// The signals passed on to the agent.
const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// PID 1's report to `sluice run` before the agent runs: a kind byte and a message.
const REPORT_SETUP: u8 = b'S';
const REPORT_START: u8 = b'E';
/// Longest report read.
const REPORT_MAX: u64 = 8 * 1024;

/// Set once this process has made the user namespace of [`Namespaces::User`].
static IN_USER_NAMESPACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the user namespace of [`Namespaces::User`] now and moves this process into it: the
/// caller's uid and gid mapped to themselves, `setgroups` denied. `sluice run` calls it first
/// thing, before it asks the daemon for a sandbox, so that the daemon sees (and registers with
/// the Unix socket filter) the user namespace the agent will run in; [`run`] then makes only the
/// PID namespace. Needs a single-threaded process (`unshare(CLONE_NEWUSER)` does). This process
/// keeps every capability in the new namespace and is made non-dumpable; the agent, started later
/// with a uid other than 0 inside and `no_new_privs`, gets none, so it cannot mount there.
pub fn enter_user_namespace() -> Result<(), ConfineError> {
    use std::sync::atomic::Ordering;
    if IN_USER_NAMESPACE.load(Ordering::SeqCst) {
        return Ok(());
    }
    single_threaded()?;
    let (uid, gid) = (geteuid(), getegid());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| match e {
        // EPERM: forbidden (sysctl, LSM, a seccomp filter); ENOSPC/EUSERS: the limit is 0 or
        // reached.
        Errno::EPERM | Errno::EACCES | Errno::ENOSPC | Errno::EUSERS => {
            ConfineError::UserNamespaces { source: e.into() }
        }
        e => ConfineError::Sys { op: "unshare(CLONE_NEWUSER)", source: e.into() },
    })?;
    // An unprivileged process may map only its own ids, and only after giving up setgroups(2).
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1\n")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1\n")),
    ] {
        std::fs::write(file, text).map_err(|source| match source.raw_os_error() {
            // An LSM (AppArmor's unprivileged userns restriction) may allow the namespace but
            // not the mapping.
            Some(libc::EPERM) | Some(libc::EACCES) => ConfineError::UserNamespaces { source },
            _ => ConfineError::Sys { op: "writing the user namespace's id maps", source },
        })?;
    }
    // This process keeps every capability in the namespace until it exits: nothing the agent
    // runs may trace or read it (it cannot name it either, from its own PID namespace).
    nix::sys::prctl::set_dumpable(false).map_err(sys("prctl(PR_SET_DUMPABLE)"))?;
    IN_USER_NAMESPACE.store(true, Ordering::SeqCst);
    Ok(())
}

/// Runs `cmd` confined as `ns` says, with the seccomp filters, and waits for it. Returns the exit
/// status to pass on: the agent's exit code, or 128 + N if a signal N ended it.
///
/// Call it from a single-threaded process that exits right after (a `sluice run` process): the
/// process joins the new namespaces itself, and the forwarded signals stay blocked in it.
pub fn run(cmd: Command, ns: Namespaces, mounts: Option<Mounts<'_>>) -> Result<u8, ConfineError> {
    let filters = Filters::build(if ns == Namespaces::Off { Ptrace::Refuse } else { Ptrace::Allow })?;
    single_threaded()?;
    let mut set = SigSet::empty();
    for s in FORWARDED.iter().chain([&Signal::SIGCHLD]) {
        set.add(*s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(sys("sigprocmask"))?;
    // An inherited SIG_IGN for SIGCHLD would reap children behind our back.
    // SAFETY: SIG_DFL is a valid disposition and no handler of ours is replaced.
    unsafe { nix::sys::signal::signal(Signal::SIGCHLD, SigHandler::SigDfl) }.map_err(sys("signal(SIGCHLD)"))?;

    if ns == Namespaces::Off {
        if let Some(m) = mounts {
            private_mounts().map_err(ConfineError::Setup)?;
            m().map_err(ConfineError::Setup)?;
        }
        let agent = spawn_agent(cmd, filters).map_err(ConfineError::Start)?;
        return supervise(agent, false, &set);
    }

    enter(ns)?;
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
    // SAFETY: this process is single-threaded (checked above), so the child may run any code.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(report_r);
            pid1(cmd, filters, mounts, report_w, &set)
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            let mut report = Vec::new();
            std::fs::File::from(report_r)
                .take(REPORT_MAX)
                .read_to_end(&mut report)
                .map_err(|source| ConfineError::Sys { op: "reading PID 1's report", source })?;
            if let Some((&kind, text)) = report.split_first() {
                // PID 1 exits right after its report.
                let _ = waitpid(child, None);
                let text = String::from_utf8_lossy(text).into_owned();
                return Err(if kind == REPORT_START { ConfineError::Start(text) } else { ConfineError::Setup(text) });
            }
            supervise(child, false, &set)
        }
    }
}

fn sys(op: &'static str) -> impl Fn(Errno) -> ConfineError {
    move |e| ConfineError::Sys { op, source: e.into() }
}

/// `unshare(CLONE_NEWUSER)` needs a single-threaded caller, and so does running code after
/// `fork`.
fn single_threaded() -> Result<(), ConfineError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|source| ConfineError::Sys { op: "reading /proc/self/task", source })?
        .count();
    if threads != 1 {
        return Err(ConfineError::Threads { threads });
    }
    Ok(())
}

/// This process joins a new PID namespace for its next child (and, for [`Namespaces::User`], the
/// user namespace of [`enter_user_namespace`] first, unless it is in it already).
fn enter(ns: Namespaces) -> Result<(), ConfineError> {
    if ns == Namespaces::User {
        enter_user_namespace()?;
    }
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare(CLONE_NEWPID)"))
}

/// A private mount namespace for this process, where nothing mounted propagates to the host.
fn private_mounts() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(|e| format!("making / a slave mount: {e}"))
}

/// PID 1 of the agent's PID namespace. Never returns.
fn pid1(cmd: Command, filters: Filters, mounts: Option<Mounts<'_>>, report: OwnedFd, set: &SigSet) -> ! {
    let code = match pid1_setup(cmd, filters, mounts) {
        Err((kind, text)) => {
            let mut msg = vec![kind];
            msg.extend_from_slice(text.as_bytes());
            let _ = std::fs::File::from(report).write_all(&msg);
            125
        }
        Ok(agent) => {
            // EOF on the report: the agent runs.
            drop(report);
            supervise(agent, true, set).unwrap_or(125)
        }
    };
    // SAFETY: _exit ends this forked process at once, without running the parent's atexit
    // handlers or flushing stdio buffers copied from it.
    unsafe { libc::_exit(i32::from(code)) }
}

fn pid1_setup(cmd: Command, filters: Filters, mounts: Option<Mounts<'_>>) -> Result<Pid, (u8, String)> {
    let setup = |e: String| (REPORT_SETUP, e);
    // If `sluice run` dies, so does the namespace (the daemon also kills the cgroup).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| setup(format!("prctl(PR_SET_PDEATHSIG): {e}")))?;
    private_mounts().map_err(setup)?;
    // A /proc of this PID namespace: only the sandbox's processes have entries.
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        setup(format!(
            "mounting a fresh /proc: {e} (from a user namespace this fails when parts of the current /proc are \
             hidden by other mounts, as in some containers)"
        ))
    })?;
    if let Some(m) = mounts {
        m().map_err(setup)?;
    }
    // The agent may not trace or read PID 1 (which keeps capabilities in the namespace).
    nix::sys::prctl::set_dumpable(false).map_err(|e| setup(format!("prctl(PR_SET_DUMPABLE): {e}")))?;
    spawn_agent(cmd, filters).map_err(|e| (REPORT_START, e))
}

/// Starts the agent with the seccomp filters installed between fork and exec.
fn spawn_agent(mut cmd: Command, filters: Filters) -> Result<Pid, String> {
    let program = cmd.get_program().to_owned();
    // SAFETY: the closure only makes sigprocmask, prctl and seccomp syscalls (no allocation, no
    // lock).
    unsafe {
        cmd.pre_exec(move || {
            // The agent starts with no signal blocked (this process blocks the ones it forwards,
            // and std does not reset the mask on every path).
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            filters.install()
        })
    };
    let child = cmd.spawn().map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let pid = i32::try_from(child.id()).map_err(|_| format!("{program:?} got pid {}", child.id()))?;
    Ok(Pid::from_raw(pid))
}

/// Waits for `target`, forwarding signals to it; with `reap_all` (PID 1) also reaps every other
/// child (orphans are re-parented to PID 1). Returns the status to exit with.
fn supervise(target: Pid, reap_all: bool, set: &SigSet) -> Result<u8, ConfineError> {
    let who = if reap_all { Pid::from_raw(-1) } else { target };
    loop {
        loop {
            match waitpid(who, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == target => return Ok((code & 0xff) as u8),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == target => {
                    return Ok(128u8.wrapping_add(sig as i32 as u8))
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(ConfineError::Sys { op: "waitpid", source: e.into() }),
            }
        }
        let Some((sig, from_kernel)) = wait_signal(set)? else { continue };
        if sig == Signal::SIGCHLD {
            continue;
        }
        // The terminal sends its signals to the whole foreground process group: if the target is
        // in ours, it got this one already.
        if from_kernel && getpgid(Some(target)).ok() == Some(getpgrp()) {
            continue;
        }
        // ESRCH: it has just exited; the next waitpid says how.
        let _ = kill(target, sig);
    }
}

/// The next blocked signal of `set`, and whether the kernel (a terminal) sent it rather than a
/// process. `None` after a second without one, so that a lost SIGCHLD only delays reaping.
fn wait_signal(set: &SigSet) -> Result<Option<(Signal, bool)>, ConfineError> {
    let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set, info and timeout pointers are valid for the call.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &timeout) };
    if r < 0 {
        return match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => Ok(None),
            e => Err(ConfineError::Sys { op: "sigtimedwait", source: e.into() }),
        };
    }
    Ok(Signal::try_from(r).ok().map(|s| (s, info.si_code == libc::SI_KERNEL)))
}
