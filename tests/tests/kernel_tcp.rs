//! TCP redirect: every way an agent can open a TCP connection ends at the
//! proxy (here the probe), with the dialed destination, pid and cgroup in the
//! connection table, and never at the "outside" canary.

use std::net::SocketAddr;

use sluice::kernel::{OrigDst, Transport};
use sluice_e2e::{free_port, last_json, py_addr, run, Canary, KernelFixture};

/// Connects to (host, port) with the given family and reports what the
/// agent sees: local and peer address, pid. It keeps the socket open until the
/// probe closes it (EOF): a socket closed before the proxy accepted its
/// connection gives up its table entry (`sock_release`).
const CONNECT_PY: &str = r#"
import json, os, socket, sys
host, port, fam = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(20)
s.connect((host, port))
out = {"local": s.getsockname(), "peer": s.getpeername(), "pid": os.getpid()}
s.recv(1)
print(json.dumps(out))
"#;

/// Waits for the probe event of the agent connection whose local address is
/// `local`, and checks the record against what the agent did.
fn expect_redirect(fx: &mut KernelFixture, local: SocketAddr, dialed: SocketAddr, pid: u32) -> OrigDst {
    let ev = fx.next_probe_event().expect("probe saw no connection");
    // An AF_INET6 socket dialing ::ffff:a.b.c.d is IPv4 on the wire.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    assert_eq!(ev.client, local, "probe saw another client");
    let orig = ev.orig.expect("connection-table entry missing");
    assert_eq!(orig.dst, dialed);
    assert_eq!(orig.transport, Transport::Tcp);
    assert_eq!(orig.pid, pid);
    assert_eq!(orig.cgroup_id, fx.sandbox.id());
    assert_eq!(orig.netns_cookie, fx.enforcer().host_netns_cookie());
    assert_ne!(orig.socket_cookie, 0);
    // The entry is consumed by the lookup.
    assert_eq!(fx.conntable.peek(local, fx.config.proxy_port), None);
    orig
}

fn connect_case(test: &str, canary_addr: &str, dial_host: &str, family: &str) {
    let Some(mut fx) = KernelFixture::new(test) else {
        return;
    };
    let port = free_port();
    let canary_addr: SocketAddr = format!("{canary_addr}:{port}").parse().unwrap();
    let canary = Canary::tcp(&fx.rt, canary_addr);
    let v = fx.run_python(CONNECT_PY, &[dial_host.to_owned(), port.to_string(), family.to_owned()]);
    let local = py_addr(&v["local"]);
    let dialed = SocketAddr::new(dial_host.parse().unwrap(), port);
    let pid = v["pid"].as_u64().unwrap() as u32;
    expect_redirect(&mut fx, local, dialed, pid);
    // getpeername shows the dialed address, not the proxy.
    assert_eq!(py_addr(&v["peer"]), dialed);
    assert_eq!(canary.hits(), 0, "agent traffic reached the outside canary");
}

#[test]
fn tcp_ipv4_connect_reaches_probe_with_original_destination() {
    connect_case("tcp_ipv4_connect_reaches_probe_with_original_destination", "127.0.0.55", "127.0.0.55", "4");
}

#[test]
fn tcp_ipv6_connect_is_redirected() {
    connect_case("tcp_ipv6_connect_is_redirected", "[::1]", "::1", "6");
}

#[test]
fn tcp_ipv4_mapped_ipv6_connect_is_redirected() {
    connect_case("tcp_ipv4_mapped_ipv6_connect_is_redirected", "127.0.0.55", "::ffff:127.0.0.55", "6");
}

