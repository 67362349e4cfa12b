//! What the proxy needs from the service, as a trait: enforce one decision, wait on a hold,
//! settle a metered cost, record a host event. The daemon's [`Service`] is the implementation;
//! the proxy's unit tests pass a fake, so request handling is tested without root, the kernel
//! or a store.
//!
//! The trait owns no policy and no I/O of its own: it only names the calls. Every call that
//! decides must be durable before it returns `Ok` (the service's guarantee), because the proxy
//! forwards on the strength of it.

use crate::decide::HostVerdict;
use crate::service::{DecisionOutcome, EnforceInput, HoldOrigin, HoldOutcome, Service, ServiceError};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so that `Decide` can be used as `dyn Decide`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The service calls the proxy makes, one per pipeline step that needs the service.
pub(crate) trait Decide: Send + Sync {
    /// Decides one request or connection (origin: the proxy) and records it; `Err`: nothing
    /// was decided, nothing may be forwarded.
    fn enforce(
        &self,
        input: EnforceInput,
        verdict: HostVerdict,
    ) -> BoxFuture<'_, Result<DecisionOutcome, ServiceError>>;
    /// Waits until a hold is resolved (by the operator or its timeout).
    fn wait_hold<'a>(&'a self, hold_id: &'a str) -> BoxFuture<'a, HoldOutcome>;
    /// Settles a metered decision: `actual` millicents if the usage was read, else the
    /// estimate stands for reason `why`.
    fn settle<'a>(
        &'a self,
        decision_attestation_id: u64,
        passport_id: &'a str,
        estimate_millicents: u64,
        actual_millicents: Option<u64>,
        why: &'a str,
    ) -> BoxFuture<'a, Result<(), ServiceError>>;
    /// Records a host event (an upstream failure after an allow); returns its log index.
    fn record_host_event<'a>(&'a self, kind: &'a str, detail: Value) -> BoxFuture<'a, Result<u64, ServiceError>>;
}

impl Decide for Service {
    fn enforce(
        &self,
        input: EnforceInput,
        verdict: HostVerdict,
    ) -> BoxFuture<'_, Result<DecisionOutcome, ServiceError>> {
        Box::pin(self.enforce_outcome(input, HoldOrigin::Proxy, verdict))
    }

    fn wait_hold<'a>(&'a self, hold_id: &'a str) -> BoxFuture<'a, HoldOutcome> {
        Box::pin(Service::wait_hold(self, hold_id))
    }

    fn settle<'a>(
        &'a self,
        decision_attestation_id: u64,
        passport_id: &'a str,
        estimate_millicents: u64,
        actual_millicents: Option<u64>,
        why: &'a str,
    ) -> BoxFuture<'a, Result<(), ServiceError>> {
        Box::pin(async move {
            Service::settle(self, decision_attestation_id, passport_id, estimate_millicents, actual_millicents, why)
                .await
                .map(drop)
        })
    }

    fn record_host_event<'a>(&'a self, kind: &'a str, detail: Value) -> BoxFuture<'a, Result<u64, ServiceError>> {
        Box::pin(Service::record_host_event(self, kind, detail))
    }
}

