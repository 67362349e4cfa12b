//! `#[repr(C)]` mirrors of `ebpf/sluice.h`, and the names the loader and the
//! object agree on. The tests compile the header with the host C compiler and
//! compare every size and offset, so a change on one side only fails the build.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// `SLUICE_ABI_VERSION`: maps are pinned under `<pin_dir>/v<ABI_VERSION>/`.
pub const ABI_VERSION: u32 = 2;
/// `SLUICE_CONNTABLE_ENTRIES`.
pub const CONNTABLE_ENTRIES: u32 = 65536;
/// `SLUICE_QUOTA_ENTRIES`: sandboxes with a slot counter at once.
pub const QUOTA_ENTRIES: u32 = 4096;
/// `SLUICE_STOPPED_ENTRIES`: keys of the emergency-stop map (stopped sandboxes + "all").
pub const STOPPED_ENTRIES: u32 = 4096;
/// `SLUICE_STOP_ALL`: the stop map's key meaning "every sandbox" (no cgroup has id 0).
pub const STOP_ALL: u64 = 0;
/// `SLUICE_UDP_SOURCES_ENTRIES`.
pub const UDP_SOURCES_ENTRIES: u32 = 16384;

/// Globals overridden by the loader (`volatile const` in the object).
pub const GLOBAL_PROXY_PORT: &str = "sluice_proxy_port";
pub const GLOBAL_DNS_PORT: &str = "sluice_dns_port";
pub const GLOBAL_HOST_NETNS: &str = "sluice_host_netns";
/// `__u32`: TCP sockets one sandbox may hold connected or connecting.
pub const GLOBAL_TCP_QUOTA: &str = "sluice_tcp_quota";

/// Map names in the object (and pin file names).
pub const MAP_SOCKS: &str = "sluice_socks";
pub const MAP_CONNS: &str = "sluice_conns";
/// UDP DNS sources: client (address, port) → the sending socket's record.
pub const MAP_UDP_SRCS: &str = "sluice_udp_srcs";
/// Per-sandbox slot counters: cgroup id → [`RawQuota`].
pub const MAP_QUOTA: &str = "sluice_quota";
/// Emergency stop: cgroup id (or [`STOP_ALL`]) → `__u32` 1; see `stops.rs`.
pub const MAP_STOPPED: &str = "sluice_stopped";
/// Per-CPU event counters, indexed by [`STATS`].
pub const MAP_STATS: &str = "sluice_stats";

/// `SLUICE_STAT_*`, in index order: the name each counter is reported under.
pub const STATS: [&str; 16] = [
    "connect",
    "storage_fail",
    "slot_taken",
    "quota_refused",
    "quota_full",
    "sockops_connect",
    "sockops_no_slot",
    "insert_ok",
    "insert_retried",
    "insert_fail",
    "insert_err_exist",
    "insert_err_full",
    "insert_err_lock",
    "insert_err_other",
    "release_slot",
    "release_deleted",
];

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `struct sluice_orig_dst`: what the agent dialed, and who dialed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawOrigDst {
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family of the address passed to connect.
    pub family: u8,
    pub protocol: u8,
    pub tgid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub sock_cookie: u64,
}

// SAFETY: plain integers and byte arrays, no padding (size 48 = sum of fields).
unsafe impl aya::Pod for RawOrigDst {}

/// `struct sluice_quota`: one sandbox's slot counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawQuota {
    /// Sockets holding a slot (signed: may dip below zero after a counter was recreated).
    pub used: i64,
    /// Connects refused at the quota.
    pub refused: u64,
}

/// `struct sluice_conn_key`: the client's local (address, port).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawConnKey {
    /// Network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// The redirect port the connection went to (proxy or resolver), host byte order; zero in
    /// the UDP source table.
    pub dport: u16,
}

// SAFETY: plain integers and byte arrays, no padding (size 20 = sum of fields).
unsafe impl aya::Pod for RawConnKey {}

impl RawConnKey {
    /// The key sockops writes for a connection whose client end is `client` (the peer address
    /// of the accepted socket) and that was redirected to `server_port` (the listener's port).
    pub fn tcp(client: SocketAddr, server_port: u16) -> Self {
        let addr = match client {
            SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
            SocketAddr::V6(a) => a.ip().octets(),
        };
        Self { addr, port: client.port(), dport: server_port }
    }

    /// The key the egress program writes for a UDP datagram from `client`.
    pub fn udp(client: SocketAddr) -> Self {
        Self::tcp(client, 0)
    }
}

impl RawOrigDst {
    /// The dialed address, in the family the agent used (an AF_INET6 dial of
    /// `::ffff:a.b.c.d` stays an IPv6 socket address). `None` for a record
    /// whose family is neither AF_INET nor AF_INET6.
    pub fn dialed(&self) -> Option<SocketAddr> {
        let v6 = Ipv6Addr::from(self.addr);
        match self.family {
            AF_INET => {
                let v4: Ipv4Addr = v6.to_ipv4_mapped()?;
                Some(SocketAddr::from((v4, self.port)))
            }
            AF_INET6 => Some(SocketAddr::from((v6, self.port))),
            _ => None,
        }
    }

