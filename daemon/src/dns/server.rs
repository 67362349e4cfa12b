//! A thin UDP + TCP front for [`Resolver`]: read a query, ask `who` which sandbox sent it, answer.
//!
//! `who` maps the client's address and the transport it used to that sandbox's allow-function (the daemon derives it from
//! the kernel's connection table and the sandbox's passport); `None` means the sender is not a
//! known sandbox and gets no answer at all. Queries never leave this process.
//!
//! TCP (RFC 7766: 2-byte length prefix, several queries per connection) is bounded: at most
//! [`MAX_TCP_CONNECTIONS`] at once (more are closed at accept, fail closed) and each closes after
//! [`TCP_IDLE`] without a complete query.

use super::resolver::{Resolver, MAX_QUERY};
use crate::domain::DomainName;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Which names a sandbox may resolve.
pub type Allow = Arc<dyn Fn(&DomainName) -> bool + Send + Sync>;

/// How a query arrived. A UDP source (address, port) and a TCP one can be equal at the same
/// time (separate port spaces), so identity lookups must know which they are looking up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp,
    Tcp,
}

pub const MAX_TCP_CONNECTIONS: usize = 256;
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// Serves until a socket fails in a way that retrying cannot fix; returns that error.
pub async fn serve<W>(udp: UdpSocket, tcp: TcpListener, resolver: Arc<Resolver>, who: W) -> std::io::Result<()>
where
    W: Fn(SocketAddr, Via) -> Option<Allow> + Send + Sync + 'static,
{
    let who = Arc::new(who);
    tokio::try_join!(serve_udp(udp, resolver.clone(), who.clone()), serve_tcp(tcp, resolver, who)).map(|_| ())
}

async fn serve_udp<W>(udp: UdpSocket, resolver: Arc<Resolver>, who: Arc<W>) -> std::io::Result<()>
where
    W: Fn(SocketAddr, Via) -> Option<Allow> + Send + Sync + 'static,
{
    // One byte more than we accept, so an oversized datagram is seen as such, not truncated.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (len, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) if transient(&e) => continue,
            Err(e) => return Err(e),
        };
        let Some(allow) = who(peer, Via::Udp) else {
            tracing::debug!(%peer, "DNS query from an unknown client dropped");
            continue;
        };
        let Some(answer) = buf.get(..len).and_then(|q| resolver.answer(q, &*allow)) else { continue };
        if let Err(e) = udp.send_to(&answer, peer).await {
            if !transient(&e) {
                return Err(e);
            }
        }
    }
}

async fn serve_tcp<W>(tcp: TcpListener, resolver: Arc<Resolver>, who: Arc<W>) -> std::io::Result<()>
where
    W: Fn(SocketAddr, Via) -> Option<Allow> + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(got) => got,
            Err(e) if transient(&e) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                // Out of descriptors: back off instead of spinning; existing connections go on.
                tracing::warn!(error = %e, "DNS over TCP: accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(allow) = who(peer, Via::Tcp) else { continue };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "DNS over TCP: too many connections; closing");
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = tcp_connection(stream, &resolver, &*allow).await {
                tracing::debug!(%peer, error = %e, "DNS over TCP connection ended");
            }
        });
    }
}

async fn tcp_connection(
    mut stream: TcpStream,
    resolver: &Resolver,
    allow: &(dyn Fn(&DomainName) -> bool + Send + Sync),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Err(_) => return Ok(()), // idle
            Ok(Err(e)) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => usize::from(r?),
        };
        let Some(query) = buf.get_mut(..len).filter(|_| len > 0) else {
            return Ok(()); // empty or larger than any query we accept: close
        };
        tokio::time::timeout(TCP_IDLE, stream.read_exact(query))
            .await
            .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "query body not received in time"))??;
        let Some(answer) = resolver.answer(query, allow) else { return Ok(()) };
        let Ok(answer_len) = u16::try_from(answer.len()) else { return Ok(()) };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&answer_len.to_be_bytes());
        out.extend_from_slice(&answer);
        stream.write_all(&out).await?;
    }
}

