//! `proxy::sniff`: the first bytes of every redirected connection (TLS ClientHello or HTTP/1 head).
//!
//! Checks, beyond "never panics":
//! * monotonic: every prefix of the input sniffs as `NeedMore` or as the whole input does, so
//!   waiting for more bytes never hides a different answer;
//! * bounded: bytes past `MAX_SNIFF` change nothing, and at `MAX_SNIFF` bytes it has decided;
//! * what it reports is well formed (printable SNI, non-empty ALPN names, a printable target);
//! * one reading only: where rustls (which terminates the TLS) or httparse (hyper's parser) also
//!   accept the message, they see the same server name, ALPN list, method, target and `Host`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::domain::DomainName;
use sluice::proxy::sniff::{sniff, HttpMethod, Sniff, MAX_SNIFF};

fuzz_target!(|data: &[u8]| {
    let whole = sniff(data);

    // Monotonic: a decided prefix is never contradicted by more bytes.
    let step = (data.len() / 64).max(1);
    for cut in (0..data.len()).step_by(step) {
        let part = sniff(&data[..cut]);
        assert!(part == Sniff::NeedMore || part == whole, "prefix {cut} sniffs {part:?}, whole input {whole:?}");
    }

    // Bounded: padded past the bound, it has decided; what it decided on a prefix stays.
    let mut padded = data.to_vec();
    padded.resize(MAX_SNIFF + 7, 0);
    let long = sniff(&padded);
    assert_ne!(long, Sniff::NeedMore, "{} bytes still NeedMore", padded.len());
    if whole != Sniff::NeedMore {
        assert_eq!(long, whole);
    }
    assert_eq!(sniff(&padded), sniff(&padded[..MAX_SNIFF]));

    match &whole {
        Sniff::Tls(info) => {
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && sni.bytes().all(|b| b.is_ascii_graphic()), "{sni:?}");
            }
            assert!(info.alpn.iter().all(|p| !p.is_empty() && p.len() < 256));
            same_as_rustls(data, info);
        }
        Sniff::Http(start) => {
            assert!(!start.target.is_empty() && start.target.bytes().all(|b| b.is_ascii_graphic()));
            if let Some(host) = &start.host {
                assert!(host.is_ascii() && !host.contains(['\r', '\n']), "{host:?}");
            }
            same_as_httparse(data, start);
        }
        Sniff::NeedMore | Sniff::Other => {}
    }
});

/// Where rustls accepts the same bytes as a ClientHello, it must read the same name and ALPN.
fn same_as_rustls(data: &[u8], info: &sluice::proxy::sniff::ClientHelloInfo) {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    let accepted = loop {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    let hello = accepted.client_hello();
    let ours = info.sni.as_deref().map(DomainName::parse);
    let theirs = hello.server_name().map(DomainName::parse);
    match (ours, theirs) {
        (Some(Ok(a)), Some(Ok(b))) => assert_eq!(a, b, "sniff and rustls read different server names"),
        (Some(Ok(a)), None) => panic!("sniff reads server name {a:?}, rustls none"),
        (None, Some(Ok(b))) => panic!("rustls reads server name {b:?}, sniff none"),
        // An IP literal or invalid name is refused by the proxy whatever rustls thinks of it.
        _ => {}
    }
    let alpn: Vec<Vec<u8>> = hello.alpn().map(|it| it.map(<[u8]>::to_vec).collect()).unwrap_or_default();
    assert_eq!(alpn, info.alpn, "sniff and rustls read different ALPN lists");
}

/// Where httparse (hyper's parser) reads a complete head from the same bytes, it must read the
/// same method, target and one `Host`.
fn same_as_httparse(data: &[u8], start: &sluice::proxy::sniff::HttpStart) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let method = match start.method {
        HttpMethod::Get => "GET",
        HttpMethod::Head => "HEAD",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Connect => "CONNECT",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Trace => "TRACE",
        HttpMethod::Patch => "PATCH",
    };
    assert_eq!(req.method, Some(method));
    assert_eq!(req.path, Some(start.target.as_str()));
    let hosts: Vec<&[u8]> =
        req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value).collect();
    match &start.host {
        None => assert!(hosts.is_empty(), "httparse sees Host {hosts:?}, sniff none"),
        Some(host) => {
            let [one] = hosts.as_slice() else { panic!("sniff sees one Host {host:?}, httparse {hosts:?}") };
            assert_eq!(one.trim_ascii(), host.as_bytes(), "sniff and httparse read different Host values");
        }
    }
}
