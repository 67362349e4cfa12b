//! Policy loading, errors with positions, lookups and reloads.

use super::*;
use proptest::prelude::*;
use sluice_passport::domain::DomainName;

fn name(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn set(files: &[(&str, &str)]) -> Result<PolicySet, Vec<PolicyError>> {
    let files: Vec<(PathBuf, String)> =
        files.iter().map(|(n, t)| (PathBuf::from(format!("/p/{n}")), t.to_string())).collect();
    PolicySet::from_texts(&files)
}

fn errors(text: &str) -> Vec<PolicyError> {
    match set(&[("t.toml", text)]) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

/// Exactly one error, at `line`, for `field`, with `needle` in the message.
#[track_caller]
fn one_error(text: &str, line: usize, field: &str, needle: &str) -> PolicyError {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
    assert!(e.message.contains(needle), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    e
}

const SVC: &str = "[service]\nname = \"svc\"\ndomains = [\"api.example.com\"]\n";

fn with_route(route: &str) -> String {
    format!("{SVC}[[route]]\nmethod = \"GET\"\npath = \"/ok\"\naction = \"a:b\"\ncost_cents = 0\n[[route]]\n{route}")
}

const GOOD_ROUTE_LINE: usize = 10; // first line after the second [[route]] in `with_route`

// ---- Errors: one test per kind, each pinned to its line -----------------------------------------

#[test]
fn syntax_error_has_line_and_column() {
    let e = one_error("[service]\nname = \"x\"\ndomains = [\"a.com\" \"b.com\"]\n", 3, "service.domains", "");
    assert_eq!(e.kind, PolicyErrorKind::Syntax);
    assert!(e.column > 0);
    assert!(e.to_string().starts_with("/p/t.toml:3:"), "{e}");
}

#[test]
fn unknown_keys_are_errors_with_their_field() {
    let e = one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cent = 1\n"),
        13,
        "route[1].cost_cent",
        "cost_cent",
    );
    assert_eq!(e.kind, PolicyErrorKind::Syntax);
    one_error("[servce]\nname = \"x\"\n", 1, "servce", "servce");
    one_error(&format!("{SVC}[host]\ndeny = []\n"), 5, "host.deny", "deny");
    one_error(
        &format!("{SVC}[[route]]\nmethod = \"POST\"\npath = \"/x\"\naction = \"a:b\"\n[route.meter]\nkind = \"openai\"\ndefault_max_tokens = 1\nprice = 3\n"),
        11,
        "route[0].meter.price",
        "price",
    );
}

#[test]
fn missing_and_mistyped_fields() {
    let e = one_error(&with_route("method = \"GET\"\naction = \"a:b\"\ncost_cents = 1\n"), 9, "route[1]", "path");
    assert_eq!(e.kind, PolicyErrorKind::Syntax);
    one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = \"5\"\n"),
        13,
        "route[1].cost_cents",
        "",
    );
    // A fraction of a cent is a cost (0.005 cents = 5 millicents); below a millicent is not.
    one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = 1.0005\n"),
        13,
        "route[1].cost_cents",
        "the smallest amount is 0.001 cent",
    );
    one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = nan\n"),
        13,
        "route[1].cost_cents",
        "not a number of cents",
    );
    one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = -0.5\n"),
        13,
        "route[1].cost_cents",
        "negative",
    );
    one_error(
        &with_route("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = 1e14\n"),
        13,
        "route[1].cost_cents",
        "more than the largest amount",
    );
}

#[test]
fn fixed_costs_may_have_a_fraction_of_a_cent() {
    let cost = |v: &str| {
        let text = with_route(&format!("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = {v}\n"));
        let s = set(&[("t.toml", &text)]).unwrap_or_else(|e| panic!("{v}: {e:?}"));
        s.route(&name("api.example.com"), "GET", "/x").cost
    };
    assert_eq!(cost("0.005"), Cost::Fixed(5));
    assert_eq!(cost("2.5"), Cost::Fixed(2_500));
    assert_eq!(cost("1_000"), Cost::Fixed(1_000_000));
    assert_eq!(cost("0.1"), Cost::Fixed(100));
    assert_eq!(cost("5e-3"), Cost::Fixed(5));
    assert_eq!(cost("7"), Cost::Fixed(7_000));
    // The same for raw TCP rules and ceilings.
    let raw = "[[raw_tcp]]\nhost = \"db.example.com\"\nport = 5432\naction = \"tcp:db\"\ncost_cents = 0.25\n";
    let host = "[host]\n[host.ceilings]\nmax_per_action_cents = 0.75 # three quarters of a cent\n";
    let s = set(&[("h.toml", raw), ("host.toml", host)]).unwrap();
    assert_eq!(s.raw_tcp(Some(&name("db.example.com")), 5432).map(|r| r.cost_millicents), Some(250));
    assert_eq!(s.max_per_action_millicents(), Some(750));
    assert_eq!(s.host_check(&name("db.example.com"), 750), HostVerdict::Allow);
    let HostVerdict::Deny { detail, .. } = s.host_check(&name("db.example.com"), 751) else { panic!() };
    assert!(detail.contains("costs $0.00751, above the host-wide ceiling of $0.0075"), "{detail}");
}

