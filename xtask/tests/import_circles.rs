//! No two files of a crate may depend on each other, directly or through
//! others: a circle means neither file can be read, tested or moved alone.
//!
//! The check reads every crate of the workspace as text. A file depends on
//! another when its non-test code names a path into it: `use crate::a::b`,
//! `use super::x`, `self::child::y`, a child module's name at the start of a
//! `use`, or an inline `crate::a::B` anywhere in code. `mod x;` declarations
//! are not dependencies (a parent owns its children without using them), and
//! `#[cfg(test)]` items are left out, as are `tests/`, `benches/` and
//! `build.rs`. A path resolves to the deepest module *file* it names, so a
//! re-export in a `mod.rs` that its own child imports back is a circle too.
//!
//! Self-contained on purpose (no crate of ours is imported): it must keep
//! working while the code it checks is being moved around.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One file of a module tree: where it is and the module path it defines.
#[derive(Debug, Clone)]
struct ModFile {
    path: PathBuf,
    module: Vec<String>,
}

/// A crate root's module tree: files by module path.
#[derive(Debug, Default)]
struct Tree {
    files: Vec<ModFile>,
    by_module: BTreeMap<Vec<String>, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// Blanks comments, string, byte-string, raw-string and char literals with
/// spaces (newlines kept) so that nothing inside them reads as code.
fn strip_comments_and_literals(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if (c == b'r' || (c == b'b' && b.get(i + 1) == Some(&b'r')))
            && !prev_is_ident(b, i)
            && raw_string_hashes(b, if c == b'r' { i + 1 } else { i + 2 }).is_some()
        {
            let start = if c == b'r' { i + 1 } else { i + 2 };
            let hashes = raw_string_hashes(b, start).unwrap_or(0);
            let body = start + hashes + 1;
            out.resize(out.len() + (body - i), b' ');
            i = body;
            while i < b.len() {
                if b[i] == b'"'
                    && b[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == b'#')
                        .count()
                        == hashes
                {
                    out.resize(out.len() + 1 + hashes, b' ');
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{1F}') or a lifetime ('a): only
            // the former closes with a quote within a few bytes.
            let close = if b.get(i + 1) == Some(&b'\\') {
                // The escaped character itself may be a quote: search after it.
                b[i + 3..]
                    .iter()
                    .take(10)
                    .position(|&x| x == b'\'')
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                // Multi-byte UTF-8 char literal.
                b[i + 1..]
                    .iter()
                    .take(5)
                    .position(|&x| x == b'\'')
                    .filter(|&p| p > 1 && b[i + 1] >= 0x80)
                    .map(|p| i + 1 + p)
            };
            match close {
                Some(end) => {
                    out.resize(out.len() + (end + 1 - i), b' ');
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn prev_is_ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// `Some(n)` when `b[at..]` is `#`×n followed by `"`: the opening of a raw string.
fn raw_string_hashes(b: &[u8], at: usize) -> Option<usize> {
    let n = b.get(at..)?.iter().take_while(|&&c| c == b'#').count();
    (b.get(at + n) == Some(&b'"')).then_some(n)
}

fn tokenize(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            // `r#ident` is the identifier `ident`.
            let word = &src[s..i];
            toks.push(Tok::Ident(word.to_string()));
            continue;
        }
        let tok = match c {
            b':' if b.get(i + 1) == Some(&b':') => {
                i += 1;
                Tok::PathSep
            }
            b'{' => Tok::Open,
            b'}' => Tok::Close,
            b',' => Tok::Comma,
            b';' => Tok::Semi,
            b'*' => Tok::Star,
            b'$' => {
                // `$crate::…` in macro_rules resolves where the macro is used.
                if src[i + 1..].starts_with("crate") {
                    i += 6;
                    toks.push(Tok::Other);
                    continue;
                }
                Tok::Other
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            _ => Tok::Other,
        };
        toks.push(tok);
        i += 1;
    }
    toks
}

/// True for the attribute text (between `#[` and `]`) of a test-only item.
fn is_test_cfg(attr: &str) -> bool {
    let a: String = attr.chars().filter(|c| !c.is_whitespace()).collect();
    a == "cfg(test)" || a.starts_with("cfg(all(test,") || a.starts_with("cfg(all(test)")
}

/// Removes every `#[cfg(test)]` item (the attribute, any attributes after it,
/// and the item up to its `;` or its closing brace).
fn strip_test_items(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'#' && b.get(i + 1) == Some(&b'[') {
            let end = matching(b, i + 1, b'[', b']');
            let attr = &src[i + 2..end];
            if is_test_cfg(attr) {
                // Skip further attributes, then the item.
                let mut j = end + 1;
                loop {
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if b.get(j) == Some(&b'#') && b.get(j + 1) == Some(&b'[') {
                        j = matching(b, j + 1, b'[', b']') + 1;
                    } else {
                        break;
                    }
                }
                let mut depth = 0i32;
                while j < b.len() {
                    match b[j] {
                        b'(' | b'[' => depth += 1,
                        b')' | b']' => depth -= 1,
                        b';' if depth == 0 => break,
                        b'{' if depth == 0 => {
                            j = matching(b, j, b'{', b'}');
                            break;
                        }
                        _ => {}
                    }
                    j += 1;
                }
                // Keep line numbers: replace the removed text by its newlines.
                out.extend(src[i..(j + 1).min(b.len())].chars().filter(|&c| c == '\n'));
                i = j + 1;
                continue;
            }
        }
        let ch = src[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Index of the bracket closing the one at `open`.
fn matching(b: &[u8], open: usize, o: u8, c: u8) -> usize {
    let mut depth = 0usize;
    let mut j = open;
    while j < b.len() {
        if b[j] == o {
            depth += 1;
        } else if b[j] == c {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
        j += 1;
    }
    b.len().saturating_sub(1)
}

/// The `mod NAME;` declarations of a (stripped, test-free) file.
fn child_decls(toks: &[Tok]) -> Vec<String> {
    let mut out = Vec::new();
    for w in toks.windows(3) {
        if let [Tok::Ident(m), Tok::Ident(name), Tok::Semi] = w {
            if m == "mod" {
                out.push(name.clone());
            }
        }
    }
    out
}

fn clean(path: &Path) -> (String, Vec<Tok>) {
    let raw = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let code = strip_test_items(&strip_comments_and_literals(&raw));
    let toks = tokenize(&code);
    (code, toks)
}

/// Walks a crate root's module tree through its `mod x;` declarations.
fn build_tree(root: &Path) -> Tree {
    let mut tree = Tree::default();
    let mut stack = vec![ModFile {
        path: root.to_path_buf(),
        module: Vec::new(),
    }];
    while let Some(f) = stack.pop() {
        let (_, toks) = clean(&f.path);
        let stem = f
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let dir = f.path.parent().unwrap_or(Path::new("."));
        // lib.rs, main.rs and mod.rs keep their children beside them; a.rs in a/.
        let child_dir = if f.module.is_empty() || stem == "mod" {
            dir.to_path_buf()
        } else {
            dir.join(stem)
        };
        for name in child_decls(&toks) {
            let flat = child_dir.join(format!("{name}.rs"));
            let nested = child_dir.join(&name).join("mod.rs");
            let path = if flat.exists() { flat } else { nested };
            if !path.exists() {
                continue; // e.g. a platform-gated module not present here
            }
            let mut module = f.module.clone();
            module.push(name);
            stack.push(ModFile { path, module });
        }
        tree.by_module.insert(f.module.clone(), tree.files.len());
        tree.files.push(f);
    }
    tree
}

/// Expands a `use` tree starting at `toks[i]` into full paths; returns the
/// index after its `;`.
fn parse_use(toks: &[Tok], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(s) if s == "as" => {
                i += 2; // the alias
            }
            Tok::Ident(s) => {
                path.push(s.clone());
                i += 1;
            }
            Tok::PathSep | Tok::Star => i += 1,
            Tok::Open => {
                i += 1;
                loop {
                    i = parse_use(toks, i, &path, out);
                    match toks.get(i) {
                        Some(Tok::Comma) => i += 1,
                        _ => break,
                    }
                    if toks.get(i) == Some(&Tok::Close) {
                        break;
                    }
                }
                // at Close
                i += 1;
                path.clear();
            }
            Tok::Comma | Tok::Close | Tok::Semi => {
                if !path.is_empty() {
                    out.push(path);
                }
                return i;
            }
            Tok::Other => i += 1,
        }
    }
    i
}

/// Every path the file's code names (from `use` items and inline paths),
/// each with the module it is written in (inline `mod x { … }` blocks
/// included, as their `super` and `self` differ).
fn named_paths(toks: &[Tok], file_module: &[String]) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut inline: Vec<(String, i32)> = Vec::new();
    let mut depth = 0i32;
    let mut i = 0;
    let here = |inline: &[(String, i32)]| {
        let mut m = file_module.to_vec();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < toks.len() {
        match &toks[i] {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
            }
            Tok::Ident(m) if m == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth + 1));
                }
            }
            Tok::Ident(u) if u == "use" => {
                let mut paths = Vec::new();
                let next = parse_use(toks, i + 1, &[], &mut paths);
                let m = here(&inline);
                out.extend(paths.into_iter().map(|p| (m.clone(), p)));
                i = next;
                continue;
            }
            // Any `a::b…` not preceded by `::`: `resolve` keeps those that
            // start at `crate`, `super`, `self` or a module of this one.
            Tok::Ident(s) if toks.get(i + 1) == Some(&Tok::PathSep) => {
                let preceded_by_sep = i > 0 && toks[i - 1] == Tok::PathSep;
                if !preceded_by_sep {
                    let mut p = vec![s.clone()];
                    let mut j = i + 1;
                    while toks.get(j) == Some(&Tok::PathSep) {
                        match toks.get(j + 1) {
                            Some(Tok::Ident(seg)) => {
                                p.push(seg.clone());
                                j += 2;
                            }
                            _ => break,
                        }
                    }
                    out.push((here(&inline), p));
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The file a path written in module `at` lands in, if it is one of ours.
fn resolve(tree: &Tree, at: &[String], path: &[String]) -> Option<usize> {
    let (mut module, rest): (Vec<String>, &[String]) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("self") => (at.to_vec(), &path[1..]),
        Some("super") => {
            let mut m = at.to_vec();
            let mut k = 0;
            while path.get(k).map(String::as_str) == Some("super") {
                m.pop();
                k += 1;
            }
            (m, &path[k..])
        }
        Some(first) => {
            // A relative `use child::x` names a module of this one.
            let mut m = at.to_vec();
            m.push(first.to_string());
            if !tree.by_module.contains_key(&m) {
                return None;
            }
            (at.to_vec(), path)
        }
        None => return None,
    };
    let mut found = deepest_file(tree, &module);
    for seg in rest {
        module.push(seg.clone());
        match tree.by_module.get(&module) {
            Some(&f) => found = Some(f),
            None => break,
        }
    }
    found
}

/// The file holding module `m` (an inline module lives in its enclosing file).
fn deepest_file(tree: &Tree, m: &[String]) -> Option<usize> {
    (0..=m.len())
        .rev()
        .find_map(|k| tree.by_module.get(&m[..k]).copied())
}

/// Edges between files: `from -> {to}`.
fn edges(tree: &Tree) -> Vec<BTreeSet<usize>> {
    tree.files
        .iter()
        .enumerate()
        .map(|(idx, f)| {
            let (_, toks) = clean(&f.path);
            named_paths(&toks, &f.module)
                .into_iter()
                .filter_map(|(at, p)| resolve(tree, &at, &p))
                .filter(|&t| t != idx)
                .collect()
        })
        .collect()
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(graph: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct St<'a> {
        g: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut St, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on[v] = true;
        for &w in s.g[v].clone().iter() {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort_unstable();
                s.out.push(comp);
            }
        }
    }
    let n = graph.len();
    let mut s = St {
        g: graph,
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out
}

/// Every crate root (lib, main, each bin) under a crate directory.
fn crate_roots(krate: &Path) -> Vec<PathBuf> {
    let src = krate.join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.exists())
        .collect();
    if let Ok(rd) = fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter_map(|p| {
                if p.is_dir() {
                    Some(p.join("main.rs")).filter(|m| m.exists())
                } else {
                    (p.extension()? == "rs").then_some(p)
                }
            })
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    roots
}

/// Circles found under `root` (a workspace): one line per circle.
fn check_workspace(root: &Path) -> Vec<String> {
    let mut crates: Vec<PathBuf> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("read {}: {e}", root.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").exists() && p.join("src").is_dir())
        .collect();
    crates.sort();
    let mut report = Vec::new();
    for krate in crates {
        for crate_root in crate_roots(&krate) {
            let tree = build_tree(&crate_root);
            let g = edges(&tree);
            for comp in circles(&g) {
                let rel = |i: usize| {
                    tree.files[i]
                        .path
                        .strip_prefix(root)
                        .unwrap_or(&tree.files[i].path)
                        .display()
                        .to_string()
                };
                let members: BTreeSet<usize> = comp.iter().copied().collect();
                let mut lines = vec![format!("circle of {} files under {}:", comp.len(), rel(0))];
                for &a in &comp {
                    let inside: Vec<String> = g[a]
                        .iter()
                        .filter(|b| members.contains(b))
                        .map(|&b| rel(b))
                        .collect();
                    lines.push(format!("    {} -> {}", rel(a), inside.join(", ")));
                }
                report.push(lines.join("\n"));
            }
        }
    }
    report
}

#[test]
fn no_import_circle_between_the_files_of_any_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root");
    let found = check_workspace(root);
    assert!(
        found.is_empty(),
        "{} import circle(s):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The checker itself: a small tree with a circle through a `mod.rs`
/// re-export, a test-only import that must not count, and an inline path.
#[test]
fn the_checker_finds_circles_and_ignores_test_code() {
    let dir = std::env::temp_dir().join(format!("import-circles-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let src = dir.join("k").join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(dir.join("k").join("Cargo.toml"), "").unwrap();
    let write = |p: &str, s: &str| fs::write(src.join(p), s).unwrap();
    write("lib.rs", "mod a;\nmod b;\nmod c;\n");
    // a/mod.rs re-exports its child, which uses an item of a/mod.rs: a circle.
    write("a/mod.rs", "mod inner;\npub use inner::X;\npub struct Y;\n");
    write(
        "a/inner.rs",
        "use super::Y; // \"crate::b\" in a comment does not count\npub struct X(Y);\n",
    );
    // b uses c only from a test module; c uses b inline: no circle.
    write(
        "b.rs",
        "pub fn f() {}\n#[cfg(test)]\nmod tests { use crate::c::g; }\n",
    );
    write(
        "c.rs",
        "pub fn g() { crate::b::f(); let _ = \"crate::a::X\"; }\n",
    );
    let found = check_workspace(&dir);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("a/mod.rs") && found[0].contains("a/inner.rs"),
        "{}",
        found[0]
    );
    // Make b -> c real: now b <-> c is a second circle.
    write("b.rs", "pub fn f() { crate::c::g(); }\n");
    assert_eq!(check_workspace(&dir).len(), 2);
    let _ = fs::remove_dir_all(&dir);
}
