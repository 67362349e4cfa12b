//! The connection table: client (address, port) → what the agent dialed.
//!
//! sockops fills it when an agent's SYN is about to leave; the proxy looks
//! each accepted connection up once, right after `accept`, and the lookup
//! removes the entry (one atomic `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, so two
//! tasks can never both claim it). A connection with no entry did not come
//! through the redirect: the proxy must close it.
//!
//! Fairness between sandboxes: the table is a plain hash (nothing is evicted),
//! and every entry belongs to an open agent socket holding one of its
//! sandbox's slots. connect4/6 take the slot (refusing the connect with EPERM
//! when the sandbox already holds `[sandbox] max_tcp_sockets`), `sock_release`
//! gives it back exactly once and removes an entry the proxy never took. So a
//! flooding sandbox is refused at its own quota and cannot evict, overwrite or
//! use up the entries of another. The slot counters (`sluice_quota`, by cgroup
//! id) are pinned with the table and survive a daemon restart;
//! [`Conntable::forget_dead_sandboxes`] removes those of cgroups that are gone.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::abi::{self, RawConnKey, RawOrigDst, RawQuota};
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
    /// `sluice_quota` and `sluice_stats` (see [`Conntable::sandbox_slots`], [`Conntable::kernel_stats`]).
    quota: Option<OwnedFd>,
    stats: Option<OwnedFd>,
    /// The proxy's and the resolver's ports (the loader's configuration).
    ports: Option<(u16, u16)>,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

impl Conntable {
    /// A table over an open map descriptor (the loader's or a pin's). Any other descriptor makes
    /// every lookup fail, counted as an error and a miss (the daemon's metrics tests use that).
    pub fn new(map: OwnedFd) -> Self {
        Self {
            map,
            udp: None,
            quota: None,
            stats: None,
            ports: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Adds the pinned slot counters and event counters (the loader does).
    pub(crate) fn with_quota_and_stats(mut self, quota: OwnedFd, stats: OwnedFd) -> Self {
        self.quota = Some(quota);
        self.stats = Some(stats);
        self
    }

    /// The kernel's event counters ([`abi::STATS`] names), summed over CPUs, in index order.
    /// `None` without the stats map; a counter that cannot be read is left out.
    pub fn kernel_stats(&self) -> Option<Vec<(&'static str, u64)>> {
        let map = self.stats.as_ref()?;
        let cpus = match sys::possible_cpus() {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "cannot read the number of CPUs; kernel counters unavailable");
                return None;
            }
        };
        let mut out = Vec::with_capacity(abi::STATS.len());
        for (index, name) in abi::STATS.iter().enumerate() {
            let key = (index as u32).to_ne_bytes();
            match sys::percpu_u64_sum(map.as_fd(), &key, cpus) {
                Ok(Some(sum)) => out.push((*name, sum)),
                Ok(None) => {}
                Err(error) => tracing::warn!(counter = name, %error, "reading a kernel counter failed"),
            }
        }
        Some(out)
    }

    /// One kernel counter by its [`abi::STATS`] name (tests, tools).
    pub fn kernel_stat(&self, name: &str) -> Option<u64> {
        self.kernel_stats()?.into_iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The slot counter of the sandbox whose cgroup id is `cgroup_id`: sockets holding a slot,
    /// connects refused at the quota. `None`: no counter (the sandbox never connected, or its
    /// counter was removed).
    pub fn sandbox_slots(&self, cgroup_id: u64) -> Option<RawQuota> {
        let map = self.quota.as_ref()?;
        let mut raw = RawQuota::default();
        // SAFETY: RawQuota is repr(C) POD without padding; every byte pattern is valid.
        let value =
            unsafe { std::slice::from_raw_parts_mut((&mut raw as *mut RawQuota).cast::<u8>(), size_of::<RawQuota>()) };
        match sys::map_lookup(map.as_fd(), &cgroup_id.to_ne_bytes(), value) {
            Ok(true) => Some(raw),
            _ => None,
        }
    }

    /// Entries in the table now (walks the keys; diagnostics and tests).
    pub fn entry_count(&self) -> std::io::Result<usize> {
        let mut n = 0;
        let mut cur: Option<[u8; size_of::<RawConnKey>()]> = None;
        while n < abi::CONNTABLE_ENTRIES as usize {
            let mut next = [0u8; size_of::<RawConnKey>()];
            if !sys::map_next_key(self.fd(), cur.as_ref().map(|k| &k[..]), &mut next)? {
                break;
            }
            n += 1;
            cur = Some(next);
        }
        Ok(n)
    }

    /// Every sandbox's slot counter, by cgroup id (at most [`abi::QUOTA_ENTRIES`]), sorted.
    /// `None` without the counter map.
    pub fn sandbox_counters(&self) -> Option<Vec<(u64, RawQuota)>> {
        let map = self.quota.as_ref()?;
        let mut out = Vec::new();
        let mut cur: Option<[u8; 8]> = None;
        for _ in 0..abi::QUOTA_ENTRIES {
            let mut next = [0u8; 8];
            match sys::map_next_key(map.as_fd(), cur.as_ref().map(|k| &k[..]), &mut next) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => {
                    tracing::warn!(%error, "reading the slot counters failed");
                    break;
                }
            }
            let id = u64::from_ne_bytes(next);
            if let Some(q) = self.sandbox_slots(id) {
                out.push((id, q));
            }
            cur = Some(next);
        }
        out.sort_unstable_by_key(|(id, _)| *id);
        out.dedup_by_key(|(id, _)| *id);
        Some(out)
    }

