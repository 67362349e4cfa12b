//! Hands the allocator's free pages back to the kernel once the server goes quiet.
//!
//! glibc gives a heap's free memory back on its own only from the heap's top. After a burst of
//! requests, the pages freed below live blocks (a connection's buffers, the log's caches) stay
//! in the process's RSS at the burst's peak until something reuses them. `malloc_trim(0)`
//! ([`sluice_kernel::process::release_free_heap`]) releases every whole free page, but it holds
//! each arena's lock while it walks that arena's free lists: 1 to 5 ms with a loaded daemon's
//! heap, during which a proxy thread allocating in that arena waits. So it never runs under
//! load: a thread wakes once a [`PERIOD`] and releases only when a whole period went by without
//! a durable write to the log (every decision is in one; so is the checkpoint the log signs up
//! to a second after its last records) and there was one since the last release (the first
//! release, of what starting up left, needs none). An idle server pays nothing; a busy one keeps
//! its memory until it pauses.

use std::time::{Duration, Instant};

/// How often the thread looks at the activity counter; a release comes one to two periods
/// after the last write.
pub const PERIOD: Duration = Duration::from_secs(1);

/// When to release: after a period without activity, once per pause.
#[derive(Debug, Default)]
pub struct Quiet {
    /// The activity counter at the last look.
    seen: Option<u64>,
    /// The counter when memory was last released.
    released: Option<u64>,
}

impl Quiet {
    /// Looks at the activity counter once a period; `true` when it did not move since the last
    /// look and moved since the last release (or nothing was released yet).
    pub fn tick(&mut self, activity: u64) -> bool {
        let quiet = self.seen == Some(activity);
        self.seen = Some(activity);
        if quiet && self.released != Some(activity) {
            self.released = Some(activity);
            return true;
        }
        false
    }
}

/// Starts the `sluice-heap` thread, which releases free heap pages when the ledger's count of
/// durable writes stands still for a [`PERIOD`]. It runs for the life of the process. It holds
/// a reader of the ledger's counters, not a `Ledger`, so it never keeps the store open: a start
/// that fails after this still closes the store cleanly.
pub fn release_when_quiet(writes: crate::ledger::WriteStatsReader) -> std::io::Result<()> {
    std::thread::Builder::new().name("sluice-heap".into()).spawn(move || {
        let mut quiet = Quiet::default();
        loop {
            std::thread::sleep(PERIOD);
            if quiet.tick(writes.read().durable_writes) {
                let start = Instant::now();
                let released = sluice_kernel::process::release_free_heap();
                let took = start.elapsed();
                crate::metrics::global().heap_release(took);
                tracing::debug!(
                    released,
                    took_us = took.as_micros() as u64,
                    "free heap pages handed back after a quiet period"
                );
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Quiet;

    #[test]
    fn releases_once_per_pause_never_under_activity() {
        let mut q = Quiet::default();
        // The first look has nothing to compare with.
        assert!(!q.tick(0));
        // Quiet since start: one release of what starting up left.
        assert!(q.tick(0));
        assert!(!q.tick(0), "nothing happened since the last release");
        // Busy: the counter moves at every look, so no release.
        for n in [5, 90, 400, 401] {
            assert!(!q.tick(n), "released at {n} while the counter still moves");
        }
        // It stops: one release, then none until the next burst ends.
        assert!(q.tick(401));
        assert!(!q.tick(401));
        assert!(!q.tick(401));
        assert!(!q.tick(402));
        assert!(q.tick(402));
    }
}
