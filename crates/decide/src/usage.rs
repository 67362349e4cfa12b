//! A passport's usage: spend and request counters per UTC calendar window, and rate-limit state.
//!
//! The daemon stores one [`Usage`] per passport, as the bytes of [`Usage::to_bytes`], and writes
//! it back only in the same transaction as an allowed decision. A restart therefore never resets
//! a budget, and a crash between decision and write loses neither.
//!
//! # Windows
//! Spend is counted per UTC calendar window: daily (from 00:00 UTC), weekly (ISO week, from Monday
//! 00:00 UTC) or monthly (from the 1st, 00:00 UTC). A counter remembers the start of the window it
//! counts. When `now` is in a later window, the counter *rolls*: it starts again from zero in the
//! window that contains `now`. If `now` is *before* the stored window (the clock stepped back) the
//! stored window and its spend are kept: a clock going backwards must never un-spend money.
//!
//! Two counters are kept: a daily one, which the state API always shows, and one for the
//! passport's own `core:cost:cumulative_window`, which `core:cost:max_cumulative` applies to (for
//! a daily passport both count the same requests).
//!
//! # Format
//! Versioned JSON, parsed strictly: unknown or duplicate fields, an unknown version, a window
//! start that is not on a window boundary, or more than [`MAX_USAGE_BYTES`] bytes are a
//! [`UsageError`]. A corrupt blob is never treated as "no usage": the caller blocks (fail closed;
//! see [`super::Evaluation::usage_corrupt`]).
//!
//! - Version 2 (written): spend in whole millicents (`spent_millicents`), at most
//!   [`MAX_MILLICENTS`].
//! - Version 1 (read only): spend in whole cents (`spent_cents`), as written before sluice counted
//!   fractions of a cent. It is migrated on read, exactly: × 1000, checked (a count past
//!   [`MAX_MILLICENTS`] is corrupt, never clamped or reset), and written back as version 2 with
//!   the next allowed decision. A restart or an upgrade therefore neither resets nor rounds a
//!   budget.

use super::rate::GcraState;
use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_passport::money::MAX_MILLICENTS;
use sluice_passport::SpendWindow;

/// The format version this code writes (money in millicents).
pub const USAGE_VERSION: u32 = 2;
/// The previous version (money in whole cents), still read and migrated.
pub const USAGE_VERSION_CENTS: u32 = 1;
/// Usage blobs are a few hundred bytes; anything much larger is not one of ours.
pub const MAX_USAGE_BYTES: usize = 4096;

/// Why stored usage bytes were refused. The caller must block the request, never reset usage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("stored usage is {len} bytes, more than the {max} a usage record can be")]
    TooLarge { len: usize, max: usize },
    #[error("stored usage is not valid usage JSON: {0}")]
    Json(String),
    #[error("stored usage has format version {found}; this sluice reads versions {USAGE_VERSION_CENTS} and {USAGE_VERSION} only")]
    Version { found: u32 },
    #[error("stored usage is inconsistent: {0}")]
    Inconsistent(String),
}

impl UsageError {
    /// The stable decision reason for a request refused because usage could not be read.
    pub fn reason(&self) -> crate::Reason {
        crate::Reason::UsageCorrupt
    }
}

/// Spend and requests counted in one calendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowCounter {
    /// Start of the window counted (00:00 UTC of its first day).
    pub start: DateTime<Utc>,
    /// Millicents spent by allowed requests in this window (settlements included).
    pub spent_millicents: u64,
    /// Allowed requests in this window.
    pub requests: u64,
}

/// The counter for the passport's cumulative-spend window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendCounter {
    /// `daily`, `weekly` or `monthly`: the passport's `core:cost:cumulative_window`.
    #[serde(with = "window_serde")]
    pub window: SpendWindow,
    pub counter: WindowCounter,
}

/// GCRA state per rate-limit period; `None` is a full bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateState {
    #[serde(deserialize_with = "present")]
    pub per_minute: Option<GcraState>,
    #[serde(deserialize_with = "present")]
    pub per_hour: Option<GcraState>,
    #[serde(deserialize_with = "present")]
    pub per_day: Option<GcraState>,
}

/// An `Option` field that must be present (as `null` or a value). Serde otherwise reads a missing
/// `Option` field as `None`, and a blob that lost its counters would read as a fresh budget.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// The capacity [`Usage::to_bytes`] starts with: more than a full record takes.
const USAGE_BYTES_HINT: usize = 512;

