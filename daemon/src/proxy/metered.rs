//! The response side of a metered route: a body that lets every frame through unchanged while a
//! [`UsageScanner`] reads the usage fields as they pass, and settles the cost when the body ends.
//!
//! Nothing is buffered: each frame is fed to the fixed-memory scanner and handed on in the same
//! poll, so an SSE stream reaches the agent event by event. Settlement runs in a spawned task; the
//! response never waits for the store.
//!
//! How a body ends decides what is settled:
//! - end of stream with usage → the real cost ([`meter::cost`]) replaces the estimate;
//! - end of stream without usage → the estimate stands (`no_usage`);
//! - an error from upstream, or the body dropped before its end (the agent went away, the
//!   connection was cut) → the estimate stands (`connection_cut`). Partial usage is not trusted:
//!   the stream's final counts never arrived.

use super::decider::Decide;
use super::upstream::{BoxError, ProxyBody};
use crate::policy::meter::{self, MeterSpec, UsageScanner};
use crate::service::settle_why;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// How a metered response ended: the real cost in millicents if known, and the settlement reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ending {
    pub actual_millicents: Option<u64>,
    pub why: &'static str,
}

type OnEnd = Box<dyn FnOnce(Ending) + Send + Sync>;

/// A response body that scans usage as it streams and reports its [`Ending`] exactly once.
pub(super) struct MeteredBody {
    inner: ProxyBody,
    spec: Arc<MeterSpec>,
    /// Boxed: the scanner's fixed state is a few hundred bytes, kept off the response future.
    scanner: Box<UsageScanner>,
    on_end: Option<OnEnd>,
}

impl MeteredBody {
    pub(super) fn new(inner: ProxyBody, spec: Arc<MeterSpec>, on_end: OnEnd) -> MeteredBody {
        let scanner = Box::new(UsageScanner::new(spec.kind));
        MeteredBody { inner, spec, scanner, on_end: Some(on_end) }
    }

    fn end(&mut self, complete: bool) {
        let Some(on_end) = self.on_end.take() else { return };
        let ending = if complete {
            let scanner = std::mem::replace(&mut *self.scanner, UsageScanner::new(self.spec.kind));
            match scanner.finish() {
                Some(usage) => {
                    Ending { actual_millicents: Some(meter::cost(&self.spec, &usage)), why: settle_why::USAGE }
                }
                None => Ending { actual_millicents: None, why: settle_why::NO_USAGE },
            }
        } else {
            Ending { actual_millicents: None, why: settle_why::CONNECTION_CUT }
        };
        on_end(ending);
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scanner.feed(data);
                }
                if this.inner.is_end_stream() {
                    this.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // A body dropped before its end was cut; one dropped at its end (a peer that stops
        // polling once `is_end_stream` says so) is complete.
        let complete = self.inner.is_end_stream();
        self.end(complete);
    }
}

/// Wraps a metered route's response body so that its cost is settled when it ends, in a task
/// of its own (`Service::settle`).
/// Settlements spawned and not yet recorded, process-wide: the proxy's drain waits for them, so
/// that a response that ended during the drain has its cost settled before the runtime that
/// runs the settlement is dropped.
static SETTLING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Settlements in progress ([`SETTLING`]).
pub(super) fn settling() -> usize {
    SETTLING.load(std::sync::atomic::Ordering::SeqCst)
}

/// One settlement in progress, counted until dropped (recorded, failed, or cancelled).
struct Settling;

