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
use super::{http, inc, raw, Proxy};
use crate::decide::Reason;
use crate::dns::pool::canonical;
use crate::kernel::OrigDst;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub(super) async fn handle(proxy: Arc<Proxy>, mut stream: TcpStream, peer: SocketAddr, orig: OrigDst) {
    let Some(passport) = (proxy.passports)(orig.cgroup_id) else {
        inc(&proxy.stats.no_passport);
        tracing::warn!(%peer, cgroup_id = orig.cgroup_id, pid = orig.pid, "connection from a cgroup with no passport; closing");
        return;
    };
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
    match kind {
        Sniff::Tls(hello) => match hello.server_name() {
            Ok(Some(sni)) => {
                info.sni = Some(sni);
                info.tls = true;
                tls(proxy, info, stream).await;
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
        Sniff::Http(_) => http::serve(proxy, Arc::new(info), stream, false).await,
        Sniff::Other | Sniff::NeedMore => raw::handle(proxy, info, stream).await,
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
    let mut buf = Vec::with_capacity(2048);
    let deadline = tokio::time::Instant::now() + proxy.limits.sniff_timeout;
    loop {
        if !buf.is_empty() {
            match sniff(&buf) {
                Sniff::NeedMore => {}
                verdict => return Some((buf, verdict)),
            }
        }
        let room = MAX_SNIFF.saturating_sub(buf.len()).max(1);
        let mut chunk = vec![0u8; room.min(8192)];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Some((buf, Sniff::Other)),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return if buf.is_empty() { None } else { Some((buf, Sniff::Other)) };
            }
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
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