#[test]
fn bad_domains() {
    let e = one_error(
        "[service]\nname = \"s\"\ndomains = [\"ok.com\",\n  \"bad host.com\"]\n",
        4,
        "service.domains[1]",
        "bad host",
    );
    assert_eq!(e.kind, PolicyErrorKind::Invalid);
    assert_eq!(e.column, 3);
    one_error("[service]\nname = \"s\"\ndomains = [\"*.com\"]\n", 3, "service.domains[0]", "wildcard");
    one_error("[service]\nname = \"s\"\ndomains = [\"10.0.0.1\"]\n", 3, "service.domains[0]", "IP address");
    one_error("[service]\nname = \"s\"\ndomains = []\n", 3, "service.domains", "at least one");
    one_error("[service]\nname = \"S!\"\ndomains = [\"a.com\"]\n", 2, "service.name", "a-z");
}

#[test]
fn bad_route_values() {
    let r = |m: &str, p: &str, a: &str| {
        with_route(&format!("method = \"{m}\"\npath = \"{p}\"\naction = \"{a}\"\ncost_cents = 1\n"))
    };
    one_error(&r("FETCH", "/x", "a:b"), GOOD_ROUTE_LINE, "route[1].method", "unknown method");
    one_error(&r("get", "/x", "a:b"), GOOD_ROUTE_LINE, "route[1].method", "uppercase");
    one_error(&r("CONNECT", "/x", "a:b"), GOOD_ROUTE_LINE, "route[1].method", "unknown method");
    one_error(&r("GET", "x", "a:b"), GOOD_ROUTE_LINE + 1, "route[1].path", "start with '/'");
    one_error(&r("GET", "/a/*/b", "a:b"), GOOD_ROUTE_LINE + 1, "route[1].path", "last segment");
    one_error(&r("GET", "/a/{ID}", "a:b"), GOOD_ROUTE_LINE + 1, "route[1].path", "capture");
    one_error(&r("GET", "/a/", "a:b"), GOOD_ROUTE_LINE + 1, "route[1].path", "ends in '/'");
    one_error(&r("GET", "/x", "llm:*"), GOOD_ROUTE_LINE + 2, "route[1].action", "segments");
    one_error(&r("GET", "/x", "LLM:chat"), GOOD_ROUTE_LINE + 2, "route[1].action", "segments");
    one_error(&r("GET", "/x", ""), GOOD_ROUTE_LINE + 2, "route[1].action", "segments");
    one_error(
        &with_route("id = \"Bad Id\"\nmethod = \"GET\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = 1\n"),
        GOOD_ROUTE_LINE,
        "route[1].id",
        "a-z",
    );
}

#[test]
fn bad_costs() {
    let c = |cost: &str| with_route(&format!("method = \"GET\"\npath = \"/x\"\naction = \"a:b\"\n{cost}"));
    one_error(&c("cost_cents = -1\n"), 13, "route[1].cost_cents", "from 0");
    one_error(&c("cost_cents = 99999999999999999\n"), 13, "route[1].cost_cents", "from 0");
    one_error(&c(""), 11, "route[1].cost_cents", "set cost_cents");
    let both = format!(
        "{SVC}[[route]]\nmethod = \"POST\"\npath = \"/x\"\naction = \"a:b\"\ncost_cents = 1\n[route.meter]\nkind = \"openai\"\ndefault_max_tokens = 1\n{PRICES}"
    );
    one_error(&both, 8, "route[0].cost_cents", "not both");
}

const PRICES: &str = "[prices]\nas_of = \"2025-06-01\"\n[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = 1\noutput_cents_per_mtok = 2\n";

fn metered(meter: &str, prices: &str) -> String {
    format!("{SVC}[[route]]\nmethod = \"POST\"\npath = \"/x\"\naction = \"a:b\"\n[route.meter]\n{meter}{prices}")
}

