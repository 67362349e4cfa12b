//! `cargo xtask install [--prefix DIR] [--destdir DIR] [--no-build]`: the release binary, the
//! systemd units, the example configuration and the shipped host policies, in the standard places.
//!
//! | what | where |
//! |---|---|
//! | `sluice` | `PREFIX/bin/sluice` (PREFIX defaults to `/usr/local`) |
//! | units | `/etc/systemd/system/` (or `/usr/lib/systemd/system/` when PREFIX is `/usr`), with `/usr/bin/sluice` rewritten to `PREFIX/bin/sluice` |
//! | sysusers | `/etc/sysusers.d/sluice.conf` (or `/usr/lib/sysusers.d/` when PREFIX is `/usr`) |
//! | configuration | `/etc/sluice/sluice.toml.example` (always) and `/etc/sluice/sluice.toml` (only if absent) |
//! | host policies | `/etc/sluice/policies/*.toml` (only those absent) |
//! | agents' passports | `/etc/sluice/agents/` (created 0700) |
//! | docs | `PREFIX/share/doc/sluice/` (README.md, systemd.md, the example config and policies) |
//! | man pages | `PREFIX/share/man/man1/sluice*.1.gz` (`sluice(1)`, one per subcommand) |
//!
//! Everything lands under DESTDIR when given (for packaging). An operator's edited configuration
//! and policies are never overwritten. The same layout is described for `cargo deb` in
//! `daemon/Cargo.toml` (`cargo xtask package`).

use anyhow::{bail, Context};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One file to put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub mode: u32,
    /// Leave an existing file alone (an operator's configuration or policy).
    pub keep_existing: bool,
    /// Rewrite `/usr/bin/sluice` (and the doc path) for the prefix.
    pub rewrite: bool,
}

#[derive(Debug)]
pub struct Options {
    pub prefix: PathBuf,
    pub destdir: Option<PathBuf>,
    pub build: bool,
}

pub fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options { prefix: PathBuf::from("/usr/local"), destdir: None, build: true };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().cloned().with_context(|| format!("{flag} needs a directory"));
        match a.as_str() {
            "--prefix" => o.prefix = PathBuf::from(value("--prefix")?),
            "--destdir" => o.destdir = Some(PathBuf::from(value("--destdir")?)),
            "--no-build" => o.build = false,
            other => bail!("install: unknown option {other:?} (use --prefix DIR, --destdir DIR, --no-build)"),
        }
    }
    if !o.prefix.is_absolute() {
        bail!("--prefix {}: must be absolute", o.prefix.display());
    }
    Ok(o)
}

/// Where `path` (absolute, as on the target system) goes under `destdir`.
fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

/// Every file of an installation for `prefix`, as paths on the target system. `man_pages` are
/// the gzipped pages (`cargo xtask man`, then gzip).
pub fn plan(repo: &Path, binary: &Path, prefix: &Path, man_pages: &[PathBuf]) -> Vec<Item> {
    let system_prefix = prefix == Path::new("/usr");
    let units_dir =
        if system_prefix { PathBuf::from("/usr/lib/systemd/system") } else { PathBuf::from("/etc/systemd/system") };
    let sysusers_dir =
        if system_prefix { PathBuf::from("/usr/lib/sysusers.d") } else { PathBuf::from("/etc/sysusers.d") };
    let doc = prefix.join("share/doc/sluice");
    let item =
        |source: PathBuf, dest: PathBuf, mode: u32| Item { source, dest, mode, keep_existing: false, rewrite: false };
    let mut items = vec![item(binary.to_path_buf(), prefix.join("bin/sluice"), 0o755)];
    for unit in ["sluice.service", "sluice-agents.slice", "sluice-agent@.service", "sluice-gate@.service"] {
        items.push(Item { rewrite: true, ..item(repo.join("systemd").join(unit), units_dir.join(unit), 0o644) });
    }
    items.push(item(repo.join("systemd/sluice.sysusers"), sysusers_dir.join("sluice.conf"), 0o644));
    let example = repo.join("config/sluice.toml.example");
    items.push(item(example.clone(), PathBuf::from("/etc/sluice/sluice.toml.example"), 0o644));
    items.push(Item { keep_existing: true, ..item(example, PathBuf::from("/etc/sluice/sluice.toml"), 0o644) });
    let mut policies: Vec<PathBuf> = fs::read_dir(repo.join("policies"))
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect())
        .unwrap_or_default();
    policies.sort();
    for p in policies {
        let name = p.file_name().map(PathBuf::from).unwrap_or_default();
        items.push(Item { keep_existing: true, ..item(p, PathBuf::from("/etc/sluice/policies").join(name), 0o644) });
    }
    for (src, name) in [
        ("policies/host.toml.example", "policies/host.toml.example"),
        ("policies/gate.toml.example", "gate.toml.example"),
        ("policies/README.md", "policies/README.md"),
        ("README.md", "README.md"),
        ("docs/systemd.md", "systemd.md"),
    ] {
        items.push(item(repo.join(src), doc.join(name), 0o644));
    }
    let man1 = prefix.join("share/man/man1");
    for page in man_pages {
        if let Some(name) = page.file_name() {
            items.push(item(page.clone(), man1.join(name), 0o644));
        }
    }
    items
}

