//! The engine's imports read as layers (ARCHITECTURE.md, "Engine layers"): every `crate::`
//! path in engine/src, outside comments and `#[cfg(test)]` code, names the file's own
//! top-level module or one of a lower layer. A top-level module that is not in [`LAYERS`]
//! fails the test until it is given its place there (and in ARCHITECTURE.md's picture).
//!
//! Inside `shard/` each file is a layer too ([`SHARD_LAYERS`]): every path to a sibling
//! (`super::x`, `crate::shard::x`, each name of a `use super::{a, b::C}` group, in `use`
//! lines or written in code) names a file of a lower layer; naming an item of `mod.rs` (the
//! top: `super::Completion`, `use super::*`) is an import from the top.

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

/// The files of `shard/`, bottom first; the files of one layer do not import each other.
/// The parts of the shard's state and what needs only them are below `state`; the behaviour
/// across parts (`impl State` blocks) above it; `mod` (the `Shard` and its API) on top.
const SHARD_LAYERS: &[&[&str]] = &[
    &[
        "slab",
        "direct",
        "flush_plan",
        "buffers",
        "write_log",
        "inflation",
        "reserve",
    ],
    &["config", "request", "op", "alloc_write"],
    &["group", "flush_state"],
    &["state"],
    &["allocate", "coordinate", "dispatch", "plan", "l2", "flush"],
    &["read", "write"],
    &["mod"],
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

/// The first path segment of each item of the `{...}` group that starts `text` (nested groups
/// belong to their item), and the group's length.
fn group_heads(text: &str) -> (Vec<String>, usize) {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut item = String::new();
    let mut end = text.len();
    for (i, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    heads.push(std::mem::take(&mut item));
                    end = i + 1;
                    break;
                }
            }
            ',' if depth == 1 => {
                heads.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    let heads = heads
        .iter()
        .map(|item| {
            let item = item.trim();
            if item.starts_with('*') {
                return "*".to_owned();
            }
            item.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|h: &String| !h.is_empty())
        .collect();
    (heads, end)
}

/// The siblings named in `code` (a file of the folder module `folder`, comments and test code
/// removed) by paths through the folder: `super::x` (`in_child`: the file is not the
/// folder's mod.rs, where `super` is the parent) and `crate::<folder>::x`, with each name of
/// a `{...}` group; `*` and `self` stand for the folder's mod.rs itself.
fn named_siblings(code: &str, folder: &str, in_child: bool, out: &mut BTreeSet<String>) {
    let through_crate = format!("crate::{folder}::");
    let mut prefixes = vec![through_crate.as_str()];
    if in_child {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `my_super::`, or `super::super::` (the crate) / `a::super::`
            }
            let rest = &code[at + prefix.len()..];
            let names = if rest.starts_with('{') {
                group_heads(rest).0
            } else if rest.starts_with('*') {
                vec!["*".to_owned()]
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                vec![name]
            };
            for name in names {
                match name.as_str() {
                    "" | "super" => {}
                    "*" | "self" => {
                        out.insert("mod".to_owned());
                    }
                    _ => {
                        out.insert(name);
                    }
                }
            }
        }
    }
}

