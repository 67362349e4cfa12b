//! The daemon's own resolution of the real addresses it dials on an agent's behalf.
//!
//! Order: `[dns] static_hosts` first (the operator's word, returned as configured), then each
//! `[dns] upstream` entry in turn until one gives a usable address: `"system"` is the host's
//! resolver (`getaddrinfo` through `tokio::net::lookup_host`, so `/etc/hosts` and nsswitch apply),
//! `"ip:port"` is a DNS server asked directly over UDP (TCP when the answer is truncated).
//!
//! Answers from upstream are filtered: loopback, unspecified, link-local, multicast, broadcast
//! and synthetic-pool addresses are dropped, so a public name that resolves to `127.0.0.1` (DNS
//! rebinding) cannot steer the proxy into the host's own services or back into itself. Private
//! ranges (10/8, 192.168/16, fc00::/7 ...) are kept: internal services are a legitimate target,
//! and whether an agent may reach them is policy's call, on the name.
//!
//! Results are cached per name, bounded to [`CACHE_ENTRIES`], for the answer's TTL clamped to
//! [`MIN_CACHE`]..=[`MAX_CACHE`] (the system resolver gives no TTL: [`SYSTEM_CACHE`]).

use super::pool::{canonical, SyntheticPool};
use crate::config::{DnsConfig, DnsUpstream};
use crate::domain::DomainName;
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub const CACHE_ENTRIES: usize = 4096;
pub const MIN_CACHE: Duration = Duration::from_secs(5);
pub const MAX_CACHE: Duration = Duration::from_secs(300);
pub const SYSTEM_CACHE: Duration = Duration::from_secs(30);
/// Per upstream, for one name (A and AAAA asked together).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Most CNAMEs followed inside one answer.
const MAX_CNAME_CHAIN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("dns.static_hosts: {name:?}: {reason}")]
    StaticHost { name: String, reason: String },
    #[error("{name}: no usable address (every answer was empty, loopback, link-local, multicast or synthetic)")]
    NoAddress { name: String },
    #[error("{name}: lookup through {upstream} failed: {reason}")]
    Lookup { name: String, upstream: String, reason: String },
}

#[derive(Debug)]
pub struct UpstreamResolver {
    static_hosts: HashMap<DomainName, IpAddr>,
    upstreams: Vec<DnsUpstream>,
    pool: Option<Arc<SyntheticPool>>,
    cache: Mutex<HashMap<DomainName, (Vec<IpAddr>, Instant)>>,
}

impl UpstreamResolver {
    /// From the `[dns]` section. Addresses inside `pool` are never returned from upstream.
    pub fn from_config(dns: &DnsConfig, pool: Option<Arc<SyntheticPool>>) -> Result<UpstreamResolver, UpstreamError> {
        let mut static_hosts = HashMap::new();
        for (name, ip) in &dns.static_hosts {
            let parsed = DomainName::parse(name)
                .map_err(|e| UpstreamError::StaticHost { name: name.clone(), reason: e.to_string() })?;
            static_hosts.insert(parsed, *ip);
        }
        Ok(UpstreamResolver { static_hosts, upstreams: dns.upstreams(), pool, cache: Mutex::new(HashMap::new()) })
    }

    /// The addresses to dial for `name`, usable ones only, never empty on success.
    pub async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, UpstreamError> {
        if let Some(ip) = self.static_hosts.get(name) {
            return Ok(vec![*ip]);
        }
        if let Some(hit) = self.cached(name) {
            return Ok(hit);
        }
        let mut last = UpstreamError::NoAddress { name: name.to_string() };
        for upstream in &self.upstreams {
            let (label, result) = match upstream {
                DnsUpstream::System => ("system".to_string(), system_lookup(name).await.map(|a| (a, SYSTEM_CACHE))),
                DnsUpstream::Server(server) => (server.to_string(), server_lookup(*server, name).await),
            };
            match result {
                Ok((addrs, ttl)) => {
                    let usable: Vec<IpAddr> = addrs.into_iter().map(canonical).filter(|a| self.usable(*a)).collect();
                    if !usable.is_empty() {
                        self.remember(name, &usable, ttl.clamp(MIN_CACHE, MAX_CACHE));
                        return Ok(usable);
                    }
                    last = UpstreamError::NoAddress { name: name.to_string() };
                }
                Err(reason) => last = UpstreamError::Lookup { name: name.to_string(), upstream: label, reason },
            }
        }
        Err(last)
    }

