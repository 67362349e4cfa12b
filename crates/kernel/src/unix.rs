//! Unix-domain sockets: which named Unix sockets an agent may reach (`ebpf/unix.bpf.c`).
//!
//! A sandboxed process may `connect(2)` (stream, seqpacket, datagram) or `sendto(2)` a datagram
//! only to
//!
//! * an address the operator lists (`[sandbox] unix_allow`), compared exactly: a path, or an
//!   abstract name written `@name`. There are no prefixes or patterns: a directory prefix would
//!   also admit every symbolic link, hard link or bind mount someone places below it;
//! * a path inside the sandbox's **own directory**, `<unix_dir>/<sandbox id>/`, made by the
//!   daemon for that sandbox, owned by the agent's user, which `sluice run` names in `TMPDIR` and
//!   `XDG_RUNTIME_DIR`. Sockets an agent creates there are the ones it may reach by name.
//!
//! Everything else, abstract names included, fails with `EPERM`. `socketpair(2)` and sockets
//! already connected before the agent started never pass through the hooks (nothing is looked up
//! by name).
//!
//! # Why the own directory is sound
//!
//! The kernel has no hook for `bind(2)` on Unix sockets, so "sockets the agent created" cannot
//! be tracked socket by socket. Instead the programs compare the *raw* address the agent passes,
//! before the kernel resolves it, with the directory's path. A raw comparison alone would be
//! unsound: the agent can write into its own directory, and
//!
//! * a symbolic link there (`own/x -> /run/docker.sock`) would be followed by the kernel;
//! * a hard link there to a socket elsewhere would reach that socket;
//! * `own/../../run/docker.sock` starts with the right prefix.
//!
//! So the directories live under `unix_dir`, which must be a **mount of its own with
//! `nosymfollow`** (the daemon mounts a `tmpfs` there if it may, and checks it otherwise): the
//! kernel never follows a symbolic link that lives on that mount, and `link(2)` across mounts
//! fails with `EXDEV`. Each sandbox's directory is, where the daemon may mount, a `tmpfs` of its
//! own too, so a socket of another sandbox cannot be hard-linked in either. The programs refuse
//! any path with a `.` or `..` component, and a relative path never matches (the directory is
//! absolute). `unix_dir` must be owned by root and writable
//! by root only, so no agent can make another sandbox's directory.
//!
//! # Why user namespaces matter
//!
//! An agent that may mount could still bind a host socket over a path in its directory, or over a
//! listed path, and the raw path would match. Without privileges it may mount only in a user
//! namespace where it holds `CAP_SYS_ADMIN`, which means one it created (`unshare -Urm`). So the
//! programs allow names only to tasks in one of two user namespaces, compared by nsfs inode
//! number (`task->cred->user_ns->ns.inum`):
//!
//! * the daemon's (`sl_unix_config`): root's `sluice run` agents, bound sandboxes;
//! * the one registered for the calling task's sandbox cgroup (`sl_unix_userns`, cgroup id to
//!   inode): the user namespace a non-root `sluice run` makes for its agent.
//!
//! From any other user namespace every name is refused (`socketpair` still works).
//!
//! Registering `sluice run`'s namespace is safe because nobody in it can mount: it maps only the
//! caller's uid to itself, so the agent (that uid, not 0, after `exec`, under `no_new_privs` so
//! no file capability or set-uid bit applies) holds no capability there. The only holders are
//! `sluice run` itself and its PID 1, both sluice code, both non-dumpable, and `sluice run` is
//! outside the agent's PID namespace. A namespace the agent makes is nested below the
//! registered one: another inode, refused, although the agent may mount there. A process in the
//! registered namespace cannot enter that nested namespace's mount namespace (`setns` needs
//! `CAP_SYS_ADMIN` in its own namespace too), and mounts made there do not propagate back.
//!
//! Registration is exact and happens before anything runs in the sandbox: `sluice run` makes
//! its user namespace first (single-threaded, before any API call); at `POST /v1/sandboxes` the
//! daemon reads `/proc/PID/ns/user` of the caller (pid from `SO_PEERCRED`, checked to be the same
//! process by its start time before and after), accepts it only if it is a direct child of the
//! daemon's namespace owned by the caller's uid (`NS_GET_PARENT`, `NS_GET_OWNER_UID`, see
//! `userns.rs`) whose `uid_map` maps only that uid, not 0, to itself (the shape `sluice run`
//! makes; a caller that is root inside its namespace, as after `unshare -r` or in a rootless
//! container, would start agents that keep their capabilities), writes the map entry, and only
//! then moves the caller into the cgroup. The entry
//! goes with the sandbox. Its inode cannot be reused meanwhile: every process in the cgroup is in
//! that namespace or below it, which keeps it alive. Reading another user's `/proc/PID/ns/user`
//! needs `CAP_SYS_PTRACE`; a daemon without it registers nothing (logged), and such agents reach
//! no Unix socket by name (fail closed). A caller that is in another namespace (nested deeper,
//! or someone else's) gets no registration either. A non-root caller that crafted its own
//! namespace, with capabilities in it, gains nothing it does not have already: it is the same
//! user, outside any sandbox.
//!
//! # Kernel support and loading
//!
//! The hooks (`BPF_CGROUP_UNIX_CONNECT`, `BPF_CGROUP_UNIX_SENDMSG`) exist from Linux 6.7 on;
//! [`probe`] reads their numbers from the running kernel's BTF. aya 0.14 can neither parse these
//! section names nor resolve the kfuncs that read the address (`bpf_cast_to_kern_ctx`,
//! `bpf_rdonly_cast`), so the object is loaded with libbpf (linked statically, see `build.rs`)
//! and attached with a raw `BPF_LINK_CREATE`. Links and maps are pinned in the same layout and
//! with the same lifecycle as the other programs (`loader.rs`): a killed daemon leaves the
//! programs attached and refusing, a restart swaps programs inside the pinned links
//! (`BPF_LINK_UPDATE`), `sluice detach` removes them.

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::cgroup::Cgroup;
use super::loader::{self, pin_err, prog_err, LinkAction};
use super::{sys, KernelError};

/// The compiled object (built by `crates/kernel/build.rs` from `ebpf/unix.bpf.c`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/unix.bpf.o"));

