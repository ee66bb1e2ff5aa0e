//! Paths into a table and the changes a person makes to a config by mistake.

use toml::{Table, Value};

use crate::{KeyPath, Seg};

fn step<'a>(value: &'a Value, seg: &Seg) -> Option<&'a Value> {
    match (value, seg) {
        (Value::Table(t), Seg::Key(k)) => t.get(k),
        (Value::Array(a), Seg::Index(i)) => a.get(*i),
        _ => None,
    }
}

fn step_mut<'a>(value: &'a mut Value, seg: &Seg) -> Option<&'a mut Value> {
    match (value, seg) {
        (Value::Table(t), Seg::Key(k)) => t.get_mut(k),
        (Value::Array(a), Seg::Index(i)) => a.get_mut(*i),
        _ => None,
    }
}

/// The value at `path`.
pub fn get<'a>(table: &'a Table, path: &[Seg]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let Seg::Key(k) = first else { return None };
    rest.iter().try_fold(table.get(k)?, step)
}

/// The table (or array) holding the last step of `path`.
fn parent_mut<'a>(table: &'a mut Table, path: &[Seg]) -> Option<(&'a mut Value, Seg)> {
    let (last, init) = path.split_last()?;
    let (first, rest) = init.split_first()?;
    let Seg::Key(k) = first else { return None };
    let parent = rest.iter().try_fold(table.get_mut(k)?, step_mut)?;
    Some((parent, last.clone()))
}

/// Sets the value at `path`: replaces it, or adds it to the table that would hold it.
pub fn set(table: &mut Table, path: &[Seg], value: Value) -> bool {
    if let [Seg::Key(k)] = path {
        table.insert(k.clone(), value);
        return true;
    }
    match parent_mut(table, path) {
        Some((Value::Table(t), Seg::Key(k))) => {
            t.insert(k, value);
            true
        }
        Some((Value::Array(a), Seg::Index(i))) if i < a.len() => {
            a[i] = value;
            true
        }
        _ => false,
    }
}

/// Removes the value at `path` (a key of a table; array elements are left alone).
pub fn remove(table: &mut Table, path: &[Seg]) -> Option<Value> {
    if let [Seg::Key(k)] = path {
        return table.remove(k);
    }
    match parent_mut(table, path)? {
        (Value::Table(t), Seg::Key(k)) => t.remove(&k),
        _ => None,
    }
}

fn is_table_array(value: &Value) -> bool {
    matches!(value, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_table))
}

fn walk(value: &Value, at: &mut KeyPath, leaves: &mut Vec<KeyPath>, tables: &mut Vec<KeyPath>) {
    match value {
        Value::Table(t) => {
            tables.push(at.clone());
            for (k, v) in t {
                at.push(Seg::Key(k.clone()));
                walk(v, at, leaves, tables);
                at.pop();
            }
        }
        Value::Array(a) if is_table_array(value) => {
            for (i, v) in a.iter().enumerate() {
                at.push(Seg::Index(i));
                walk(v, at, leaves, tables);
                at.pop();
            }
        }
        _ => leaves.push(at.clone()),
    }
}

fn walk_all(table: &Table) -> (Vec<KeyPath>, Vec<KeyPath>) {
    let (mut leaves, mut tables) = (Vec::new(), Vec::new());
    walk(
        &Value::Table(table.clone()),
        &mut Vec::new(),
        &mut leaves,
        &mut tables,
    );
    (leaves, tables)
}

/// Every leaf: a value that is neither a table nor an array of tables (an array of numbers is
/// one leaf).
pub fn leaves(table: &Table) -> Vec<KeyPath> {
    walk_all(table).0
}

/// Every table, the root (`[]`) and the elements of arrays of tables included.
pub fn tables(table: &Table) -> Vec<KeyPath> {
    walk_all(table).1
}

/// A value no field typed like `value` accepts: a number becomes a string, a string or a table
/// a number, a boolean a string, an array a boolean.
pub fn other_type(value: &Value) -> Value {
    match value {
        Value::Integer(_) | Value::Float(_) => Value::String("seven".into()),
        Value::Boolean(_) => Value::String("yes".into()),
        Value::String(_) | Value::Datetime(_) | Value::Table(_) => Value::Integer(7),
        Value::Array(_) => Value::Boolean(true),
    }
}
