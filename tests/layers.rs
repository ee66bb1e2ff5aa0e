//! The controller crate's layers, checked from its sources: each top-level module of `src/` may
//! name (`crate::...`) only the layers below it (ARCHITECTURE.md, "The controller crate in
//! layers"). Test code is left out: a test may reach anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each layer and the layers it may use. Leaves (`http_json`, `table`, `telemetry`) may be used
/// by any layer and use none.
const LAYERS: [(&str, &[&str]); 12] = [
    ("http_json", &[]),
    ("table", &[]),
    ("telemetry", &[]),
    ("config", &[]),
    ("core", &["config"]),
    ("store", &["config", "core"]),
    ("runtime", &["config", "core", "store"]),
    ("api", &["config", "core", "store", "runtime"]),
    ("app", &["config", "core", "store", "runtime", "api"]),
    ("offline", &["config", "core", "store", "runtime"]),
    (
        "scenario",
        &["config", "core", "store", "runtime", "api", "app"],
    ),
    (
        "cli",
        &[
            "config", "core", "store", "runtime", "api", "app", "offline", "scenario",
        ],
    ),
];

const LEAVES: [&str; 3] = ["http_json", "table", "telemetry"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code without its tests: test files, and everything from `#[cfg(test)]` on.
fn code_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with("_tests.rs") || name == "tests.rs" || name == "testing.rs" {
        return None;
    }
    let text = std::fs::read_to_string(path).expect("a source file");
    Some(match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_string(),
        None => text,
    })
}

/// The top-level modules a text names as `crate::NAME`.
fn named_layers(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .filter(|(at, _)| {
            // Not `understudy_crate::` or the like: `crate` must start a path.
            !text[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_layer_names_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.into_iter().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let first = relative.components().next().expect("a path");
        let layer = first.as_os_str().to_str().expect("UTF-8");
        let layer = layer.strip_suffix(".rs").unwrap_or(layer);
        if matches!(layer, "lib" | "main" | "testing") {
            continue;
        }
        let Some(below) = allowed.get(layer) else {
            wrong.push(format!(
                "{}: `{layer}` is not a known layer",
                relative.display()
            ));
            continue;
        };
        let Some(code) = code_of(file) else { continue };
        checked += 1;
        for named in named_layers(&code) {
            let fine = named == layer
                || below.contains(&named.as_str())
                || (LEAVES.contains(&named.as_str()) && !LEAVES.contains(&layer));
            if !fine {
                wrong.push(format!(
                    "{}: `{layer}` names `crate::{named}`",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} files read under {}",
        src.display()
    );
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_finds_paths_and_skips_lookalikes() {
    let text = "use crate::core::plan;\nlet x = crate::runtime::controller::lock(s);\n\
                my_crate::config::thing();";
    assert_eq!(named_layers(text), vec!["core", "runtime"]);
}