/// Everything the engine counts for one passport. [`Usage::default`] is a passport never used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Always [`USAGE_VERSION`].
    pub version: u32,
    /// Calendar-day spend and requests (shown by the state API whatever the passport's window).
    #[serde(deserialize_with = "present")]
    pub daily: Option<WindowCounter>,
    /// Spend and requests in the passport's cumulative window.
    #[serde(deserialize_with = "present")]
    pub spend: Option<SpendCounter>,
    pub rate: RateState,
}

impl Default for Usage {
    fn default() -> Self {
        Usage { version: USAGE_VERSION, daily: None, spend: None, rate: RateState::default() }
    }
}

impl Usage {
    /// The stored form: compact JSON.
    ///
    /// Written field by field, byte for byte what `serde_json::to_vec` of the derived
    /// `Serialize` writes (a test compares the two on generated usage): this runs for every
    /// allowed decision, and the generic path (chrono's `Display` through `fmt`) cost as much as
    /// the rest of the evaluation. One buffer that holds a full record (about 300 bytes) without
    /// growing.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(USAGE_BYTES_HINT);
        out.extend_from_slice(b"{\"version\":");
        write_u64(&mut out, u64::from(self.version));
        out.extend_from_slice(b",\"daily\":");
        match &self.daily {
            Some(d) => d.write(&mut out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"spend\":");
        match &self.spend {
            Some(s) => {
                out.extend_from_slice(b"{\"window\":\"");
                out.extend_from_slice(s.window.as_str().as_bytes());
                out.extend_from_slice(b"\",\"counter\":");
                s.counter.write(&mut out);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"rate\":");
        let r = &self.rate;
        for (i, (name, g)) in
            [("per_minute", &r.per_minute), ("per_hour", &r.per_hour), ("per_day", &r.per_day)].into_iter().enumerate()
        {
            out.extend_from_slice(if i == 0 { b"{\"" } else { b",\"" });
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            match g {
                Some(g) => {
                    out.extend_from_slice(b"{\"limit\":");
                    write_u64(&mut out, g.limit);
                    out.extend_from_slice(b",\"tat\":");
                    if g.tat < 0 {
                        out.push(b'-');
                    }
                    write_u128(&mut out, g.tat.unsigned_abs());
                    out.push(b'}');
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b"}}");
        out
    }

    /// Parses stored usage strictly. See the module doc for what is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Usage, UsageError> {
        if bytes.len() > MAX_USAGE_BYTES {
            return Err(UsageError::TooLarge { len: bytes.len(), max: MAX_USAGE_BYTES });
        }
        // The usual case in one pass: today's format. Anything else (an older format, a future
        // one, bad JSON) is read again below, version first, for the precise answer; a parse
        // that succeeds here is exactly the one the version-first path would make.
        if let Ok(usage) = serde_json::from_slice::<Usage>(bytes) {
            if usage.version == USAGE_VERSION {
                usage.check()?;
                return Ok(usage);
            }
        }
        // Read the version first so that a future format is reported as such, not as bad JSON.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(bytes).map_err(|e| UsageError::Json(e.to_string()))?;
        let usage: Usage = match v.version {
            USAGE_VERSION => serde_json::from_slice(bytes).map_err(|e| UsageError::Json(e.to_string()))?,
            USAGE_VERSION_CENTS => {
                serde_json::from_slice::<v1::Usage>(bytes).map_err(|e| UsageError::Json(e.to_string()))?.migrate()?
            }
            found => return Err(UsageError::Version { found }),
        };
        usage.check()?;
        Ok(usage)
    }

    /// Checks what [`Usage::from_bytes`] checks after parsing (bounds, window starts, rate
    /// limits): for usage held in memory rather than read back, such as the counters a daemon's
    /// lane keeps from its own last evaluation, so that they are refused exactly as their stored
    /// bytes would be.
    pub fn check_stored(&self) -> Result<(), UsageError> {
        if self.version != USAGE_VERSION {
            return Err(UsageError::Version { found: self.version });
        }
        self.check()
    }

    fn check(&self) -> Result<(), UsageError> {
        let counters = [self.daily.as_ref(), self.spend.as_ref().map(|s| &s.counter)];
        if let Some(c) = counters.into_iter().flatten().find(|c| c.spent_millicents > MAX_MILLICENTS) {
            return Err(UsageError::Inconsistent(format!(
                "a spend of {} millicents is more than sluice counts ({MAX_MILLICENTS})",
                c.spent_millicents
            )));
        }
        if let Some(d) = &self.daily {
            if window_start(SpendWindow::Daily, d.start) != d.start {
                return Err(UsageError::Inconsistent(format!("daily window start {} is not 00:00 UTC", d.start)));
            }
        }
        if let Some(s) = &self.spend {
            if window_start(s.window, s.counter.start) != s.counter.start {
                return Err(UsageError::Inconsistent(format!(
                    "{} window start {} is not the start of a {} window",
                    s.window.as_str(),
                    s.counter.start,
                    s.window.as_str()
                )));
            }
        }
        for g in [&self.rate.per_minute, &self.rate.per_hour, &self.rate.per_day].into_iter().flatten() {
            if g.limit == 0 {
                return Err(UsageError::Inconsistent("rate state for a limit of 0".to_string()));
            }
        }
        Ok(())
    }

    /// The daily counter as of `now`: rolled to today's window if the stored one is older.
    pub fn daily_at(&self, now: DateTime<Utc>) -> WindowCounter {
        roll(self.daily, SpendWindow::Daily, now)
    }

    /// Refuses usage recorded for another cumulative window than the passport's. Passport
    /// constraints are immutable, so this means the blob belongs to another passport or was
    /// altered; restarting the counter would un-spend money, so the caller blocks instead.
    pub fn check_window(&self, window: SpendWindow) -> Result<(), UsageError> {
        match &self.spend {
            Some(s) if s.window != window => Err(UsageError::Inconsistent(format!(
                "spend was counted in a {} window but the passport's window is {}",
                s.window.as_str(),
                window.as_str()
            ))),
            _ => Ok(()),
        }
    }

    /// The counter for the passport's `window` as of `now`, rolled if the stored one is older.
    /// Call [`Usage::check_window`] first: a stored counter of another kind is ignored here.
    pub fn spend_at(&self, window: SpendWindow, now: DateTime<Utc>) -> WindowCounter {
        match self.spend.filter(|s| s.window == window) {
            Some(s) => roll(Some(s.counter), window, now),
            None if window == SpendWindow::Daily => self.daily_at(now),
            None => roll(None, window, now),
        }
    }

    /// This usage with both counters rolled to the windows containing `now`.
    pub fn rolled(&self, window: SpendWindow, now: DateTime<Utc>) -> Usage {
        Usage {
            version: USAGE_VERSION,
            daily: Some(self.daily_at(now)),
            spend: Some(SpendCounter { window, counter: self.spend_at(window, now) }),
            rate: self.rate,
        }
    }
}

impl WindowCounter {
    /// `{"start":…,"spent_millicents":…,"requests":…}`, as serde writes it.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"start\":\"");
        write_time(out, &self.start);
        out.extend_from_slice(b"\",\"spent_millicents\":");
        write_u64(out, self.spent_millicents);
        out.extend_from_slice(b",\"requests\":");
        write_u64(out, self.requests);
        out.push(b'}');
    }
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    write_u128(out, u128::from(n));
}

/// `n` in plain decimal (serde_json's form for every integer type).
fn write_u128(out: &mut Vec<u8>, mut n: u128) {
    // u128::MAX has 39 digits.
    let mut digits = [0u8; 40];
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(at..).unwrap_or_default());
}

