//! Prometheus metrics, served as text (exposition format 0.0.4) at `GET /metrics` on the local
//! API, through the `prometheus-client` crate (its `prometheus_text` encoder).
//!
//! Counters and the commit-latency histogram live in one process-wide [`Metrics`] ([`global`]),
//! incremented where things happen (the service for decisions and commits, the proxy for upstream
//! errors). Values that already exist elsewhere (pending holds, spend, the connection table's
//! misses) are read when scraped, never copied, so they cannot drift: they are collectors that
//! encode constant samples at scrape time.
//!
//! Every label set is bounded: decision reasons can come from a passport's CEL rules (hostile
//! input), so at most [`MAX_DECISION_SERIES`] distinct (decision, reason) pairs are kept and the
//! rest are counted under `reason="other"`; spend is exported for at most [`MAX_SPEND_SERIES`]
//! passports (the largest spenders). The crate escapes label values as the format requires.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::kernel::{Conntable, UnixFilter};

/// Distinct (decision, reason) label pairs kept before new ones fold into `reason="other"`.
pub const MAX_DECISION_SERIES: usize = 128;
/// Passports whose spend is exported, largest first.
pub const MAX_SPEND_SERIES: usize = 1000;
/// Distinct upstream error kinds kept (kinds are `&'static str` chosen by the code).
const MAX_UPSTREAM_KINDS: usize = 32;

/// Upper bounds (seconds) of the commit-latency histogram buckets: group commits with an fsync
/// take from tens of microseconds (NVMe) to tens of milliseconds (spinning or network disks).
pub const COMMIT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The process's counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    upstream_errors: Family<KindLabel, Counter>,
    commit: Histogram,
    conntable: Arc<Mutex<Option<Arc<Conntable>>>>,
    proxy: Arc<Mutex<Weak<dyn AdmissionCounters>>>,
    unix: Arc<Mutex<Option<Arc<UnixFilter>>>>,
    /// Label sets added so far; held while one is added, so the bounds hold under concurrency.
    series: Mutex<SeriesCount>,
    /// The once-a-minute log line that sums up decisions ([`DecisionSummary`]).
    summary: DecisionSummary,
    /// The series allowed decisions (`allow`, `allowed`) count in, once one was counted: most
    /// decisions are those, and finding their series in `decisions` took two strings and a
    /// hashed lookup each.
    allowed: OnceLock<Counter>,
    /// Times [`crate::heap`] handed free heap pages back, and the time those calls took.
    heap_releases: Counter,
    heap_release_seconds: Counter<f64, AtomicU64>,
}

/// How often, at most, [`DecisionSummary`] logs its line.
pub const DECISION_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Allowed decisions are logged one by one only at debug level (they are on the hot path, and
/// every one is in the ledger anyway); blocks and holds keep their own line at info. At info,
/// this sums up every decision: one line with the counts since the last one, logged with the
/// first decision made [`DECISION_SUMMARY_EVERY`] or more after the previous line.
#[derive(Debug)]
struct DecisionSummary {
    start: std::time::Instant,
    /// Milliseconds after `start` when the next line is due.
    next_due_ms: AtomicU64,
    allow: AtomicU64,
    block: AtomicU64,
    hold: AtomicU64,
}

/// What [`DecisionSummary::count`] says is due: counts since the previous line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryDue {
    pub allow: u64,
    pub block: u64,
    pub hold: u64,
    pub seconds: u64,
}

impl DecisionSummary {
    fn new() -> DecisionSummary {
        DecisionSummary {
            start: std::time::Instant::now(),
            next_due_ms: AtomicU64::new(DECISION_SUMMARY_EVERY.as_millis() as u64),
            allow: AtomicU64::new(0),
            block: AtomicU64::new(0),
            hold: AtomicU64::new(0),
        }
    }

