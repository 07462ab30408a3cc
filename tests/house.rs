//! The shape of the house, checked from the source text (no build of the crate needed beyond this
//! test): no import circle between the files of `src/`, no file over 600 lines, `config` on the
//! top floor (only `agent`, `cli` and `main` read it), and every `unsafe` under `src/sys/`.
//!
//! An arrow goes from file A to file B when A's non-test code names a path into B: `crate::b::…`,
//! `super::…`, or, in a module with children, `child::…`. Comments, strings, `#[cfg(test)]`
//! items and unit tests' own files (`tests.rs`, `*_tests.rs`) are left out (a unit test may use
//! anything); the line limit holds for those files too. A path resolves to the deepest module it
//! names, so `crate::rules::render::Layout` is an arrow to `rules/render.rs`, and
//! `crate::rules::RuleSet` one to `rules/mod.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;
/// The only modules (with their children) that may read `config` (it sits above everything else).
const CONFIG_READERS: &[&str] = &["agent", "cli", "config"];

struct Module {
    /// `rules::render`; "" for lib.rs / main.rs.
    name: String,
    file: PathBuf,
    code: String,
    lines: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn module_name(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The code with comments, string and char literals blanked out (newlines kept).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && (next == Some(b'"') || next == Some(b'#')) && !ident_byte(b, i.wrapping_sub(1)) {
            // Raw string r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\'', '\u{..}') or a lifetime ('a).
            if next == Some(b'\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != b'\'' {
                    j += 1;
                }
                out.push_str("' '");
                i = j + 1;
            } else if b.get(i + 2) == Some(&b'\'') {
                out.push_str("' '");
                i += 3;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            // Multi-byte UTF-8 passes through whole.
            let ch = text[i..].chars().next().expect("char");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `code` without `#[cfg(test)]` items (the attribute through the item's closing brace or `;`).
fn without_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let b = item.as_bytes();
        let mut depth = 0usize;
        let mut end = item.len();
        for (k, &c) in b.iter().enumerate() {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(item[..end].chars().filter(|c| *c == '\n'));
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn load() -> Vec<Module> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        // A unit test's own file (`#[cfg(test)] #[path = "x_tests.rs"] mod tests;`) is test code.
        .filter(|f| !f.file_name().is_some_and(|n| n == "tests.rs" || n.to_string_lossy().ends_with("_tests.rs")))
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("read source");
            let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
            Module {
                name: module_name(&rel),
                code: without_tests(&strip(&text)),
                lines: text.lines().count(),
                file: rel,
            }
        })
        .collect()
}

/// Every path the code names: `crate::a::b`, `super::x`, `child::y` (for a module's own
/// children), with `{…}` groups of `use` expanded. Each path is a list of segments, absolute.
fn paths(m: &Module, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let b = m.code.as_bytes();
    let here: Vec<String> = if m.name.is_empty() { Vec::new() } else { m.name.split("::").map(String::from).collect() };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !ident_byte(b, i) || ident_byte(b, i.wrapping_sub(1)) || (i > 0 && b[i - 1] == b':') {
            i += 1;
            continue;
        }
        let start = i;
        while ident_byte(b, i) {
            i += 1;
        }
        let word = &m.code[start..i];
        if !m.code[i..].starts_with("::") {
            continue;
        }
        let base: Option<Vec<String>> = match word {
            "crate" => Some(Vec::new()),
            "super" => Some(here.iter().take(here.len().saturating_sub(1)).cloned().collect()),
            "self" => Some(here.clone()),
            w if children.contains(w) => {
                let mut p = here.clone();
                p.push(w.to_string());
                Some(p)
            }
            _ => None,
        };
        let Some(base) = base else { continue };
        let (found, end) = expand(&m.code, i, base);
        out.extend(found);
        i = end;
    }
    out
}

/// From `::rest` at `at`, the paths it spells (groups expanded); returns them and where it ended.
fn expand(code: &str, mut at: usize, mut prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let b = code.as_bytes();
    let mut out = Vec::new();
    while code[at..].starts_with("::") {
        at += 2;
        while at < b.len() && b[at].is_ascii_whitespace() {
            at += 1;
        }
        if b.get(at) == Some(&b'{') {
            at += 1;
            loop {
                while at < b.len() && (b[at].is_ascii_whitespace() || b[at] == b',') {
                    at += 1;
                }
                if at >= b.len() || b[at] == b'}' {
                    return (out, at + 1);
                }
                let s = at;
                while ident_byte(b, at) {
                    at += 1;
                }
                let word = &code[s..at];
                if word.is_empty() {
                    // `*` or something this scanner does not model: skip a byte.
                    at += 1;
                    continue;
                }
                let mut p = prefix.clone();
                if word == "super" {
                    p.pop();
                } else if word != "self" {
                    p.push(word.to_string());
                }
                let (inner, end) = expand(code, at, p.clone());
                if inner.is_empty() {
                    out.push(p);
                } else {
                    out.extend(inner);
                }
                at = end;
                // Skip `as name`.
                while at < b.len() && b[at] != b',' && b[at] != b'}' {
                    at += 1;
                }
            }
        }
        let s = at;
        while ident_byte(b, at) {
            at += 1;
        }
        let word = &code[s..at];
        if word.is_empty() {
            break;
        }
        if word == "super" {
            prefix.pop();
        } else {
            prefix.push(word.to_string());
        }
    }
    out.push(prefix);
    (out, at)
}

/// The arrows between modules (by name), from each module's non-test code.
fn arrows(modules: &[Module]) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<String> = modules.iter().map(|m| m.name.clone()).collect();
    let mut graph = BTreeMap::new();
    for m in modules {
        if m.file == Path::new("main.rs") {
            continue;
        }
        let children: BTreeSet<String> = names
            .iter()
            .filter_map(|n| {
                let rest = if m.name.is_empty() { Some(n.as_str()) } else { n.strip_prefix(&format!("{}::", m.name)) };
                rest.filter(|r| !r.is_empty() && !r.contains("::")).map(String::from)
            })
            .collect();
        let mut to = BTreeSet::new();
        for p in paths(m, &children) {
            // The deepest module the path names.
            let target = (0..=p.len()).rev().map(|k| p[..k].join("::")).find(|n| names.contains(n));
            if let Some(t) = target {
                if t != m.name && !t.is_empty() {
                    to.insert(t);
                }
            }
        }
        graph.insert(m.name.clone(), to);
    }
    graph
}

/// Strongly connected components of more than one module (Tarjan).
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(t: &mut T<'g>, v: &'g str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let graph = t.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn describe(circle: &[String], graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    let members: BTreeSet<&String> = circle.iter().collect();
    let mut lines = Vec::new();
    for a in circle {
        for b in graph[a].iter().filter(|b| members.contains(b)) {
            lines.push(format!("  {a} -> {b}"));
        }
    }
    format!("circle of {}:\n{}", circle.join(", "), lines.join("\n"))
}

#[test]
fn no_import_circles() {
    let graph = arrows(&load());
    let found = circles(&graph);
    let text: Vec<String> = found.iter().map(|c| describe(c, &graph)).collect();
    assert!(found.is_empty(), "import circles between modules of src/:\n{}", text.join("\n"));
}

#[test]
fn no_file_over_the_limit() {
    let over: Vec<String> = load()
        .iter()
        .filter(|m| m.lines > MAX_LINES)
        .map(|m| format!("src/{} has {} lines", m.file.display(), m.lines))
        .collect();
    assert!(over.is_empty(), "files over {MAX_LINES} lines (split them by concept):\n{}", over.join("\n"));
}

#[test]
fn config_is_read_only_from_the_top_floor() {
    let graph = arrows(&load());
    let readers: Vec<&String> = graph
        .iter()
        .filter(|(from, to)| {
            let top = from.split("::").next().unwrap_or("");
            to.contains("config") && !CONFIG_READERS.contains(&top)
        })
        .map(|(from, _)| from)
        .collect();
    assert!(readers.is_empty(), "modules below config that read it: {readers:?} (pass them their own settings)");
}

#[test]
fn unsafe_lives_under_sys() {
    let mut found = Vec::new();
    for m in load() {
        if m.file.starts_with("sys") {
            continue;
        }
        let b = m.code.as_bytes();
        let mut at = 0;
        while let Some(k) = m.code[at..].find("unsafe") {
            let i = at + k;
            if !ident_byte(b, i.wrapping_sub(1)) && !ident_byte(b, i + 6) {
                found.push(format!("src/{}: line {}", m.file.display(), m.code[..i].lines().count().max(1)));
            }
            at = i + 6;
        }
    }
    assert!(found.is_empty(), "`unsafe` outside src/sys/:\n{}", found.join("\n"));
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs");
    assert!(lib.contains("#![deny(unsafe_code)]"), "lib.rs must deny unsafe_code outside sys");
}

/// The scanner itself: it must see the arrows it is meant to see.
#[test]
fn the_scanner_sees_grouped_relative_and_inline_paths() {
    let m = Module {
        name: "rules::apply".into(),
        file: "rules/apply.rs".into(),
        code: without_tests(&strip(
            "use crate::{config::Backend, proxy::{self, table::Upstream}};\n\
             use super::{render::Layout, RuleSet};\n\
             // crate::ops::not_a_path\n\
             fn f() { let s = \"crate::ops::x\"; crate::model::Kind::Service; }\n\
             #[cfg(test)]\nmod tests { use crate::agent::X; }\n",
        )),
        lines: 6,
    };
    let mut got: Vec<String> = paths(&m, &BTreeSet::new()).iter().map(|p| p.join("::")).collect();
    got.sort();
    assert_eq!(
        got,
        [
            "config::Backend",
            "model::Kind::Service",
            "proxy",
            "proxy::table::Upstream",
            "rules::RuleSet",
            "rules::render::Layout"
        ]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
        ("d".to_string(), BTreeSet::new()),
    ]
    .into();
    assert_eq!(circles(&graph), [vec!["a".to_string(), "b".into(), "c".into()]]);
}