#[test]
fn tcp_fast_open_is_redirected() {
    let Some(mut fx) = KernelFixture::new("tcp_fast_open_is_redirected") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    // Blocking sendto(MSG_FASTOPEN): connect and data in one call, without
    // connect(2). The probe closes with our data unread (RST), so the agent
    // reports its pid only; the probe event is matched by destination.
    let v = fx.run_python(
        r#"
import json, os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
n = s.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, ("127.0.0.55", int(sys.argv[1])))
s.settimeout(20)
try:
    s.recv(1)  # held until the probe closed it (EOF or RST)
except ConnectionResetError:
    pass
print(json.dumps({"sent": n, "pid": os.getpid()}))
"#,
        &[port.to_string()],
    );
    assert!(v["sent"].as_u64().unwrap() > 0);
    let ev = fx.next_probe_event().expect("probe saw no connection");
    let orig = ev.orig.expect("connection-table entry missing");
    assert_eq!(orig.dst, format!("127.0.0.55:{port}").parse().unwrap());
    assert_eq!(orig.pid, v["pid"].as_u64().unwrap() as u32);
    assert_eq!(orig.cgroup_id, fx.sandbox.id());
    assert_eq!(canary.hits(), 0);
}

const URING_C: &str = r#"
#include <arpa/inet.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct io_uring ring;
    struct io_uring_sqe *sqe;
    struct io_uring_cqe *cqe;
    struct sockaddr_in sa, local;
    socklen_t len = sizeof(local);
    int fd, ret;

    if (argc != 3)
        return 2;
    if ((ret = io_uring_queue_init(4, &ring, 0)) < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-ret));
        return 3;
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &sa.sin_addr);
    sqe = io_uring_get_sqe(&ring);
    io_uring_prep_connect(sqe, fd, (struct sockaddr *)&sa, sizeof(sa));
    /* Force execution by an io-wq worker, not inline in this task. */
    sqe->flags |= IOSQE_ASYNC;
    io_uring_submit(&ring);
    io_uring_wait_cqe(&ring, &cqe);
    ret = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    getsockname(fd, (struct sockaddr *)&local, &len);
    {
        /* Held until the probe closed it: see CONNECT_PY. */
        char c;
        if (read(fd, &c, 1) < 0)
            perror("read");
    }
    printf("{\"res\": %d, \"local_port\": %d, \"pid\": %d}\n", ret, ntohs(local.sin_port), getpid());
    return 0;
}
"#;

#[test]
fn io_uring_connect_is_redirected() {
    let Some(mut fx) = KernelFixture::new("io_uring_connect_is_redirected") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("uring.c");
    let bin = dir.path().join("uring");
    std::fs::write(&src, URING_C).unwrap();
    let st = std::process::Command::new("cc")
        .arg("-O2")
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .arg("-luring")
        .status()
        .expect("cc (and liburing-dev) are needed");
    assert!(st.success(), "compiling the io_uring helper failed (liburing-dev installed?)");

    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let mut cmd = fx.agent_command(&bin);
    cmd.arg("127.0.0.55").arg(port.to_string());
    let v = last_json(run(cmd));
    assert_eq!(v["res"], 0, "io_uring connect failed: {v}");
    let local: SocketAddr = format!("127.0.0.1:{}", v["local_port"]).parse().unwrap();
    let dialed: SocketAddr = format!("127.0.0.55:{port}").parse().unwrap();
    expect_redirect(&mut fx, local, dialed, v["pid"].as_u64().unwrap() as u32);
    assert_eq!(canary.hits(), 0);
}

#[test]
fn double_forked_grandchild_is_redirected() {
    let Some(mut fx) = KernelFixture::new("double_forked_grandchild_is_redirected") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    // The grandchild is re-parented to init and in a new session; it keeps
    // stdout, so the test reads its report at EOF.
    let v = fx.run_python(
        r#"
import json, os, socket, sys
port = int(sys.argv[1])
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        s = socket.create_connection(("127.0.0.55", port), timeout=20)
        out = {"local": s.getsockname(), "pid": os.getpid(), "ppid": os.getppid()}
        s.recv(1)  # held until the probe closed it: see CONNECT_PY
        print(json.dumps(out), flush=True)
        os._exit(0)
    os._exit(0)
os.wait()
"#,
        &[port.to_string()],
    );
    let local = py_addr(&v["local"]);
    let dialed: SocketAddr = format!("127.0.0.55:{port}").parse().unwrap();
    expect_redirect(&mut fx, local, dialed, v["pid"].as_u64().unwrap() as u32);
    assert_eq!(canary.hits(), 0);
}

