//! Settlement of a metered cost: moving the counters by (actual − estimate) after the response.
//!
//! A metered request is decided on an estimate and the estimate is spent with the decision. When
//! the response reports the real usage, the difference is applied here. Settlement happens after
//! the fact and never blocks anything: an extra charge may take a window over its limit, which the
//! next decision then sees.
//!
//! # Windows
//! The difference belongs to the window the estimate was spent in (the decision's window). Each
//! counter (daily, and the passport's cumulative window) is adjusted only if its current window
//! is still the decision's: once the window has rolled, the old window's counter no longer exists
//! and the new one never held the estimate, so it is left alone and the result says so
//! ([`Settled::spend`] is `None`, [`Settled::daily_applied`] is `false`); the record notes it.
//!
//! # Bounds
//! Amounts are millicents. A refund never takes a counter below zero (an operator reset between
//! decision and settlement already cleared the estimate); an extra charge saturates at
//! [`MAX_MILLICENTS`]. The delta actually applied is reported so the record's
//! `spend_delta_millicents` adds up exactly.

use super::usage::{window_start, Usage, WindowCounter};
use chrono::{DateTime, Utc};
use sluice_passport::money::MAX_MILLICENTS;
use sluice_passport::SpendWindow;

/// The spend counter after a settlement, for the record's spend fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettledSpend {
    pub window_start: DateTime<Utc>,
    /// The change actually applied, in millicents (the requested delta, clamped at 0 and
    /// [`MAX_MILLICENTS`]).
    pub delta_millicents: i64,
    pub after_millicents: u64,
}

/// The outcome of [`settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The usage to persist.
    pub usage: Usage,
    /// The passport's cumulative-window counter after settlement, or `None` when its window has
    /// rolled since the decision (nothing applied).
    pub spend: Option<SettledSpend>,
    /// Whether the daily counter was adjusted (false once the decision's day is over).
    pub daily_applied: bool,
}

/// Applies a settlement delta (`actual − estimate`, millicents, either sign) to `usage` for a decision
/// taken at `decided_at` under a passport whose cumulative window is `window`. Pure; see the module
/// doc for windows and bounds. Request counts are not changed (the request was counted when
/// decided).
pub fn settle(
    usage: &Usage,
    window: SpendWindow,
    decided_at: DateTime<Utc>,
    delta: i64,
    now: DateTime<Utc>,
) -> Settled {
    let mut out = usage.rolled(window, now);
    let mut spend = None;
    if let Some(s) = out.spend.as_mut() {
        if s.counter.start == window_start(window, decided_at) {
            let (counter, applied) = apply(s.counter, delta);
            s.counter = counter;
            spend = Some(SettledSpend {
                window_start: counter.start,
                delta_millicents: applied,
                after_millicents: counter.spent_millicents,
            });
        }
    }
    let mut daily_applied = false;
    if let Some(d) = out.daily.as_mut() {
        if d.start == window_start(SpendWindow::Daily, decided_at) {
            *d = apply(*d, delta).0;
            daily_applied = true;
        }
    }
    Settled { usage: out, spend, daily_applied }
}

/// `counter + delta`, clamped to `0..=MAX_MILLICENTS` (or the stored count if already above);
/// returns the new counter and the delta applied.
fn apply(mut counter: WindowCounter, delta: i64) -> (WindowCounter, i64) {
    let before = counter.spent_millicents;
    let after = i128::from(before).saturating_add(i128::from(delta)).clamp(0, i128::from(MAX_MILLICENTS.max(before)));
    let after = u64::try_from(after).unwrap_or(before);
    counter.spent_millicents = after;
    let applied = i64::try_from(i128::from(after) - i128::from(before)).unwrap_or(0);
    (counter, applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, d, h, 0, 0).unwrap()
    }

    /// Usage after one allowed estimate of `spent` millicents on 2026-05-06 (a Wednesday).
    fn spent(window: SpendWindow, spent: u64) -> Usage {
        let mut u = Usage::default().rolled(window, at(6, 10));
        if let Some(d) = u.daily.as_mut() {
            d.spent_millicents = spent;
            d.requests = 1;
        }
        if let Some(s) = u.spend.as_mut() {
            s.counter.spent_millicents = spent;
            s.counter.requests = 1;
        }
        u
    }

    #[test]
    fn an_over_estimate_is_refunded_in_both_counters() {
        let s = settle(&spent(SpendWindow::Weekly, 500), SpendWindow::Weekly, at(6, 10), -320, at(6, 11));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((-320, 180)));
        assert!(s.daily_applied);
        assert_eq!(s.usage.daily.map(|d| (d.spent_millicents, d.requests)), Some((180, 1)));
        assert_eq!(s.usage.spend.map(|s| (s.counter.spent_millicents, s.counter.requests)), Some((180, 1)));
    }

    #[test]
    fn an_under_estimate_is_charged_extra_even_over_the_limit() {
        // Settlement never blocks: the counter goes where the real cost takes it.
        let s = settle(&spent(SpendWindow::Daily, 500), SpendWindow::Daily, at(6, 10), 9_000, at(6, 11));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((9_000, 9_500)));
        assert_eq!(s.usage.daily.map(|d| d.spent_millicents), Some(9_500));
    }

    #[test]
    fn a_refund_never_goes_below_zero_and_reports_what_it_applied() {
        // An operator reset cleared the estimate before settlement.
        let s = settle(&spent(SpendWindow::Daily, 100), SpendWindow::Daily, at(6, 10), -300, at(6, 11));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((-100, 0)));
        let s =
            settle(&spent(SpendWindow::Daily, MAX_MILLICENTS - 5), SpendWindow::Daily, at(6, 10), i64::MAX, at(6, 11));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((5, MAX_MILLICENTS)));
    }

    #[test]
    fn a_rolled_window_is_left_alone() {
        // Decided at 23:00, settled after midnight: the daily window is gone, nothing moves.
        let u = spent(SpendWindow::Daily, 500);
        let s = settle(&u, SpendWindow::Daily, at(6, 10), -200, at(7, 0));
        assert_eq!(s.spend, None);
        assert!(!s.daily_applied);
        assert_eq!(s.usage.daily.map(|d| (d.start, d.spent_millicents)), Some((at(7, 0), 0)));
        // A weekly passport: the day rolled but the week did not (Thursday).
        let s = settle(&spent(SpendWindow::Weekly, 500), SpendWindow::Weekly, at(6, 10), -200, at(7, 1));
        assert_eq!(s.spend.map(|s| s.after_millicents), Some(300));
        assert!(!s.daily_applied);
        assert_eq!(s.usage.daily.map(|d| d.spent_millicents), Some(0));
    }

    #[test]
    fn fractions_of_a_cent_settle_exactly() {
        // An estimate of 21 millicents ($0.00021); the response reports 8 ($0.00008): refund 13.
        let s = settle(&spent(SpendWindow::Daily, 21), SpendWindow::Daily, at(6, 10), -13, at(6, 11));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((-13, 8)));
        assert_eq!(s.usage.daily.map(|d| d.spent_millicents), Some(8));
        // Then 1 millicent more than estimated.
        let s = settle(&s.usage, SpendWindow::Daily, at(6, 10), 1, at(6, 12));
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((1, 9)));
    }

    #[test]
    fn a_zero_delta_changes_nothing_but_rolls() {
        let u = spent(SpendWindow::Monthly, 42);
        let s = settle(&u, SpendWindow::Monthly, at(6, 10), 0, at(6, 12));
        assert_eq!(s.usage, u);
        assert_eq!(s.spend.map(|s| (s.delta_millicents, s.after_millicents)), Some((0, 42)));
    }
}
