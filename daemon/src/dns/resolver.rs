//! The agents' resolver core: one DNS query in, one answer out, no sockets, nothing forwarded.
//!
//! | question | answer |
//! |---|---|
//! | A / AAAA of a name the asking sandbox may reach | NOERROR, one synthetic address, TTL 5 s |
//! | any other type (TXT, MX, ANY, HTTPS, ...) of such a name | NOERROR with no records (NODATA) |
//! | a name it may not reach, or not a valid host name | NXDOMAIN |
//! | pool exhausted | SERVFAIL |
//! | not a standard query (opcode) | NOTIMP |
//! | class other than IN | REFUSED |
//! | malformed, more or fewer than one question, records in a query, larger than 4 KiB | FORMERR |
//! | a response, or fewer than 2 bytes | no answer at all (never reflect packets back) |
//!
//! Because nothing is ever forwarded, names that carry data (`<base32 chunk>.exfil.example`) are
//! answered here and go nowhere, whatever they contain. The question is echoed exactly as asked
//! (case included: some stubs randomise case and check it), but every decision is made on the
//! [`DomainName`], so case and the trailing dot cannot change an answer.

use super::pool::SyntheticPool;
use crate::domain::DomainName;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::sync::Arc;

/// TTL of synthetic answers: short, so a name whose permission was revoked stops resolving soon.
pub const SYNTHETIC_TTL: u32 = 5;
/// Largest query accepted (a real one is under 600 bytes even with EDNS padding).
pub const MAX_QUERY: usize = 4096;
/// The UDP payload size we advertise in EDNS answers (RFC 9715 / DNS flag day 2020).
const EDNS_PAYLOAD: u16 = 1232;

/// What the resolver was asked and what it said, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Address(DomainName),
    NoData(DomainName),
    Denied(Option<DomainName>),
    Exhausted(DomainName),
    Refused,
    NotImplemented,
    FormatError,
    Dropped,
}

#[derive(Debug)]
pub struct Resolver {
    pool: Arc<SyntheticPool>,
}

impl Resolver {
    pub fn new(pool: Arc<SyntheticPool>) -> Resolver {
        Resolver { pool }
    }

    /// The pool, shared with the proxy (`lookup_addr`).
    pub fn pool(&self) -> &Arc<SyntheticPool> {
        &self.pool
    }

    /// Answers one query (wire format). `None` means send nothing back. See the module table.
    pub fn answer(&self, query: &[u8], allowed: &dyn Fn(&DomainName) -> bool) -> Option<Vec<u8>> {
        self.answer_with_outcome(query, allowed).0
    }

    pub fn answer_with_outcome(
        &self,
        query: &[u8],
        allowed: &dyn Fn(&DomainName) -> bool,
    ) -> (Option<Vec<u8>>, Outcome) {
        let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return (None, Outcome::Dropped);
        };
        // The QR bit: never answer something that claims to be an answer.
        if query.get(2).is_some_and(|flags| flags & 0x80 != 0) {
            return (None, Outcome::Dropped);
        }
        let formerr = || (error(id, OpCode::Query, ResponseCode::FormErr), Outcome::FormatError);
        if query.len() > MAX_QUERY {
            return formerr();
        }
        let Ok(msg) = Message::from_vec(query) else { return formerr() };
        if msg.metadata.message_type != MessageType::Query {
            return (None, Outcome::Dropped);
        }
        if msg.metadata.op_code != OpCode::Query {
            return (error(id, msg.metadata.op_code, ResponseCode::NotImp), Outcome::NotImplemented);
        }
        let [question] = msg.queries.as_slice() else { return formerr() };
        if !msg.answers.is_empty()
            || !msg.authorities.is_empty()
            || !msg.additionals.is_empty()
            || msg.signature.is_some()
        {
            return formerr();
        }
        let mut response = Message::response(id, OpCode::Query);
        response.metadata.recursion_desired = msg.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.add_query(question.clone());
        if msg.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        if question.query_class() != DNSClass::IN {
            response.metadata.response_code = ResponseCode::Refused;
            return (encode(response, id), Outcome::Refused);
        }
        let host = host_name(question.name());
        let outcome = match host {
            Some(host) if allowed(&host) => match question.query_type() {
                RecordType::A | RecordType::AAAA => match self.pool.addresses(&host) {
                    Some((v4, v6)) => {
                        let rdata = if question.query_type() == RecordType::A {
                            RData::A(A(v4))
                        } else {
                            RData::AAAA(AAAA(v6))
                        };
                        response.add_answer(Record::from_rdata(question.name().clone(), SYNTHETIC_TTL, rdata));
                        Outcome::Address(host)
                    }
                    None => {
                        response.metadata.response_code = ResponseCode::ServFail;
                        Outcome::Exhausted(host)
                    }
                },
                _ => Outcome::NoData(host),
            },
            other => {
                response.metadata.response_code = ResponseCode::NXDomain;
                Outcome::Denied(other)
            }
        };
        (encode(response, id), outcome)
    }
}