    fn usable(&self, addr: IpAddr) -> bool {
        if self.pool.as_ref().is_some_and(|p| p.contains(addr))
            || addr.is_loopback()
            || addr.is_unspecified()
            || addr.is_multicast()
        {
            return false;
        }
        match addr {
            IpAddr::V4(v4) => !(v4.is_link_local() || v4.is_broadcast() || v4.octets()[0] == 0),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        }
    }

    fn cached(&self, name: &DomainName) -> Option<Vec<IpAddr>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(name).filter(|(_, until)| *until > Instant::now()).map(|(a, _)| a.clone())
    }

    fn remember(&self, name: &DomainName, addrs: &[IpAddr], ttl: Duration) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear(); // crude but bounded; a flood of names only costs re-lookups
            }
        }
        cache.insert(name.clone(), (addrs.to_vec(), now + ttl));
    }
}

async fn system_lookup(name: &DomainName) -> Result<Vec<IpAddr>, String> {
    let host = name.as_str().to_string();
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
    }
}

/// Asks `server` for A and AAAA at once; the smaller TTL of the two answers is returned.
async fn server_lookup(server: SocketAddr, name: &DomainName) -> Result<(Vec<IpAddr>, Duration), String> {
    let lookup = async {
        let (v4, v6) = tokio::join!(ask(server, name, RecordType::A), ask(server, name, RecordType::AAAA));
        match (v4, v6) {
            (Err(e), Err(_)) => Err(e),
            (a, b) => {
                let (mut addrs, mut ttl) = (Vec::new(), MAX_CACHE);
                for (found, t) in [a, b].into_iter().flatten() {
                    addrs.extend(found);
                    ttl = ttl.min(t);
                }
                Ok((addrs, ttl))
            }
        }
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await.map_err(|_| "timed out".to_string())?
}

/// One question to one server: UDP, then TCP if the answer was truncated.
async fn ask(server: SocketAddr, name: &DomainName, rtype: RecordType) -> Result<(Vec<IpAddr>, Duration), String> {
    let qname = Name::from_ascii(format!("{name}.")).map_err(|e| e.to_string())?;
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    query.set_edns(edns);
    let id = query.metadata.id;
    let bytes = query.to_vec().map_err(|e| e.to_string())?;

    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind address")?;
    let udp = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    udp.connect(server).await.map_err(|e| e.to_string())?;
    udp.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = udp.recv(&mut buf).await.map_err(|e| e.to_string())?;
        // Anything that is not the answer to this exact question is ignored (spoofing, strays).
        let Some(answer) =
            buf.get(..n).and_then(|b| Message::from_vec(b).ok()).filter(|m| is_answer_to(m, id, &qname, rtype))
        else {
            continue;
        };
        if answer.metadata.truncation {
            return ask_tcp(server, &bytes, id, &qname, rtype).await;
        }
        return addresses(&answer, &qname, rtype);
    }
}

async fn ask_tcp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    qname: &Name,
    rtype: RecordType,
) -> Result<(Vec<IpAddr>, Duration), String> {
    let mut stream = TcpStream::connect(server).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(query.len()).map_err(|_| "query too large")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let len = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let answer = Message::from_vec(&buf).map_err(|e| e.to_string())?;
    if !is_answer_to(&answer, id, qname, rtype) {
        return Err("TCP answer does not match the question".into());
    }
    addresses(&answer, qname, rtype)
}

/// Whether `m` answers exactly this question (others are ignored: spoofing, strays). Public only
/// for the fuzz targets (fuzz/fuzz_targets/dns_answer.rs); not an API.
#[doc(hidden)]
pub fn is_answer_to(m: &Message, id: u16, qname: &Name, rtype: RecordType) -> bool {
    m.metadata.message_type == MessageType::Response
        && m.metadata.id == id
        && matches!(m.queries.as_slice(), [q] if q.query_type() == rtype && q.name() == qname)
}

