//! The seccomp filters a `sluice run` agent gets before `exec`: which sockets it may create, no
//! io_uring, and (without a PID namespace) no ptrace-family calls.
//!
//! The filters are built with `seccompiler` (rust-vmm's, the one Firecracker uses), stacked
//! (the kernel applies the strictest answer of all of them), installed with `no_new_privs`, and
//! inherited by every process the agent starts, across `exec`. Nothing can remove them.
//!
//! | filter | syscalls | answer |
//! |---|---|---|
//! | families | `socket` with a family other than `AF_UNIX`, `AF_INET`, `AF_INET6`, `AF_NETLINK`; `socket(AF_NETLINK, _, p)` with `p` other than `NETLINK_ROUTE`; `socketpair` other than `AF_UNIX` | `EAFNOSUPPORT` |
//! | refused | `io_uring_setup`, `io_uring_enter`, `io_uring_register`; and with [`Ptrace::Refuse`]: `ptrace`, `process_vm_readv`, `process_vm_writev`, `pidfd_getfd`, `kcmp` | `EPERM` |
//! | x32 (x86_64 only) | any syscall of the x32 ABI (numbers with bit 30 set, which share the x86_64 audit architecture and would dodge the numbers above) | `ENOSYS` |
//!
//! Every filter starts with seccompiler's architecture check: a syscall made through another
//! ABI (i386's `int 0x80`, whose `socketcall` hides the family in memory a filter cannot read)
//! kills the process. Arguments are compared on their low 32 bits, as the kernel reads an `int`:
//! `socket(0x1_0000_0028, …)` is `AF_VSOCK` to both.
//!
//! Why io_uring: `IORING_OP_SOCKET` creates sockets without the `socket` syscall, where no
//! seccomp filter can see the family. Refusing `io_uring_setup` with `EPERM` is what container
//! runtimes do; runtimes that use io_uring (libuv, tokio-uring) fall back to ordinary syscalls.
//!
//! The inet families' types and protocols (raw, ICMP, SCTP, MPTCP) are refused by the eBPF
//! `cgroup/sock_create` program, for every sandbox; this filter is about the families that program
//! never sees.

use super::ConfineError;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::io;

/// The families an agent may create sockets of. `AF_NETLINK` only with `NETLINK_ROUTE`
/// (`getifaddrs`, glibc's `getaddrinfo` with `AI_ADDRCONFIG`).
pub const ALLOWED_FAMILIES: &[i32] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];

/// Whether the ptrace-family calls are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ptrace {
    /// Allowed: the agent has its own PID namespace, so they can only reach its own processes
    /// (PID 1 of that namespace is not dumpable and holds capabilities the agent lacks).
    Allow,
    /// Refused with `EPERM`: without a PID namespace they would reach the caller's processes.
    Refuse,
}

/// The compiled filters, ready to install in a child between `fork` and `exec`.
#[derive(Debug)]
pub struct Filters(Vec<BpfProgram>);

impl Filters {
    /// Builds the filters for this machine's architecture.
    pub fn build(ptrace: Ptrace) -> Result<Filters, ConfineError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| {
            ConfineError::Seccomp(format!(
                "no seccomp filter for the {} architecture ({e}); sluice run supports x86_64, aarch64 and riscv64",
                std::env::consts::ARCH
            ))
        })?;
        let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32| -> Result<BpfProgram, ConfineError> {
            let errno = u32::try_from(errno).map_err(|_| ConfineError::Seccomp(format!("errno {errno}")))?;
            let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), arch)
                .map_err(|e| ConfineError::Seccomp(format!("building the filter: {e}")))?;
            BpfProgram::try_from(filter).map_err(|e| ConfineError::Seccomp(format!("compiling the filter: {e}")))
        };
        let mut programs =
            vec![compile(family_rules()?, libc::EAFNOSUPPORT)?, compile(refused_rules(ptrace), libc::EPERM)?];
        if arch == TargetArch::x86_64 {
            programs.push(x32_guard());
        }
        Ok(Filters(programs))
    }

    /// Sets `no_new_privs` and installs every filter in the calling thread. Safe to call between
    /// `fork` and `exec`: it allocates nothing, only `prctl` and `seccomp` syscalls.
    pub fn install(&self) -> io::Result<()> {
        for program in &self.0 {
            seccompiler::apply_filter(program).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

/// One condition on the low 32 bits of argument `arg`.
fn cond(arg: u8, op: SeccompCmpOp, value: i32) -> Result<SeccompCondition, ConfineError> {
    let value = u64::from(value as u32);
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| ConfineError::Seccomp(format!("a condition on argument {arg}: {e}")))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, ConfineError> {
    SeccompRule::new(conditions).map_err(|e| ConfineError::Seccomp(format!("a rule: {e}")))
}

/// The rules whose match is refused with `EAFNOSUPPORT`.
fn family_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, ConfineError> {
    // socket(domain, type, protocol): a family that is none of the allowed ones...
    let not_allowed = ALLOWED_FAMILIES.iter().map(|&f| cond(0, SeccompCmpOp::Ne, f)).collect::<Result<Vec<_>, _>>()?;
    // ...or netlink with another protocol than NETLINK_ROUTE.
    let other_netlink =
        vec![cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK)?, cond(2, SeccompCmpOp::Ne, libc::NETLINK_ROUTE)?];
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_socket, vec![rule(not_allowed)?, rule(other_netlink)?]);
    // socketpair(domain, …): Unix only (no other family implements it with sockets worth having).
    rules.insert(libc::SYS_socketpair, vec![rule(vec![cond(0, SeccompCmpOp::Ne, libc::AF_UNIX)?])?]);
    Ok(rules)
}

