//! Loading, attaching and pinning the eBPF object; taking over a previous
//! daemon's pinned state without a gap.
//!
//! Pin layout (all on bpffs):
//!
//! ```text
//! <pin_dir>/links/<program>   one bpf_link per program, on the agents cgroup
//! <pin_dir>/v<ABI>/<map>      socket storage, connection table, per-sandbox
//!                             slot counters, event counters, stopped sandboxes
//! ```
//!
//! The Unix socket filter (`unix.rs`, loaded with libbpf) pins its two links and its maps in
//! the same layout and follows the same lifecycle.
//!
//! Pinned links keep the programs attached when the daemon dies: agent
//! connections are then refused (nothing listens on the proxy port), never
//! sent out directly. Unpinned links would vanish with the daemon and leave
//! the agents unconfined.
//!
//! On restart the maps are reopened from their pins (same ABI version), and
//! every pinned link that already points at the agents cgroup gets the new
//! program with `BPF_LINK_UPDATE`, an atomic swap inside the kernel: at every
//! instant exactly one version of each program runs. A pinned link for
//! another cgroup (or of an unexpected kind) is replaced by a new link,
//! attached and pinned first, then renamed over the old pin.

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program, SockOps};
use aya::{Ebpf, EbpfLoader};

use super::abi::{self, ABI_VERSION};
use super::cgroup::{cgroup2_mount, Cgroup};
use super::conntable::Conntable;
use super::detach::PinnedState;
use super::stops::StopMap;
use super::unix::{self, UnixFilter, UnixStatus};
use super::{sys, KernelConfig, KernelError};

/// The compiled object (built by `crates/kernel/build.rs` from `ebpf/sluice.bpf.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

#[derive(Clone, Copy, Debug)]
enum Kind {
    SockAddr,
    SockOps,
    Sock,
    SkbEgress,
}

struct Spec {
    name: &'static str,
    kind: Kind,
    /// `enum bpf_attach_type`, to recognise our own pinned links.
    attach_type: u32,
}

/// Attach order: bookkeeping first (sockops before connect, so no redirected
/// connection lacks its table entry), the egress backstop last.
const PROGRAMS: &[Spec] = &[
    Spec { name: "sl_sockops", kind: Kind::SockOps, attach_type: 3 },
    Spec { name: "sl_recvmsg4", kind: Kind::SockAddr, attach_type: 19 },
    Spec { name: "sl_recvmsg6", kind: Kind::SockAddr, attach_type: 20 },
    Spec { name: "sl_getpeer4", kind: Kind::SockAddr, attach_type: 29 },
    Spec { name: "sl_getpeer6", kind: Kind::SockAddr, attach_type: 30 },
    Spec { name: "sl_bind4", kind: Kind::SockAddr, attach_type: 8 },
    Spec { name: "sl_bind6", kind: Kind::SockAddr, attach_type: 9 },
    Spec { name: "sl_sock_create", kind: Kind::Sock, attach_type: 2 },
    // Before connect: every slot a connect takes is given back at release.
    Spec { name: "sl_sock_release", kind: Kind::Sock, attach_type: 34 },
    Spec { name: "sl_connect4", kind: Kind::SockAddr, attach_type: 10 },
    Spec { name: "sl_connect6", kind: Kind::SockAddr, attach_type: 11 },
    Spec { name: "sl_sendmsg4", kind: Kind::SockAddr, attach_type: 14 },
    Spec { name: "sl_sendmsg6", kind: Kind::SockAddr, attach_type: 15 },
    Spec { name: "sl_egress", kind: Kind::SkbEgress, attach_type: 1 },
];

/// What [`Enforcer::install`] did with one program's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// No pinned link existed: a new one was attached and pinned.
    Attached,
    /// The pinned link now runs the new program (`BPF_LINK_UPDATE`).
    Updated,
    /// The pinned link was for another cgroup or unusable: a new link was
    /// attached, then pinned over it.
    Replaced,
}

/// A pinned link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    pub program: String,
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
}

