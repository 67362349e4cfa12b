//! A real HTTPS service on loopback for the proxy suites: a test CA (rcgen), one leaf for the
//! names it serves, hyper with HTTP/1.1 and HTTP/2 (ALPN), and a record of every request it
//! received, so a test can show that a refused request never arrived.
//!
//! Endpoints:
//! * `GET /hello` → `hello <host> <version>`
//! * `POST /echo` → the request body, streamed back
//! * `POST /pay` → `paid`
//! * `GET /barrier?n=N` → answers once N `/barrier` requests are in flight at once (HTTP/2
//!   concurrency without timing assertions); after [`crate::HANG_GUARD`], `504 alone`
//! * `GET /ws` with `Upgrade: websocket` → `101`, then echoes whatever comes through the tunnel
//! * `GET /sse` → `text/event-stream`: `data: 1`, then waits for `GET /ack?n=1` before `data: 2`,
//!   and for `/ack?n=2` before `data: 3`. A client only sends the ack after it *read* the previous
//!   event, so the stream completes only if every hop forwards it in pieces. (Waits end after
//!   [`crate::HANG_GUARD`] with `data: timeout`.)

use crate::HANG_GUARD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = BoxBody<Bytes, BoxError>;

/// A test certificate authority; its PEM goes into `upstream_tls.extra_roots`.
pub struct TestCa {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "sluice e2e test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes the CA certificate to `dir/test-ca.pem` and returns the path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join("test-ca.pem");
        std::fs::write(&p, &self.pem).expect("write test CA");
        p
    }

    /// A leaf for `names` (DNS names or IP literals) as PEM `(certificate, private key)`, for
    /// servers outside this process (the proxy benchmark's nginx).
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("names");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf for `names` as rustls types `(chain, key)`.
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("names");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

impl TestCa {
    /// A TLS server configuration with one leaf for `names`, offering HTTP/2 and HTTP/1.1 (ALPN).
    pub fn server_config(&self, names: &[&str]) -> rustls::ServerConfig {
        let (certs, key) = self.leaf(names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// One request the upstream received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub host: String,
    pub method: String,
    pub path: String,
    pub version: String,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    barrier: Mutex<usize>,
    barrier_tx: Mutex<Option<watch::Sender<usize>>>,
    ack_tx: Mutex<Option<watch::Sender<u32>>>,
}

/// The running upstream. Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Serves `names` (one leaf for all of them) on `addr` (port 0 picks one).
    pub fn start(rt: &tokio::runtime::Runtime, addr: SocketAddr, names: &[&str], ca: &TestCa) -> Upstream {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config(names)));
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (btx, _) = watch::channel(0usize);
        let (atx, _) = watch::channel(0u32);
        let state =
            Arc::new(State { barrier_tx: Mutex::new(Some(btx)), ack_tx: Mutex::new(Some(atx)), ..State::default() });
        let st = state.clone();
        let task = rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(route(st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many received requests had this path (query excluded).
    pub fn count(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path.split('?').next() == Some(path)).count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|n: Infallible| match n {}).boxed());
    *r.status_mut() = status;
    r
}

