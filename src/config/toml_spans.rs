//! Where things are in a config file's TOML text, whatever form they are written in.
//!
//! - [`Spanned`]: a value with its byte range in the text, like `toml::Spanned`, but readable from
//!   every form of a table. toml only knows the range of a table that has a `[header]` or is
//!   inline; an implicit table (`[behaviours.router.latency]` with no `[behaviours.router]`) or
//!   one made of dotted keys (`release.services.media = "v2"`) has none, and `toml::Spanned`
//!   then fails with `invalid type: string "latency", expected a borrowed string`. This one falls
//!   back to the range of the table's first key.
//! - [`path_at`] and [`span_of`]: the key path (`services.media.condition.min_jobs`) at a byte
//!   offset, and the range of a key path, so every error names the field and its line.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

// The names by which toml's deserializer recognizes a request for a value with its range (the
// protocol of the `serde_spanned` crate, which `toml::Spanned` is).
const NAME: &str = "$__serde_spanned_private_Spanned";
const START: &str = "$__serde_spanned_private_start";
const END: &str = "$__serde_spanned_private_end";
const VALUE: &str = "$__serde_spanned_private_value";
const FIELDS: &[&str] = &[START, END, VALUE];

/// A value and where it is written (see the module doc).
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    span: Range<usize>,
    value: T,
}

impl<T> Spanned<T> {
    pub fn new(span: Range<usize>, value: T) -> Self {
        Spanned { span, value }
    }

    /// Byte range in the text (empty at 0 when toml gave nothing to place it by).
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    pub fn get_ref(&self) -> &T {
        &self.value
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_struct(NAME, FIELDS, SpannedVisitor(PhantomData))
    }
}

struct SpannedVisitor<T>(PhantomData<T>);

