//! The price lock: which catalog version's price a passport pays for a call.
//!
//! The first call of a passport at a gate records the version then in force. From then on the
//! passport pays the lower of that version's price and the current one: a price increase does not
//! reach it until it expires, a decrease reaches it at once. A permission the current version no
//! longer offers is not offered, locked or not (the lock holds prices, not the offer). A
//! permission added after the lock is priced by the current version. Prices compare by their
//! total, fee included.

use crate::snapshot::Snapshot;

/// The price of one call: the catalog's per-call price and the platform fee on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub per_call_millicents: u64,
    pub fee_basis_points: u64,
}

impl Price {
    /// The fee in millicents: `per_call × basis points / 10,000`, rounded up so the fee charged
    /// is never less than the one published.
    pub fn fee_millicents(&self) -> u64 {
        let fee = u128::from(self.per_call_millicents) * u128::from(self.fee_basis_points);
        u64::try_from(fee.div_ceil(10_000)).unwrap_or(u64::MAX)
    }

    /// What one call costs, fee included (saturating: a bound check refuses the saturated value).
    pub fn total_millicents(&self) -> u64 {
        self.per_call_millicents.saturating_add(self.fee_millicents())
    }
}

/// Where the price a call pays comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    /// The version in force now.
    Current { version: u64 },
    /// The version the passport locked (cheaper than the current one).
    Locked { version: u64 },
}

impl PriceSource {
    /// The version whose price is paid: what a gate record's `catalog_version` names.
    pub fn version(self) -> u64 {
        match self {
            PriceSource::Current { version } | PriceSource::Locked { version } => version,
        }
    }
}

/// The price `permission` costs a passport that locked `locked` (its first call's version, if
/// it made one), with `current` in force. `None` if `current` does not offer the permission.
pub fn effective_price(
    locked: Option<&Snapshot>,
    current: &Snapshot,
    permission: &str,
) -> Option<(Price, PriceSource)> {
    let now = current.permission(permission)?.terms.price();
    let cur = (now, PriceSource::Current { version: current.version });
    let Some(lock) = locked else { return Some(cur) };
    match lock.permission(permission) {
        Some(p) if p.terms.price().total_millicents() < now.total_millicents() => {
            Some((p.terms.price(), PriceSource::Locked { version: lock.version }))
        }
        _ => Some(cur),
    }
}
