//! Reading the fleet's budget claims for `sluice fleet status`: for each budget hash
//! (`P:budget:<passport>:<limit>:<window>`, see [`super::lease`]) what each host may spend in the
//! window, its claim: what it spent plus the unused part of its lease. Redis holds claims only;
//! what a host actually spent is in its own attested log.
//!
//! Read-only, bounded ([`MAX_BUDGET_KEYS`]), and nothing read here is trusted for a decision.

use super::{FleetError, Keys, RedisConn};
use serde::Serialize;

/// Most budget hashes read (SCAN stops there and says so).
pub const MAX_BUDGET_KEYS: usize = 10_000;
/// Keys asked per SCAN round.
const SCAN_COUNT: usize = 500;

/// One host's claim on one window of one limit of one passport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub passport: String,
    /// `cap-daily`, `rate-minute`, ... (the lease module's limit names).
    pub limit: String,
    pub window: String,
    pub host: String,
    pub claim: u64,
    /// `cents` for a spend cap, `requests` for a rate limit.
    pub unit: &'static str,
}

/// Every claim Redis holds, and whether the read stopped at [`MAX_BUDGET_KEYS`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Claims {
    pub claims: Vec<Claim>,
    pub truncated: bool,
    /// Budget keys or fields that are not what the lease module writes (skipped).
    pub unreadable: Vec<String>,
}

/// The (passport, limit, window) of a budget key, if it is one under `keys`' prefix.
pub fn parse_budget_key(keys: &Keys, key: &str) -> Option<(String, String, String)> {
    let rest = key.strip_prefix(&format!("{}:budget:", keys.prefix()))?;
    let mut parts = rest.split(':');
    let (Some(passport), Some(limit), Some(window), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if passport.is_empty() || window.is_empty() || keys.budget(passport, limit, window) != key {
        return None;
    }
    let unit_known = limit.starts_with("cap-") || limit.starts_with("rate-");
    unit_known.then(|| (passport.to_string(), limit.to_string(), window.to_string()))
}

/// Reads every budget hash under the prefix (SCAN, then HGETALL each).
pub async fn read_claims(conn: &RedisConn, keys: &Keys) -> Result<Claims, FleetError> {
    let pattern = format!("{}:budget:*", keys.prefix());
    let mut found: Vec<String> = Vec::new();
    let mut cursor = "0".to_string();
    let mut out = Claims::default();
    loop {
        let (next, batch): (String, Vec<String>) =
            conn.query(redis::cmd("SCAN").arg(&cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT)).await?;
        found.extend(batch);
        if found.len() >= MAX_BUDGET_KEYS {
            found.truncate(MAX_BUDGET_KEYS);
            out.truncated = next != "0";
            break;
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    found.sort();
    found.dedup();
    for key in found {
        let Some((passport, limit, window)) = parse_budget_key(keys, &key) else {
            out.unreadable.push(format!("{key}: not a budget key"));
            continue;
        };
        let unit = if limit.starts_with("cap-") { "cents" } else { "requests" };
        let fields: Vec<(String, String)> = conn.query(redis::cmd("HGETALL").arg(&key)).await?;
        for (host, value) in fields {
            match value.parse::<u64>() {
                Ok(claim) => out.claims.push(Claim {
                    passport: passport.clone(),
                    limit: limit.clone(),
                    window: window.clone(),
                    host,
                    claim,
                    unit,
                }),
                Err(_) => out.unreadable.push(format!("{key} field {host}: {value:?} is not a whole number")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keys_are_read_back_exactly_as_the_lease_module_writes_them() {
        let k = Keys::new("prod.sluice");
        let key = k.budget("pp_abc-_x", "cap-daily", "2026-12-02");
        assert_eq!(
            parse_budget_key(&k, &key),
            Some(("pp_abc-_x".to_string(), "cap-daily".to_string(), "2026-12-02".to_string()))
        );
        let rate = k.budget("pp_a", "rate-minute", "r60-1764662400");
        assert_eq!(
            parse_budget_key(&k, &rate).map(|(_, l, w)| (l, w)),
            Some(("rate-minute".into(), "r60-1764662400".into()))
        );
        for bad in [
            "other:budget:pp_a:cap-daily:2026-12-02",
            "prod.sluice:budget:pp_a:cap-daily",
            "prod.sluice:budget:pp_a:cap-daily:2026-12-02:extra",
            "prod.sluice:budget::cap-daily:2026-12-02",
            "prod.sluice:budget:pp_a:weird:2026-12-02",
            "prod.sluice:budget:pp_a:cap-daily:",
        ] {
            assert_eq!(parse_budget_key(&k, bad), None, "{bad}");
        }
    }
}
