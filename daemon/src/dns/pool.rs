//! Synthetic addresses: the agents' resolver answers allowed names with addresses from a private
//! pool, and the proxy maps the address an agent dialed back to the name.
//!
//! Defaults, and why:
//! * IPv4 `198.18.0.0/15` is reserved for benchmarking (RFC 2544 / RFC 6890), never routed on the
//!   internet and almost never used on real LANs, so a synthetic address cannot collide with a
//!   real destination an operator cares about. 131,070 usable addresses.
//! * IPv6 `fd00:5c::/64` is a unique-local prefix (RFC 4193); `5c` is "sluice".
//!
//! Entry `i` of the pool owns the `i`-th address of both ranges, so a name's A and AAAA answers
//! come and go together. The mapping is stable while the name is in use and bounded: when the pool
//! is full, the least recently used name is recycled, but only if it has been idle for at least
//! [`PoolConfig::min_idle`] (default ten minutes, far above the 5-second TTL), so an address an
//! agent may still hold is not handed to another name under it. If no entry is that idle the pool
//! is exhausted and the resolver answers SERVFAIL: fail closed, never a wrong mapping.

use crate::domain::DomainName;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("synthetic IPv4 range {0}/{1}: must lie inside 198.18.0.0/15, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10 and hold at least 4 addresses")]
    BadV4(Ipv4Addr, u8),
    #[error("synthetic IPv6 range {0}/{1}: must lie inside fc00::/7 (unique local) with a prefix of /64 to /126")]
    BadV6(Ipv6Addr, u8),
}

/// Ranges and limits of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub v4: (Ipv4Addr, u8),
    pub v6: (Ipv6Addr, u8),
    /// Upper bound on names held at once (also bounded by the size of the ranges).
    pub max_entries: usize,
    /// A name idle for less than this is never recycled.
    pub min_idle: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            v4: (Ipv4Addr::new(198, 18, 0, 0), 15),
            v6: (Ipv6Addr::new(0xfd00, 0x5c, 0, 0, 0, 0, 0, 0), 64),
            max_entries: 65_536,
            min_idle: Duration::from_secs(600),
        }
    }
}

/// The name ↔ address table. Thread-safe; every method takes `&self`.
#[derive(Debug)]
pub struct SyntheticPool {
    v4_base: u32,
    v6_base: u128,
    v4_mask: u32,
    v6_mask: u128,
    capacity: u32,
    min_idle: Duration,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    by_name: HashMap<DomainName, u32>,
    /// Index → entry; index 0 is never used (it would be the network address).
    entries: HashMap<u32, Entry>,
    /// (last-use tick, index), oldest first.
    lru: BTreeSet<(u64, u32)>,
    tick: u64,
    next_fresh: u32,
}

#[derive(Debug)]
struct Entry {
    name: DomainName,
    tick: u64,
    last_used: Instant,
}

impl SyntheticPool {
    pub fn new(config: &PoolConfig) -> Result<SyntheticPool, PoolError> {
        let (v4, v4_len) = config.v4;
        let (v6, v6_len) = config.v6;
        let v4_ok = v4_len <= 30
            && [
                ((198, 18, 0, 0), 15),
                ((10, 0, 0, 0), 8),
                ((172, 16, 0, 0), 12),
                ((192, 168, 0, 0), 16),
                ((100, 64, 0, 0), 10),
            ]
            .iter()
            .any(|&((a, b, c, d), len)| v4_len >= len && in_v4(v4, Ipv4Addr::new(a, b, c, d), len));
        if !v4_ok {
            return Err(PoolError::BadV4(v4, v4_len));
        }
        let v6_ok = (64..=126).contains(&v6_len) && (u128::from(v6) >> 121) == (0xfc00u128 << 112) >> 121;
        if !v6_ok {
            return Err(PoolError::BadV6(v6, v6_len));
        }
        let v4_mask = u32::MAX.checked_shl(32 - u32::from(v4_len)).unwrap_or(0);
        let v6_mask = u128::MAX.checked_shl(128 - u32::from(v6_len)).unwrap_or(0);
        let v4_hosts = !v4_mask; // excludes index 0; the last (broadcast-looking) index is skipped too
        let v6_hosts = u32::try_from(!v6_mask).unwrap_or(u32::MAX);
        let capacity =
            v4_hosts.saturating_sub(1).min(v6_hosts).min(u32::try_from(config.max_entries).unwrap_or(u32::MAX));
        Ok(SyntheticPool {
            v4_base: u32::from(v4) & v4_mask,
            v6_base: u128::from(v6) & v6_mask,
            v4_mask,
            v6_mask,
            capacity,
            min_idle: config.min_idle,
            state: Mutex::new(PoolState { next_fresh: 1, ..PoolState::default() }),
        })
    }

