//! Where a process's CPU goes, thread by thread, read from `/proc/<pid>/task`.
//!
//! The proxy benchmark reports the daemon's CPU per request as one figure; to tell the proxy's
//! own work from the ledger's (the price of "durable before forwarded"), it also splits that
//! figure by the role of each thread, known from the names the daemon gives its threads.
//!
//! Time on CPU comes from `schedstat` (nanoseconds, exact) rather than `stat`'s clock ticks (10 ms
//! each: too coarse to split a few seconds between five threads). Context switches come from
//! `status` (voluntary + involuntary): each one is a sleep and a wake-up, the cost of handing work
//! between threads.

use std::collections::BTreeMap;

/// What a thread of the daemon does, from its name (`/proc/.../comm`, cut at 15 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `sluice-proxy-N`: the runtimes that serve agents (TLS, HTTP, decisions, upstreams).
    Proxy,
    /// `sluice-ledger`: the ledger's writer (group commits, the journal's durable write).
    Writer,
    /// `sluice-ledger-index`: the indexer (segments, tiles, indexes, behind the writer).
    Indexer,
    /// `sluice-ledger-seal`: the sealer (compresses sealed segments).
    Sealer,
    /// Everything else: the main runtime (API, DNS, console), CEL compiles, tokio's blocking pool.
    Rest,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Proxy, Role::Writer, Role::Indexer, Role::Sealer, Role::Rest];

    /// The role of a thread named `comm`. The kernel keeps 15 bytes of a name, so
    /// `sluice-ledger-index` reads `sluice-ledger-i` and `sluice-ledger-seal` reads `sluice-ledger-s`.
    pub fn of(comm: &str) -> Role {
        let comm = comm.trim_end();
        if comm.starts_with("sluice-proxy") {
            Role::Proxy
        } else if comm == "sluice-ledger" {
            Role::Writer
        } else if comm.starts_with("sluice-ledger-i") {
            Role::Indexer
        } else if comm.starts_with("sluice-ledger-s") {
            Role::Sealer
        } else {
            Role::Rest
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Writer => "writer",
            Role::Indexer => "indexer",
            Role::Sealer => "sealer",
            Role::Rest => "rest",
        }
    }
}

/// One thread's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Time on CPU, in nanoseconds (`schedstat`'s first field).
    pub cpu_ns: u64,
    /// Voluntary plus involuntary context switches (`status`).
    pub switches: u64,
}

/// Every thread of a process at one moment, by thread id.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    threads: BTreeMap<u32, (Role, Counters)>,
}

impl Sample {
    /// Reads every thread of `pid`. A thread that ends while it is read is left out; an
    /// unreadable process gives `None`.
    pub fn take(pid: u32) -> Option<Sample> {
        let mut threads = BTreeMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let dir = entry.path();
            let (Ok(comm), Ok(schedstat), Ok(status)) = (
                std::fs::read_to_string(dir.join("comm")),
                std::fs::read_to_string(dir.join("schedstat")),
                std::fs::read_to_string(dir.join("status")),
            ) else {
                continue;
            };
            let Some(counters) = parse(&schedstat, &status) else { continue };
            threads.insert(tid, (Role::of(&comm), counters));
        }
        Some(Sample { threads })
    }

    /// What each role did between `self` (earlier) and `later`. A thread seen only in `later`
    /// counts from zero; a thread gone by `later` is lost (its last counters cannot be read),
    /// which can only make a figure smaller.
    pub fn until(&self, later: &Sample) -> BTreeMap<Role, Counters> {
        let mut by_role: BTreeMap<Role, Counters> = Role::ALL.iter().map(|r| (*r, Counters::default())).collect();
        for (tid, (role, after)) in &later.threads {
            let before = self.threads.get(tid).map(|(_, c)| *c).unwrap_or_default();
            let sum = by_role.entry(*role).or_default();
            sum.cpu_ns += after.cpu_ns.saturating_sub(before.cpu_ns);
            sum.switches += after.switches.saturating_sub(before.switches);
        }
        by_role
    }
}

/// A thread's counters from the text of its `schedstat` and `status` files.
fn parse(schedstat: &str, status: &str) -> Option<Counters> {
    let cpu_ns = schedstat.split_whitespace().next()?.parse().ok()?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
    };
    let switches = field("voluntary_ctxt_switches")? + field("nonvoluntary_ctxt_switches")?;
    Some(Counters { cpu_ns, switches })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_the_names_the_kernel_keeps() {
        assert_eq!(Role::of("sluice-proxy-0\n"), Role::Proxy);
        assert_eq!(Role::of("sluice-proxy-11"), Role::Proxy);
        assert_eq!(Role::of("sluice-ledger\n"), Role::Writer);
        assert_eq!(Role::of("sluice-ledger-i\n"), Role::Indexer);
        assert_eq!(Role::of("sluice-ledger-s\n"), Role::Sealer);
        assert_eq!(Role::of("sluice\n"), Role::Rest);
        assert_eq!(Role::of("tokio-runtime-w"), Role::Rest);
        assert_eq!(Role::of("sluice-ledgerx"), Role::Rest, "only the writer's exact name is the writer");
    }

    #[test]
    fn counters_from_proc_text() {
        let status = "Name:\tsluice-ledger\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse("123456789 2000 55\n", status), Some(Counters { cpu_ns: 123_456_789, switches: 127 }));
        assert_eq!(parse("", status), None);
        assert_eq!(parse("12 0 0", "Name:\tx\n"), None, "no context switch counters");
    }

    #[test]
    fn differences_by_role() {
        let c = |cpu_ns, switches| Counters { cpu_ns, switches };
        let before = Sample {
            threads: BTreeMap::from([
                (1, (Role::Proxy, c(100, 10))),
                (2, (Role::Writer, c(50, 5))),
                (3, (Role::Rest, c(9, 9))),
            ]),
        };
        let after = Sample {
            threads: BTreeMap::from([
                (1, (Role::Proxy, c(400, 30))),
                (2, (Role::Writer, c(80, 6))),
                (4, (Role::Proxy, c(20, 2))), // new since `before`
            ]),
        };
        let d = before.until(&after);
        assert_eq!(d[&Role::Proxy], c(320, 22));
        assert_eq!(d[&Role::Writer], c(30, 1));
        assert_eq!(d[&Role::Rest], c(0, 0), "a thread that ended is not counted");
        assert_eq!(d[&Role::Indexer], c(0, 0));
    }

    #[test]
    fn this_process_can_be_read() {
        let s = Sample::take(std::process::id()).expect("our own /proc");
        assert!(!s.threads.is_empty());
        assert!(Sample::take(u32::MAX).is_none(), "no such process");
    }
}