#[test]
fn bad_meters_and_prices() {
    one_error(&metered("kind = \"openai\"\ndefault_max_tokens = 10\n", ""), 8, "route[0].meter", "[prices]");
    one_error(&metered("kind = \"gemini\"\ndefault_max_tokens = 10\n", PRICES), 9, "route[0].meter.kind", "anthropic");
    one_error(
        &metered("kind = \"openai\"\ndefault_max_tokens = 0\n", PRICES),
        10,
        "route[0].meter.default_max_tokens",
        "from 1",
    );
    let ok_meter = "kind = \"openai\"\ndefault_max_tokens = 10\n";
    let p = |body: &str| metered(ok_meter, &format!("[prices]\n{body}"));
    let model = "[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = 1\noutput_cents_per_mtok = 2\n";
    one_error(&p(&format!("as_of = \"June 2025\"\n{model}")), 12, "prices.as_of", "YYYY-MM-DD");
    one_error(&p(&format!("as_of = \"2025-02-30\"\n{model}")), 12, "prices.as_of", "YYYY-MM-DD");
    one_error(&p("as_of = \"2025-06-01\"\n"), 11, "prices.model", "at least one");
    one_error(
        &p("as_of = \"2025-06-01\"\n[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = -1\noutput_cents_per_mtok = 2\n"),
        15,
        "prices.model[0].input_cents_per_mtok",
        "three decimals",
    );
    one_error(
        &p("as_of = \"2025-06-01\"\n[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = 1\noutput_cents_per_mtok = 0.0001\n"),
        16,
        "prices.model[0].output_cents_per_mtok",
        "three decimals",
    );
    one_error(
        &p(&format!("as_of = \"2025-06-01\"\nunknown_model = \"nope\"\n{model}")),
        13,
        "prices.unknown_model",
        "not the name",
    );
    one_error(
        &p(&format!("as_of = \"2025-06-01\"\n{model}{}", model.replace("\"m\"", "\"M\""))),
        18,
        "prices.model[1].name",
        "already priced",
    );
    one_error(
        &p(&model
            .replace("[[prices.model]]\n", "")
            .replace("name", "as_of = \"2025-06-01\"\n[[prices.model]]\nname")
            .replace("\"m\"", "\"m m\"")),
        14,
        "prices.model[0].name",
        "must be",
    );
    // Decimals are exact, read from the text (never a float): 7.5 cents is 7500 millicents.
    let price = |v: &str| {
        let text = p(&model.replace("= 1\n", &format!("= {v}\n")).replace("[[", "as_of = \"2025-06-01\"\n[["));
        let s = set(&[("t.toml", &text)]).unwrap_or_else(|e| panic!("{v}: {e:?}"));
        let Cost::Metered(m) = s.route(&name("api.example.com"), "POST", "/x").cost else { panic!() };
        m.prices.models[0].input_millicents_per_mtok
    };
    assert_eq!(price("7.5"), 7_500);
    assert_eq!(price("2.5"), 2_500);
    assert_eq!(price("0.001"), 1);
    assert_eq!(price("0.1"), 100);
    assert_eq!(price("0.3"), 300);
    assert_eq!(price("1_500.125"), 1_500_125);
    assert_eq!(price("1.5e2"), 150_000);
    assert_eq!(price("+15"), 15_000);
    assert_eq!(price("10000000"), 10_000_000_000);
    assert_eq!(price("0.0"), 0);
    one_error(
        &p("as_of = \"2025-06-01\"\n[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = 10000000.001\noutput_cents_per_mtok = 2\n"),
        15,
        "prices.model[0].input_cents_per_mtok",
        "from 0 to 10000000 cents per million tokens",
    );
    one_error(
        &p("as_of = \"2025-06-01\"\n[[prices.model]]\nname = \"m\"\ninput_cents_per_mtok = inf\noutput_cents_per_mtok = 2\n"),
        15,
        "prices.model[0].input_cents_per_mtok",
        "not a number of cents",
    );
    // Inline tables and arrays of them give the same spans.
    let inline = format!(
        "{SVC}[[route]]\nmethod = \"POST\"\npath = \"/x\"\naction = \"a:b\"\nmeter = {{ kind = \"openai\", default_max_tokens = 10 }}\n\
         [prices]\nas_of = \"2025-06-01\"\nmodel = [{{ name = \"m\", input_cents_per_mtok = 2.5, output_cents_per_mtok = 0.075 }}]\n"
    );
    let s = set(&[("t.toml", &inline)]).unwrap();
    let Cost::Metered(m) = s.route(&name("api.example.com"), "POST", "/x").cost else { panic!() };
    assert_eq!(
        (m.prices.models[0].input_millicents_per_mtok, m.prices.models[0].output_millicents_per_mtok),
        (2_500, 75)
    );
}

#[test]
fn tables_without_a_service() {
    // Table errors point at the table's header.
    one_error(
        "\n[[route]]\nmethod = \"GET\"\npath = \"/\"\naction = \"a:b\"\ncost_cents = 0\n",
        2,
        "route[0]",
        "[service]",
    );
    one_error(PRICES, 1, "prices", "[service]");
}

#[test]
fn duplicate_and_shadowed_routes() {
    let route =
        |m: &str, p: &str| format!("[[route]]\nmethod = \"{m}\"\npath = \"{p}\"\naction = \"a:b\"\ncost_cents = 0\n");
    let text = format!("{SVC}{}{}", route("POST", "/v1/x"), route("POST", "/v1/x"));
    let e = one_error(&text, 11, "route[1].path", "duplicate of route[0] (line 6)");
    assert_eq!(e.kind, PolicyErrorKind::Conflict);
    let text = format!("{SVC}{}{}", route("*", "/v1/*"), route("POST", "/v1/models/{id}"));
    one_error(&text, 11, "route[1].path", "can never match: route[0] (line 6, * /v1/*)");
    let text = format!("{SVC}{}{}", route("GET", "/v1/{x}"), route("GET", "/V1/models"));
    one_error(&text, 11, "route[1].path", "can never match");
    // Specific first, general after: fine. Different methods: fine.
    let text = format!("{SVC}{}{}{}", route("POST", "/v1/models"), route("*", "/v1/*"), route("GET", "/v2"));
    assert!(set(&[("t.toml", &text)]).is_ok());
    let text = format!("{SVC}{}{}", route("GET", "/v1/x"), route("POST", "/v1/x"));
    assert!(set(&[("t.toml", &text)]).is_ok());
    // Duplicate ids.
    let text = format!(
        "{SVC}{}{}",
        route("GET", "/a").replace("[[route]]\n", "[[route]]\nid = \"r\"\n"),
        route("GET", "/b").replace("[[route]]\n", "[[route]]\nid = \"r\"\n")
    );
    one_error(&text, 11, "route[1].id", "already used");
}

#[test]
fn host_table_errors() {
    one_error("[host]\ndeny_domains = [\"ok.com\", \"b@d.com\"]\n", 2, "host.deny_domains[1]", "b@d");
    one_error("[host]\ndeny_domains = [\"ok.com\", \"OK.com.\"]\n", 2, "host.deny_domains[1]", "already listed");
    one_error(
        "[host]\n[host.ceilings]\nmax_per_action_cents = -5\n",
        3,
        "host.ceilings.max_per_action_cents",
        "from 0",
    );
    let rule = |e: &str, d: &str, r: &str| {
        format!("[host]\n[[host.rule]]\nexpr = \"{e}\"\ndecision = \"{d}\"\nreason = \"{r}\"\n")
    };
    one_error(&rule(" ", "block", "x"), 3, "host.rule[0].expr", "CEL expression");
    one_error(&rule("true", "allow", "x"), 4, "host.rule[0].decision", "request_hold");
    one_error(&rule("true", "block", "Bad Reason"), 5, "host.rule[0].reason", "a-z");
}