    /// Most names held at once.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Names held now.
    pub fn len(&self) -> usize {
        self.lock().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The IPv4 and IPv6 addresses of `name`, allocating them if needed. `None` when the pool is
    /// exhausted (every entry in use within `min_idle`).
    pub fn addresses(&self, name: &DomainName) -> Option<(Ipv4Addr, Ipv6Addr)> {
        let now = Instant::now();
        let mut st = self.lock();
        let index = match st.by_name.get(name).copied() {
            Some(index) => index,
            None => self.allocate(&mut st, name, now)?,
        };
        touch(&mut st, index, now);
        Some(self.addrs_of(index))
    }

    /// The name that owns `addr` (IPv4, IPv6, or IPv4-mapped IPv6), refreshing its use so a live
    /// connection keeps its mapping. `None` for addresses outside the pool or not allocated.
    pub fn lookup_addr(&self, addr: IpAddr) -> Option<DomainName> {
        let index = self.index_of(addr)?;
        let mut st = self.lock();
        let name = st.entries.get(&index)?.name.clone();
        touch(&mut st, index, Instant::now());
        Some(name)
    }

    /// True for any address inside the synthetic ranges, allocated or not. The daemon's own
    /// upstream resolution drops such addresses, and the proxy never dials them.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match canonical(addr) {
            IpAddr::V4(v4) => u32::from(v4) & self.v4_mask == self.v4_base,
            IpAddr::V6(v6) => u128::from(v6) & self.v6_mask == self.v6_base,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate(&self, st: &mut PoolState, name: &DomainName, now: Instant) -> Option<u32> {
        let index = if st.next_fresh <= self.capacity {
            let index = st.next_fresh;
            st.next_fresh += 1;
            index
        } else {
            let &(tick, index) = st.lru.first()?;
            let idle = st.entries.get(&index).map(|e| now.saturating_duration_since(e.last_used))?;
            if idle < self.min_idle {
                return None;
            }
            st.lru.remove(&(tick, index));
            if let Some(old) = st.entries.remove(&index) {
                st.by_name.remove(&old.name);
            }
            index
        };
        st.by_name.insert(name.clone(), index);
        st.entries.insert(index, Entry { name: name.clone(), tick: 0, last_used: now });
        st.lru.insert((0, index));
        Some(index)
    }

    fn addrs_of(&self, index: u32) -> (Ipv4Addr, Ipv6Addr) {
        (Ipv4Addr::from(self.v4_base | index), Ipv6Addr::from(self.v6_base | u128::from(index)))
    }

    fn index_of(&self, addr: IpAddr) -> Option<u32> {
        let index = match canonical(addr) {
            IpAddr::V4(v4) => {
                let a = u32::from(v4);
                (a & self.v4_mask == self.v4_base).then_some(a & !self.v4_mask)?
            }
            IpAddr::V6(v6) => {
                let a = u128::from(v6);
                u32::try_from((a & self.v6_mask == self.v6_base).then_some(a & !self.v6_mask)?).ok()?
            }
        };
        (1..=self.capacity).contains(&index).then_some(index)
    }
}

fn touch(st: &mut PoolState, index: u32, now: Instant) {
    st.tick += 1;
    let tick = st.tick;
    if let Some(entry) = st.entries.get_mut(&index) {
        st.lru.remove(&(entry.tick, index));
        entry.tick = tick;
        entry.last_used = now;
        st.lru.insert((tick, index));
    }
}

fn in_v4(addr: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address it maps.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn small(min_idle: Duration) -> SyntheticPool {
        // /29: indices 1..=6 usable.
        let config = PoolConfig { v4: (Ipv4Addr::new(198, 18, 0, 0), 29), min_idle, ..PoolConfig::default() };
        SyntheticPool::new(&config).unwrap()
    }

    #[test]
    fn mapping_is_stable_and_reversible() {
        let pool = SyntheticPool::new(&PoolConfig::default()).unwrap();
        let (v4, v6) = pool.addresses(&name("a.example.com")).unwrap();
        assert_eq!(v4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(v6, "fd00:5c::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(pool.addresses(&name("A.Example.com.")).unwrap(), (v4, v6));
        let (w4, _) = pool.addresses(&name("b.example.com")).unwrap();
        assert_ne!(v4, w4);
        for addr in [IpAddr::V4(v4), IpAddr::V6(v6), IpAddr::V6(v4.to_ipv6_mapped())] {
            assert_eq!(pool.lookup_addr(addr), Some(name("a.example.com")), "{addr}");
        }
        for addr in ["198.18.0.200", "198.18.0.0", "10.0.0.1", "fd00:5c::99", "fd00:5d::1", "::1"] {
            assert_eq!(pool.lookup_addr(addr.parse().unwrap()), None, "{addr}");
        }
        assert!(pool.contains("198.19.255.255".parse().unwrap()));
        assert!(!pool.contains("198.20.0.1".parse().unwrap()));
        assert_eq!(pool.capacity(), 65_536);
    }

    #[test]
    fn bounded_pool_recycles_least_recently_used_idle_names() {
        let pool = small(Duration::ZERO);
        assert_eq!(pool.capacity(), 6);
        for i in 0..6 {
            pool.addresses(&name(&format!("n{i}.test"))).unwrap();
        }
        // n0 is used again; n1 is now the least recently used and gets recycled.
        let (n0, _) = pool.addresses(&name("n0.test")).unwrap();
        let (n1, _) = pool.addresses(&name("n1.test")).unwrap();
        pool.lookup_addr(IpAddr::V4(n1)).unwrap();
        let (fresh, _) = pool.addresses(&name("fresh.test")).unwrap();
        assert_eq!(pool.len(), 6);
        assert_eq!(pool.lookup_addr(IpAddr::V4(fresh)), Some(name("fresh.test")));
        assert_eq!(pool.lookup_addr(IpAddr::V4(n0)), Some(name("n0.test")));
        assert_eq!(pool.lookup_addr(IpAddr::V4(n1)), Some(name("n1.test")));
        assert_eq!(fresh, Ipv4Addr::new(198, 18, 0, 3), "n2 was the least recently used");
        for i in 0..100 {
            pool.addresses(&name(&format!("flood{i}.test"))).unwrap();
            assert!(pool.len() <= 6);
        }
    }

    #[test]
    fn a_pool_whose_names_are_all_in_use_is_exhausted_not_reused() {
        let pool = small(Duration::from_secs(3600));
        let held: Vec<_> = (0..6).map(|i| pool.addresses(&name(&format!("h{i}.test"))).unwrap()).collect();
        assert_eq!(pool.addresses(&name("one-more.test")), None);
        for (i, (v4, _)) in held.iter().enumerate() {
            assert_eq!(pool.lookup_addr(IpAddr::V4(*v4)), Some(name(&format!("h{i}.test"))));
        }
    }

    #[test]
    fn ranges_must_be_private() {
        let with = |v4: (Ipv4Addr, u8), v6: (Ipv6Addr, u8)| {
            SyntheticPool::new(&PoolConfig { v4, v6, ..PoolConfig::default() })
        };
        let v6 = PoolConfig::default().v6;
        let v4 = PoolConfig::default().v4;
        assert!(with((Ipv4Addr::new(10, 77, 0, 0), 16), v6).is_ok());
        assert!(with((Ipv4Addr::new(8, 8, 8, 0), 24), v6).is_err());
        assert!(with((Ipv4Addr::new(198, 16, 0, 0), 14), v6).is_err(), "wider than the reserved /15");
        assert!(with((Ipv4Addr::new(10, 0, 0, 0), 31), v6).is_err(), "too small");
        assert!(with(v4, ("2001:db8::".parse().unwrap(), 64)).is_err());
        assert!(with(v4, ("fd12:3456::".parse().unwrap(), 48)).is_err(), "prefix shorter than /64");
    }
}