/// `SLUICE_UNIX_PATH_MAX` in `ebpf/unix.h`: the size of `sun_path`.
pub const PATH_MAX: usize = 108;
/// `sizeof(struct sluice_unix_addr)`.
const ADDR_SIZE: usize = 112;
/// `SLUICE_UNIX_ALLOW_ENTRIES`: the most `unix_allow` entries.
pub const ALLOW_ENTRIES: usize = 1024;
/// `SLUICE_UNIX_DIRS_ENTRIES`: the most sandboxes with an own directory at once.
pub const DIRS_ENTRIES: usize = 16384;
/// The longest `unix_dir`: a sandbox's directory (`<unix_dir>/run-<16 hex>/`) must leave room
/// for socket names in the 108 bytes of `sun_path`.
pub const UNIX_DIR_MAX: usize = 48;

/// The programs, by name: also the names of their link pins under `<pin_dir>/links/`.
pub const PROGRAM_NAMES: [&str; 2] = [CONNECT, SENDMSG];
const CONNECT: &str = "sl_connect_unix";
const SENDMSG: &str = "sl_sendmsg_unix";

const MAP_ALLOW: &str = "sl_unix_allow";
const MAP_DIRS: &str = "sl_unix_dirs";
const MAP_REFUSED: &str = "sl_unix_refused";
const MAP_CONFIG: &str = "sl_unix_config";
const MAP_USERNS: &str = "sl_unix_userns";

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;

/// The pinned maps and the shape a pin must have to be reused (else it is replaced).
const PINNED_MAPS: [(&str, sys::MapInfo); 4] = [
    (
        MAP_ALLOW,
        sys::MapInfo {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: ADDR_SIZE as u32,
            value_size: 1,
            max_entries: ALLOW_ENTRIES as u32,
        },
    ),
    (
        MAP_DIRS,
        sys::MapInfo {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 8,
            value_size: ADDR_SIZE as u32,
            max_entries: DIRS_ENTRIES as u32,
        },
    ),
    (
        MAP_USERNS,
        sys::MapInfo { map_type: BPF_MAP_TYPE_HASH, key_size: 8, value_size: 4, max_entries: DIRS_ENTRIES as u32 },
    ),
    (MAP_REFUSED, sys::MapInfo { map_type: BPF_MAP_TYPE_PERCPU_ARRAY, key_size: 4, value_size: 8, max_entries: 2 }),
];

// ---------------------------------------------------------------------------------------------
// Addresses

/// A Unix socket address in the canonical form the programs compare (`struct sluice_unix_addr`):
/// a path is its bytes (no NUL), an abstract name is a NUL followed by the name's bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UnixAddr {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for UnixAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UnixAddr({})", self)
    }
}

impl std::fmt::Display for UnixAddr {
    /// The `unix_allow` spelling: `/path` or `@name`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.bytes.split_first() {
            Some((0, name)) => write!(f, "@{}", String::from_utf8_lossy(name)),
            _ => write!(f, "{}", String::from_utf8_lossy(&self.bytes)),
        }
    }
}

impl UnixAddr {
    /// Parses a `unix_allow` entry: an absolute path in plain form (no `.`, `..`, `//`, trailing
    /// `/` or NUL), or `@name` for the abstract name `name` (not empty, no NUL). Both compare
    /// exactly; there is no prefix or pattern syntax. The error says what is wrong.
    pub fn parse(entry: &str) -> Result<UnixAddr, String> {
        if let Some(name) = entry.strip_prefix('@') {
            if name.is_empty() {
                return Err("an abstract name after `@` must not be empty".into());
            }
            if name.contains('\0') {
                return Err("must not contain a NUL byte".into());
            }
            let mut bytes = Vec::with_capacity(name.len() + 1);
            bytes.push(0);
            bytes.extend_from_slice(name.as_bytes());
            if bytes.len() > PATH_MAX {
                return Err(format!("an abstract name has at most {} bytes", PATH_MAX - 1));
            }
            return Ok(UnixAddr { bytes });
        }
        Self::path(Path::new(entry))
    }

    /// A socket path: absolute and plain (see [`UnixAddr::parse`]), at most 108 bytes.
    pub fn path(path: &Path) -> Result<UnixAddr, String> {
        let bytes = path.as_os_str().as_bytes();
        check_plain_absolute(path)?;
        if bytes.ends_with(b"/") {
            return Err("names a directory (ends in `/`); list the socket's path".into());
        }
        if bytes.len() > PATH_MAX {
            return Err(format!("is {} bytes long; a Unix socket path has at most {PATH_MAX}", bytes.len()));
        }
        Ok(UnixAddr { bytes: bytes.to_vec() })
    }

    /// The directory prefix of a sandbox's own directory: its path with a final `/`.
    fn dir(path: &Path) -> Result<UnixAddr, String> {
        check_plain_absolute(path)?;
        let mut bytes = path.as_os_str().as_bytes().to_vec();
        if !bytes.ends_with(b"/") {
            bytes.push(b'/');
        }
        // Leave room for a socket name.
        if bytes.len() > PATH_MAX - 16 {
            return Err(format!("is {} bytes long; leave at least 16 of the {PATH_MAX} bytes for names", bytes.len()));
        }
        Ok(UnixAddr { bytes })
    }

