//! Manual pages: `sluice(1)` and one page per subcommand (`sluice-passport-issue(1)`, …), made
//! by clap_mangen from the same clap definitions as `--help`, so the two cannot drift apart
//! (`daemon/tests/man_pages.rs` holds them to the real binary's `--help`).
//!
//! `cargo xtask man` writes them (through `daemon/examples/sluice-man.rs`); the package and
//! `cargo xtask install` install them gzipped in `share/man/man1`.

use super::Cli;
use clap::CommandFactory;

/// One page: `name` is the command path joined by `-` (`sluice-passport-issue`); `roff` is the
/// page source (section 1).
#[derive(Clone, Debug)]
pub struct Page {
    pub name: String,
    pub roff: Vec<u8>,
}

impl Page {
    /// The file name: `sluice-passport-issue.1`.
    pub fn file_name(&self) -> String {
        format!("{}.1", self.name)
    }
}

/// `-` must be `\-` in roff, or groff may turn it into a hyphen that a reader cannot search for
/// or paste as an option.
fn roff_text(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

fn reference(name: &str) -> String {
    format!("\\fB{}\\fR(1)", roff_text(name))
}

/// Every page, the top command first, then depth first in the order `--help` lists them. The
/// `help` pseudo-subcommand gets no page (it prints what the pages already say).
pub fn pages() -> Vec<Page> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    collect(&cmd, None, &mut out);
    out
}

fn collect(cmd: &clap::Command, parent: Option<&str>, out: &mut Vec<Page>) {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_owned();
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("sluice {}", env!("CARGO_PKG_VERSION")))
        .manual("sluice manual");
    let mut roff = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render(&mut roff);

    // The children are already listed under SUBCOMMANDS; SEE ALSO points up.
    let mut extra = String::new();
    if parent.is_none() {
        extra.push_str(
            ".SH FILES\n.TP\n/etc/sluice/sluice.toml\nThe daemon's configuration (every key, commented: \
             /usr/share/doc/sluice/sluice.toml.example).\n.TP\n/etc/sluice/policies/\nHost policies \
             (what each endpoint is and costs).\n.TP\n/etc/sluice/agents/\nPassports and commands of the \
             systemd agent units.\n.TP\n/var/lib/sluice/\nHost key, local CA and the attestation log.\n\
             .TP\n/run/sluice/sluice.sock\nThe local API.\n.TP\n/sys/fs/bpf/sluice/\nThe pinned eBPF \
             programs and maps (removed by \\fBsluice detach\\fR).\n",
        );
    }
    match parent {
        Some(p) => extra.push_str(&format!(".SH \"SEE ALSO\"\n{}\n", reference(p))),
        None => extra.push_str(
            ".SH \"SEE ALSO\"\n\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)\n.PP\n/usr/share/doc/sluice/README.md, \
             /usr/share/doc/sluice/systemd.md (running sluice under systemd, and removing it).\n",
        ),
    }
    roff.extend_from_slice(extra.as_bytes());
    out.push(Page { name: name.clone(), roff });
    for sub in subs {
        collect(sub, Some(&name), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page_named_by_its_path() {
        let pages = pages();
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names[0], "sluice");
        for want in
            ["sluice-run", "sluice-passport-issue", "sluice-audit-verify", "sluice-detach", "sluice-issuer-init"]
        {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.ends_with("-help")), "{names:?}");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "duplicate page names: {names:?}");
    }

    #[test]
    fn pages_link_their_parent_and_list_their_children() {
        let pages = pages();
        let page = |n: &str| String::from_utf8(pages.iter().find(|p| p.name == n).unwrap().roff.clone()).unwrap();
        let passport = page("sluice-passport");
        assert!(passport.contains(".SH \"SEE ALSO\"\n\\fBsluice\\fR(1)\n"), "{passport}");
        assert!(passport.contains("sluice\\-passport\\-issue(1)"), "children under SUBCOMMANDS: {passport}");
        let top = page("sluice");
        assert!(top.contains("\n.TH sluice 1 "), "{top}");
        assert!(top.contains(".SH FILES"), "{top}");
    }
}
