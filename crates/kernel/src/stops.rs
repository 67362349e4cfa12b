//! The emergency stop's kernel side: `sluice_stopped`, a pinned map the connect and sendmsg
//! programs read before anything else they decide (see `ebpf/sluice.bpf.c`). A sandbox whose
//! cgroup id is a key, or every sandbox while the [`abi::STOP_ALL`] key is present, gets `EPERM`
//! from `connect(2)` and from a DNS `sendmsg(2)`.
//!
//! The map is pinned with the others, so a stop holds while no daemon runs; the daemon writes
//! the whole wanted set again at start ([`StopMap::apply`]). It never empties the map first:
//! keys are added before stale ones are removed, so a sandbox that stays stopped is never let
//! through, even for an instant. More stopped sandboxes than the map holds are refused all
//! together (the [`abi::STOP_ALL`] key), never some left out.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use super::{abi, sys};

/// What must be refused: every sandbox, and/or the sandboxes with these cgroup ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopTargets {
    pub all: bool,
    pub cgroups: BTreeSet<u64>,
}

impl StopTargets {
    /// The map's keys for this set: [`abi::STOP_ALL`] for `all`, and each cgroup id; more
    /// cgroups than the map holds become [`abi::STOP_ALL`] (refuse more, never less).
    pub fn keys(&self) -> BTreeSet<u64> {
        let room = abi::STOPPED_ENTRIES.saturating_sub(1) as usize;
        let mut keys: BTreeSet<u64> = self.cgroups.iter().copied().filter(|&id| id != abi::STOP_ALL).collect();
        if keys.len() > room {
            keys.clear();
            keys.insert(abi::STOP_ALL);
            return keys;
        }
        if self.all {
            keys.insert(abi::STOP_ALL);
        }
        keys
    }
}

/// The pinned `sluice_stopped` map.
#[derive(Debug)]
pub struct StopMap {
    fd: OwnedFd,
}

const STOPPED: [u8; 4] = 1u32.to_ne_bytes();

impl StopMap {
    /// Opens the map pinned at `path`, checking that it is the map this version writes (a hash of
    /// `u64` → `u32`).
    pub fn from_pin(path: &Path) -> io::Result<Self> {
        let fd = sys::obj_get(path)?;
        let info = sys::map_info(fd.as_fd())?;
        if info.key_size != 8 || info.value_size != 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not the emergency-stop map (key {} bytes, value {} bytes; expected 8 and 4)",
                    path.display(),
                    info.key_size,
                    info.value_size
                ),
            ));
        }
        Ok(Self { fd })
    }

    /// The keys in the map now (cgroup ids, and [`abi::STOP_ALL`] if present).
    pub fn keys(&self) -> io::Result<BTreeSet<u64>> {
        let mut out = BTreeSet::new();
        let mut cur: Option<[u8; 8]> = None;
        // Bounded: a concurrent change can restart the walk from the first key, hence the margin.
        for _ in 0..abi::STOPPED_ENTRIES.saturating_mul(2) {
            let mut next = [0u8; 8];
            if !sys::map_next_key(self.fd.as_fd(), cur.as_ref().map(|k| &k[..]), &mut next)? {
                break;
            }
            out.insert(u64::from_ne_bytes(next));
            cur = Some(next);
        }
        Ok(out)
    }

    /// Whether every sandbox is refused now.
    pub fn all_stopped(&self) -> io::Result<bool> {
        let mut value = [0u8; 4];
        sys::map_lookup(self.fd.as_fd(), &abi::STOP_ALL.to_ne_bytes(), &mut value)
    }

    /// Makes the map hold exactly `targets`' keys: adds what is missing first (the "all" key
    /// before any other), then removes what is no longer wanted. On an error part-way, the map
    /// holds at least every wanted key written so far and every stale one not yet removed: it
    /// refuses more than asked, never less, and the caller reports the error.
    pub fn apply(&self, targets: &StopTargets) -> io::Result<()> {
        let want = targets.keys();
        let have = self.keys()?;
        for key in want.iter().filter(|k| !have.contains(k)) {
            if let Err(e) = sys::map_update(self.fd.as_fd(), &key.to_ne_bytes(), &STOPPED) {
                // Full (E2BIG): refuse every sandbox instead of leaving this one out.
                if *key != abi::STOP_ALL {
                    sys::map_update(self.fd.as_fd(), &abi::STOP_ALL.to_ne_bytes(), &STOPPED)?;
                }
                return Err(e);
            }
        }
        for key in have.iter().filter(|k| !want.contains(k)) {
            sys::map_delete(self.fd.as_fd(), &key.to_ne_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_all_and_each_cgroup_and_overflow_stops_everything() {
        let t = StopTargets { all: false, cgroups: [7, 9].into() };
        assert_eq!(t.keys(), [7, 9].into());
        let t = StopTargets { all: true, cgroups: [7].into() };
        assert_eq!(t.keys(), [abi::STOP_ALL, 7].into());
        assert!(StopTargets::default().keys().is_empty());
        // A cgroup id of 0 cannot exist; it is never mistaken for a sandbox.
        let t = StopTargets { all: false, cgroups: [0, 5].into() };
        assert_eq!(t.keys(), [5].into());
        let many = StopTargets { all: false, cgroups: (1..=u64::from(abi::STOPPED_ENTRIES)).collect() };
        assert_eq!(many.keys(), [abi::STOP_ALL].into(), "more sandboxes than the map holds: all refused");
    }
}