/// Every import between the files of the folder module `src/<folder>/` that is not from a
/// lower layer of `layers` (bottom first, `mod` the folder's mod.rs), and the number of
/// imports seen. A path to an item of mod.rs (not a file of the folder) imports `mod`.
fn folder_violations(src: &Path, folder: &str, layers: &[&[&str]]) -> (Vec<String>, usize) {
    let dir = src.join(folder);
    let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut files = Vec::new();
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            wrong.push(format!(
                "{folder}/{}: a folder, whose files have no layers in this test yet",
                path.file_name().unwrap().to_string_lossy()
            ));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    for name in layers.iter().flat_map(|l| l.iter()) {
        if !dir.join(format!("{name}.rs")).exists() {
            wrong.push(format!(
                "{folder}/{name}.rs is listed in the layers but missing"
            ));
        }
    }
    let mut edges = 0;
    for file in &files {
        let own = file.file_stem().unwrap().to_str().unwrap().to_owned();
        let rel = format!("{folder}/{own}.rs");
        let Some(own_layer) = layer_of(&own) else {
            wrong.push(format!(
                "{rel}: file `{own}` has no layer in the folder's layers"
            ));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        let code = code_lines(&source).join("\n");
        let mut named = BTreeSet::new();
        named_siblings(&code, folder, own != "mod", &mut named);
        for name in &named {
            let module = if dir.join(format!("{name}.rs")).exists() || dir.join(name).is_dir() {
                name.clone()
            } else {
                "mod".to_owned() // An item of mod.rs (or what it re-exports).
            };
            if module == own {
                continue;
            }
            edges += 1;
            match layer_of(&module) {
                Some(l) if l < own_layer => {}
                Some(_) => wrong.push(format!(
                    "{rel}: imports `{name}` (of `{folder}/{module}.rs`), which is not below \
                     `{own}`"
                )),
                None => wrong.push(format!(
                    "{rel}: imports `{name}` (of `{folder}/{module}.rs`), which has no layer"
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

#[test]
fn shard_files_import_only_from_lower_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (wrong, edges) = folder_violations(&src, "shard", SHARD_LAYERS);
    assert!(
        edges > 0,
        "no imports found under {}",
        src.join("shard").display()
    );
    assert!(
        wrong.is_empty(),
        "imports against the shard's layers:\n{}",
        wrong.join("\n")
    );
}

/// The check inside a folder finds what it is for: an upward or sideways import through
/// `crate::<folder>::`, `super::`, a grouped `use super::{...}` over several lines, a path
/// written in code, an item of mod.rs, a glob, and a file without a layer; it ignores
/// comments, test code and `super::super::` (the crate).
#[test]
fn upward_imports_between_a_folders_files_are_found() {
    const FIXTURE: &[&[&str]] = &[&["slab"], &["state"], &["read", "write"], &["mod"]];
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |name: &str, text: &str| {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "shard/mod.rs",
        "mod read;\nmod slab;\nmod state;\nmod write;\n\
         use self::state::State;\npub struct Completion;\n",
    );
    write(
        "shard/slab.rs",
        "// super::state in a comment\n\
         pub(super) struct OpId;\n\
         fn f(_: super::super::format::Header) {}\n\
         #[cfg(test)]\n\
         mod tests {\n    use super::*;\n    use crate::shard::state::State;\n}\n",
    );
    write(
        "shard/state.rs",
        "use super::slab::OpId;\npub(super) struct State;\n",
    );
    write(
        "shard/read.rs",
        "use super::{slab::OpId, state::{self, State}};\n",
    );
    write("shard/write.rs", "use crate::shard::state::State;\n");
    assert_eq!(
        folder_violations(src, "shard", FIXTURE),
        (Vec::<String>::new(), 4)
    );

    write(
        "shard/slab.rs",
        "pub(super) struct OpId;\nfn f(_: &crate::shard::state::State) {}\n",
    );
    write(
        "shard/write.rs",
        "use super::{\n    slab::OpId,\n    read::Plan,\n};\n",
    );
    write(
        "shard/read.rs",
        "fn done() -> super::Completion {\n    super::Completion\n}\n",
    );
    write("shard/state.rs", "use super::*;\n");
    write("shard/strange.rs", "use super::slab::OpId;\n");
    let (wrong, _) = folder_violations(src, "shard", FIXTURE);
    assert_eq!(wrong.len(), 5, "{wrong:#?}");
    assert!(wrong[0].contains("shard/read.rs: imports `Completion` (of `shard/mod.rs`)"));
    assert!(wrong[1].contains("shard/slab.rs: imports `state` (of `shard/state.rs`)"));
    assert!(wrong[2].contains("shard/state.rs: imports `mod` (of `shard/mod.rs`)"));
    assert!(wrong[3].contains("file `strange` has no layer"));
    assert!(wrong[4].contains("shard/write.rs: imports `read` (of `shard/read.rs`)"));
}
