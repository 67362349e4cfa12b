//! Per-passport lanes: decisions are evaluated outside the ledger writer.
//!
//! The ledger has one writer thread, and every transaction closure runs on it one after the
//! other. A decision's evaluation (its CEL rules included) therefore must not run there: one slow
//! rule would stall every agent on the host. Instead each registered passport has a *lane*:
//!
//! 1. The lane knows the passport's `usage/<id>` value (its counters) as its last transaction
//!    leaves it, whether that transaction is durable yet or not.
//! 2. A decision takes the lane, evaluates against those counters *outside* the writer (on a
//!    blocking thread when CEL rules take part, see [`needs_blocking_thread`]), submits its
//!    transaction, notes the counters it will leave (speculatively: the next decision of the
//!    passport is evaluated against them) and lets the lane go before waiting for durability.
//!    So one passport's decisions are evaluated one at a time, in order, but their commits still
//!    share group commits.
//! 3. In the writer the closure only compares: if the passport is revoked, or under an emergency
//!    stop (`stop/all` or `stop/<id>`, see `stops.rs`), it writes that block; otherwise the stored `usage/<id>` bytes must be exactly the bytes it was evaluated
//!    against (compare-and-set), and then it writes the precomputed counters and record.
//! 4. If they differ (a settlement, a reset or an approval moved the counters, or an earlier
//!    transaction of the lane failed), nothing is written and the writer answers at once with the
//!    current bytes ([`Moved`]); the lane adopts them and the decision is evaluated again, at most
//!    [`MAX_ATTEMPTS`] times in all. After that the request is answered
//!    [`ServiceError::Contended`] (`503`, nothing decided, recorded or forwarded). Since every
//!    writer of `usage/<id>` goes through the lane, a second attempt normally succeeds: only a
//!    store failure, or counters written behind the service's back, make one fail again.
//!
//! The comparison is on the stored value itself, so it is exact whatever moved it: a decision is
//! committed only against the very counters it was evaluated on, at its place in the log's
//! order, which is what evaluating inside the transaction gave. Nothing is lost or spent twice.
//!
//! Every other writer of a passport's counters (settlement, counter reset) computes inside its
//! own short transaction (no CEL) and goes through the lane too ([`Service::lane_invalidating`]):
//! it is submitted while the lane is held, so it reaches the writer in the lane's order, and the
//! lane then forgets the counters; the next decision reads them from the writer ([`Moved`] again,
//! from a transaction that only looks). A hold approval is evaluated like a decision.

use super::{Service, ServiceError};
use crate::decide::{Usage, UsageError};
use crate::ledger::{self, Draft, LedgerError, Txn, TxnError};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;

/// Evaluations of one decision, the first included, before it is answered
/// [`ServiceError::Contended`].
pub(super) const MAX_ATTEMPTS: u32 = 4;

/// The lanes, by passport id. A lane is made on a passport's first decision and lives as long as
/// the daemon (as registered passports do).
#[derive(Default)]
pub(super) struct Lanes {
    map: Mutex<HashMap<String, Arc<Lane>>>,
}

/// One passport's lane: whoever holds `state` evaluates or submits for that passport. The
/// state-table keys its transactions read are made once, with the lane.
struct Lane {
    state: Arc<tokio::sync::Mutex<LaneState>>,
    /// `usage/<id>`: the passport's counters.
    usage_key: Arc<str>,
    /// `revoked/<id>`.
    revoked_key: Arc<str>,
    /// `stop/<id>`: an emergency stop of this passport alone.
    stop_key: Arc<str>,
}

impl Lane {
    fn new(passport_id: &str) -> Lane {
        Lane {
            state: Arc::default(),
            usage_key: format!("usage/{passport_id}").into(),
            revoked_key: format!("revoked/{passport_id}").into(),
            stop_key: format!("{STOP_PREFIX}{passport_id}").into(),
        }
    }
}

#[derive(Default)]
struct LaneState {
    /// The stored `usage/<id>` as the lane's last submitted transaction leaves it: `None` when
    /// unknown (read it from the writer first), `Some(None)` when the passport has no counters.
    known: Option<Option<Arc<Counters>>>,
    /// Changes whenever `known` is set from the store rather than from the lane's own
    /// speculation: a failed transaction adopts the bytes it saw only if nothing re-read them
    /// since it was evaluated.
    epoch: u64,
}

impl Lanes {
    fn get(&self, passport_id: &str) -> Result<Arc<Lane>, ServiceError> {
        let mut map = self.map.lock().map_err(|_| ServiceError::LockPoisoned("lanes"))?;
        if let Some(lane) = map.get(passport_id) {
            return Ok(lane.clone());
        }
        let lane = Arc::new(Lane::new(passport_id));
        map.insert(passport_id.to_string(), lane.clone());
        Ok(lane)
    }
}

