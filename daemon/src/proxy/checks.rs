//! Pure per-request checks: which host a request names, whether that agrees with the TLS server
//! name and the address the agent dialed, and whether its framing could be read two ways.
//!
//! Everything here looks at an already parsed request head (hyper's) and returns a
//! [`Refusal`] with a stable reason and a detail an agent can act on. No I/O, so every rule is
//! unit-tested with the attack it stops.
//!
//! Why each rule exists:
//! * **One authority.** HTTP/1.1 carries the host in `Host` and, in absolute form, in the
//!   request target; HTTP/2 in `:authority` and optionally `Host`. If a request carries two that
//!   disagree, different parsers (ours, the upstream's, a CDN's) pick different ones. We demand
//!   that all present agree after normalisation ([`DomainName`]: case, one trailing dot).
//! * **Authority = SNI = dialed name** (domain fronting). The policy decision is made on the
//!   name; the TLS server name decides which certificate (and at a CDN, which backend) the
//!   upstream serves. A request whose `Host` differs from its connection's SNI, or from the name
//!   behind the synthetic address the agent dialed, is refused.
//! * **Smuggling.** `Content-Length` together with `Transfer-Encoding`, several `Content-Length`
//!   headers, several or non-`chunked` `Transfer-Encoding` values: a front and a back end could
//!   disagree on where the body ends, and the bytes after it become a second request nobody
//!   decided on. Obsolete line folding never reaches us: hyper's parser rejects it, and the proxy
//!   attests that rejection ([`super::http`]).

use crate::decide::Reason;
use crate::domain::DomainName;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Uri, Version};

/// Why a request is refused before any decision on its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One of the proxy's own reasons ([`Reason::DomainFronting`], ...).
    pub reason: Reason,
    pub detail: String,
}

impl Refusal {
    fn new(reason: Reason, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into() }
    }
}

/// The host a request is for, and the port it names (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: DomainName,
    pub port: Option<u16>,
}

/// Parses `host[:port]` strictly: a [`DomainName`] (no IP literals, bracketed or not) and an
/// optional decimal port 1–65535 without sign or leading `+`.
pub fn parse_authority(raw: &str) -> Result<Authority, Refusal> {
    let bad = |why: String| Refusal::new(Reason::InvalidHost, format!("Host {raw:?}: {why}"));
    if raw.is_empty() || raw.len() > 300 {
        return Err(bad("empty or too long".into()));
    }
    if raw.starts_with('[') {
        return Err(bad("IP address literals are not allowed; use the service's name".into()));
    }
    if raw.contains('@') {
        return Err(bad("userinfo is not allowed in an authority".into()));
    }
    let (host, port) = match raw.rsplit_once(':') {
        Some((h, p)) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the port must be 1 to 65535".into()));
            }
            let port: u16 = p.parse().map_err(|_| bad("the port must be 1 to 65535".into()))?;
            if port == 0 {
                return Err(bad("the port must be 1 to 65535".into()));
            }
            (h, Some(port))
        }
        None => (raw, None),
    };
    let host = DomainName::parse(host).map_err(|e| bad(e.to_string()))?;
    Ok(Authority { host, port })
}

/// The one authority of a request: `Host` (HTTP/1.x) or `:authority` (HTTP/2), with every other
/// place a host can appear required to agree.
pub fn request_authority(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<Authority, Refusal> {
    let mut hosts = headers.get_all(HOST).iter();
    let host_header = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(Refusal::new(Reason::DomainFronting, "The request has more than one Host header."));
        }
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| Refusal::new(Reason::InvalidHost, "The Host header is not printable ASCII."))?
                .trim(),
        ),
        (None, _) => None,
    };
    let target = uri.authority().map(|a| a.as_str());
    let (primary, secondary) = if version == Version::HTTP_2 { (target, host_header) } else { (host_header, target) };
    let Some(primary_raw) = primary.or(secondary) else {
        return Err(Refusal::new(Reason::InvalidHost, "The request names no host (no Host header or :authority)."));
    };
    let authority = parse_authority(primary_raw)?;
    // Both places carry a host: they must name the same one (and the same port, if both do).
    if let (Some(_), Some(other_raw)) = (primary, secondary) {
        let other = parse_authority(other_raw)?;
        let ports_differ = matches!((other.port, authority.port), (Some(a), Some(b)) if a != b);
        if other.host != authority.host || ports_differ {
            return Err(Refusal::new(
                Reason::DomainFronting,
                format!("The request names two hosts: {primary_raw:?} and {other_raw:?}."),
            ));
        }
    }
    Ok(authority)
}

