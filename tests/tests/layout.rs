//! The node crate's shape (issue 10): no module of `node/src` imports
//! another in a circle, and no source file there is over 600 lines.
//!
//! The module graph has one vertex per top-level module (`replica`,
//! `coordinator`, `net`, ...; a directory module's files all count as that
//! module) and an edge `a -> b` whenever code of `a` names `crate::b`
//! (comments aside, test modules included: a test that needs a circle is a
//! sign the code does). `lib.rs` and the binary are not vertices.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

fn node_src() -> PathBuf {
    // As `cargo test` gives it when the test runs, not as it was when the
    // binary was built (see the config test in node/src/config/tests.rs).
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    Path::new(&dir).join("../node/src")
}

/// Every `.rs` file under `dir`, except the binary's.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("node/src is readable")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for `lib.rs`).
fn module_of(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).expect("file under root");
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib").then_some(name)
}

/// The modules `source` names as `crate::m`, `crate::{m, ..}` included.
fn referenced(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before_ok = at == 0 || {
                let c = rest.as_bytes()[at - 1];
                !(c.is_ascii_alphanumeric() || c == b'_')
            };
            rest = &rest[at + "crate::".len()..];
            if !before_ok {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the group may span lines; the first
                // line's names are enough for how this crate is written, and
                // a multi-line group is read below.
                for name in group.split(',') {
                    let name = name.trim().split("::").next().unwrap_or("").trim();
                    let name: String = name
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    // Multi-line `use crate::{\n a,\n b::{..},\n};` groups.
    let mut in_group = false;
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("").trim();
        if code.starts_with("use crate::{") && !code.contains('}') {
            in_group = true;
            continue;
        }
        if in_group {
            if code.starts_with('}') {
                in_group = false;
                continue;
            }
            let name: String = code
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle of `graph`, if it has one, as the path of modules around it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = node_src();
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(&root, file) else {
            continue;
        };
        let source = std::fs::read_to_string(file).expect("source is readable");
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(referenced(&source).into_iter().filter(|m| *m != module));
    }
    // Only edges between modules (not `crate::SomeReexport`).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

#[test]
fn no_module_of_the_node_imports_another_in_a_circle() {
    let graph = module_graph();
    let listing: Vec<String> = graph
        .iter()
        .map(|(m, to)| {
            format!(
                "  {m} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    println!("node module graph:\n{}", listing.join("\n"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "node/src modules import each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn no_node_source_file_is_over_600_lines() {
    let root = node_src();
    let mut files = Vec::new();
    sources(&root, &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f)
                .expect("readable")
                .lines()
                .count();
            (lines > MAX_LINES).then(|| {
                format!(
                    "{} ({lines} lines)",
                    f.strip_prefix(&root).unwrap_or(f).display()
                )
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "files over {MAX_LINES} lines: {}",
        offenders.join(", ")
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let refs = referenced("use crate::{net::X, storage::Y};\n// crate::zzz\nlet a = crate::version::f();\nuse crate::{\n    clock::Clock,\n    config,\n};");
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert_eq!(refs, ["clock", "config", "net", "storage", "version"]);
}