/// The syscalls refused outright with `EPERM`.
fn refused_rules(ptrace: Ptrace) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut calls = vec![libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register];
    if ptrace == Ptrace::Refuse {
        calls.extend([
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_pidfd_getfd,
            libc::SYS_kcmp,
        ]);
    }
    // An empty rule list matches the syscall whatever its arguments.
    calls.into_iter().map(|nr| (nr, Vec::new())).collect()
}

/// x86_64 only: x32-ABI syscalls (bit 30 of the number set) answer `ENOSYS`, as on a kernel built
/// without x32. They carry the x86_64 audit architecture, so the architecture check lets them
/// through, and their numbers differ from the ones the other filters match.
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // struct seccomp_data { int nr; __u32 arch; ... }
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let ld = |k| sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k };
    let ret = |k| sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k };
    let jeq = |k, jt, jf| sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k };
    let jset = |k, jt, jf| sock_filter { code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16, jt, jf, k };
    vec![
        ld(ARCH),
        // Another architecture: the other filters kill it.
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        ld(NR),
        jset(X32_SYSCALL_BIT, 0, 1),
        ret(libc::SECCOMP_RET_ERRNO | (libc::ENOSYS as u32 & libc::SECCOMP_RET_DATA)),
        ret(libc::SECCOMP_RET_ALLOW),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Command;

    /// Runs `check` in a child with `filters` installed (between fork and exec, as `sluice run`
    /// does) and returns its result: 0 when every expectation held, else the number of the first
    /// that failed. The child never execs.
    fn in_child(filters: Filters, check: fn() -> i32) -> i32 {
        let mut cmd = Command::new("true");
        // SAFETY: the closure runs in the forked child of this (multi-threaded) test process; it
        // makes syscalls and ends with _exit, touching no lock another thread could hold.
        unsafe {
            cmd.pre_exec(move || {
                if filters.install().is_err() {
                    libc::_exit(200);
                }
                libc::_exit(check());
            });
        }
        let status = cmd.status().unwrap();
        assert!(status.signal().is_none(), "the child was killed: {status:?}");
        status.code().unwrap()
    }

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// socket(2) through the raw syscall (64-bit arguments): `Ok(())` if a socket was made.
    fn socket(domain: i64, ty: i64, protocol: i64) -> Result<(), i32> {
        // SAFETY: socket(2) with integer arguments; the fd, if any, is closed at once.
        let fd = unsafe { libc::syscall(libc::SYS_socket, domain, ty, protocol) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: our own new fd.
        unsafe { libc::close(fd as i32) };
        Ok(())
    }

    fn socketpair(domain: i32, ty: i32) -> Result<(), i32> {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors socketpair writes.
        if unsafe { libc::socketpair(domain, ty, 0, fds.as_mut_ptr()) } < 0 {
            return Err(errno());
        }
        // SAFETY: our own new fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        Ok(())
    }

    fn check_families() -> i32 {
        let cloexec = i64::from(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK);
        let allowed: &[(i32, i32, i32)] = &[
            (libc::AF_INET, libc::SOCK_STREAM, 0),
            (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
            (libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP),
            (libc::AF_INET6, libc::SOCK_DGRAM, 0),
            (libc::AF_UNIX, libc::SOCK_STREAM, 0),
            (libc::AF_UNIX, libc::SOCK_DGRAM, 0),
            (libc::AF_UNIX, libc::SOCK_SEQPACKET, 0),
            (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
            (libc::AF_NETLINK, libc::SOCK_DGRAM, libc::NETLINK_ROUTE),
        ];
        for (i, &(d, t, p)) in allowed.iter().enumerate() {
            if socket(d.into(), i64::from(t) | cloexec, p.into()).is_err() {
                return 10 + i as i32;
            }
        }
        // Every other family the kernel numbers (AF_MAX is 46 on 6.x), and some beyond.
        for d in 0..64 {
            if ALLOWED_FAMILIES.contains(&d) {
                continue;
            }
            for t in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_RAW, libc::SOCK_SEQPACKET] {
                if socket(d.into(), t.into(), 0) != Err(libc::EAFNOSUPPORT) {
                    return 100 + d;
                }
            }
        }
        // Netlink protocols other than route (audit, sock_diag, uevents, netfilter, generic).
        for p in [libc::NETLINK_AUDIT, libc::NETLINK_SOCK_DIAG, libc::NETLINK_KOBJECT_UEVENT, 12, 16] {
            if socket(libc::AF_NETLINK.into(), libc::SOCK_RAW.into(), p.into()) != Err(libc::EAFNOSUPPORT) {
                return 30 + p;
            }
        }
        // High bits the kernel ignores (it reads an int) must not dodge the filter.
        let high = 1i64 << 32;
        if socket(high | i64::from(libc::AF_VSOCK), libc::SOCK_STREAM.into(), 0) != Err(libc::EAFNOSUPPORT) {
            return 60;
        }
        if socket(high | i64::from(libc::AF_NETLINK), libc::SOCK_RAW.into(), libc::NETLINK_AUDIT.into())
            != Err(libc::EAFNOSUPPORT)
        {
            return 61;
        }
        if socket(libc::AF_NETLINK.into(), libc::SOCK_RAW.into(), high | i64::from(libc::NETLINK_AUDIT))
            != Err(libc::EAFNOSUPPORT)
        {
            return 62;
        }
        if socketpair(libc::AF_UNIX, libc::SOCK_STREAM).is_err() {
            return 70;
        }
        for d in [libc::AF_INET, libc::AF_VSOCK, libc::AF_NETLINK, libc::AF_TIPC] {
            if socketpair(d, libc::SOCK_STREAM) != Err(libc::EAFNOSUPPORT) {
                return 71;
            }
        }
        0
    }

    fn check_refused(ptrace_refused: bool) -> i32 {
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup with a zeroed io_uring_params (120 bytes) it may write to.
        if unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) } >= 0 || errno() != libc::EPERM {
            return 1;
        }
        // SAFETY: invalid fds; only the errno is looked at.
        if unsafe { libc::syscall(libc::SYS_io_uring_enter, -1, 0, 0, 0, 0, 0) } >= 0 || errno() != libc::EPERM {
            return 2;
        }
        // SAFETY: as above.
        if unsafe { libc::syscall(libc::SYS_io_uring_register, -1, 0, 0, 0) } >= 0 || errno() != libc::EPERM {
            return 3;
        }
        // process_vm_readv of our own memory: works unless ptrace-family calls are refused.
        let src = [7u8; 8];
        let mut dst = [0u8; 8];
        let local = libc::iovec { iov_base: dst.as_mut_ptr().cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: src.as_ptr() as *mut _, iov_len: 8 };
        // SAFETY: both iovecs point at 8 valid bytes of this process.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        let refused = n < 0 && errno() == libc::EPERM;
        if refused != ptrace_refused || (!refused && dst != src) {
            return 4;
        }
        // SAFETY: kcmp of our own fd 0 with itself.
        let pid = unsafe { libc::getpid() };
        let k = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, 0, 0, 0) };
        if (k < 0 && errno() == libc::EPERM) != ptrace_refused {
            return 5;
        }
        // ptrace of pid 0 (no such process): ESRCH when allowed, EPERM when refused.
        // SAFETY: PTRACE_PEEKDATA of a process that does not exist; nothing is read.
        let p = unsafe { libc::ptrace(libc::PTRACE_PEEKDATA, 0, 0, 0) };
        if p != -1 || (errno() == libc::EPERM) != ptrace_refused {
            return 8;
        }
        // SAFETY: prctl query without pointers.
        if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1 {
            return 6;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // An x32 socket(AF_VSOCK): ENOSYS whether or not the kernel has x32.
            // SAFETY: a syscall number the kernel rejects; integer arguments.
            let r = unsafe { libc::syscall(0x4000_0000 | libc::SYS_socket, libc::AF_VSOCK, libc::SOCK_STREAM, 0) };
            if r >= 0 || errno() != libc::ENOSYS {
                return 7;
            }
        }
        0
    }

    #[test]
    fn only_inet_unix_and_route_netlink_sockets_can_be_created() {
        assert_eq!(in_child(Filters::build(Ptrace::Allow).unwrap(), check_families), 0);
    }

    #[test]
    fn io_uring_is_refused_and_ptrace_family_calls_only_when_asked() {
        assert_eq!(in_child(Filters::build(Ptrace::Allow).unwrap(), || check_refused(false)), 0);
        assert_eq!(in_child(Filters::build(Ptrace::Refuse).unwrap(), || check_refused(true)), 0);
    }

    #[test]
    fn without_filters_the_probes_see_the_difference() {
        // The same checks fail without the filters, so the tests above test something.
        let mut cmd = Command::new("true");
        // SAFETY: as in in_child: syscalls and _exit only.
        unsafe {
            cmd.pre_exec(|| libc::_exit(if check_families() != 0 && check_refused(false) != 0 { 0 } else { 1 }));
        }
        assert_eq!(cmd.status().unwrap().code(), Some(0));
    }
}