/// Found by fuzzing (`fuzz/corpus/policy_toml/rule-does-not-compile`): a host rule that does not
/// compile was reported at column 0 (`FILE:24:0:`), which no editor can go to.
#[test]
fn a_host_rule_that_does_not_compile_points_at_its_expression() {
    let text = "[host]\n[[host.rule]]\nexpr    = \"cost_cents(> 100\"\ndecision = \"block\"\nreason = \"x\"\n";
    let errors = PolicySet::from_texts(&[(PathBuf::from("/p/host.toml"), text.to_string())]).unwrap_err();
    let [e] = errors.as_slice() else { panic!("{errors:?}") };
    assert_eq!(
        (e.kind, e.line, e.column, e.field.as_str()),
        (PolicyErrorKind::Invalid, 3, 11, "host.rule.expr"),
        "{e}"
    );
    assert!(e.to_string().starts_with("/p/host.toml:3:11: host.rule.expr: does not compile: "), "{e}");
}

#[test]
fn raw_tcp_errors() {
    let r = |h: &str, p: &str| format!("[[raw_tcp]]\nhost = \"{h}\"\nport = {p}\naction = \"tcp:x\"\ncost_cents = 0\n");
    one_error(&r("db.example.com", "443"), 3, "raw_tcp[0].port", "inspected as HTTP");
    one_error(&r("db.example.com", "80"), 3, "raw_tcp[0].port", "inspected as HTTP");
    one_error(&r("db.example.com", "0"), 3, "raw_tcp[0].port", "1 to 65535");
    one_error(&r("db.example.com", "70000"), 3, "raw_tcp[0].port", "1 to 65535");
    one_error(&r("127.0.0.1", "5432"), 2, "raw_tcp[0].host", "IP address");
    one_error(&r("*", "5432"), 2, "raw_tcp[0].host", "wildcard");
    let e = one_error(
        &format!("{}{}", r("db.example.com", "5432"), r("DB.example.com.", "5432")),
        7,
        "raw_tcp[1].host",
        "already has a raw_tcp rule at /p/t.toml:2",
    );
    assert_eq!(e.kind, PolicyErrorKind::Conflict);
}

#[test]
fn conflicts_across_files_name_both_files() {
    let a = "[service]\nname = \"a\"\ndomains = [\"x.com\", \"*.shared.com\"]\n";
    let b = "[service]\nname = \"b\"\n\ndomains = [\"*.shared.com\"]\n";
    let errs = set(&[("a.toml", a), ("b.toml", b)]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!((e.file.as_path(), e.line, e.field.as_str()), (Path::new("/p/b.toml"), 4, "service.domains[0]"));
    assert!(e.message.contains("service \"a\" at /p/a.toml:3"), "{e}");
    let errs =
        set(&[("a.toml", a), ("b.toml", &a.replace("x.com", "y.com").replace("*.shared.com", "z.com"))]).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].message.contains("service \"a\" is already defined at /p/a.toml:2"), "{}", errs[0]);
    let raw = "[[raw_tcp]]\nhost = \"db.x.com\"\nport = 5432\naction = \"tcp:pg\"\ncost_cents = 0\n";
    let errs = set(&[("a.toml", raw), ("c.toml", raw)]).unwrap_err();
    assert!(errs[0].message.contains("/p/a.toml:2") && errs[0].file == Path::new("/p/c.toml"), "{}", errs[0]);
}

#[test]
fn every_error_of_every_file_is_reported() {
    let bad_semantics = format!(
        "{}{}{}",
        "[service]\nname = \"s\"\ndomains = [\"ok.com\", \"bad_host.com\"]\n",
        "[[route]]\nmethod = \"FETCH\"\npath = \"nope\"\naction = \"A\"\ncost_cents = -1\n",
        "[[raw_tcp]]\nhost = \"db.ok.com\"\nport = 443\naction = \"tcp:x\"\ncost_cents = 0\n",
    );
    let bad_syntax = "[service\n";
    let errs =
        set(&[("a.toml", &bad_semantics), ("b.toml", bad_syntax), ("c.toml", "[host]\ndeny_domains = [\"*\"]\n")])
            .unwrap_err();
    let got: Vec<(String, usize, String)> = errs
        .iter()
        .map(|e| (e.file.file_name().unwrap().to_string_lossy().into_owned(), e.line, e.field.clone()))
        .collect();
    let want = [
        ("a.toml", 3, "service.domains[1]"),
        ("a.toml", 5, "route[0].method"),
        ("a.toml", 6, "route[0].path"),
        ("a.toml", 7, "route[0].action"),
        ("a.toml", 8, "route[0].cost_cents"),
        ("a.toml", 11, "raw_tcp[0].port"),
        ("b.toml", 1, "service"),
        ("c.toml", 2, "host.deny_domains[0]"),
    ];
    let want: Vec<(String, usize, String)> = want.iter().map(|(f, l, p)| (f.to_string(), *l, p.to_string())).collect();
    assert_eq!(got, want, "{errs:#?}");
}

// ---- The shipped policies ------------------------------------------------------------------------