    /// `struct sluice_unix_addr`: `len` (native endian), the bytes, zero padding.
    fn to_key(&self) -> [u8; ADDR_SIZE] {
        let mut out = [0u8; ADDR_SIZE];
        let len = self.bytes.len().min(PATH_MAX);
        out[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        if let (Some(dst), Some(src)) = (out.get_mut(4..4 + len), self.bytes.get(..len)) {
            dst.copy_from_slice(src);
        }
        out
    }

    fn from_key(key: &[u8; ADDR_SIZE]) -> UnixAddr {
        let len = u32::from_ne_bytes([key[0], key[1], key[2], key[3]]) as usize;
        let bytes = key.get(4..4 + len.min(PATH_MAX)).unwrap_or_default().to_vec();
        UnixAddr { bytes }
    }
}

/// Absolute, only normal components, no `//`, no NUL.
fn check_plain_absolute(path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    if !path.is_absolute() {
        return Err("must be an absolute path (or `@name` for an abstract socket)".into());
    }
    if bytes.contains(&0) {
        return Err("must not contain a NUL byte".into());
    }
    let trimmed = bytes.strip_suffix(b"/").unwrap_or(bytes);
    let plain = !trimmed.windows(2).any(|w| w == b"//")
        && !trimmed.split(|b| *b == b'/').any(|c| c == b"." || c == b"..")
        && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain {
        return Err("must be a plain path: no `.` or `..` components and no `//`".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kernel support and the decision to create sandboxes

/// The hooks' attach types (`enum bpf_attach_type`) as the running kernel numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub connect: u32,
    pub sendmsg: u32,
}

/// Whether the Unix socket filter runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixStatus {
    /// Attached to the agents' cgroup.
    Enforced(Hooks),
    /// The kernel lacks the hooks (before Linux 6.7, or without BTF); the reason says which.
    Missing(String),
}

/// What the operator asked for (`[sandbox] unix_sockets`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixMode {
    /// Sandboxes are created only while the filter runs (the default).
    Enforced,
    /// Sandboxes are created even where the kernel cannot filter Unix sockets: agents can then
    /// reach every Unix socket their user may.
    Unenforced,
}

/// Whether sandboxes may be created: `Ok(None)` yes, `Ok(Some(warning))` yes but agents can
/// reach any Unix socket (say it loudly), `Err(why)` no. Pure, so the decision is tested
/// without an old kernel.
pub fn sandbox_gate(mode: UnixMode, status: &UnixStatus) -> Result<Option<String>, String> {
    match (status, mode) {
        (UnixStatus::Enforced(_), _) => Ok(None),
        (UnixStatus::Missing(why), UnixMode::Unenforced) => Ok(Some(format!(
            "Unix sockets are NOT confined ([sandbox] unix_sockets = \"unenforced\"): {why}; agents can connect \
             to every Unix socket their user may (container engines, SSH agents, system buses)"
        ))),
        (UnixStatus::Missing(why), UnixMode::Enforced) => Err(format!(
            "this kernel cannot confine agents' Unix sockets ({why}); sandboxes are refused. Run Linux >= 6.7 \
             with BTF, or accept the risk with [sandbox] unix_sockets = \"unenforced\""
        )),
    }
}

/// Reads the hooks' numbers from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
pub fn probe() -> UnixStatus {
    match probe_btf() {
        Ok(Some(h)) => UnixStatus::Enforced(h),
        Ok(None) => UnixStatus::Missing(
            "the kernel has no cgroup/connect_unix and cgroup/sendmsg_unix hooks (Linux >= 6.7)".into(),
        ),
        Err(e) => UnixStatus::Missing(format!("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux): {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// libbpf

#[repr(C)]
struct BpfObject {
    _p: [u8; 0],
}
#[repr(C)]
struct BpfProgram {
    _p: [u8; 0],
}
#[repr(C)]
struct BpfMap {
    _p: [u8; 0],
}
#[repr(C)]
struct Btf {
    _p: [u8; 0],
}
/// `struct btf_type`: name_off, info, size/type; followed by `vlen` `struct btf_enum`.
#[repr(C)]
struct BtfType {
    name_off: u32,
    info: u32,
    size: u32,
}
#[repr(C)]
struct BtfEnum {
    name_off: u32,
    val: i32,
}
const BTF_KIND_ENUM: u32 = 6;

#[link(name = "bpf", kind = "static")]
extern "C" {
    fn bpf_object__open_mem(obj_buf: *const c_void, obj_buf_sz: usize, opts: *const c_void) -> *mut BpfObject;
    fn bpf_object__find_program_by_name(obj: *const BpfObject, name: *const c_char) -> *mut BpfProgram;
    fn bpf_object__find_map_by_name(obj: *const BpfObject, name: *const c_char) -> *mut BpfMap;
    fn bpf_program__set_type(prog: *mut BpfProgram, prog_type: u32) -> c_int;
    fn bpf_program__set_expected_attach_type(prog: *mut BpfProgram, attach_type: u32) -> c_int;
    fn bpf_map__set_pin_path(map: *mut BpfMap, path: *const c_char) -> c_int;
    fn bpf_object__load(obj: *mut BpfObject) -> c_int;
    fn bpf_program__fd(prog: *const BpfProgram) -> c_int;
    fn bpf_map__fd(map: *const BpfMap) -> c_int;
    fn bpf_object__close(obj: *mut BpfObject);
    fn btf__load_vmlinux_btf() -> *mut Btf;
    fn btf__free(btf: *mut Btf);
    fn btf__find_by_name_kind(btf: *const Btf, name: *const c_char, kind: u32) -> i32;
    fn btf__type_by_id(btf: *const Btf, id: u32) -> *const BtfType;
    fn btf__name_by_offset(btf: *const Btf, offset: u32) -> *const c_char;
    fn libbpf_strerror(err: c_int, buf: *mut c_char, size: usize) -> c_int;
}

fn libbpf_error(ret: c_int) -> io::Error {
    let code = ret.checked_neg().unwrap_or(libc::EINVAL);
    if code > 4000 {
        // libbpf's own codes (LIBBPF_ERRNO__*), which io::Error would not name.
        let mut buf = [0 as c_char; 128];
        // SAFETY: buf is valid for writes of its length; libbpf NUL-terminates.
        unsafe { libbpf_strerror(ret, buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by libbpf_strerror (the buffer was zeroed).
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        return io::Error::other(text);
    }
    io::Error::from_raw_os_error(code)
}

/// The vmlinux BTF, freed on drop.
struct VmlinuxBtf(*mut Btf);

impl Drop for VmlinuxBtf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from btf__load_vmlinux_btf and is freed once.
        unsafe { btf__free(self.0) }
    }
}

fn probe_btf() -> io::Result<Option<Hooks>> {
    // SAFETY: no arguments; NULL (errno set) on failure.
    let btf = unsafe { btf__load_vmlinux_btf() };
    if btf.is_null() {
        return Err(io::Error::last_os_error());
    }
    let btf = VmlinuxBtf(btf);
    let name = c"bpf_attach_type";
    // SAFETY: btf is valid; name is NUL-terminated.
    let id = unsafe { btf__find_by_name_kind(btf.0, name.as_ptr(), BTF_KIND_ENUM) };
    let Ok(id) = u32::try_from(id) else { return Ok(None) };
    // SAFETY: id was returned by this btf.
    let ty = unsafe { btf__type_by_id(btf.0, id) };
    if ty.is_null() {
        return Ok(None);
    }
    // SAFETY: ty points at a btf_type inside btf's data, valid while btf lives.
    let info = unsafe { (*ty).info };
    if (info >> 24) & 0x1f != BTF_KIND_ENUM {
        return Ok(None);
    }
    let vlen = (info & 0xffff) as usize;
    // SAFETY: an ENUM btf_type is followed by vlen btf_enum entries in the same buffer.
    let members = unsafe { std::slice::from_raw_parts(ty.add(1).cast::<BtfEnum>(), vlen) };
    let (mut connect, mut sendmsg) = (None, None);
    for m in members {
        // SAFETY: name_off comes from this btf; the result is NUL-terminated or NULL.
        let n = unsafe { btf__name_by_offset(btf.0, m.name_off) };
        if n.is_null() {
            continue;
        }
        // SAFETY: checked non-NULL, NUL-terminated string in btf's string section.
        match unsafe { CStr::from_ptr(n) }.to_bytes() {
            b"BPF_CGROUP_UNIX_CONNECT" => connect = u32::try_from(m.val).ok(),
            b"BPF_CGROUP_UNIX_SENDMSG" => sendmsg = u32::try_from(m.val).ok(),
            _ => {}
        }
    }
    Ok(connect.zip(sendmsg).map(|(connect, sendmsg)| Hooks { connect, sendmsg }))
}

/// An open libbpf object, closed on drop (which also closes its program and map fds: the
/// pinned links and maps keep what is attached alive).
struct Object(*mut BpfObject);

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: the pointer came from bpf_object__open_mem and is closed once.
        unsafe { bpf_object__close(self.0) }
    }
}

fn cstring(s: &str) -> CString {
    // Names are constants without NUL.
    CString::new(s).unwrap_or_default()
}

fn path_cstring(p: &Path) -> Result<CString, KernelError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| KernelError::Pin {
        path: p.to_owned(),
        op: "pin path",
        source: io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"),
    })
}

impl Object {
    fn open() -> Result<Object, KernelError> {
        // SAFETY: OBJECT is a valid buffer of its length, alive for the program's life; opts NULL.
        let obj = unsafe { bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len(), std::ptr::null()) };
        if obj.is_null() {
            return Err(prog_err(CONNECT, "open the object (libbpf)")(io::Error::last_os_error()));
        }
        Ok(Object(obj))
    }