    /// Counts one decision `now_ms` after `start`; `Some` (once per period, whichever thread
    /// gets there first) when the line is due, with the counts taken out.
    fn count(&self, decision: &str, now_ms: u64) -> Option<SummaryDue> {
        let counter = match decision {
            "allow" => &self.allow,
            "block" => &self.block,
            _ => &self.hold,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let due = self.next_due_ms.load(Ordering::Relaxed);
        if now_ms < due {
            return None;
        }
        let period = DECISION_SUMMARY_EVERY.as_millis() as u64;
        self.next_due_ms.compare_exchange(due, now_ms + period, Ordering::Relaxed, Ordering::Relaxed).ok()?;
        Some(SummaryDue {
            allow: self.allow.swap(0, Ordering::Relaxed),
            block: self.block.swap(0, Ordering::Relaxed),
            hold: self.hold.swap(0, Ordering::Relaxed),
            seconds: (now_ms + period).saturating_sub(due) / 1000,
        })
    }
}

#[derive(Debug, Default)]
struct SeriesCount {
    decisions: usize,
    upstream_kinds: usize,
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let decisions = Family::<DecisionLabels, Counter>::default();
        let upstream_errors = Family::<KindLabel, Counter>::default();
        let commit = Histogram::new(COMMIT_BUCKETS.iter().copied());
        let conntable = Arc::new(Mutex::new(None));
        let unix = Arc::new(Mutex::new(None));
        let mut registry = Registry::default();
        // Counter names are given without `_total`: the encoder appends it.
        registry.register_collector(Box::new(Announced {
            name: "sluice_decisions",
            help: "Decisions made, by decision and reason.",
            family: decisions.clone(),
        }));
        registry.register_collector(Box::new(Announced {
            name: "sluice_upstream_errors",
            help: "Upstream connections or requests that failed, by kind.",
            family: upstream_errors.clone(),
        }));
        // The registry adds the help text's final period.
        registry.register(
            "sluice_store_commit_seconds",
            "Time from submitting a store transaction to its durable group commit",
            commit.clone(),
        );
        let heap_releases = Counter::default();
        let heap_release_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "sluice_heap_releases",
            "Times the process handed its allocator's free pages back to the kernel after a second without a durable write",
            heap_releases.clone(),
        );
        registry.register(
            "sluice_heap_release_seconds",
            "Time those releases took (each holds the allocator's arenas, so they run only when the process is quiet)",
            heap_release_seconds.clone(),
        );
        registry.register_collector(Box::new(ConntableCollector(conntable.clone())));
        let proxy: Arc<Mutex<Weak<dyn AdmissionCounters>>> = Arc::new(Mutex::new(Weak::<NoProxy>::new()));
        registry.register_collector(Box::new(ProxyCollector(proxy.clone())));
        registry.register_collector(Box::new(UnixCollector(unix.clone())));
        Metrics {
            registry,
            decisions,
            upstream_errors,
            commit,
            conntable,
            proxy,
            unix,
            series: Mutex::default(),
            summary: DecisionSummary::new(),
            allowed: OnceLock::new(),
            heap_releases,
            heap_release_seconds,
        }
    }

    /// One release of free heap pages ([`crate::heap`]) that took `took`.
    pub fn heap_release(&self, took: Duration) {
        self.heap_releases.inc();
        self.heap_release_seconds.inc_by(took.as_secs_f64());
    }

    fn lock_series(&self) -> std::sync::MutexGuard<'_, SeriesCount> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One decision (`allow`, `request_hold`, `block`) with its stable reason. Once a minute at
    /// most, this also logs the summary line ([`DecisionSummary`]).
    pub fn decision(&self, decision: &str, reason: &str) {
        let now_ms = u64::try_from(self.summary.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(due) = self.summary.count(decision, now_ms) {
            tracing::info!(
                allowed = due.allow,
                blocked = due.block,
                held = due.hold,
                seconds = due.seconds,
                "decisions since the last summary (each is in the ledger; RUST_LOG=sluice=debug logs every allow)"
            );
        }
        let allowed = decision == "allow" && reason == "allowed";
        if let Some(counter) = self.allowed.get().filter(|_| allowed) {
            counter.inc();
            return;
        }
        let labels = DecisionLabels { decision: decision.to_string(), reason: reason.to_string() };
        if let Some(counter) = self.decisions.get(&labels) {
            counter.inc();
            if allowed {
                let _ = self.allowed.set(counter.clone());
            }
            return;
        }
        let mut series = self.lock_series();
        let labels = if self.decisions.get(&labels).is_some() {
            labels // added by another thread meanwhile
        } else if series.decisions < MAX_DECISION_SERIES {
            series.decisions += 1;
            labels
        } else {
            DecisionLabels { decision: decision.to_string(), reason: "other".to_string() }
        };
        let counter = self.decisions.get_or_create(&labels);
        counter.inc();
        if allowed {
            // The series it is counted in from now on: the count of series never goes down, so
            // the slow path would pick this one again every time.
            let _ = self.allowed.set(counter.clone());
        }
    }

    /// An upstream failure seen by the proxy (`kind`: `connect`, `tls`, `http`, `timeout`, ...).
    pub fn upstream_error(&self, kind: &'static str) {
        let labels = KindLabel { kind };
        if let Some(counter) = self.upstream_errors.get(&labels) {
            counter.inc();
            return;
        }
        let mut series = self.lock_series();
        let labels = if self.upstream_errors.get(&labels).is_some() {
            labels
        } else if series.upstream_kinds < MAX_UPSTREAM_KINDS {
            series.upstream_kinds += 1;
            labels
        } else {
            KindLabel { kind: "other" }
        };
        self.upstream_errors.get_or_create(&labels).inc();
    }

    /// How long one store transaction took from submission to durable commit.
    pub fn store_commit(&self, d: Duration) {
        self.commit.observe(d.as_secs_f64());
    }

    /// The kernel connection table whose misses (connections without an entry) are exported.
    pub fn watch_conntable(&self, table: Arc<Conntable>) {
        *self.conntable.lock().unwrap_or_else(|p| p.into_inner()) = Some(table);
    }

    /// The proxy whose connection counters (over-limit closes, per sandbox) are exported while
    /// it lives.
    pub fn watch_proxy<P: AdmissionCounters + 'static>(&self, proxy: &Arc<P>) {
        let weak: Weak<P> = Arc::downgrade(proxy);
        let weak: Weak<dyn AdmissionCounters> = weak;
        *self.proxy.lock().unwrap_or_else(|p| p.into_inner()) = weak;
    }

    /// The Unix socket filter whose refusals (kept by the eBPF programs) are exported.
    pub fn watch_unix(&self, filter: Arc<UnixFilter>) {
        *self.unix.lock().unwrap_or_else(|p| p.into_inner()) = Some(filter);
    }

    /// The counters as exposition text ([`CONTENT_TYPE`]), followed by `gauges` (read at scrape
    /// time by the caller).
    pub fn render(&self, gauges: &Gauges) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        // A collector must be owned by its registry; a scrape's gauges (at most
        // MAX_SPEND_SERIES spend entries) are cheap to copy once.
        let mut scrape = Registry::default();
        scrape.register_collector(Box::new(gauges.clone()));
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail, and every value here encodes.
        if encode(&mut out, &self.registry).and_then(|()| encode(&mut out, &scrape)).is_err() {
            tracing::error!("encoding metrics failed; the scrape is incomplete");
        }
        out
    }
}