/// The installed kernel redirect. Dropping it leaves everything attached
/// and pinned (a stopped daemon still confines its agents); use
/// [`Enforcer::detach_and_unpin`] to uninstall.
pub struct Enforcer {
    config: KernelConfig,
    agents: Cgroup,
    conntable: Arc<Conntable>,
    stops: Arc<StopMap>,
    host_netns: u64,
    actions: Vec<(&'static str, LinkAction)>,
    unix_status: UnixStatus,
    unix: Option<Arc<UnixFilter>>,
    // Keeps the program fds (and their info) for the daemon's lifetime.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("config", &self.config)
            .field("agents", &self.agents)
            .field("host_netns", &self.host_netns)
            .field("actions", &self.actions)
            .field("unix_status", &self.unix_status)
            .finish_non_exhaustive()
    }
}

fn check_config(cfg: &KernelConfig) -> Result<(), KernelError> {
    if cfg.proxy_port == 0 {
        return Err(KernelError::Config { field: "proxy.port", reason: "must not be 0".into() });
    }
    if cfg.dns_port == 0 {
        return Err(KernelError::Config { field: "dns.port", reason: "must not be 0".into() });
    }
    if cfg.dns_port == cfg.proxy_port {
        return Err(KernelError::Config {
            field: "dns.port",
            reason: format!("must differ from proxy.port ({})", cfg.proxy_port),
        });
    }
    if cfg.max_tcp_sockets == 0 || cfg.max_tcp_sockets > abi::CONNTABLE_ENTRIES / 4 {
        return Err(KernelError::Config {
            field: "sandbox.max_tcp_sockets",
            reason: format!(
                "{} is out of range: from 1 to {} (a quarter of the {}-entry connection table, so that \
                 at least four sandboxes at their quota fit)",
                cfg.max_tcp_sockets,
                abi::CONNTABLE_ENTRIES / 4,
                abi::CONNTABLE_ENTRIES
            ),
        });
    }
    if !cfg.pin_dir.is_absolute() {
        return Err(KernelError::Config {
            field: "pin_dir",
            reason: format!("{} must be an absolute path", cfg.pin_dir.display()),
        });
    }
    Ok(())
}

pub(crate) fn pin_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> KernelError + 'a {
    move |source| KernelError::Pin { path: path.to_owned(), op, source }
}

/// Makes sure `pin_dir` is on bpffs (mounting it at `/sys/fs/bpf` if that is
/// where it belongs and nothing is mounted yet) and creates its layout.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), KernelError> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| KernelError::NotBpffs { path: pin_dir.to_owned() })?;
    }
    let fs_type = sys::fs_type(existing).map_err(pin_err(existing, "statfs"))?;
    if fs_type != sys::BPF_FS_MAGIC {
        let default = Path::new("/sys/fs/bpf");
        if existing != default {
            return Err(KernelError::NotBpffs { path: pin_dir.to_owned() });
        }
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .map_err(|e| KernelError::Pin {
            path: default.to_owned(),
            op: "mount bpffs",
            source: io::Error::from(e),
        })?;
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
        builder.create(&dir).map_err(pin_err(&dir, "mkdir"))?;
    }
    Ok(())
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{ABI_VERSION}"))
}

pub(crate) fn prog_err<E>(program: &'static str, op: &'static str) -> impl FnOnce(E) -> KernelError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| KernelError::Program { program, op, source: Box::new(e) }
}

fn load(prog: &mut Program, spec: &Spec) -> Result<(), KernelError> {
    let missing = || KernelError::MissingProgram { program: spec.name };
    let res = match (spec.kind, prog) {
        (Kind::SockAddr, Program::CgroupSockAddr(p)) => p.load(),
        (Kind::SockOps, Program::SockOps(p)) => p.load(),
        (Kind::Sock, Program::CgroupSock(p)) => p.load(),
        (Kind::SkbEgress, Program::CgroupSkb(p)) => p.load(),
        _ => return Err(missing()),
    };
    res.map_err(prog_err(spec.name, "load (verifier)"))
}