/// A passport's stored counters as a lane knows them: the `usage/<id>` bytes, which the writer
/// compares, and, when the lane's own evaluation wrote them, the [`Usage`] they encode, so that
/// the next evaluation does not parse back what the previous one just wrote (a JSON parse of
/// two timestamps per decision). Bytes read from the store are parsed as before.
pub(super) struct Counters {
    bytes: Vec<u8>,
    /// `Usage::from_bytes(&bytes)` would give exactly this (`to_bytes` is tested to read back
    /// as itself); it is checked as the parse checks it ([`Usage::check_stored`]).
    written: Option<Usage>,
}

impl Counters {
    fn read(bytes: Vec<u8>) -> Counters {
        Counters { bytes, written: None }
    }

    fn written(usage: Usage) -> Counters {
        Counters { bytes: usage.to_bytes(), written: Some(usage) }
    }

    /// The counters, or why they cannot be read (the caller blocks; see `Usage::from_bytes`).
    pub(super) fn usage(&self) -> Result<Usage, UsageError> {
        match &self.written {
            Some(u) => u.check_stored().map(|()| u.clone()),
            None => Usage::from_bytes(&self.bytes),
        }
    }
}

/// The usage of `counters` (none yet: [`Usage::default`]), or why it cannot be read.
pub(super) fn usage_of(counters: Option<&Counters>) -> Result<Usage, UsageError> {
    counters.map_or_else(|| Ok(Usage::default()), Counters::usage)
}

/// A transaction found `usage/<id>` other than expected: the bytes it found (`None`: no
/// counters). Travels through [`TxnError::Abort`]; the writer answers at once.
#[derive(Debug, thiserror::Error)]
#[error("the counters of passport {passport_id} moved while its decision was evaluated")]
pub(super) struct Moved {
    passport_id: String,
    current: Option<Vec<u8>>,
}

/// The `Moved` inside a ledger error, if that is what it is.
/// State-table key of the emergency stop of every passport.
pub(super) const STOP_ALL_KEY: &str = "stop/all";
/// State-table key prefix of one passport's emergency stop (`stop/<passport id>`).
pub(super) const STOP_PREFIX: &str = "stop/";

/// Why a passport's decisions are refused before its counters are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Barred {
    Revoked,
    /// An operator's emergency stop covers it.
    Stopped,
}

fn moved(e: LedgerError) -> Result<Moved, LedgerError> {
    match e {
        LedgerError::Txn(TxnError::Abort(inner)) => match inner.downcast::<Moved>() {
            Ok(m) => Ok(*m),
            Err(inner) => Err(LedgerError::Txn(TxnError::Abort(inner))),
        },
        e => Err(e),
    }
}

/// What one evaluation in a lane decided to do.
pub(super) struct Speculation<P> {
    /// The counters to store with the record (an allow); `None` leaves them as they are.
    pub writes: Option<Usage>,
    /// What the commit needs (the built decision, its record...).
    pub plan: P,
}

/// Polls `fut` once, then lets `guard` go, then waits for the rest. The first poll of a ledger
/// transaction submits it when the writer's queue has room, so transactions submitted this way
/// under one lane reach the writer in the lane's order (when the queue is full they may not; the
/// compare-and-set keeps that safe, at the price of a retry).
async fn submit_then_release<F: Future, G>(fut: F, guard: G) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    drop(guard);
    match first {
        Poll::Ready(out) => out,
        Poll::Pending => fut.await,
    }
}

