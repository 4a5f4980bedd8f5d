//! The crate's shape, checked from its sources: which top-level module uses which, that the
//! arrows point down (no cycle; `config`, `metrics` and `codec` use nothing of the crate), that
//! `docs/architecture.md` lists the arrows as they are, that close codes (literal or named) are
//! written only in the close table, and that metric names are written only in the metrics
//! module, that the features under `session/` import nothing of one another, and that the
//! codec imports nothing of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules the library is made of: a file or folder directly under `src/`. `main.rs`,
/// `client.rs`, `demo.rs` and `mint.rs` are the binary, not the library; `testing.rs` is the
/// unit tests' helpers, built only with them (`#[cfg(test)]`).
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("src/") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 name").to_owned();
        if matches!(name.as_str(), "lib" | "main" | "client" | "demo" | "mint" | "testing") {
            continue;
        }
        let mut files = Vec::new();
        collect(&path, &mut files);
        out.entry(name).or_insert_with(Vec::new).extend(files);
    }
    out
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("dir") {
            collect(&e.expect("entry").path(), files);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        files.push(path.to_owned());
    }
}

/// Code lines of a file: comments and the `#[cfg(test)]` module at its end left out (only the
/// module: a `#[cfg(test)]` on an item above it does not hide the rest of the file).
fn code_lines(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("read source");
    let lines: Vec<&str> = text.lines().collect();
    let test_module = |i: usize| {
        lines[i].trim() == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|next| next.trim_start().starts_with("mod "))
    };
    let end = (0..lines.len()).find(|&i| test_module(i)).unwrap_or(lines.len());
    lines[..end]
        .iter()
        .map(|l| match l.find("//") {
            Some(i) => l[..i].to_owned(),
            None => l.to_string(),
        })
        .collect()
}

/// The top-level modules each module uses (`crate::name`).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, files)| {
            let mut uses = BTreeSet::new();
            for f in files {
                for line in code_lines(f) {
                    for (i, _) in line.match_indices("crate::") {
                        let rest = &line[i + "crate::".len()..];
                        let name: String =
                            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if names.contains(&name) && name != *m {
                            uses.insert(name);
                        }
                    }
                }
            }
            (m.clone(), uses)
        })
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn config_metrics_and_codec_are_leaves() {
    let g = graph(&src());
    for leaf in ["config", "metrics", "codec"] {
        assert!(g[leaf].is_empty(), "{leaf} must not use other modules of the crate, but uses {:?}", g[leaf]);
    }
}

#[test]
fn module_arrows_have_no_cycle() {
    let g = graph(&src());
    // Kahn's algorithm: repeatedly take a module all of whose dependencies are taken.
    let mut done: BTreeSet<String> = BTreeSet::new();
    while done.len() < g.len() {
        let next: Vec<String> =
            g.iter().filter(|(m, uses)| !done.contains(*m) && uses.is_subset(&done)).map(|(m, _)| m.clone()).collect();
        assert!(
            !next.is_empty(),
            "import cycle among {:?}",
            g.keys().filter(|m| !done.contains(*m)).collect::<Vec<_>>()
        );
        done.extend(next);
    }
}

#[test]
fn docs_architecture_lists_the_arrows_as_they_are() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
        .expect("docs/architecture.md");
    let block = doc.split("```text\n").nth(1).and_then(|b| b.split("```").next()).expect("a ```text block of arrows");
    let documented: BTreeMap<String, BTreeSet<String>> = block
        .lines()
        .filter_map(|l| l.split_once("->"))
        .map(|(m, uses)| {
            let uses = uses.split_whitespace().filter(|u| *u != "(nothing)").map(str::to_owned).collect();
            (m.trim().to_owned(), uses)
        })
        .collect();
    assert_eq!(documented, graph(&src()), "docs/architecture.md's arrows differ from the code's");
}

#[test]
fn close_codes_are_written_only_in_the_close_table() {
    let table = src().join("session/close.rs");
    let mut found = Vec::new();
    for files in modules(&src()).values() {
        for f in files.iter().filter(|f| **f != table) {
            for (n, line) in code_lines(f).iter().enumerate() {
                // A close code the protocol defines is a literal 1000-1015 (RFC 6455 §7.4.1).
                let bytes = line.as_bytes();
                for (i, _) in line.match_indices(|c: char| c.is_ascii_digit()) {
                    let starts = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                    let digits: String = line[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
                    let ends =
                        line[i + digits.len()..].chars().next().is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
                    if starts && ends && digits.len() == 4 {
                        let v: u16 = digits.parse().expect("digits");
                        if (1000..=1015).contains(&v) {
                            found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "close-code-like literals outside session/close.rs:\n{}", found.join("\n"));
}

/// The names of the close codes the close table declares (`pub const NAME: u16` in its `code`
/// module).
fn close_code_names() -> Vec<String> {
    let table = std::fs::read_to_string(src().join("session/close.rs")).expect("close.rs");
    let module = table.split("pub mod code {").nth(1).and_then(|m| m.split("\n}").next()).expect("a code module");
    module
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .collect()
}

#[test]
fn close_codes_are_named_only_in_the_close_table() {
    let names = close_code_names();
    assert!(names.len() >= 9, "the close table's code names: {names:?}");
    let table = src().join("session/close.rs");
    let mut found = Vec::new();
    for files in modules(&src()).values() {
        for f in files.iter().filter(|f| **f != table) {
            for (n, line) in code_lines(f).iter().enumerate() {
                // A name reaches another module only through the `code` module: imported
                // from it, or written as `code::NAME`.
                let imported =
                    ["close::code::", "close::code;", "close::code,", "close::code}"].iter().any(|p| line.contains(p));
                let named = names.iter().any(|name| line.contains(&format!("code::{name}")));
                if imported || named {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "close codes named outside session/close.rs:\n{}", found.join("\n"));
}

#[test]
fn metric_names_are_written_only_in_the_metrics_module() {
    let metrics = src().join("metrics.rs");
    let mut found = Vec::new();
    for files in modules(&src()).values() {
        for f in files.iter().filter(|f| **f != metrics) {
            for (n, line) in code_lines(f).iter().enumerate() {
                let macro_call = ["counter!(", "gauge!(", "histogram!("].iter().any(|m| line.contains(m));
                if macro_call || line.contains("\"portcullis_") && line.contains("_total\"") {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "metrics written outside src/metrics.rs:\n{}", found.join("\n"));
}

/// The features of the session layer: each one module under `src/session/` that owns its
/// registry and its task.
const FEATURES: [&str; 4] = ["resume", "observe", "fanout", "recording"];

#[test]
fn session_features_do_not_import_one_another() {
    let session = src().join("session");
    let mut found = Vec::new();
    for feature in FEATURES {
        let mut files = Vec::new();
        collect(&session.join(feature), &mut files);
        assert!(!files.is_empty(), "src/session/{feature}/ has no sources");
        for f in files {
            for (n, line) in code_lines(&f).iter().enumerate() {
                for other in FEATURES.iter().filter(|o| **o != feature) {
                    let by_path = line.contains(&format!("session::{other}"));
                    let by_super = line.contains(&format!("super::super::{other}"));
                    if by_path || by_super {
                        found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "session features importing one another:\n{}", found.join("\n"));
}

#[test]
fn the_codec_imports_nothing_of_the_crate() {
    let lines = code_lines(&src().join("codec.rs"));
    let found: Vec<&String> = lines.iter().filter(|l| l.contains("crate::") || l.contains("super::")).collect();
    assert!(found.is_empty(), "src/codec.rs uses the crate: {found:?}");
}