/// A value without a range: toml gave none (a value read from a `toml::Value`, for one).
fn unplaced<'de, T: Deserialize<'de>, E: de::Error>(
    d: impl Deserializer<'de, Error = E>,
) -> Result<Spanned<T>, E> {
    T::deserialize(d).map(|value| Spanned::new(0..0, value))
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for SpannedVisitor<T> {
    type Value = Spanned<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Spanned<T>, A::Error> {
        let Some((first, first_span)) = map.next_key_seed(KeySeed)? else {
            return unplaced(MapAccessDeserializer::new(map));
        };
        if first != START {
            // A table toml could not place: placed by its first key, read with that key put back.
            let span = first_span.unwrap_or(0..0);
            let rest = Replay {
                first: Some(first),
                map,
            };
            return T::deserialize(MapAccessDeserializer::new(rest))
                .map(|value| Spanned::new(span, value));
        }
        let start: usize = map.next_value()?;
        let mut end = None;
        let mut value = None;
        while let Some((key, _)) = map.next_key_seed(KeySeed)? {
            match key.as_str() {
                END => end = Some(map.next_value()?),
                VALUE => value = Some(map.next_value()?),
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        let end = end.ok_or_else(|| de::Error::missing_field(END))?;
        let value = value.ok_or_else(|| de::Error::missing_field(VALUE))?;
        Ok(Spanned::new(start..end, value))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Spanned<T>, E> {
        unplaced(v.into_deserializer())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Spanned<T>, E> {
        unplaced(v.into_deserializer())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Spanned<T>, E> {
        unplaced(v.into_deserializer())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Spanned<T>, E> {
        unplaced(v.into_deserializer())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Spanned<T>, E> {
        unplaced(v.to_string().into_deserializer())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Spanned<T>, E> {
        unplaced(v.into_deserializer())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Spanned<T>, A::Error> {
        unplaced(SeqAccessDeserializer::new(seq))
    }
}

/// A map key with its range when toml has one (toml places keys by the same protocol).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = (String, Option<Range<usize>>);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_struct(NAME, FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = (String, Option<Range<usize>>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((v.to_string(), None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut start, mut end, mut key) = (None, None, None);
        while let Some(name) = map.next_key::<String>()? {
            match name.as_str() {
                START => start = Some(map.next_value::<usize>()?),
                END => end = Some(map.next_value::<usize>()?),
                VALUE => key = Some(map.next_value::<String>()?),
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        let key = key.ok_or_else(|| de::Error::missing_field(VALUE))?;
        Ok((key, start.zip(end).map(|(s, e)| s..e)))
    }
}

/// The rest of a map with the key already read put back in front.
struct Replay<A> {
    first: Option<String>,
    map: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => self.map.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

// ---- key paths ----

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// `services.media.join_steps`, `machines[0].id`, `dwell.limits."error state failure"`.
pub fn path_text(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Steps from dotted text with indices (`faults.hang.fraction`, `dependencies[0]`); keys are bare.
pub fn parse_path(text: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in text.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Step::Key(key.to_string()));
        }
        for index in pieces {
            match index.trim_end_matches(']').parse() {
                Ok(i) => out.push(Step::Index(i)),
                Err(_) => out.push(Step::Key(index.to_string())),
            }
        }
    }
    out
}

/// The deepest key path whose key or value covers `offset` in `text` (none when the text is not
/// TOML, or nothing there belongs to a key).
pub fn path_at(text: &str, offset: usize) -> Option<Vec<Step>> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut best: Option<Vec<Step>> = None;
    let mut at = Vec::new();
    visit_table(doc.as_table(), &mut at, &mut |path, span| {
        let covers = span.start <= offset && (offset < span.end || offset == span.start);
        if covers && best.as_ref().is_none_or(|b| path.len() >= b.len()) {
            best = Some(path.to_vec());
        }
    });
    best.filter(|p| !p.is_empty())
}

/// Where the key of `path` is written (its value's range for an array element).
pub fn span_of(text: &str, path: &[Step]) -> Option<Range<usize>> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut found = None;
    let mut at = Vec::new();
    visit_table(doc.as_table(), &mut at, &mut |p, span| {
        if p == path && found.is_none() {
            found = Some(span);
        }
    });
    found
}

type Seen<'a> = dyn FnMut(&[Step], Range<usize>) + 'a;

/// Calls `seen` with every key's range and every value's, table's and element's range, in order.
fn visit_table(table: &dyn toml_edit::TableLike, at: &mut Vec<Step>, seen: &mut Seen<'_>) {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        at.push(Step::Key(name.to_string()));
        if let Some(span) = key.span() {
            seen(at, span);
        }
        visit_item(item, at, seen);
        at.pop();
    }
}

fn visit_item(item: &toml_edit::Item, at: &mut Vec<Step>, seen: &mut Seen<'_>) {
    if let Some(span) = item.span() {
        seen(at, span);
    }
    match item {
        toml_edit::Item::Table(t) => visit_table(t, at, seen),
        toml_edit::Item::ArrayOfTables(tables) => {
            for (i, t) in tables.iter().enumerate() {
                at.push(Step::Index(i));
                if let Some(span) = t.span() {
                    seen(at, span);
                }
                visit_table(t, at, seen);
                at.pop();
            }
        }
        toml_edit::Item::Value(v) => visit_value(v, at, seen),
        toml_edit::Item::None => {}
    }
}

fn visit_value(value: &toml_edit::Value, at: &mut Vec<Step>, seen: &mut Seen<'_>) {
    match value {
        toml_edit::Value::InlineTable(t) => visit_table(t, at, seen),
        toml_edit::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                at.push(Step::Index(i));
                if let Some(span) = v.span() {
                    seen(at, span);
                }
                visit_value(v, at, seen);
                at.pop();
            }
        }
        _ => {}
    }
}

/// The path serde_path_to_error tracked, as steps (unknown steps end it).
pub fn steps_of(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .map_while(|s| match s {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

#[cfg(test)]
#[path = "toml_spans_tests.rs"]
mod tests;
