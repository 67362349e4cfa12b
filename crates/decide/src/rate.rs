//! Request-rate limits: the generic cell rate algorithm (GCRA), in exact integer arithmetic.
//!
//! # Why GCRA
//! A fixed-window counter ("60 per calendar minute") lets an agent send 60 requests at 00:00:59.9
//! and 60 more at 00:01:00.1: 2× the limit in a fraction of a second. GCRA has no window edges. It
//! is a leaky bucket of capacity `N` that drains at exactly `N` per period `T`, kept as one number,
//! the *theoretical arrival time* (TAT): the time at which the bucket would be empty again.
//!
//! For a limit of `N` per `T`, each allowed request costs one *emission interval* `I = T / N`:
//!
//! ```text
//! tat     = max(stored_tat, now)
//! new_tat = tat + I
//! allow   ⇔ new_tat − now ≤ T        (the bucket, measured in time, holds at most T)
//! ```
//!
//! What this guarantees, for a limit of `N` per `T`:
//! - at most `N` requests at once (a burst drains the whole bucket); after a burst, one more every
//!   `I`: over any interval of length `L` at most `N + ⌊L / I⌋` requests, so the long-run rate is
//!   exactly `N / T` and the worst case over any single period `T` is a burst of `N` followed by
//!   `N` evenly spaced (never two bursts back to back);
//! - `N` requests just before a minute boundary and `N` just after are *not* all allowed: the
//!   second burst finds the bucket full (tested);
//! - steady traffic of exactly `N` per period is always allowed, whether evenly spaced or one
//!   burst per period (tested).
//!
//! # Exact arithmetic
//! `I = T / N` is rarely a whole number of nanoseconds (60 s / 7), and rounding it either way
//! drifts: down lets an agent gain requests, up eventually refuses a legitimate steady rate. So
//! time is measured in units of `1/N` nanosecond: `now` becomes `now_ns × N`, the interval becomes
//! exactly `T_ns`, the capacity `T_ns × N`. With `N < 2³²` and timestamps far past the year 9999
//! this stays below 2¹⁰⁰, well inside `i128`.
//!
//! # Clocks
//! Only allowed requests advance the TAT (the caller persists the new state only for an allowed
//! decision). If the clock steps backwards the stored TAT is kept, which makes the limiter
//! stricter, never looser.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// The periods a passport can limit requests over (`core:rate:max_per_minute|hour|day`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RatePeriod {
    Minute,
    Hour,
    Day,
}

impl RatePeriod {
    pub const ALL: [RatePeriod; 3] = [RatePeriod::Minute, RatePeriod::Hour, RatePeriod::Day];

    /// The period's length in seconds (a day is 86,400 s: a rolling day, not a calendar one).
    pub fn seconds(self) -> i64 {
        match self {
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3_600,
            RatePeriod::Day => 86_400,
        }
    }

    /// The passed check of a passport without this limit: `no per-minute limit`...
    pub fn no_limit(self) -> &'static str {
        match self {
            RatePeriod::Minute => "no per-minute limit",
            RatePeriod::Hour => "no per-hour limit",
            RatePeriod::Day => "no per-day limit",
        }
    }

    /// `minute`, `hour` or `day`, as in "60 requests per minute".
    pub fn as_str(self) -> &'static str {
        match self {
            RatePeriod::Minute => "minute",
            RatePeriod::Hour => "hour",
            RatePeriod::Day => "day",
        }
    }

    fn nanos(self) -> i128 {
        i128::from(self.seconds()) * NANOS_PER_SEC
    }
}

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// The stored state of one limiter. Absent state means a full bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcraState {
    /// The limit `N` the TAT is scaled by. Passports are immutable, so this always equals the
    /// passport's limit; if it ever differs, the TAT is rescaled rather than dropped.
    pub limit: u64,
    /// Theoretical arrival time in units of `1 / limit` nanoseconds since the Unix epoch.
    pub tat: i128,
}

/// The outcome of checking one request against one limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateCheck {
    /// Allowed; `state` is what to store if the request is finally allowed.
    Allowed { state: GcraState, remaining: u64 },
    /// Refused; the earliest time the next request would be allowed (`None` for a limit of 0).
    Limited { retry_at: Option<DateTime<Utc>> },
}

/// Nanoseconds since the Unix epoch, exactly (chrono's own `timestamp_nanos_opt` stops in 2262).
pub fn epoch_nanos(t: DateTime<Utc>) -> i128 {
    i128::from(t.timestamp()) * NANOS_PER_SEC + i128::from(t.timestamp_subsec_nanos())
}

