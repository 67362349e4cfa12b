//! The manual pages against the real binary: for every command path that `sluice … --help` lists,
//! there is a page, and every long option and subcommand that `--help` prints is in it. A page
//! for a command `--help` does not list fails too. The walk reads the binary's own output, never
//! the clap definitions the pages are made from, so a change that reaches one and not the other
//! (a hand-written page, a flag parsed outside clap, a stale generator) is caught.

use std::collections::BTreeMap;
use std::process::Command;

/// What one `--help` shows.
#[derive(Debug, Default)]
struct Help {
    long_options: Vec<String>,
    subcommands: Vec<String>,
}

fn help(path: &[String]) -> Help {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(path)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .expect("run sluice");
    let text = String::from_utf8(out.stdout).expect("help is UTF-8");
    assert!(out.status.success(), "sluice {} --help failed", path.join(" "));
    parse_help(&text)
}

/// Reads the `Commands:` and `Options:` sections of clap's help. Option lines start (after
/// indentation) with `-`; their descriptions, on the following lines, are not read, so an option
/// merely mentioned in prose does not count.
fn parse_help(text: &str) -> Help {
    let mut h = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match section {
            "Commands:" if indent == 2 => {
                if let Some(name) = trimmed.split_whitespace().next() {
                    if name != "help" {
                        h.subcommands.push(name.to_owned());
                    }
                }
            }
            "Options:" if trimmed.starts_with('-') => {
                for word in trimmed.split([' ', ',', '=']) {
                    if let Some(name) = word.strip_prefix("--") {
                        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                            h.long_options.push(format!("--{name}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    h
}

/// The page as a reader sees the words: roff's `\-` is `-`, font escapes dropped.
fn page_text(roff: &[u8]) -> String {
    String::from_utf8_lossy(roff).replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")
}

#[test]
fn every_command_in_help_has_a_page_with_its_options_and_subcommands() {
    let pages: BTreeMap<String, String> =
        sluice::cli::man::pages().into_iter().map(|p| (p.name.clone(), page_text(&p.roff))).collect();
    let mut seen = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut checked_options = 0;
    while let Some(path) = todo.pop() {
        let name = std::iter::once("sluice".to_owned()).chain(path.iter().cloned()).collect::<Vec<_>>().join("-");
        let h = help(&path);
        let page =
            pages.get(&name).unwrap_or_else(|| panic!("no manual page {name}.1 for `sluice {}`", path.join(" ")));
        for opt in &h.long_options {
            assert!(page.contains(opt.as_str()), "{name}.1 lacks {opt}, which `--help` prints");
            checked_options += 1;
        }
        for sub in &h.subcommands {
            assert!(page.contains(&format!("{name}-{sub}(1)")), "{name}.1 does not list its subcommand {sub}");
            let mut next = path.clone();
            next.push(sub.clone());
            todo.push(next);
        }
        seen.push(name);
    }
    seen.sort();
    let generated: Vec<String> = pages.keys().cloned().collect();
    assert_eq!(seen, generated, "pages for commands `--help` does not list, or the reverse");
    // Not vacuous: the walk reached the nested commands and their options.
    assert!(seen.contains(&"sluice-passport-issue".to_owned()), "{seen:?}");
    assert!(checked_options > 50, "only {checked_options} options checked");
}

#[test]
fn the_help_parser_reads_options_and_commands_but_not_prose() {
    let h = parse_help(
        "About.\n\nUsage: sluice x [OPTIONS]\n\nCommands:\n  run       Run it\n            with --not-an-option\n  \
         help      Print this\n\nOptions:\n      --config <FILE>\n          Pass --force to …\n  -h, --help\n          Print help\n",
    );
    assert_eq!(h.subcommands, ["run"]);
    assert_eq!(h.long_options, ["--config", "--help"]);
}
