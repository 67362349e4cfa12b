//! Host policy loading (`sluice_policy::PolicySet::from_texts`: strict TOML, services, routes,
//! costs, meters, deny lists, ceilings, CEL rules, raw-TCP rules) and route matching.
//!
//! The input is up to three policy files separated by `0xff`. Checks, beyond "never panics":
//! * an error list is never empty, and every error names one of the files, a line within it (or
//!   0) and a column exactly when it has a line;
//! * loading is deterministic: the same files give the same digest and summary;
//! * a loaded set answers `route`, `host_check`, `ceiling_check` and `raw_tcp` for every quoted
//!   host name in the files (and paths built from the input) without panicking, with fixed costs
//!   within the money bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::domain::DomainName;
use sluice_policy::{Cost, PolicySet};
use std::path::PathBuf;

/// The largest amount sluice represents (2^53 − 1 millicents).
const MAX_MILLICENTS: u64 = (1 << 53) - 1;

fuzz_target!(|data: &[u8]| {
    let files: Vec<(PathBuf, String)> = data
        .split(|b| *b == 0xff)
        .take(3)
        .enumerate()
        .map(|(i, text)| {
            (PathBuf::from(format!("/fuzz/policies/{i}.toml")), String::from_utf8_lossy(text).into_owned())
        })
        .collect();
    let set = match PolicySet::from_texts(&files) {
        Err(errors) => {
            assert!(!errors.is_empty(), "failed without an error");
            for e in &errors {
                let (_, text) =
                    files.iter().find(|(p, _)| *p == e.file).unwrap_or_else(|| panic!("error names no file: {e}"));
                assert!(e.line <= text.lines().count() + 1, "line {} past the end: {e}", e.line);
                assert_eq!(e.line == 0, e.column == 0, "{e}");
                assert!(!e.message.is_empty());
                assert!(e.to_string().starts_with(&e.file.display().to_string()));
            }
            return;
        }
        Ok(set) => set,
    };
    let again = PolicySet::from_texts(&files).expect("loads twice");
    assert_eq!(set.digest(), again.digest());
    assert_eq!(set.summary(), again.summary());

    let mut hosts: Vec<DomainName> = files
        .iter()
        .flat_map(|(_, t)| t.split('"').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|s| DomainName::parse(s.trim_start_matches("*.")).ok())
        .take(16)
        .collect();
    hosts.push(DomainName::parse("api.openai.com").expect("a name"));
    let paths = ["/", "/v1/chat/completions", "/v1/%63hat/completions?x=1", "//a/../b/./c", "http://h/x"];
    let lines: Vec<String> =
        files.iter().flat_map(|(_, t)| t.lines().map(str::to_string).take(4).collect::<Vec<_>>()).collect();
    for host in &hosts {
        for method in ["GET", "POST", "get", "CONNECT"] {
            for path in paths.iter().copied().chain(lines.iter().map(String::as_str)) {
                let m = set.route(host, method, path);
                if let Cost::Fixed(c) = m.cost {
                    assert!(c <= MAX_MILLICENTS, "route cost {c} over the bound");
                }
                assert!(!m.action.is_empty());
            }
        }
        let _ = set.host_check(host, 0);
        let _ = set.host_check(host, MAX_MILLICENTS);
        for port in [0, 22, 443, 65535] {
            if let Some(rule) = set.raw_tcp(Some(host), port) {
                assert_eq!(rule.port, port);
                assert!(rule.host.matches(host));
            }
        }
    }
    let _ = set.ceiling_check(u64::MAX);
    let _ = set.max_per_action_millicents();
});