fn attach(prog: &mut Program, spec: &Spec, cgroup: &File) -> Result<FdLink, KernelError> {
    let name = spec.name;
    let mode = CgroupAttachMode::Single;
    let link = match (spec.kind, prog) {
        (Kind::SockAddr, Program::CgroupSockAddr(p)) => {
            let p: &mut CgroupSockAddr = p;
            let id = p.attach(cgroup, mode).map_err(prog_err(name, "attach"))?;
            let link = p.take_link(id).map_err(prog_err(name, "take link"))?;
            FdLink::try_from(link).map_err(prog_err(name, "link fd"))?
        }
        (Kind::SockOps, Program::SockOps(p)) => {
            let p: &mut SockOps = p;
            let id = p.attach(cgroup, mode).map_err(prog_err(name, "attach"))?;
            let link = p.take_link(id).map_err(prog_err(name, "take link"))?;
            FdLink::try_from(link).map_err(prog_err(name, "link fd"))?
        }
        (Kind::Sock, Program::CgroupSock(p)) => {
            let p: &mut CgroupSock = p;
            let id = p.attach(cgroup, mode).map_err(prog_err(name, "attach"))?;
            let link = p.take_link(id).map_err(prog_err(name, "take link"))?;
            FdLink::try_from(link).map_err(prog_err(name, "link fd"))?
        }
        (Kind::SkbEgress, Program::CgroupSkb(p)) => {
            let p: &mut CgroupSkb = p;
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, mode).map_err(prog_err(name, "attach"))?;
            let link = p.take_link(id).map_err(prog_err(name, "take link"))?;
            FdLink::try_from(link).map_err(prog_err(name, "link fd"))?
        }
        _ => return Err(KernelError::MissingProgram { program: name }),
    };
    Ok(link)
}

/// Tries to swap the program of the pinned link at `pin` for `prog`, in place. `false` when
/// the pin is not one of our links (a cgroup link on `cgroup_id` at `attach_type`) or the
/// update fails: the caller then replaces it ([`replace_pin`]). Shared by every program the
/// daemon attaches, aya-loaded or not.
pub(crate) fn try_update(pin: &Path, prog: std::os::fd::BorrowedFd<'_>, cgroup_id: u64, attach_type: u32) -> bool {
    let link = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(pin = %pin.display(), %error, "unusable pinned link; replacing it");
            return false;
        }
    };
    let info = match sys::link_info(link.as_fd()) {
        Ok(i) => i,
        Err(error) => {
            tracing::warn!(pin = %pin.display(), %error, "cannot read pinned link; replacing it");
            return false;
        }
    };
    if info.link_type != sys::LINK_TYPE_CGROUP || info.cgroup_id != cgroup_id || info.attach_type != attach_type {
        tracing::info!(pin = %pin.display(), ?info, cgroup_id, "pinned link is for another cgroup or hook; replacing it");
        return false;
    }
    match sys::link_update(link.as_fd(), prog) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(pin = %pin.display(), %error, "BPF_LINK_UPDATE failed; replacing the link");
            false
        }
    }
}

/// Replaces the pinned link at `pin` with a new one that `pin_new` creates and pins at the path
/// it is given: new link first, pinned beside the old one, then a rename over it, so there is
/// no moment without a link. (bpffs refuses names containing a dot.)
pub(crate) fn replace_pin(
    pin: &Path,
    name: &str,
    pin_new: impl FnOnce(&Path) -> Result<(), KernelError>,
) -> Result<LinkAction, KernelError> {
    let tmp = pin.with_file_name(format!("{name}_new"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(pin_err(&tmp, "remove stale")(e)),
    }
    pin_new(&tmp)?;
    fs::rename(&tmp, pin).map_err(pin_err(pin, "rename new link over old"))?;
    Ok(LinkAction::Replaced)
}

fn install_program(
    ebpf: &mut Ebpf,
    spec: &'static Spec,
    cgroup: &Cgroup,
    cgroup_file: &File,
    links: &Path,
) -> Result<LinkAction, KernelError> {
    let prog = ebpf.program_mut(spec.name).ok_or(KernelError::MissingProgram { program: spec.name })?;
    load(prog, spec)?;
    let pin = links.join(spec.name);
    if !pin.exists() {
        attach(prog, spec, cgroup_file)?.pin(&pin).map_err(prog_err(spec.name, "pin link"))?;
        return Ok(LinkAction::Attached);
    }
    let updated = {
        let prog_fd = prog.fd().map_err(prog_err(spec.name, "program fd"))?;
        try_update(&pin, prog_fd.as_fd(), cgroup.id(), spec.attach_type)
    };
    if updated {
        return Ok(LinkAction::Updated);
    }
    replace_pin(&pin, spec.name, |tmp| {
        attach(prog, spec, cgroup_file)?.pin(tmp).map(drop).map_err(prog_err(spec.name, "pin link"))
    })
}

/// Removes pins this version does not own: links of programs that no longer
/// exist, and maps of other ABI versions (no program uses them any more).
fn remove_stale(pin_dir: &Path) -> Result<(), KernelError> {
    let links = links_dir(pin_dir);
    for entry in fs::read_dir(&links).map_err(pin_err(&links, "read_dir"))?.flatten() {
        let name = entry.file_name();
        let known = name.to_str().is_some_and(|n| program_names().any(|p| p == n));
        if !known {
            let path = entry.path();
            tracing::info!(pin = %path.display(), "removing stale link pin");
            fs::remove_file(&path).map_err(pin_err(&path, "unpin stale link"))?;
        }
    }
    let current = maps_dir(pin_dir);
    for entry in fs::read_dir(pin_dir).map_err(pin_err(pin_dir, "read_dir"))?.flatten() {
        let path = entry.path();
        let is_version_dir = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with('v') && n[1..].bytes().all(|b| b.is_ascii_digit()));
        if is_version_dir && path != current {
            tracing::info!(dir = %path.display(), "removing maps of an old ABI version");
            remove_dir_files(&path)?;
        }
    }
    Ok(())
}

