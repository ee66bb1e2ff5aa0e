//! Test helpers (dev-dependency only): property tests of the config parsers, and a throwaway
//! PostgreSQL server.
//!
//! A config file can say the same thing in several TOML forms: a table as `[a.b]` with its keys
//! below, as an implicit table (only its sub-tables have headers), as dotted keys (`b.c = 1`), or
//! inline (`b = { c = 1 }`); an array of tables as `[[a]]` sections or an inline array; a whole
//! float as `2` or `2.0`; a string as `"..."` or `'...'`. [`render`] writes a [`toml::Table`] in a
//! chosen [`Style`] and tells the line each leaf landed on; [`mutate`] changes a table the ways a
//! person gets a file wrong; [`garble`] breaks the text itself.
//!
//! [`postgres::PgServer`] starts a PostgreSQL server of its own (temporary directory, free
//! loopback port, stopped and removed on drop) for tests of the shared store.

mod breaks;
mod mutate;
pub mod postgres;
mod render;

pub use breaks::{breaks, check_break, Break, Naming};
pub use mutate::{get, leaves, other_type, remove, set, tables};
pub use render::{render, style, Rendered, Style, Tables};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// One step of a path into a table: a key, or an index into an array.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path into a table: `services.media.join_steps`, `machines[0].id`.
pub type KeyPath = Vec<Seg>;

/// A path from its dotted text; `name[2]` is an index.
pub fn path(text: &str) -> KeyPath {
    let mut out = Vec::new();
    for part in text.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(open) = part.find('[') {
            out.push(Seg::Key(part[..open].to_string()));
            rest = &part[open..];
            while let Some(close) = rest.find(']') {
                let index = rest[1..close].parse().expect("an index in a path");
                out.push(Seg::Index(index));
                rest = &rest[close + 1..];
            }
        } else {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

/// `services.media.join_steps`, `machines[0].id`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The last key of a path (indices skipped): what an error about it must name.
pub fn last_key(path: &[Seg]) -> &str {
    path.iter()
        .rev()
        .find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        })
        .unwrap_or("")
}

/// Whether `text` has `key` as a word of its own (not inside a longer name: `ms` is not in
/// `min_ms`).
pub fn mentions(text: &str, key: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    !key.is_empty()
        && text.match_indices(key).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + key.len()..].chars().next();
            !before.is_some_and(word) && !after.is_some_and(word)
        })
}

/// A deterministic runner configuration: `cases` cases from a fixed seed, nothing written to disk.
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5eed_c0f1),
        ..Config::default()
    }
}

/// The text broken at random: truncated, a span deleted, or stray TOML-ish characters inserted.
pub fn garble(text: String) -> impl Strategy<Value = String> {
    let len = text.len();
    let noise = proptest::collection::vec(
        prop::sample::select(vec![
            "=", "[", "]", "[[", "{", "}", ",", "\"", "'", ".", "\n", "#", " ", "x", "-1", "1e999",
            "true", "\u{0}", "é", "\"\"\"", "\\",
        ]),
        0..4,
    );
    (0..=len, 0..=len, noise, 0..3u8).prop_map(move |(a, b, noise, how)| {
        let (from, to) = (a.min(b), a.max(b));
        let floor = |i: usize| {
            (0..=i)
                .rev()
                .find(|&j| text.is_char_boundary(j))
                .unwrap_or(0)
        };
        let (from, to) = (floor(from), floor(to));
        match how {
            0 => text[..from].to_string(),
            1 => format!("{}{}", &text[..from], &text[to..]),
            _ => format!("{}{}{}", &text[..from], noise.concat(), &text[from..]),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::{Table, Value};

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i32>().prop_map(|i| Value::Integer(i.into())),
            (-1e6..1e6f64).prop_map(Value::Float),
            "[a-z' \"]{0,6}".prop_map(Value::String),
            any::<bool>().prop_map(Value::Boolean),
            proptest::collection::vec(any::<i8>().prop_map(|i| Value::Integer(i.into())), 0..3)
                .prop_map(Value::Array),
        ]
    }

    fn table() -> impl Strategy<Value = Table> {
        let key = "[a-z]{1,3}|\"[a-z ]{1,4}\"".prop_map(|k| k.trim_matches('"').to_string());
        leaf()
            .prop_recursive(3, 24, 4, move |inner| {
                prop_oneof![
                    proptest::collection::btree_map(key.clone(), inner.clone(), 0..4)
                        .prop_map(|m| Value::Table(m.into_iter().collect())),
                    proptest::collection::vec(
                        proptest::collection::btree_map(key.clone(), inner, 0..3)
                            .prop_map(|m| Value::Table(m.into_iter().collect())),
                        1..3
                    )
                    .prop_map(Value::Array),
                ]
            })
            .prop_map(|v| match v {
                Value::Table(t) => t,
                other => [("x".to_string(), other)].into_iter().collect(),
            })
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn every_style_reads_back_as_the_same_table(t in table(), tables in style()) {
            let style = Style { whole_floats_as_integers: false, ..tables };
            let rendered = render(&t, style);
            let back: Table = rendered.text.parse().map_err(|e| {
                TestCaseError::fail(format!("{e}\n{}", rendered.text))
            })?;
            prop_assert_eq!(&back, &t, "{}", rendered.text);
            for leaf in leaves(&t) {
                prop_assert!(rendered.line_of(&leaf).is_some(), "{:?}", leaf);
            }
        }
    }

    #[test]
    fn paths_read_back() {
        let p = path("machines[2].faults.hang");
        assert_eq!(path_string(&p), "machines[2].faults.hang");
        assert_eq!(last_key(&p), "hang");
    }
}

#[cfg(test)]
mod forms {
    use super::*;

    const DOC: &str = r#"
top = 1.0
[a.b]
c = "x"
[[a.list]]
d = 1
"#;

    fn rendered(tables: Tables, whole: bool) -> String {
        let table: toml::Table = DOC.parse().unwrap();
        let style = Style {
            tables,
            whole_floats_as_integers: whole,
            literal_strings: whole,
        };
        render(&table, style).text
    }

    #[test]
    fn each_style_has_its_form() {
        assert_eq!(
            rendered(Tables::Inline, false),
            "a = { b = { c = \"x\" }, list = [{ d = 1 }] }\ntop = 1.0\n"
        );
        assert_eq!(
            rendered(Tables::Headers, true),
            "top = 1\n[a]\n[a.b]\nc = 'x'\n[[a.list]]\nd = 1\n"
        );
        assert_eq!(
            rendered(Tables::Implicit, false),
            "top = 1.0\n[a.b]\nc = \"x\"\n[[a.list]]\nd = 1\n"
        );
        assert_eq!(
            rendered(Tables::Dotted, false),
            "a.b.c = \"x\"\na.list = [{ d = 1 }]\ntop = 1.0\n"
        );
    }
}