/// A time as chrono's `Serialize` writes it (RFC 3339, `Z`, as many fraction digits as it
/// needs): by hand for whole seconds in years 0–9999 (every window start), through chrono
/// otherwise.
fn write_time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    use chrono::Timelike;
    let year = t.year();
    if t.nanosecond() == 0 && (0..=9999).contains(&year) {
        let mut text = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, width: usize, mut n: u32| {
            for d in text.iter_mut().skip(at).take(width).rev() {
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year.unsigned_abs());
        put(5, 2, t.month());
        put(8, 2, t.day());
        put(11, 2, t.hour());
        put(14, 2, t.minute());
        put(17, 2, t.second());
        out.extend_from_slice(&text);
    } else {
        out.extend_from_slice(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true).as_bytes());
    }
}

/// The counter for the window containing `now`: `stored` if it is that window (or a later one,
/// after the clock stepped back), else a new empty one.
pub fn roll(stored: Option<WindowCounter>, window: SpendWindow, now: DateTime<Utc>) -> WindowCounter {
    let current = window_start(window, now);
    match stored {
        Some(c) if c.start >= current => c,
        _ => WindowCounter { start: current, spent_millicents: 0, requests: 0 },
    }
}

/// Start of the `window` containing `t`: 00:00 UTC of the day, of the ISO week's Monday, or of the
/// month's 1st.
pub fn window_start(window: SpendWindow, t: DateTime<Utc>) -> DateTime<Utc> {
    let day = t.date_naive();
    let first = match window {
        SpendWindow::Daily => day,
        SpendWindow::Weekly => {
            day.checked_sub_days(Days::new(u64::from(day.weekday().num_days_from_monday()))).unwrap_or(NaiveDate::MIN)
        }
        SpendWindow::Monthly => day.with_day(1).unwrap_or(day),
    };
    first.and_time(NaiveTime::MIN).and_utc()
}