/// A labelled counter family, announced (`# HELP`, `# TYPE`) even before its first sample, so a
/// scrape always shows what can be counted (a registered family is left out while empty).
#[derive(Debug)]
struct Announced<S> {
    name: &'static str,
    help: &'static str,
    family: Family<S, Counter>,
}

impl<S> Collector for Announced<S>
where
    S: EncodeLabelSet + Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.family.encode(encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?)
    }
}

/// Encodes `(name, help, value)` counters read at scrape time, one family each (names without
/// `_total`: the encoder adds it).
fn constant_counters<N>(encoder: &mut DescriptorEncoder, counters: &[(&str, &str, N)]) -> Result<(), std::fmt::Error>
where
    N: Copy + EncodeCounterValue + std::fmt::Debug,
{
    for &(name, help, value) in counters {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}

/// The connection table's counters, read when scraped (absent until a table is watched).
struct ConntableCollector(Arc<Mutex<Option<Arc<Conntable>>>>);

impl std::fmt::Debug for ConntableCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConntableCollector")
    }
}

impl Collector for ConntableCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(t) = table else { return Ok(()) };
        let counters = [
            (
                "sluice_connections_without_entry",
                "Redirected-port connections with no connection-table entry (closed unserved).",
                t.misses(),
            ),
            ("sluice_conntable_errors", "Connection-table lookups that failed with a system error.", t.errors()),
        ];
        constant_counters(&mut encoder, &counters)?;
        if let Some(events) = t.kernel_stats() {
            let mut family = encoder.encode_descriptor(
                "sluice_kernel_events",
                "eBPF program events, summed over CPUs: connects, slots taken and refused (quota_refused), \
                 connection-table inserts by outcome, releases.",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in events {
                ConstCounter::new(value).encode(family.encode_family(&[("event", event)])?)?;
            }
        }
        // Bounded by the kernel map (SLUICE_QUOTA_ENTRIES sandboxes).
        let Some(sandboxes) = t.sandbox_counters() else { return Ok(()) };
        let mut used = encoder.encode_descriptor(
            "sluice_sandbox_tcp_sockets",
            "TCP sockets each sandbox holds a connection-table slot for ([sandbox] max_tcp_sockets), by cgroup id.",
            None,
            MetricType::Gauge,
        )?;
        for (cgroup_id, q) in &sandboxes {
            let id = cgroup_id.to_string();
            ConstGauge::new(q.used.max(0)).encode(used.encode_family(&[("cgroup_id", id.as_str())])?)?;
        }
        let mut refused = encoder.encode_descriptor(
            "sluice_sandbox_tcp_refused",
            "TCP connects refused in the kernel because the sandbox held [sandbox] max_tcp_sockets, by cgroup id.",
            None,
            MetricType::Counter,
        )?;
        for (cgroup_id, q) in &sandboxes {
            let id = cgroup_id.to_string();
            ConstCounter::new(q.refused).encode(refused.encode_family(&[("cgroup_id", id.as_str())])?)?;
        }
        Ok(())
    }
}

