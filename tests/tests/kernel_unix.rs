//! Unix-domain sockets (`ebpf/unix.bpf.c`, `crates/kernel/src/unix.rs`): an agent reaches only
//! sockets in its own directory and the addresses the operator lists. Sockets outside (paths and
//! abstract names, stream, seqpacket and datagram) are refused with EPERM, `..` and symbolic or
//! hard links out of the own directory fail, and a killed daemon leaves the refusal in place.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

use sluice::kernel::loader::LinkAction;
use sluice::kernel::{SandboxDirs, UnixAddr, UnixStatus};
use sluice_e2e::{unique, KernelFixture};

const EPERM: i64 = 1;
const ENOENT: i64 = 2;
const EXDEV: i64 = 18;
const ELOOP: i64 = 40;

/// Tries each case `[name, kind, address]` and prints `{name: errno or 0}`. Kinds: `stream`,
/// `seqpacket`, `dgram` (sendto), `dgram_connect`. `@x` is the abstract name `x`. Extra
/// operations: `symlink`, `hardlink`, `bind_mount` (address is `target|link`), `pair`
/// (socketpair), `chdir`, `listen`, `bind_dgram`.
const TRY: &str = r#"
import json, os, socket, sys
def addr(a):
    return "\0" + a[1:] if a.startswith("@") else a
res = {}
for name, kind, a in json.loads(sys.argv[1]):
    try:
        if kind == "symlink":
            t, l = a.split("|"); os.symlink(t, l)
        elif kind == "hardlink":
            t, l = a.split("|"); os.link(t, l)
        elif kind == "listen":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(addr(a)); s.listen(); globals()["keep_" + name] = s
        elif kind == "bind_dgram":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(addr(a)); globals()["keep_" + name] = s
        elif kind == "pair":
            x, y = socket.socketpair(); x.send(b"hi"); assert y.recv(2) == b"hi"
        elif kind == "chdir":
            os.chdir(a)
        elif kind == "bind_mount":
            import ctypes
            t, l = a.split("|")
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(t.encode(), l.encode(), None, 4096, None) != 0:
                raise OSError(ctypes.get_errno(), "mount")
        else:
            typ = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET,
                   "dgram": socket.SOCK_DGRAM, "dgram_connect": socket.SOCK_DGRAM}[kind]
            s = socket.socket(socket.AF_UNIX, typ)
            if kind == "dgram":
                s.sendto(b"x", addr(a))
            else:
                s.connect(addr(a))
            s.close()
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
print(json.dumps(res))
"#;

/// Listening sockets outside any sandbox, in a fresh directory under /tmp, removed on drop.
struct Outside {
    dir: PathBuf,
    abstract_name: String,
    _stream: UnixListener,
    _seqpacket: std::os::fd::OwnedFd,
    _dgram: UnixDatagram,
    _abstract: std::os::fd::OwnedFd,
}

impl Outside {
    fn new() -> Outside {
        let dir = PathBuf::from("/tmp").join(unique("sluice-unix-outside"));
        std::fs::create_dir(&dir).unwrap();
        let stream = UnixListener::bind(dir.join("stream.sock")).unwrap();
        let dgram = UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
        let seqpacket = listen_raw(libc::SOCK_SEQPACKET, dir.join("seqpacket.sock").as_os_str().as_encoded_bytes());
        let abstract_name = unique("sluice-unix-abstract");
        let mut name = vec![0u8];
        name.extend_from_slice(abstract_name.as_bytes());
        let abs = listen_raw(libc::SOCK_STREAM, &name);
        Outside { dir, abstract_name, _stream: stream, _seqpacket: seqpacket, _dgram: dgram, _abstract: abs }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn abstract_addr(&self) -> String {
        format!("@{}", self.abstract_name)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A listening AF_UNIX socket of `kind` at `addr` (raw bytes: a path, or NUL + abstract name).
fn listen_raw(kind: i32, addr: &[u8]) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2)/bind(2)/listen(2) with a sockaddr_un built in place; the fd is
    // owned by the returned OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, kind, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sa.sun_path.iter_mut().zip(addr) {
            *d = *s as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + addr.len()) as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&sa as *const libc::sockaddr_un).cast(), len), 0, "bind");
        assert_eq!(libc::listen(fd, 16), 0, "listen");
        owned
    }
}