impl Service {
    /// Runs one counter-moving evaluation of passport `passport_id` in its lane (see the module
    /// doc). `evaluate(counters, at)` gets the stored `usage/<id>` (`None`: none yet; read it
    /// with [`usage_of`]) and the decision time; it runs on a blocking thread when `blocking` is set. `commit(barred,
    /// plan, txn)` runs in the writer after the compare-and-set succeeded (and the counters were
    /// written), or with `barred` set, before any comparison, when the passport is revoked or
    /// stopped in the store (nothing is written then).
    pub(super) async fn in_lane<P, T, Ev, Co>(
        &self,
        passport_id: &str,
        blocking: bool,
        evaluate: Ev,
        commit: Co,
    ) -> Result<(T, Vec<ledger::Appended>), ServiceError>
    where
        P: Send + 'static,
        T: Send + 'static,
        // Cloned per attempt (callers capture `Arc`s): cheaper than boxing them once per call.
        Ev: Fn(Option<&Counters>, DateTime<Utc>) -> Speculation<P> + Clone + Send + Sync + 'static,
        Co: Fn(Option<Barred>, P, &mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Clone + Send + Sync + 'static,
    {
        let lane = self.lanes.get(passport_id)?;
        for attempt in 1..=MAX_ATTEMPTS {
            let mut state = lane.state.clone().lock_owned().await;
            let expects = match &state.known {
                Some(known) => known.clone(),
                None => {
                    let current = self.peek(passport_id, &lane.usage_key).await?.map(|b| Arc::new(Counters::read(b)));
                    state.known = Some(current.clone());
                    state.epoch = state.epoch.wrapping_add(1);
                    current
                }
            };
            let epoch = state.epoch;
            let at = super::now();
            let speculation = if blocking {
                // The lane goes with the evaluation: if the request is dropped meanwhile, the lane
                // stays taken until the rules have run, so one passport never runs two at once.
                let (evaluate, counters) = (evaluate.clone(), expects.clone());
                let (speculation, back) =
                    tokio::task::spawn_blocking(move || (evaluate(counters.as_deref(), at), state))
                        .await
                        .map_err(|e| ServiceError::Evaluation(e.to_string()))?;
                state = back;
                speculation
            } else {
                evaluate(expects.as_deref(), at)
            };
            let Speculation { writes, plan } = speculation;
            let writes = writes.map(|u| Arc::new(Counters::written(u)));
            // The next evaluation of this passport starts from what this one leaves.
            state.known = Some(writes.clone().or_else(|| expects.clone()));
            let (ukey, rkey, skey, commit) =
                (lane.usage_key.clone(), lane.revoked_key.clone(), lane.stop_key.clone(), commit.clone());
            let work = move |txn: &mut Txn<'_>| {
                if txn.peek(&rkey).is_some() {
                    return commit(Some(Barred::Revoked), plan, txn);
                }
                if txn.peek(STOP_ALL_KEY).is_some() || txn.peek(&skey).is_some() {
                    return commit(Some(Barred::Stopped), plan, txn);
                }
                let current = txn.peek(&ukey);
                if current != expects.as_deref().map(|c| c.bytes.as_slice()) {
                    let passport_id = ukey.strip_prefix("usage/").unwrap_or(&ukey).to_string();
                    let current = current.map(<[u8]>::to_vec);
                    return Err(TxnError::abort(Moved { passport_id, current }));
                }
                if let Some(w) = &writes {
                    txn.put(&ukey, &w.bytes)?;
                }
                commit(None, plan, txn)
            };
            let result = submit_then_release(self.transact(work), state).await;
            match result {
                Ok(done) => return Ok(done),
                Err(e) => {
                    let mut state = lane.state.lock().await;
                    let fresh = state.epoch == epoch;
                    match moved(e) {
                        Ok(m) => {
                            if fresh {
                                state.known = Some(m.current.map(|b| Arc::new(Counters::read(b))));
                                state.epoch = state.epoch.wrapping_add(1);
                            }
                            tracing::debug!(passport_id, attempt, "counters moved during evaluation; evaluating again");
                        }
                        Err(e) => {
                            if fresh {
                                state.known = None;
                                state.epoch = state.epoch.wrapping_add(1);
                            }
                            return Err(e.into());
                        }
                    }
                }
            }
        }
        tracing::warn!(
            passport_id,
            attempts = MAX_ATTEMPTS,
            "the counters kept moving under this decision; answered unavailable, nothing decided"
        );
        Err(ServiceError::Contended { passport_id: passport_id.to_string(), attempts: MAX_ATTEMPTS })
    }

    /// Runs a transaction that moves passport `passport_id`'s counters by itself (a settlement, a
    /// reset): submitted while its lane is held, so that it takes its place in the lane's order;
    /// the lane then reads the counters again before its next evaluation.
    pub(super) async fn lane_invalidating<T, F>(
        &self,
        passport_id: &str,
        f: F,
    ) -> Result<(T, Vec<ledger::Appended>), ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<(T, Vec<Draft>), TxnError> + Send + 'static,
    {
        let lane = self.lanes.get(passport_id)?;
        let mut state = lane.state.lock().await;
        state.known = None;
        state.epoch = state.epoch.wrapping_add(1);
        Ok(submit_then_release(self.transact(f), state).await?)
    }

    /// The stored `key` as the writer sees it now (every transaction submitted before included,
    /// durable or not): a transaction that only reads and aborts, so it never waits for a commit.
    async fn peek(&self, passport_id: &str, key: &Arc<str>) -> Result<Option<Vec<u8>>, ServiceError> {
        let (id, key) = (passport_id.to_string(), key.clone());
        let result = self
            .transact(move |txn: &mut Txn<'_>| -> Result<((), Vec<Draft>), TxnError> {
                let current = txn.get(&key)?;
                Err(TxnError::abort(Moved { passport_id: id, current }))
            })
            .await;
        match result {
            Ok(_) => Err(ServiceError::NotAppended("counters read")),
            Err(e) => Ok(moved(e)?.current),
        }
    }
}

/// Whether an evaluation runs CEL rules (the passport's or the host policy's) and so belongs on a
/// blocking thread rather than on one of the runtime's workers.
pub(super) fn needs_blocking_thread(
    cp: &crate::decide::CompiledPassport,
    host_rules: Option<&crate::decide::CompiledRules>,
) -> bool {
    !cp.rules().is_empty() || host_rules.is_some_and(|r| !r.is_empty())
}