#[test]
fn shipped_policies_load() {
    let s = PolicySet::load_dir(&shipped_dir()).unwrap_or_else(|e| panic!("{e:#?}"));
    let sum = s.summary();
    assert_eq!(sum.files, 2, "host.toml.example and README.md are not loaded");
    let names: Vec<&str> = sum.services.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["anthropic", "openai"]);
    assert!(sum.digest.starts_with("sha256:") && sum.digest.len() == 7 + 64);
}

#[test]
fn shipped_host_example_is_valid() {
    let text = std::fs::read_to_string(shipped_dir().join("host.toml.example")).unwrap();
    let s = set(&[("host.toml", &text)]).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(s.host_rules().len(), 2);
    assert_eq!(s.max_per_action_millicents(), Some(500_000));
    assert!(matches!(s.host_check(&name("x.pastebin.com"), 0), HostVerdict::Deny { .. }));
    assert!(s.raw_tcp(Some(&name("db.internal.example")), 5432).is_some());
}

fn meter_of(m: &RouteMatch) -> (MeterKind, u64) {
    match &m.cost {
        Cost::Metered(spec) => (spec.kind, spec.default_max_tokens),
        Cost::Fixed(c) => panic!("expected a metered cost, got {c} fixed ({:?})", m.route_id),
    }
}

#[test]
fn shipped_openai_routes() {
    let s = PolicySet::load_dir(&shipped_dir()).unwrap();
    let host = name("api.openai.com");
    let golden: &[(&str, &str, &str, &str, Option<u64>)] = &[
        // method, path, route id, action, fixed cost (None = metered)
        ("POST", "/v1/chat/completions", "openai/chat-completions", "llm:chat", None),
        ("GET", "/v1/chat/completions/chatcmpl-1/messages", "openai/chat-completions-read", "llm:chat:read", Some(0)),
        ("POST", "/v1/responses", "openai/responses", "llm:chat", None),
        ("POST", "/v1/responses/resp_1/cancel", "openai/responses-cancel", "llm:chat:cancel", Some(0)),
        ("GET", "/v1/responses/resp_1", "openai/responses-read", "llm:chat:read", Some(0)),
        ("GET", "/v1/responses/resp_1/input_items", "openai/responses-read", "llm:chat:read", Some(0)),
        ("DELETE", "/v1/responses/resp_1", "openai/responses-delete", "llm:chat:delete", Some(0)),
        ("POST", "/v1/completions", "openai/completions", "llm:complete", None),
        ("POST", "/v1/embeddings", "openai/embeddings", "llm:embed", None),
        ("GET", "/v1/models", "openai/models-list", "llm:models", Some(0)),
        ("GET", "/v1/models/gpt-4o", "openai/models-get", "llm:models", Some(0)),
        ("POST", "/v1/moderations", "openai/moderations", "llm:moderate", Some(0)),
        ("POST", "/v1/images/generations", "openai/images", "llm:image", Some(25)),
        ("POST", "/v1/audio/speech", "openai/audio", "llm:audio", Some(10)),
        ("POST", "/v1/files", "openai/other", "llm:other", Some(0)),
        ("POST", "/v1/fine_tuning/jobs", "openai/other", "llm:other", Some(0)),
        ("DELETE", "/v1/models/ft:gpt-4o:org::x", "openai/other", "llm:other", Some(0)),
        ("GET", "/", "openai/other", "llm:other", Some(0)),
        // Spellings that must not dodge the metered route.
        ("post", "/v1/chat/completions?x=1", "openai/chat-completions", "llm:chat", None),
        ("POST", "//v1/chat/%63ompletions/", "openai/chat-completions", "llm:chat", None),
        ("POST", "/v1/embeddings/../chat/completions", "openai/chat-completions", "llm:chat", None),
    ];
    for &(method, path, id, action, fixed) in golden {
        let m = s.route(&host, method, path);
        assert_eq!(m.service.as_deref(), Some("openai"), "{method} {path}");
        assert_eq!(m.route_id.as_deref(), Some(id), "{method} {path}");
        assert_eq!(&*m.action, action, "{method} {path}");
        match fixed {
            Some(c) => assert_eq!(m.cost, Cost::Fixed(c * 1000), "{method} {path}"),
            None => assert_eq!(meter_of(&m).0, MeterKind::OpenAi, "{method} {path}"),
        }
    }
    // Prices come through: gpt-4o-mini for 1M in + 1M out = 15 + 60 cents (in millicents).
    let m = s.route(&host, "POST", "/v1/chat/completions");
    let Cost::Metered(spec) = &m.cost else { panic!() };
    let u =
        TokenUsage { input_tokens: 1_000_000, output_tokens: 1_000_000, model: Some("gpt-4o-mini-2024-07-18".into()) };
    assert_eq!(meter::cost(spec, &u), 75_000);
    assert_eq!(spec.prices.as_of, "2026-12-01");
}

