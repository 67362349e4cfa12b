//! Stand-ins for the proxy and the resolver, for the kernel test suites: they
//! prove where redirected traffic lands without speaking HTTP. (Test code: it
//! lives here, not in the shipped sluice-kernel crate.)
//!
//! * [`Probe`] accepts on `127.0.0.1:port` and `[::1]:port`, looks every
//!   accepted connection up in the [`Conntable`], reports it and closes it.
//!   Connections without an entry are counted and closed, as the real proxy
//!   must do.
//! * [`ResolverStub`] answers every DNS query (UDP and TCP, both loopbacks)
//!   with `REFUSED` and reports it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use sluice::kernel::conntable::{Conntable, OrigDst, Transport};

/// Back-off after a failed `accept` (e.g. EMFILE), so a flood cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Idle limit for a DNS-over-TCP client.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Listen backlog of the stand-ins, as the daemon's proxy uses ([`sluice::proxy::LISTEN_BACKLOG`]):
/// a burst of connects that overflows the accept queue is answered with SYN cookies, and such a
/// connection only reaches `accept` once the client sends a packet.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(sluice::proxy::LISTEN_BACKLOG)
}

fn loopbacks(port: u16) -> [SocketAddr; 2] {
    [SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port), SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)]
}

/// One connection accepted by the [`Probe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEvent {
    /// The probe address that accepted it.
    pub listener: SocketAddr,
    /// The agent's end (its local address and port).
    pub client: SocketAddr,
    /// The connection-table entry; `None` means unknown (closed, counted).
    pub orig: Option<OrigDst>,
}

/// The proxy stand-in. Stops when dropped or [`Probe::shutdown`].
#[derive(Debug)]
pub struct Probe {
    tasks: Vec<JoinHandle<()>>,
    unknown: Arc<AtomicU64>,
}