    fn program(&self, name: &'static str) -> Result<*mut BpfProgram, KernelError> {
        let c = cstring(name);
        // SAFETY: self.0 is an open object; c is NUL-terminated.
        let p = unsafe { bpf_object__find_program_by_name(self.0, c.as_ptr()) };
        if p.is_null() {
            return Err(KernelError::MissingProgram { program: name });
        }
        Ok(p)
    }

    fn map(&self, name: &'static str) -> Result<*mut BpfMap, KernelError> {
        let c = cstring(name);
        // SAFETY: self.0 is an open object; c is NUL-terminated.
        let m = unsafe { bpf_object__find_map_by_name(self.0, c.as_ptr()) };
        if m.is_null() {
            return Err(KernelError::MissingMap { map: name });
        }
        Ok(m)
    }

    /// A program's fd, borrowed from the object.
    fn program_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>, KernelError> {
        let p = self.program(name)?;
        // SAFETY: p belongs to this loaded object.
        let fd = unsafe { bpf_program__fd(p) };
        if fd < 0 {
            return Err(prog_err(name, "program fd")(libbpf_error(fd)));
        }
        // SAFETY: the object owns fd and outlives the borrow.
        Ok(unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// A map's fd, duplicated so it outlives the object.
    fn map_fd(&self, name: &'static str) -> Result<OwnedFd, KernelError> {
        let m = self.map(name)?;
        // SAFETY: m belongs to this loaded object.
        let fd = unsafe { bpf_map__fd(m) };
        if fd < 0 {
            return Err(KernelError::MissingMap { map: name });
        }
        // SAFETY: the object owns fd while we duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        borrowed.try_clone_to_owned().map_err(prog_err(CONNECT, "dup map fd"))
    }
}

// ---------------------------------------------------------------------------------------------
// The filter

/// The attached Unix socket filter: its maps, for the daemon to fill.
#[derive(Debug)]
pub struct UnixFilter {
    hooks: Hooks,
    allow: OwnedFd,
    dirs: OwnedFd,
    userns: OwnedFd,
    refused: OwnedFd,
    actions: Vec<(&'static str, LinkAction)>,
}

/// Removes a pinned map that does not have the shape this version defines (libbpf would refuse
/// to reuse it): the maps hold only what the daemon writes again at start.
fn drop_incompatible_pin(pin: &Path, want: sys::MapInfo) -> Result<(), KernelError> {
    if !pin.exists() {
        return Ok(());
    }
    let fits = sys::obj_get(pin).and_then(|fd| sys::map_info(fd.as_fd())).is_ok_and(|info| info == want);
    if !fits {
        tracing::info!(pin = %pin.display(), "pinned map has another layout; replacing it");
        fs::remove_file(pin).map_err(pin_err(pin, "unpin stale map"))?;
    }
    Ok(())
}

impl UnixFilter {
    /// Loads `ebpf/unix.bpf.c`, pins its maps under `maps_dir` (reusing pins of the same
    /// layout) and attaches both programs to `cgroup` as links pinned under `links_dir`, taking
    /// over pinned links of a previous daemon in place (see `loader.rs`). `hooks` from [`probe`].
    pub fn install(
        hooks: Hooks,
        links_dir: &Path,
        maps_dir: &Path,
        cgroup: &Cgroup,
        cgroup_file: &File,
    ) -> Result<UnixFilter, KernelError> {
        let obj = Object::open()?;
        for (name, attach) in [(CONNECT, hooks.connect), (SENDMSG, hooks.sendmsg)] {
            let p = obj.program(name)?;
            // SAFETY: p belongs to the open, not yet loaded, object.
            let (a, b) = unsafe {
                (
                    bpf_program__set_type(p, BPF_PROG_TYPE_CGROUP_SOCK_ADDR),
                    bpf_program__set_expected_attach_type(p, attach),
                )
            };
            if a != 0 || b != 0 {
                return Err(prog_err(name, "set program type")(libbpf_error(if a != 0 { a } else { b })));
            }
        }
        for (name, want) in PINNED_MAPS {
            let pin = maps_dir.join(name);
            drop_incompatible_pin(&pin, want)?;
            let c = path_cstring(&pin)?;
            // SAFETY: the map belongs to the open object; libbpf copies the path.
            let ret = unsafe { bpf_map__set_pin_path(obj.map(name)?, c.as_ptr()) };
            if ret != 0 {
                return Err(pin_err(&pin, "set pin path")(libbpf_error(ret)));
            }
        }
        // SAFETY: obj is open; load verifies the programs and creates or reuses the maps.
        let ret = unsafe { bpf_object__load(obj.0) };
        if ret != 0 {
            return Err(prog_err(CONNECT, "load (libbpf, verifier)")(libbpf_error(ret)));
        }
        // The user namespace names may be reached from, written before anything is attached.
        let userns = super::userns::own().map_err(prog_err(CONNECT, "stat /proc/self/ns/user"))?;
        let config = obj.map_fd(MAP_CONFIG)?;
        sys::map_update(config.as_fd(), &0u32.to_ne_bytes(), &userns.to_ne_bytes())
            .map_err(prog_err(CONNECT, "write sl_unix_config"))?;
        let mut actions = Vec::with_capacity(2);
        for (name, attach) in [(CONNECT, hooks.connect), (SENDMSG, hooks.sendmsg)] {
            let prog = obj.program_fd(name)?;
            let action = attach_pinned(name, prog, attach, cgroup, cgroup_file, links_dir)?;
            tracing::debug!(program = name, ?action, "eBPF program installed");
            actions.push((name, action));
        }
        Ok(UnixFilter {
            hooks,
            allow: obj.map_fd(MAP_ALLOW)?,
            dirs: obj.map_fd(MAP_DIRS)?,
            userns: obj.map_fd(MAP_USERNS)?,
            refused: obj.map_fd(MAP_REFUSED)?,
            actions,
        })
    }

    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    /// What happened to each program's link during [`UnixFilter::install`].
    pub fn link_actions(&self) -> &[(&'static str, LinkAction)] {
        &self.actions
    }

    /// Makes the allowed addresses exactly `allowed` (adds the new ones first, then removes
    /// the others, so an address listed before and after is never refused in between).
    pub fn set_allowed(&self, allowed: &[UnixAddr]) -> Result<(), KernelError> {
        if allowed.len() > ALLOW_ENTRIES {
            return Err(KernelError::Config {
                field: "sandbox.unix_allow",
                reason: format!("lists {} addresses; at most {ALLOW_ENTRIES}", allowed.len()),
            });
        }
        let map_err = |op| move |e| KernelError::Program { program: CONNECT, op, source: Box::new(e) };
        for a in allowed {
            sys::map_update(self.allow.as_fd(), &a.to_key(), &[1]).map_err(map_err("add to sl_unix_allow"))?;
        }
        let keep: HashSet<[u8; ADDR_SIZE]> = allowed.iter().map(UnixAddr::to_key).collect();
        for key in self.keys(&self.allow)? {
            if !keep.contains(&key) {
                sys::map_delete(self.allow.as_fd(), &key).map_err(map_err("remove from sl_unix_allow"))?;
            }
        }
        Ok(())
    }

    /// The allowed addresses, as the kernel holds them.
    pub fn allowed(&self) -> Result<Vec<UnixAddr>, KernelError> {
        Ok(self.keys(&self.allow)?.iter().map(UnixAddr::from_key).collect())
    }

    fn keys<const N: usize>(&self, map: &OwnedFd) -> Result<Vec<[u8; N]>, KernelError> {
        let mut out: Vec<[u8; N]> = Vec::new();
        let mut next = [0u8; N];
        // Bounded by the map's size (plus slack for concurrent changes).
        while out.len() <= DIRS_ENTRIES {
            let more = sys::map_next_key(map.as_fd(), out.last().map(|k| &k[..]), &mut next)
                .map_err(prog_err(CONNECT, "iterate map"))?;
            if !more {
                break;
            }
            out.push(next);
        }
        Ok(out)
    }

    /// Lets the sandbox with cgroup id `cgroup_id` reach sockets below `dir` (its own
    /// directory, from [`SandboxDirs::create`]).
    pub fn set_sandbox_dir(&self, cgroup_id: u64, dir: &Path) -> Result<(), KernelError> {
        let prefix = UnixAddr::dir(dir).map_err(|reason| KernelError::Config { field: "sandbox.unix_dir", reason })?;
        sys::map_update(self.dirs.as_fd(), &cgroup_id.to_ne_bytes(), &prefix.to_key())
            .map_err(prog_err(CONNECT, "add to sl_unix_dirs"))
    }

    /// Forgets a sandbox's own directory.
    pub fn remove_sandbox_dir(&self, cgroup_id: u64) -> Result<(), KernelError> {
        sys::map_delete(self.dirs.as_fd(), &cgroup_id.to_ne_bytes())
            .map(|_| ())
            .map_err(prog_err(CONNECT, "remove from sl_unix_dirs"))
    }

    /// The own directory the kernel holds for a sandbox.
    pub fn sandbox_dir(&self, cgroup_id: u64) -> Result<Option<PathBuf>, KernelError> {
        let mut value = [0u8; ADDR_SIZE];
        let found = sys::map_lookup(self.dirs.as_fd(), &cgroup_id.to_ne_bytes(), &mut value)
            .map_err(prog_err(CONNECT, "read sl_unix_dirs"))?;
        Ok(found.then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&UnixAddr::from_key(&value).bytes))))
    }

    /// Forgets the own directories of every cgroup not in `live` (sandboxes that ended while
    /// no daemon ran).
    pub fn retain_sandbox_dirs(&self, live: &HashSet<u64>) -> Result<(), KernelError> {
        for key in self.keys::<8>(&self.dirs)? {
            if !live.contains(&u64::from_ne_bytes(key)) {
                sys::map_delete(self.dirs.as_fd(), &key).map_err(prog_err(CONNECT, "remove from sl_unix_dirs"))?;
            }
        }
        Ok(())
    }

    /// Lets tasks of the sandbox with cgroup id `cgroup_id` that are in the user namespace with
    /// nsfs inode `inode` reach names too (besides those in the daemon's user namespace). Only
    /// for a namespace checked to be a direct child of the daemon's, owned by the sandbox's
    /// caller, made before the caller joined the sandbox (see the module docs).
    pub fn set_sandbox_userns(&self, cgroup_id: u64, inode: u32) -> Result<(), KernelError> {
        if inode == 0 {
            return Err(KernelError::Config { field: "user namespace", reason: "inode 0".into() });
        }
        sys::map_update(self.userns.as_fd(), &cgroup_id.to_ne_bytes(), &inode.to_ne_bytes())
            .map_err(prog_err(CONNECT, "add to sl_unix_userns"))
    }

    /// The user namespace registered for a sandbox.
    pub fn sandbox_userns(&self, cgroup_id: u64) -> Result<Option<u32>, KernelError> {
        let mut value = [0u8; 4];
        let found = sys::map_lookup(self.userns.as_fd(), &cgroup_id.to_ne_bytes(), &mut value)
            .map_err(prog_err(CONNECT, "read sl_unix_userns"))?;
        Ok(found.then(|| u32::from_ne_bytes(value)))
    }

    /// Forgets a sandbox's user namespace.
    pub fn remove_sandbox_userns(&self, cgroup_id: u64) -> Result<(), KernelError> {
        sys::map_delete(self.userns.as_fd(), &cgroup_id.to_ne_bytes())
            .map(|_| ())
            .map_err(prog_err(CONNECT, "remove from sl_unix_userns"))
    }

    /// Forgets the user namespaces of every cgroup not in `live` (sandboxes that ended while no
    /// daemon ran).
    pub fn retain_sandbox_userns(&self, live: &HashSet<u64>) -> Result<(), KernelError> {
        for key in self.keys::<8>(&self.userns)? {
            if !live.contains(&u64::from_ne_bytes(key)) {
                sys::map_delete(self.userns.as_fd(), &key).map_err(prog_err(CONNECT, "remove from sl_unix_userns"))?;
            }
        }
        Ok(())
    }

    /// Refused `(connects, datagram sends)` since the maps were created, summed over CPUs.
    pub fn refused(&self) -> Result<(u64, u64), KernelError> {
        let cpus = sys::possible_cpus().map_err(prog_err(CONNECT, "count possible CPUs"))?;
        let read = |index: u32| {
            sys::percpu_u64_sum(self.refused.as_fd(), &index.to_ne_bytes(), cpus)
                .map(Option::unwrap_or_default)
                .map_err(prog_err(CONNECT, "read sl_unix_refused"))
        };
        Ok((read(0)?, read(1)?))
    }
}

/// Attaches `prog` at `attach` on `cgroup` as a link pinned at `links_dir/name`: the pinned
/// link of a previous daemon is updated in place when it is ours (same cgroup and hook),
/// otherwise a new link is pinned beside it and renamed over it (no gap).
fn attach_pinned(
    name: &'static str,
    prog: BorrowedFd<'_>,
    attach: u32,
    cgroup: &Cgroup,
    cgroup_file: &File,
    links_dir: &Path,
) -> Result<LinkAction, KernelError> {
    let pin = links_dir.join(name);
    let pin_new = |at: &Path| -> Result<(), KernelError> {
        let link = sys::link_create(prog, cgroup_file.as_fd(), attach).map_err(prog_err(name, "BPF_LINK_CREATE"))?;
        sys::obj_pin(link.as_fd(), at).map_err(prog_err(name, "pin link"))
    };
    if !pin.exists() {
        pin_new(&pin)?;
        return Ok(LinkAction::Attached);
    }
    if loader::try_update(&pin, prog, cgroup.id(), attach) {
        return Ok(LinkAction::Updated);
    }
    loader::replace_pin(&pin, name, pin_new)
}

// ---------------------------------------------------------------------------------------------
// Own directories

/// The most entries [`SandboxDirs::remove`] visits in one own directory.
pub const MAX_REMOVE_ENTRIES: usize = 100_000;

/// `ST_NOSYMFOLLOW` in `statvfs.f_flag`.
const ST_NOSYMFOLLOW: u64 = 0x2000;
/// `MS_NOSYMFOLLOW` for mount(2).
const MS_NOSYMFOLLOW: u64 = 256;

/// The sandboxes' own directories: `<root>/<sandbox id>/` on a `nosymfollow` mount (see the
/// module docs for why).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxDirs {
    root: PathBuf,
}

