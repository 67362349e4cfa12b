//! The connection table: client (address, port) → what the agent dialed.
//!
//! sockops fills it when an agent's SYN is about to leave; the proxy looks
//! each accepted connection up once, right after `accept`, and the lookup
//! removes the entry (one atomic `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, so two
//! tasks can never both claim it). A connection with no entry did not come
//! through the redirect (or its entry was evicted): the proxy must close it.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use super::abi::{self, RawConnKey, RawOrigDst};
use super::sys;

/// Transport of the dialed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Where an agent connection was going, and who opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The address the agent passed to `connect`, in the family it used: an
    /// AF_INET6 socket dialing `::ffff:a.b.c.d` gives a V6 mapped address
    /// (use `Ipv6Addr::to_canonical` to compare with IPv4).
    pub dst: SocketAddr,
    pub transport: Transport,
    /// Pid (thread-group id) of the task that called `connect`.
    pub pid: u32,
    /// cgroup v2 id of that task (see [`super::Cgroup::id`]).
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket (always the host's: the
    /// programs refuse other namespaces).
    pub netns_cookie: u64,
    /// The agent socket's cookie.
    pub socket_cookie: u64,
}

impl OrigDst {
    /// Decodes a kernel record; `None` if it is malformed.
    pub fn from_raw(raw: &RawOrigDst) -> Option<Self> {
        let transport = match raw.protocol {
            abi::IPPROTO_TCP => Transport::Tcp,
            abi::IPPROTO_UDP => Transport::Udp,
            _ => return None,
        };
        Some(Self {
            dst: raw.dialed()?,
            transport,
            pid: raw.tgid,
            cgroup_id: raw.cgroup_id,
            netns_cookie: raw.netns_cookie,
            socket_cookie: raw.sock_cookie,
        })
    }
}

/// Handle on the pinned `sluice_conns` map. Cheap to share (`Arc`); every
/// method takes `&self`.
#[derive(Debug)]
pub struct Conntable {
    map: OwnedFd,
    /// `sluice_udp_srcs`: UDP DNS senders (see [`Conntable::udp_source`]).
    udp: Option<OwnedFd>,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

impl Conntable {
    /// A table over an open map descriptor (the loader's or a pin's). Any other descriptor makes
    /// every lookup fail, counted as an error and a miss (the daemon's metrics tests use that).
    pub fn new(map: OwnedFd) -> Self {
        Self { map, udp: None, hits: AtomicU64::new(0), misses: AtomicU64::new(0), errors: AtomicU64::new(0) }
    }

    /// Adds the pinned UDP source table (the loader does; [`Self::from_pin`] alone has none).
    pub(crate) fn with_udp_sources(mut self, map: OwnedFd) -> Self {
        self.udp = Some(map);
        self
    }

    /// Who sent the UDP datagram the resolver received from `client`: the sending socket's
    /// record, written by the egress program before the datagram was delivered. Not removed
    /// (a socket sends many queries); a reused source port is overwritten by its new owner's
    /// first packet. `None`: not an agent socket (or no table) — answer nothing.
    pub fn udp_source(&self, client: SocketAddr) -> Option<OrigDst> {
        let map = self.udp.as_ref()?;
        let key = RawConnKey::from_client(client);
        let mut raw = RawOrigDst::default();
        // SAFETY: RawOrigDst is repr(C) POD without padding; every byte
        // pattern is a valid value.
        let value = unsafe {
            std::slice::from_raw_parts_mut((&mut raw as *mut RawOrigDst).cast::<u8>(), size_of::<RawOrigDst>())
        };
        match sys::map_lookup(map.as_fd(), key_bytes(&key), value) {
            Ok(true) => OrigDst::from_raw(&raw),
            Ok(false) => None,
            Err(error) => {
                tracing::warn!(%client, %error, "UDP source lookup failed");
                None
            }
        }
    }

    /// Opens a pinned connection table (tools, tests).
    pub fn from_pin(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self::new(sys::obj_get(path)?))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.map.as_fd()
    }

    /// Takes the entry for the accepted connection whose peer is `client`.
    /// `None` (counted in [`Self::misses`]) means: not redirected by us, or
    /// evicted, or malformed — close the connection.
    pub fn lookup(&self, client: SocketAddr) -> Option<OrigDst> {
        let key = RawConnKey::from_client(client);
        let mut raw = RawOrigDst::default();
        // SAFETY: RawOrigDst is repr(C) POD without padding; every byte
        // pattern is a valid value.
        let value = unsafe {
            std::slice::from_raw_parts_mut((&mut raw as *mut RawOrigDst).cast::<u8>(), size_of::<RawOrigDst>())
        };
        let key_bytes = key_bytes(&key);
        match sys::map_lookup_and_delete(self.fd(), key_bytes, value) {
            Ok(true) => match OrigDst::from_raw(&raw) {
                Some(o) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    Some(o)
                }
                None => {
                    tracing::warn!(%client, ?raw, "malformed connection-table record");
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            Ok(false) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(error) => {
                tracing::warn!(%client, %error, "connection-table lookup failed");
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Reads the entry without removing it (diagnostics, tests).
    pub fn peek(&self, client: SocketAddr) -> Option<OrigDst> {
        let key = RawConnKey::from_client(client);
        let mut raw = RawOrigDst::default();
        // SAFETY: as in `lookup`.
        let value = unsafe {
            std::slice::from_raw_parts_mut((&mut raw as *mut RawOrigDst).cast::<u8>(), size_of::<RawOrigDst>())
        };
        match sys::map_lookup(self.fd(), key_bytes(&key), value) {
            Ok(true) => OrigDst::from_raw(&raw),
            _ => None,
        }
    }

    /// Writes an entry as sockops would (tests of the proxy side).
    pub fn insert_raw(&self, client: SocketAddr, raw: &RawOrigDst) -> std::io::Result<()> {
        let key = RawConnKey::from_client(client);
        sys::map_update(self.fd(), key_bytes(&key), raw.as_bytes())
    }

    /// Lookups that found an entry.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that found no (valid) entry: connections the proxy closed.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Lookups that failed with a system error (also counted as misses).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

fn key_bytes(key: &RawConnKey) -> &[u8] {
    // SAFETY: RawConnKey is repr(C) POD without padding (pad is a field).
    unsafe { std::slice::from_raw_parts((key as *const RawConnKey).cast::<u8>(), size_of::<RawConnKey>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_records_are_refused() {
        let mut raw = RawOrigDst {
            addr: std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets(),
            port: 443,
            family: abi::AF_INET,
            protocol: abi::IPPROTO_TCP,
            tgid: 7,
            cgroup_id: 9,
            netns_cookie: 1,
            sock_cookie: 2,
        };
        let o = OrigDst::from_raw(&raw).unwrap();
        assert_eq!(o.dst, "10.0.0.1:443".parse().unwrap());
        assert_eq!(o.transport, Transport::Tcp);
        assert_eq!((o.pid, o.cgroup_id, o.socket_cookie), (7, 9, 2));
        raw.protocol = 1;
        assert!(OrigDst::from_raw(&raw).is_none());
        raw.protocol = abi::IPPROTO_UDP;
        raw.family = 0;
        assert!(OrigDst::from_raw(&raw).is_none());
    }
}
