//! Host names and allowlist patterns.
//!
//! Every place that compares a host (passport allowlists, TLS SNI, HTTP `Host`, DNS questions, host
//! policies) goes through [`DomainName::parse`], so that case, a trailing dot, IP literals and odd
//! characters are handled once and the same way. A comparison between two differently normalised
//! strings is how allowlists get bypassed.

use std::fmt;

/// Longest DNS name in presentation form without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Why a host name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("empty host name")]
    Empty,
    #[error("host name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("host name has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("label {0:?} is longer than 63 characters")]
    LabelTooLong(String),
    #[error("label {0:?} may only contain letters, digits and '-' and may not start or end with '-'")]
    BadLabel(String),
    #[error("{0:?} is an IP address literal; only host names are allowed here")]
    IpLiteral(String),
    #[error("wildcard must be a whole leftmost label followed by at least two labels, as in *.example.com")]
    BadWildcard,
}

/// A normalised host name: lowercase ASCII, no trailing dot, valid LDH labels, not an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// Parses and normalises a host name. One trailing dot is removed (`example.com.` is
    /// `example.com`); letters are lowercased. Non-ASCII input is refused: internationalised names
    /// must arrive in their `xn--` form, as they do on the wire.
    pub fn parse(input: &str) -> Result<DomainName, DomainError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(DomainError::Empty);
        }
        if trimmed.len() > MAX_NAME_LEN {
            return Err(DomainError::TooLong);
        }
        if is_ip_literal(trimmed) {
            return Err(DomainError::IpLiteral(trimmed.to_string()));
        }
        let lower = trimmed.to_ascii_lowercase();
        for label in lower.split('.') {
            check_label(label)?;
        }
        // A name whose last label is all digits reads as an address to many resolvers.
        if lower.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err(DomainError::IpLiteral(trimmed.to_string()));
        }
        Ok(DomainName(lower))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True for anything that parses as an IPv4 or IPv6 address, bracketed or not, and for the
/// shortened IPv4 forms (`127.1`, `0x7f.1`) that `inet_aton` accepts.
pub fn is_ip_literal(s: &str) -> bool {
    let s = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(s);
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    // inet_aton forms: up to four parts, each decimal, octal or 0x-hex. Counted as they come
    // (every name the proxy decides passes here: no list of the parts is allocated).
    let mut parts = 0;
    s.split('.').all(|p| {
        parts += 1;
        parts <= 4 && is_aton_number(p)
    })
}

fn is_aton_number(p: &str) -> bool {
    match p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
    }
}

fn check_label(label: &str) -> Result<(), DomainError> {
    if label.is_empty() {
        return Err(DomainError::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(DomainError::LabelTooLong(label.to_string()));
    }
    let bytes = label.as_bytes();
    let ldh = bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    if !ldh || bytes.first() == Some(&b'-') || bytes.last() == Some(&b'-') {
        return Err(DomainError::BadLabel(label.to_string()));
    }
    Ok(())
}

/// An allowlist entry: an exact name, or `*.suffix`, which matches names *below* the suffix on a
/// label boundary (`a.example.com`, `a.b.example.com`) but neither `example.com` itself nor
/// `evilexample.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(DomainName),
    Subdomains(DomainName),
}

impl DomainPattern {
    pub fn parse(input: &str) -> Result<DomainPattern, DomainError> {
        if let Some(rest) = input.strip_prefix("*.") {
            let suffix = DomainName::parse(rest)?;
            // `*.com` would allow a whole top-level domain: almost certainly a mistake.
            if !suffix.as_str().contains('.') {
                return Err(DomainError::BadWildcard);
            }
            return Ok(DomainPattern::Subdomains(suffix));
        }
        if input.contains('*') {
            return Err(DomainError::BadWildcard);
        }
        DomainName::parse(input).map(DomainPattern::Exact)
    }

    pub fn matches(&self, name: &DomainName) -> bool {
        match self {
            DomainPattern::Exact(n) => n == name,
            DomainPattern::Subdomains(suffix) => {
                let (n, s) = (name.as_str(), suffix.as_str());
                n.len() > s.len() + 1 && n.ends_with(s) && n.as_bytes().get(n.len() - s.len() - 1) == Some(&b'.')
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(n) => write!(f, "{n}"),
            DomainPattern::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn normalises_case_and_one_trailing_dot() {
        assert_eq!(name("API.Example.COM.").as_str(), "api.example.com");
        assert_eq!(DomainName::parse("example.com.."), Err(DomainError::EmptyLabel));
        assert_eq!(DomainName::parse("."), Err(DomainError::Empty));
    }

    #[test]
    fn refuses_ip_literals_in_every_spelling() {
        for s in ["127.0.0.1", "[::1]", "::ffff:1.2.3.4", "127.1", "0x7f.1", "2130706433", "1.2.3.4."] {
            assert!(matches!(DomainName::parse(s), Err(DomainError::IpLiteral(_))), "{s}");
        }
    }

    #[test]
    fn inet_aton_forms_have_at_most_four_numeric_parts() {
        for s in ["1", "1.2", "1.2.3", "0x1.0.0.1", "010.1.1.1"] {
            assert!(is_ip_literal(s), "{s}");
        }
        for s in ["1.2.3.4.5", "1.2.3.x", "0x.1", "1..2", "", "a.b"] {
            assert!(!is_ip_literal(s), "{s:?}");
        }
    }

    #[test]
    fn refuses_bad_labels() {
        for s in ["exa mple.com", "-a.com", "a-.com", "a_b.com", "ex\u{e4}mple.com", "a..b", ".a.com", "a.com\0"] {
            assert!(DomainName::parse(s).is_err(), "{s:?}");
        }
        assert!(DomainName::parse(&format!("{}.com", "a".repeat(64))).is_err());
        // 127 labels and 126 dots: exactly 253 characters once the trailing dot is gone.
        assert!(DomainName::parse(&"a.".repeat(127)).is_ok());
        assert_eq!(DomainName::parse(&"a.".repeat(128)), Err(DomainError::TooLong));
    }

    #[test]
    fn wildcard_matches_subdomains_on_a_dot_boundary_only() {
        let p = DomainPattern::parse("*.example.com").unwrap();
        assert!(p.matches(&name("a.example.com")));
        assert!(p.matches(&name("A.B.Example.com.")));
        assert!(!p.matches(&name("example.com")));
        assert!(!p.matches(&name("evilexample.com")));
        assert!(!p.matches(&name("example.com.evil.net")));
    }

    #[test]
    fn exact_pattern_matches_only_itself() {
        let p = DomainPattern::parse("Example.com.").unwrap();
        assert!(p.matches(&name("example.com")));
        assert!(!p.matches(&name("a.example.com")));
    }

    #[test]
    fn refuses_malformed_wildcards() {
        for s in ["*", "*.com", "a.*.com", "*example.com", "**.example.com", "*.*.example.com"] {
            assert!(DomainPattern::parse(s).is_err(), "{s}");
        }
    }
}