fn dir_err(path: &Path, op: &'static str, what: String) -> KernelError {
    KernelError::Pin { path: path.to_owned(), op, source: io::Error::other(what) }
}

/// `true` when `path` is a directory (not a link) whose device differs from its parent's.
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let meta = fs::symlink_metadata(path)?;
    let parent = path.parent().map(fs::metadata).transpose()?;
    Ok(meta.is_dir() && parent.is_some_and(|p| p.dev() != meta.dev()))
}

/// `true` when `path` is a mount point with `nosymfollow`.
fn is_protected(path: &Path) -> io::Result<bool> {
    Ok(is_mount_point(path)? && statvfs_flags(path)? & ST_NOSYMFOLLOW != 0)
}

/// `nosuid,nodev,noexec,nosymfollow`, for `unix_dir` and the sandboxes' own mounts.
fn protected_flags() -> nix::mount::MsFlags {
    nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC
        | nix::mount::MsFlags::from_bits_retain(MS_NOSYMFOLLOW as libc::c_ulong)
}

fn statvfs_flags(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid initial value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st valid for writes.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_flag as u64)
}

impl SandboxDirs {
    /// Makes sure `root` is fit for own directories: an absolute plain path of at most
    /// [`UNIX_DIR_MAX`] bytes, a mount of its own with `nosymfollow`, owned by root and
    /// writable by root only. If nothing is mounted there, mounts a `tmpfs` (at most 25% of RAM) with
    /// `nosymfollow,nosuid,nodev,noexec` (needs CAP_SYS_ADMIN in the host's mount namespace);
    /// otherwise says how to. Never follows a symbolic link at `root`.
    pub fn prepare(root: &Path) -> Result<SandboxDirs, KernelError> {
        check_plain_absolute(root).map_err(|reason| KernelError::Config { field: "sandbox.unix_dir", reason })?;
        let len = root.as_os_str().len();
        if len > UNIX_DIR_MAX {
            return Err(KernelError::Config {
                field: "sandbox.unix_dir",
                reason: format!("is {len} bytes long; at most {UNIX_DIR_MAX}, so socket paths below it fit in 108"),
            });
        }
        match fs::symlink_metadata(root) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(dir_err(root, "check", "is a symbolic link; name the real directory".into()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().recursive(true).mode(0o755).create(root).map_err(pin_err(root, "mkdir"))?;
            }
            Err(e) => return Err(pin_err(root, "stat")(e)),
        }
        if !is_protected(root).map_err(pin_err(root, "stat"))? {
            nix::mount::mount(
                Some("sluice-sandboxes"),
                root,
                Some("tmpfs"),
                protected_flags(),
                Some("mode=0755,size=25%"),
            )
            .map_err(|e| {
                dir_err(
                    root,
                    "mount tmpfs",
                    format!(
                        "{e}; it must be a mount of its own with nosymfollow. Mount it before the daemon starts: \
                             `mount -t tmpfs -o nosymfollow,nosuid,nodev,noexec,mode=0755 sluice-sandboxes {}`",
                        root.display()
                    ),
                )
            })?;
            if !is_protected(root).map_err(pin_err(root, "stat"))? {
                return Err(dir_err(root, "check", "mounted a tmpfs but it does not show nosymfollow".into()));
            }
        }
        let meta = fs::symlink_metadata(root).map_err(pin_err(root, "stat"))?;
        if meta.uid() != 0 || meta.permissions().mode() & 0o022 != 0 || !meta.is_dir() {
            return Err(dir_err(
                root,
                "check",
                "must be a directory owned by root and writable by root only (agents must not make directories here)"
                    .into(),
            ));
        }
        Ok(SandboxDirs { root: root.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The own directory of sandbox `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates sandbox `id`'s own directory, mode 0700, owned by `uid`:`gid`. `id` must be one
    /// plain name (the daemon's `run-<hex>`). A directory left from before is removed first.
    ///
    /// Where the daemon may mount, the directory is a `tmpfs` of its own (same flags as
    /// `unix_dir`'s), so an agent cannot hard-link a socket of another sandbox of the same user
    /// into its own directory either (`EXDEV`); otherwise it is a plain directory on `unix_dir`.
    pub fn create(&self, id: &str, uid: u32, gid: u32) -> Result<PathBuf, KernelError> {
        if id.is_empty() || id.contains('/') || id == "." || id == ".." || id.contains('\0') {
            return Err(KernelError::Config { field: "sandbox id", reason: format!("{id:?} is not a plain name") });
        }
        let dir = self.dir(id);
        self.remove(id)?;
        fs::DirBuilder::new().mode(0o700).create(&dir).map_err(pin_err(&dir, "mkdir"))?;
        let data = format!("mode=0700,uid={uid},gid={gid},size=25%");
        match nix::mount::mount(Some("sluice-sandbox"), &dir, Some("tmpfs"), protected_flags(), Some(data.as_str())) {
            Ok(()) => {}
            Err(nix::errno::Errno::EPERM) => {
                tracing::debug!(dir = %dir.display(), "cannot mount a tmpfs per sandbox; a plain directory it is");
                std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).map_err(pin_err(&dir, "chown"))?;
            }
            Err(e) => return Err(pin_err(&dir, "mount tmpfs")(io::Error::from(e))),
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(pin_err(&dir, "chmod"))?;
        Ok(dir)
    }

    /// Removes sandbox `id`'s own directory and everything in it, never following a link.
    /// Directories are first given to root (CAP_CHOWN suffices), so a daemon without
    /// CAP_DAC_OVERRIDE can empty a directory its agent made unreadable. At most
    /// [`MAX_REMOVE_ENTRIES`] entries are visited; the rest stays (the mount is bounded).
    pub fn remove(&self, id: &str) -> Result<(), KernelError> {
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            return Ok(());
        }
        let dir = self.dir(id);
        // A tmpfs of its own: unmounting it takes everything in it.
        if is_mount_point(&dir).unwrap_or(false) {
            nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| pin_err(&dir, "umount")(io::Error::from(e)))?;
        }
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return fs::remove_file(&dir).map_err(pin_err(&dir, "remove")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(pin_err(&dir, "stat")(e)),
        }
        let mut stack = vec![dir.clone()];
        let mut visited = 0usize;
        while let Some(d) = stack.pop() {
            // Only directories reach the stack, found with lstat: links are never followed.
            std::os::unix::fs::lchown(&d, Some(0), Some(0)).map_err(pin_err(&d, "chown to root"))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).map_err(pin_err(&d, "chmod"))?;
            for entry in fs::read_dir(&d).map_err(pin_err(&d, "read_dir"))?.flatten() {
                visited += 1;
                if visited > MAX_REMOVE_ENTRIES {
                    return Err(dir_err(
                        &dir,
                        "remove",
                        format!("more than {MAX_REMOVE_ENTRIES} entries; left in place"),
                    ));
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(pin_err(&dir, "remove")(e)),
        }
    }

    /// Unmounts `root` (lazily) if it is a mount, then removes the directory if empty: for
    /// uninstalling and for tests. Not used by the daemon, whose sandboxes outlive it.
    pub fn unmount(root: &Path) -> Result<(), KernelError> {
        if is_protected(root).unwrap_or(false) {
            nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| pin_err(root, "umount")(io::Error::from(e)))?;
        }
        match fs::remove_dir(root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(pin_err(root, "rmdir")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_numbers_match() {
        let h = include_str!("../../../ebpf/unix.h");
        let num = |name: &str| -> usize {
            let line = h.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap();
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert_eq!(num("SLUICE_UNIX_PATH_MAX"), PATH_MAX);
        assert_eq!(num("SLUICE_UNIX_ALLOW_ENTRIES"), ALLOW_ENTRIES);
        assert_eq!(num("SLUICE_UNIX_DIRS_ENTRIES"), DIRS_ENTRIES);
        assert!(h.contains(&format!("sizeof(struct sluice_unix_addr) == {ADDR_SIZE}")));
    }

    #[test]
    fn allow_entries_parse_to_the_kernel_form() {
        let p = UnixAddr::parse("/run/foo.sock").unwrap();
        let key = p.to_key();
        assert_eq!(&key[..4], &13u32.to_ne_bytes());
        assert_eq!(&key[4..17], b"/run/foo.sock");
        assert!(key[17..].iter().all(|b| *b == 0));
        assert_eq!(p.to_string(), "/run/foo.sock");
        assert_eq!(UnixAddr::from_key(&key), p);

        let a = UnixAddr::parse("@my-name").unwrap();
        let key = a.to_key();
        assert_eq!(&key[..4], &8u32.to_ne_bytes());
        assert_eq!(&key[4..12], b"\0my-name");
        assert_eq!(a.to_string(), "@my-name");
        assert_eq!(UnixAddr::from_key(&key), a);
    }

    #[test]
    fn allow_entries_that_could_mean_more_than_one_socket_are_refused() {
        for bad in [
            "",
            "@",
            "relative.sock",
            "./x.sock",
            "/run/../etc/x.sock",
            "/run/./x.sock",
            "/run//x.sock",
            "/run/dir/",
            "/run/x\0y",
            "@a\0b",
        ] {
            assert!(UnixAddr::parse(bad).is_err(), "{bad:?} accepted");
        }
        // There is no pattern syntax: `*` is a legal file name, matched literally.
        assert_eq!(UnixAddr::parse("/run/*").unwrap().to_string(), "/run/*");
        let long = format!("/{}", "a".repeat(PATH_MAX));
        assert!(UnixAddr::parse(&long).is_err());
        assert!(UnixAddr::parse(&format!("@{}", "a".repeat(PATH_MAX))).is_err());
        assert!(UnixAddr::parse(&format!("@{}", "a".repeat(PATH_MAX - 1))).is_ok());
    }

    #[test]
    fn own_directory_prefix_ends_in_a_slash_and_leaves_room() {
        let d = UnixAddr::dir(Path::new("/run/sluice-sandboxes/run-0123456789abcdef")).unwrap();
        assert_eq!(d.to_string(), "/run/sluice-sandboxes/run-0123456789abcdef/");
        assert!(UnixAddr::dir(Path::new("/run/../x")).is_err());
        assert!(UnixAddr::dir(Path::new(&format!("/{}", "d".repeat(100)))).is_err());
    }

    /// The decision is tested with the probe's result injected: no old kernel needed.
    #[test]
    fn sandboxes_are_refused_where_the_kernel_cannot_confine_unix_sockets_unless_the_operator_opts_out() {
        let enforced = UnixStatus::Enforced(Hooks { connect: 49, sendmsg: 50 });
        let missing = UnixStatus::Missing("no hooks".into());
        assert_eq!(sandbox_gate(UnixMode::Enforced, &enforced), Ok(None));
        assert_eq!(sandbox_gate(UnixMode::Unenforced, &enforced), Ok(None));
        let refused = sandbox_gate(UnixMode::Enforced, &missing).unwrap_err();
        assert!(refused.contains("no hooks") && refused.contains("unix_sockets = \"unenforced\""), "{refused}");
        let warned = sandbox_gate(UnixMode::Unenforced, &missing).unwrap().unwrap();
        assert!(warned.contains("NOT confined") && warned.contains("no hooks"), "{warned}");
    }

    #[test]
    fn this_kernel_has_the_hooks() {
        // The machines sluice is developed and tested on run Linux >= 6.7 with BTF.
        match probe() {
            UnixStatus::Enforced(h) => assert!(h.connect > 0 && h.sendmsg > 0, "{h:?}"),
            UnixStatus::Missing(why) => {
                let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
                panic!("kernel {release}: {why}");
            }
        }
    }

    #[test]
    fn embedded_object_has_btf_and_both_programs() {
        let has = |needle: &[u8]| OBJECT.windows(needle.len()).any(|w| w == needle);
        assert!(OBJECT.starts_with(b"\x7fELF"));
        assert!(has(b".BTF\0"));
        for name in PROGRAM_NAMES {
            assert!(has(name.as_bytes()), "{name}");
        }
        assert!(has(b"cgroup/connect_unix") && has(b"cgroup/sendmsg_unix"));
    }

    /// Removal gives each directory to root first (an agent may leave one unreadable), and
    /// never follows a link out of the own directory.
    #[test]
    fn removing_an_own_directory_follows_no_link_and_empties_unreadable_ones() {
        if !nix::unistd::geteuid().is_root() {
            return; // chown needs CAP_CHOWN
        }
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"x").unwrap();
        let dirs = SandboxDirs { root: tmp.path().join("root") };
        fs::create_dir(&dirs.root).unwrap();
        // Made by create, it is a nosymfollow tmpfs of its own, owned by the agent; removing
        // unmounts it.
        let mounted = dirs.create("run-0", 65534, 65534).unwrap();
        assert!(is_protected(&mounted).unwrap());
        assert_eq!(fs::metadata(&mounted).unwrap().uid(), 65534);
        assert_eq!(fs::metadata(&mounted).unwrap().permissions().mode() & 0o7777, 0o700);
        fs::write(mounted.join("f"), b"z").unwrap();
        dirs.remove("run-0").unwrap();
        assert!(!mounted.exists());
        // A plain directory (where the daemon may not mount) is walked.
        let own = dirs.dir("run-1");
        fs::create_dir(&own).unwrap();
        std::os::unix::fs::lchown(&own, Some(65534), Some(65534)).unwrap();
        fs::set_permissions(&own, fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all(own.join("a/b")).unwrap();
        fs::write(own.join("a/b/f"), b"y").unwrap();
        std::os::unix::fs::symlink(&outside, own.join("a/link")).unwrap();
        std::os::unix::fs::lchown(own.join("a"), Some(65534), Some(65534)).unwrap();
        fs::set_permissions(own.join("a"), fs::Permissions::from_mode(0o000)).unwrap();
        dirs.remove("run-1").unwrap();
        assert!(!own.exists());
        assert!(outside.join("precious").exists());
        dirs.remove("run-1").unwrap();
        assert!(dirs.create("../x", 0, 0).is_err());
    }

    #[test]
    fn an_unprotected_unix_dir_is_never_used_as_is() {
        // A plain directory under /tmp is not a nosymfollow mount: prepare either mounts one
        // (root) or refuses, saying how to fix it. It never accepts the plain directory.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sbx");
        match SandboxDirs::prepare(&root) {
            Ok(dirs) => {
                assert!(is_protected(dirs.root()).unwrap());
                SandboxDirs::unmount(&root).unwrap();
            }
            Err(e) => assert!(e.to_string().contains("nosymfollow"), "{e}"),
        }
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(SandboxDirs::prepare(&link).unwrap_err().to_string().contains("symbolic link"));
        assert!(SandboxDirs::prepare(Path::new("relative")).is_err());
    }
}
