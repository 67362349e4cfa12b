//! A warning that a flood would repeat thousands of times a second, logged at most once per
//! interval with the count of the ones left out.
//!
//! Used by the proxy and the gate for their refusals over the connection budget. One agent
//! churning connections past the budget makes the proxy refuse tens of thousands of
//! them a second (3,000 connections against a budget of 1,000: ~4,000 refusals/s measured). A
//! line for each would flood the journal, and journald's own rate limit would then drop the
//! daemon's other messages with them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Throttle {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Throttle {
        Throttle { interval, state: Mutex::new(State { last: None, suppressed: 0 }) }
    }

    /// `Some(n)` when the event should be logged now, `n` being how many were left out since
    /// the last one logged; `None` when it is left out.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.suppressed = s.suppressed.saturating_add(1);
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(t.admit(start), Some(0));
        for ms in 1..1000 {
            assert_eq!(t.admit(start + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.admit(start + Duration::from_millis(1000)), Some(999));
        assert_eq!(t.admit(start + Duration::from_millis(1001)), None);
        assert_eq!(t.admit(start + Duration::from_secs(5)), Some(1));
    }

    #[test]
    fn a_clock_that_goes_back_does_not_panic_or_log_more() {
        let t = Throttle::new(Duration::from_secs(1));
        let now = Instant::now() + Duration::from_secs(10);
        assert_eq!(t.admit(now), Some(0));
        assert_eq!(t.admit(now - Duration::from_secs(5)), None);
    }
}