/// Own directories on a fresh nosymfollow tmpfs; unmounted on drop (even when a test fails).
struct OwnDirs {
    root: PathBuf,
    dirs: SandboxDirs,
}

impl OwnDirs {
    fn new() -> OwnDirs {
        let root = PathBuf::from("/tmp").join(unique("sluice-unix-own"));
        let dirs = SandboxDirs::prepare(&root).expect("mount the own directories' tmpfs as root");
        OwnDirs { root, dirs }
    }
}

impl Drop for OwnDirs {
    fn drop(&mut self) {
        if let Err(e) = SandboxDirs::unmount(&self.root) {
            eprintln!("cleanup: unmounting {}: {e}", self.root.display());
        }
    }
}

fn cases(list: &[(&str, &str, String)]) -> String {
    serde_json::to_string(&list.iter().map(|(n, k, a)| [n.to_string(), k.to_string(), a.clone()]).collect::<Vec<_>>())
        .unwrap()
}

fn fixture(test: &str) -> Option<KernelFixture> {
    let fx = KernelFixture::new(test)?;
    assert!(
        matches!(fx.enforcer().unix_status(), UnixStatus::Enforced(_)),
        "this kernel must have the Unix hooks: {:?}",
        fx.enforcer().unix_status()
    );
    Some(fx)
}