/// End of the `window` that starts at `start` (the start of the next one). Saturates at the end of
/// time chrono can represent rather than fail.
pub fn window_end(window: SpendWindow, start: DateTime<Utc>) -> DateTime<Utc> {
    let day = start.date_naive();
    let next = match window {
        SpendWindow::Daily => day.checked_add_days(Days::new(1)),
        SpendWindow::Weekly => day.checked_add_days(Days::new(7)),
        SpendWindow::Monthly => {
            if day.month() == 12 {
                day.year().checked_add(1).and_then(|y| NaiveDate::from_ymd_opt(y, 1, 1))
            } else {
                NaiveDate::from_ymd_opt(day.year(), day.month() + 1, 1)
            }
        }
    };
    next.map_or(DateTime::<Utc>::MAX_UTC, |d| d.and_time(NaiveTime::MIN).and_utc())
}

/// Version 1: the same shape with spend in whole cents. Read only, to migrate.
mod v1 {
    use super::{RateState, UsageError};
    use chrono::{DateTime, Utc};
    use serde::Deserialize;
    use sluice_passport::money;
    use sluice_passport::SpendWindow;

    #[derive(Debug, Clone, Copy, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct WindowCounter {
        start: DateTime<Utc>,
        spent_cents: u64,
        requests: u64,
    }

    #[derive(Debug, Clone, Copy, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct SpendCounter {
        #[serde(with = "super::window_serde")]
        window: SpendWindow,
        counter: WindowCounter,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Usage {
        #[allow(dead_code)] // checked before this parse
        version: u32,
        #[serde(deserialize_with = "super::present")]
        daily: Option<WindowCounter>,
        #[serde(deserialize_with = "super::present")]
        spend: Option<SpendCounter>,
        rate: RateState,
    }

    impl WindowCounter {
        fn migrate(self, which: &str) -> Result<super::WindowCounter, UsageError> {
            let spent_millicents =
                money::from_cents(self.spent_cents).filter(|m| *m <= money::MAX_MILLICENTS).ok_or_else(|| {
                    UsageError::Inconsistent(format!(
                        "version 1 {which} spend of {} cents is too large to count in millicents",
                        self.spent_cents
                    ))
                })?;
            Ok(super::WindowCounter { start: self.start, spent_millicents, requests: self.requests })
        }
    }

    impl Usage {
        /// The same counters in version 2: cents × 1000, checked.
        pub(super) fn migrate(self) -> Result<super::Usage, UsageError> {
            Ok(super::Usage {
                version: super::USAGE_VERSION,
                daily: self.daily.map(|d| d.migrate("daily")).transpose()?,
                spend: self
                    .spend
                    .map(|s| {
                        let counter = s.counter.migrate(s.window.as_str())?;
                        Ok::<_, UsageError>(super::SpendCounter { window: s.window, counter })
                    })
                    .transpose()?,
                rate: self.rate,
            })
        }
    }
}

mod window_serde {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use sluice_passport::SpendWindow;

