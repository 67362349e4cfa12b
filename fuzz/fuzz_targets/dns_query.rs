//! The agents' resolver (`dns::Resolver::answer`): one DNS query from an agent in, one answer out.
//!
//! Checks, beyond "never panics":
//! * nothing comes back for fewer than 2 bytes or for a packet with the QR bit set (no
//!   reflection), and every answer is a well-formed response (hickory parses it) with the query's
//!   id, at most one answer record and at most 4 KiB;
//! * an address is given only for a name the sandbox may reach (the allow function was asked
//!   about exactly that name), only as the asked type, only from the synthetic pool, and maps
//!   back to that name through the pool (what the proxy relies on); an outcome matches the
//!   response code.
#![no_main]

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use libfuzzer_sys::fuzz_target;
use sluice::dns::resolver::Outcome;
use sluice::dns::{PoolConfig, Resolver, SyntheticPool};
use sluice::domain::DomainName;
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let pool = Arc::new(SyntheticPool::new(&PoolConfig::default()).expect("default pool"));
    let resolver = Resolver::new(Arc::clone(&pool));
    let asked: RefCell<Vec<DomainName>> = RefCell::new(Vec::new());
    // Allowed: names under allowed.test, and any name whose length is even (so random names are
    // allowed half the time).
    let allow = |n: &DomainName| {
        asked.borrow_mut().push(n.clone());
        n.as_str().ends_with(".allowed.test") || n.as_str().len().is_multiple_of(2)
    };
    let (answer, outcome) = resolver.answer_with_outcome(data, &allow);
    let Some(bytes) = answer else {
        assert_eq!(outcome, Outcome::Dropped);
        assert!(data.len() < 2 || data.get(2).is_some_and(|f| f & 0x80 != 0), "no answer to a query");
        return;
    };
    assert!(data.len() >= 2 && data.get(2).is_none_or(|f| f & 0x80 == 0), "answered a response");
    assert!(bytes.len() <= 4096, "{} byte answer", bytes.len());
    let msg = Message::from_vec(&bytes).expect("our answer parses");
    assert_eq!(msg.metadata.message_type, MessageType::Response);
    assert_eq!(msg.metadata.id.to_be_bytes(), [data[0], data[1]]);
    assert!(msg.answers.len() <= 1, "{} answers", msg.answers.len());
    let code = msg.metadata.response_code;
    match &outcome {
        Outcome::Address(name) => {
            assert_eq!(code, ResponseCode::NoError);
            assert_eq!(asked.borrow().last(), Some(name), "answered a name the allow function was not asked about");
            let [record] = msg.answers.as_slice() else { panic!("Address without a record") };
            let [q] = msg.queries.as_slice() else { panic!("answer without the question") };
            assert_eq!(record.record_type(), q.query_type());
            let addr = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("answered {other:?}"),
            };
            assert!(pool.contains(addr), "{addr} is not synthetic");
            assert_eq!(pool.lookup_addr(addr).as_ref(), Some(name), "{addr} does not map back");
            assert!(name.as_str().ends_with(".allowed.test") || name.as_str().len().is_multiple_of(2));
        }
        Outcome::NoData(_) => assert!(code == ResponseCode::NoError && msg.answers.is_empty()),
        Outcome::Denied(_) => assert!(code == ResponseCode::NXDomain && msg.answers.is_empty()),
        Outcome::Exhausted(_) => panic!("a fresh pool is exhausted"),
        Outcome::Refused => assert_eq!(code, ResponseCode::Refused),
        Outcome::NotImplemented => assert_eq!(code, ResponseCode::NotImp),
        Outcome::FormatError => assert_eq!(code, ResponseCode::FormErr),
        Outcome::Dropped => panic!("Dropped with an answer"),
    }
    if !matches!(outcome, Outcome::Address(_)) {
        assert!(msg.answers.is_empty());
    }
});
