//! A mock LLM API over HTTPS for `cargo xtask demo` (binary `sluice-mock-llm`): the OpenAI Chat
//! Completions and Anthropic Messages shapes, with `usage` computed from each request, so that
//! sluice's metering settles real numbers without a real vendor or network.
//!
//! Endpoints:
//! * `POST /v1/chat/completions` (OpenAI): `model`, `messages`, `max_tokens` /
//!   `max_completion_tokens`, `stream`, `stream_options.include_usage`. JSON answer with
//!   `usage`, or with `"stream": true` server-sent `chat.completion.chunk` events, a last chunk
//!   with `usage` (only with `include_usage`, as OpenAI does) and `data: [DONE]`.
//! * `POST /v1/messages` (Anthropic): `model`, `max_tokens` (required), `messages`, `system`,
//!   `stream`. JSON answer, or the `message_start` … `message_stop` event stream.
//! * `GET /v1/models`: the model list.
//!
//! The mock model: the prompt costs `⌈characters / 4⌉ + 4` tokens per message (+ 3 for the
//! reply's priming, as OpenAI counts), and the reply is [`REPLY_TOKENS`] words (one token
//! each), or fewer when the request's output limit is lower (finish reason `length` /
//! `max_tokens`). So `completion_tokens ≤ max_tokens`, always.
//!
//! Input is hostile-shaped even here: bodies are bounded ([`MAX_BODY`], else 413), every field is
//! type-checked, and a bad request is answered 400 in the vendor's error shape, never a panic.

use crate::upstream::{BoxError, ChannelBody, RespBody};
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Most messages in one request.
pub const MAX_MESSAGES: usize = 1024;
/// Longest model name accepted.
pub const MAX_MODEL_LEN: usize = 256;
/// The mock model's reply length in tokens when the request's limit allows it.
pub const REPLY_TOKENS: u64 = 600;
/// Words (tokens) per streamed content event.
pub const WORDS_PER_EVENT: usize = 50;
/// Pause between streamed events, so a client sees the stream arrive in pieces.
pub const EVENT_PAUSE: Duration = Duration::from_millis(25);

/// The models `GET /v1/models` lists (any model name is served).
pub const MODELS: &[&str] = &["gpt-6-astra", "gpt-4o", "gpt-4o-mini", "o1", "claude-sonnet-4-6"];

const WORDS: &[&str] = &[
    "sluice",
    "metered",
    "this",
    "reply",
    "token",
    "by",
    "token",
    "and",
    "settled",
    "the",
    "real",
    "usage",
    "against",
    "the",
    "estimate",
    "it",
    "reserved",
    "before",
    "forwarding",
    "the",
    "request",
];

/// Which vendor's shapes a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    OpenAi,
    Anthropic,
}

/// A request answered 4xx, in the vendor's error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param) }
    }

    fn body(&self, vendor: Vendor) -> Value {
        match vendor {
            Vendor::OpenAi => json!({"error": {
                "message": self.message, "type": "invalid_request_error", "param": self.param, "code": null
            }}),
            Vendor::Anthropic => json!({"type": "error", "error": {
                "type": if self.status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_request_error" },
                "message": self.message
            }}),
        }
    }
}