impl Settling {
    fn begin() -> Settling {
        SETTLING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Settling
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        SETTLING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(super) fn settle_on_end(
    body: ProxyBody,
    spec: Arc<MeterSpec>,
    service: Arc<dyn Decide>,
    decision: u64,
    passport_id: String,
    estimate_millicents: u64,
) -> ProxyBody {
    let on_end: OnEnd = Box::new(move |ending: Ending| {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(decision, "no runtime to settle a metered cost on; the estimate stands unrecorded");
            return;
        };
        let settling = Settling::begin();
        rt.spawn(async move {
            let _settling = settling;
            if let Err(e) = service.settle(decision, &passport_id, estimate_millicents, ending.actual_millicents, ending.why).await
            {
                tracing::error!(decision, passport_id, error = %e, "settling a metered cost failed; the estimate stands");
            }
        });
    });
    MeteredBody::new(body, spec, on_end).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::meter::MeterKind;
    use http_body_util::Full;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Frames as they arrive from upstream, one per poll.
    struct Frames(VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn frames(v: Vec<Result<Frame<Bytes>, BoxError>>) -> ProxyBody {
        Frames(v.into()).boxed()
    }

    /// $1 per million input tokens, $2 per million output tokens (millicents per Mtok).
    fn spec(kind: MeterKind) -> Arc<MeterSpec> {
        Arc::new(crate::service::testkit::one_price_meter(kind, 100_000, 200_000))
    }

    fn recorder() -> (Arc<Mutex<Vec<Ending>>>, OnEnd) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, Box::new(move |e| s.lock().unwrap().push(e)))
    }