/// What the proxy counts at accept, read when scraped. A trait, so that the proxy depends on
/// this module (it counts upstream errors here) and not the other way round.
pub trait AdmissionCounters: Send + Sync {
    /// Connections accepted, and closed at accept over `[proxy] max_connections`.
    fn accepted_and_over_limit(&self) -> (u64, u64);
    /// Connections closed at accept over `[proxy] max_connections_per_sandbox`, by cgroup id.
    fn sandbox_over_limit(&self) -> Vec<(u64, u64)>;
}

/// The empty `Weak` before a proxy is watched.
struct NoProxy;

impl AdmissionCounters for NoProxy {
    fn accepted_and_over_limit(&self) -> (u64, u64) {
        (0, 0)
    }
    fn sandbox_over_limit(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// The proxy's admission counters, read when scraped (absent until a proxy is watched).
struct ProxyCollector(Arc<Mutex<Weak<dyn AdmissionCounters>>>);

impl std::fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCollector")
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let proxy = self.0.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
        let Some(p) = proxy else { return Ok(()) };
        let (accepted, over_limit) = p.accepted_and_over_limit();
        let counters = [
            ("sluice_proxy_connections_accepted", "Connections the proxy accepted.", accepted),
            (
                "sluice_proxy_over_limit",
                "Connections closed at accept: all sandboxes together were at [proxy] max_connections.",
                over_limit,
            ),
        ];
        constant_counters(&mut encoder, &counters)?;
        let mut family = encoder.encode_descriptor(
            "sluice_proxy_sandbox_over_limit",
            "Connections closed at accept: their sandbox was at [proxy] max_connections_per_sandbox, by cgroup id \
             (\"0\": sandboxes beyond the series bound).",
            None,
            MetricType::Counter,
        )?;
        for (cgroup_id, value) in p.sandbox_over_limit() {
            let id = cgroup_id.to_string();
            ConstCounter::new(value).encode(family.encode_family(&[("cgroup_id", id.as_str())])?)?;
        }
        Ok(())
    }
}

/// The Unix socket filter's refusals, read from its per-CPU eBPF counters when scraped (absent
/// until a filter is watched; since the counters' map was created, which survives restarts).
struct UnixCollector(Arc<Mutex<Option<Arc<UnixFilter>>>>);

impl std::fmt::Debug for UnixCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnixCollector")
    }
}

impl Collector for UnixCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let filter = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(f) = filter else { return Ok(()) };
        let Ok((connects, sends)) = f.refused() else {
            tracing::warn!("cannot read the Unix socket filter's counters");
            return Ok(());
        };
        let counters = [
            (
                "sluice_unix_connects_refused",
                "Unix socket connects by agents refused (EPERM) by the eBPF filter.",
                connects,
            ),
            ("sluice_unix_sends_refused", "Unix datagrams sent by agents refused (EPERM) by the eBPF filter.", sends),
        ];
        constant_counters(&mut encoder, &counters)?;
        Ok(())
    }
}

/// Values read from the daemon's state when scraped.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub pending_holds: u64,
    pub passports: u64,
    pub sandboxes: u64,
    pub log_size: u64,
    /// Spend in each passport's current cumulative window, largest first (at most
    /// [`MAX_SPEND_SERIES`]).
    pub spend: Vec<SpendSample>,
    /// Passports left out of `spend` by the bound.
    pub spend_omitted: u64,
    /// The ledger writer's durable writes and journal laps since the store opened (counters).
    pub store: crate::ledger::WriteStats,
}

