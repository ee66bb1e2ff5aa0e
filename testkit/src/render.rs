//! A table written out in one of its equivalent TOML forms.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use proptest::prelude::*;
use toml::{Table, Value};

use crate::{path_string, KeyPath, Seg};

/// How tables (and arrays of tables) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// `key = { ... }` and inline arrays of inline tables.
    Inline,
    /// A `[header]` for every table, `[[header]]` sections for arrays of tables.
    Headers,
    /// Headers, but a table whose keys are all sub-tables gets none (it is implied by theirs).
    Implicit,
    /// Dotted keys (`a.b.c = 1`) wherever a table would have a header.
    Dotted,
    /// Each table its own form, drawn from the seed.
    Mixed(u64),
}

/// One way of writing a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub tables: Tables,
    /// A float without a fractional part written as an integer (`2` for `2.0`).
    pub whole_floats_as_integers: bool,
    /// Strings as literal strings (`'v1'`) where they can be.
    pub literal_strings: bool,
}

impl Style {
    pub fn plain(tables: Tables) -> Style {
        Style {
            tables,
            whole_floats_as_integers: false,
            literal_strings: false,
        }
    }
}

/// Any style.
pub fn style() -> impl Strategy<Value = Style> {
    let tables = prop_oneof![
        Just(Tables::Inline),
        Just(Tables::Headers),
        Just(Tables::Implicit),
        Just(Tables::Dotted),
        any::<u64>().prop_map(Tables::Mixed),
    ];
    (tables, any::<bool>(), any::<bool>()).prop_map(|(tables, ints, literal)| Style {
        tables,
        whole_floats_as_integers: ints,
        literal_strings: literal,
    })
}

/// A rendered document and the line (1-based) each leaf is written on.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    lines: BTreeMap<String, usize>,
}

impl Rendered {
    /// The line `path` (a leaf) is written on.
    pub fn line_of(&self, path: &[Seg]) -> Option<usize> {
        self.lines.get(&path_string(path)).copied()
    }
}

/// Writes `table` in `style`.
pub fn render(table: &Table, style: Style) -> Rendered {
    let mut w = Writer {
        style,
        lines: Vec::new(),
        leaves: BTreeMap::new(),
    };
    w.section(&mut Vec::new(), "", table, Header::None);
    let mut text = w.lines.join("\n");
    text.push('\n');
    Rendered {
        text,
        lines: w.leaves,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Form {
    Header,
    Implicit,
    Dotted,
    Inline,
}

#[derive(Clone, Copy, PartialEq)]
enum Header {
    None,
    Table,
    ArrayElement,
}

fn is_table_array(value: &Value) -> bool {
    matches!(value, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_table))
}

fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn joined(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        key(k)
    } else {
        format!("{prefix}.{}", key(k))
    }
}

struct Writer {
    style: Style,
    lines: Vec<String>,
    leaves: BTreeMap<String, usize>,
}