/// The question name as a [`DomainName`], or `None` if it is not a host name. Labels are checked
/// one by one before joining, so a label with a dot inside (`"x.allowed"` as one label) cannot
/// pass for two labels.
fn host_name(name: &Name) -> Option<DomainName> {
    let mut joined = String::with_capacity(crate::domain::MAX_NAME_LEN + 1);
    for label in name.iter() {
        if label.is_empty() || !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
            return None;
        }
        if !joined.is_empty() {
            joined.push('.');
        }
        joined.push_str(std::str::from_utf8(label).ok()?);
    }
    DomainName::parse(&joined).ok()
}

fn error(id: u16, op_code: OpCode, code: ResponseCode) -> Option<Vec<u8>> {
    encode(Message::error_msg(id, op_code, code), id)
}

/// Encodes a response; if that ever fails, a bare SERVFAIL header says so instead of silence.
fn encode(msg: Message, id: u16) -> Option<Vec<u8>> {
    match msg.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::error!(error = %e, "encoding a DNS answer failed; answering SERVFAIL");
            let [hi, lo] = id.to_be_bytes();
            Some(vec![hi, lo, 0x81, 0x82, 0, 0, 0, 0, 0, 0, 0, 0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::pool::PoolConfig;
    use hickory_proto::op::Query;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn resolver() -> Resolver {
        Resolver::new(Arc::new(SyntheticPool::new(&PoolConfig::default()).unwrap()))
    }

    /// Allows `*.allowed.test` and `exact.test`.
    fn allow(name: &DomainName) -> bool {
        let n = name.as_str();
        n == "exact.test" || n.ends_with(".allowed.test")
    }

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn ask(r: &Resolver, q: &[u8]) -> Message {
        let bytes = r.answer(q, &allow).expect("an answer");
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.message_type, MessageType::Response);
        if let Some(id) = q.get(..2) {
            assert_eq!(m.metadata.id.to_be_bytes(), id);
        }
        m
    }

    #[test]
    fn allowed_names_get_synthetic_addresses_with_a_short_ttl() {
        let r = resolver();
        let m = ask(&r, &query("Api.Allowed.TEST.", RecordType::A));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "Api.Allowed.TEST.", "question echoed as asked");
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, SYNTHETIC_TTL);
        let RData::A(A(v4)) = &m.answers[0].data else { panic!("not an A record") };
        assert_eq!(*v4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(r.pool().lookup_addr((*v4).into()).unwrap().as_str(), "api.allowed.test");

        let m = ask(&r, &query("api.allowed.test", RecordType::AAAA));
        let RData::AAAA(AAAA(v6)) = &m.answers[0].data else { panic!("not an AAAA record") };
        assert_eq!(*v6, "fd00:5c::1".parse::<Ipv6Addr>().unwrap(), "same entry for A and AAAA, any case");
        assert_eq!(r.pool().len(), 1);
    }

    #[test]
    fn other_types_of_allowed_names_are_nodata() {
        let r = resolver();
        for t in
            [RecordType::TXT, RecordType::MX, RecordType::ANY, RecordType::HTTPS, RecordType::CNAME, RecordType::NS]
        {
            let m = ask(&r, &query("exact.test.", t));
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
        }
        assert!(r.pool().is_empty(), "NODATA allocates nothing");
    }

    #[test]
    fn disallowed_names_are_nxdomain_for_every_type() {
        let r = resolver();
        for name in [
            "evil.test.",
            "allowed.test.",
            "evilallowed.test.",
            "allowed.test.evil.net.",
            "exact.test.evil.",
            "localhost.",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
                let m = ask(&r, &query(name, t));
                assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name} {t}");
                assert!(m.answers.is_empty());
            }
        }
        assert!(r.pool().is_empty());
    }

    #[test]
    fn data_tunnelled_in_names_is_nxdomain_and_goes_nowhere() {
        let r = resolver();
        let seen = RefCell::new(Vec::new());
        let recording = |n: &DomainName| {
            seen.borrow_mut().push(n.to_string());
            allow(n)
        };
        // 4 labels of 63 base32-ish characters under a parent the passport does not allow.
        let chunk = |i: u8| -> String { (0..63).map(|j| char::from(b'a' + (i * 7 + j) % 26)).collect() };
        let leak = format!("{}.{}.{}.x.exfil.test.", chunk(1), chunk(2), chunk(3));
        for t in [RecordType::A, RecordType::AAAA, RecordType::TXT, RecordType::NULL] {
            let bytes = r.answer(&query(&leak, t), &recording).unwrap();
            assert_eq!(Message::from_vec(&bytes).unwrap().metadata.response_code, ResponseCode::NXDomain);
        }
        // The allowlist saw the whole name (so it decided on the real parent) and nothing was kept.
        assert!(seen.borrow().iter().all(|n| n.ends_with(".x.exfil.test") && n.len() > 190));
        assert!(r.pool().is_empty());
    }

    #[test]
    fn a_label_with_a_dot_inside_is_not_two_labels() {
        let r = resolver();
        // Wire name: [11]"api.allowed" [4]"test" [0] — one label containing a dot.
        let mut q = query("placeholder.test.", RecordType::A);
        let start = 12;
        let end = q[start..].iter().position(|&b| b == 0).unwrap() + start + 1;
        let mut name = vec![11u8];
        name.extend(b"api.allowed");
        name.push(4);
        name.extend(b"test");
        name.push(0);
        q.splice(start..end, name);
        let called = RefCell::new(false);
        let bytes = r.answer(&q, &|n: &DomainName| {
            *called.borrow_mut() = true;
            allow(n)
        });
        assert_eq!(Message::from_vec(&bytes.unwrap()).unwrap().metadata.response_code, ResponseCode::NXDomain);
        assert!(!*called.borrow(), "never offered to the allowlist as api.allowed.test");
    }

    #[test]
    fn malformed_or_unusual_queries() {
        let r = resolver();
        assert_eq!(r.answer(&[], &allow), None);
        assert_eq!(r.answer(&[0x12], &allow), None);
        let m = ask(&r, &[0x12, 0x34, 0x01]);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Two questions.
        let mut two = Message::query();
        two.add_query(Query::query(Name::from_ascii("exact.test.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("evil.test.").unwrap(), RecordType::A));
        assert_eq!(ask(&r, &two.to_vec().unwrap()).metadata.response_code, ResponseCode::FormErr);
        // No question.
        assert_eq!(ask(&r, &Message::query().to_vec().unwrap()).metadata.response_code, ResponseCode::FormErr);
        // A query carrying an answer record.
        let mut with_answer = Message::query();
        with_answer.add_query(Query::query(Name::from_ascii("exact.test.").unwrap(), RecordType::A));
        with_answer.add_answer(Record::from_rdata(
            Name::from_ascii("exact.test.").unwrap(),
            5,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        assert_eq!(ask(&r, &with_answer.to_vec().unwrap()).metadata.response_code, ResponseCode::FormErr);
        // Oversized.
        let mut big = query("exact.test.", RecordType::A);
        big.resize(MAX_QUERY + 1, 0);
        assert_eq!(ask(&r, &big).metadata.response_code, ResponseCode::FormErr);
        // A response is never answered.
        let mut resp = query("exact.test.", RecordType::A);
        resp[2] |= 0x80;
        assert_eq!(r.answer(&resp, &allow), None);
        // Opcode STATUS (2) and UPDATE (5): not implemented.
        for opcode in [2u8, 5] {
            let mut q = query("exact.test.", RecordType::A);
            q[2] = (q[2] & 0x87) | (opcode << 3);
            assert_eq!(ask(&r, &q).metadata.response_code, ResponseCode::NotImp, "opcode {opcode}");
        }
        // Class CHAOS.
        let mut chaos = Message::query();
        let mut question = Query::query(Name::from_ascii("exact.test.").unwrap(), RecordType::TXT);
        question.set_query_class(DNSClass::CH);
        chaos.add_query(question);
        assert_eq!(ask(&r, &chaos.to_vec().unwrap()).metadata.response_code, ResponseCode::Refused);
        assert!(r.pool().is_empty());
    }

    #[test]
    fn names_that_are_not_host_names_are_nxdomain() {
        let r = resolver();
        let long = format!("{}.allowed.test.", ["a".repeat(63), "b".repeat(63), "c".repeat(63)].join("."));
        assert!(long.len() > 200);
        for name in [".", "_dmarc.allowed.test.", "1.0.0.127.in-addr.arpa.", "x_y.allowed.test.", "127.0.0.1."] {
            let m = ask(&r, &query(name, RecordType::A));
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
        // A name longer than DNS allows (255 octets on the wire) is malformed.
        let mut wire = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for c in [b'a', b'b', b'c', b'd'] {
            wire.push(63);
            wire.extend([c; 63]);
        }
        wire.extend([4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        assert_eq!(ask(&r, &wire).metadata.response_code, ResponseCode::FormErr);
        assert_eq!(ask(&r, &query(&long, RecordType::A)).metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn edns_queries_get_an_opt_record_back() {
        let r = resolver();
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii("exact.test.").unwrap(), RecordType::A));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        let m = ask(&r, &q.to_vec().unwrap());
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    }

    #[test]
    fn an_exhausted_pool_is_servfail() {
        let config = PoolConfig {
            v4: (Ipv4Addr::new(198, 18, 0, 0), 30),
            min_idle: std::time::Duration::from_secs(3600),
            ..PoolConfig::default()
        };
        let r = Resolver::new(Arc::new(SyntheticPool::new(&config).unwrap()));
        for i in 0..r.pool().capacity() {
            assert_eq!(
                ask(&r, &query(&format!("n{i}.allowed.test."), RecordType::A)).metadata.response_code,
                ResponseCode::NoError
            );
        }
        assert_eq!(ask(&r, &query("more.allowed.test.", RecordType::A)).metadata.response_code, ResponseCode::ServFail);
    }

    /// Figures, not assertions: `cargo test --release -p sluice dns_answer_figures -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn dns_answer_figures() {
        let r = resolver();
        let (allowed, denied) = (query("api.allowed.test.", RecordType::A), query("evil.test.", RecordType::A));
        let n = 200_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(r.answer(std::hint::black_box(&allowed), &allow).is_some());
        }
        let hit = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(r.answer(std::hint::black_box(&denied), &allow).is_some());
        }
        println!("dns answer: allowed A (pool hit) {hit:?}; NXDOMAIN {:?}", t.elapsed() / n);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_and_answers_are_responses(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let r = resolver();
            if let Some(out) = r.answer(&bytes, &allow) {
                prop_assert!(out.len() >= 12 && out.len() <= 1232);
                prop_assert_eq!(&out[..2], &bytes[..2]);
                prop_assert!(out[2] & 0x80 != 0, "QR set");
            }
        }

        #[test]
        fn mutated_queries_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            let r = resolver();
            let mut q = query("a.allowed.test.", RecordType::AAAA);
            for (at, byte) in flips {
                let i = at.index(q.len());
                q[i] = byte;
            }
            let _ = r.answer(&q, &allow);
        }
    }
}