fn from_epoch_nanos(ns: i128) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(ns.div_euclid(NANOS_PER_SEC)).ok()?;
    let sub = u32::try_from(ns.rem_euclid(NANOS_PER_SEC)).ok()?;
    DateTime::from_timestamp(secs, sub)
}

/// The stored TAT in this limiter's units, rescaled if it was stored for another limit.
fn scaled_tat(state: Option<&GcraState>, limit: u64) -> Option<i128> {
    let s = state?;
    if s.limit == limit {
        return Some(s.tat);
    }
    if s.limit == 0 {
        return None;
    }
    let ns = s.tat.div_euclid(i128::from(s.limit));
    Some(ns.saturating_mul(i128::from(limit)))
}

/// Checks one request at `now` against a limit of `limit` requests per `period`.
pub fn check(state: Option<&GcraState>, limit: u64, period: RatePeriod, now: DateTime<Utc>) -> RateCheck {
    if limit == 0 {
        return RateCheck::Limited { retry_at: None };
    }
    let n = i128::from(limit);
    let interval = period.nanos();
    let capacity = interval.saturating_mul(n);
    let t = epoch_nanos(now).saturating_mul(n);
    let tat = scaled_tat(state, limit).map_or(t, |stored| stored.max(t));
    let new_tat = tat.saturating_add(interval);
    let level = new_tat.saturating_sub(t);
    if level > capacity {
        // The earliest t' with new_tat − t'·n ≤ capacity, rounded up to a whole nanosecond.
        let excess = level - capacity;
        let wait_ns = (excess + n - 1) / n;
        let retry_at = from_epoch_nanos(epoch_nanos(now).saturating_add(wait_ns));
        return RateCheck::Limited { retry_at };
    }
    let remaining = u64::try_from((capacity - level) / interval).unwrap_or(0);
    RateCheck::Allowed { state: GcraState { limit, tat: new_tat }, remaining }
}

/// How many requests could be made right now without being limited.
pub fn remaining(state: Option<&GcraState>, limit: u64, period: RatePeriod, now: DateTime<Utc>) -> u64 {
    if limit == 0 {
        return 0;
    }
    let n = i128::from(limit);
    let interval = period.nanos();
    let capacity = interval.saturating_mul(n);
    let t = epoch_nanos(now).saturating_mul(n);
    let tat = scaled_tat(state, limit).map_or(t, |stored| stored.max(t));
    let level = tat.saturating_sub(t);
    u64::try_from((capacity.saturating_sub(level)).max(0) / interval).unwrap_or(0).min(limit)
}

/// When the bucket will be full again (no recent requests count against the limit).
pub fn full_at(state: Option<&GcraState>, limit: u64, now: DateTime<Utc>) -> DateTime<Utc> {
    match scaled_tat(state, limit) {
        Some(tat) if limit > 0 => {
            let ns = tat.div_euclid(i128::from(limit)) + i128::from(tat.rem_euclid(i128::from(limit)) != 0);
            from_epoch_nanos(ns).map_or(now, |t| t.max(now))
        }
        _ => now,
    }
}