/// Errors that concern one packet or one peer, not the socket.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::pool::{PoolConfig, SyntheticPool};
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::net::{IpAddr, Ipv4Addr};

    fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    /// A server on 127.0.0.1 random ports that knows one sandbox: clients on 127.0.0.1 may resolve
    /// `*.allowed.test`; anyone else is unknown. Aborted when dropped.
    struct TestServer {
        udp: SocketAddr,
        tcp: SocketAddr,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start() -> TestServer {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let resolver = Arc::new(Resolver::new(Arc::new(SyntheticPool::new(&PoolConfig::default()).unwrap())));
        let allow: Allow = Arc::new(|n: &DomainName| n.as_str().ends_with(".allowed.test"));
        let who =
            move |peer: SocketAddr, _via: Via| (peer.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)).then(|| allow.clone());
        let task = tokio::spawn(serve(udp, tcp, resolver, who));
        TestServer { udp: udp_addr, tcp: tcp_addr, task }
    }

    #[tokio::test]
    async fn udp_answers_allowed_names_and_nxdomain_for_the_rest() {
        let server = start().await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server.udp).await.unwrap();
        let mut buf = [0u8; 1500];
        client.send(&query(7, "api.allowed.test.", RecordType::A)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (7, ResponseCode::NoError));
        assert!(matches!(&m.answers[0].data, RData::A(a) if a.0.octets()[..2] == [198, 18]));
        // A tunnelling-style name under a parent nobody allowed.
        client.send(&query(8, "bWFkZSB5b3UgbG9vaw.c2VjcmV0cw.exfil.evil.", RecordType::TXT)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (8, ResponseCode::NXDomain));
    }

    #[tokio::test]
    async fn udp_from_an_unknown_client_gets_no_answer() {
        let server = start().await;
        let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        stranger.send_to(&query(1, "api.allowed.test.", RecordType::A), server.udp).await.unwrap();
        // The server handles datagrams in order: once a later one from a known client is
        // answered, the stranger's was handled (and dropped).
        let known = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        known.send_to(&query(2, "api.allowed.test.", RecordType::A), server.udp).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = known.recv_from(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().metadata.id, 2);
        assert_eq!(stranger.try_recv_from(&mut buf).map_err(|e| e.kind()), Err(ErrorKind::WouldBlock));
    }

    #[tokio::test]
    async fn tcp_with_length_prefix_answers_pipelined_queries() {
        let server = start().await;
        let mut conn = TcpStream::connect(server.tcp).await.unwrap();
        let mut out = Vec::new();
        for (id, name, t) in [
            (1, "a.allowed.test.", RecordType::A),
            (2, "b.allowed.test.", RecordType::AAAA),
            (3, "nope.test.", RecordType::A),
        ] {
            let q = query(id, name, t);
            out.extend(u16::try_from(q.len()).unwrap().to_be_bytes());
            out.extend(q);
        }
        conn.write_all(&out).await.unwrap();
        let mut codes = Vec::new();
        for _ in 0..3 {
            let len = conn.read_u16().await.unwrap();
            let mut msg = vec![0u8; usize::from(len)];
            conn.read_exact(&mut msg).await.unwrap();
            let m = Message::from_vec(&msg).unwrap();
            codes.push((m.metadata.id, m.metadata.response_code, m.answers.len()));
        }
        assert_eq!(
            codes,
            vec![(1, ResponseCode::NoError, 1), (2, ResponseCode::NoError, 1), (3, ResponseCode::NXDomain, 0)]
        );
        // A length larger than any query closes the connection.
        conn.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn tcp_from_an_unknown_client_is_closed() {
        let server = start().await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut conn = socket.connect(server.tcp).await.unwrap();
        let q = query(1, "a.allowed.test.", RecordType::A);
        let mut framed = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
        framed.extend(q);
        let _ = conn.write_all(&framed).await; // may already be reset
        let mut rest = Vec::new();
        let read = conn.read_to_end(&mut rest).await;
        assert!(read.is_err() || rest.is_empty(), "no answer for an unknown client");
    }
}
