//! UDP: only DNS leaves an agent, and only to the resolver (here the stub
//! that answers REFUSED). Everything else, QUIC included, is refused with
//! EPERM and never reaches the "outside" canaries.

use std::collections::HashMap;
use std::net::SocketAddr;

use sluice::kernel::Transport;
use sluice_e2e::{free_port, py_addr, Canary, KernelFixture};

const EPERM: i64 = 1;

#[test]
fn udp_to_non_dns_ports_is_denied() {
    let Some(fx) = KernelFixture::new("udp_to_non_dns_ports_is_denied") else {
        return;
    };
    let port = free_port();
    let canary4 = Canary::udp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let canary6 = Canary::udp(&fx.rt, format!("[::1]:{port}").parse().unwrap());
    let v = fx.run_python(
        r#"
import json, socket, sys
port = int(sys.argv[1])
def attempt(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
def s4(): return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def s6(): return socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
r = {
  "sendto4": attempt(lambda: s4().sendto(b"x", ("127.0.0.55", port))),
  "quic443": attempt(lambda: s4().sendto(b"\xc0quic", ("127.0.0.55", 443))),
  "connect4": attempt(lambda: s4().connect(("127.0.0.55", port))),
  "sendto6": attempt(lambda: s6().sendto(b"x", ("::1", port))),
  "connect6": attempt(lambda: s6().connect(("::1", port))),
  "sendto_mapped": attempt(lambda: s6().sendto(b"x", ("::ffff:127.0.0.55", port))),
  "connect_mapped": attempt(lambda: s6().connect(("::ffff:127.0.0.55", port))),
}
print(json.dumps(r))
"#,
        &[port.to_string()],
    );
    for (case, errno) in v.as_object().unwrap() {
        assert_eq!(errno.as_i64(), Some(EPERM), "{case}: expected EPERM, got {errno}");
    }
    assert_eq!(canary4.hits(), 0);
    assert_eq!(canary6.hits(), 0);
}

/// Builds a query and parses replies; used by the DNS agents.
const DNS_PY: &str = r#"
import json, socket, struct, sys
def query(qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in ("api", "example", "test"):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0\0\1\0\1"
def parse(reply):
    qid, flags = struct.unpack(">HH", reply[:4])
    return {"id": qid, "qr": flags >> 15, "rcode": flags & 0xf}
"#;

#[test]
fn dns_over_udp_to_outside_servers_reaches_the_resolver() {
    let Some(mut fx) = KernelFixture::new("dns_over_udp_to_outside_servers_reaches_the_resolver") else {
        return;
    };
    let canary4 = Canary::udp(&fx.rt, "127.0.0.53:53".parse().unwrap());
    let canary6 = Canary::udp(&fx.rt, "[::1]:53".parse().unwrap());
    let script = format!(
        "{DNS_PY}{}",
        r#"
out = {}
# Unconnected IPv4: the reply must appear to come from the server asked.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(20)
s.sendto(query(0x1111), ("127.0.0.53", 53))
data, addr = s.recvfrom(4096)
out["unconnected4"] = dict(parse(data), src=addr)
# Connected IPv4 (glibc style): getpeername shows the server.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(20)
s.connect(("127.0.0.53", 53)); s.send(query(0x2222))
out["connected4"] = dict(parse(s.recv(4096)), src=s.getpeername())
# AF_INET6 socket to a mapped address: sent by sendmsg4, reply via recvmsg6.
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(20)
s.sendto(query(0x3333), ("::ffff:127.0.0.53", 53))
data, addr = s.recvfrom(4096)
out["mapped"] = dict(parse(data), src=addr[:2])
# IPv6.
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(20)
s.sendto(query(0x4444), ("::1", 53))
data, addr = s.recvfrom(4096)
out["ipv6"] = dict(parse(data), src=addr[:2])
print(json.dumps(out))
"#
    );
    let v = fx.run_python(&script, &[]);
    let expect: [(&str, u64, &str); 4] = [
        ("unconnected4", 0x1111, "127.0.0.53:53"),
        ("connected4", 0x2222, "127.0.0.53:53"),
        ("mapped", 0x3333, "[::ffff:127.0.0.53]:53"),
        ("ipv6", 0x4444, "[::1]:53"),
    ];
    for (case, id, src) in expect {
        let r = &v[case];
        assert_eq!(r["id"], id, "{case}: {r}");
        assert_eq!(r["qr"], 1, "{case}: not a response: {r}");
        assert_eq!(r["rcode"], 5, "{case}: not REFUSED: {r}");
        let src: SocketAddr = src.parse().unwrap();
        assert_eq!(py_addr(&r["src"]), src, "{case}: reply source not restored");
    }
    let mut seen = HashMap::new();
    for _ in 0..4 {
        let q = fx.next_dns_query().expect("resolver stub saw too few queries");
        assert_eq!(q.transport, Transport::Udp);
        assert!(q.client.ip().to_canonical().is_loopback());
        seen.insert(q.id, q);
    }
    for id in [0x1111, 0x2222, 0x3333, 0x4444] {
        let q = seen.get(&id).unwrap_or_else(|| panic!("query {id:#x} not seen by the stub"));
        // The egress program recorded who sent it: the resolver knows the sandbox.
        let orig = q.orig.unwrap_or_else(|| panic!("query {id:#x}: no UDP source record"));
        assert_eq!(orig.cgroup_id, fx.sandbox.id(), "query {id:#x}");
        assert_eq!(orig.transport, Transport::Udp, "query {id:#x}");
    }
    assert_eq!(canary4.hits(), 0, "DNS reached the outside server");
    assert_eq!(canary6.hits(), 0, "DNS reached the outside server");
}

#[test]
fn dns_over_tcp_reaches_the_resolver_with_its_table_entry() {
    let Some(mut fx) = KernelFixture::new("dns_over_tcp_reaches_the_resolver_with_its_table_entry") else {
        return;
    };
    let canary = Canary::tcp(&fx.rt, "127.0.0.54:53".parse().unwrap());
    let script = format!(
        "{DNS_PY}{}",
        r#"
import os
s = socket.create_connection(("127.0.0.54", 53), timeout=20)
q = query(0x5555)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
reply = b""
while len(reply) < n:
    reply += s.recv(n - len(reply))
print(json.dumps(dict(parse(reply), peer=s.getpeername(), local=s.getsockname(), pid=os.getpid())))
"#
    );
    let v = fx.run_python(&script, &[]);
    assert_eq!(v["id"], 0x5555);
    assert_eq!(v["rcode"], 5);
    assert_eq!(py_addr(&v["peer"]), "127.0.0.54:53".parse().unwrap());
    let q = fx.next_dns_query().expect("stub saw no TCP query");
    assert_eq!(q.transport, Transport::Tcp);
    assert_eq!(q.id, 0x5555);
    assert_eq!(q.client, py_addr(&v["local"]));
    let orig = q.orig.expect("TCP DNS has a connection-table entry");
    assert_eq!(orig.dst, "127.0.0.54:53".parse().unwrap());
    assert_eq!(orig.pid, v["pid"].as_u64().unwrap() as u32);
    assert_eq!(orig.cgroup_id, fx.sandbox.id());
    assert_eq!(canary.hits(), 0);
}

/// The kernel gives one source port to connections towards different destinations. Two agent
/// sockets on the same local port, one to a web server (→ proxy) and one to DNS over TCP
/// (→ resolver), each keep their own entry: the redirect port is part of the key.
#[test]
fn one_source_port_towards_proxy_and_resolver_keeps_both_entries() {
    let Some(mut fx) = KernelFixture::new("one_source_port_towards_proxy_and_resolver_keeps_both_entries") else {
        return;
    };
    let port = free_port();
    let web = Canary::tcp(&fx.rt, format!("127.0.0.55:{port}").parse().unwrap());
    let dns = Canary::tcp(&fx.rt, "127.0.0.54:53".parse().unwrap());
    let script = format!(
        "{DNS_PY}{}",
        r#"
import os
s = socket.socket(); s.bind(("127.0.0.1", 0)); free = s.getsockname()[1]; s.close()
socks = []
for dst in [("127.0.0.55", int(sys.argv[1])), ("127.0.0.54", 53)]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", free))
    s.settimeout(20)
    s.connect(dst)
    socks.append(s)
web, dns = socks
q = query(0x6666)
dns.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", dns.recv(2))[0]
reply = b""
while len(reply) < n:
    reply += dns.recv(n - len(reply))
web.recv(1)  # held until the probe closed it
print(json.dumps(dict(parse(reply), web=web.getsockname(), dns=dns.getsockname(), pid=os.getpid())))
"#
    );
    let v = fx.run_python(&script, &[port.to_string()]);
    assert_eq!(v["web"], v["dns"], "both sockets share one source port: {v}");
    assert_eq!(v["id"], 0x6666);
    let ev = fx.next_probe_event().expect("probe event");
    assert_eq!(ev.client, py_addr(&v["web"]));
    assert_eq!(ev.orig.expect("the web connection's entry").dst, format!("127.0.0.55:{port}").parse().unwrap());
    let q = fx.next_dns_query().expect("stub saw no TCP query");
    assert_eq!(q.client, py_addr(&v["dns"]));
    assert_eq!(q.orig.expect("the DNS connection's entry").dst, "127.0.0.54:53".parse().unwrap());
    assert_eq!(fx.conntable.kernel_stat("insert_err_exist"), Some(0));
    assert_eq!((web.hits(), dns.hits()), (0, 0));
}
