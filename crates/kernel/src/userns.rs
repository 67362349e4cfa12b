//! User namespaces, as the Unix socket filter needs them (`unix.rs`): which user namespace a
//! process is in, whether that is a direct child of this process's one, and who owns it.
//!
//! Read through nsfs: `/proc/PID/ns/user` opened, `fstat` for its inode number, and the
//! `NS_GET_PARENT` and `NS_GET_OWNER_UID` ioctls. Opening another user's `/proc/PID/ns/user`
//! needs ptrace read access to it (`CAP_SYS_PTRACE`, or the same uid and gid).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// `NS_GET_PARENT`: `_IO(0xb7, 0x2)` (linux/nsfs.h).
const NS_GET_PARENT: libc::c_ulong = 0xb702;
/// `NS_GET_OWNER_UID`: `_IO(0xb7, 0x4)`.
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

/// A user namespace, by its nsfs inode number (what `stat /proc/PID/ns/user` shows, and what the
/// eBPF programs read from `task->cred->user_ns->ns.inum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserNs {
    /// The same user namespace as this process's.
    Own,
    /// A direct child of this process's user namespace, owned by `owner` (the euid, as this
    /// process sees it, of whoever created it).
    Child { inode: u32, owner: u32 },
    /// Any other: nested deeper, or not below this process's at all.
    Other { inode: u32 },
}

fn inode(file: &File) -> io::Result<u32> {
    let ino = file.metadata()?.ino();
    u32::try_from(ino).ok().filter(|i| *i != 0).ok_or_else(|| io::Error::other(format!("unexpected nsfs inode {ino}")))
}

/// The nsfs inode number of this process's user namespace.
pub fn own() -> io::Result<u32> {
    inode(&File::open("/proc/self/ns/user")?)
}

/// The user namespace of process `pid`, relative to this process's. The caller guards against
/// `pid` being reused meanwhile (for example by checking the process's start time before and
/// after).
pub fn of_process(pid: i32) -> io::Result<UserNs> {
    if pid <= 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")));
    }
    let own = own()?;
    let file = File::open(format!("/proc/{pid}/ns/user"))?;
    classify(&file, own)
}

/// The longest `/proc/PID/uid_map` read (the kernel allows 340 lines).
const UID_MAP_MAX: u64 = 64 * 1024;

/// `/proc/PID/uid_map` as this process sees it (readable by anyone; written once, by the
/// namespace's creator), bounded; empty when it cannot be read.
pub fn uid_map(pid: i32) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = File::open(format!("/proc/{pid}/uid_map")) {
        let _ = f.take(UID_MAP_MAX).read_to_string(&mut text);
    }
    text
}

fn classify(file: &File, own: u32) -> io::Result<UserNs> {
    let ino = inode(file)?;
    if ino == own {
        return Ok(UserNs::Own);
    }
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd (or -1).
    let parent = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_PARENT) };
    if parent < 0 {
        let e = io::Error::last_os_error();
        // EPERM: the parent is outside this process's user namespace (not below ours at all).
        return match e.raw_os_error() {
            Some(libc::EPERM) => Ok(UserNs::Other { inode: ino }),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel just returned this new fd to us.
    let parent = File::from(unsafe { OwnedFd::from_raw_fd(parent) });
    if inode(&parent)? != own {
        return Ok(UserNs::Other { inode: ino });
    }
    let mut owner: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_OWNER_UID, &mut owner as *mut libc::uid_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UserNs::Child { inode: ino, owner })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn this_process_is_in_its_own_user_namespace() {
        assert_eq!(of_process(std::process::id() as i32).unwrap(), UserNs::Own);
        assert!(of_process(0).is_err());
    }

    /// A child process that makes a user namespace is seen as a direct child owned by its uid,
    /// and one nested below that as "other".
    #[test]
    fn child_and_nested_user_namespaces_are_told_apart() {
        let Ok(unshare) = which("unshare") else { return };
        let own_uid = nix::unistd::geteuid().as_raw();
        for (args, nested) in
            [(&["-Ur", "sleep", "5"][..], false), (&["-Ur", "unshare", "-Ur", "sleep", "5"][..], true)]
        {
            let mut child = std::process::Command::new(&unshare).args(args).spawn().unwrap();
            // The innermost process is the one that sleeps (unshare execs).
            let pid = child.id() as i32;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let seen = loop {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "sleep" {
                    break of_process(pid);
                }
                if std::time::Instant::now() > deadline {
                    break Err(io::Error::other("the child never ran sleep"));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            let _ = child.kill();
            let _ = child.wait();
            match seen {
                // Unprivileged user namespaces may be off where these tests run; root has them.
                Err(_) | Ok(UserNs::Own) if own_uid != 0 => return,
                Err(_) | Ok(UserNs::Own) => panic!("{args:?}: {seen:?}"),
                Ok(UserNs::Child { owner, .. }) => assert!(!nested && owner == own_uid, "{args:?}: {seen:?}"),
                Ok(UserNs::Other { .. }) => assert!(nested, "{args:?}: {seen:?}"),
            }
        }
    }

    fn which(name: &str) -> io::Result<std::path::PathBuf> {
        for dir in ["/usr/bin", "/bin"] {
            let p = std::path::Path::new(dir).join(name);
            if p.exists() {
                return Ok(p);
            }
        }
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
}