/// The addresses for `qname`, following CNAMEs inside the answer section only. Public only for
/// the fuzz targets; not an API.
#[doc(hidden)]
pub fn addresses(m: &Message, qname: &Name, rtype: RecordType) -> Result<(Vec<IpAddr>, Duration), String> {
    match m.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok((Vec::new(), MIN_CACHE)),
        other => return Err(format!("server answered {other}")),
    }
    let mut names = vec![qname.clone()];
    for _ in 0..MAX_CNAME_CHAIN {
        let before = names.len();
        for r in &m.answers {
            if let RData::CNAME(target) = &r.data {
                if names.contains(&r.name) && !names.contains(&target.0) {
                    names.push(target.0.clone());
                }
            }
        }
        if names.len() == before {
            break;
        }
    }
    let mut ttl = MAX_CACHE;
    let mut out = Vec::new();
    for r in &m.answers {
        if !names.contains(&r.name) {
            continue;
        }
        let addr = match (&r.data, rtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        ttl = ttl.min(Duration::from_secs(u64::from(r.ttl)));
        out.push(addr);
    }
    Ok((out, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::pool::PoolConfig;
    use hickory_proto::op::OpCode;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::Record;
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn dns_config(upstream: Vec<String>, static_hosts: &[(&str, &str)]) -> DnsConfig {
        let mut hosts = BTreeMap::new();
        for (n, ip) in static_hosts {
            hosts.insert(n.to_string(), ip.parse().unwrap());
        }
        DnsConfig { upstream, static_hosts: hosts, ..DnsConfig::default() }
    }

    type Responder = dyn Fn(&Message) -> Vec<Message> + Send + Sync;

    /// A fake DNS server on 127.0.0.1 (UDP and TCP on the same port) answering with `udp` and
    /// `tcp` responders; counts the queries it receives. Aborted on drop.
    struct FakeServer {
        addr: SocketAddr,
        queries: Arc<AtomicUsize>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.tasks.iter().for_each(|t| t.abort());
        }
    }

    async fn fake(udp_responder: Arc<Responder>, tcp_responder: Arc<Responder>) -> FakeServer {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let count = queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                for r in udp_responder(&q) {
                    udp.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
                }
            }
        });
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else { return };
                let len = s.read_u16().await.unwrap();
                let mut buf = vec![0u8; usize::from(len)];
                s.read_exact(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf).unwrap();
                for r in tcp_responder(&q) {
                    let bytes = r.to_vec().unwrap();
                    s.write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes()).await.unwrap();
                    s.write_all(&bytes).await.unwrap();
                }
            }
        });
        FakeServer { addr, queries, tasks: vec![udp_task, tcp_task] }
    }

    fn reply(q: &Message) -> Message {
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.add_query(q.queries[0].clone());
        r
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// www.example.test CNAME edge.example.test, with a mix of usable and unusable addresses.
    fn cdn_answer(q: &Message) -> Vec<Message> {
        let mut r = reply(q);
        let qname = q.queries[0].name().clone();
        r.add_answer(Record::from_rdata(qname, 60, RData::CNAME(CNAME(n("edge.example.test.")))));
        let edge = n("edge.example.test.");
        match q.queries[0].query_type() {
            RecordType::A => {
                for ip in [[203, 0, 113, 7], [127, 0, 0, 1], [198, 18, 0, 9], [169, 254, 169, 254], [0, 0, 0, 0]] {
                    r.add_answer(Record::from_rdata(edge.clone(), 30, RData::A(A(Ipv4Addr::from(ip)))));
                }
                // An address for a name outside the CNAME chain is not ours to use.
                r.add_answer(Record::from_rdata(n("other.test."), 30, RData::A(A(Ipv4Addr::new(203, 0, 113, 99)))));
            }
            _ => {
                for ip in ["2001:db8::1", "::1", "fe80::1", "::ffff:127.0.0.1"] {
                    r.add_answer(Record::from_rdata(
                        edge.clone(),
                        30,
                        RData::AAAA(AAAA(ip.parse::<Ipv6Addr>().unwrap())),
                    ));
                }
            }
        }
        vec![r]
    }

    fn pool() -> Option<Arc<SyntheticPool>> {
        Some(Arc::new(SyntheticPool::new(&PoolConfig::default()).unwrap()))
    }

    #[tokio::test]
    async fn static_hosts_come_first_and_are_taken_as_configured() {
        let server = fake(Arc::new(cdn_answer), Arc::new(|_: &Message| Vec::new())).await;
        let config = dns_config(vec![server.addr.to_string()], &[("api.example.test", "127.0.0.10")]);
        let r = UpstreamResolver::from_config(&config, pool()).unwrap();
        assert_eq!(r.resolve(&name("API.example.test.")).await.unwrap(), vec!["127.0.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(server.queries.load(Ordering::SeqCst), 0, "no query for a static host");
    }

    #[tokio::test]
    async fn server_answers_follow_cnames_and_drop_unusable_addresses() {
        let server = fake(Arc::new(cdn_answer), Arc::new(|_: &Message| Vec::new())).await;
        let r = UpstreamResolver::from_config(&dns_config(vec![server.addr.to_string()], &[]), pool()).unwrap();
        let got = r.resolve(&name("www.example.test")).await.unwrap();
        assert_eq!(got, vec!["203.0.113.7".parse::<IpAddr>().unwrap(), "2001:db8::1".parse().unwrap()]);
        // Cached: no more queries.
        let asked = server.queries.load(Ordering::SeqCst);
        assert_eq!(r.resolve(&name("www.example.test")).await.unwrap(), got);
        assert_eq!(server.queries.load(Ordering::SeqCst), asked);
    }

    #[tokio::test]
    async fn spoofed_or_stray_answers_are_ignored() {
        let responder = |q: &Message| {
            let mut wrong_id = reply(q);
            wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
            wrong_id.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                30,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 66))),
            ));
            let mut wrong_question = Message::response(q.metadata.id, OpCode::Query);
            wrong_question.add_query(Query::query(n("elsewhere.test."), q.queries[0].query_type()));
            wrong_question.add_answer(Record::from_rdata(
                n("elsewhere.test."),
                30,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 67))),
            ));
            let mut right = reply(q);
            if q.queries[0].query_type() == RecordType::A {
                right.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    30,
                    RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
                ));
            }
            vec![wrong_id, wrong_question, right]
        };
        let server = fake(Arc::new(responder), Arc::new(|_: &Message| Vec::new())).await;
        let r = UpstreamResolver::from_config(&dns_config(vec![server.addr.to_string()], &[]), None).unwrap();
        assert_eq!(r.resolve(&name("a.example.test")).await.unwrap(), vec!["203.0.113.1".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn truncated_udp_answers_are_retried_over_tcp() {
        let truncated = |q: &Message| {
            let mut r = reply(q);
            r.metadata.truncation = true;
            vec![r]
        };
        let full = |q: &Message| {
            let mut r = reply(q);
            if q.queries[0].query_type() == RecordType::A {
                r.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    30,
                    RData::A(A(Ipv4Addr::new(203, 0, 113, 8))),
                ));
            }
            vec![r]
        };
        let server = fake(Arc::new(truncated), Arc::new(full)).await;
        let r = UpstreamResolver::from_config(&dns_config(vec![server.addr.to_string()], &[]), None).unwrap();
        assert_eq!(r.resolve(&name("big.example.test")).await.unwrap(), vec!["203.0.113.8".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn only_unusable_addresses_is_an_error_and_the_next_upstream_is_tried() {
        let rebinding = |q: &Message| {
            let mut r = reply(q);
            if q.queries[0].query_type() == RecordType::A {
                r.add_answer(Record::from_rdata(q.queries[0].name().clone(), 30, RData::A(A(Ipv4Addr::LOCALHOST))));
            }
            vec![r]
        };
        let bad = fake(Arc::new(rebinding), Arc::new(|_: &Message| Vec::new())).await;
        let r = UpstreamResolver::from_config(&dns_config(vec![bad.addr.to_string()], &[]), None).unwrap();
        let e = r.resolve(&name("rebind.example.test")).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NoAddress { .. }), "{e}");
        let good = fake(Arc::new(cdn_answer), Arc::new(|_: &Message| Vec::new())).await;
        let config = dns_config(vec![bad.addr.to_string(), good.addr.to_string()], &[]);
        let r = UpstreamResolver::from_config(&config, None).unwrap();
        assert!(r.resolve(&name("rebind.example.test")).await.unwrap().contains(&"203.0.113.7".parse().unwrap()));
    }

    #[tokio::test]
    async fn system_resolver_answers_for_localhost_are_filtered_out() {
        // /etc/hosts maps localhost to loopback: exactly what an agent must not reach via the proxy.
        let r = UpstreamResolver::from_config(&dns_config(vec!["system".into()], &[]), None).unwrap();
        let e = r.resolve(&name("localhost")).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NoAddress { .. }), "{e}");
    }
}
