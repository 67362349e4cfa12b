//! One redirected connection: who sent it, where it was going, and what it speaks.
//!
//! Order matters and every step fails closed:
//! 1. The kernel's connection table entry, taken once, atomically, by the accept loop (none
//!    means the connection did not come through the redirect, and it was closed there).
//! 2. A destination that is the proxy or resolver itself is a loop: refused.
//! 3. The sandbox's passport, by the connection's cgroup: none means closed.
//! 4. A synthetic destination is mapped back to the name the agent resolved; a synthetic
//!    address that maps to no name (stale, guessed) is refused.
//! 5. The first bytes decide TLS / HTTP / other ([`super::sniff`]).

use super::answer::ConnInfo;
use super::checks::Refusal;
use super::prefixed::Prefixed;
use super::sniff::{sniff, Sniff, MAX_SNIFF};
use super::{http, inc, raw, Proxy, Slot};
use crate::decide::Reason;
use crate::dns::pool::canonical;
use crate::kernel::OrigDst;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Serves one admitted connection; `slot` (its places in the budgets) is held until the
/// connection and any tunnel made from it have ended.
pub(super) async fn handle(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr, orig: OrigDst, slot: Option<Slot>) {
    let Some(passport) = (proxy.passports)(orig.cgroup_id) else {
        inc(&proxy.stats.no_passport);
        tracing::warn!(%peer, cgroup_id = orig.cgroup_id, pid = orig.pid, "connection from a cgroup with no passport; closing");
        return;
    };
    // Emergency stop: the whole connection (TLS, HTTP/1 or 2, a raw splice) is dropped the moment
    // a stop covers its passport, which closes the agent's socket and cuts a response mid-stream.
    let passport_id = passport.id().to_string();
    if proxy.stops.borrow().covers(&passport_id) {
        inc(&proxy.stats.stopped);
        tracing::info!(%peer, %passport_id, "connection of a stopped passport; closing");
        return;
    }
    let stopped = super::until_stopped(proxy.stops.clone(), passport_id.clone());
    let stats = proxy.clone();
    tokio::select! {
        () = serve(proxy, stream, peer, orig, passport, slot) => {}
        () = stopped => {
            inc(&stats.stats.stopped);
            tracing::warn!(%peer, %passport_id, "emergency stop: connection closed");
        }
    }
}

async fn serve(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    orig: OrigDst,
    passport: Arc<crate::decide::CompiledPassport>,
    slot: Option<Slot>,
) {
    let dialed = SocketAddr::new(canonical(orig.dst.ip()), orig.dst.port());
    let mut info = ConnInfo {
        passport_id: passport.id().to_string(),
        client: peer,
        dialed,
        pid: orig.pid,
        cgroup_id: orig.cgroup_id,
        dialed_name: None,
        sni: None,
        tls: false,
        slot,
    };
    if let Some(refusal) = loop_refusal(&proxy, &orig, dialed) {
        raw::refuse(&proxy, &info, refusal).await;
        return;
    }
    if proxy.pool.contains(dialed.ip()) {
        match proxy.pool.lookup_addr(dialed.ip()) {
            Some(name) => info.dialed_name = Some(name),
            None => {
                let detail = format!(
                    "{} is a synthetic address that belongs to no name now; resolve the name again.",
                    dialed.ip()
                );
                raw::refuse(&proxy, &info, Refusal { reason: Reason::UnknownSyntheticAddress, detail }).await;
                return;
            }
        }
    }
    let _ = stream.set_nodelay(true);
    let (prefix, kind) = match read_head(&proxy, &mut stream).await {
        Some(got) => got,
        None => {
            tracing::info!(client = %peer, %dialed, pid = orig.pid, "agent connection closed before sending anything");
            return;
        }
    };
    let stream = Prefixed::new(prefix, stream);
    // The stages after the sniff are boxed: a task's allocation is its largest state, and
    // hyper's and rustls's are large, so without the box every connection still waiting for
    // its first bytes would pay for them. Measured with 10,000 silent connections (debug
    // build): daemon RSS 241 MiB with an 8 KiB read buffer held and no box, 172 MiB without the
    // buffer ([`read_head_within`]), 118 MiB with the box as well.
    match kind {
        Sniff::Tls(hello) => match hello.server_name() {
            Ok(Some(sni)) => {
                info.sni = Some(sni);
                info.tls = true;
                Box::pin(tls(proxy, info, stream)).await;
            }
            Ok(None) => {
                let detail = "The TLS ClientHello names no server (no SNI); connect by host name.".to_string();
                raw::refuse(&proxy, &info, Refusal { reason: Reason::BadServerName, detail }).await;
            }
            Err(e) => {
                let detail = format!("TLS server name refused: {e}");
                raw::refuse(&proxy, &info, Refusal { reason: Reason::BadServerName, detail }).await;
            }
        },
        Sniff::Http(_) => Box::pin(http::serve(proxy, Arc::new(info), stream, false)).await,
        Sniff::Other | Sniff::NeedMore => Box::pin(raw::handle(proxy, info, stream)).await,
    }
}