#[test]
fn shipped_anthropic_routes() {
    let s = PolicySet::load_dir(&shipped_dir()).unwrap();
    let host = name("API.Anthropic.com.");
    let golden: &[(&str, &str, &str, &str, Option<u64>)] = &[
        ("POST", "/v1/messages", "anthropic/messages", "llm:chat", None),
        ("POST", "/v1/messages/count_tokens", "anthropic/count-tokens", "llm:count_tokens", Some(0)),
        ("POST", "/v1/messages/batches", "anthropic/batches", "llm:batch", Some(0)),
        ("GET", "/v1/messages/batches/msgbatch_1/results", "anthropic/batches", "llm:batch", Some(0)),
        ("GET", "/v1/models", "anthropic/models-list", "llm:models", Some(0)),
        ("GET", "/v1/models/claude-sonnet-4-5", "anthropic/models-get", "llm:models", Some(0)),
        ("POST", "/v1/files", "anthropic/other", "llm:other", Some(0)),
        ("GET", "/v1/messages", "anthropic/other", "llm:other", Some(0)),
    ];
    for &(method, path, id, action, fixed) in golden {
        let m = s.route(&host, method, path);
        assert_eq!(m.service.as_deref(), Some("anthropic"), "{method} {path}");
        assert_eq!(m.route_id.as_deref(), Some(id), "{method} {path}");
        assert_eq!(&*m.action, action, "{method} {path}");
        match fixed {
            Some(c) => assert_eq!(m.cost, Cost::Fixed(c * 1000), "{method} {path}"),
            None => assert_eq!(meter_of(&m), (MeterKind::Anthropic, 4096), "{method} {path}"),
        }
    }
    let m = s.route(&host, "POST", "/v1/messages");
    let Cost::Metered(spec) = &m.cost else { panic!() };
    let u = TokenUsage {
        input_tokens: 1_000_000,
        output_tokens: 1_000_000,
        model: Some("claude-sonnet-4-6-20260217".into()),
    };
    assert_eq!(meter::cost(spec, &u), 1_800_000);
    // An unlisted model costs the table's highest prices (Fable 5.1, Fable 5 and Mythos: $10 in).
    let u = TokenUsage { input_tokens: 1_000_000, output_tokens: 0, model: Some("claude-next".into()) };
    assert_eq!(meter::cost(spec, &u), 1_000_000);
    // Estimate from the request's max_tokens: 1000 output tokens of Haiku 4.5 = 0.5 cents, plus
    // 25 input tokens (99 bytes) at 100 cents per million = 0.0025 cent: 502.5 → 503 millicents.
    let body =
        br#"{"model":"claude-haiku-4-5-20251001","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(meter::estimate(spec, body), 503);
}

// ---- Lookups ---------------------------------------------------------------------------------------

const TWO_SERVICES: &str = "[service]\nname = \"wild\"\ndomains = [\"*.example.com\"]\n\
    [[route]]\nmethod = \"GET\"\npath = \"/w\"\naction = \"w:get\"\ncost_cents = 3\n";
const EXACT: &str = "[service]\nname = \"exact\"\ndomains = [\"api.example.com\", \"*.deep.example.com\"]\n\
    [[route]]\nmethod = \"*\"\npath = \"/e/{x}\"\naction = \"e:any\"\ncost_cents = 4\n";

#[test]
fn hosts_match_on_dot_boundaries_whatever_their_spelling() {
    let s = set(&[("a.toml", TWO_SERVICES), ("b.toml", EXACT)]).unwrap();
    let svc = |h: &str| s.route(&name(h), "GET", "/").service.map(|s| s.to_string());
    assert_eq!(svc("a.example.com").as_deref(), Some("wild"));
    assert_eq!(svc("A.B.EXAMPLE.COM.").as_deref(), Some("wild"));
    assert_eq!(svc("api.example.com").as_deref(), Some("exact"), "exact beats wildcard");
    assert_eq!(svc("API.Example.Com.").as_deref(), Some("exact"));
    assert_eq!(svc("x.deep.example.com").as_deref(), Some("exact"), "longest wildcard wins");
    assert_eq!(svc("deep.example.com").as_deref(), Some("wild"));
    assert_eq!(svc("example.com"), None, "*.example.com does not match example.com");
    assert_eq!(svc("evilexample.com"), None);
    assert_eq!(svc("example.com.evil.net"), None);
    assert_eq!(svc("aexample.com"), None);
}

#[test]
fn unmatched_requests_are_web_fetch_or_send_at_cost_zero() {
    let s = set(&[("a.toml", TWO_SERVICES)]).unwrap();
    for (host, service) in [("other.net", None), ("a.example.com", Some("wild"))] {
        for (method, action) in [
            ("GET", FETCH_ACTION),
            ("HEAD", FETCH_ACTION),
            ("OPTIONS", FETCH_ACTION),
            ("get", FETCH_ACTION),
            ("POST", SEND_ACTION),
            ("PUT", SEND_ACTION),
            ("DELETE", SEND_ACTION),
            ("PATCH", SEND_ACTION),
            ("BREW", SEND_ACTION),
        ] {
            let m = s.route(&name(host), method, "/unrouted");
            assert_eq!(&*m.action, action, "{host} {method}");
            assert_eq!(m.cost, Cost::Fixed(0));
            assert_eq!(m.route_id, None);
            assert_eq!(m.service.as_deref(), service);
        }
    }
    // A matched route: the route's action and cost.
    let m = s.route(&name("a.example.com"), "GET", "/w");
    assert_eq!((&*m.action, m.cost, m.route_id.as_deref()), ("w:get", Cost::Fixed(3_000), Some("wild/route[0]")));
    // A request-target with no path (`*`) matches no route.
    assert_eq!(&*s.route(&name("a.example.com"), "OPTIONS", "*").action, FETCH_ACTION);
    // An empty policy routes nothing.
    let e = PolicySet::empty();
    assert_eq!(&*e.route(&name("api.openai.com"), "POST", "/v1/chat/completions").action, SEND_ACTION);
}