    /// Bytes as the kernel stores them (tests and tools).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C) with no padding (asserted below); any byte is valid.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }
}

// Same numbers as the _Static_assert lines in sluice.h.
const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<RawOrigDst>() == 48);
    assert!(offset_of!(RawOrigDst, addr) == 0);
    assert!(offset_of!(RawOrigDst, port) == 16);
    assert!(offset_of!(RawOrigDst, family) == 18);
    assert!(offset_of!(RawOrigDst, protocol) == 19);
    assert!(offset_of!(RawOrigDst, tgid) == 20);
    assert!(offset_of!(RawOrigDst, cgroup_id) == 24);
    assert!(offset_of!(RawOrigDst, netns_cookie) == 32);
    assert!(offset_of!(RawOrigDst, sock_cookie) == 40);
    assert!(size_of::<RawConnKey>() == 20);
    assert!(offset_of!(RawConnKey, addr) == 0);
    assert!(offset_of!(RawConnKey, port) == 16);
    assert!(offset_of!(RawConnKey, dport) == 18);
    assert!(size_of::<RawQuota>() == 16);
    assert!(offset_of!(RawQuota, used) == 0);
    assert!(offset_of!(RawQuota, refused) == 8);
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use std::path::Path;
    use std::process::Command;

    /// Compiles a tiny C program against `ebpf/sluice.h` and returns its
    /// output: `name value` lines for every size, offset and constant.
    fn c_layout() -> std::collections::HashMap<String, u64> {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("layout.c");
        let bin = dir.path().join("layout");
        let header_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ebpf");
        std::fs::write(
            &src,
            r#"
#include <stdio.h>
#include <stddef.h>
#include "sluice.h"
#define P(n, v) printf("%s %llu\n", n, (unsigned long long)(v))
#define O(s, f) P(#s "." #f, offsetof(struct s, f))
int main(void) {
    P("abi", SLUICE_ABI_VERSION);
    P("entries", SLUICE_CONNTABLE_ENTRIES);
    P("udp_entries", SLUICE_UDP_SOURCES_ENTRIES);
    P("quota_entries", SLUICE_QUOTA_ENTRIES);
    P("stopped_entries", SLUICE_STOPPED_ENTRIES);
    P("stop_all", SLUICE_STOP_ALL);
    P("stat_count", SLUICE_STAT_COUNT);
    P("stat_connect", SLUICE_STAT_CONNECT); P("stat_storage_fail", SLUICE_STAT_STORAGE_FAIL);
    P("stat_slot_taken", SLUICE_STAT_SLOT_TAKEN); P("stat_quota_refused", SLUICE_STAT_QUOTA_REFUSED);
    P("stat_quota_full", SLUICE_STAT_QUOTA_FULL); P("stat_sockops_connect", SLUICE_STAT_SOCKOPS_CONNECT);
    P("stat_sockops_no_slot", SLUICE_STAT_SOCKOPS_NO_SLOT); P("stat_insert_ok", SLUICE_STAT_INSERT_OK);
    P("stat_insert_retried", SLUICE_STAT_INSERT_RETRIED); P("stat_insert_fail", SLUICE_STAT_INSERT_FAIL);
    P("stat_insert_err_exist", SLUICE_STAT_INSERT_ERR_EXIST); P("stat_insert_err_full", SLUICE_STAT_INSERT_ERR_FULL);
    P("stat_insert_err_lock", SLUICE_STAT_INSERT_ERR_LOCK); P("stat_insert_err_other", SLUICE_STAT_INSERT_ERR_OTHER);
    P("stat_release_slot", SLUICE_STAT_RELEASE_SLOT); P("stat_release_deleted", SLUICE_STAT_RELEASE_DELETED);
    P("sluice_quota", sizeof(struct sluice_quota));
    O(sluice_quota, used); O(sluice_quota, refused);
    P("sluice_orig_dst", sizeof(struct sluice_orig_dst));
    O(sluice_orig_dst, addr); O(sluice_orig_dst, port); O(sluice_orig_dst, family);
    O(sluice_orig_dst, protocol); O(sluice_orig_dst, tgid); O(sluice_orig_dst, cgroup_id);
    O(sluice_orig_dst, netns_cookie); O(sluice_orig_dst, sock_cookie);
    P("sluice_conn_key", sizeof(struct sluice_conn_key));
    P("sluice_conn_key.align", _Alignof(struct sluice_conn_key));
    O(sluice_conn_key, addr); O(sluice_conn_key, port); O(sluice_conn_key, dport);
    printf("%s %s %s %s\n", SLUICE_GLOBAL_PROXY_PORT, SLUICE_GLOBAL_DNS_PORT, SLUICE_GLOBAL_HOST_NETNS,
           SLUICE_GLOBAL_TCP_QUOTA);
    return 0;
}
"#,
        )
        .expect("write layout.c");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
        let status = Command::new(&cc)
            .arg(format!("-I{}", header_dir.display()))
            .arg(&src)
            .arg("-o")
            .arg(&bin)
            .status()
            .expect("run the C compiler (set CC)");
        assert!(status.success(), "compiling layout.c failed");
        let out = Command::new(&bin).output().expect("run layout");
        let text = String::from_utf8(out.stdout).expect("utf8");
        let mut lines = text.lines().collect::<Vec<_>>();
        let globals = lines.pop().expect("globals line");
        assert_eq!(globals, format!("{GLOBAL_PROXY_PORT} {GLOBAL_DNS_PORT} {GLOBAL_HOST_NETNS} {GLOBAL_TCP_QUOTA}"));
        lines
            .iter()
            .map(|l| {
                let (k, v) = l.split_once(' ').expect("name value");
                (k.to_owned(), v.parse().expect("number"))
            })
            .collect()
    }

    #[test]
    fn layout_matches_c_header() {
        let c = c_layout();
        let get = |k: &str| *c.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(get("abi"), u64::from(ABI_VERSION));
        assert_eq!(get("entries"), u64::from(CONNTABLE_ENTRIES));
        assert_eq!(get("udp_entries"), u64::from(UDP_SOURCES_ENTRIES));
        assert_eq!(get("quota_entries"), u64::from(QUOTA_ENTRIES));
        assert_eq!(get("stopped_entries"), u64::from(STOPPED_ENTRIES));
        assert_eq!(get("stop_all"), STOP_ALL);
        assert_eq!(get("stat_count"), STATS.len() as u64);
        for (i, name) in STATS.iter().enumerate() {
            assert_eq!(get(&format!("stat_{name}")), i as u64, "SLUICE_STAT index of {name}");
        }
        assert_eq!(get("sluice_quota"), size_of::<RawQuota>() as u64);
        assert_eq!(get("sluice_quota.used"), offset_of!(RawQuota, used) as u64);
        assert_eq!(get("sluice_quota.refused"), offset_of!(RawQuota, refused) as u64);
        assert_eq!(get("sluice_orig_dst"), size_of::<RawOrigDst>() as u64);
        assert_eq!(get("sluice_orig_dst.addr"), offset_of!(RawOrigDst, addr) as u64);
        assert_eq!(get("sluice_orig_dst.port"), offset_of!(RawOrigDst, port) as u64);
        assert_eq!(get("sluice_orig_dst.family"), offset_of!(RawOrigDst, family) as u64);
        assert_eq!(get("sluice_orig_dst.protocol"), offset_of!(RawOrigDst, protocol) as u64);
        assert_eq!(get("sluice_orig_dst.tgid"), offset_of!(RawOrigDst, tgid) as u64);
        assert_eq!(get("sluice_orig_dst.cgroup_id"), offset_of!(RawOrigDst, cgroup_id) as u64);
        assert_eq!(get("sluice_orig_dst.netns_cookie"), offset_of!(RawOrigDst, netns_cookie) as u64);
        assert_eq!(get("sluice_orig_dst.sock_cookie"), offset_of!(RawOrigDst, sock_cookie) as u64);
        assert_eq!(get("sluice_conn_key"), size_of::<RawConnKey>() as u64);
        assert_eq!(get("sluice_conn_key.align"), align_of::<RawConnKey>() as u64);
        assert_eq!(get("sluice_conn_key.addr"), offset_of!(RawConnKey, addr) as u64);
        assert_eq!(get("sluice_conn_key.port"), offset_of!(RawConnKey, port) as u64);
        assert_eq!(get("sluice_conn_key.dport"), offset_of!(RawConnKey, dport) as u64);
    }

    #[test]
    fn conn_key_maps_ipv4_clients() {
        let k = RawConnKey::udp("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.addr, Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets());
        assert_eq!(k.port, 40000);
        assert_eq!(k.dport, 0);
        let k6 = RawConnKey::tcp("[::1]:40001".parse().unwrap(), 15001);
        assert_eq!(k6.dport, 15001);
        assert_eq!(k6.addr, Ipv6Addr::LOCALHOST.octets());
        assert_eq!(k6.port, 40001);
    }

    #[test]
    fn dialed_respects_family_and_rejects_garbage() {
        let mut r = RawOrigDst {
            addr: Ipv4Addr::new(127, 0, 0, 55).to_ipv6_mapped().octets(),
            port: 8080,
            family: AF_INET,
            protocol: IPPROTO_TCP,
            ..Default::default()
        };
        assert_eq!(r.dialed(), Some("127.0.0.55:8080".parse().unwrap()));
        r.family = AF_INET6;
        assert_eq!(r.dialed(), Some("[::ffff:127.0.0.55]:8080".parse().unwrap()));
        r.family = 99;
        assert_eq!(r.dialed(), None);
        // An AF_INET record whose address is not mapped is corrupt.
        r.family = AF_INET;
        r.addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(r.dialed(), None);
    }
}