/// The request's host must be the TLS server name, the name behind the synthetic address the
/// agent dialed, and use the dialed port (if it names one).
pub fn check_consistent(
    authority: &Authority,
    sni: Option<&DomainName>,
    dialed_name: Option<&DomainName>,
    dialed_port: u16,
) -> Result<(), Refusal> {
    if let Some(sni) = sni {
        if *sni != authority.host {
            return Err(Refusal::new(
                Reason::DomainFronting,
                format!(
                    "The request is for {} but its TLS connection was opened for {sni}; \
                     open a connection to {} instead.",
                    authority.host, authority.host
                ),
            ));
        }
    }
    if let Some(dialed) = dialed_name {
        if *dialed != authority.host {
            return Err(Refusal::new(
                Reason::DomainFronting,
                format!(
                    "The request is for {} but the connection was made to the address of {dialed}; \
                     resolve {} and connect to its address.",
                    authority.host, authority.host
                ),
            ));
        }
    }
    if let Some(port) = authority.port {
        if port != dialed_port {
            return Err(Refusal::new(
                Reason::DomainFronting,
                format!("The request names port {port} but the connection was made to port {dialed_port}."),
            ));
        }
    }
    Ok(())
}

/// Refuses request heads whose body framing two HTTP/1 parsers could read differently.
pub fn check_framing(headers: &HeaderMap) -> Result<(), Refusal> {
    let cl = headers.get_all(CONTENT_LENGTH).iter().count();
    let te: Vec<_> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    if cl > 1 {
        return Err(Refusal::new(Reason::RequestSmuggling, "The request has more than one Content-Length header."));
    }
    if cl == 1 && !te.is_empty() {
        return Err(Refusal::new(
            Reason::RequestSmuggling,
            "The request has both Content-Length and Transfer-Encoding; send one of them.",
        ));
    }
    if let Some(v) = headers.get(CONTENT_LENGTH) {
        let ok =
            v.to_str().ok().is_some_and(|s| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(Refusal::new(Reason::RequestSmuggling, "Content-Length must be a single decimal number."));
        }
    }
    match te.as_slice() {
        [] => Ok(()),
        [one] if one.to_str().is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked")) => Ok(()),
        _ => Err(Refusal::new(
            Reason::RequestSmuggling,
            "Transfer-Encoding must be exactly one \"chunked\" (no lists, no other codings).",
        )),
    }
}

/// Does this request ask to switch protocols (HTTP/1.1 `Upgrade`, e.g. WebSocket)?
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version != Version::HTTP_2 && headers.contains_key(http::header::UPGRADE)
}