fn json_text(body: &'static str) -> Response<RespBody> {
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// An event stream sent one event per frame.
fn sse(events: &[&'static str]) -> Response<RespBody> {
    let (tx, rx) = mpsc::channel::<Bytes>(events.len().max(1));
    for e in events {
        let _ = tx.try_send(Bytes::from_static(e.as_bytes()));
    }
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    r
}

fn query_num(q: Option<&str>, key: &str) -> Option<u64> {
    q?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn route(st: Arc<State>, req: Request<Incoming>) -> Response<RespBody> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    st.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
        host: host.clone(),
        method: req.method().to_string(),
        path: path.clone(),
        version: version.clone(),
    });
    let query = req.uri().query().map(str::to_string);
    if req.uri().path() == "/ws" && req.headers().contains_key(http::header::UPGRADE) {
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
        r.headers_mut().insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
        r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        return r;
    }
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/hello") => text(StatusCode::OK, format!("hello {host} {version}\n")),
        ("POST", "/pay") => text(StatusCode::OK, "paid\n"),
        // Answered after `ms` milliseconds (at most 10 s): a request still in flight when
        // something else happens (the daemon stopping).
        ("GET", "/slow") => {
            let ms = query_num(query.as_deref(), "ms").unwrap_or(1000).min(10_000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            text(StatusCode::OK, format!("slow {ms}\n"))
        }
        // Recorded-shape LLM responses (usage fields as OpenAI and Anthropic send them) for
        // metered routes. Model "m"; see proxy_e2e's metered test for the prices.
        ("POST", "/llm/openai/json") => json_text(
            "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{\"index\":0,\
             \"message\":{\"role\":\"assistant\",\"content\":\"hi\"},\"finish_reason\":\"stop\"}],\
             \"usage\":{\"prompt_tokens\":500000,\"completion_tokens\":250000,\"total_tokens\":750000}}",
        ),
        ("POST", "/llm/openai/sse") => sse(&[
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1000000,\"completion_tokens\":500000,\"total_tokens\":1500000}}\n\n",
            "data: [DONE]\n\n",
        ]),
        ("POST", "/llm/anthropic/json") => json_text(
            "{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\
             \"content\":[{\"type\":\"text\",\"text\":\"hi\"}],\"stop_reason\":\"end_turn\",\
             \"usage\":{\"input_tokens\":3000000,\"output_tokens\":0}}",
        ),
        ("POST", "/llm/anthropic/sse") => sse(&[
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",\"usage\":{\"input_tokens\":1000000,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2000000}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ]),
        ("POST", "/llm/no-usage") => sse(&["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"]),
        ("POST", "/echo") => Response::new(req.into_body().map_err(|e| Box::new(e) as BoxError).boxed()),
        ("GET", "/barrier") => {
            let want = query_num(query.as_deref(), "n").unwrap_or(2) as usize;
            let Some(tx) = st.barrier_tx.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "no barrier");
            };
            let mut rx = tx.subscribe();
            {
                let mut n = st.barrier.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                tx.send_replace(*n);
            }
            let together = matches!(tokio::time::timeout(HANG_GUARD, rx.wait_for(|n| *n >= want)).await, Ok(Ok(_)));
            if together {
                text(StatusCode::OK, format!("together {want}\n"))
            } else {
                text(StatusCode::GATEWAY_TIMEOUT, "alone\n")
            }
        }
        ("GET", "/ack") => {
            let n = query_num(query.as_deref(), "n").unwrap_or(0) as u32;
            if let Some(tx) = st.ack_tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                tx.send_replace(n);
            }
            text(StatusCode::OK, "ack\n")
        }
        // An event every 20 ms until the client goes (at most HANG_GUARD): a stream that only
        // ends when something cuts it.
        ("GET", "/drip") => {
            let (body_tx, body_rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + HANG_GUARD;
                let mut n = 0u64;
                while tokio::time::Instant::now() < until {
                    n += 1;
                    if body_tx.send(Bytes::from(format!("data: {n}\n\n"))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            });
            let mut r = Response::new(ChannelBody(body_rx).boxed());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
            r
        }
        ("GET", "/sse") => {
            let Some(tx) = st.ack_tx.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "no ack channel");
            };
            let (body_tx, body_rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let mut acks = tx.subscribe();
                for n in 1u32..=3 {
                    if body_tx.send(Bytes::from(format!("data: {n}\n\n"))).await.is_err() {
                        return;
                    }
                    if n == 3 {
                        break;
                    }
                    if tokio::time::timeout(HANG_GUARD, acks.wait_for(|a| *a >= n)).await.is_err() {
                        let _ = body_tx.send(Bytes::from_static(b"data: timeout\n\n")).await;
                        return;
                    }
                }
            });
            let mut r = Response::new(ChannelBody(body_rx).boxed());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "no such endpoint\n"),
    }
}

/// A response body fed chunk by chunk from a channel.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}