#[test]
fn sockets_outside_the_sandbox_are_refused_and_socketpair_still_works() {
    let Some(fx) = fixture("sockets_outside_the_sandbox_are_refused_and_socketpair_still_works") else {
        return;
    };
    let out = Outside::new();
    let unix = fx.enforcer().unix().unwrap();
    let before = unix.refused().unwrap();
    let v = fx.run_python(
        TRY,
        &[cases(&[
            ("stream", "stream", out.path("stream.sock")),
            ("seqpacket", "seqpacket", out.path("seqpacket.sock")),
            ("dgram", "dgram", out.path("dgram.sock")),
            ("dgram_connect", "dgram_connect", out.path("dgram.sock")),
            ("abstract", "stream", out.abstract_addr()),
            ("abstract_dgram", "dgram", out.abstract_addr()),
            ("pair", "pair", String::new()),
        ])],
    );
    for case in ["stream", "seqpacket", "dgram", "dgram_connect", "abstract", "abstract_dgram"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    assert_eq!(v["pair"], 0, "socketpair must work: {v}");
    // The same sockets are reachable from outside the sandbox: the hook, not the test, refused.
    assert!(std::os::unix::net::UnixStream::connect(out.path("stream.sock")).is_ok());
    let after = unix.refused().unwrap();
    // Four connects (stream, seqpacket, datagram connect, abstract), two datagram sends.
    assert_eq!(after, (before.0 + 4, before.1 + 2), "refusals counted: {before:?} -> {after:?}");
}

#[test]
fn own_directory_works_and_dot_dot_symlinks_and_hard_links_do_not_lead_out() {
    let Some(fx) = fixture("own_directory_works_and_dot_dot_symlinks_and_hard_links_do_not_lead_out") else {
        return;
    };
    let out = Outside::new();
    let own = OwnDirs::new();
    let dir = own.dirs.create("run-test", 0, 0).unwrap();
    let unix = fx.enforcer().unix().unwrap();
    unix.set_sandbox_dir(fx.sandbox.id(), &dir).unwrap();
    assert_eq!(unix.sandbox_dir(fx.sandbox.id()).unwrap().as_deref(), Some(format!("{}/", dir.display()).as_ref()));
    let d = |name: &str| dir.join(name).display().to_string();
    let dot_dot = format!("{}/../../{}/stream.sock", dir.display(), out.dir.file_name().unwrap().to_string_lossy());
    let v = fx.run_python(
        TRY,
        &[cases(&[
            ("listen", "listen", d("a.sock")),
            ("own", "stream", d("a.sock")),
            ("bind_dgram", "bind_dgram", d("d.sock")),
            ("own_dgram", "dgram", d("d.sock")),
            // `..` out of the own directory: refused by the program before any lookup.
            ("dot_dot", "stream", dot_dot),
            ("dot", "stream", format!("{}/./a.sock", dir.display())),
            ("dot_end", "stream", format!("{}/sub/.", dir.display())),
            ("dot_dot_end", "stream", format!("{}/sub/..", dir.display())),
            ("double_slash_own", "stream", format!("{}//a.sock", dir.display())),
            // A symbolic link in the own directory to a socket outside: the raw path matches the
            // prefix, but the mount is nosymfollow, so the kernel does not follow it.
            ("symlink", "symlink", format!("{}|{}", out.path("stream.sock"), d("link.sock"))),
            ("via_symlink", "stream", d("link.sock")),
            ("via_symlink_dgram", "dgram", d("link.sock")),
            // A directory symlink in the middle of the path, likewise.
            ("dir_symlink", "symlink", format!("{}|{}", out.dir.display(), d("out"))),
            ("via_dir_symlink", "stream", d("out/stream.sock")),
            // A hard link to a socket outside cannot be made on another mount.
            ("hardlink", "hardlink", format!("{}|{}", out.path("stream.sock"), d("hard.sock"))),
            ("via_hardlink", "stream", d("hard.sock")),
            // Relative paths never match (the own directory is absolute).
            ("chdir", "chdir", dir.display().to_string()),
            ("relative", "stream", "a.sock".to_string()),
        ])],
    );
    for case in ["listen", "own", "bind_dgram", "own_dgram", "symlink", "dir_symlink", "chdir"] {
        assert_eq!(v[case], 0, "{case}: {v}");
    }
    assert_eq!(v["double_slash_own"], 0, "`//` inside the own directory stays inside: {v}");
    for case in ["dot_dot", "dot", "dot_end", "dot_dot_end", "relative"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    for case in ["via_symlink", "via_symlink_dgram", "via_dir_symlink"] {
        assert_eq!(v[case].as_i64(), Some(ELOOP), "{case}: the symlink was followed: {v}");
    }
    assert_eq!(v["hardlink"].as_i64(), Some(EXDEV), "{v}");
    assert_eq!(v["via_hardlink"].as_i64(), Some(ENOENT), "{v}");

    // Another sandbox's own directory is a mount of its own: a socket there cannot be
    // hard-linked into this one (even by the same user), and its directory is not this one's.
    let other = own.dirs.create("run-other", 0, 0).unwrap();
    let v = fx.run_python(
        TRY,
        &[cases(&[
            ("listen_other", "listen", other.join("o.sock").display().to_string()),
            ("hardlink_other", "hardlink", format!("{}|{}", other.join("o.sock").display(), d("o.sock"))),
        ])],
    );
    assert_eq!(v["listen_other"], 0, "{v}");
    assert_eq!(v["hardlink_other"].as_i64(), Some(EXDEV), "{v}");
    unix.set_sandbox_dir(fx.sandbox.id(), &other).unwrap();
    let v = fx.run_python(TRY, &[cases(&[("listen", "listen", d("c.sock")), ("own", "stream", d("c.sock"))])]);
    assert_eq!(v["listen"], 0, "{v}");
    assert_eq!(v["own"].as_i64(), Some(EPERM), "{v}");
    unix.remove_sandbox_dir(fx.sandbox.id()).unwrap();
    assert_eq!(unix.sandbox_dir(fx.sandbox.id()).unwrap(), None);
}

#[test]
fn listed_addresses_are_reachable_exactly() {
    let Some(fx) = fixture("listed_addresses_are_reachable_exactly") else {
        return;
    };
    let out = Outside::new();
    let unix = fx.enforcer().unix().unwrap();
    let listed = [UnixAddr::parse(&out.path("stream.sock")).unwrap(), UnixAddr::parse(&out.abstract_addr()).unwrap()];
    unix.set_allowed(&listed).unwrap();
    let mut got = unix.allowed().unwrap();
    got.sort_by_key(ToString::to_string);
    let mut want = listed.to_vec();
    want.sort_by_key(ToString::to_string);
    assert_eq!(got, want);
    let dir = out.dir.display().to_string();
    let all = cases(&[
        ("listed", "stream", out.path("stream.sock")),
        ("listed_abstract", "stream", out.abstract_addr()),
        ("other", "stream", out.path("seqpacket.sock")),
        ("spelled_with_dot", "stream", format!("{dir}/./stream.sock")),
        ("spelled_with_slashes", "stream", format!("{dir}//stream.sock")),
        ("abstract_prefix", "stream", format!("@{}", &out.abstract_name[..out.abstract_name.len() - 1])),
        ("abstract_longer", "stream", format!("{}x", out.abstract_addr())),
    ]);
    let v = fx.run_python(TRY, std::slice::from_ref(&all));
    assert_eq!(v["listed"], 0, "{v}");
    assert_eq!(v["listed_abstract"], 0, "{v}");
    for case in ["other", "spelled_with_dot", "spelled_with_slashes", "abstract_prefix", "abstract_longer"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    // Taken off the list: refused again.
    unix.set_allowed(&listed[1..]).unwrap();
    let v = fx.run_python(TRY, &[all]);
    assert_eq!(v["listed"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["listed_abstract"], 0, "{v}");
}

#[test]
fn killed_daemon_still_refuses_and_restart_keeps_own_directories() {
    let Some(mut fx) = fixture("killed_daemon_still_refuses_and_restart_keeps_own_directories") else {
        return;
    };
    let out = Outside::new();
    let own = OwnDirs::new();
    let dir = own.dirs.create("run-kill", 0, 0).unwrap();
    fx.enforcer().unix().unwrap().set_sandbox_dir(fx.sandbox.id(), &dir).unwrap();
    fx.kill_daemon();
    for name in ["sl_connect_unix", "sl_sendmsg_unix"] {
        assert!(fx.pin_dir().join("links").join(name).exists(), "{name} link not pinned");
    }
    let d = |name: &str| dir.join(name).display().to_string();
    let all = cases(&[
        ("outside", "stream", out.path("stream.sock")),
        ("outside_dgram", "dgram", out.path("dgram.sock")),
        ("abstract", "stream", out.abstract_addr()),
        ("listen", "listen", d("k.sock")),
        ("own", "stream", d("k.sock")),
    ]);
    let v = fx.run_python(TRY, &[all]);
    for case in ["outside", "outside_dgram", "abstract"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case} with the daemon dead: {v}");
    }
    assert_eq!(v["own"], 0, "own directory with the daemon dead: {v}");

    let e = fx.restart_daemon();
    let actions: Vec<_> = e.link_actions().iter().filter(|(n, _)| n.contains("unix")).collect();
    assert_eq!(actions.len(), 2, "{actions:?}");
    assert!(actions.iter().all(|(_, a)| *a == LinkAction::Updated), "{actions:?}");
    assert_eq!(
        e.unix().unwrap().sandbox_dir(fx.sandbox.id()).unwrap(),
        Some(PathBuf::from(format!("{}/", dir.display())))
    );
    let v = fx.run_python(
        TRY,
        &[cases(&[
            ("outside", "stream", out.path("stream.sock")),
            ("listen", "listen", d("k2.sock")),
            ("own", "stream", d("k2.sock")),
        ])],
    );
    assert_eq!(v["outside"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["own"], 0, "{v}");
    assert!(Path::new(&d("k.sock")).exists());
}

/// An unprivileged agent that makes a user and mount namespace of its own could bind-mount a
/// host socket over a path in its own directory or over a listed path (the raw path matches):
/// from a user namespace other than the daemon's, every name is refused.
#[test]
fn a_user_namespace_of_its_own_cannot_bind_mount_a_way_out() {
    let Some(fx) = fixture("a_user_namespace_of_its_own_cannot_bind_mount_a_way_out") else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let out = Outside::new();
    for name in ["stream.sock", "dgram.sock"] {
        std::fs::set_permissions(out.dir.join(name), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // A listed path whose socket does not run: a plain file the agent could mount over.
    let listed = out.dir.join("listed.sock");
    std::fs::write(&listed, b"").unwrap();
    std::fs::set_permissions(&listed, std::fs::Permissions::from_mode(0o666)).unwrap();
    let own = OwnDirs::new();
    let dir = own.dirs.create("run-userns", 65534, 65534).unwrap();
    let unix = fx.enforcer().unix().unwrap();
    unix.set_sandbox_dir(fx.sandbox.id(), &dir).unwrap();
    unix.set_allowed(&[UnixAddr::path(&listed).unwrap()]).unwrap();
    let target = dir.join("x.sock");
    std::fs::write(&target, b"").unwrap();
    std::os::unix::fs::lchown(&target, Some(65534), Some(65534)).unwrap();
    let d = |name: &str| dir.join(name).display().to_string();
    let all = cases(&[
        ("mount_own", "bind_mount", format!("{}|{}", out.path("stream.sock"), d("x.sock"))),
        ("via_own", "stream", d("x.sock")),
        ("mount_listed", "bind_mount", format!("{}|{}", out.path("dgram.sock"), listed.display())),
        ("via_listed", "dgram", listed.display().to_string()),
        ("listen", "listen", d("in-ns.sock")),
        ("own_in_ns", "stream", d("in-ns.sock")),
        ("pair", "pair", String::new()),
    ]);
    // As "nobody", in a user and mount namespace of its own (the system python: nobody may run it).
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a system python3 the user nobody may run");
    let mut cmd = fx.agent_command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-Urm", py, "-c", TRY, &all]);
    let v = sluice_e2e::last_json(sluice_e2e::run(cmd));
    assert_eq!(v["mount_own"], 0, "the namespace lets it mount (else this tests nothing): {v}");
    assert_eq!(v["mount_listed"], 0, "{v}");
    for case in ["via_own", "via_listed", "own_in_ns"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    assert_eq!(v["pair"], 0, "{v}");

    // The same agent without a namespace of its own reaches its own directory.
    let mut cmd = fx.agent_command("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        py,
        "-c",
        TRY,
        &cases(&[("listen", "listen", d("plain.sock")), ("own", "stream", d("plain.sock"))]),
    ]);
    let v = sluice_e2e::last_json(sluice_e2e::run(cmd));
    assert_eq!(v["own"], 0, "{v}");
}

/// The user namespace registered for a sandbox (what a non-root `sluice run` makes, where the
/// agent has no capabilities) reaches its own directory and listed addresses; a namespace nested
/// below it, where the agent may mount, is refused even after bind-mounting an outside socket
/// over a path in the own directory; so is the registered one once forgotten.
#[test]
fn the_registered_user_namespace_reaches_names_and_one_nested_below_it_does_not() {
    let Some(fx) = fixture("the_registered_user_namespace_reaches_names_and_one_nested_below_it_does_not") else {
        return;
    };
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Stdio;
    let out = Outside::new();
    for name in ["stream.sock", "dgram.sock"] {
        std::fs::set_permissions(out.dir.join(name), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let listed_listener = UnixListener::bind(out.dir.join("listed.sock")).unwrap();
    let listed = out.dir.join("listed.sock");
    std::fs::set_permissions(&listed, std::fs::Permissions::from_mode(0o777)).unwrap();
    let own = OwnDirs::new();
    let dir = own.dirs.create("run-registered", 65534, 65534).unwrap();
    let unix = fx.enforcer().unix().unwrap();
    unix.set_sandbox_dir(fx.sandbox.id(), &dir).unwrap();
    unix.set_allowed(&[UnixAddr::path(&listed).unwrap()]).unwrap();
    let target = dir.join("x.sock");
    std::fs::write(&target, b"").unwrap();
    std::os::unix::fs::lchown(&target, Some(65534), Some(65534)).unwrap();
    let d = |name: &str| dir.join(name).display().to_string();
    let direct = cases(&[
        ("listen", "listen", d("reg.sock")),
        ("own", "stream", d("reg.sock")),
        ("listed", "stream", listed.display().to_string()),
        ("outside", "stream", out.path("stream.sock")),
        ("abstract", "stream", out.abstract_addr()),
        ("mount", "bind_mount", format!("{}|{}", out.path("stream.sock"), d("x.sock"))),
    ]);
    let nested = cases(&[
        ("mount_own", "bind_mount", format!("{}|{}", out.path("stream.sock"), d("x.sock"))),
        ("via_own", "stream", d("x.sock")),
        ("listen", "listen", d("nested.sock")),
        ("own_in_nested", "stream", d("nested.sock")),
        ("listed", "stream", listed.display().to_string()),
    ]);
    let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a system python3 the user nobody may run");
    // As "nobody" in a user namespace that maps it to itself (no capabilities after exec, as
    // under sluice run); the shell waits until the namespace is registered, then runs the cases
    // directly and from a namespace nested below (where it may mount).
    let script = format!("read go; {py} -c \"$0\" \"$1\" || exit 1; exec unshare -Urm {py} -c \"$0\" \"$2\"", py = py);
    let mut cmd = fx.agent_command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-c", "sh", "-c", &script, TRY])
        .args([&direct, &nested])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = sluice_e2e::ChildGuard(Some(cmd.spawn().unwrap()));
    let pid = guard.0.as_ref().unwrap().id() as i32;
    // setpriv and unshare exec in place: the pid is the shell's once it is in its namespace.
    let deadline = std::time::Instant::now() + sluice_e2e::HANG_GUARD;
    let inode = loop {
        match sluice::kernel::userns::of_process(pid).unwrap() {
            sluice::kernel::userns::UserNs::Child { inode, owner } => {
                assert_eq!(owner, 65534);
                break inode;
            }
            other => assert!(std::time::Instant::now() < deadline, "never left the namespace: {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    unix.set_sandbox_userns(fx.sandbox.id(), inode).unwrap();
    assert_eq!(unix.sandbox_userns(fx.sandbox.id()).unwrap(), Some(inode));
    guard.0.as_mut().unwrap().stdin.take().unwrap().write_all(b"go\n").unwrap();
    let output = sluice_e2e::wait_output(guard);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (v, n) = (&lines[0], &lines[1]);
    assert_eq!(v["own"], 0, "registered namespace, own directory: {v}");
    assert_eq!(v["listed"], 0, "registered namespace, listed address: {v}");
    assert_eq!(v["outside"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["abstract"].as_i64(), Some(EPERM), "{v}");
    assert_eq!(v["mount"].as_i64(), Some(EPERM), "no capabilities in the registered namespace: {v}");
    assert_eq!(n["mount_own"], 0, "the nested namespace lets it mount (else this tests nothing): {n}");
    for case in ["via_own", "own_in_nested", "listed"] {
        assert_eq!(n[case].as_i64(), Some(EPERM), "nested namespace, {case}: {n}");
    }
    drop(listed_listener);

    // Forgotten: the same kind of namespace reaches nothing by name.
    unix.remove_sandbox_userns(fx.sandbox.id()).unwrap();
    assert_eq!(unix.sandbox_userns(fx.sandbox.id()).unwrap(), None);
    let mut cmd = fx.agent_command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-c", py, "-c", TRY])
        .arg(cases(&[("listen", "listen", d("gone.sock")), ("own", "stream", d("gone.sock"))]));
    let v = sluice_e2e::last_json(sluice_e2e::run(cmd));
    assert_eq!(v["own"].as_i64(), Some(EPERM), "{v}");
}