#[test]
fn curl_with_or_without_proxy_variables_lands_on_probe() {
    let Some(mut fx) = KernelFixture::new("curl_with_or_without_proxy_variables_lands_on_probe") else {
        return;
    };
    let port = free_port();
    let proxy_port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let fake_proxy = Canary::tcp(&fx.rt, format!("127.0.0.56:{proxy_port}").parse().unwrap());
    let url = format!("http://127.0.0.55:{port}/");

    // No proxy variables: curl dials the target itself.
    let mut cmd = fx.agent_command("curl");
    cmd.args(["-sS", "--max-time", "20", "--noproxy", "*", &url]);
    cmd.env_remove("http_proxy").env_remove("HTTP_PROXY");
    let out = run(cmd);
    assert!(!out.status.success(), "the probe closes without answering");
    let ev = fx.next_probe_event().expect("probe event");
    let orig = ev.orig.expect("entry");
    assert_eq!(orig.dst, format!("127.0.0.55:{port}").parse().unwrap());

    // Proxy variable pointing elsewhere: curl dials that proxy, which is
    // redirected just the same.
    let mut cmd = fx.agent_command("curl");
    cmd.args(["-sS", "--max-time", "20", &url]);
    cmd.env("http_proxy", format!("http://127.0.0.56:{proxy_port}"));
    let out = run(cmd);
    assert!(!out.status.success());
    let ev = fx.next_probe_event().expect("probe event");
    let orig = ev.orig.expect("entry");
    assert_eq!(orig.dst, format!("127.0.0.56:{proxy_port}").parse().unwrap());

    assert_eq!(canary.hits(), 0);
    assert_eq!(fake_proxy.hits(), 0);
}