fn remove_dir_files(dir: &Path) -> Result<(), KernelError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                fs::remove_file(&path).map_err(pin_err(&path, "unpin"))?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(pin_err(dir, "read_dir")(e)),
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(pin_err(dir, "rmdir")(e)),
    }
}

/// Uninstalls: unpins every link (which detaches it, since the daemon holds
/// no link fds) and every map under `pin_dir`, then removes the directory.
/// Missing pins are not an error; a `pin_dir` that is not a directory on
/// bpffs is refused untouched (see [`PinnedState`]).
pub fn detach_and_unpin(pin_dir: &Path) -> Result<(), KernelError> {
    match PinnedState::survey(pin_dir)? {
        Some(state) => state.remove(|_| {}),
        None => Ok(()),
    }
}

impl Enforcer {
    /// Creates (or adopts) the agents cgroup, loads the programs with the
    /// configured ports and the host network namespace, attaches them to the
    /// cgroup and pins links and maps under `config.pin_dir`. If a previous
    /// daemon left pinned state there, it is taken over in place (see the
    /// module docs). Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    pub fn install(config: &KernelConfig) -> Result<Self, KernelError> {
        check_config(config)?;
        // Pin dir first: a wrong one must fail before any cgroup is made.
        prepare_pin_dir(&config.pin_dir)?;
        let mount = cgroup2_mount()?;
        let agents = Cgroup::agents(&mount, &config.cgroup)?;
        let host_netns = sys::current_netns_cookie().map_err(KernelError::NetnsCookie)?;

        let maps = maps_dir(&config.pin_dir);
        let socks_pin = maps.join(abi::MAP_SOCKS);
        let conns_pin = maps.join(abi::MAP_CONNS);
        let udp_pin = maps.join(abi::MAP_UDP_SRCS);
        let quota_pin = maps.join(abi::MAP_QUOTA);
        let stats_pin = maps.join(abi::MAP_STATS);
        let stopped_pin = maps.join(abi::MAP_STOPPED);
        let mut ebpf = EbpfLoader::new()
            .override_global(abi::GLOBAL_PROXY_PORT, &config.proxy_port, true)
            .override_global(abi::GLOBAL_DNS_PORT, &config.dns_port, true)
            .override_global(abi::GLOBAL_HOST_NETNS, &host_netns, true)
            .override_global(abi::GLOBAL_TCP_QUOTA, &config.max_tcp_sockets, true)
            .map_pin_path(abi::MAP_SOCKS, socks_pin.as_path())
            .map_pin_path(abi::MAP_CONNS, conns_pin.as_path())
            .map_pin_path(abi::MAP_UDP_SRCS, udp_pin.as_path())
            .map_pin_path(abi::MAP_QUOTA, quota_pin.as_path())
            .map_pin_path(abi::MAP_STATS, stats_pin.as_path())
            .map_pin_path(abi::MAP_STOPPED, stopped_pin.as_path())
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;