    /// Removes the slot counters of cgroups that no longer exist below `agents` (the agents
    /// cgroup). cgroup ids are never reused and a removed cgroup holds no task, so nothing can
    /// take a slot under such an id again; sockets of it still open just find no counter when
    /// they close. The keys are read before the tree is walked, so a sandbox created meanwhile
    /// is never mistaken for a dead one. Returns how many were removed.
    pub fn forget_dead_sandboxes(&self, agents: &Path) -> std::io::Result<usize> {
        let Some(map) = self.quota.as_ref() else { return Ok(0) };
        let mut keys = Vec::new();
        let mut cur: Option<[u8; 8]> = None;
        // Bounded: the map holds at most QUOTA_ENTRIES keys (a concurrent change can restart the
        // walk from the first key, hence the margin).
        for _ in 0..abi::QUOTA_ENTRIES.saturating_mul(2) {
            let mut next = [0u8; 8];
            if !sys::map_next_key(map.as_fd(), cur.as_ref().map(|k| &k[..]), &mut next)? {
                break;
            }
            keys.push(u64::from_ne_bytes(next));
            cur = Some(next);
        }
        let live = live_cgroup_ids(agents)?;
        let mut removed = 0;
        for id in keys.into_iter().collect::<HashSet<_>>() {
            if !live.contains(&id) && sys::map_delete(map.as_fd(), &id.to_ne_bytes())? {
                removed += 1;
            }
        }
        Ok(removed)
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
        let key = RawConnKey::udp(client);
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

    /// Adds the redirect ports (the loader does), for [`Self::lookup_proxy`] and
    /// [`Self::lookup_resolver`].
    pub(crate) fn with_ports(mut self, proxy: u16, resolver: u16) -> Self {
        self.ports = Some((proxy, resolver));
        self
    }

    /// [`Self::lookup`] for a connection accepted on the proxy port.
    pub fn lookup_proxy(&self, client: SocketAddr) -> Option<OrigDst> {
        self.lookup(client, self.ports.map_or(0, |p| p.0))
    }

    /// [`Self::lookup`] for a connection accepted on the resolver's TCP port.
    pub fn lookup_resolver(&self, client: SocketAddr) -> Option<OrigDst> {
        self.lookup(client, self.ports.map_or(0, |p| p.1))
    }

    /// Takes the entry for the connection accepted on `server_port` whose peer is `client`.
    /// `None` (counted in [`Self::misses`]) means: not redirected by us, or
    /// the agent already closed its socket, or malformed — close the connection.
    pub fn lookup(&self, client: SocketAddr, server_port: u16) -> Option<OrigDst> {
        let key = RawConnKey::tcp(client, server_port);
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
    pub fn peek(&self, client: SocketAddr, server_port: u16) -> Option<OrigDst> {
        let key = RawConnKey::tcp(client, server_port);
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
    pub fn insert_raw(&self, client: SocketAddr, server_port: u16, raw: &RawOrigDst) -> std::io::Result<()> {
        let key = RawConnKey::tcp(client, server_port);
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

/// Most cgroups walked below the agents cgroup: far more than sandboxes can exist at once.
const MAX_CGROUPS: usize = 100_000;

/// The ids (directory inode numbers) of `root` and every cgroup below it. Symbolic links are not
/// followed (cgroupfs has none); a directory removed during the walk is skipped.
fn live_cgroup_ids(root: &Path) -> std::io::Result<HashSet<u64>> {
    let mut ids = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    ids.insert(std::fs::metadata(root)?.ino());
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && !meta.file_type().is_symlink() {
                if ids.len() >= MAX_CGROUPS {
                    return Err(std::io::Error::other(format!(
                        "more than {MAX_CGROUPS} cgroups below {}",
                        root.display()
                    )));
                }
                ids.insert(meta.ino());
                stack.push(entry.path());
            }
        }
    }
    Ok(ids)
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
