//! `proxy::h1watch`: the second reading of each HTTP/1 request stream, below hyper, that refuses
//! smuggling shapes.
//!
//! Checks, beyond "never panics":
//! * the verdicts do not depend on how the stream is cut into reads (the input is fed whole, byte
//!   by byte, and in chunk sizes drawn from the input);
//! * at most one verdict per request head (`\r\n\r\n`) and none for a head over the bound;
//! * where httparse (hyper's parser) reads the first request head and sees a smuggling shape
//!   (`Content-Length` with `Transfer-Encoding`, two `Content-Length`s, a `Transfer-Encoding`
//!   other than `chunked`), the tracker's verdict on that request, if it has one, refuses it:
//!   a request hyper would serve is never waved through with a clean verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proxy::h1watch::{Tracker, Verdicts};

const MAX_HEAD: usize = 4096;

fn verdicts(stream: &[u8], cuts: &mut dyn Iterator<Item = usize>) -> Vec<Result<(), String>> {
    let v = Verdicts::default();
    let mut t = Tracker::new(MAX_HEAD, v.clone());
    let mut rest = stream;
    while !rest.is_empty() {
        let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
        t.feed(&rest[..n]);
        rest = &rest[n..];
    }
    std::iter::from_fn(|| v.next()).map(|r| r.map_err(|e| e.reason.as_str().to_string())).collect()
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a chunking; the rest is the stream.
    let Some((&seed, stream)) = data.split_first() else { return };
    let whole = verdicts(stream, &mut std::iter::empty());
    assert_eq!(verdicts(stream, &mut std::iter::repeat(1)), whole, "byte by byte");
    let mut x = u32::from(seed) | 1;
    let mut cuts = std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        Some((x % 97) as usize + 1)
    });
    assert_eq!(verdicts(stream, &mut cuts), whole, "chunked with seed {seed}");

    let heads = stream.windows(4).filter(|w| w == b"\r\n\r\n").count();
    assert!(whole.len() <= heads, "{} verdicts for {heads} head ends", whole.len());

    // hyper's view of the first request head.
    let start = stream.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = req.parse(&stream[start..]) else { return };
    if len > MAX_HEAD {
        return;
    }
    let named = |n: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
    let (cl, te) = (named("content-length"), named("transfer-encoding"));
    let te_is_chunked = te == 1
        && req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding") && h.value.trim_ascii().eq_ignore_ascii_case(b"chunked")
        });
    let smuggling = cl > 1 || (cl > 0 && te > 0) || (te > 0 && !te_is_chunked);
    if smuggling {
        if let Some(first) = whole.first() {
            assert!(first.is_err(), "hyper reads a smuggling shape ({cl} Content-Length, {te} Transfer-Encoding), the tracker says {first:?}");
        }
    }
});
