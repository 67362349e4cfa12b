//! Live updates: `GET /api/events` is a server-sent event stream of `overview` events, each the
//! whole page's data as JSON (the same document `GET /api/overview` answers). The stream looks
//! at the service once a second and sends an event when anything changed, a comment every 15 s
//! otherwise (so proxies and the browser keep it open), and ends when the session does.

use super::{Body, Ctx};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Event streams open at once, all sessions together; more are answered `503`.
pub const MAX_STREAMS: usize = 8;
/// Passports and records the overview carries at most.
pub const MAX_AGENTS: usize = 200;
pub const RECENT_RECORDS: usize = 50;
const TICK: Duration = Duration::from_secs(1);
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The page's data: agents with their spend and counters, pending holds, recent records, the
/// latest checkpoint, the last "verify now" result. A part that cannot be read says why in
/// `errors` instead of failing the whole page.
pub fn overview(ctx: &Ctx) -> Value {
    let s = &ctx.service;
    let mut errors = Vec::new();
    let mut part = |name: &str, v: Result<Value, crate::service::ServiceError>| match v {
        Ok(v) => v,
        Err(e) => {
            errors.push(format!("{name}: {e}"));
            Value::Null
        }
    };
    let agents = part("agents", s.agents(MAX_AGENTS).map(|a| a.to_json()));
    let holds = part("holds", s.holds().map(|h| h.to_json()));
    let records = part("records", s.recent_records(RECENT_RECORDS).map(|r| r.to_json()));
    let checkpoint = part("checkpoint", s.checkpoint().map(|c| c.map(|c| c.to_json()).unwrap_or(Value::Null)));
    let verification = ctx.last_verification().map(|v| v.to_json()).unwrap_or(Value::Null);
    json!({
        "health": s.health().to_json(),
        "agents": agents,
        "holds": holds,
        "records": records,
        "checkpoint": checkpoint,
        "verification": verification,
        "stops": s.stops().to_json(),
        "errors": errors,
    })
}

/// One SSE event.
fn event(name: &str, data: &Value) -> Bytes {
    // serde_json never writes a raw newline inside a document, so `data:` is one line.
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Starts the event stream of `session_id`, or `None` when [`MAX_STREAMS`] are open.
pub fn stream(ctx: &Arc<Ctx>, session_id: String) -> Option<Body> {
    let permit = ctx.streams.clone().try_acquire_owned().ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
    let ctx = ctx.clone();
    let mut shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut last = String::new();
        let mut quiet_since = Instant::now();
        // The retry hint: a browser reconnects after a second if the stream drops.
        if tx.send(Ok(Bytes::from_static(b"retry: 1000\n\n"))).await.is_err() {
            return;
        }
        loop {
            if !ctx.sessions.is_open(&session_id) {
                let _ = tx.send(Ok(event("logout", &json!({"reason": "the session ended"})))).await;
                return;
            }
            let c = ctx.clone();
            let Ok(data) = tokio::task::spawn_blocking(move || overview(&c)).await else { return };
            let text = data.to_string();
            let sent = if text != last {
                last = text;
                quiet_since = Instant::now();
                tx.send(Ok(event("overview", &data))).await
            } else if quiet_since.elapsed() >= KEEPALIVE {
                quiet_since = Instant::now();
                tx.send(Ok(Bytes::from_static(b": keepalive\n\n"))).await
            } else {
                Ok(())
            };
            if sent.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = ctx.changed.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    });
    Some(crate::httpbody::ChannelBody::new(rx).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_data_line_whatever_the_json_holds() {
        let e = event("overview", &json!({"note": "line one\nline two\r\n", "x": "data: fake\n\nevent: logout"}));
        let text = std::str::from_utf8(&e).unwrap();
        assert!(text.starts_with("event: overview\ndata: {"));
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches('\n').count(), 3, "{text}");
    }
}