#[derive(Debug, Clone)]
pub struct SpendSample {
    pub passport_id: String,
    pub agent_id: String,
    pub window: &'static str,
    pub cents: u64,
    pub limit_cents: Option<u64>,
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let simple = [
            ("sluice_holds_pending", "Holds waiting for a human.", self.pending_holds),
            ("sluice_passports_registered", "Passports registered with the daemon.", self.passports),
            ("sluice_sandboxes", "Live sandboxes (sluice run and bound units).", self.sandboxes),
            ("sluice_log_size", "Records in the attestation log.", self.log_size),
            (
                "sluice_spend_series_omitted",
                "Passports whose spend is not exported (over the series bound).",
                self.spend_omitted,
            ),
        ];
        for (name, help, value) in simple {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        // Counters kept by the ledger, read here.
        let seconds = |ns: u64| ns as f64 / 1e9;
        let store = &self.store;
        let counts = [
            (
                "sluice_store_durable_writes",
                "Group commits made durable (journal entries, or redb commits for groups the journal does not take).",
                store.durable_writes,
            ),
            (
                "sluice_store_journal_laps",
                "Times the half of the journal being written was full and the ledger writer moved to the other half.",
                store.laps,
            ),
            (
                "sluice_store_led_groups",
                "Group commits a proxy thread made itself, its request the only one in progress there and the writer idle (part of the durable writes).",
                store.led_groups,
            ),
        ];
        constant_counters(&mut encoder, &counts)?;
        let times = [
            (
                "sluice_store_durable_write_seconds",
                "Time spent in those durable writes: the disk's part of every decision's wait.",
                seconds(store.durable_write_ns),
            ),
            (
                "sluice_store_journal_lap_wait_seconds",
                "Time those moves took (the new half's header write, and any wait for redb to hold that half's older entries); the requests of the group at hand waited with it.",
                seconds(store.lap_wait_ns),
            ),
            (
                "sluice_store_writer_busy_seconds",
                "Time the ledger writer was busy (taking a batch to answering it); its rate is the writer's utilisation.",
                seconds(store.busy_ns),
            ),
        ];
        constant_counters(&mut encoder, &times)?;
        let mut spend = encoder.encode_descriptor(
            "sluice_spend_cents",
            "Spend in the passport's current cumulative window, in cents.",
            None,
            MetricType::Gauge,
        )?;
        for s in &self.spend {
            ConstGauge::new(s.cents).encode(spend.encode_family(&spend_labels(s))?)?;
        }
        let mut limit = encoder.encode_descriptor(
            "sluice_spend_limit_cents",
            "The passport's cumulative spend limit, in cents.",
            None,
            MetricType::Gauge,
        )?;
        for s in &self.spend {
            if let Some(cents) = s.limit_cents {
                ConstGauge::new(cents).encode(limit.encode_family(&spend_labels(s))?)?;
            }
        }
        Ok(())
    }
}

