//! The daemon's own resolution (`dns::lookup`): reading an upstream server's answer, which a
//! spoofer on the path can forge. Parsed with hickory, then matched to the question
//! (`is_answer_to`) and read (`addresses`, following CNAMEs inside the answer only).
//!
//! Checks, beyond "never panics": only a response with the question's id, name and type is
//! taken; addresses are of the asked family only, come from records named by the CNAME chain
//! from the question (at most 8 links), are no more than the answer records, and the TTL never
//! exceeds the cache bound.
#![no_main]

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{Name, RData, RecordType};
use libfuzzer_sys::fuzz_target;
use sluice::dns::lookup::{addresses, is_answer_to, MAX_CACHE};
use std::net::IpAddr;
use std::str::FromStr;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Message::from_vec(data) else { return };
    let fixed = Name::from_str("api.example.com.").expect("a name");
    let mut questions =
        vec![(m.metadata.id, fixed.clone(), RecordType::A), (m.metadata.id ^ 1, fixed, RecordType::AAAA)];
    if let [q] = m.queries.as_slice() {
        questions.push((m.metadata.id, q.name().clone(), q.query_type()));
    }
    for (id, qname, rtype) in questions {
        if !is_answer_to(&m, id, &qname, rtype) {
            continue;
        }
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.id, id);
        let Ok((addrs, ttl)) = addresses(&m, &qname, rtype) else { continue };
        assert!(ttl <= MAX_CACHE, "TTL {ttl:?}");
        assert!(addrs.len() <= m.answers.len());
        // The chain, rebuilt: names reachable from qname by CNAMEs in the answer section.
        let mut names = vec![qname.clone()];
        for _ in 0..8 {
            for r in &m.answers {
                if let RData::CNAME(t) = &r.data {
                    if names.contains(&r.name) && !names.contains(&t.0) {
                        names.push(t.0.clone());
                    }
                }
            }
        }
        for a in &addrs {
            let found = m.answers.iter().any(|r| {
                names.contains(&r.name)
                    && match (&r.data, a) {
                        (RData::A(x), IpAddr::V4(y)) => x.0 == *y && rtype == RecordType::A,
                        (RData::AAAA(x), IpAddr::V6(y)) => x.0 == *y && rtype == RecordType::AAAA,
                        _ => false,
                    }
            });
            assert!(found, "{a} is in no record of the chain");
        }
    }
});