/// The unit text for `prefix`: the shipped units name `/usr/bin/sluice` and `/usr/share/doc`.
pub fn rewrite_for_prefix(text: &str, prefix: &Path) -> String {
    let p = prefix.display().to_string();
    let p = p.trim_end_matches('/');
    text.replace("/usr/bin/sluice", &format!("{p}/bin/sluice"))
        .replace("/usr/share/doc/sluice", &format!("{p}/share/doc/sluice"))
}

/// Puts every item in place under `destdir`; returns what it did, one line per file.
pub fn apply(items: &[Item], prefix: &Path, destdir: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    for it in items {
        let dest = staged(destdir, &it.dest);
        if it.keep_existing && dest.exists() {
            report.push(format!("kept      {} (exists)", dest.display()));
            continue;
        }
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let bytes = fs::read(&it.source).with_context(|| format!("reading {}", it.source.display()))?;
        let bytes = if it.rewrite {
            let text = String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8", it.source.display()))?;
            rewrite_for_prefix(&text, prefix).into_bytes()
        } else {
            bytes
        };
        // Write beside, then rename: a running binary or a unit being read is replaced whole.
        let tmp = dest.with_extension("xtask-new");
        fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(it.mode))?;
        fs::rename(&tmp, &dest).with_context(|| format!("installing {}", dest.display()))?;
        report.push(format!("installed {}", dest.display()));
    }
    let agents = staged(destdir, Path::new("/etc/sluice/agents"));
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&agents)?;
    fs::set_permissions(&agents, fs::Permissions::from_mode(0o700))?;
    report.push(format!("directory {} (0700)", agents.display()));
    Ok(report)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let repo = super::root();
    if o.build {
        super::run(super::cargo().args(["build", "--release", "-p", "sluice", "--bin", "sluice"]))?;
    }
    let binary = super::target_dir().join("release/sluice");
    if !binary.is_file() {
        bail!("{} is missing: run without --no-build", binary.display());
    }
    let pages = super::package::generate(&super::target_dir().join("man"))?;
    let man_pages = super::package::gzip(&pages)?;
    let items = plan(&repo, &binary, &o.prefix, &man_pages);
    for line in apply(&items, &o.prefix, o.destdir.as_deref())? {
        eprintln!("xtask: {line}");
    }
    if o.destdir.is_none() {
        eprintln!(
            "xtask: next, as root: systemd-sysusers sluice.conf && systemctl daemon-reload\n\
             xtask: then follow the section \"Run under systemd\" of README.md ({}/share/doc/sluice/README.md)",
            o.prefix.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop (xtask has no tempfile dependency).
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            let p = std::env::temp_dir().join(format!("xtask-{name}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn install(prefix: &str, dest: &Path) -> Vec<String> {
        let repo = super::super::root();
        let bin = dest.join("fake-sluice");
        if !bin.exists() {
            fs::write(&bin, b"#!/bin/sh\n").unwrap();
        }
        let page = dest.join("sluice-run.1.gz");
        if !page.exists() {
            fs::write(&page, b"page").unwrap();
        }
        let prefix = PathBuf::from(prefix);
        apply(&plan(&repo, &bin, &prefix, &[page]), &prefix, Some(dest)).unwrap()
    }

    #[test]
    fn installs_the_standard_layout_under_destdir() {
        let d = TempDir::new("layout");
        install("/usr/local", &d.0);
        let at = |p: &str| d.0.join(p.trim_start_matches('/'));
        let mode = |p: &str| fs::metadata(at(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("/usr/local/bin/sluice"), 0o755);
        for unit in ["sluice.service", "sluice-agents.slice", "sluice-agent@.service", "sluice-gate@.service"] {
            assert_eq!(mode(&format!("/etc/systemd/system/{unit}")), 0o644);
        }
        let unit = fs::read_to_string(at("/etc/systemd/system/sluice.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/local/bin/sluice --config /etc/sluice/sluice.toml daemon"), "{unit}");
        assert!(!unit.contains("/usr/bin/sluice"), "{unit}");
        let agent = fs::read_to_string(at("/etc/systemd/system/sluice-agent@.service")).unwrap();
        assert!(agent.contains("ExecStartPre=+/usr/local/bin/sluice sandbox bind"), "{agent}");
        assert!(at("/etc/sysusers.d/sluice.conf").is_file());
        assert!(at("/etc/sluice/sluice.toml").is_file());
        assert!(at("/etc/sluice/sluice.toml.example").is_file());
        assert!(at("/etc/sluice/policies/openai.toml").is_file());
        assert!(at("/etc/sluice/policies/anthropic.toml").is_file());
        assert!(at("/usr/local/share/doc/sluice/README.md").is_file());
        assert!(at("/usr/local/share/doc/sluice/systemd.md").is_file());
        assert_eq!(mode("/usr/local/share/man/man1/sluice-run.1.gz"), 0o644);
        assert_eq!(mode("/etc/sluice/agents"), 0o700);
    }

    #[test]
    fn the_usr_prefix_uses_the_distribution_unit_directory() {
        let d = TempDir::new("usr");
        install("/usr", &d.0);
        let unit = fs::read_to_string(d.0.join("usr/lib/systemd/system/sluice.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/sluice "), "{unit}");
        assert!(d.0.join("usr/lib/sysusers.d/sluice.conf").is_file());
        assert!(!d.0.join("etc/systemd/system/sluice.service").exists());
    }

    #[test]
    fn an_operators_configuration_and_policies_are_never_overwritten() {
        let d = TempDir::new("keep");
        let config = d.0.join("etc/sluice/sluice.toml");
        let policy = d.0.join("etc/sluice/policies/openai.toml");
        fs::create_dir_all(policy.parent().unwrap()).unwrap();
        fs::write(&config, "state_dir = \"/srv/sluice\"\n").unwrap();
        fs::write(&policy, "# edited by the operator\n").unwrap();
        let report = install("/usr/local", &d.0);
        assert_eq!(fs::read_to_string(&config).unwrap(), "state_dir = \"/srv/sluice\"\n");
        assert_eq!(fs::read_to_string(&policy).unwrap(), "# edited by the operator\n");
        assert!(report.iter().any(|l| l.starts_with("kept") && l.ends_with("sluice.toml (exists)")), "{report:?}");
        // The example is refreshed, so the operator sees new keys.
        assert!(fs::read_to_string(d.0.join("etc/sluice/sluice.toml.example")).unwrap().contains("[sandbox]"));
        // A second install over the first is fine.
        install("/usr/local", &d.0);
    }

    #[test]
    fn options_are_parsed_strictly() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let o = parse(&s(&["--prefix", "/opt/sluice", "--destdir", "/tmp/x", "--no-build"])).unwrap();
        assert_eq!(
            (o.prefix, o.destdir, o.build),
            (PathBuf::from("/opt/sluice"), Some(PathBuf::from("/tmp/x")), false)
        );
        assert!(parse(&s(&["--prefix"])).is_err());
        assert!(parse(&s(&["--prefix", "relative"])).is_err());
        assert!(parse(&s(&["--prefx", "/x"])).is_err());
    }
}