/// A scripted [`Decide`] for the proxy's unit tests: answers `enforce` from a queue, `wait_hold`
/// with a fixed outcome, and records every call.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::decide::{Decision, Reason};
    use crate::service::HeldAs;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// One `settle` call: (decision, passport, estimate, actual, why).
    pub type SettleCall = (u64, String, u64, Option<u64>, String);

    #[derive(Default)]
    pub struct FakeDecide {
        pub enforce: Mutex<VecDeque<Result<DecisionOutcome, ServiceError>>>,
        pub hold: Mutex<Option<HoldOutcome>>,
        pub enforced: Mutex<Vec<(EnforceInput, HostVerdict)>>,
        pub waited: Mutex<Vec<String>>,
        pub settled: Mutex<Vec<SettleCall>>,
        /// Every `record_host_event` call: (kind, detail).
        pub events: Mutex<Vec<(String, Value)>>,
        /// How long each `enforce` takes to answer (a slow store, a decision in progress).
        pub delay: Mutex<Option<std::time::Duration>>,
    }

    impl FakeDecide {
        /// The first `settle` call. Settlement runs in its own task, so this waits for it; the
        /// 10 s bound turns a lost settlement into a failure rather than a hang.
        pub async fn first_settlement(&self) -> SettleCall {
            let settled = async {
                loop {
                    if let Some(s) = self.settled.lock().unwrap().first().cloned() {
                        return s;
                    }
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), settled).await.expect("settle called")
        }

        pub fn answering(first: Result<DecisionOutcome, ServiceError>) -> FakeDecide {
            let f = FakeDecide::default();
            f.enforce.lock().unwrap().push_back(first);
            f
        }
    }

    /// A decision outcome as the service would answer it.
    pub fn outcome(decision: Decision, reason: Reason, attestation_id: u64) -> DecisionOutcome {
        let hold = (decision == Decision::RequestHold)
            .then(|| HeldAs { id: "hold-1".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) });
        DecisionOutcome {
            decision,
            reason,
            detail: "scripted".into(),
            passport_id: "pp-1".into(),
            guardrails: Vec::new(),
            all_passed: decision == Decision::Allow,
            timestamp: chrono::Utc::now(),
            attestation_id,
            hold,
        }
    }

    impl Decide for FakeDecide {
        fn enforce(
            &self,
            input: EnforceInput,
            verdict: HostVerdict,
        ) -> BoxFuture<'_, Result<DecisionOutcome, ServiceError>> {
            self.enforced.lock().unwrap().push((input, verdict));
            let next = self.enforce.lock().unwrap().pop_front();
            let delay = *self.delay.lock().unwrap();
            Box::pin(async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                next.unwrap_or(Err(ServiceError::NotAppended("no scripted answer left")))
            })
        }

        fn wait_hold<'a>(&'a self, hold_id: &'a str) -> BoxFuture<'a, HoldOutcome> {
            self.waited.lock().unwrap().push(hold_id.to_string());
            let held = self.hold.lock().unwrap().take().unwrap_or(HoldOutcome::Abandoned);
            Box::pin(async move { held })
        }

        fn settle<'a>(
            &'a self,
            decision_attestation_id: u64,
            passport_id: &'a str,
            estimate_millicents: u64,
            actual_millicents: Option<u64>,
            why: &'a str,
        ) -> BoxFuture<'a, Result<(), ServiceError>> {
            self.settled.lock().unwrap().push((
                decision_attestation_id,
                passport_id.to_string(),
                estimate_millicents,
                actual_millicents,
                why.to_string(),
            ));
            Box::pin(async { Ok(()) })
        }

        fn record_host_event<'a>(&'a self, kind: &'a str, detail: Value) -> BoxFuture<'a, Result<u64, ServiceError>> {
            self.events.lock().unwrap().push((kind.to_string(), detail));
            Box::pin(async { Ok(0) })
        }
    }
}

/// Why the forward step got no response: `connect` when no connection to the upstream could be
/// made, `detail` the whole error chain for the operator.
#[derive(Debug)]
pub(crate) struct ForwardError {
    pub connect: bool,
    pub detail: String,
}

/// What the forward step needs from the upstream side: send one request to a target (scheme,
/// name, port; the request's URI in origin form) and return the response with its body
/// streaming. `h1_only` for `Upgrade` requests, which HTTP/2 cannot carry. The daemon's [`super::upstream::Upstream`] implements
/// it; tests pass a fake upstream.
pub(crate) trait Forward: Send + Sync {
    fn send<'a>(
        &'a self,
        target: &'a super::upstream::Target,
        req: http::Request<super::upstream::ProxyBody>,
        h1_only: bool,
    ) -> BoxFuture<'a, Result<http::Response<super::upstream::ProxyBody>, ForwardError>>;
}

impl Forward for super::upstream::Upstream {
    fn send<'a>(
        &'a self,
        target: &'a super::upstream::Target,
        req: http::Request<super::upstream::ProxyBody>,
        h1_only: bool,
    ) -> BoxFuture<'a, Result<http::Response<super::upstream::ProxyBody>, ForwardError>> {
        Box::pin(async move {
            let sent = if h1_only { self.send_h1_to(target, req).await } else { self.send_to(target, req).await };
            sent.map_err(|e| ForwardError { connect: e.is_connect(), detail: error_chain(&e) })
        })
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
