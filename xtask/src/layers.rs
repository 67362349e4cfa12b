//! `cargo xtask layers`: the layering that Cargo enforces, checked from `cargo metadata`.
//!
//! - The layers below the daemon (passports, decisions, policies, the ledger, catalogs, file I/O,
//!   HTTP message signatures) depend on
//!   no async runtime, HTTP/TLS stack or aya: their normal-dependency closure holds none of
//!   [`FORBIDDEN`]. Dev-dependencies (tokio for async tests) do not count.
//! - No library crate (a package under `crates/`) depends on the daemon `sluice`, in any kind.
//! - ARCHITECTURE.md names every crate directory, so its code map cannot silently fall behind.

use anyhow::{bail, Context};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

/// Crates that must stay free of [`FORBIDDEN`] (normal dependencies, transitively).
pub const PURE: &[&str] = &[
    "sluice-files",
    "sluice-passport",
    "sluice-decide",
    "sluice-policy",
    "sluice-ledger",
    "sluice-catalog",
    "sluice-httpsig",
];
/// An async runtime, the HTTP and TLS stacks, the eBPF loader.
pub const FORBIDDEN: &[&str] = &["tokio", "hyper", "hyper-util", "aya", "rustls", "tokio-rustls", "h2"];
/// The daemon package, which nothing below it may depend on.
pub const DAEMON: &str = "sluice";

