//! No two modules of the daemon depend on each other, directly or through others.
//!
//! Cargo keeps the crates layered; inside the daemon crate nothing does, so this test reads the
//! sources: every `crate::a::b` and `super::x` path outside comments and `mod tests` is an edge
//! from the module that names it to the module named. Edges are compared between siblings (the
//! children of the two modules' nearest common ancestor), so `service::holds` using
//! `service::drafts` is an edge `holds → drafts`, and `proxy::raw` using `crate::service` is an
//! edge `proxy → service`. A child using its parent's items (`super::Proxy`) is the ordinary
//! shape of a Rust module and is not an edge between siblings. Any cycle fails, with its path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `service/holds.rs` → `service::holds`, `proxy/mod.rs` →
/// `proxy`, `lib.rs` → `` (the crate root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("below src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests` block (which
/// by convention ends the file).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The identifier paths that follow `prefix` in `code`: `crate::a::b` gives `a::b`;
/// `super::{a, b::c}` gives `a` and `b::c` (nested groups contribute their first segment).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue; // `my_crate::` or `super::super::`: part of a longer path, read from its start
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item: String =
                    item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                if !item.is_empty() {
                    out.push(item.trim_end_matches(':').to_string());
                }
            }
        } else {
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            out.push(path.trim_end_matches(':').to_string());
        }
    }
    out
}

/// The longest prefix of `path` (a `::` path from the crate root) that is a module.
fn resolve(modules: &BTreeSet<String>, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len()).rev().map(|k| segs[..k].join("::")).find(|m| modules.contains(m))
}

/// The edge between the siblings that contain `from` and `to`, if neither contains the other.
fn sibling_edge(from: &str, to: &str) -> Option<(String, String)> {
    let a: Vec<&str> = from.split("::").filter(|s| !s.is_empty()).collect();
    let b: Vec<&str> = to.split("::").filter(|s| !s.is_empty()).collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common >= a.len() || common >= b.len() {
        return None; // one contains the other
    }
    Some((a[..=common].join("::"), b[..=common].join("::")))
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search with colours; a grey node reached again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        grey: &mut Vec<String>,
        black: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = grey.iter().position(|g| g == node) {
            let mut cycle = grey[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if black.contains(node) {
            return None;
        }
        grey.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, grey, black) {
                return Some(c);
            }
        }
        grey.pop();
        black.insert(node.to_string());
        None
    }
    let mut black = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut black))
}

fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let code = code(&std::fs::read_to_string(file).expect("read"));
        let mut named: Vec<String> = paths_after(&code, "crate::");
        for p in paths_after(&code, "super::") {
            // `super::super::x` is `x` two levels up.
            let mut up = 1;
            let mut rest = p.as_str();
            while let Some(r) = rest.strip_prefix("super::") {
                up += 1;
                rest = r;
            }
            let segs: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
            let base = segs[..segs.len().saturating_sub(up)].join("::");
            named.push(if base.is_empty() { rest.to_string() } else { format!("{base}::{rest}") });
        }
        for path in named {
            let Some(to) = resolve(&modules, &path) else { continue };
            if let Some((a, b)) = sibling_edge(&module, &to) {
                graph.entry(a).or_default().insert(b);
            }
        }
    }
    graph
}

#[test]
fn the_daemons_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = edges(&src);
    // The reader must see the edges it is meant to see, or the test would pass on nothing.
    for (from, to) in [("service::holds", "service::drafts"), ("proxy::conn", "proxy::raw"), ("proxy", "service")] {
        assert!(graph.get(from).is_some_and(|s| s.contains(to)), "edge {from} → {to} not found: {graph:?}");
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!("modules depend on each other: {}", cycle.join(" → "));
    }
}

#[test]
fn the_reader_finds_a_cycle_when_there_is_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").expect("write");
    std::fs::write(src.join("a/mod.rs"), "mod x;\nmod y;\n").expect("write");
    // x → y through a grouped `super` import, y → x through `crate::`; a comment and a test
    // module naming b do not count.
    std::fs::write(src.join("a/x.rs"), "use super::{y::Y, Z};\n// crate::b::B\n").expect("write");
    std::fs::write(src.join("a/y.rs"), "use crate::a::x::X;\n#[cfg(test)]\nmod tests { use crate::b; }\n")
        .expect("write");
    std::fs::write(src.join("b.rs"), "use crate::a::x;\n").expect("write");
    std::fs::create_dir_all(src.join("c")).expect("mkdir");
    std::fs::write(src.join("c/mod.rs"), "mod d;\n").expect("write");
    std::fs::create_dir_all(src.join("c/d")).expect("mkdir");
    std::fs::write(src.join("c/d/mod.rs"), "mod e;\n").expect("write");
    // Three `super`s up from c::d::e is the crate root: an edge c → b.
    std::fs::write(src.join("c/d/e.rs"), "use super::super::super::b;\n").expect("write");
    let graph = edges(src);
    let cycle = find_cycle(&graph).expect("a cycle");
    assert!(cycle.contains(&"a::x".to_string()) && cycle.contains(&"a::y".to_string()), "{cycle:?}");
    assert!(!graph.contains_key("a"), "comments and tests are not edges: {graph:?}");
    assert!(graph.get("b").is_some_and(|s| s.contains("a")), "{graph:?}");
    assert_eq!(graph.get("c"), Some(&BTreeSet::from(["b".to_string()])), "{graph:?}");
}