fn spend_labels(s: &SpendSample) -> [(&'static str, &str); 3] {
    [("passport_id", s.passport_id.as_str()), ("agent_id", s.agent_id.as_str()), ("window", s.window)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_decision_summary_is_due_once_a_period_with_every_decision_counted_once() {
        let s = DecisionSummary::new();
        let period = DECISION_SUMMARY_EVERY.as_millis() as u64;
        for _ in 0..5 {
            assert_eq!(s.count("allow", 10), None);
        }
        assert_eq!(s.count("block", 20), None);
        assert_eq!(s.count("request_hold", period - 1), None);
        // The first decision at or after the deadline takes the counts (itself included).
        let due = s.count("allow", period + 500).expect("due");
        assert_eq!(due, SummaryDue { allow: 6, block: 1, hold: 1, seconds: 60 });
        // Not again before the next period; the counts start from zero.
        assert_eq!(s.count("allow", period + 501), None);
        assert_eq!(s.count("allow", 2 * period + 499), None);
        let due = s.count("block", 2 * period + 500).expect("due again");
        assert_eq!(due, SummaryDue { allow: 2, block: 1, hold: 0, seconds: 60 });
        // A quiet stretch: the line says how long it covers.
        let due = s.count("allow", 10 * period).expect("due after a quiet stretch");
        assert_eq!((due.allow, due.seconds), (1, (10 * period - (2 * period + 500)) / 1000));
    }

    /// The value of the series `line_prefix` (e.g. `foo{a="b"}`) in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn decisions_are_counted_by_decision_and_reason() {
        let m = Metrics::new();
        m.decision("allow", "ok");
        m.decision("allow", "ok");
        m.decision("block", "spend_limit_exceeded");
        let text = m.render(&Gauges::default());
        assert_eq!(value(&text, "sluice_decisions_total{decision=\"allow\",reason=\"ok\"}"), Some(2.0));
        assert_eq!(
            value(&text, "sluice_decisions_total{decision=\"block\",reason=\"spend_limit_exceeded\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn hostile_reasons_are_escaped_and_bounded() {
        let m = Metrics::new();
        // A CEL rule's reason is written by whoever issued the passport.
        m.decision("block", "a\"b\\c\nd");
        let text = m.render(&Gauges::default());
        assert!(text.contains(r#"reason="a\"b\\c\nd"} 1"#), "{text}");
        assert!(text.lines().all(|l| !l.starts_with('d')), "a newline escaped the label: {text}");
        for i in 0..10 * MAX_DECISION_SERIES {
            m.decision("block", &format!("reason-{i}"));
        }
        let text = m.render(&Gauges::default());
        let series = text.lines().filter(|l| l.starts_with("sluice_decisions_total{")).count();
        assert!(series <= MAX_DECISION_SERIES + 1, "{series} series");
        let other = value(&text, "sluice_decisions_total{decision=\"block\",reason=\"other\"}").unwrap();
        // Every decision is still counted, in its own series or in `other`.
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("sluice_decisions_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, (1 + 10 * MAX_DECISION_SERIES) as f64);
        assert!(other > 0.0);
    }

    #[test]
    fn the_histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        m.store_commit(Duration::from_micros(50));
        m.store_commit(Duration::from_millis(3));
        m.store_commit(Duration::from_secs(10));
        let text = m.render(&Gauges::default());
        assert_eq!(value(&text, "sluice_store_commit_seconds_bucket{le=\"0.0001\"}"), Some(1.0));
        assert_eq!(value(&text, "sluice_store_commit_seconds_bucket{le=\"0.0025\"}"), Some(1.0));
        assert_eq!(value(&text, "sluice_store_commit_seconds_bucket{le=\"0.005\"}"), Some(2.0));
        assert_eq!(value(&text, "sluice_store_commit_seconds_bucket{le=\"2.5\"}"), Some(2.0));
        assert_eq!(value(&text, "sluice_store_commit_seconds_bucket{le=\"+Inf\"}"), Some(3.0));
        assert_eq!(value(&text, "sluice_store_commit_seconds_count"), Some(3.0));
        let sum = value(&text, "sluice_store_commit_seconds_sum").unwrap();
        assert!((sum - 10.00305).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn upstream_error_kinds_are_bounded() {
        let m = Metrics::new();
        m.upstream_error("connect");
        m.upstream_error("connect");
        let text = m.render(&Gauges::default());
        assert_eq!(value(&text, "sluice_upstream_errors_total{kind=\"connect\"}"), Some(2.0));
        const KINDS: [&str; 40] = [
            "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11", "k12", "k13", "k14", "k15",
            "k16", "k17", "k18", "k19", "k20", "k21", "k22", "k23", "k24", "k25", "k26", "k27", "k28", "k29", "k30",
            "k31", "k32", "k33", "k34", "k35", "k36", "k37", "k38", "k39",
        ];
        for k in KINDS {
            m.upstream_error(k);
        }
        let text = m.render(&Gauges::default());
        assert!(
            text.lines().filter(|l| l.starts_with("sluice_upstream_errors_total{")).count() <= MAX_UPSTREAM_KINDS + 1
        );
        assert!(value(&text, "sluice_upstream_errors_total{kind=\"other\"}").is_some());
    }

    #[test]
    fn gauges_render_every_series_with_help_and_type() {
        let g = Gauges {
            pending_holds: 2,
            passports: 3,
            sandboxes: 1,
            log_size: 42,
            spend: vec![SpendSample {
                passport_id: "pp_x".into(),
                agent_id: "shop\"per".into(),
                window: "daily",
                cents: 460,
                limit_cents: Some(1000),
            }],
            spend_omitted: 0,
            store: Default::default(),
        };
        let text = Metrics::new().render(&g);
        assert_eq!(value(&text, "sluice_holds_pending"), Some(2.0));
        assert_eq!(value(&text, "sluice_log_size"), Some(42.0));
        assert_eq!(
            value(&text, "sluice_spend_cents{passport_id=\"pp_x\",agent_id=\"shop\\\"per\",window=\"daily\"}"),
            Some(460.0)
        );
        assert_eq!(
            value(&text, "sluice_spend_limit_cents{passport_id=\"pp_x\",agent_id=\"shop\\\"per\",window=\"daily\"}"),
            Some(1000.0)
        );
        // Every sample belongs to a family announced with # TYPE.
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(families.contains(&name) || families.contains(&family), "{line}");
        }
    }

    // ---- the exposition parsed back ------------------------------------------------------------

    /// One metric family of the text format: name, type, and samples (name, labels, value).
    #[derive(Debug)]
    struct Family {
        name: String,
        kind: String,
        samples: Vec<(String, BTreeMap<String, String>, f64)>,
    }

    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }

    /// `name{a="x",b="y"}` -> (name, labels, rest of the line), unescaping `\\`, `\"`, `\n`.
    fn parse_series(line: &str) -> Result<(String, BTreeMap<String, String>, &str), String> {
        let end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..end];
        if !is_name(name, true) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[end..];
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = inner.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = inner.find('=').ok_or("label without =")?;
                let key = &inner[..eq];
                if !is_name(key, false) {
                    return Err(format!("bad label name {key:?}"));
                }
                let mut chars = inner[eq + 1..].strip_prefix('"').ok_or("unquoted label value")?.char_indices();
                let mut value = String::new();
                let close = loop {
                    match chars.next().ok_or("unterminated label value")? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        (_, '\n') => return Err("raw newline in a label value".into()),
                        (_, c) => value.push(c),
                    }
                };
                if labels.insert(key.to_string(), value).is_some() {
                    return Err(format!("label {key} twice"));
                }
                inner = &inner[eq + 1..][close + 2..];
                inner = inner.strip_prefix(',').unwrap_or(inner);
            }
        }
        Ok((name.to_string(), labels, rest))
    }

    /// A strict reader of the text format 0.0.4: every sample belongs to the family declared by
    /// the `# TYPE` line before it, a family's lines are contiguous, no series appears twice.
    fn parse_exposition(text: &str) -> Result<Vec<Family>, String> {
        let mut families: Vec<Family> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, doc) = help.split_once(' ').ok_or("HELP without text")?;
                if families.iter().any(|f| f.name == name) {
                    return Err(format!("HELP for {name} after its TYPE, or twice"));
                }
                if doc.is_empty() {
                    return Err(format!("empty HELP for {name}"));
                }
                continue;
            }
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').ok_or("TYPE without a type")?;
                if !["counter", "gauge", "histogram"].contains(&kind) {
                    return Err(format!("unexpected type {kind}"));
                }
                if families.iter().any(|f| f.name == name) {
                    return Err(format!("family {name} declared twice"));
                }
                families.push(Family { name: name.into(), kind: kind.into(), samples: Vec::new() });
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                return Err(format!("unexpected line {line:?}"));
            }
            let (name, labels, rest) = parse_series(line)?;
            let value: f64 = rest
                .strip_prefix(' ')
                .ok_or("no space before the value")?
                .parse()
                .map_err(|e| format!("{line:?}: {e}"))?;
            let family = families.last_mut().ok_or_else(|| format!("{name} before any TYPE"))?;
            let belongs = name == family.name
                || (family.kind == "histogram"
                    && ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{}{s}", family.name)));
            if !belongs {
                return Err(format!("{name} is not in family {} (the one open)", family.name));
            }
            if !seen.insert((name.clone(), labels.clone())) {
                return Err(format!("series {name}{labels:?} twice"));
            }
            family.samples.push((name, labels, value));
        }
        Ok(families)
    }

    /// A connection table on a descriptor that is not a BPF map: every lookup fails, counted as
    /// an error and a miss.
    fn failing_conntable() -> Arc<Conntable> {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let t = Conntable::new(fd);
        assert!(t.lookup("127.0.0.1:9".parse().unwrap(), 15001).is_none());
        Arc::new(t)
    }

    #[test]
    fn the_exposition_parses_back_with_every_family_named_as_documented() {
        let m = Metrics::new();
        let hostile = "q\"uote\\back\nline}{,=\u{e9}";
        m.decision("allow", "ok");
        m.decision("block", hostile);
        m.upstream_error("tls");
        m.store_commit(Duration::from_micros(300));
        m.store_commit(Duration::from_secs(3));
        m.watch_conntable(failing_conntable());
        let gauges = Gauges {
            pending_holds: 1,
            passports: 2,
            sandboxes: 0,
            log_size: 9,
            spend: vec![
                SpendSample {
                    passport_id: "pp_a".into(),
                    agent_id: hostile.into(),
                    window: "daily",
                    cents: 7,
                    limit_cents: Some(9),
                },
                SpendSample {
                    passport_id: "pp_b".into(),
                    agent_id: "b".into(),
                    window: "weekly",
                    cents: 3,
                    limit_cents: None,
                },
            ],
            spend_omitted: 4,
            store: crate::ledger::WriteStats {
                durable_writes: 3,
                durable_write_ns: 450_000,
                laps: 1,
                lap_wait_ns: 2_500_000_000,
                busy_ns: 3_000_000_000,
                led_groups: 2,
            },
        };
        let text = m.render(&gauges);
        let families = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut names: Vec<(&str, &str)> = families.iter().map(|f| (f.name.as_str(), f.kind.as_str())).collect();
        names.sort();
        // The names dashboards and the README use; changing one is a breaking change.
        assert_eq!(
            names,
            [
                ("sluice_connections_without_entry_total", "counter"),
                ("sluice_conntable_errors_total", "counter"),
                ("sluice_decisions_total", "counter"),
                ("sluice_heap_release_seconds_total", "counter"),
                ("sluice_heap_releases_total", "counter"),
                ("sluice_holds_pending", "gauge"),
                ("sluice_log_size", "gauge"),
                ("sluice_passports_registered", "gauge"),
                ("sluice_sandboxes", "gauge"),
                ("sluice_spend_cents", "gauge"),
                ("sluice_spend_limit_cents", "gauge"),
                ("sluice_spend_series_omitted", "gauge"),
                ("sluice_store_commit_seconds", "histogram"),
                ("sluice_store_durable_write_seconds_total", "counter"),
                ("sluice_store_durable_writes_total", "counter"),
                ("sluice_store_journal_lap_wait_seconds_total", "counter"),
                ("sluice_store_journal_laps_total", "counter"),
                ("sluice_store_led_groups_total", "counter"),
                ("sluice_store_writer_busy_seconds_total", "counter"),
                ("sluice_upstream_errors_total", "counter"),
            ]
        );
        let family = |n: &str| families.iter().find(|f| f.name == n).unwrap();
        let one = |n: &str| {
            let f = family(n);
            assert_eq!(f.samples.len(), 1, "{f:?}");
            f.samples[0].2
        };
        assert_eq!(one("sluice_connections_without_entry_total"), 1.0);
        assert_eq!(one("sluice_conntable_errors_total"), 1.0);
        assert_eq!(
            (one("sluice_holds_pending"), one("sluice_log_size"), one("sluice_spend_series_omitted")),
            (1.0, 9.0, 4.0)
        );
        // The ledger's counters, nanoseconds shown as seconds.
        assert_eq!((one("sluice_store_durable_writes_total"), one("sluice_store_journal_laps_total")), (3.0, 1.0));
        assert_eq!(one("sluice_store_led_groups_total"), 2.0);
        assert!((one("sluice_store_durable_write_seconds_total") - 0.00045).abs() < 1e-12);
        assert!((one("sluice_store_journal_lap_wait_seconds_total") - 2.5).abs() < 1e-12);
        assert!((one("sluice_store_writer_busy_seconds_total") - 3.0).abs() < 1e-12);
        // Hostile label values come back exactly as they went in.
        let blocked = &family("sluice_decisions_total").samples.iter().find(|s| s.1["decision"] == "block").unwrap().1;
        assert_eq!(blocked["reason"], hostile);
        let spend = &family("sluice_spend_cents").samples;
        assert_eq!(spend.len(), 2);
        assert!(
            spend.iter().any(|s| s.1["agent_id"] == hostile && s.1["window"] == "daily" && s.2 == 7.0),
            "{spend:?}"
        );
        assert_eq!(family("sluice_spend_limit_cents").samples.len(), 1, "no limit, no series");
        // The histogram: one bucket per bound plus +Inf, `le` spelled as before, cumulative.
        let h = &family("sluice_store_commit_seconds").samples;
        let buckets: Vec<(&str, f64)> =
            h.iter().filter(|s| s.0.ends_with("_bucket")).map(|s| (s.1["le"].as_str(), s.2)).collect();
        let les: Vec<&str> = buckets.iter().map(|b| b.0).collect();
        let mut want: Vec<String> = COMMIT_BUCKETS.iter().map(|b| b.to_string()).collect();
        want.push("+Inf".into());
        assert_eq!(les, want);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        assert_eq!(buckets.last().unwrap().1, 2.0);
        let count = h.iter().find(|s| s.0 == "sluice_store_commit_seconds_count").unwrap().2;
        let sum = h.iter().find(|s| s.0 == "sluice_store_commit_seconds_sum").unwrap().2;
        assert_eq!(count, 2.0);
        assert!((sum - 3.0003).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn counter_families_are_announced_before_their_first_sample() {
        let text = Metrics::new().render(&Gauges::default());
        let families = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for name in ["sluice_decisions_total", "sluice_upstream_errors_total", "sluice_store_commit_seconds"] {
            assert!(families.iter().any(|f| f.name == name), "{name} missing:\n{text}");
        }
        assert!(text.contains("# HELP sluice_decisions_total Decisions made, by decision and reason.\n"), "{text}");
    }

    #[test]
    fn the_parser_rejects_what_prometheus_would() {
        for bad in [
            "x 1\n",
            "# TYPE x counter\ny 1\n",
            "# TYPE x counter\nx{a=\"b} 1\n",
            "# TYPE x counter\nx{a=\"\\q\"} 1\n",
            "# TYPE x counter\nx 1\nx 2\n",
            "# TYPE x gauge\n# TYPE x gauge\n",
            "# TYPE x counter\nx 1",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn concurrent_new_reasons_keep_the_bound_and_every_count() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..MAX_DECISION_SERIES {
                        m.decision("block", &format!("r{}", (i * 4 + t) % (2 * MAX_DECISION_SERIES)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.render(&Gauges::default());
        let families = parse_exposition(&text).unwrap();
        let decisions = &families.iter().find(|f| f.name == "sluice_decisions_total").unwrap().samples;
        assert!(decisions.len() <= MAX_DECISION_SERIES + 1, "{} series", decisions.len());
        let total: f64 = decisions.iter().map(|s| s.2).sum();
        assert_eq!(total, (4 * MAX_DECISION_SERIES) as f64);
    }
}