    pub fn serialize<S: Serializer>(w: &SpendWindow, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(w.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SpendWindow, D::Error> {
        let s = String::deserialize(d)?;
        SpendWindow::parse(&s).ok_or_else(|| D::Error::custom(format!("unknown window {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn daily_windows_start_at_midnight_utc() {
        assert_eq!(window_start(SpendWindow::Daily, at(2026, 5, 1, 23, 59, 59)), at(2026, 5, 1, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Daily, at(2026, 5, 1, 0, 0, 0)), at(2026, 5, 2, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Daily, at(2026, 12, 31, 0, 0, 0)), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Daily, at(2028, 2, 28, 0, 0, 0)), at(2028, 2, 29, 0, 0, 0));
    }

    #[test]
    fn weekly_windows_are_iso_weeks_from_monday() {
        // 2026-05-03 is a Sunday; its ISO week began on Monday 2026-04-27.
        assert_eq!(window_start(SpendWindow::Weekly, at(2026, 5, 3, 23, 59, 59)), at(2026, 4, 27, 0, 0, 0));
        assert_eq!(window_start(SpendWindow::Weekly, at(2026, 5, 4, 0, 0, 0)), at(2026, 5, 4, 0, 0, 0));
        // A week spanning the new year: Friday 2027-01-01 is in the week of Monday 2026-12-28.
        assert_eq!(window_start(SpendWindow::Weekly, at(2027, 1, 1, 12, 0, 0)), at(2026, 12, 28, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Weekly, at(2026, 12, 28, 0, 0, 0)), at(2027, 1, 4, 0, 0, 0));
    }

    #[test]
    fn monthly_windows_handle_december_and_leap_february() {
        assert_eq!(window_start(SpendWindow::Monthly, at(2026, 12, 31, 23, 59, 59)), at(2026, 12, 1, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Monthly, at(2026, 12, 1, 0, 0, 0)), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(window_start(SpendWindow::Monthly, at(2028, 2, 29, 12, 0, 0)), at(2028, 2, 1, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Monthly, at(2028, 2, 1, 0, 0, 0)), at(2028, 3, 1, 0, 0, 0));
        assert_eq!(window_end(SpendWindow::Monthly, at(2027, 2, 1, 0, 0, 0)), at(2027, 3, 1, 0, 0, 0));
    }

    #[test]
    fn counters_roll_forward_but_never_back() {
        let stored = WindowCounter { start: at(2026, 5, 1, 0, 0, 0), spent_millicents: 500, requests: 3 };
        assert_eq!(roll(Some(stored), SpendWindow::Daily, at(2026, 5, 1, 23, 59, 59)), stored);
        let next = roll(Some(stored), SpendWindow::Daily, at(2026, 5, 2, 0, 0, 0));
        assert_eq!((next.start, next.spent_millicents, next.requests), (at(2026, 5, 2, 0, 0, 0), 0, 0));
        // The clock stepped back a day: the stored window and its spend stay.
        assert_eq!(roll(Some(stored), SpendWindow::Daily, at(2026, 4, 30, 12, 0, 0)), stored);
    }

    #[test]
    fn usage_round_trips_through_bytes() {
        let mut u = Usage::default().rolled(SpendWindow::Weekly, at(2026, 5, 3, 10, 0, 0));
        u.daily = Some(WindowCounter { start: at(2026, 5, 3, 0, 0, 0), spent_millicents: 12, requests: 1 });
        u.rate.per_minute = Some(GcraState { limit: 7, tat: i128::from(i64::MAX) * 7 + 3 });
        assert_eq!(Usage::from_bytes(&u.to_bytes()).unwrap(), u);
    }

    #[test]
    fn corrupt_usage_is_an_error_never_a_reset() {
        let good =
            String::from_utf8(Usage::default().rolled(SpendWindow::Daily, at(2026, 5, 1, 1, 0, 0)).to_bytes()).unwrap();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "not valid usage JSON"),
            ("{".to_string(), "not valid usage JSON"),
            (good.replace("\"version\":2", "\"version\":3"), "format version 3"),
            (good.replace("\"version\":2", "\"version\":0"), "format version 0"),
            (good.replace("\"version\":2", "\"version\":2,\"extra\":0"), "unknown field"),
            (good.replace("\"version\":2", "\"version\":2,\"version\":2"), "duplicate field"),
            (good.replace("\"spent_millicents\":0", "\"spent_millicents\":-1"), "not valid usage JSON"),
            (
                good.replacen("\"spent_millicents\":0", "\"spent_millicents\":9007199254740992", 1),
                "more than sluice counts",
            ),
            // Version 2 with version 1's field name, and the reverse: never read as zero spend.
            (good.replace("\"spent_millicents\":0", "\"spent_cents\":0"), "spent_cents"),
            (good.replace("\"version\":2", "\"version\":1"), "spent_millicents"),
            (good.replace("T00:00:00Z", "T01:00:00Z"), "not 00:00 UTC"),
            (good.replace("\"window\":\"daily\"", "\"window\":\"hourly\""), "unknown window \"hourly\""),
            (" ".repeat(MAX_USAGE_BYTES + 1), "more than"),
            (
                "{\"version\":2,\"rate\":{\"per_minute\":null,\"per_hour\":null,\"per_day\":null}}".into(),
                "missing field `daily`",
            ),
            (
                "{\"version\":1,\"rate\":{\"per_minute\":null,\"per_hour\":null,\"per_day\":null}}".into(),
                "missing field `daily`",
            ),
            (good.replace("\"per_hour\":null,", ""), "missing field `per_hour`"),
            (good.replace("\"requests\":0", "\"requests\":null"), "not valid usage JSON"),
        ];
        for (bytes, needle) in cases {
            let e = Usage::from_bytes(bytes.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(needle), "{bytes:?}: {e} should mention {needle:?}");
            assert_eq!(e.reason(), "usage_corrupt");
        }
    }

    /// A blob exactly as version 1 wrote it (spend in cents), before sluice counted millicents.
    const V1_BLOB: &str = concat!(
        r#"{"version":1,"daily":{"start":"2026-05-03T00:00:00Z","spent_cents":9950,"requests":3},"#,
        r#""spend":{"window":"monthly","counter":{"start":"2026-05-01T00:00:00Z","spent_cents":123456,"requests":40}},"#,
        r#""rate":{"per_minute":{"limit":7,"tat":12345678901234567890},"per_hour":null,"per_day":null}}"#
    );

    #[test]
    fn version_1_usage_is_migrated_exactly_to_millicents() {
        let u = Usage::from_bytes(V1_BLOB.as_bytes()).expect("version 1 reads");
        assert_eq!(u.version, USAGE_VERSION);
        assert_eq!(
            u.daily,
            Some(WindowCounter { start: at(2026, 5, 3, 0, 0, 0), spent_millicents: 9_950_000, requests: 3 })
        );
        let s = u.spend.expect("spend counter");
        assert_eq!(s.window, SpendWindow::Monthly);
        assert_eq!(
            s.counter,
            WindowCounter { start: at(2026, 5, 1, 0, 0, 0), spent_millicents: 123_456_000, requests: 40 }
        );
        assert_eq!(u.rate.per_minute, Some(GcraState { limit: 7, tat: 12_345_678_901_234_567_890 }));
        // Written back as version 2, it reads as the same counters.
        let bytes = u.to_bytes();
        assert!(String::from_utf8_lossy(&bytes).contains("\"version\":2"));
        assert_eq!(Usage::from_bytes(&bytes).expect("version 2 reads"), u);
        // A version 1 blob with no counters yet.
        let empty =
            r#"{"version":1,"daily":null,"spend":null,"rate":{"per_minute":null,"per_hour":null,"per_day":null}}"#;
        assert_eq!(Usage::from_bytes(empty.as_bytes()), Ok(Usage::default()));
    }

    #[test]
    fn version_1_usage_that_cannot_be_migrated_blocks_and_never_resets() {
        // u64::MAX cents do not fit in millicents: corrupt (the caller blocks), not clamped or zeroed.
        let huge = V1_BLOB.replace("\"spent_cents\":9950", &format!("\"spent_cents\":{}", u64::MAX));
        let e = Usage::from_bytes(huge.as_bytes()).unwrap_err();
        assert!(matches!(e, UsageError::Inconsistent(_)), "{e}");
        assert!(e.to_string().contains("too large to count in millicents"), "{e}");
        // So do cents that fit a u64 but not the largest amount sluice counts.
        let past = V1_BLOB.replace("\"spent_cents\":9950", "\"spent_cents\":9007199254741");
        let e = Usage::from_bytes(past.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("too large to count in millicents"), "{e}");
        // The largest count that fits migrates exactly.
        let fits = V1_BLOB.replace("\"spent_cents\":9950", "\"spent_cents\":9007199254740");
        let u = Usage::from_bytes(fits.as_bytes()).expect("fits");
        assert_eq!(u.daily.map(|d| d.spent_millicents), Some(9_007_199_254_740_000));
        // Version 1's own strictness still applies.
        for (bad, needle) in [
            (V1_BLOB.replace("\"requests\":3", "\"requests\":3,\"x\":1"), "unknown field"),
            (V1_BLOB.replace("\"daily\":{", "\"daily\":null,\"d\":{"), "unknown field"),
            (
                V1_BLOB.replace("T00:00:00Z\",\"spent_cents\":9950", "T05:00:00Z\",\"spent_cents\":9950"),
                "not 00:00 UTC",
            ),
            (V1_BLOB.replace("\"spent_cents\":9950", "\"spent_cents\":9950.5"), "not valid usage JSON"),
        ] {
            let e = Usage::from_bytes(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e} should mention {needle:?}");
        }
    }

    #[test]
    fn a_weekly_start_that_is_not_a_monday_is_refused() {
        let mut u = Usage::default().rolled(SpendWindow::Weekly, at(2026, 5, 3, 10, 0, 0));
        if let Some(s) = u.spend.as_mut() {
            s.counter.start = at(2026, 5, 3, 0, 0, 0);
        }
        let e = Usage::from_bytes(&u.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("not the start of a weekly window"), "{e}");
    }

    mod by_hand {
        //! [`Usage::to_bytes`] is written by hand: it must write exactly what serde's derived
        //! `Serialize` writes, for every usage, and read back as the same usage.
        use super::*;
        use proptest::prelude::*;

        fn time() -> impl Strategy<Value = DateTime<Utc>> {
            prop_oneof![
                // Whole seconds, years 0..=9999 (the hand-written path).
                (-62_167_219_200i64..253_402_300_799).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
                // Fractions, leap seconds, years past 9999 and before 0 (chrono's path).
                (-100_000_000_000i64..400_000_000_000, 0u32..2_000_000_000)
                    .prop_filter_map("representable", |(s, n)| DateTime::from_timestamp(s, n)),
            ]
        }

        fn counter() -> impl Strategy<Value = WindowCounter> {
            (time(), any::<u64>(), any::<u64>()).prop_map(|(start, spent_millicents, requests)| WindowCounter {
                start,
                spent_millicents,
                requests,
            })
        }

        fn gcra() -> impl Strategy<Value = Option<GcraState>> {
            proptest::option::of((any::<u64>(), any::<i128>()).prop_map(|(limit, tat)| GcraState { limit, tat }))
        }

        fn usage() -> impl Strategy<Value = Usage> {
            let window = prop_oneof![Just(SpendWindow::Daily), Just(SpendWindow::Weekly), Just(SpendWindow::Monthly)];
            (
                any::<u32>(),
                proptest::option::of(counter()),
                proptest::option::of((window, counter())),
                (gcra(), gcra(), gcra()),
            )
                .prop_map(|(version, daily, spend, (per_minute, per_hour, per_day))| Usage {
                    version,
                    daily,
                    spend: spend.map(|(window, counter)| SpendCounter { window, counter }),
                    rate: RateState { per_minute, per_hour, per_day },
                })
        }

        proptest! {
            #[test]
            fn writes_what_serde_writes(u in usage()) {
                prop_assert_eq!(u.to_bytes(), serde_json::to_vec(&u).unwrap());
            }

            #[test]
            fn reads_back_as_itself_when_valid(u in usage()) {
                let mut u = u;
                u.version = USAGE_VERSION;
                for c in [u.daily.as_mut(), u.spend.as_mut().map(|s| &mut s.counter)].into_iter().flatten() {
                    c.spent_millicents %= MAX_MILLICENTS + 1;
                }
                if let Some(d) = &mut u.daily {
                    d.start = window_start(SpendWindow::Daily, d.start);
                }
                if let Some(s) = &mut u.spend {
                    s.counter.start = window_start(s.window, s.counter.start);
                }
                for g in [&mut u.rate.per_minute, &mut u.rate.per_hour, &mut u.rate.per_day].into_iter().flatten() {
                    g.limit = g.limit.max(1);
                }
                prop_assert_eq!(u.check_stored(), Ok(()));
                prop_assert_eq!(Usage::from_bytes(&u.to_bytes()), Ok(u));
            }
        }

        #[test]
        fn the_stored_check_refuses_what_reading_refuses() {
            let mut u = Usage {
                daily: Some(WindowCounter { start: at(2026, 3, 4, 5, 0, 0), spent_millicents: 1, requests: 1 }),
                ..Usage::default()
            };
            assert_eq!(u.check_stored(), Usage::from_bytes(&u.to_bytes()).map(|_| ()));
            assert!(u.check_stored().is_err());
            u.daily = None;
            u.version = 3;
            assert_eq!(u.check_stored(), Err(UsageError::Version { found: 3 }));
        }
    }
}