/// An agent dialing the proxy's or resolver's own port directly would make the proxy talk to
/// itself.
fn loop_refusal(proxy: &Proxy, orig: &OrigDst, dialed: SocketAddr) -> Option<Refusal> {
    let own = dialed.ip().is_loopback() || dialed.ip().is_unspecified();
    (own && proxy.own_ports.contains(&dialed.port())).then(|| Refusal {
        reason: Reason::ProxyLoop,
        detail: format!("{} (pid {}) dialed the proxy's own address {dialed}.", orig.dst, orig.pid),
    })
}

/// Reads until [`sniff`] decides, at most [`MAX_SNIFF`] bytes and
/// [`super::Limits::sniff_timeout`]. A client that says nothing in time (a server-speaks-first
/// protocol) is `Other`. `None`: closed without a byte.
async fn read_head(proxy: &Proxy, stream: &mut TcpStream) -> Option<(Vec<u8>, Sniff)> {
    read_head_within(stream, proxy.limits.sniff_timeout).await
}

/// [`read_head`] with its timeout. It waits for readability holding no buffer, and reads through
/// a buffer that lives only between two waits: a connection that stays silent (10,000 of them
/// from one flooding agent) costs no read buffer while it waits.
async fn read_head_within(stream: &mut TcpStream, timeout: std::time::Duration) -> Option<(Vec<u8>, Sniff)> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    // A client's first bytes (a ClientHello) are usually in the socket by the time it is
    // accepted, but tokio knows a new socket as not yet readable until the reactor says so: one
    // non-blocking read straight from the socket saves that round (an `epoll_wait` and a task
    // wake) for almost every connection. The buffer lives only for this read, in a block of its
    // own: a local still in scope at an `.await` below would be stored in the connection's future
    // for the connection's whole life (8 KiB more per idle connection).
    {
        let mut chunk = [0u8; 8192];
        match nix::sys::socket::recv(stream.as_raw_fd(), &mut chunk, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    loop {
        if !buf.is_empty() {
            match sniff(&buf) {
                Sniff::NeedMore => {}
                verdict => return Some((buf, verdict)),
            }
        }
        let closed = |buf: Vec<u8>| if buf.is_empty() { None } else { Some((buf, Sniff::Other)) };
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return Some((buf, Sniff::Other)),
            Ok(Err(_)) => return closed(buf),
            Ok(Ok(())) => {}
        }
        let mut chunk = [0u8; 8192];
        let room = MAX_SNIFF.saturating_sub(buf.len()).clamp(1, chunk.len());
        match stream.try_read(chunk.get_mut(..room).unwrap_or_default()) {
            Ok(0) => return closed(buf),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return closed(buf),
        }
    }
}