/// What the mock read from a generation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenRequest {
    pub vendor: Vendor,
    pub model: String,
    pub prompt_tokens: u64,
    /// The output limit the request set (the smaller if it set two).
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage` (Anthropic streams always carry usage).
    pub include_usage: bool,
}

impl GenRequest {
    pub fn completion_tokens(&self) -> u64 {
        REPLY_TOKENS.min(self.max_tokens.unwrap_or(u64::MAX))
    }

    /// `true` when the reply stopped at the request's limit.
    pub fn truncated(&self) -> bool {
        self.max_tokens.is_some_and(|m| m < REPLY_TOKENS)
    }
}

fn prompt_tokens(texts: &[usize]) -> u64 {
    texts.iter().map(|&chars| (chars as u64).div_ceil(4) + 4).sum::<u64>() + 3
}

/// Characters of a message `content`: a string, or an array of parts whose `text` counts.
fn content_chars(v: &Value, param: &'static str) -> Result<usize, ApiError> {
    match v {
        Value::String(s) => Ok(s.chars().count()),
        Value::Array(parts) => {
            let mut n = 0usize;
            for p in parts {
                match p.get("text") {
                    Some(Value::String(s)) => n = n.saturating_add(s.chars().count()),
                    Some(_) => return Err(ApiError::bad(param, "a content part's text must be a string")),
                    None if p.is_object() => {}
                    None => return Err(ApiError::bad(param, "content parts must be objects")),
                }
            }
            Ok(n)
        }
        Value::Null => Ok(0),
        _ => Err(ApiError::bad(param, "content must be a string or an array of parts")),
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the request body must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("the request body is not valid JSON: {e}"))),
    }
}

fn model(m: &Map<String, Value>) -> Result<String, ApiError> {
    match m.get("model") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_MODEL_LEN => Ok(s.clone()),
        Some(Value::String(_)) => Err(ApiError::bad("model", format!("model must be 1 to {MAX_MODEL_LEN} bytes"))),
        Some(_) => Err(ApiError::bad("model", "model must be a string")),
        None => Err(ApiError::bad("model", "you must provide a model parameter")),
    }
}

fn positive(m: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(ApiError::bad(key, format!("{key} must be a positive integer"))),
        },
    }
}

fn flag(m: &Map<String, Value>, key: &'static str) -> Result<bool, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(key, format!("{key} must be a boolean"))),
    }
}

fn messages(m: &Map<String, Value>) -> Result<Vec<usize>, ApiError> {
    let Some(Value::Array(list)) = m.get("messages") else {
        return Err(ApiError::bad("messages", "messages must be an array of messages"));
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(ApiError::bad("messages", format!("messages must hold 1 to {MAX_MESSAGES} messages")));
    }
    list.iter()
        .map(|msg| {
            match msg.get("role") {
                Some(Value::String(_)) => {}
                _ => return Err(ApiError::bad("messages", "every message needs a string role")),
            }
            content_chars(msg.get("content").unwrap_or(&Value::Null), "messages")
        })
        .collect()
}

/// Parses an OpenAI Chat Completions request body.
pub fn parse_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    let model = model(&m)?;
    let texts = messages(&m)?;
    let max_tokens = match (positive(&m, "max_tokens")?, positive(&m, "max_completion_tokens")?) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let stream = flag(&m, "stream")?;
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) if stream => flag(o, "include_usage")?,
        Some(Value::Object(_)) => {
            return Err(ApiError::bad("stream_options", "stream_options is only allowed when stream is true"))
        }
        Some(_) => return Err(ApiError::bad("stream_options", "stream_options must be an object")),
    };
    Ok(GenRequest {
        vendor: Vendor::OpenAi,
        model,
        prompt_tokens: prompt_tokens(&texts),
        max_tokens,
        stream,
        include_usage,
    })
}

/// Parses an Anthropic Messages request body.
pub fn parse_messages(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    let model = model(&m)?;
    let mut texts = messages(&m)?;
    if let Some(system) = m.get("system") {
        texts.push(content_chars(system, "system")?);
    }
    let Some(max_tokens) = positive(&m, "max_tokens")? else {
        return Err(ApiError::bad("max_tokens", "max_tokens: field required"));
    };
    Ok(GenRequest {
        vendor: Vendor::Anthropic,
        model,
        prompt_tokens: prompt_tokens(&texts),
        max_tokens: Some(max_tokens),
        stream: flag(&m, "stream")?,
        include_usage: true,
    })
}

/// The reply text: `tokens` words.
pub fn reply_words(tokens: u64) -> Vec<&'static str> {
    WORDS.iter().copied().cycle().take(usize::try_from(tokens).unwrap_or(usize::MAX)).collect()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The non-streamed answer.
pub fn answer_json(r: &GenRequest, id: &str) -> Value {
    let (p, c) = (r.prompt_tokens, r.completion_tokens());
    let text = reply_words(c).join(" ");
    match r.vendor {
        Vendor::OpenAi => json!({
            "id": id, "object": "chat.completion", "created": now(), "model": r.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                         "logprobs": null, "finish_reason": if r.truncated() { "length" } else { "stop" }}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            "system_fingerprint": "fp_sluice_mock"
        }),
        Vendor::Anthropic => json!({
            "id": id, "type": "message", "role": "assistant", "model": r.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": if r.truncated() { "max_tokens" } else { "end_turn" }, "stop_sequence": null,
            "usage": {"input_tokens": p, "output_tokens": c}
        }),
    }
}

/// The streamed answer, one server-sent event per element.
pub fn answer_events(r: &GenRequest, id: &str) -> Vec<String> {
    let (p, c) = (r.prompt_tokens, r.completion_tokens());
    let words = reply_words(c);
    let pieces: Vec<String> = words
        .chunks(WORDS_PER_EVENT)
        .enumerate()
        .map(|(i, w)| if i == 0 { w.join(" ") } else { format!(" {}", w.join(" ")) })
        .collect();
    let data = |v: Value| format!("data: {v}\n\n");
    match r.vendor {
        Vendor::OpenAi => {
            let created = now();
            let chunk = |delta: Value, finish: Value| {
                let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": r.model,
                                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                if r.include_usage {
                    v["usage"] = Value::Null;
                }
                data(v)
            };
            let mut out = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
            out.extend(pieces.iter().map(|t| chunk(json!({"content": t}), Value::Null)));
            out.push(chunk(json!({}), json!(if r.truncated() { "length" } else { "stop" })));
            if r.include_usage {
                out.push(data(json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": r.model,
                                     "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})));
            }
            out.push("data: [DONE]\n\n".to_string());
            out
        }
        Vendor::Anthropic => {
            let event = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
            let mut out = vec![
                event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                    "id": id, "type": "message", "role": "assistant", "model": r.model, "content": [],
                    "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": p, "output_tokens": 1}}}),
                ),
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
            ];
            out.extend(pieces.iter().map(|t| {
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
                )
            }));
            out.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
            out.push(event(
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": if r.truncated() { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
                "usage": {"output_tokens": c}}),
            ));
            out.push(event("message_stop", json!({"type": "message_stop"})));
            out
        }
    }
}

/// `GET /v1/models`.
pub fn models_json() -> Value {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "sluice-mock"}))
        .collect();
    json!({"object": "list", "data": data})
}

fn json_response(status: StatusCode, v: &Value) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).map_err(|n: Infallible| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn stream_response(events: Vec<String>) -> Response<RespBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(EVENT_PAUSE).await;
            }
            if tx.send(Bytes::from(e)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// One request's answer and a one-line summary for the mock's log.
pub struct Answer {
    pub response: Response<RespBody>,
    pub summary: String,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Answers one request. `body` is read up to [`MAX_BODY`] bytes.
pub async fn answer<B>(method: &Method, path: &str, body: B) -> Answer
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let vendor = match (method.as_str(), path) {
        ("GET", "/v1/models") => {
            return Answer { response: json_response(StatusCode::OK, &models_json()), summary: "200 model list".into() }
        }
        ("POST", "/v1/chat/completions") => Vendor::OpenAi,
        ("POST", "/v1/messages") => Vendor::Anthropic,
        (_, "/v1/models" | "/v1/chat/completions" | "/v1/messages") => {
            let e = ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{method} is not allowed here"),
                param: None,
            };
            return Answer { response: json_response(e.status, &e.body(Vendor::OpenAi)), summary: "405".into() };
        }
        _ => {
            let e =
                ApiError { status: StatusCode::NOT_FOUND, message: format!("unknown endpoint {path}"), param: None };
            return Answer { response: json_response(e.status, &e.body(Vendor::OpenAi)), summary: "404".into() };
        }
    };
    let parsed = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => {
            let bytes = b.to_bytes();
            match vendor {
                Vendor::OpenAi => parse_chat(&bytes),
                Vendor::Anthropic => parse_messages(&bytes),
            }
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body exceeds {MAX_BODY} bytes"),
            param: None,
        }),
        Err(e) => Err(ApiError::bad("body", format!("cannot read the request body: {e}"))),
    };
    let r = match parsed {
        Ok(r) => r,
        Err(e) => {
            let summary = format!("{} {}", e.status.as_u16(), e.message);
            return Answer { response: json_response(e.status, &e.body(vendor)), summary };
        }
    };
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = match vendor {
        Vendor::OpenAi => format!("chatcmpl-mock{n}"),
        Vendor::Anthropic => format!("msg_mock{n}"),
    };
    let summary = format!(
        "200 model={} stream={} max_tokens={} usage: prompt {} + completion {} tokens",
        r.model,
        r.stream,
        r.max_tokens.map_or("-".to_string(), |m| m.to_string()),
        r.prompt_tokens,
        r.completion_tokens()
    );
    let response = if r.stream {
        stream_response(answer_events(&r, &id))
    } else {
        json_response(StatusCode::OK, &answer_json(&r, &id))
    };
    Answer { response, summary }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::policy::{MeterKind, UsageScanner};

    fn chat(body: &str) -> GenRequest {
        parse_chat(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    /// The daemon's own metering scanner must read back exactly the usage the mock reports, from
    /// JSON and from streams split at every event boundary.
    fn settled(kind: MeterKind, chunks: &[String]) -> (u64, u64) {
        let mut s = UsageScanner::new(kind);
        for c in chunks {
            s.feed(c.as_bytes());
        }
        let u = s.finish().expect("usage found");
        (u.input_tokens, u.output_tokens)
    }

    #[test]
    fn openai_json_usage_is_what_sluice_settles() {
        let r = chat(r#"{"model":"o1","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":100}"#);
        assert_eq!(r.prompt_tokens, 2 + 4 + 3);
        assert_eq!(r.completion_tokens(), 100);
        let v = answer_json(&r, "x");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap().split(' ').count(), 100);
        assert_eq!(settled(MeterKind::OpenAi, &[v.to_string()]), (9, 100));
    }

    #[test]
    fn openai_stream_ends_with_usage_then_done() {
        let r = chat(
            r#"{"model":"o1","messages":[{"role":"system","content":"x"},{"role":"user","content":[{"type":"text","text":"abcd"}]}],
                "max_completion_tokens":5000,"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        assert_eq!(r.completion_tokens(), REPLY_TOKENS);
        let ev = answer_events(&r, "x");
        assert_eq!(ev.last().unwrap(), "data: [DONE]\n\n");
        let usage: Value = serde_json::from_str(ev[ev.len() - 2].strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], REPLY_TOKENS);
        let text: usize = ev[1..ev.len() - 3]
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap().trim()).unwrap();
                v["choices"][0]["delta"]["content"].as_str().unwrap().split_whitespace().count()
            })
            .sum();
        assert_eq!(text as u64, REPLY_TOKENS);
        assert_eq!(settled(MeterKind::OpenAi, &ev), (r.prompt_tokens, REPLY_TOKENS));
    }

    #[test]
    fn openai_stream_without_include_usage_has_no_usage() {
        let r = chat(r#"{"model":"o1","messages":[{"role":"user","content":"hi"}],"stream":true}"#);
        let ev = answer_events(&r, "x");
        assert!(ev.iter().all(|e| !e.contains("\"usage\"")), "{ev:?}");
        let mut s = UsageScanner::new(MeterKind::OpenAi);
        ev.iter().for_each(|e| s.feed(e.as_bytes()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn anthropic_json_and_stream_usage_is_what_sluice_settles() {
        let body = r#"{"model":"claude-sonnet-4-0","system":"be short","max_tokens":40,
                       "messages":[{"role":"user","content":"hello"}]}"#;
        let r = parse_messages(body.as_bytes()).unwrap();
        assert_eq!(r.completion_tokens(), 40);
        assert_eq!(settled(MeterKind::Anthropic, &[answer_json(&r, "m").to_string()]), (r.prompt_tokens, 40));
        let streamed = GenRequest { stream: true, ..r.clone() };
        assert_eq!(settled(MeterKind::Anthropic, &answer_events(&streamed, "m")), (r.prompt_tokens, 40));
    }

    #[test]
    fn bad_requests_are_400_never_a_panic() {
        let cases: &[(&str, &str)] = &[
            ("", "body"),
            ("[1]", "body"),
            ("{\"model\":", "body"),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (r#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (r#"{"model":"o1"}"#, "messages"),
            (r#"{"model":"o1","messages":[]}"#, "messages"),
            (r#"{"model":"o1","messages":[{"content":"x"}]}"#, "messages"),
            (r#"{"model":"o1","messages":[{"role":"user","content":7}]}"#, "messages"),
            (r#"{"model":"o1","messages":[{"role":"user","content":[{"text":1}]}]}"#, "messages"),
            (r#"{"model":"o1","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, "max_tokens"),
            (r#"{"model":"o1","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"o1","messages":[{"role":"user","content":"x"}],"max_tokens":1.5}"#, "max_tokens"),
            (r#"{"model":"o1","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "stream"),
            (
                r#"{"model":"o1","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
        ];
        for (body, param) in cases {
            let e = parse_chat(body.as_bytes()).expect_err(body);
            assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, Some(*param)), "{body}: {e:?}");
        }
        let e = parse_messages(br#"{"model":"c","messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
    }

    #[tokio::test]
    async fn oversized_bodies_are_413_and_unknown_paths_404() {
        let big = Full::new(Bytes::from(vec![b' '; MAX_BODY + 1]));
        let a = answer(&Method::POST, "/v1/chat/completions", big).await;
        assert_eq!(a.response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let a = answer(&Method::GET, "/v1/files", Full::new(Bytes::new())).await;
        assert_eq!(a.response.status(), StatusCode::NOT_FOUND);
        let a = answer(&Method::GET, "/v1/chat/completions", Full::new(Bytes::new())).await;
        assert_eq!(a.response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let a = answer(&Method::GET, "/v1/models", Full::new(Bytes::new())).await;
        let body = a.response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"][0]["id"], MODELS[0]);
    }
}