impl Writer {
    fn form(&self, path: &[Seg]) -> Form {
        match self.style.tables {
            Tables::Inline => Form::Inline,
            Tables::Headers => Form::Header,
            Tables::Implicit => Form::Implicit,
            Tables::Dotted => Form::Dotted,
            Tables::Mixed(seed) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (seed, path_string(path)).hash(&mut h);
                [Form::Header, Form::Implicit, Form::Dotted, Form::Inline]
                    [(h.finish() % 4) as usize]
            }
        }
    }

    fn push(&mut self, line: String) {
        self.lines.push(line);
    }

    fn next_line(&self) -> usize {
        self.lines.len() + 1
    }

    /// A table's keys under its header (if any), then its sub-tables' sections.
    fn section(&mut self, at: &mut KeyPath, header_keys: &str, table: &Table, header: Header) {
        // Without a header only sub-tables with headers of their own may follow.
        let implicit = header == Header::Table
            && self.form(at) == Form::Implicit
            && !table.is_empty()
            && table.values().all(|v| v.is_table() || is_table_array(v));
        match header {
            Header::Table if !implicit => self.push(format!("[{header_keys}]")),
            Header::ArrayElement => self.push(format!("[[{header_keys}]]")),
            _ => {}
        }
        let mut later: Vec<(&String, &Value, Form)> = Vec::new();
        for (k, v) in table {
            at.push(Seg::Key(k.clone()));
            let mut form = self.form(at);
            if implicit && matches!(form, Form::Inline | Form::Dotted) {
                form = Form::Header;
            }
            match v {
                Value::Table(t) if form == Form::Dotted && !t.is_empty() => {
                    self.dotted(at, &key(k), t)
                }
                Value::Table(_) | Value::Array(_)
                    if (v.is_table() || is_table_array(v))
                        && matches!(form, Form::Header | Form::Implicit) =>
                {
                    later.push((k, v, form))
                }
                _ => self.assign(at, &key(k), v),
            }
            at.pop();
        }
        for (k, v, _) in later {
            at.push(Seg::Key(k.clone()));
            let keys = joined(header_keys, k);
            match v {
                Value::Table(t) => self.section(at, &keys, t, Header::Table),
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        at.push(Seg::Index(i));
                        if let Value::Table(t) = item {
                            self.section(at, &keys, t, Header::ArrayElement);
                        }
                        at.pop();
                    }
                }
                _ => {}
            }
            at.pop();
        }
    }

    /// `prefix.k = v` for every key below a table written with dotted keys.
    fn dotted(&mut self, at: &mut KeyPath, prefix: &str, table: &Table) {
        for (k, v) in table {
            at.push(Seg::Key(k.clone()));
            let keys = format!("{prefix}.{}", key(k));
            match v {
                Value::Table(t) if !t.is_empty() && self.form(at) != Form::Inline => {
                    self.dotted(at, &keys, t)
                }
                _ => self.assign(at, &keys, v),
            }
            at.pop();
        }
    }

    fn assign(&mut self, at: &mut KeyPath, keys: &str, value: &Value) {
        let line = self.next_line();
        let text = self.inline(at, value, line);
        self.push(format!("{keys} = {text}"));
    }

    /// A value on one line, recording the line of each leaf in it.
    fn inline(&mut self, at: &mut KeyPath, value: &Value, line: usize) -> String {
        match value {
            Value::Table(t) => {
                let mut parts = Vec::new();
                for (k, v) in t {
                    at.push(Seg::Key(k.clone()));
                    parts.push(format!("{} = {}", key(k), self.inline(at, v, line)));
                    at.pop();
                }
                if parts.is_empty() {
                    "{}".to_string()
                } else {
                    format!("{{ {} }}", parts.join(", "))
                }
            }
            Value::Array(items) if is_table_array(value) => {
                let mut parts = Vec::new();
                for (i, v) in items.iter().enumerate() {
                    at.push(Seg::Index(i));
                    parts.push(self.inline(at, v, line));
                    at.pop();
                }
                format!("[{}]", parts.join(", "))
            }
            _ => {
                self.leaves.insert(path_string(at), line);
                self.scalar(value)
            }
        }
    }

    fn scalar(&self, value: &Value) -> String {
        match value {
            Value::Float(f)
                if self.style.whole_floats_as_integers
                    && f.is_finite()
                    && f.fract() == 0.0
                    && f.abs() < 1e15 =>
            {
                format!("{}", *f as i64)
            }
            Value::String(s)
                if self.style.literal_strings
                    && !s.contains(['\'', '\n', '\r'])
                    && !s.chars().any(char::is_control) =>
            {
                format!("'{s}'")
            }
            Value::Array(items) => {
                let parts: Vec<String> = items.iter().map(|v| self.scalar(v)).collect();
                format!("[{}]", parts.join(", "))
            }
            Value::Table(_) => "{}".to_string(),
            other => other.to_string(),
        }
    }
}
