//! Kernel redirect: the eBPF programs of `ebpf/sluice.bpf.c`, the agents'
//! cgroup v2, and the connection table the proxy reads after `accept`.
//!
//! This module knows nothing of HTTP. Its contract with the rest of the daemon:
//!
//! * [`Enforcer::install`] creates (or adopts) the agents cgroup, loads the
//!   programs, attaches them as bpf_links and pins links and maps under the pin
//!   directory, so that a dead daemon means refused connections, never open
//!   egress. A restarted daemon takes the pinned links over in place
//!   (`BPF_LINK_UPDATE`): there is no moment without redirection.
//! * [`Conntable::lookup`] turns an accepted connection's peer address into
//!   the destination the agent dialed, its pid and cgroup id.
//! * [`Cgroup`] creates sandboxes below the agents cgroup and moves processes
//!   into them (a socket's cgroup is fixed at creation: join, then exec).
//! * [`unix`] confines agents' Unix-domain sockets to their own directory and the addresses the
//!   operator lists (`ebpf/unix.bpf.c`, Linux >= 6.7).
//! * [`confine`] starts a `sluice run` agent in its own PID namespace with a fresh `/proc`,
//!   under seccomp filters that allow only inet, Unix and route-netlink sockets and no io_uring.
//! * [`userns`] tells which user namespace a process is in (the one `sluice run` made for a
//!   sandbox is registered with the [`unix`] filter).
//! * [`stops`] is the emergency stop's pinned map: stopped sandboxes' connects refused.
//! * [`process`] holds pidfds, `/proc` identities and signal dispositions: the daemon's other
//!   raw syscalls, so that the daemon crate itself needs no `unsafe`.

// No panics in shipped code: errors are values (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod abi;
pub mod cgroup;
pub mod confine;
pub mod conntable;
pub mod detach;
pub mod loader;
pub mod process;
pub mod stops;
mod sys;
pub mod unix;
pub mod userns;

use std::io;
use std::path::PathBuf;

pub use cgroup::{cgroup2_mount, Cgroup};
pub use conntable::{Conntable, OrigDst, Transport};
pub use detach::{Holder, Pin, PinKind, PinnedState};
pub use loader::{detach_and_unpin, Enforcer};
pub use stops::{StopMap, StopTargets};
pub use unix::{SandboxDirs, UnixAddr, UnixFilter, UnixMode, UnixStatus};

/// Default pin directory (on bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";
/// Default agents cgroup, relative to the cgroup2 mount.
pub const DEFAULT_CGROUP: &str = "sluice-agents";

/// What [`Enforcer::install`] needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Agents cgroup, relative to the cgroup2 mount (`[sandbox] cgroup`).
    /// If it does not exist but the systemd slice of that name does
    /// (`sluice-agents.slice`), the slice is used.
    pub cgroup: String,
    /// Where links and maps are pinned; must be on (or directly below) bpffs.
    pub pin_dir: PathBuf,
    /// Proxy port on 127.0.0.1 and ::1 (`[proxy] port`).
    pub proxy_port: u16,
    /// Resolver port, UDP and TCP, on 127.0.0.1 and ::1 (`[dns] port`).
    pub dns_port: u16,
    /// TCP sockets one sandbox may hold connected or connecting at once (`[sandbox]
    /// max_tcp_sockets`): its share of the connection table. One more connect fails with EPERM.
    pub max_tcp_sockets: u32,
}

/// Default of [`KernelConfig::max_tcp_sockets`]: far above what an agent opens at once (a busy
/// browser keeps a few hundred), and 64 sandboxes at their quota still fit the table.
pub const DEFAULT_MAX_TCP_SOCKETS: u32 = 1024;

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            cgroup: DEFAULT_CGROUP.to_owned(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            proxy_port: 15001,
            dns_port: 15053,
            max_tcp_sockets: DEFAULT_MAX_TCP_SOCKETS,
        }
    }
}

/// Everything that can go wrong setting up or running the kernel redirect.
/// Each message names the path, program or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("invalid kernel setting `{field}`: {reason}")]
    Config { field: &'static str, reason: String },

    #[error(
        "no cgroup2 filesystem found in {mountinfo}: mount cgroup v2 (e.g. `mount -t cgroup2 none /sys/fs/cgroup`)"
    )]
    NoCgroup2 { mountinfo: PathBuf },

    #[error("invalid cgroup name {name:?}: {reason}")]
    CgroupName { name: String, reason: &'static str },

    #[error("cgroup {path}: {op} failed: {source}")]
    Cgroup {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` or choose another pin dir"
    )]
    NotBpffs { path: PathBuf },

    #[error("pin path {path}: {op} failed: {source}")]
    Pin {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object failed (are you root, with bpf allowed?): {0}")]
    Load(#[source] Box<aya::EbpfError>),

    #[error("eBPF program `{program}` is missing from the object or has the wrong type")]
    MissingProgram { program: &'static str },

    #[error("eBPF map `{map}` is missing from the object or has the wrong type")]
    MissingMap { map: &'static str },

    #[error("eBPF program `{program}`: {op} failed: {source}")]
    Program {
        program: &'static str,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("reading the host network namespace cookie (SO_NETNS_COOKIE, kernel >= 5.14) failed: {0}")]
    NetnsCookie(#[source] io::Error),
}
