//! Escape attempts: other socket kinds, binding the daemon's ports, a new
//! network namespace, leaving the cgroup, a dead daemon, a restart.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Stdio;

use sluice::kernel::loader::{LinkAction, PROGRAM_COUNT};
use sluice_e2e::{free_port, last_json, py_addr, python, run, Canary, ChildGuard, KernelFixture};

const EPERM: i64 = 1;
const EACCES: i64 = 13;
const ECONNREFUSED: i64 = 111;

#[test]
fn raw_icmp_sctp_mptcp_sockets_are_refused_at_creation() {
    let Some(fx) = KernelFixture::new("raw_icmp_sctp_mptcp_sockets_are_refused_at_creation") else {
        return;
    };
    // ICMP "ping" sockets are otherwise refused by this sysctl before the
    // hook runs; open it to root for the test so the hook is what refuses.
    let _ping = PingGroupRange::allow_root();
    // The agent runs as root, so without the hook raw sockets would work.
    let v = fx.run_python(
        r#"
import json, socket
def make(fam, typ, proto):
    try:
        socket.socket(fam, typ, proto).close()
        return 0
    except OSError as e:
        return e.errno
A4, A6 = socket.AF_INET, socket.AF_INET6
print(json.dumps({
  "tcp": make(A4, socket.SOCK_STREAM, 0),
  "udp6": make(A6, socket.SOCK_DGRAM, 0),
  "raw_icmp": make(A4, socket.SOCK_RAW, socket.IPPROTO_ICMP),
  "raw_tcp": make(A4, socket.SOCK_RAW, socket.IPPROTO_TCP),
  "raw6": make(A6, socket.SOCK_RAW, 58),
  "ping": make(A4, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
  "ping6": make(A6, socket.SOCK_DGRAM, 58),
  "udplite": make(A4, socket.SOCK_DGRAM, 136),
  "mptcp": make(A4, socket.SOCK_STREAM, 262),
  "sctp": make(A4, socket.SOCK_STREAM, 132),
  "sctp_seq": make(A4, socket.SOCK_SEQPACKET, 132),
}))
"#,
        &[],
    );
    assert_eq!(v["tcp"], 0, "plain TCP must stay allowed: {v}");
    assert_eq!(v["udp6"], 0, "plain UDP must stay allowed: {v}");
    for case in ["raw_icmp", "raw_tcp", "raw6", "ping", "ping6", "udplite", "mptcp"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    // SCTP may not even exist in this kernel (EPROTONOSUPPORT/ESOCKTNOSUPPORT);
    // what matters is that it never succeeds.
    for case in ["sctp", "sctp_seq"] {
        assert_ne!(v[case], 0, "{case} socket was created: {v}");
    }
}

/// Sets `net.ipv4.ping_group_range` to include gid 0 and restores it on drop.
struct PingGroupRange(Option<String>);

impl PingGroupRange {
    const PATH: &'static str = "/proc/sys/net/ipv4/ping_group_range";
    fn allow_root() -> Self {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, "0 0").unwrap();
        Self(Some(old))
    }
}

impl Drop for PingGroupRange {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(Self::PATH, old.trim());
        }
    }
}