async fn tls(proxy: Arc<Proxy>, info: ConnInfo, stream: Prefixed<TcpStream>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(proxy.tls.clone());
    let accepted = tokio::time::timeout(proxy.limits.handshake_timeout, acceptor.accept(stream)).await;
    let tls = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(client = %info.client, sni = ?info.sni, error = %e, "TLS handshake with the agent failed");
            return;
        }
        Err(_) => {
            tracing::info!(client = %info.client, sni = ?info.sni, "TLS handshake with the agent timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    http::serve(proxy, Arc::new(info), tls, h2).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Decision, HostVerdict};
    use crate::domain::DomainName;
    use crate::proxy::decider::fake::{outcome, FakeDecide};
    use crate::proxy::testing::{agent_pair, harness, raw_rule, read_to_close, upstream, Harness, CGROUP, OWN_PORTS};
    use crate::service::EnforceInput;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// One agent connection through [`handle`]: the kernel's table says it was going to `dst`
    /// from cgroup `cgroup_id` (`None`: no entry at all); the agent sends `HELLO` (not TLS, not
    /// HTTP) and stops sending. Returns what the agent read until the proxy closed it.
    async fn connection(h: &Harness, dst: SocketAddr, cgroup_id: Option<u64>) -> Vec<u8> {
        let (mut agent, accepted) = agent_pair().await;
        let client = agent.local_addr().expect("addr");
        let h_proxy = h.proxy.clone();
        if let Some(cgroup_id) = cgroup_id {
            h.redirects.redirect(client, dst, cgroup_id);
        }
        // What the accept loop does: take the entry and the budgets, or close.
        let task =
            match h.proxy.take(client) {
                Some((orig, admitted)) => tokio::spawn(async move {
                    handle(h_proxy, accepted, client, orig, Some(Slot(Arc::new(admitted)))).await
                }),
                None => {
                    drop(accepted);
                    tokio::spawn(async {})
                }
            };
        let _ = agent.write_all(b"HELLO").await;
        let _ = agent.shutdown().await;
        let read = read_to_close(&mut agent).await;
        task.await.expect("handle");
        read
    }

    fn enforced(h: &Harness) -> Vec<(EnforceInput, HostVerdict)> {
        h.decide.enforced.lock().unwrap().clone()
    }

    fn denied_for(verdict: &HostVerdict) -> Option<Reason> {
        match verdict {
            HostVerdict::Deny { reason, .. } => Some(reason.clone()),
            HostVerdict::Allow => None,
        }
    }

    /// The whole path without the kernel: table entry → sandbox's passport → synthetic address
    /// → the name → sniffed as neither TLS nor HTTP → the raw rule → decided → spliced to the
    /// daemon's own resolution of the name (never to the address the agent dialed).
    #[tokio::test]
    async fn a_redirected_raw_connection_to_an_allowed_name_reaches_its_upstream() {
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 3)));
        let h = harness(fake, &raw_rule(port), &[("db.example.test", LOCAL)]);
        let name = DomainName::parse("db.example.test").expect("name");
        let (synthetic, _) = h.pool.addresses(&name).expect("synthetic address");
        let read = connection(&h, SocketAddr::new(IpAddr::V4(synthetic), port), Some(CGROUP)).await;
        assert_eq!(read, b"PONG");
        assert_eq!(*up.seen.lock().unwrap(), vec![b"HELLO".to_vec()]);
        let calls = enforced(&h);
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            (calls[0].0.action.as_str(), calls[0].0.target.as_deref(), calls[0].1.clone()),
            ("tcp:postgres", Some("db.example.test"), HostVerdict::Allow)
        );
        let s = h.proxy.stats();
        assert_eq!((s.raw_connections, s.forwarded, s.unknown, s.no_passport), (1, 1, 0, 0));
    }

    /// The harness's passport stopped (or `other`, someone else's) in the proxy's stop set.
    fn stop(h: &Harness, passport_id: &str) {
        let mut set = crate::service::StopSet::default();
        let entry = crate::service::StopEntry {
            at: "2026-12-02T00:00:00Z".into(),
            by: crate::service::Actor::Daemon("test".into()),
            note: None,
            attestation_id: 1,
        };
        set.passports.insert(passport_id.to_string(), entry);
        h.stops.send_replace(Arc::new(set));
    }

    /// An emergency stop closes an open, spliced connection of the stopped passport within
    /// 100 ms, while another passport's stop leaves it alone; a new connection of the stopped
    /// passport is closed before anything is read or decided.
    #[tokio::test]
    async fn an_emergency_stop_closes_the_passports_open_connections_at_once() {
        use tokio::io::AsyncReadExt;
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 3)));
        let h = harness(fake, &raw_rule(port), &[("db.example.test", LOCAL)]);
        let ours = (h.proxy.passports)(CGROUP).expect("the harness's passport").id().to_string();
        let name = DomainName::parse("db.example.test").expect("name");
        let (synthetic, _) = h.pool.addresses(&name).expect("synthetic address");
        let dst = SocketAddr::new(IpAddr::V4(synthetic), port);

        let (mut agent, accepted) = agent_pair().await;
        let client = agent.local_addr().expect("addr");
        h.redirects.redirect(client, dst, CGROUP);
        let (orig, admitted) = h.proxy.take(client).expect("admitted");
        let task = tokio::spawn({
            let proxy = h.proxy.clone();
            async move { handle(proxy, accepted, client, orig, Some(Slot(Arc::new(admitted)))).await }
        });
        agent.write_all(b"HELLO").await.expect("write");
        let mut pong = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), agent.read_exact(&mut pong))
            .await
            .expect("spliced")
            .expect("read");
        assert_eq!(&pong, b"PONG");

        // Someone else's stop: the connection stays open.
        stop(&h, "pp_AAAAAAAAAAAAAAAAAAAAAA");
        let mut byte = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), agent.read(&mut byte)).await.is_err(),
            "another passport's stop closed this connection"
        );

        // Ours: closed within 100 ms.
        let at = std::time::Instant::now();
        stop(&h, &ours);
        let n = tokio::time::timeout(Duration::from_millis(100), agent.read(&mut byte))
            .await
            .expect("closed within 100 ms of the stop")
            .unwrap_or(0);
        assert_eq!(n, 0, "the stopped connection delivered more bytes");
        tokio::time::timeout(Duration::from_secs(1), task).await.expect("handle ends").expect("handle");
        assert!(at.elapsed() < Duration::from_millis(100), "{:?}", at.elapsed());
        assert_eq!(h.proxy.stats().stopped, 1);

        // A new connection of the stopped passport: closed, nothing decided or forwarded.
        let before = enforced(&h).len();
        let read = connection(&h, dst, Some(CGROUP)).await;
        assert!(read.is_empty(), "{read:?}");
        assert_eq!(enforced(&h).len(), before, "a stopped passport's connection was decided");
        assert_eq!(h.proxy.stats().stopped, 2);
        assert_eq!(up.seen.lock().unwrap().len(), 1, "the stopped connection reached the upstream");
    }

    /// A connection the kernel did not redirect, or one from a cgroup that is no sandbox, is
    /// closed before a byte is read or anything is decided.
    #[tokio::test]
    async fn connections_without_a_table_entry_or_a_passport_are_closed_undecided() {
        let up = upstream().await;
        let h = harness(FakeDecide::default(), &raw_rule(up.addr.port()), &[("db.example.test", LOCAL)]);
        let read = connection(&h, up.addr, None).await;
        assert!(read.is_empty());
        let read = connection(&h, up.addr, Some(CGROUP + 1)).await;
        assert!(read.is_empty());
        assert!(enforced(&h).is_empty());
        assert!(up.seen.lock().unwrap().is_empty());
        let s = h.proxy.stats();
        assert_eq!((s.unknown, s.no_passport, s.forwarded), (1, 1, 0));
        // Each entry is taken once: a second connection from the same peer finds none.
        assert!(h.redirects.0.lock().unwrap().is_empty());
    }

    /// Refusals of the whole connection are decisions on the passport's chain (a host denial
    /// with the refusal's reason), and nothing is dialed: a dial of the proxy's own port, a
    /// synthetic address that belongs to no name, and a bare IP (no name, so no rule matches,
    /// even though something listens there).
    #[tokio::test]
    async fn loops_stale_synthetic_addresses_and_bare_ips_are_refused_on_the_record() {
        let up = upstream().await;
        let port = up.addr.port();
        let fake = FakeDecide::default();
        for reason in [Reason::ProxyLoop, Reason::UnknownSyntheticAddress, Reason::RawTcpDenied] {
            fake.enforce.lock().unwrap().push_back(Ok(outcome(Decision::Block, reason, 1)));
        }
        let h = harness(fake, &raw_rule(port), &[("db.example.test", LOCAL)]);
        let unallocated = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1));
        assert!(h.pool.contains(unallocated) && h.pool.lookup_addr(unallocated).is_none());
        for dst in [SocketAddr::new(LOCAL, OWN_PORTS[0]), SocketAddr::new(unallocated, port), up.addr] {
            let read = connection(&h, dst, Some(CGROUP)).await;
            assert!(read.is_empty(), "{dst}: {read:?}");
        }
        let calls = enforced(&h);
        let reasons: Vec<Option<Reason>> = calls.iter().map(|(_, v)| denied_for(v)).collect();
        assert_eq!(
            reasons,
            vec![Some(Reason::ProxyLoop), Some(Reason::UnknownSyntheticAddress), Some(Reason::RawTcpDenied)]
        );
        for (input, _) in &calls {
            assert_eq!((input.action.as_str(), input.target.as_deref()), (raw::RAW_ACTION, None), "{input:?}");
        }
        assert!(up.seen.lock().unwrap().is_empty(), "nothing reaches the listener the agent dialed");
        assert_eq!(h.proxy.stats().forwarded, 0);
    }

    /// The daemon stopping ([`Proxy::serve`] told to stop): the listener closes at once, so new
    /// connections are refused, and `serve` returns only when the connections in flight have
    /// ended, or when the drain runs out with one still open (then the caller's runtime cuts it).
    #[tokio::test]
    async fn serve_stops_accepting_then_waits_for_the_connections_in_flight_up_to_the_drain() {
        use tokio::io::AsyncReadExt;
        let drain = Duration::from_millis(1500);
        for agent_closes in [true, false] {
            // The canary upstream answers PONG and holds the tunnel open for 2 s (longer than the
            // drain), unless the agent closes its end first.
            let up = upstream().await;
            let port = up.addr.port();
            let fake = FakeDecide::answering(Ok(outcome(Decision::Allow, Reason::Allowed, 3)));
            let limits = crate::proxy::Limits { drain, ..crate::proxy::Limits::default() };
            let h = crate::proxy::testing::harness_with_limits(
                fake,
                &raw_rule(port),
                &[("db.example.test", LOCAL)],
                limits,
            );
            let name = DomainName::parse("db.example.test").expect("name");
            let (synthetic, _) = h.pool.addresses(&name).expect("synthetic address");
            let listener = tokio::net::TcpListener::bind((LOCAL, 0)).await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let serving = tokio::spawn(h.proxy.clone().serve(vec![listener], stop_rx));

            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind((LOCAL, 0).into()).expect("bind");
            h.redirects.redirect(
                socket.local_addr().expect("addr"),
                SocketAddr::new(IpAddr::V4(synthetic), port),
                CGROUP,
            );
            let mut agent = socket.connect(addr).await.expect("connect");
            agent.write_all(b"HELLO").await.expect("send");
            let mut pong = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), agent.read_exact(&mut pong))
                .await
                .expect("pong")
                .expect("read");
            assert_eq!(&pong, b"PONG");
            assert_eq!(h.proxy.open_connections(), 1);

            let stopped = std::time::Instant::now();
            stop_tx.send(true).expect("stop");
            // Refused once the listener is closed (at once, give or take a scheduling round).
            let mut refused = false;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(refused, "agent_closes={agent_closes}: still accepting after the stop");
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(!serving.is_finished(), "agent_closes={agent_closes}: serve returned with a tunnel open");
            if agent_closes {
                agent.shutdown().await.expect("close");
                let _ = read_to_close(&mut agent).await;
                tokio::time::timeout(Duration::from_secs(5), serving).await.expect("serve returns").expect("serve");
                let took = stopped.elapsed();
                assert!(took < drain, "waited for the drain to run out with nothing open: {took:?}");
                assert_eq!(h.proxy.open_connections(), 0);
            } else {
                tokio::time::timeout(Duration::from_secs(5), serving).await.expect("serve returns").expect("serve");
                let took = stopped.elapsed();
                assert!(took >= drain, "returned before the drain ran out: {took:?}");
                assert_eq!(h.proxy.open_connections(), 1, "the tunnel is left for the runtime to cut");
            }
        }
    }

    /// The sniff stage's reading: no buffer held while waiting, bounded in bytes and time.
    mod read_head {
        use super::super::*;
        use std::time::Duration;
        use tokio::io::AsyncWriteExt;
        use tokio::net::TcpListener;

        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (server, _) = l.accept().await.unwrap();
            (client, server)
        }

        #[tokio::test]
        async fn a_request_head_sent_in_pieces_is_sniffed_whole() {
            let (mut client, mut server) = pair().await;
            let head = tokio::spawn(async move { read_head_within(&mut server, Duration::from_secs(10)).await });
            for piece in [&b"GE"[..], b"T / HT", b"TP/1.1\r\nHost: a\r\n\r\n"] {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let (bytes, verdict) = head.await.unwrap().expect("bytes");
            assert!(matches!(verdict, Sniff::Http(_)), "{verdict:?}");
            assert!(bytes.starts_with(b"GET / HTTP/1.1"), "{bytes:?}");
        }

        /// Bytes already in the socket when it is accepted are read at once, without waiting
        /// for the reactor: even with no time left at all, the head is sniffed.
        #[tokio::test]
        async fn bytes_already_waiting_are_sniffed_without_a_wait() {
            let (mut client, mut server) = pair().await;
            client.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (bytes, verdict) = read_head_within(&mut server, Duration::ZERO).await.expect("bytes");
            assert!(matches!(verdict, Sniff::Http(_)), "{verdict:?}");
            assert!(bytes.starts_with(b"GET / HTTP/1.1"), "{bytes:?}");
        }

        #[tokio::test]
        async fn silence_is_other_after_the_timeout_and_a_close_without_bytes_is_none() {
            let (_client, mut server) = pair().await;
            let (bytes, verdict) = read_head_within(&mut server, Duration::from_millis(100)).await.expect("timed out");
            assert!(bytes.is_empty() && matches!(verdict, Sniff::Other), "{verdict:?}");

            let (client, mut server) = pair().await;
            drop(client);
            assert!(read_head_within(&mut server, Duration::from_secs(10)).await.is_none());
        }

        #[tokio::test]
        async fn bytes_then_a_close_are_other_and_reading_stops_at_the_sniff_limit() {
            let (mut client, mut server) = pair().await;
            client.write_all(b"\x00\x01binary").await.unwrap();
            drop(client);
            let (bytes, verdict) = read_head_within(&mut server, Duration::from_secs(10)).await.expect("bytes");
            assert_eq!(bytes, b"\x00\x01binary");
            assert!(matches!(verdict, Sniff::Other), "{verdict:?}");

            // An endless request line is cut at MAX_SNIFF.
            let (mut client, mut server) = pair().await;
            let writer = tokio::spawn(async move {
                let junk = vec![b'a'; 4096];
                if client.write_all(b"GET /").await.is_ok() {
                    while client.write_all(&junk).await.is_ok() {}
                }
            });
            let (bytes, _) = read_head_within(&mut server, Duration::from_secs(10)).await.expect("bytes");
            assert!(bytes.len() <= MAX_SNIFF, "{}", bytes.len());
            drop(server);
            writer.abort();
        }
    }
}