/// A burst of 1,000 non-blocking connects from one agent: every one has its entry, exact, and the
/// kernel counters account for each step (connect, slot, sockops, insert, release).
///
/// History: this test used to lose bursts of ~20 entries in about one run in five. The kernel
/// counters showed every connect, slot, sockops callback and insert succeeding, every time; the
/// connections without an entry were those the probe's listener answered with SYN cookies while
/// its 1,024-deep accept queue overflowed (TcpExtSyncookiesSent rose by the number missing in the
/// runs measured). The kernel keeps no state for such a connection, so it reaches `accept` only
/// when the agent sends a packet — here the FIN of its exit, after its socket was released and
/// its entry removed. The proxy and the probe now listen with `LISTEN_BACKLOG` (4,096): no
/// overflow, no cookies, and 0 missing in 30 runs; the agent also holds its sockets until the
/// probe closed each one.
#[test]
fn thousand_parallel_connects_are_all_in_the_table() {
    let Some(mut fx) = KernelFixture::new("thousand_parallel_connects_are_all_in_the_table") else {
        return;
    };
    const N: usize = 1000;
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let v = fx.run_python(
        r#"
import json, os, resource, selectors, socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
sel = selectors.DefaultSelector()
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(("127.0.0.55", port))
    sel.register(s, selectors.EVENT_WRITE)
    socks.append(s)
ports, errors, left = [], [], n
while left:
    ready = sel.select(timeout=30)
    if not ready:
        break
    for key, _ in ready:
        s = key.fileobj
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        (errors if err else ports).append(err if err else s.getsockname()[1])
        sel.unregister(s)
        left -= 1
# Hold every socket until the probe has taken its entry and closed it (EOF): a socket closed
# before the proxy accepted its connection gives its entry up (sock_release).
for s in socks:
    sel.register(s, selectors.EVENT_READ)
left = n
while left:
    ready = sel.select(timeout=30)
    if not ready:
        break
    for key, _ in ready:
        try:
            key.fileobj.recv(1)
        except OSError:
            pass
        sel.unregister(key.fileobj)
        left -= 1
print(json.dumps({"pid": os.getpid(), "ports": ports, "errors": errors}))
"#,
        &[N.to_string(), port.to_string()],
    );
    let pid = v["pid"].as_u64().unwrap() as u32;
    let errors = v["errors"].as_array().unwrap();
    assert!(errors.is_empty(), "connect errors: {errors:?}");
    let ports: std::collections::HashSet<u16> =
        v["ports"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u16).collect();
    assert_eq!(ports.len(), N);

    let dialed: SocketAddr = format!("127.0.0.55:{port}").parse().unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut missing = Vec::new();
    while seen.len() + missing.len() < N {
        let ev = fx.next_probe_event().expect("missing probe events");
        assert!(ports.contains(&ev.client.port()), "unexpected client {}", ev.client);
        let Some(orig) = ev.orig else {
            missing.push(ev.client);
            continue;
        };
        assert_eq!(orig.dst, dialed);
        assert_eq!(orig.pid, pid);
        assert_eq!(orig.cgroup_id, fx.sandbox.id());
        assert!(seen.insert(ev.client.port()), "duplicate {}", ev.client);
    }
    // The kernel's own account of the burst: which step, if any, lost an entry.
    let stats = fx.conntable.kernel_stats().expect("kernel counters");
    eprintln!("thousand_parallel_connects: kernel counters {stats:?}; missing {}", missing.len());
    let stat = |name: &str| stats.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).unwrap();
    assert_eq!(stat("connect"), N as u64, "connect4 ran once per connect");
    assert_eq!(stat("slot_taken"), N as u64, "one slot per socket");
    assert_eq!(stat("sockops_connect"), N as u64, "sockops saw every TCP_CONNECT_CB");
    assert_eq!(stat("insert_ok") + stat("insert_retried"), N as u64 - stat("insert_fail"));
    assert!(
        missing.is_empty(),
        "{} of {N} connections had no table entry: {missing:?} (kernel counters above; table now holds {:?} entries)",
        missing.len(),
        fx.conntable.entry_count()
    );
    // Every socket is closed: every slot is back and nothing is left in the table.
    assert_eq!(fx.conntable.sandbox_slots(fx.sandbox.id()).map(|q| q.used), Some(0));
    assert_eq!(fx.conntable.entry_count().unwrap(), 0);
    assert_eq!(fx.probe_unknown(), 0, "connections refused for lack of an entry");
    assert_eq!(canary.hits(), 0);
}

/// Opens `n` non-blocking TCP connections to 127.0.0.55:port, reports the local ports of those
/// that connected and the errno of those refused, then holds every socket until stdin closes
/// (or, with `hold` = "eof", until the probe closed each connected one).
const FLOOD_PY: &str = r#"
import json, os, resource, selectors, socket, sys
n, port, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
sel = selectors.DefaultSelector()
socks, refused = [], []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    err = s.connect_ex(("127.0.0.55", port))
    if err in (0, 115):  # connected, or EINPROGRESS
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    else:
        refused.append(err)
        s.close()
ports, errors, left = [], [], len(socks)
while left:
    ready = sel.select(timeout=30)
    if not ready:
        break
    for key, _ in ready:
        s = key.fileobj
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        (errors if err else ports).append(err if err else s.getsockname()[1])
        sel.unregister(s)
        left -= 1
if hold == "eof":
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    left = len(socks)
    while left:
        ready = sel.select(timeout=30)
        if not ready:
            break
        for key, _ in ready:
            try:
                key.fileobj.recv(1)
            except OSError:
                pass
            sel.unregister(key.fileobj)
            left -= 1
print(json.dumps({"pid": os.getpid(), "ports": ports, "errors": errors, "refused": refused}), flush=True)
if hold == "stdin":
    sys.stdin.read()
"#;

