//! A valid document broken in one place, and the check that the parser refuses it by name.

use std::fmt::{Debug, Display};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use toml::{Table, Value};

use crate::{get, last_key, leaves, other_type, path_string, remove, render, set, KeyPath, Seg};

/// One way to break a valid document.
#[derive(Debug, Clone)]
pub enum Break {
    /// A value of another type at a leaf.
    Retype(KeyPath),
    /// A key the table at the path does not have (all its keys are fields).
    Unknown(KeyPath, String),
    /// A leaf removed: either a default applies or the error names it (or its table).
    Remove(KeyPath),
}

/// Any break of `table`; unknown keys go into one of `field_tables` (tables whose keys are
/// fields, not names such as services).
pub fn breaks(table: &Table, field_tables: Vec<KeyPath>) -> BoxedStrategy<Break> {
    let leaves = leaves(table);
    let mut choices = vec![
        prop::sample::select(leaves.clone())
            .prop_map(Break::Retype)
            .boxed(),
        prop::sample::select(leaves).prop_map(Break::Remove).boxed(),
    ];
    if !field_tables.is_empty() {
        choices.push(
            (prop::sample::select(field_tables), "zz_[a-z]{1,5}")
                .prop_map(|(t, k)| Break::Unknown(t, k))
                .boxed(),
        );
    }
    prop::strategy::Union::new(choices).boxed()
}

/// How a parser's error is read by [`check_break`].
pub struct Naming<E> {
    /// Whether the error names this key (as a field, or quoted in its message).
    pub names: fn(&E, &str) -> bool,
    /// The line the error points at, if it gives one.
    pub line: fn(&E) -> Option<usize>,
}

/// Applies `what` to `table`, renders it in `style` and checks `parse`: a broken document is
/// refused (a removed key may have a default) with an error naming the key, on its line when the
/// error gives a line and the key was written on one.
pub fn check_break<T: Debug, E: Display>(
    mut table: Table,
    what: &Break,
    style: crate::Style,
    parse: impl Fn(&str) -> Result<T, E>,
    naming: &Naming<E>,
) -> Result<(), TestCaseError> {
    let path = match what {
        Break::Retype(path) => {
            let old = get(&table, path).expect("a leaf").clone();
            set(&mut table, path, other_type(&old));
            path.clone()
        }
        Break::Unknown(at, key) => {
            let mut path = at.clone();
            path.push(Seg::Key(key.clone()));
            set(&mut table, &path, Value::Integer(1));
            path
        }
        Break::Remove(path) => {
            remove(&mut table, path);
            path.clone()
        }
    };
    let key = last_key(&path);
    let rendered = render(&table, style);
    let error = match parse(&rendered.text) {
        Ok(_) if matches!(what, Break::Remove(_)) => return Ok(()),
        Ok(value) => {
            return Err(TestCaseError::fail(format!(
                "{what:?} accepted: {value:?}\n{}",
                rendered.text
            )))
        }
        Err(e) => e,
    };
    let context = || format!("{what:?}: {error}\n{}", rendered.text);
    if let Break::Remove(_) = what {
        // A key another one requires, or whose table is left incomplete: it or its table.
        let parent = last_key(&path[..path.len() - 1]);
        let named =
            (naming.names)(&error, key) || (!parent.is_empty() && (naming.names)(&error, parent));
        prop_assert!(
            named,
            "neither `{}` nor its table named: {}",
            key,
            context()
        );
        return Ok(());
    }
    prop_assert!(
        (naming.names)(&error, key),
        "`{}` not named: {}",
        key,
        context()
    );
    if let (Some(want), Some(got)) = (rendered.line_of(&path), (naming.line)(&error)) {
        prop_assert_eq!(
            want,
            got,
            "{} is on line {}: {}",
            path_string(&path),
            want,
            context()
        );
    }
    Ok(())
}