impl Probe {
    /// Binds both loopbacks on `port` and starts accepting (inside a tokio
    /// runtime).
    pub async fn start(port: u16, conntable: Arc<Conntable>, events: UnboundedSender<ProbeEvent>) -> io::Result<Self> {
        let unknown = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for addr in loopbacks(port) {
            let listener = listen(addr)?;
            let conntable = Arc::clone(&conntable);
            let events = events.clone();
            let unknown = Arc::clone(&unknown);
            tasks.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, client)) => {
                            let orig = conntable.lookup_proxy(client);
                            if orig.is_none() {
                                unknown.fetch_add(1, Ordering::Relaxed);
                            }
                            drop(stream);
                            let _ = events.send(ProbeEvent { listener: addr, client, orig });
                        }
                        Err(error) => {
                            tracing::warn!(%addr, %error, "probe accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    }
                }
            }));
        }
        Ok(Self { tasks, unknown })
    }

    /// Connections closed because the table had no entry for them.
    pub fn unknown(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    /// Stops accepting and waits until the listening sockets are closed.
    pub async fn shutdown(mut self) {
        stop(&mut self.tasks).await;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn stop(tasks: &mut Vec<JoinHandle<()>>) {
    for t in tasks.iter() {
        t.abort();
    }
    for t in tasks.drain(..) {
        let _ = t.await;
    }
}

/// One query seen by the [`ResolverStub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsQuery {
    pub transport: Transport,
    /// The agent's socket address as the stub sees it.
    pub client: SocketAddr,
    /// The query id.
    pub id: u16,
    /// For TCP: the connection-table entry (what the agent dialed). For UDP: the sending
    /// socket's record from the UDP source table.
    pub orig: Option<OrigDst>,
}

/// The resolver stand-in: answers `REFUSED` to everything.
#[derive(Debug)]
pub struct ResolverStub {
    tasks: Vec<JoinHandle<()>>,
}

impl ResolverStub {
    /// Binds UDP and TCP on both loopbacks on `port` (inside a tokio runtime).
    pub async fn start(port: u16, conntable: Arc<Conntable>, events: UnboundedSender<DnsQuery>) -> io::Result<Self> {
        let mut tasks = Vec::new();
        for addr in loopbacks(port) {
            let udp = UdpSocket::bind(addr).await?;
            let ev = events.clone();
            let sources = Arc::clone(&conntable);
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let (n, client) = match udp.recv_from(&mut buf).await {
                        Ok(r) => r,
                        Err(error) => {
                            tracing::warn!(%addr, %error, "resolver stub recv failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    let query = buf.get(..n).unwrap_or_default();
                    if let Some(reply) = refused_reply(query) {
                        let _ = udp.send_to(&reply, client).await;
                        let _ = ev.send(DnsQuery {
                            transport: Transport::Udp,
                            client,
                            id: u16::from_be_bytes([reply[0], reply[1]]),
                            orig: sources.udp_source(client),
                        });
                    }
                }
            }));

            let tcp = listen(addr)?;
            let ev = events.clone();
            let conntable = Arc::clone(&conntable);
            tasks.push(tokio::spawn(async move {
                loop {
                    match tcp.accept().await {
                        Ok((stream, client)) => {
                            let orig = conntable.lookup_resolver(client);
                            let ev = ev.clone();
                            tokio::spawn(async move {
                                let _ = serve_tcp(stream, client, orig, ev).await;
                            });
                        }
                        Err(error) => {
                            tracing::warn!(%addr, %error, "resolver stub accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    }
                }
            }));
        }
        Ok(Self { tasks })
    }

    /// Stops and waits until the sockets are closed.
    pub async fn shutdown(mut self) {
        stop(&mut self.tasks).await;
    }
}

impl Drop for ResolverStub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// DNS over TCP: 2-byte length prefix per message (RFC 1035 4.2.2).
async fn serve_tcp(
    mut stream: TcpStream,
    client: SocketAddr,
    orig: Option<OrigDst>,
    events: UnboundedSender<DnsQuery>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        let msg = buf.get_mut(..len).ok_or_else(|| io::Error::other("length"))?;
        tokio::time::timeout(TCP_IDLE, stream.read_exact(msg))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let Some(reply) = refused_reply(msg) else {
            return Ok(());
        };
        let rlen = u16::try_from(reply.len()).map_err(|_| io::Error::other("reply too long"))?;
        stream.write_all(&rlen.to_be_bytes()).await?;
        stream.write_all(&reply).await?;
        let _ = events.send(DnsQuery {
            transport: Transport::Tcp,
            client,
            id: u16::from_be_bytes([reply[0], reply[1]]),
            orig,
        });
    }
}

/// RCODE 5.
const RCODE_REFUSED: u8 = 5;

/// A `REFUSED` answer to `query`: same id, opcode and RD bit, the question
/// echoed when it is a single well-formed uncompressed question. `None` for
/// anything that is not a DNS query (too short, or already a response).
pub fn refused_reply(query: &[u8]) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let flags1 = header[2];
    if flags1 & 0x80 != 0 {
        return None; // a response: never answer those (no reflection loops)
    }
    let opcode_rd = flags1 & 0x79; // opcode (bits 3-6) and RD (bit 0)
    let qdcount = u16::from_be_bytes([header[4], header[5]]);
    let question = if qdcount == 1 { question_end(query).and_then(|end| query.get(12..end)) } else { None };
    let mut reply = Vec::with_capacity(12 + question.map_or(0, <[u8]>::len));
    reply.extend_from_slice(&header[..2]);
    reply.push(0x80 | opcode_rd);
    reply.push(RCODE_REFUSED);
    reply.extend_from_slice(&[0, u8::from(question.is_some()), 0, 0, 0, 0, 0, 0]);
    if let Some(q) = question {
        reply.extend_from_slice(q);
    }
    Some(reply)
}

/// End offset of the first question (QNAME + QTYPE + QCLASS), if it is
/// uncompressed, at most 255 bytes long and complete.
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut pos = 12usize;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 {
            return None; // compression pointer or reserved label type
        }
        pos += 1 + len;
        if pos - 12 > 255 {
            return None;
        }
    }
    let end = pos + 4;
    (end <= msg.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn refuses_with_same_id_and_question() {
        let q = query(0xbeef, "api.example.test");
        let r = refused_reply(&q).unwrap();
        assert_eq!(&r[..2], &[0xbe, 0xef]);
        assert_eq!(r[2], 0x81, "QR and RD");
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED);
        assert_eq!(&r[4..6], &[0, 1]);
        assert_eq!(&r[12..], &q[12..]);
    }

    #[test]
    fn never_answers_responses_or_garbage() {
        let mut q = query(1, "a.b");
        q[2] |= 0x80;
        assert_eq!(refused_reply(&q), None);
        assert_eq!(refused_reply(&[0u8; 11]), None);
    }

    #[test]
    fn drops_malformed_questions_but_still_refuses() {
        // Compression pointer in the question.
        let mut q = query(2, "a.b");
        q.truncate(12);
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        let r = refused_reply(&q).unwrap();
        assert_eq!(r.len(), 12);
        assert_eq!(&r[4..6], &[0, 0]);
        // Truncated question.
        let mut q = query(3, "abc.def");
        q.truncate(q.len() - 2);
        assert_eq!(refused_reply(&q).unwrap().len(), 12);
        // Name longer than 255 bytes.
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(refused_reply(&query(4, &long)).unwrap().len(), 12);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Some(r) = refused_reply(&bytes) {
                proptest::prop_assert!(r.len() >= 12);
                proptest::prop_assert_eq!(&r[..2], &bytes[..2]);
            }
        }
    }
}