/// One sandbox floods the connection table (four times its quota, every socket held) next to a
/// quiet one: the flooder gets exactly its quota and EPERM beyond it (counted per sandbox and in
/// the kernel counters), the quiet sandbox's connections all get their entries, right down to the
/// cgroup, nothing reaches the outside canary, and every slot comes back when the flooder exits.
#[test]
fn a_flooding_sandbox_is_refused_at_its_quota_and_the_quiet_one_keeps_working() {
    const QUOTA: u32 = 64;
    const QUIET: usize = 32;
    let test = "a_flooding_sandbox_is_refused_at_its_quota_and_the_quiet_one_keeps_working";
    let Some(mut fx) = KernelFixture::with_max_tcp_sockets(test, QUOTA) else {
        return;
    };
    // Removed with the agents cgroup by the fixture, even on failure.
    let quiet = fx.agents.create_child("quiet").expect("quiet sandbox cgroup");
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());

    // The flooder: 4 x QUOTA connects, held until its stdin closes.
    let mut cmd = fx.agent_command(sluice_e2e::python());
    cmd.arg("-c").arg(FLOOD_PY).args([(4 * QUOTA).to_string(), port.to_string(), "stdin".into()]);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut flooder = sluice_e2e::ChildGuard(Some(cmd.spawn().expect("spawn the flooder")));
    let child = flooder.0.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .expect("flooder report");
    let flood: serde_json::Value = serde_json::from_str(line.trim()).expect("flooder JSON");
    let flood_ports: std::collections::HashSet<u16> =
        flood["ports"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u16).collect();
    assert!(flood["errors"].as_array().unwrap().is_empty(), "flooder connect errors: {flood}");
    assert_eq!(flood_ports.len(), QUOTA as usize, "the flooder gets exactly its quota: {flood}");
    let refused = flood["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 3 * QUOTA as usize);
    assert!(refused.iter().all(|e| e.as_i64() == Some(i64::from(libc::EPERM))), "refusals are EPERM: {flood}");
    let slots = fx.conntable.sandbox_slots(fx.sandbox.id()).expect("flooder's slot counter");
    assert_eq!((slots.used, slots.refused), (i64::from(QUOTA), 3 * u64::from(QUOTA)));

    // The quiet sandbox, while the flooder sits at its quota: every connection goes through.
    let mut cmd = std::process::Command::new(sluice_e2e::python());
    let join = quiet.join_before_exec().expect("open cgroup.procs");
    // SAFETY: the hook only calls write(2) on an already-open fd.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, join) };
    cmd.stdin(std::process::Stdio::null());
    cmd.arg("-c").arg(FLOOD_PY).args([QUIET.to_string(), port.to_string(), "eof".into()]);
    let calm = last_json(run(cmd));
    assert!(calm["errors"].as_array().unwrap().is_empty() && calm["refused"].as_array().unwrap().is_empty(), "{calm}");
    let calm_ports: std::collections::HashSet<u16> =
        calm["ports"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u16).collect();
    assert_eq!(calm_ports.len(), QUIET);

    let dialed: SocketAddr = format!("127.0.0.55:{port}").parse().unwrap();
    let (mut from_flooder, mut from_quiet) = (0, 0);
    for _ in 0..QUOTA as usize + QUIET {
        let ev = fx.next_probe_event().expect("a probe event per connection");
        let orig = ev.orig.unwrap_or_else(|| panic!("no table entry for {}", ev.client));
        assert_eq!(orig.dst, dialed);
        if calm_ports.contains(&ev.client.port()) {
            assert_eq!(orig.cgroup_id, quiet.id(), "the quiet sandbox's entry names it");
            assert_eq!(orig.pid, calm["pid"].as_u64().unwrap() as u32);
            from_quiet += 1;
        } else {
            assert!(flood_ports.contains(&ev.client.port()), "unexpected client {}", ev.client);
            assert_eq!(orig.cgroup_id, fx.sandbox.id());
            from_flooder += 1;
        }
    }
    assert_eq!((from_flooder, from_quiet), (QUOTA as usize, QUIET));
    assert_eq!(fx.probe_unknown(), 0);
    assert_eq!(fx.conntable.sandbox_slots(quiet.id()).map(|q| (q.used, q.refused)), Some((0, 0)));
    assert!(fx.conntable.kernel_stat("quota_refused").unwrap() >= 3 * u64::from(QUOTA));

    // The flooder exits: its slots come back, nothing is left in the table.
    drop(child.stdin.take());
    let status = flooder.0.take().unwrap().wait().expect("flooder exit");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fx.conntable.sandbox_slots(fx.sandbox.id()).map(|q| q.used) != Some(0) {
        assert!(std::time::Instant::now() < deadline, "flooder's slots not given back");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(fx.conntable.entry_count().unwrap(), 0);
    assert_eq!(canary.hits(), 0, "agent traffic reached the outside canary");
}

/// A slot is taken once per socket and given back exactly once: a socket whose connects fail
/// (nothing listens: the daemon is dead) and that connects again still holds one slot, and
/// closing it brings the counter back to zero, never below.
#[test]
fn a_socket_holds_one_slot_however_often_it_connects() {
    let Some(mut fx) = KernelFixture::new("a_socket_holds_one_slot_however_often_it_connects") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    fx.kill_daemon();
    let mut cmd = fx.agent_command(sluice_e2e::python());
    cmd.arg("-c")
        .arg(
            r#"
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
errs = [s.connect_ex(("127.0.0.55", int(sys.argv[1]))) for _ in range(3)]
print(json.dumps({"errs": errs}), flush=True)
sys.stdin.readline()
"#,
        )
        .arg(port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut guard = sluice_e2e::ChildGuard(Some(cmd.spawn().unwrap()));
    let child = guard.0.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["errs"], serde_json::json!([libc::ECONNREFUSED, libc::ECONNREFUSED, libc::ECONNREFUSED]), "{v}");
    let used = |fx: &KernelFixture| fx.conntable.sandbox_slots(fx.sandbox.id()).map(|q| q.used);
    assert_eq!(used(&fx), Some(1));
    assert_eq!(fx.conntable.kernel_stat("slot_taken"), Some(1));
    assert_eq!(fx.conntable.kernel_stat("connect"), Some(3));
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"done\n").unwrap();
    assert!(guard.0.take().unwrap().wait().unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while used(&fx) != Some(0) {
        assert!(std::time::Instant::now() < deadline, "slot not given back: {:?}", used(&fx));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(fx.conntable.kernel_stat("release_slot"), Some(1));
    // Nothing connected: no entry was left behind either.
    assert_eq!(fx.conntable.entry_count().unwrap(), 0);
    assert_eq!(canary.hits(), 0);
}

/// The counters of sandboxes whose cgroup is gone are removed; a live sandbox's stays.
#[test]
fn slot_counters_of_ended_sandboxes_are_forgotten() {
    let Some(mut fx) = KernelFixture::new("slot_counters_of_ended_sandboxes_are_forgotten") else {
        return;
    };
    let port = free_port();
    let canary = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let ended = fx.agents.create_child("ended").expect("second sandbox");
    for sandbox in [fx.sandbox.clone(), ended.clone()] {
        let mut cmd = std::process::Command::new(sluice_e2e::python());
        let join = sandbox.join_before_exec().expect("open cgroup.procs");
        // SAFETY: the hook only calls write(2) on an already-open fd.
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, join) };
        cmd.stdin(std::process::Stdio::null());
        cmd.arg("-c").arg(CONNECT_PY).args(["127.0.0.55", &port.to_string(), "4"]);
        last_json(run(cmd));
        let ev = fx.next_probe_event().expect("probe event");
        assert_eq!(ev.orig.expect("entry").cgroup_id, sandbox.id());
    }
    assert!(fx.conntable.sandbox_slots(ended.id()).is_some());
    ended.remove().expect("end the sandbox");
    assert_eq!(fx.conntable.forget_dead_sandboxes(fx.agents.path()).unwrap(), 1);
    assert_eq!(fx.conntable.sandbox_slots(ended.id()), None);
    assert!(fx.conntable.sandbox_slots(fx.sandbox.id()).is_some(), "a live sandbox's counter stays");
    assert_eq!(fx.conntable.forget_dead_sandboxes(fx.agents.path()).unwrap(), 0);
    assert_eq!(canary.hits(), 0);
}