        let cgroup_file = File::open(agents.path()).map_err(|source| KernelError::Cgroup {
            path: agents.path().to_owned(),
            op: "open",
            source,
        })?;
        let links = links_dir(&config.pin_dir);
        let mut actions = Vec::with_capacity(PROGRAMS.len());
        for spec in PROGRAMS {
            let action = install_program(&mut ebpf, spec, &agents, &cgroup_file, &links)?;
            tracing::debug!(program = spec.name, ?action, "eBPF program installed");
            actions.push((spec.name, action));
        }
        // Unix sockets: attached where the kernel has the hooks; the daemon decides whether
        // sandboxes may be created without them (`unix::sandbox_gate`).
        // A kernel that has the hooks but refuses the programs (a helper or kfunc it lacks) counts
        // as lacking them: the daemon still starts, and refuses sandboxes unless told otherwise.
        let mut unix_status = unix::probe();
        let unix = match &unix_status {
            UnixStatus::Enforced(hooks) => match UnixFilter::install(*hooks, &links, &maps, &agents, &cgroup_file) {
                Ok(filter) => {
                    actions.extend_from_slice(filter.link_actions());
                    Some(Arc::new(filter))
                }
                Err(e) => {
                    unix_status = UnixStatus::Missing(format!("the kernel refused the Unix socket filter: {e}"));
                    None
                }
            },
            UnixStatus::Missing(_) => None,
        };
        if let UnixStatus::Missing(why) = &unix_status {
            tracing::error!(reason = %why, "Unix sockets cannot be confined on this kernel");
        }
        remove_stale(&config.pin_dir)?;

        let conntable = Conntable::from_pin(&conns_pin)
            .map_err(pin_err(&conns_pin, "open map"))?
            .with_udp_sources(sys::obj_get(&udp_pin).map_err(pin_err(&udp_pin, "open map"))?)
            .with_ports(config.proxy_port, config.dns_port)
            .with_quota_and_stats(
                sys::obj_get(&quota_pin).map_err(pin_err(&quota_pin, "open map"))?,
                sys::obj_get(&stats_pin).map_err(pin_err(&stats_pin, "open map"))?,
            );
        let stops = Arc::new(StopMap::from_pin(&stopped_pin).map_err(pin_err(&stopped_pin, "open map"))?);
        // Counters of sandboxes that ended while no daemon ran.
        match conntable.forget_dead_sandboxes(agents.path()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "slot counters of ended sandboxes removed"),
            Err(error) => tracing::warn!(%error, "cannot remove the slot counters of ended sandboxes"),
        }
        tracing::info!(
            cgroup = %agents.path().display(),
            pin_dir = %config.pin_dir.display(),
            proxy_port = config.proxy_port,
            dns_port = config.dns_port,
            max_tcp_sockets = config.max_tcp_sockets,
            "kernel redirect installed"
        );
        Ok(Self {
            config: config.clone(),
            agents,
            conntable: Arc::new(conntable),
            stops,
            host_netns,
            actions,
            unix_status,
            unix,
            _ebpf: ebpf,
        })
    }

    /// The connection table, for the proxy (and the resolver's TCP side).
    pub fn conntable(&self) -> Arc<Conntable> {
        Arc::clone(&self.conntable)
    }

    /// The emergency-stop map (pinned; it kept what the last daemon wrote).
    pub fn stops(&self) -> Arc<StopMap> {
        Arc::clone(&self.stops)
    }

    /// The cgroup the programs are attached to; sandboxes are its children.
    pub fn agents_cgroup(&self) -> &Cgroup {
        &self.agents
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// The network namespace the programs accept sockets from.
    pub fn host_netns_cookie(&self) -> u64 {
        self.host_netns
    }

    /// Whether the Unix socket filter runs (see `unix.rs`).
    pub fn unix_status(&self) -> &UnixStatus {
        &self.unix_status
    }

    /// The Unix socket filter's maps, where the kernel has the hooks.
    pub fn unix(&self) -> Option<Arc<UnixFilter>> {
        self.unix.clone()
    }

    /// What happened to each program's link during [`Enforcer::install`].
    pub fn link_actions(&self) -> &[(&'static str, LinkAction)] {
        &self.actions
    }

    /// The pinned links as the kernel reports them now.
    pub fn pinned_links(&self) -> Result<Vec<PinnedLinkInfo>, KernelError> {
        pinned_links(&self.config.pin_dir)
    }

    /// Startup self-check of the egress backstop as loaded in the kernel
    /// (`BPF_PROG_TEST_RUN`): packets to 127.0.0.0/8 and ::1 pass, packets
    /// anywhere else are dropped. The daemon should refuse to start if this
    /// fails.
    pub fn check_egress_backstop(&self) -> Result<(), KernelError> {
        const NAME: &str = "sl_egress";
        let prog = self._ebpf.program(NAME).ok_or(KernelError::MissingProgram { program: NAME })?;
        let fd = prog.fd().map_err(prog_err(NAME, "program fd"))?;
        for (packet, want, what) in egress_probes() {
            let got = sys::prog_test_run(fd.as_fd(), &packet).map_err(|e| KernelError::Program {
                program: NAME,
                op: "BPF_PROG_TEST_RUN",
                source: Box::new(e),
            })?;
            if got != want {
                return Err(KernelError::Program {
                    program: NAME,
                    op: "egress self-check",
                    source: format!("packet {what}: verdict {got}, expected {want}").into(),
                });
            }
        }
        Ok(())
    }

    /// Uninstalls (see [`detach_and_unpin`]). The agents cgroup is left in
    /// place: it may hold running agents.
    pub fn detach_and_unpin(self) -> Result<(), KernelError> {
        let pin_dir = self.config.pin_dir.clone();
        drop(self);
        detach_and_unpin(&pin_dir)
    }
}

/// The links pinned under `pin_dir`, as the kernel reports them.
pub fn pinned_links(pin_dir: &Path) -> Result<Vec<PinnedLinkInfo>, KernelError> {
    let mut out = Vec::new();
    for name in program_names() {
        let pin = links_dir(pin_dir).join(name);
        if !pin.exists() {
            continue;
        }
        let fd = sys::obj_get(&pin).map_err(pin_err(&pin, "open"))?;
        let info = sys::link_info(fd.as_fd()).map_err(pin_err(&pin, "link info"))?;
        out.push(PinnedLinkInfo {
            program: name.to_owned(),
            link_id: info.id,
            prog_id: info.prog_id,
            cgroup_id: info.cgroup_id,
        });
    }
    Ok(out)
}

/// Ethernet frames (as `BPF_PROG_TEST_RUN` wants them) with the verdict the
/// egress program must give: 1 = pass, 0 = drop.
fn egress_probes() -> Vec<(Vec<u8>, u32, &'static str)> {
    fn v4(dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[127, 0, 0, 1]);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]); // UDP
        f
    }
    fn v6(dst: Ipv6Addr) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
        f.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
        f
    }
    vec![
        (v4([127, 0, 0, 1]), 1, "to 127.0.0.1"),
        (v4([127, 1, 2, 3]), 1, "to 127.1.2.3"),
        (v4([192, 0, 2, 1]), 0, "to 192.0.2.1"),
        (v4([10, 0, 0, 1]), 0, "to 10.0.0.1"),
        (v6(Ipv6Addr::LOCALHOST), 1, "to ::1"),
        (v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), 0, "to 2001:db8::1"),
        (v6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()), 0, "to ::ffff:192.0.2.1"),
        (v6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), 0, "to ::ffff:127.0.0.1 (never on the wire)"),
    ]
}

