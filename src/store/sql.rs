//! One SQL surface over the two databases the controller keeps its state in: SQLite (one host, the
//! default) and PostgreSQL (shared by controllers on several hosts, [`super::postgres`]). Every
//! statement of the store is written once, in the dialect both accept (`?N` parameters, rewritten
//! to `$N` for PostgreSQL; `INSERT ... RETURNING`; `ON CONFLICT ... DO UPDATE`), and every value
//! crosses as one of three kinds: integers (u64 stored bit for bit in an i64), text and null.

use rusqlite::types::{ToSqlOutput, ValueRef};

use super::postgres::PgHandle;
use super::StoreError;

/// A value bound to a statement or read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    /// Bit for bit: both databases store 64-bit signed integers.
    fn from(v: u64) -> Value {
        Value::Int(v as i64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v.into())
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// `vals![a, b]`: the parameters of a statement, each converted into a [`Value`].
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::store::sql::Value::from($v)),*] };
}
pub(crate) use vals;

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// One row of a result, its columns in the statement's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub(super) Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("column {i} missing from a row")))
    }

    fn wrong(&self, i: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!(
            "column {i}: {want} expected, found {:?}",
            self.0[i]
        ))
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Text(_) => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }

    pub fn u64(&self, i: usize) -> Result<u64, StoreError> {
        Ok(self.i64(i)? as u64)
    }

    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.i64(i)? != 0)
    }

    pub fn opt_bool(&self, i: usize) -> Result<Option<bool>, StoreError> {
        Ok(self.opt_i64(i)?.map(|v| v != 0))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            Value::Int(_) => Err(self.wrong(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }

    /// A column of JSON text, or none when null.
    pub fn opt_json<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
    ) -> Result<Option<T>, StoreError> {
        self.opt_text(i)?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A column of JSON text.
    pub fn json<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T, StoreError> {
        self.opt_json(i)?.ok_or_else(|| self.wrong(i, "JSON text"))
    }
}

/// Which database a statement goes to, for the few statements their dialects write differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A connection, or a transaction, on either database.
#[derive(Clone, Copy)]
pub enum Conn<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(PgHandle<'a>),
}

/// What store functions run their statements on: a connection or a transaction, and the store's
/// retention of registry revisions (kept by whoever appends one).
#[derive(Clone, Copy)]
pub struct Sql<'a> {
    pub(super) conn: Conn<'a>,
    /// Registry revisions kept per machine (0: all).
    pub(super) keep_revisions: i64,
}

impl<'a> Sql<'a> {
    pub fn dialect(&self) -> Dialect {
        match self.conn {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs a statement; returns how many rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        match self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Conn::Postgres(pg) => pg.execute(sql, params),
        }
    }

    /// Runs a query; returns every row.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match self.conn {
            Conn::Sqlite(c) => sqlite_query(c, sql, params),
            Conn::Postgres(pg) => pg.query(sql, params),
        }
    }

    /// Runs a query expected to give one row at most.
    pub fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs a query expected to give exactly one row.
    pub fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from `{}`", first_line(sql))))
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

fn sqlite_query(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(columns);
        for i in 0..columns {
            row.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "column {i}: unexpected {:?}",
                        other.data_type()
                    )))
                }
            });
        }
        out.push(Row(row));
    }
    Ok(out)
}

/// A statement's text for PostgreSQL: its `?N` parameters become `$N` (no statement of the store
/// has a `?` anywhere else).
pub fn postgres_text(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_for_postgres_and_nothing_else_changes() {
        assert_eq!(
            postgres_text("UPDATE t SET a = ?2, b = '?' WHERE id = ?10"),
            "UPDATE t SET a = $2, b = '?' WHERE id = $10"
        );
    }

    #[test]
    fn values_round_trip_through_sqlite_as_the_kinds_they_were() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(a INTEGER, b TEXT, c INTEGER)")
            .unwrap();
        let sql = Sql {
            conn: Conn::Sqlite(&conn),
            keep_revisions: 0,
        };
        let big = u64::MAX - 3;
        sql.execute(
            "INSERT INTO t(a, b, c) VALUES (?1, ?2, ?3)",
            vals![big, "x", None::<i64>],
        )
        .unwrap();
        let row = sql.query_one("SELECT a, b, c FROM t", &[]).unwrap();
        assert_eq!(row.u64(0).unwrap(), big);
        assert_eq!(row.text(1).unwrap(), "x");
        assert_eq!(row.opt_i64(2).unwrap(), None);
        assert!(row.text(0).is_err(), "an integer is not read as text");
        assert!(row.i64(2).is_err(), "a null is not read as an integer");
    }
}