#[test]
fn host_check_denies_domains_and_ceilings_naming_the_rule() {
    let host =
        "[host]\ndeny_domains = [\"*.pastebin.com\", \"bad.net\"]\n[host.ceilings]\nmax_per_action_cents = 500\n";
    let tighter = "[host.ceilings]\nmax_per_action_cents = 300\n".replace("[host.ceilings]", "[host]\n[host.ceilings]");
    let s = set(&[("host.toml", host), ("z.toml", &tighter)]).unwrap();
    assert_eq!(s.host_check(&name("api.openai.com"), 300_000), HostVerdict::Allow);
    assert_eq!(s.host_check(&name("pastebin.com"), 0), HostVerdict::Allow, "*.x does not deny x");
    let HostVerdict::Deny { reason, detail } = s.host_check(&name("X.Pastebin.com."), 0) else { panic!() };
    assert_eq!(reason, POLICY_DENIED);
    assert!(
        detail.contains("/p/host.toml:2") && detail.contains("*.pastebin.com") && detail.contains("x.pastebin.com"),
        "{detail}"
    );
    assert!(matches!(s.host_check(&name("bad.net"), 0), HostVerdict::Deny { .. }));
    assert!(matches!(s.host_check(&name("evilbad.net"), 0), HostVerdict::Allow));
    let HostVerdict::Deny { reason, detail } = s.host_check(&name("ok.com"), 300_001) else { panic!() };
    assert_eq!(reason, POLICY_DENIED);
    assert!(detail.contains("$3.00001") && detail.contains("$3.00") && detail.contains("/p/z.toml:3"), "{detail}");
    assert_eq!(s.max_per_action_millicents(), Some(300_000));
}

#[test]
fn raw_tcp_picks_the_most_specific_rule() {
    let r = |h: &str, a: &str| format!("[[raw_tcp]]\nhost = \"{h}\"\nport = 5432\naction = \"{a}\"\ncost_cents = 1\n");
    let text = format!(
        "{}{}{}",
        r("*.example.com", "tcp:wide"),
        r("*.db.example.com", "tcp:db"),
        r("main.db.example.com", "tcp:main")
    );
    let s = set(&[("h.toml", &text)]).unwrap();
    let act = |h: &str, p: u16| s.raw_tcp(Some(&name(h)), p).map(|r| r.action.to_string());
    assert_eq!(act("main.db.example.com", 5432).as_deref(), Some("tcp:main"));
    assert_eq!(act("MAIN.db.example.com.", 5432).as_deref(), Some("tcp:main"));
    assert_eq!(act("x.db.example.com", 5432).as_deref(), Some("tcp:db"));
    assert_eq!(act("x.example.com", 5432).as_deref(), Some("tcp:wide"));
    assert_eq!(act("example.com", 5432), None);
    assert_eq!(act("x.example.com", 5433), None);
    assert_eq!(s.raw_tcp(None, 5432), None, "a bare-IP connection matches nothing");
    let rule = s.raw_tcp(Some(&name("main.db.example.com")), 5432).unwrap();
    assert_eq!((rule.cost_millicents, rule.line, rule.file.as_path()), (1_000, 12, Path::new("/p/h.toml")));
}

// ---- Directory, digest, reload --------------------------------------------------------------------

#[test]
fn missing_directory_is_an_empty_set() {
    let tmp = tempfile::tempdir().unwrap();
    let s = PolicySet::load_dir(&tmp.path().join("absent")).unwrap();
    assert_eq!(s.summary().files, 0);
    assert_eq!(s.digest(), PolicySet::empty().digest());
    // SHA-256 of nothing.
    assert_eq!(s.digest(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

#[test]
fn only_visible_toml_files_are_read_and_the_digest_tracks_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("a.toml"), TWO_SERVICES).unwrap();
    std::fs::write(d.join("README.md"), "not toml").unwrap();
    std::fs::write(d.join("host.toml.example"), "[[[ broken").unwrap();
    std::fs::write(d.join(".#a.toml"), "[[[ editor lock file").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/x.toml"), "[[[ not read").unwrap();
    let s1 = PolicySet::load_dir(d).unwrap();
    assert_eq!(s1.summary().files, 1);
    // Same content elsewhere: same digest. Equal to from_texts with the same name.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("a.toml"), TWO_SERVICES).unwrap();
    assert_eq!(PolicySet::load_dir(other.path()).unwrap().digest(), s1.digest());
    assert_eq!(set(&[("a.toml", TWO_SERVICES)]).unwrap().digest(), s1.digest());
    // Renaming or editing changes it; an ignored file does not.
    assert_ne!(set(&[("b.toml", TWO_SERVICES)]).unwrap().digest(), s1.digest());
    std::fs::write(d.join("README.md"), "changed").unwrap();
    assert_eq!(PolicySet::load_dir(d).unwrap().digest(), s1.digest());
    std::fs::write(d.join("a.toml"), format!("{TWO_SERVICES}# comment\n")).unwrap();
    assert_ne!(PolicySet::load_dir(d).unwrap().digest(), s1.digest());
    // A directory named like a policy file is an error, not silently skipped.
    std::fs::create_dir(d.join("dir.toml")).unwrap();
    let errs = PolicySet::load_dir(d).unwrap_err();
    assert!(errs[0].to_string().contains("dir.toml") && errs[0].message.contains("not a regular file"), "{errs:?}");
}

#[test]
fn unreadable_files_are_reported_per_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("big.toml"), vec![b'#'; (1 << 20) + 1]).unwrap();
    std::fs::write(d.join("latin1.toml"), b"# caf\xe9\n").unwrap();
    let errs = PolicySet::load_dir(d).unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].to_string().contains("big.toml") && errs[0].message.contains("larger than"), "{}", errs[0]);
    assert!(errs[1].to_string().contains("latin1.toml") && errs[1].message.contains("UTF-8"), "{}", errs[1]);
    assert!(errs.iter().all(|e| e.kind == PolicyErrorKind::Read));
    // A file where a directory should be.
    let f = d.join("big.toml");
    let errs = PolicySet::load_dir(&f).unwrap_err();
    assert!(errs[0].message.contains("cannot read the policy directory"), "{}", errs[0]);
}