/// CONNECT (HTTP/1 tunnels, HTTP/2 extended CONNECT for WebSocket) opens a tunnel the proxy can
/// no longer see into.
pub fn is_connect(method: &Method) -> bool {
    method == Method::CONNECT
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn origin() -> Uri {
        "/v1/x".parse().unwrap()
    }

    #[test]
    fn host_is_normalised() {
        let a = request_authority(Version::HTTP_11, &origin(), &headers(&[("host", "API.Example.TEST.")])).unwrap();
        assert_eq!(a.host, name("api.example.test"));
        assert_eq!(a.port, None);
        let a = request_authority(Version::HTTP_11, &origin(), &headers(&[("host", "api.example.test:8443")])).unwrap();
        assert_eq!(a.port, Some(8443));
    }

    #[test]
    fn ip_literals_and_junk_hosts_are_refused() {
        for bad in
            ["127.0.0.1", "[::1]", "[::1]:443", "10.0.0.1:80", "0x7f.1", "a b", "x:0", "x:65536", "x:+1", "u@x", ""]
        {
            let r = request_authority(Version::HTTP_11, &origin(), &headers(&[("host", bad)]));
            assert!(matches!(&r, Err(Refusal { reason: Reason::InvalidHost, .. })), "{bad:?}: {r:?}");
        }
    }

    #[test]
    fn missing_host_is_refused() {
        let r = request_authority(Version::HTTP_11, &origin(), &HeaderMap::new());
        assert_eq!(r.unwrap_err().reason, Reason::InvalidHost);
    }

    #[test]
    fn two_host_headers_are_fronting() {
        let r = request_authority(Version::HTTP_11, &origin(), &headers(&[("host", "a.test"), ("host", "a.test")]));
        assert_eq!(r.unwrap_err().reason, Reason::DomainFronting);
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        let uri: Uri = "https://evil.test/x".parse().unwrap();
        let r = request_authority(Version::HTTP_11, &uri, &headers(&[("host", "good.test")]));
        assert_eq!(r.unwrap_err().reason, Reason::DomainFronting);
        let uri: Uri = "https://GOOD.test./x".parse().unwrap();
        let a = request_authority(Version::HTTP_11, &uri, &headers(&[("host", "good.test")])).unwrap();
        assert_eq!(a.host, name("good.test"));
    }

    #[test]
    fn h2_authority_must_agree_with_host_header() {
        let uri: Uri = "https://good.test/x".parse().unwrap();
        let a = request_authority(Version::HTTP_2, &uri, &HeaderMap::new()).unwrap();
        assert_eq!(a.host, name("good.test"));
        let r = request_authority(Version::HTTP_2, &uri, &headers(&[("host", "evil.test")]));
        assert_eq!(r.unwrap_err().reason, Reason::DomainFronting);
        // :authority absent, Host present: Host is used.
        let a = request_authority(Version::HTTP_2, &origin(), &headers(&[("host", "good.test")])).unwrap();
        assert_eq!(a.host, name("good.test"));
    }

    #[test]
    fn fronting_against_sni_and_dialed_name() {
        let a = Authority { host: name("evil.test"), port: None };
        assert_eq!(
            check_consistent(&a, Some(&name("good.test")), None, 443).unwrap_err().reason,
            Reason::DomainFronting
        );
        assert_eq!(
            check_consistent(&a, None, Some(&name("good.test")), 80).unwrap_err().reason,
            Reason::DomainFronting
        );
        // *.example.com style confusion: a suffix is not the same name.
        let a = Authority { host: name("evilexample.com"), port: None };
        assert!(check_consistent(&a, Some(&name("example.com")), None, 443).is_err());
        let ok = Authority { host: name("good.test"), port: Some(443) };
        assert!(check_consistent(&ok, Some(&name("good.test")), Some(&name("good.test")), 443).is_ok());
        let wrong_port = Authority { host: name("good.test"), port: Some(8443) };
        assert!(check_consistent(&wrong_port, Some(&name("good.test")), None, 443).is_err());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: &[&[(&str, &str)]] = &[
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            &[("content-length", "5"), ("content-length", "5")],
            &[("content-length", "5"), ("content-length", "6")],
            &[("content-length", "+5")],
            &[("content-length", "5, 5")],
            &[("transfer-encoding", "gzip, chunked")],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "identity")],
            &[("transfer-encoding", "xchunked")],
        ];
        for case in cases {
            let r = check_framing(&headers(case));
            assert_eq!(r.map_err(|e| e.reason), Err(Reason::RequestSmuggling), "{case:?}");
        }
    }

    #[test]
    fn plain_framing_passes() {
        assert!(check_framing(&headers(&[])).is_ok());
        assert!(check_framing(&headers(&[("content-length", "12")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "Chunked")])).is_ok());
    }

    #[test]
    fn upgrade_and_connect_are_recognised() {
        assert!(is_upgrade(Version::HTTP_11, &headers(&[("upgrade", "websocket"), ("connection", "upgrade")])));
        assert!(!is_upgrade(Version::HTTP_11, &headers(&[])));
        assert!(is_connect(&Method::CONNECT));
        assert!(!is_connect(&Method::GET));
    }
}
