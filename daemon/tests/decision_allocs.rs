//! What one proxied decision costs the thread that asks for it, counted in heap allocations: a
//! figure that stays put on a shared machine, where timings are noise. This test binary's
//! allocator counts, per thread, the allocations made while a thread asks it to. The decisions
//! run on a current-thread runtime, so the count is what the proxy's worker pays per request on
//! the service's side (the lane, the evaluation, the record built outside the writer, the
//! outcome, the log line). The ledger writer's thread (`sluice-ledger`: the transaction, sealing,
//! the group) is counted apart: it is the one serial stage every decision on the host goes
//! through, and where an allocation also costs a contended free on another thread's arena.

use sluice::decide::{Decision, HostVerdict};
use sluice::ledger::{hostkey::HostKey, Ledger, LedgerOptions};
use sluice::passport::domain::DomainPattern;
use sluice::passport::{self, Cents, Constraints, IssueRequest, Permission, SpendWindow, TrustTier};
use sluice::service::{EnforceInput, HoldOrigin, Peer, Service, ServiceConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The system allocator, counting the allocations of threads that asked to be counted.
struct Counting;

thread_local! {
    /// `Some(n)`: this thread counts, `n` so far.
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether this thread is the ledger's writer: unknown until its first allocation.
    static WRITER: Cell<Thread> = const { Cell::new(Thread::Unknown) };
}

#[derive(Clone, Copy, PartialEq)]
enum Thread {
    Unknown,
    /// Its name is being read (an allocation meanwhile is not the writer's).
    Asking,
    Writer,
    Other,
}

/// Allocations of the writer thread while [`WRITER_COUNTING`] is set.
static WRITER_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static WRITER_COUNTING: AtomicBool = AtomicBool::new(false);

fn note() {
    // `try_with`: a thread being torn down is not counted.
    let _ = COUNT.try_with(|c| {
        if let Some(n) = c.get() {
            c.set(Some(n + 1));
        }
    });
    if WRITER_COUNTING.load(Ordering::Relaxed) {
        let _ = WRITER.try_with(|w| {
            if w.get() == Thread::Unknown {
                w.set(Thread::Asking);
                let writer = std::thread::current().name() == Some("sluice-ledger");
                w.set(if writer { Thread::Writer } else { Thread::Other });
            }
            if w.get() == Thread::Writer {
                WRITER_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

// SAFETY: every call is forwarded to `System` unchanged; counting touches only a
// const-initialised thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A service on a fresh store with one passport shaped like the proxy bench's: any action, an
/// allowlist of one host, a cumulative limit, no rules.
async fn service() -> (tempfile::TempDir, Arc<Service>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger =
        Ledger::open(&dir.path().join("ledger.redb"), HostKey::generate(), LedgerOptions::default()).expect("ledger");
    let service =
        Service::start(ledger, ServiceConfig::passport_only(vec![], Duration::from_secs(60))).await.expect("service");
    let issuer = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let constraints = Constraints {
        max_cumulative: Some(Cents(1_000_000_000)),
        cumulative_window: Some(SpendWindow::Monthly),
        domain_allowlist: Some(vec![DomainPattern::parse("api.bench.test").expect("pattern")]),
        ..Constraints::default()
    };
    let issued = passport::issue(
        IssueRequest {
            agent_id: "bench".into(),
            agent_name: None,
            permissions: vec![Permission::parse("*").expect("permission")],
            constraints,
            trust_tier: TrustTier::L1,
            lifetime_secs: 3600,
            now: passport::now(),
        },
        &issuer,
    )
    .expect("issue");
    let peer = Peer { uid: 0, gid: 0, pid: 1, user: Some("root".into()) };
    service.register(&issued.token, None, &peer).await.expect("register");
    (dir, service, issued.claims.id.to_string())
}

/// A proxied `GET https://api.bench.test/small`, as the proxy asks for it.
fn input(passport_id: &str) -> EnforceInput {
    EnforceInput {
        passport_id: passport_id.to_string(),
        action: "web:fetch".into(),
        cost_millicents: Some(0),
        target: Some("api.bench.test".into()),
        method: Some("GET".into()),
        path: Some("/small".into()),
        ..Default::default()
    }
}

/// Allocations per allowed decision, after a warm-up. The bound is a regression guard: raise it
/// only with a reason (and the figure in docs/testing.md).
#[tokio::test(flavor = "current_thread")]
async fn allocations_per_allowed_decision_stay_few() {
    const DECISIONS: u64 = 200;
    let (_dir, service, id) = service().await;
    for _ in 0..20 {
        let o = service.enforce_outcome(input(&id), HoldOrigin::Proxy, HostVerdict::Allow).await;
        assert_eq!(o.expect("enforce").decision, Decision::Allow);
    }
    let inputs: Vec<EnforceInput> = (0..DECISIONS).map(|_| input(&id)).collect();
    let mut outcomes = Vec::with_capacity(inputs.len());
    COUNT.with(|c| c.set(Some(0)));
    WRITER_COUNTING.store(true, Ordering::Relaxed);
    for i in inputs {
        outcomes.push(service.enforce_outcome(i, HoldOrigin::Proxy, HostVerdict::Allow).await);
    }
    // Every decision was answered, so the writer is done with all of them (one group each: they
    // are asked one after another).
    WRITER_COUNTING.store(false, Ordering::Relaxed);
    let allocations = COUNT.with(|c| c.replace(None)).unwrap_or(0);
    let writer = WRITER_ALLOCATIONS.load(Ordering::Relaxed);
    for o in outcomes {
        assert_eq!(o.expect("enforce").decision, Decision::Allow);
    }
    let per_decision = allocations as f64 / DECISIONS as f64;
    let writer_per_decision = writer as f64 / DECISIONS as f64;
    eprintln!("allocations per allowed decision on the caller's thread: {per_decision:.1}");
    eprintln!("allocations per allowed decision on the ledger writer's thread: {writer_per_decision:.1}");
    assert!(per_decision <= 20.0, "{per_decision:.1} allocations per decision");
    // At least the record's own copy: a count of zero means the writer was not found.
    assert!(writer_per_decision >= 1.0, "the writer thread's allocations were not counted");
    // One decision per group here, so the group's own allocations (the batch, the entry's
    // vectors, the group's time) count whole: about half of these. Under load they are shared
    // by every decision of a group.
    assert!(writer_per_decision <= 16.0, "{writer_per_decision:.1} writer allocations per decision");
}

/// Many allowed decisions one after another on one thread, for an instruction count that the
/// machine's load does not move: run it in release under callgrind, collecting only inside
/// `enforce_outcome` (the caller's side; the ledger's threads are not counted), e.g.
///
/// ```sh
/// valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*enforce_outcome*' \
///   target/release/deps/decision_allocs-* --ignored --exact decisions_for_profiling
/// ```
///
/// and divide by `SLUICE_PROFILE_DECISIONS` (default 2,000) plus the 20 of the warm-up.
/// `SLUICE_PROFILE_TO_JSON=1` also makes each outcome's JSON, as the API (and `bench
/// decisions`) does: collect inside `DecisionOutcome::to_json` to count that edge's share.
#[tokio::test(flavor = "current_thread")]
#[ignore = "a profiling loop, not a check: run it under callgrind"]
async fn decisions_for_profiling() {
    let decisions: usize = std::env::var("SLUICE_PROFILE_DECISIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000);
    let (_dir, service, id) = service().await;
    for _ in 0..20 {
        let o = service.enforce_outcome(input(&id), HoldOrigin::Proxy, HostVerdict::Allow).await;
        assert_eq!(o.expect("enforce").decision, Decision::Allow);
    }
    let to_json = std::env::var("SLUICE_PROFILE_TO_JSON").as_deref() == Ok("1");
    let started = std::time::Instant::now();
    for _ in 0..decisions {
        let o = service.enforce_outcome(input(&id), HoldOrigin::Proxy, HostVerdict::Allow).await.expect("enforce");
        assert_eq!(o.decision, Decision::Allow);
        if to_json {
            assert_eq!(o.to_json()["decision"], "allow");
        }
    }
    eprintln!("{decisions} allowed decisions in {:?}", started.elapsed());
}