/// Whole seconds from `now` until `at`, rounded up (for "retry in 3s").
pub fn seconds_until(now: DateTime<Utc>, at: DateTime<Utc>) -> i64 {
    let d = at.signed_duration_since(now);
    if d <= TimeDelta::zero() {
        return 0;
    }
    let secs = d.num_seconds();
    if d > TimeDelta::seconds(secs) {
        secs.saturating_add(1)
    } else {
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64, millis: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(1_777_593_600 + secs, millis * 1_000_000).unwrap()
    }

    /// Sends `count` requests at `now`, storing state for each allowed one; returns how many passed.
    fn burst(state: &mut Option<GcraState>, limit: u64, period: RatePeriod, now: DateTime<Utc>, count: u64) -> u64 {
        let mut allowed = 0;
        for _ in 0..count {
            if let RateCheck::Allowed { state: s, .. } = check(state.as_ref(), limit, period, now) {
                *state = Some(s);
                allowed += 1;
            }
        }
        allowed
    }

    #[test]
    fn a_full_bucket_allows_exactly_n_at_once() {
        let mut s = None;
        assert_eq!(burst(&mut s, 60, RatePeriod::Minute, t(0, 0), 100), 60);
    }

    #[test]
    fn n_before_and_n_after_a_minute_boundary_are_not_all_allowed() {
        // t(0) is 2026-05-01T00:00:00Z, a minute (and day) boundary.
        let mut s = None;
        let before = burst(&mut s, 60, RatePeriod::Minute, t(-1, 900), 60);
        let after = burst(&mut s, 60, RatePeriod::Minute, t(0, 100), 60);
        assert_eq!(before, 60);
        // 0.2 s later only 0.2 s worth of the rate (1 per second) has drained: nothing more.
        assert_eq!(after, 0);
        // A fixed-window counter would have allowed 120 here; over the whole following minute the
        // limiter lets through one per second, never a second burst.
        let later = burst(&mut s, 60, RatePeriod::Minute, t(30, 100), 60);
        assert_eq!(later, 30);
    }

    #[test]
    fn steady_evenly_spaced_traffic_at_exactly_the_limit_is_always_allowed() {
        // 7 per minute: the interval (8.571428… s) is not a whole number of nanoseconds.
        let mut s = None;
        for k in 0..7 * 500 {
            // Request k at floor(k × 60 s / 7): on the exact schedule, up to 1 ns early.
            let at_ns = epoch_nanos(t(0, 0)) + (k as i128 * 60 * 1_000_000_000).div_euclid(7);
            let at = from_epoch_nanos(at_ns).unwrap();
            match check(s.as_ref(), 7, RatePeriod::Minute, at) {
                RateCheck::Allowed { state, .. } => s = Some(state),
                RateCheck::Limited { .. } => panic!("request {k} at the exact limit was refused"),
            }
        }
    }

    #[test]
    fn one_burst_of_n_per_period_is_always_allowed() {
        let mut s = None;
        for period in 0..50 {
            assert_eq!(burst(&mut s, 10, RatePeriod::Hour, t(period * 3_600, 0), 10), 10, "period {period}");
            assert_eq!(burst(&mut s, 10, RatePeriod::Hour, t(period * 3_600, 1), 1), 0, "period {period}");
        }
    }

    #[test]
    fn refusal_says_when_to_retry() {
        let mut s = None;
        burst(&mut s, 2, RatePeriod::Minute, t(0, 0), 2);
        match check(s.as_ref(), 2, RatePeriod::Minute, t(10, 0)) {
            RateCheck::Limited { retry_at } => assert_eq!(retry_at, Some(t(30, 0))),
            other => panic!("{other:?}"),
        }
        assert_eq!(burst(&mut s, 2, RatePeriod::Minute, t(29, 999), 1), 0);
        assert_eq!(burst(&mut s, 2, RatePeriod::Minute, t(30, 0), 1), 1);
    }

    #[test]
    fn a_zero_limit_allows_nothing() {
        assert_eq!(check(None, 0, RatePeriod::Day, t(0, 0)), RateCheck::Limited { retry_at: None });
        assert_eq!(remaining(None, 0, RatePeriod::Day, t(0, 0)), 0);
    }

    #[test]
    fn a_clock_stepping_back_never_frees_capacity() {
        let mut s = None;
        burst(&mut s, 5, RatePeriod::Minute, t(100, 0), 5);
        assert_eq!(burst(&mut s, 5, RatePeriod::Minute, t(-10_000, 0), 5), 0);
        assert_eq!(remaining(s.as_ref(), 5, RatePeriod::Minute, t(-10_000, 0)), 0);
    }

    #[test]
    fn remaining_and_full_at_track_the_bucket() {
        let mut s = None;
        assert_eq!(remaining(s.as_ref(), 4, RatePeriod::Minute, t(0, 0)), 4);
        burst(&mut s, 4, RatePeriod::Minute, t(0, 0), 3);
        assert_eq!(remaining(s.as_ref(), 4, RatePeriod::Minute, t(0, 0)), 1);
        assert_eq!(remaining(s.as_ref(), 4, RatePeriod::Minute, t(15, 0)), 2);
        assert_eq!(full_at(s.as_ref(), 4, t(0, 0)), t(45, 0));
        assert_eq!(full_at(s.as_ref(), 4, t(50, 0)), t(50, 0));
    }

    #[test]
    fn the_largest_limits_do_not_overflow() {
        let mut s = None;
        let far = Utc.timestamp_opt(1 << 40, 999_999_999).unwrap();
        let max = u64::from(u32::MAX);
        assert_eq!(burst(&mut s, max, RatePeriod::Day, far, 3), 3);
        assert_eq!(remaining(s.as_ref(), max, RatePeriod::Day, far), max - 3);
    }

    #[test]
    fn a_state_stored_for_another_limit_is_rescaled_not_dropped() {
        let mut s = None;
        burst(&mut s, 10, RatePeriod::Minute, t(0, 0), 10);
        // The same TAT (now + 60 s) read with a limit of 20 is a full bucket of 20 as well.
        assert_eq!(burst(&mut s, 20, RatePeriod::Minute, t(0, 0), 5), 0);
    }
}
