//! Prometheus metrics, served as text (exposition format 0.0.4) at `GET /metrics` on the local
//! API.
//!
//! Counters and the commit-latency histogram live in one process-wide [`Metrics`] ([`global`]),
//! incremented where things happen (the service for decisions and commits, the proxy for upstream
//! errors). Values that already exist elsewhere (pending holds, spend, the connection table's
//! misses) are read when scraped, never copied, so they cannot drift.
//!
//! Every label set is bounded: decision reasons can come from a passport's CEL rules (hostile
//! input), so at most [`MAX_DECISION_SERIES`] distinct (decision, reason) pairs are kept and the
//! rest are counted under `reason="other"`; spend is exported for at most [`MAX_SPEND_SERIES`]
//! passports (the largest spenders). Label values are escaped as the format requires.
//!
//! Written by hand (a few counters, one histogram) rather than with a metrics crate: the format
//! is small and stable, and this keeps the hot path to one uncontended lock and a few atomics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::kernel::Conntable;

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

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound (not cumulative), then the +Inf bucket.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The process's counters.
#[derive(Debug)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<(String, String), u64>>,
    upstream_errors: Mutex<BTreeMap<&'static str, u64>>,
    commit: Histogram,
    conntable: Mutex<Option<Arc<Conntable>>>,
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
        Metrics {
            decisions: Mutex::new(BTreeMap::new()),
            upstream_errors: Mutex::new(BTreeMap::new()),
            commit: Histogram::new(COMMIT_BUCKETS),
            conntable: Mutex::new(None),
        }
    }

    /// One decision (`allow`, `request_hold`, `block`) with its stable reason.
    pub fn decision(&self, decision: &str, reason: &str) {
        let Ok(mut m) = self.decisions.lock() else { return };
        let key = (decision.to_string(), reason.to_string());
        if let Some(n) = m.get_mut(&key) {
            *n += 1;
            return;
        }
        let key = if m.len() < MAX_DECISION_SERIES { key } else { (decision.to_string(), "other".to_string()) };
        *m.entry(key).or_default() += 1;
    }

    /// An upstream failure seen by the proxy (`kind`: `connect`, `tls`, `http`, `timeout`, ...).
    pub fn upstream_error(&self, kind: &'static str) {
        let Ok(mut m) = self.upstream_errors.lock() else { return };
        if m.len() >= MAX_UPSTREAM_KINDS && !m.contains_key(kind) {
            *m.entry("other").or_default() += 1;
            return;
        }
        *m.entry(kind).or_default() += 1;
    }

    /// How long one store transaction took from submission to durable commit.
    pub fn store_commit(&self, d: Duration) {
        self.commit.observe(d);
    }

    /// The kernel connection table whose misses (connections without an entry) are exported.
    pub fn watch_conntable(&self, table: Arc<Conntable>) {
        if let Ok(mut c) = self.conntable.lock() {
            *c = Some(table);
        }
    }

    /// The counters as exposition text, followed by `gauges` (read at scrape time by the caller).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        header(&mut out, "sluice_decisions_total", "counter", "Decisions made, by decision and reason.");
        if let Ok(m) = self.decisions.lock() {
            for ((decision, reason), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "sluice_decisions_total{{decision=\"{}\",reason=\"{}\"}} {n}",
                    escape(decision),
                    escape(reason)
                );
            }
        }
        header(
            &mut out,
            "sluice_upstream_errors_total",
            "counter",
            "Upstream connections or requests that failed, by kind.",
        );
        if let Ok(m) = self.upstream_errors.lock() {
            for (kind, n) in m.iter() {
                let _ = writeln!(out, "sluice_upstream_errors_total{{kind=\"{}\"}} {n}", escape(kind));
            }
        }
        header(
            &mut out,
            "sluice_store_commit_seconds",
            "histogram",
            "Time from submitting a store transaction to its durable group commit.",
        );
        self.commit.render(&mut out, "sluice_store_commit_seconds");
        let conntable = self.conntable.lock().ok().and_then(|c| c.clone());
        if let Some(t) = conntable {
            header(
                &mut out,
                "sluice_connections_without_entry_total",
                "counter",
                "Redirected-port connections with no connection-table entry (closed unserved).",
            );
            let _ = writeln!(out, "sluice_connections_without_entry_total {}", t.misses());
            header(
                &mut out,
                "sluice_conntable_errors_total",
                "counter",
                "Connection-table lookups that failed with a system error.",
            );
            let _ = writeln!(out, "sluice_conntable_errors_total {}", t.errors());
        }
        gauges.render(&mut out);
        out
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
    pub spend: Vec<Spend>,
    /// Passports left out of `spend` by the bound.
    pub spend_omitted: u64,
}

#[derive(Debug, Clone)]
pub struct Spend {
    pub passport_id: String,
    pub agent_id: String,
    pub window: &'static str,
    pub cents: u64,
    pub limit_cents: Option<u64>,
}

impl Gauges {
    fn render(&self, out: &mut String) {
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
        for (name, help, v) in simple {
            header(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        header(out, "sluice_spend_cents", "gauge", "Spend in the passport's current cumulative window, in cents.");
        for s in &self.spend {
            let _ = writeln!(
                out,
                "sluice_spend_cents{{passport_id=\"{}\",agent_id=\"{}\",window=\"{}\"}} {}",
                escape(&s.passport_id),
                escape(&s.agent_id),
                escape(s.window),
                s.cents
            );
        }
        header(out, "sluice_spend_limit_cents", "gauge", "The passport's cumulative spend limit, in cents.");
        for s in &self.spend {
            if let Some(limit) = s.limit_cents {
                let _ = writeln!(
                    out,
                    "sluice_spend_limit_cents{{passport_id=\"{}\",agent_id=\"{}\",window=\"{}\"}} {limit}",
                    escape(&s.passport_id),
                    escape(&s.agent_id),
                    escape(s.window)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
pub fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
            spend: vec![Spend {
                passport_id: "pp_x".into(),
                agent_id: "shop\"per".into(),
                window: "daily",
                cents: 460,
                limit_cents: Some(1000),
            }],
            spend_omitted: 0,
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
}