/// Every program's name (also its link pin's): the redirect's, then the Unix filter's.
fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|s| s.name).chain(unix::PROGRAM_NAMES)
}

/// Number of programs attached (one pinned link each) on a kernel with the Unix socket hooks
/// (Linux >= 6.7); two fewer without them.
pub const PROGRAM_COUNT: usize = PROGRAMS.len() + unix::PROGRAM_NAMES.len();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        let ok = KernelConfig::default();
        check_config(&ok).unwrap();
        for bad in [
            KernelConfig { proxy_port: 0, ..ok.clone() },
            KernelConfig { dns_port: 0, ..ok.clone() },
            KernelConfig { dns_port: ok.proxy_port, ..ok.clone() },
            KernelConfig { pin_dir: "relative/pins".into(), ..ok.clone() },
            KernelConfig { max_tcp_sockets: 0, ..ok.clone() },
            KernelConfig { max_tcp_sockets: abi::CONNTABLE_ENTRIES / 4 + 1, ..ok.clone() },
        ] {
            assert!(check_config(&bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The build embedded an object with BTF (`-g`, needed for socket
    /// storage) and every program the loader attaches.
    #[test]
    fn embedded_object_has_btf_and_every_program() {
        let has = |needle: &[u8]| OBJECT.windows(needle.len()).any(|w| w == needle);
        assert!(OBJECT.starts_with(b"\x7fELF"), "not an ELF object");
        assert!(has(b".BTF\0"), "object built without BTF (-g)");
        for spec in PROGRAMS {
            assert!(has(spec.name.as_bytes()), "{} missing from the object", spec.name);
        }
    }
}