#[test]
fn binding_the_proxy_or_resolver_port_is_refused() {
    let Some(fx) = KernelFixture::new("binding_the_proxy_or_resolver_port_is_refused") else {
        return;
    };
    let other = free_port();
    let v = fx.run_python(
        r#"
import json, socket, sys
proxy, dns, other = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def bind(fam, typ, addr):
    s = socket.socket(fam, typ)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
        return 0
    except OSError as e:
        return e.errno
A4, A6, T, U = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
print(json.dumps({
  "proxy_any4": bind(A4, T, ("0.0.0.0", proxy)),
  "proxy_lo4": bind(A4, T, ("127.0.0.1", proxy)),
  "proxy_other_lo": bind(A4, T, ("127.0.0.2", proxy)),
  "proxy_any6": bind(A6, T, ("::", proxy)),
  "dns_udp4": bind(A4, U, ("127.0.0.1", dns)),
  "dns_udp6": bind(A6, U, ("::1", dns)),
  "dns_tcp_any": bind(A4, T, ("0.0.0.0", dns)),
  "other_port": bind(A4, T, ("127.0.0.1", other)),
}))
"#,
        &[fx.config.proxy_port.to_string(), fx.config.dns_port.to_string(), other.to_string()],
    );
    assert_eq!(v["other_port"], 0, "binding an unrelated port must work: {v}");
    for case in ["proxy_any4", "proxy_lo4", "proxy_other_lo", "proxy_any6", "dns_udp4", "dns_udp6", "dns_tcp_any"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
}

#[test]
fn new_network_namespace_is_denied() {
    let Some(fx) = KernelFixture::new("new_network_namespace_is_denied") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    // Root inside the sandbox unshares a network namespace; there the
    // rewrite would target *that* namespace's loopback. Every socket is
    // refused instead (EPERM, not the ENETUNREACH of a down loopback).
    let mut cmd = fx.agent_command("unshare");
    cmd.arg("-n").arg(python()).arg("-c").arg(
        r#"
import json, socket, sys
res = {}
for name, fam, typ in (("tcp4", socket.AF_INET, socket.SOCK_STREAM),
                       ("udp4", socket.AF_INET, socket.SOCK_DGRAM),
                       ("tcp6", socket.AF_INET6, socket.SOCK_STREAM)):
    try:
        s = socket.socket(fam, typ)
    except OSError as e:
        res[name] = e.errno
        continue
    try:
        s.connect(("127.0.0.55", int(sys.argv[1])) if fam == socket.AF_INET else ("::1", int(sys.argv[1])))
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
print(json.dumps(res))
"#,
    );
    cmd.arg(port.to_string());
    let v = last_json(run(cmd));
    for case in ["tcp4", "udp4", "tcp6"] {
        assert_eq!(v[case].as_i64(), Some(EPERM), "{case}: {v}");
    }
    assert_eq!(canary.hits(), 0);
}

#[test]
fn leaving_the_cgroup_as_non_root_fails_and_traffic_stays_redirected() {
    let Some(mut fx) = KernelFixture::new("leaving_the_cgroup_as_non_root_fails_and_traffic_stays_redirected") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let mount = sluice::kernel::cgroup2_mount().unwrap();
    let v = fx.run_python(
        r#"
import json, os, socket, sys
import encodings.idna  # loaded before dropping privileges (socket addresses need it)
targets = {"agents": sys.argv[1], "root": sys.argv[2]}
port = int(sys.argv[3])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
res = {"uid": os.getuid()}
for name, path in targets.items():
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
res["cgroup"] = [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0]
s = socket.create_connection(("127.0.0.55", port), timeout=20)
res["local"] = s.getsockname()
res["pid"] = os.getpid()
s.recv(1)  # held until the probe closed it (a socket closed first gives its entry up)
print(json.dumps(res))
"#,
        &[
            fx.agents.path().join("cgroup.procs").display().to_string(),
            mount.join("cgroup.procs").display().to_string(),
            port.to_string(),
        ],
    );
    assert_eq!(v["uid"], 65534);
    assert_eq!(v["agents"].as_i64(), Some(EACCES), "{v}");
    assert_eq!(v["root"].as_i64(), Some(EACCES), "{v}");
    let rel = fx.sandbox.path().strip_prefix(&mount).unwrap();
    assert_eq!(v["cgroup"], format!("0::/{}", rel.display()));
    let ev = fx.next_probe_event().expect("probe event");
    assert_eq!(ev.client, py_addr(&v["local"]));
    let orig = ev.orig.expect("entry");
    assert_eq!(orig.dst, format!("127.0.0.55:{port}").parse().unwrap());
    assert_eq!(orig.cgroup_id, fx.sandbox.id());
    assert_eq!(canary.hits(), 0);
}

#[test]
fn killed_daemon_refuses_connections_instead_of_leaking() {
    let Some(mut fx) = KernelFixture::new("killed_daemon_refuses_connections_instead_of_leaking") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    fx.kill_daemon();
    // Links and maps stay pinned.
    let links = std::fs::read_dir(fx.pin_dir().join("links")).unwrap().count();
    assert_eq!(links, PROGRAM_COUNT);
    let v = fx.run_python(
        r#"
import json, socket, sys
res = {}
for name, fam, host in (("v4", socket.AF_INET, "127.0.0.55"), ("v6", socket.AF_INET6, "::1"),
                        ("mapped", socket.AF_INET6, "::ffff:127.0.0.55")):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect((host, int(sys.argv[1])))
        res[name] = 0
    except OSError as e:
        res[name] = e.errno
print(json.dumps(res))
"#,
        &[port.to_string()],
    );
    for case in ["v4", "v6", "mapped"] {
        assert_eq!(v[case].as_i64(), Some(ECONNREFUSED), "{case}: {v}");
    }
    assert_eq!(canary.hits(), 0, "a dead daemon let traffic out");
}

#[test]
fn restart_takes_over_pinned_links_and_maps_in_place() {
    let Some(mut fx) = KernelFixture::new("restart_takes_over_pinned_links_and_maps_in_place") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let before = fx.enforcer().pinned_links().unwrap();
    assert_eq!(before.len(), PROGRAM_COUNT);
    assert!(before.iter().all(|l| l.cgroup_id == fx.agents.id()));
    assert!(fx.enforcer().link_actions().iter().all(|(_, a)| *a == LinkAction::Attached));

    // An agent connected before the restart keeps its socket storage: its
    // getpeername still shows the dialed address afterwards.
    let mut cmd = fx.agent_command(python());
    cmd.arg("-c")
        .arg(
            r#"
import json, socket, sys
s = socket.create_connection(("127.0.0.55", int(sys.argv[1])), timeout=20)
print(json.dumps({"local": s.getsockname()}), flush=True)
sys.stdin.readline()
print(json.dumps({"peer": s.getpeername()}), flush=True)
sys.stdin.readline()
"#,
        )
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
    let child = guard.0.as_mut().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let first: serde_json::Value = serde_json::from_str(&line).unwrap();
    let ev = fx.next_probe_event().expect("probe event before restart");
    assert_eq!(ev.client, py_addr(&first["local"]));
    assert!(ev.orig.is_some());

    fx.restart_daemon();
    let actions = fx.enforcer().link_actions().to_vec();
    assert_eq!(actions.len(), PROGRAM_COUNT);
    for (prog, action) in &actions {
        assert_eq!(*action, LinkAction::Updated, "{prog} was not updated in place");
    }
    let after = fx.enforcer().pinned_links().unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.program, a.program);
        assert_eq!(b.link_id, a.link_id, "{}: link replaced, not updated", a.program);
        assert_ne!(b.prog_id, a.prog_id, "{}: still runs the old program", a.program);
        assert_eq!(a.cgroup_id, fx.agents.id());
    }

    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let second: serde_json::Value = serde_json::from_str(&line).unwrap();
    let dialed: SocketAddr = format!("127.0.0.55:{port}").parse().unwrap();
    assert_eq!(py_addr(&second["peer"]), dialed, "socket storage lost on restart");
    // The per-sandbox slot counters are pinned too: the socket's slot is still counted, and
    // given back exactly once when the socket closes under the new programs.
    // (The agent holds its socket until its stdin is closed: had it exited after printing, the
    // slot would race back before this read.)
    let used = |fx: &sluice_e2e::KernelFixture| fx.conntable.sandbox_slots(fx.sandbox.id()).map(|q| q.used);
    assert_eq!(used(&fx), Some(1), "slot counter lost on restart");
    drop(guard);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used(&fx) != Some(0) {
        assert!(std::time::Instant::now() < deadline, "slot not given back: {:?}", used(&fx));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // New connections go through the new programs and the new probe.
    let v = fx.run_python(
        r#"
import json, socket, sys
s = socket.create_connection(("127.0.0.55", int(sys.argv[1])), timeout=20)
out = {"local": s.getsockname()}
s.recv(1)  # held until the probe closed it (a socket closed first gives its entry up)
print(json.dumps(out))
"#,
        &[port.to_string()],
    );
    let ev = fx.next_probe_event().expect("probe event after restart");
    assert_eq!(ev.client, py_addr(&v["local"]));
    assert_eq!(ev.orig.expect("entry").dst, dialed);
    assert_eq!(canary.hits(), 0);
}

#[test]
fn connections_without_a_table_entry_are_closed_and_counted() {
    let Some(mut fx) = KernelFixture::new("connections_without_a_table_entry_are_closed_and_counted") else {
        return;
    };
    // The test process is outside the agents cgroup: its connection to the
    // proxy port was not redirected, so it has no entry.
    let misses = fx.conntable.misses();
    let s = std::net::TcpStream::connect(("127.0.0.1", fx.config.proxy_port)).unwrap();
    let local = s.local_addr().unwrap();
    let ev = fx.next_probe_event().expect("probe event");
    assert_eq!(ev.client, local);
    assert_eq!(ev.orig, None);
    assert_eq!(fx.probe_unknown(), 1);
    assert_eq!(fx.conntable.misses(), misses + 1);
    // The probe closed it: reading gives EOF (or a reset).
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut &s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0);
}
