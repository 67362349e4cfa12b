//! The few `bpf(2)` commands aya 0.14 does not expose: opening a pinned link,
//! reading a link's cgroup, replacing a link's program in place
//! (`BPF_LINK_UPDATE`, the gap-free restart) and an atomic map
//! lookup-and-delete for the connection table.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// Large enough for every `union bpf_attr` member used here; the kernel
/// accepts a shorter attr and zero-fills the rest.
#[repr(C, align(8))]
struct Attr([u8; 64]);

impl Attr {
    fn new() -> Self {
        Self([0; 64])
    }
    /// Offsets are constants of the kernel ABI, all inside the 64 bytes; one out of range is a
    /// bug here, and writes nothing rather than panic.
    fn put(&mut self, off: usize, bytes: &[u8]) {
        let end = off.saturating_add(bytes.len());
        if let Some(dst) = self.0.get_mut(off..end) {
            dst.copy_from_slice(bytes);
        }
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised buffer of the size passed; the
    // pointers stored in it point to live buffers owned by the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as libc::c_uint) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_OBJ_GET`: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    // bpf_fd = 0, file_flags = 0 (read-write)
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned an invalid fd"))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_OBJ_PIN`: pin an object (a link) at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    let mut attr = Attr::new();
    // pathname@0 bpf_fd@8 file_flags@12
    attr.put_u64(0, c.as_ptr() as u64);
    attr.put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_LINK_CREATE` of a cgroup link: attaches `prog` to the cgroup `target` at `attach_type`
/// (for the hooks aya 0.14 does not know, such as `BPF_CGROUP_UNIX_CONNECT`).
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    // prog_fd@0 target_fd@4 attach_type@8 flags@12
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, target.as_raw_fd() as u32);
    attr.put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned an invalid fd"))?;
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The parts of `struct bpf_map_info` that decide whether a pinned map fits a definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    // struct bpf_map_info: type@0 id@4 key_size@8 value_size@12 max_entries@16 map_flags@20
    #[repr(C, align(8))]
    struct Info([u8; 24]);
    let mut info = Info([0; 24]);
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32);
    attr.put_u32(4, info.0.len() as u32);
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at =
        |o: usize| info.0.get(o..o.saturating_add(4)).and_then(|b| b.try_into().ok()).map_or(0, u32::from_ne_bytes);
    Ok(MapInfo { map_type: u32_at(0), key_size: u32_at(8), value_size: u32_at(12), max_entries: u32_at(16) })
}

/// `BPF_MAP_DELETE_ELEM`: `Ok(false)` when the key is absent.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    let mut attr = map_elem_attr(map, key.as_ptr(), std::ptr::null_mut(), 0);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first key when `key` is `None`), written
/// to `next`; `Ok(false)` at the end.
pub fn map_next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let key_ptr = key.map_or(std::ptr::null(), <[u8]>::as_ptr);
    let mut attr = map_elem_attr(map, key_ptr, next.as_mut_ptr(), 0);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The parts of `struct bpf_link_info` the loader checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For cgroup links: the cgroup id (0 once the cgroup is gone).
    pub cgroup_id: u64,
    /// For cgroup links: the attach type.
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type@0 id@4 prog_id@8, union@16:
    // cgroup { cgroup_id@16, attach_type@24 }.
    #[repr(C, align(8))]
    struct Info([u8; 32]);
    let mut info = Info([0; 32]);
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, info.0.len() as u32);
    attr.put_u64(8, info.0.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // The offsets are the kernel's `struct bpf_link_info`, all inside the 32 bytes.
    let u32_at =
        |o: usize| info.0.get(o..o.saturating_add(4)).and_then(|b| b.try_into().ok()).map_or(0, u32::from_ne_bytes);
    let cg: [u8; 8] = info.0.get(16..24).and_then(|b| b.try_into().ok()).unwrap_or_default();
    Ok(LinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(cg),
        attach_type: u32_at(24),
    })
}

/// `BPF_LINK_UPDATE`: atomically replace the program a link runs.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn map_elem_attr(map: BorrowedFd<'_>, key: *const u8, value: *mut u8, flags: u64) -> Attr {
    // map_fd@0, key@8, value@16, flags@24
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32);
    attr.put_u64(8, key as u64);
    attr.put_u64(16, value as u64);
    attr.put_u64(24, flags);
    attr
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: `Ok(false)` when the key is absent.
/// `key` and `value` must be exactly the map's key and value sizes.
pub fn map_lookup_and_delete(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = map_elem_attr(map, key.as_ptr(), value.as_mut_ptr(), 0);
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_LOOKUP_ELEM`: `Ok(false)` when the key is absent.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = map_elem_attr(map, key.as_ptr(), value.as_mut_ptr(), 0);
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    // The kernel only reads `value` for an update.
    let mut attr = map_elem_attr(map, key.as_ptr(), value.as_ptr().cast_mut(), 0);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Number of possible CPUs (the length of a per-CPU map value), from
/// `/sys/devices/system/cpu/possible` (`0-3`, `0,2-5`, …).
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(text.trim())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse possible CPUs {text:?}")))
}

/// The value of `key` in a per-CPU map of `u64` counters, summed over `cpus` CPUs (from
/// [`possible_cpus`]); `Ok(None)` when the key is absent.
pub fn percpu_u64_sum(map: BorrowedFd<'_>, key: &[u8], cpus: usize) -> io::Result<Option<u64>> {
    let mut values = vec![0u8; cpus.saturating_mul(8)];
    if !map_lookup(map, key, &mut values)? {
        return Ok(None);
    }
    Ok(Some(
        values
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_ne_bytes))
            .fold(0u64, u64::saturating_add),
    ))
}

fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut max = None;
    for part in text.split(',') {
        let last = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                (a <= b).then_some(b)?
            }
            None => part.parse::<usize>().ok()?,
        };
        max = Some(max.map_or(last, |m: usize| m.max(last)));
    }
    // A kernel has at most a few thousand CPUs; more is a misread.
    max.and_then(|m| m.checked_add(1)).filter(|&n| n <= 1 << 16)
}

/// `BPF_PROG_TEST_RUN` with one packet; returns the program's verdict.
pub fn prog_test_run(prog: BorrowedFd<'_>, packet: &[u8]) -> io::Result<u32> {
    // prog_fd@0 retval@4 data_size_in@8 data_size_out@12 data_in@16
    // data_out@24 repeat@32
    let len = u32::try_from(packet.len()).map_err(|_| io::Error::other("packet too large"))?;
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(8, len);
    attr.put_u64(16, packet.as_ptr() as u64);
    attr.put_u32(32, 1);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(u32::from_ne_bytes([attr.0[4], attr.0[5], attr.0[6], attr.0[7]]))
}

/// `SO_NETNS_COOKIE` of a fresh socket: the cookie of this process's
/// network namespace (kernel >= 5.14).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let fd = sock.as_fd();
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if cookie == 0 {
        return Err(io::Error::other("kernel returned a zero netns cookie"));
    }
    Ok(cookie)
}

/// `statfs(2)` f_type of `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))?;
    // SAFETY: statfs is plain old data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated, st valid for writes.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// `SO_NETNS_COOKIE` (71 everywhere but sparc).
#[cfg(not(target_arch = "sparc64"))]
const SO_NETNS_COOKIE: libc::c_int = 71;
#[cfg(target_arch = "sparc64")]
const SO_NETNS_COOKIE: libc::c_int = 0x50;

/// `BPF_FS_MAGIC`.
pub const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// `CGROUP2_SUPER_MAGIC`.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_are_parsed() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3"), Some(4));
        assert_eq!(parse_cpu_list("0,2-5"), Some(6));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("0-99999999"), None);
        assert!(super::possible_cpus().unwrap() >= 1, "this machine's own list");
    }
}