#[test]
fn reload_swaps_on_success_and_keeps_the_old_policy_on_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("a.toml"), TWO_SERVICES).unwrap();
    let h = PolicyHandle::load(d).unwrap();
    let before = h.current();
    let host = name("a.example.com");
    assert_eq!(before.route(&host, "GET", "/w").cost, Cost::Fixed(3_000));

    // Unchanged files: a reload that changes nothing.
    let r = h.reload().unwrap();
    assert!(!r.changed());

    // A broken edit: errors returned, the old policy stays in force.
    std::fs::write(d.join("a.toml"), TWO_SERVICES.replace("cost_cents = 3", "cost_cents = -3")).unwrap();
    let errs = h.reload().unwrap_err();
    assert_eq!(errs[0].field, "route[0].cost_cents");
    assert_eq!(h.current().digest(), before.digest());
    assert_eq!(h.current().route(&host, "GET", "/w").cost, Cost::Fixed(3_000));

    // A good edit: swapped; a request that held the old Arc still sees the old policy.
    std::fs::write(d.join("a.toml"), TWO_SERVICES.replace("cost_cents = 3", "cost_cents = 7")).unwrap();
    let r = h.reload().unwrap();
    assert!(r.changed());
    assert_eq!(r.previous_digest, before.digest());
    assert_eq!(h.current().route(&host, "GET", "/w").cost, Cost::Fixed(7_000));
    assert_eq!(before.route(&host, "GET", "/w").cost, Cost::Fixed(3_000));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<PolicySet>();
    is::<PolicyHandle>();
    is::<RouteMatch>();
    fn is_send<T: Send>() {}
    is_send::<UsageScanner>();
}

#[test]
fn non_utf8_names_matter_only_for_toml_files() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(std::ffi::OsStr::from_bytes(b"notes-\xff.txt")), "x").unwrap();
    assert!(PolicySet::load_dir(tmp.path()).is_ok());
    std::fs::write(tmp.path().join(std::ffi::OsStr::from_bytes(b"p-\xff.toml")), "").unwrap();
    let errs = PolicySet::load_dir(tmp.path()).unwrap_err();
    assert!(errs[0].message.contains("not UTF-8"), "{}", errs[0]);
}

// ---- The domain index agrees with DomainPattern::matches ------------------------------------------

proptest! {
    #[test]
    fn domain_index_agrees_with_pattern_matching(
        patterns in proptest::collection::vec(("[*]?", prop::sample::select(vec!["a", "b", "ab", "a.b", "b.a", "x.a.b"])), 1..6),
        host in prop::sample::select(vec!["a.com", "b.com", "ab.com", "a.b.com", "x.a.b.com", "y.x.a.b.com", "b.a.com", "com.com"]),
    ) {
        let mut index = DomainIndex::default();
        let mut list: Vec<DomainPattern> = Vec::new();
        for (star, label) in &patterns {
            let text = format!("{}{label}.com", if star.is_empty() { "" } else { "*." });
            let p = DomainPattern::parse(&text).unwrap();
            if index.insert(&p, list.len()).is_none() {
                list.push(p);
            }
        }
        let host = name(host);
        let got = index.get(&host).map(|i| list[i].clone());
        // Reference: an exact match, else the matching wildcard with the longest suffix.
        let best = list
            .iter()
            .filter(|p| p.matches(&host))
            .max_by_key(|p| match p {
                DomainPattern::Exact(_) => usize::MAX,
                DomainPattern::Subdomains(s) => s.as_str().len(),
            })
            .cloned();
        prop_assert_eq!(got, best);
    }
}

#[test]
fn a_dotted_host_header_alone_is_a_host_table() {
    // `[host.ceilings]` with no `[host]` line: valid TOML that makes `host` implicitly.
    let s = set(&[("host.toml", "[host.ceilings]\nmax_per_action_cents = 3\n")]).unwrap();
    assert_eq!(s.max_per_action_millicents(), Some(3_000));
    let s = set(&[("host.toml", "[[host.rule]]\nexpr = \"true\"\ndecision = \"block\"\nreason = \"no\"\n")]);
    assert!(s.is_ok(), "{:?}", s.err());
}

/// Found by fuzzing (`fuzz/corpus/policy_toml/nul-in-comment`): the toml parser reports a control
/// character in a comment with an empty message, which left the operator with a position and no
/// reason.
#[test]
fn a_control_character_in_a_comment_is_named() {
    let text = "# a comment with a NUL \0 in it\n[service]\nname = \"x\"\n";
    let errors = PolicySet::from_texts(&[(PathBuf::from("/p/host.toml"), text.to_string())]).unwrap_err();
    let [e] = errors.as_slice() else { panic!("{errors:?}") };
    assert_eq!((e.kind, e.line, e.column), (PolicyErrorKind::Syntax, 1, 24), "{e}");
    assert_eq!(e.message, "control character U+0000 is not allowed in TOML, not even in a comment; remove it");
    assert!(e.to_string().starts_with("/p/host.toml:1:24: "), "{e}");
}
