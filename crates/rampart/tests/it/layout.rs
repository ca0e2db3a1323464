//! The code's shape: inside every crate of the workspace, modules import each other without
//! a cycle, so each crate reads from its foundations up (ARCHITECTURE.md draws the order).
//!
//! An edge is a path a module names: `crate::a::b` or `super::b` anywhere in its code
//! (comments and unit tests excluded). A folder of modules counts as one module: the edges
//! of its files are its own, and those between its files do not count. The crate root (`lib.rs`,
//! `main.rs`) stands outside the graph: it declares and re-exports the modules, and what
//! it defines itself (openraft's type declarations, the client's error) is a foundation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace_crates() -> Vec<PathBuf> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&crates)
        .expect("list crates")
        .map(|e| e.expect("entry").path().join("src"))
        .filter(|src| src.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Every `.rs` file under `src` with its module path (`""` for the crate root).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            found.insert(parts.join("::"), path);
        }
    }
    found
}

/// The code of a file before its unit tests, without line comments.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text,
    };
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths a piece of code names after `prefix` (`crate::` or a module's own path),
/// expanding `{a, b::c}` groups.
fn named_paths(code: &str, prefix: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        expand("", rest, &mut paths);
    }
    paths
}

fn expand(base: &str, text: &str, into: &mut Vec<String>) {
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(base, group[start..i].trim(), into);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(base, group[start..i].trim(), into);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let mut path = base.to_string();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        if !path.is_empty() {
            path.push_str("::");
        }
        path.push_str(&rest[..end]);
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(next) if next.starts_with('{') => return expand(&path, next, into),
            Some(next) => rest = next,
            None => break,
        }
    }
    if !path.is_empty() {
        into.push(path);
    }
}

/// The longest known module a path starts with (the crate root if none).
fn module_of(path: &str, known: &BTreeMap<String, PathBuf>) -> String {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| known.contains_key(m))
        .unwrap_or_default()
}

/// The top-level module a module belongs to (`failover` for `failover::episode`).
fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn parent(module: &str) -> &str {
    module.rsplit_once("::").map_or("", |(p, _)| p)
}

fn edges(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in modules.iter().filter(|(m, _)| !m.is_empty()) {
        let code = code_of(path);
        let mut named = named_paths(&code, "crate::");
        let parent_path = parent(module);
        let in_parent = |p: String| {
            if parent_path.is_empty() {
                p
            } else {
                format!("{parent_path}::{p}")
            }
        };
        named.extend(named_paths(&code, "super::").into_iter().map(in_parent));
        // A folder is one module: its files' edges are its own, edges inside it do not count.
        let from = top(module);
        let targets = graph.entry(from.to_string()).or_default();
        for path in named {
            let target = module_of(&path, modules);
            if !target.is_empty() && top(&target) != from {
                targets.insert(top(&target).to_string());
            }
        }
    }
    graph
}

/// A cycle in `graph`, if any, as the modules along it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        at: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|m| m == at) {
            let mut found = stack[i..].to_vec();
            found.push(at.to_string());
            return Some(found);
        }
        if done.contains(at) {
            return None;
        }
        stack.push(at.to_string());
        for next in graph.get(at).into_iter().flatten() {
            if let Some(found) = visit(next, graph, done, stack) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(at.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_crate_has_an_import_cycle_among_its_modules() {
    let mut cycles = Vec::new();
    for src in workspace_crates() {
        let modules = modules(&src);
        if let Some(found) = cycle(&edges(&modules)) {
            cycles.push(format!("{}: {}", src.display(), found.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let code = "use crate::{a::{b, c}, d};\nfn f() { super::e::g(); }";
    assert_eq!(named_paths(code, "crate::"), ["a::b", "a::c", "d"]);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(cycle(&graph).expect("a cycle").len(), 4);
    let mut acyclic = graph.clone();
    acyclic.insert("c".to_string(), BTreeSet::new());
    assert_eq!(cycle(&acyclic), None);
}
