//! The engine's imports read as layers (ARCHITECTURE.md, "Engine layers"): every `crate::`
//! path in engine/src, outside comments and `#[cfg(test)]` code, names the file's own
//! top-level module or one of a lower layer. A top-level module that is not in [`LAYERS`]
//! fails the test until it is given its place there (and in ARCHITECTURE.md's picture).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, bottom first; the modules of one layer do not import each other.
const LAYERS: &[&[&str]] = &[
    &["format"],
    &["error", "meta", "io"],
    &["paths"],
    &["layer"],
    &["check"],
    &["overlap"],
    &["write"],
    &["shared"],
    &["shard"],
    &["image"],
    &["resize"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's lines without comments and without the items marked `#[cfg(test)]`.
fn code_lines(source: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            // Skip the item: up to its closing brace, or its `;` when it has no body.
            let mut depth = 0i64;
            let mut opened = false;
            for l in lines.by_ref() {
                let l = l.split("//").next().unwrap_or("");
                depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
                opened |= l.contains('{');
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push(line.split("//").next().unwrap_or(""));
    }
    out
}

/// The top-level modules named by `crate::` paths in `line` (and by `super::` paths in a
/// file at the top of the crate, where `super` is the crate).
fn named_modules(line: &str, top_level_file: bool, out: &mut BTreeSet<String>) {
    let mut prefixes = vec!["crate::"];
    if top_level_file {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in line.match_indices(prefix) {
            let before = line[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `my_crate::`, not `crate::`
            }
            let name: String = line[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
}

/// What the crate root re-exports (`pub use module::{A, B}`): `crate::A` names `module`.
fn root_exports(lib: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim_matches(|c: char| c == '{' || c == '}' || c.is_whitespace());
        for item in items.split(',') {
            let name = item.split(" as ").last().unwrap_or("").trim();
            if !name.is_empty() {
                out.push((name.to_owned(), module.trim().to_owned()));
            }
        }
    }
    out
}

/// Every import of a module of the tree at `src` that is not from a lower layer.
fn violations(src: &Path) -> (Vec<String>, usize) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let exports = root_exports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut wrong = Vec::new();
    let mut edges = 0;
    for file in &files {
        let rel = file.strip_prefix(src).unwrap();
        if rel == Path::new("lib.rs") {
            continue; // Declares the modules and re-exports the public API.
        }
        let own = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_owned();
        let Some(own_layer) = layer_of(&own) else {
            wrong.push(format!(
                "{}: module `{own}` has no layer in LAYERS",
                rel.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        let mut named = BTreeSet::new();
        for line in code_lines(&source) {
            named_modules(line, rel.components().count() == 1, &mut named);
        }
        for name in &named {
            let module = match exports.iter().find(|(n, _)| n == name) {
                Some((_, m)) => m.clone(),
                None => name.clone(),
            };
            // Items of the crate root itself (`crate::SECTOR_SIZE`) belong to no layer.
            if module == own
                || (!src.join(format!("{module}.rs")).exists() && !src.join(&module).is_dir())
            {
                continue;
            }
            edges += 1;
            match layer_of(&module) {
                Some(l) if l < own_layer => {}
                Some(_) => wrong.push(format!(
                    "{}: imports `crate::{name}` (of `{module}`), which is not below `{own}`",
                    rel.display()
                )),
                None => wrong.push(format!(
                    "{}: imports `crate::{name}` (of `{module}`), which has no layer in LAYERS",
                    rel.display()
                )),
            }
        }
    }
    (wrong, edges)
}

#[test]
fn engine_imports_only_from_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (wrong, edges) = violations(&src);
    assert!(edges > 0, "no imports found under {}", src.display());
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

/// The check finds what it is for: an upward import, through a path or a re-export, and
/// a module without a layer; it ignores comments and test code.
#[test]
fn upward_imports_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |name: &str, text: &str| {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod format;\npub mod shard;\npub use shard::{Shard, ShardConfig};\n",
    );
    write(
        "shard/mod.rs",
        "use crate::format::be32;\npub struct Shard;\n",
    );
    write(
        "format/mod.rs",
        "// crate::shard in a comment\n\
         pub fn be32() {}\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::shard::Shard;\n}\n",
    );
    assert_eq!(violations(src), (Vec::<String>::new(), 1));
    write("format/header.rs", "fn f(_: crate::Shard) {}\n");
    write("strange.rs", "use crate::format::be32;\n");
    let (wrong, _) = violations(src);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(wrong[0].contains("format/header.rs: imports `crate::Shard` (of `shard`)"));
    assert!(wrong[1].contains("module `strange` has no layer"));
}