pub fn run() -> anyhow::Result<()> {
    let out =
        crate::cargo().args(["metadata", "--format-version", "1"]).output().context("cannot run `cargo metadata`")?;
    if !out.status.success() {
        bail!("`cargo metadata` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let metadata: Value = serde_json::from_slice(&out.stdout).context("`cargo metadata` printed invalid JSON")?;
    let arch_path = crate::root().join("ARCHITECTURE.md");
    let architecture =
        std::fs::read_to_string(&arch_path).with_context(|| format!("cannot read {}", arch_path.display()))?;
    let problems = check(&metadata, &architecture)?;
    if !problems.is_empty() {
        bail!("the layering is broken:\n  - {}", problems.join("\n  - "));
    }
    eprintln!(
        "xtask: layers ok ({} checked: no {}; nothing depends on {DAEMON})",
        PURE.join(", "),
        FORBIDDEN.join(", ")
    );
    Ok(())
}

/// Every layering violation in `metadata` (the JSON of `cargo metadata --format-version 1`),
/// one sentence each; `architecture` is ARCHITECTURE.md's text. Errors only on malformed input.
pub fn check(metadata: &Value, architecture: &str) -> anyhow::Result<Vec<String>> {
    let packages = metadata["packages"].as_array().context("cargo metadata: no `packages` array")?;
    let nodes = metadata["resolve"]["nodes"].as_array().context("cargo metadata: no `resolve.nodes` array")?;
    let root = metadata["workspace_root"].as_str().context("cargo metadata: no `workspace_root`")?;
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .context("cargo metadata: no `workspace_members` array")?
        .iter()
        .filter_map(Value::as_str)
        .collect();

    let mut name_of: HashMap<&str, &str> = HashMap::new();
    let mut id_of: HashMap<&str, &str> = HashMap::new();
    let mut libraries: Vec<(&str, String)> = Vec::new();
    for p in packages {
        let (Some(id), Some(name)) = (p["id"].as_str(), p["name"].as_str()) else {
            bail!("cargo metadata: a package without id or name");
        };
        name_of.insert(id, name);
        if members.contains(id) {
            id_of.insert(name, id);
            let dir = p["manifest_path"]
                .as_str()
                .and_then(|m| m.strip_prefix(root))
                .and_then(|m| m.strip_suffix("/Cargo.toml"));
            if let Some(dir) = dir.map(|d| d.trim_start_matches('/')) {
                if dir.starts_with("crates/") {
                    libraries.push((id, dir.to_string()));
                }
            }
        }
    }
    // id -> [(dependency id, is a normal dependency)]
    let mut edges: HashMap<&str, Vec<(&str, bool)>> = HashMap::new();
    for n in nodes {
        let id = n["id"].as_str().context("cargo metadata: a resolve node without id")?;
        let deps = n["deps"].as_array().map(Vec::as_slice).unwrap_or_default();
        let list = deps
            .iter()
            .filter_map(|d| {
                let pkg = d["pkg"].as_str()?;
                let normal = d["dep_kinds"].as_array().is_some_and(|k| k.iter().any(|k| k["kind"].is_null()));
                Some((pkg, normal))
            })
            .collect();
        edges.insert(id, list);
    }

    let mut problems = Vec::new();
    for &crate_name in PURE {
        let Some(&start) = id_of.get(crate_name) else {
            problems
                .push(format!("{crate_name} is not a workspace member (was it renamed? update xtask/src/layers.rs)"));
            continue;
        };
        // Breadth-first over normal dependencies, remembering how each crate was reached.
        let mut via: HashMap<&str, &str> = HashMap::new();
        let mut queue = vec![start];
        while let Some(id) = queue.pop() {
            for &(dep, normal) in edges.get(id).map(Vec::as_slice).unwrap_or_default() {
                if normal && dep != start && !via.contains_key(dep) {
                    via.insert(dep, id);
                    queue.push(dep);
                }
            }
        }
        let mut found: Vec<String> = via
            .keys()
            .filter(|id| name_of.get(*id).is_some_and(|n| FORBIDDEN.contains(n)))
            .map(|id| {
                let mut chain = vec![name_of.get(id).copied().unwrap_or(id)];
                let mut at = *id;
                while let Some(&parent) = via.get(at) {
                    chain.push(name_of.get(parent).copied().unwrap_or(parent));
                    at = parent;
                }
                chain.push(crate_name);
                chain.reverse();
                chain.dedup();
                format!(
                    "{crate_name} depends on {} ({})",
                    chain.last().copied().unwrap_or_default(),
                    chain.join(" -> ")
                )
            })
            .collect();
        found.sort();
        problems.extend(found);
    }
    for (id, dir) in &libraries {
        let name = name_of.get(id).copied().unwrap_or(id);
        let on_daemon = edges
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .any(|(dep, _)| name_of.get(dep) == Some(&DAEMON));
        if on_daemon {
            problems.push(format!(
                "{name} ({dir}) depends on the daemon crate `{DAEMON}`; move what it needs down a layer"
            ));
        }
        if !architecture.contains(dir.as_str()) {
            problems.push(format!("ARCHITECTURE.md does not mention `{dir}` ({name}); add it to the code map"));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pkg(name: &str, dir: &str) -> Value {
        json!({"id": format!("{name}-id"), "name": name, "manifest_path": format!("/ws/{dir}/Cargo.toml")})
    }

    fn dep(name: &str, kind: Option<&str>) -> Value {
        json!({"pkg": format!("{name}-id"), "dep_kinds": [{"kind": kind, "target": null}]})
    }

    /// A workspace where the pure crates depend on each other and on serde, tokio is only a
    /// dev-dependency of the ledger, and the daemon uses everything.
    fn workspace(extra: &[(&str, Value)]) -> Value {
        let mut nodes = vec![
            json!({"id": "sluice-files-id", "deps": [dep("serde", None)]}),
            json!({"id": "sluice-passport-id", "deps": [dep("serde", None)]}),
            json!({"id": "sluice-decide-id", "deps": [dep("sluice-passport", None)]}),
            json!({"id": "sluice-policy-id", "deps": [dep("sluice-decide", None)]}),
            json!({"id": "sluice-ledger-id", "deps": [dep("sluice-files", None), dep("tokio", Some("dev"))]}),
            json!({"id": "sluice-catalog-id", "deps": [dep("sluice-passport", None)]}),
            json!({"id": "sluice-kernel-id", "deps": [dep("aya", None), dep("tokio", None)]}),
            json!({"id": "sluice-id", "deps": [dep("sluice-ledger", None), dep("hyper", None)]}),
            json!({"id": "hyper-id", "deps": [dep("h2", None), dep("tokio", None)]}),
            json!({"id": "h2-id", "deps": [dep("tokio", None)]}),
            json!({"id": "serde-id", "deps": []}),
            json!({"id": "tokio-id", "deps": []}),
            json!({"id": "aya-id", "deps": []}),
        ];
        for (id, deps) in extra {
            for n in nodes.iter_mut() {
                if n["id"] == format!("{id}-id") {
                    n["deps"].as_array_mut().unwrap().push(deps.clone());
                }
            }
        }
        let members = ["files", "passport", "decide", "policy", "ledger", "catalog", "httpsig", "kernel"];
        let mut packages: Vec<Value> =
            members.iter().map(|m| pkg(&format!("sluice-{m}"), &format!("crates/{m}"))).collect();
        packages.push(pkg("sluice", "daemon"));
        for ext in ["hyper", "h2", "serde", "tokio", "aya"] {
            packages.push(pkg(ext, &format!("registry/{ext}")));
        }
        let mut member_ids: Vec<String> = members.iter().map(|m| format!("sluice-{m}-id")).collect();
        member_ids.push("sluice-id".into());
        json!({"packages": packages, "workspace_members": member_ids, "workspace_root": "/ws", "resolve": {"nodes": nodes}})
    }

    const ARCH: &str =
        "crates/files crates/passport crates/decide crates/policy crates/ledger crates/catalog crates/httpsig crates/kernel";

    #[test]
    fn the_intended_layering_passes() {
        assert_eq!(check(&workspace(&[]), ARCH).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_runtime_reached_through_another_crate_is_named_with_its_path() {
        let problems = check(&workspace(&[("sluice-passport", dep("hyper", None))]), ARCH).unwrap();
        // The passport, and decide and policy above it, all reach hyper, h2 and tokio.
        assert!(
            problems
                .iter()
                .any(|p| p
                    == "sluice-policy depends on hyper (sluice-policy -> sluice-decide -> sluice-passport -> hyper)"),
            "{problems:#?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("sluice-passport depends on tokio (sluice-passport -> hyper")),
            "{problems:#?}"
        );
        assert!(problems.iter().any(|p| p.starts_with("sluice-passport depends on h2")), "{problems:#?}");
        assert!(!problems.iter().any(|p| p.starts_with("sluice-files")), "{problems:#?}");
    }

    #[test]
    fn a_build_dependency_counts_as_normal_only_if_also_normal() {
        let only_build = check(&workspace(&[("sluice-files", dep("aya", Some("build")))]), ARCH).unwrap();
        assert!(only_build.is_empty(), "{only_build:#?}");
        let normal = check(&workspace(&[("sluice-files", dep("aya", None))]), ARCH).unwrap();
        // The ledger, which uses sluice-files, inherits it.
        assert_eq!(
            normal,
            vec![
                "sluice-files depends on aya (sluice-files -> aya)".to_string(),
                "sluice-ledger depends on aya (sluice-ledger -> sluice-files -> aya)".to_string(),
            ]
        );
    }

    #[test]
    fn a_library_on_the_daemon_fails_even_as_a_dev_dependency() {
        let problems = check(&workspace(&[("sluice-kernel", dep("sluice", Some("dev")))]), ARCH).unwrap();
        assert_eq!(
            problems,
            vec!["sluice-kernel (crates/kernel) depends on the daemon crate `sluice`; move what it needs down a layer"
                .to_string()]
        );
    }

    #[test]
    fn every_crate_dir_must_be_in_architecture_md() {
        let problems = check(
            &workspace(&[]),
            "crates/files crates/passport crates/decide crates/policy crates/catalog crates/httpsig crates/kernel",
        )
        .unwrap();
        assert_eq!(
            problems,
            vec!["ARCHITECTURE.md does not mention `crates/ledger` (sluice-ledger); add it to the code map".to_string()]
        );
    }

    #[test]
    fn a_renamed_pure_crate_is_reported_not_skipped() {
        let mut m = workspace(&[]);
        m["workspace_members"] = json!([
            "sluice-passport-id",
            "sluice-decide-id",
            "sluice-policy-id",
            "sluice-ledger-id",
            "sluice-catalog-id",
            "sluice-httpsig-id",
            "sluice-id"
        ]);
        let problems = check(&m, ARCH).unwrap();
        assert_eq!(
            problems,
            vec!["sluice-files is not a workspace member (was it renamed? update xtask/src/layers.rs)".to_string()]
        );
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        assert!(check(&json!({}), ARCH).is_err());
        assert!(check(
            &json!({"packages": [], "resolve": null, "workspace_root": "/ws", "workspace_members": []}),
            ARCH
        )
        .is_err());
    }
}
