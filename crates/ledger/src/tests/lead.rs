//! Groups led by a request alone on its thread: where the transaction runs, that it is durable
//! and answered like any other, that requests leading and callers queueing interleave without a
//! lost update, that the checkpoint timer still follows, and that a store shut down refuses a
//! leader. The power-loss test runs with leading clients too
//! (`power_loss_loses_no_answered_transaction_when_clients_lead`).

use super::*;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

/// The thread a closure ran on: its id and name.
type RanOn = Arc<Mutex<Option<(ThreadId, Option<String>)>>>;

/// A transaction that records the thread its closure ran on.
fn noting_thread(ran_on: RanOn) -> impl FnOnce(&mut Txn<'_>) -> Result<((), Vec<Draft>), TxnError> + Send + 'static {
    move |_| {
        let me = std::thread::current();
        *ran_on.lock().unwrap() = Some((me.id(), me.name().map(str::to_string)));
        Ok(((), vec![Draft::new(HOST_CHAIN, obj(json!({"kind": "event", "event": "lead"})))]))
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A request that never ends, counted on this thread once polled.
fn another_request_in_progress() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let mut other: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(RequestInProgress::serve(std::future::pending::<()>()));
    let poll = other.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    assert!(poll.is_pending());
    other
}

#[test]
fn a_request_alone_on_its_thread_commits_its_own_group() {
    let store = TestStore::new();
    let ledger = store.open();
    let rt = current_thread();
    let ran_on = Arc::new(Mutex::new(None));
    let here = std::thread::current().id();

    // The only request in progress here: the closure runs on this thread, and the answer is
    // durable and readable like any other.
    rt.block_on(RequestInProgress::serve(ledger.transact(noting_thread(ran_on.clone())))).unwrap();
    assert_eq!(ran_on.lock().unwrap().take().unwrap().0, here, "the group ran on the caller's thread");
    let stats = ledger.write_stats();
    assert_eq!((stats.led_groups, stats.durable_writes), (1, 1), "{stats:?}");
    assert_eq!(ledger.size(), 1);
    assert!(ledger.record(0).unwrap().is_some());

    // Another request in progress on the thread: this one has company, so the writer thread
    // runs its group.
    let other = another_request_in_progress();
    rt.block_on(RequestInProgress::serve(ledger.transact(noting_thread(ran_on.clone())))).unwrap();
    let (id, name) = ran_on.lock().unwrap().take().unwrap();
    assert_ne!(id, here);
    assert_eq!(name.as_deref(), Some("sluice-ledger"), "the writer thread ran it");
    // Nor does other work of the thread while that request is in progress.
    rt.block_on(ledger.transact(noting_thread(ran_on.clone()))).unwrap();
    assert_ne!(ran_on.lock().unwrap().take().unwrap().0, here);
    drop(other);

    // Work that is no request never leads.
    rt.block_on(ledger.transact(noting_thread(ran_on.clone()))).unwrap();
    assert_ne!(ran_on.lock().unwrap().take().unwrap().0, here);
    assert_eq!(ledger.write_stats().led_groups, 1);
    ledger.shutdown();
}

#[test]
fn a_led_group_whose_closure_fails_or_panics_leaves_no_trace_and_the_store_goes_on() {
    let store = TestStore::new();
    let ledger = store.open();
    let rt = current_thread();
    let alone = |f| rt.block_on(RequestInProgress::serve(f));
    alone(ledger.transact(spend("p", 5, "w"))).unwrap();
    let failed = rt.block_on(RequestInProgress::serve(ledger.transact(|txn| {
        txn.put("spend/p/w", &99i64.to_be_bytes())?;
        Err::<((), Vec<Draft>), _>(TxnError::abort("no"))
    })));
    assert!(matches!(failed, Err(LedgerError::Txn(_))), "{failed:?}");
    let panicked =
        rt.block_on(RequestInProgress::serve(ledger.transact(|txn| -> Result<((), Vec<Draft>), TxnError> {
            txn.put("spend/p/w", &99i64.to_be_bytes())?;
            panic!("a closure that panics");
        })));
    assert!(matches!(panicked, Err(LedgerError::Panicked)), "{panicked:?}");
    let (after, _) = alone(ledger.transact(spend("p", 1, "w"))).unwrap();
    assert_eq!(after, 6, "neither the failed nor the panicked closure's write was kept");
    assert_eq!(ledger.size(), 2);
    assert!(ledger.write_stats().led_groups >= 3);
    ledger.shutdown();
}

/// Four threads whose transactions lead when they can, and tasks of a multi-threaded runtime
/// that always queue, on one counter: no update is lost, indices are 0..n, chains link and the
/// export verifies; both paths were taken.
#[test]
fn leading_and_queued_transactions_interleave_without_loss() {
    let store = TestStore::new();
    let ledger = store.open();
    const LEADERS: usize = 4;
    const QUEUERS: usize = 8;
    const PER: usize = 150;
    let bump = |chain: String| {
        move |txn: &mut Txn<'_>| {
            let total = txn.get("total")?.map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(0);
            txn.put("total", &(total + 1).to_be_bytes())?;
            Ok(((), vec![Draft::new(chain, obj(json!({"kind": "event", "event": "bump"})))]))
        }
    };
    let mut leaders = Vec::new();
    for t in 0..LEADERS {
        let ledger = ledger.clone();
        leaders.push(std::thread::spawn(move || {
            current_thread().block_on(RequestInProgress::serve(async {
                for _ in 0..PER {
                    ledger.transact(bump(format!("lead{t}"))).await.unwrap();
                }
            }))
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..QUEUERS {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..PER {
                    ledger.transact(bump(format!("queue{t}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    for l in leaders {
        l.join().unwrap();
    }
    let n = ((LEADERS + QUEUERS) * PER) as u64;
    assert_eq!(ledger.size(), n);
    let total = ledger.state_get("total").unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(total.try_into().unwrap()), n, "an update was lost");
    let stats = ledger.write_stats();
    assert!(stats.led_groups > 0, "no transaction led: {stats:?}");
    assert!(stats.durable_writes > stats.led_groups, "no group was the writer thread's: {stats:?}");
    let report = verify::verify_export(&rt.block_on(full_export(&ledger)), &vk(), None);
    assert!(report.is_ok(), "{}", problems(&report));
    assert_eq!(report.chains_checked, LEADERS + QUEUERS);
    ledger.shutdown();
}

/// A led group leaves the log without a checkpoint, and the writer thread, idle since the last
/// checkpoint, has no timer armed: the leader tells it, and a checkpoint follows without
/// anyone asking.
#[test]
fn checkpoints_follow_growth_from_a_led_group() {
    let store = TestStore::new();
    // Longer than the pause below, so the led group does not sign one itself.
    let opts = LedgerOptions { checkpoint_interval: Duration::from_millis(500), ..LedgerOptions::default() };
    let ledger = Ledger::open(&store.path, host_key(), opts).unwrap();
    let rt = current_thread();
    // The log covered by a checkpoint, and the writer thread given time to go back to waiting
    // for jobs with no timer armed (without it the timer would be armed by its own group).
    rt.block_on(ledger.transact(host_event("one"))).unwrap();
    rt.block_on(ledger.checkpoint_now()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    rt.block_on(RequestInProgress::serve(ledger.transact(host_event("two")))).unwrap();
    assert_eq!(ledger.write_stats().led_groups, 1);
    assert_eq!(ledger.latest_checkpoint().unwrap().unwrap().checkpoint.size, 1, "the led group signed none");
    // Liveness, not timing: wait (bounded) until the writer thread signed for the record.
    let mut covered = false;
    for _ in 0..1000 {
        if ledger.latest_checkpoint().unwrap().is_some_and(|cp| cp.checkpoint.size == 2) {
            covered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(covered, "no checkpoint was signed after a led group");
    ledger.shutdown();
}

#[test]
fn a_store_shut_down_refuses_a_caller_that_would_lead() {
    let store = TestStore::new();
    let ledger = store.open();
    let rt = current_thread();
    rt.block_on(RequestInProgress::serve(ledger.transact(host_event("one")))).unwrap();
    assert_eq!(ledger.write_stats().led_groups, 1);
    let clone = ledger.clone();
    ledger.shutdown();
    let refused = rt.block_on(RequestInProgress::serve(clone.transact(host_event("two"))));
    assert!(matches!(refused, Err(LedgerError::Closed)), "{refused:?}");
    assert_eq!(clone.size(), 1);
    assert_eq!(clone.latest_checkpoint().unwrap().unwrap().checkpoint.size, 1, "the final checkpoint covers the tail");
}