    /// A body of the given chunks, as frames arrive from upstream.
    fn chunks(parts: &[&'static str]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        self::frames(frames)
    }

    async fn run(kind: MeterKind, body: ProxyBody) -> (Vec<u8>, Vec<Ending>) {
        let (seen, on_end) = recorder();
        let metered = MeteredBody::new(body, spec(kind), on_end);
        let out = metered.collect().await.expect("body").to_bytes().to_vec();
        let seen = seen.lock().unwrap().clone();
        (out, seen)
    }

    const OPENAI_SSE: [&str; 4] = [
        "data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usa",
        "ge\":null}\n\ndata: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000000,\"completion_tokens\":500000}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[tokio::test]
    async fn frames_pass_unchanged_and_usage_settles_at_the_end() {
        let (out, seen) = run(MeterKind::OpenAi, chunks(&OPENAI_SSE)).await;
        assert_eq!(out, OPENAI_SSE.concat().as_bytes());
        // 1M input at $1 + 0.5M output at $2 = $2.00.
        assert_eq!(seen, vec![Ending { actual_millicents: Some(200_000), why: settle_why::USAGE }]);
    }

    #[tokio::test]
    async fn anthropic_json_and_sse_settle() {
        let json =
            "{\"id\":\"msg_1\",\"type\":\"message\",\"model\":\"m\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}],\
                    \"usage\":{\"input_tokens\":2000000,\"output_tokens\":1000000}}";
        let (_, seen) =
            run(MeterKind::Anthropic, Full::new(Bytes::from_static(json.as_bytes())).map_err(|e| match e {}).boxed())
                .await;
        assert_eq!(seen, vec![Ending { actual_millicents: Some(400_000), why: settle_why::USAGE }]);
        let sse = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1000000,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000000}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        let (out, seen) = run(MeterKind::Anthropic, chunks(&sse)).await;
        assert_eq!(out, sse.concat().as_bytes());
        assert_eq!(seen, vec![Ending { actual_millicents: Some(300_000), why: settle_why::USAGE }]);
    }

    #[tokio::test]
    async fn a_metered_response_settles_through_decide_with_the_scanned_usage() {
        let fake = Arc::new(super::super::decider::fake::FakeDecide::default());
        let body = settle_on_end(chunks(&OPENAI_SSE), spec(MeterKind::OpenAi), fake.clone(), 41, "pp-1".into(), 5_000);
        let out = body.collect().await.expect("body").to_bytes();
        assert_eq!(out, OPENAI_SSE.concat().as_bytes());
        let s = fake.first_settlement().await;
        assert_eq!(s, (41, "pp-1".to_string(), 5_000, Some(200_000), settle_why::USAGE.to_string()));
    }

    #[tokio::test]
    async fn a_response_without_usage_keeps_the_estimate() {
        let (_, seen) = run(MeterKind::OpenAi, chunks(&["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"])).await;
        assert_eq!(seen, vec![Ending { actual_millicents: None, why: settle_why::NO_USAGE }]);
    }

    #[tokio::test]
    async fn a_cut_or_dropped_stream_keeps_the_estimate() {
        // Upstream fails mid-stream, after usage was already seen: the estimate stands all the same.
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(OPENAI_SSE[2].as_bytes()))), Err("connection reset".into())];
        let (seen, on_end) = recorder();
        let body = MeteredBody::new(self::frames(frames), spec(MeterKind::OpenAi), on_end);
        assert!(body.collect().await.is_err());
        assert_eq!(*seen.lock().unwrap(), vec![Ending { actual_millicents: None, why: settle_why::CONNECTION_CUT }]);

        // The agent goes away after one frame: the body is dropped unfinished.
        let (seen, on_end) = recorder();
        let mut body = MeteredBody::new(chunks(&OPENAI_SSE), spec(MeterKind::OpenAi), on_end);
        assert!(body.frame().await.is_some());
        drop(body);
        assert_eq!(*seen.lock().unwrap(), vec![Ending { actual_millicents: None, why: settle_why::CONNECTION_CUT }]);
    }

    /// The whole path in process: a real service and store, five recorded-shape responses of both
    /// APIs through the settling body, then the state and `audit verify`.
    #[tokio::test]
    async fn settled_amounts_reach_the_counters_and_the_log() {
        use crate::service::testkit::{allow, fixture, record, spent, verified};
        let f = fixture().await;
        let openai_json = "{\"id\":\"c\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[],\
                           \"usage\":{\"prompt_tokens\":500000,\"completion_tokens\":250000,\"total_tokens\":750000}}";
        let anthropic_json =
            "{\"type\":\"message\",\"model\":\"m\",\"usage\":{\"input_tokens\":3000000,\"output_tokens\":0}}";
        let anthropic_sse = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1000000,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2000000}}\n\n",
        ];
        // (kind, body, estimate, expected actual), in millicents; estimates with fractions of a cent.
        let cases: Vec<(MeterKind, ProxyBody, u64, Option<u64>)> = vec![
            (
                MeterKind::OpenAi,
                Full::new(Bytes::from_static(openai_json.as_bytes())).map_err(|e| match e {}).boxed(),
                300_021,
                Some(100_000),
            ),
            (MeterKind::OpenAi, chunks(&OPENAI_SSE), 150_005, Some(200_000)),
            (
                MeterKind::Anthropic,
                Full::new(Bytes::from_static(anthropic_json.as_bytes())).map_err(|e| match e {}).boxed(),
                50,
                Some(300_000),
            ),
            (MeterKind::Anthropic, chunks(&anthropic_sse), 900_000, Some(500_000)),
            (MeterKind::OpenAi, chunks(&["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"]), 40_007, None),
        ];
        let mut expected_spend = 0;
        for (kind, body, estimate, actual) in cases {
            let decision = allow(&f, estimate).await;
            let before = f.service.ledger().size();
            let body = settle_on_end(body, spec(kind), f.service.clone(), decision, f.passport.clone(), estimate);
            body.collect().await.expect("body");
            // The settlement runs in its own task; wait for its record. The bound only turns a
            // failed settlement into a failure instead of a hang; it measures nothing.
            let appeared = async {
                while f.service.ledger().size() == before {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(60), appeared).await.expect("settlement recorded");
            let r = record(&f, before);
            assert_eq!(
                (r["kind"].as_str(), r["decision_record"].as_u64()),
                (Some("settlement"), Some(decision)),
                "{r}"
            );
            assert_eq!(r["actual_millicents"].as_u64(), actual, "{r}");
            expected_spend += actual.unwrap_or(estimate);
            assert_eq!(spent(&f), (expected_spend, expected_spend));
        }
        assert_eq!(expected_spend, 100_000 + 200_000 + 300_000 + 500_000 + 40_007);
        let report = verified(&f).await;
        assert!(report.is_ok(), "{:?}", report.problems);
    }
}
