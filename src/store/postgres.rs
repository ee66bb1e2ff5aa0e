//! The store on PostgreSQL, shared by the controllers of several hosts.
//!
//! The controller's state sits behind one lock and is used from synchronous code, so this module
//! gives tokio-postgres a synchronous face: the connection's I/O task runs on a small runtime of its
//! own ([`runtime`]), and a caller blocks on the client's futures (which only talk to that task over
//! channels) with a deadline, like a SQLite call blocks on its file. A connection that failed or
//! timed out is dropped and made again at the next call, so a restarted server is picked up again
//! without a restart of the controller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::{select, Either};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement, Transaction};

use super::sql::{postgres_text, Conn, Row, Sql, Value};
use super::StoreError;
use crate::config::store::PgTarget;

/// How long one call may wait on the server before the connection is given up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The runtime that drives every PostgreSQL connection's I/O.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("understudy-postgres")
            .enable_all()
            .build()
            .expect("the PostgreSQL I/O runtime starts")
    })
}

/// A connection to the shared store, made again when it broke.
pub struct PgConn {
    target: PgTarget,
    client: Mutex<Option<Client>>,
    /// Prepared statements of the current connection, by their text.
    statements: Mutex<HashMap<String, Statement>>,
    /// Set when a call timed out: the connection may be mid-answer and is not used again.
    broken: AtomicBool,
    timeout: Duration,
}

/// Where a statement runs: the connection itself, or a transaction on it.
#[derive(Clone, Copy)]
pub struct PgHandle<'a> {
    conn: &'a PgConn,
    on: On<'a>,
}

#[derive(Clone, Copy)]
enum On<'a> {
    Client(&'a Client),
    Tx(&'a Transaction<'a>),
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    StoreError::Postgres(message)
}

impl PgConn {
    /// Connects (a server that cannot be reached is an error naming it).
    pub fn connect(target: &PgTarget) -> Result<PgConn, StoreError> {
        let conn = PgConn {
            target: target.clone(),
            client: Mutex::new(None),
            statements: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
            timeout: CALL_TIMEOUT,
        };
        drop(conn.connected()?);
        Ok(conn)
    }

    /// The store's address, without any password.
    pub fn shown(&self) -> &str {
        &self.target.shown
    }

    /// Blocks on `fut` until it ends or the call's deadline passes.
    fn wait<F: Future>(&self, fut: F) -> Result<F::Output, StoreError> {
        let timeout = self.timeout;
        let timer = runtime().spawn(async move { tokio::time::sleep(timeout).await });
        let fut = std::pin::pin!(fut);
        match futures_executor::block_on(select(fut, timer)) {
            Either::Left((out, timer)) => {
                timer.abort();
                Ok(out)
            }
            Either::Right(_) => {
                self.broken.store(true, Ordering::SeqCst);
                Err(StoreError::Timeout {
                    store: self.target.shown.clone(),
                    after: self.timeout,
                })
            }
        }
    }

    fn open_client(&self) -> Result<Client, StoreError> {
        let config = self.target.config.clone();
        let task = runtime().spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("PostgreSQL connection ended: {e}");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let unreachable = |reason: String| StoreError::Unreachable {
            store: self.target.shown.clone(),
            reason,
        };
        match self.wait(task) {
            Ok(Ok(Ok(client))) => Ok(client),
            Ok(Ok(Err(e))) => Err(unreachable(pg_error(e).to_string())),
            Ok(Err(join)) => Err(unreachable(join.to_string())),
            Err(StoreError::Timeout { after, .. }) => {
                Err(unreachable(format!("no answer in {after:?}")))
            }
            Err(e) => Err(e),
        }
    }

    /// The client, connected again first when it broke.
    fn connected(&self) -> Result<MutexGuard<'_, Option<Client>>, StoreError> {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let dead = match guard.as_ref() {
            None => true,
            Some(c) => c.is_closed() || self.broken.load(Ordering::SeqCst),
        };
        if dead {
            *guard = None;
            self.statements_lock().clear();
            let client = self.open_client()?;
            self.broken.store(false, Ordering::SeqCst);
            *guard = Some(client);
        }
        Ok(guard)
    }

    fn statements_lock(&self) -> MutexGuard<'_, HashMap<String, Statement>> {
        self.statements.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection (outside any transaction).
    pub fn read<T, E: From<StoreError>>(
        &self,
        keep_revisions: i64,
        f: impl FnOnce(Sql<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let guard = self.connected()?;
        let client = guard.as_ref().expect("connected");
        let handle = PgHandle {
            conn: self,
            on: On::Client(client),
        };
        f(Sql {
            conn: Conn::Postgres(handle),
            keep_revisions,
        })
    }

    /// Runs `f` in one transaction, committed when it succeeds and rolled back otherwise.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        keep_revisions: i64,
        f: impl FnOnce(Sql<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = self.connected()?;
        let client = guard.as_mut().expect("connected");
        let tx = self.wait(client.transaction())?.map_err(pg_error)?;
        let handle = PgHandle {
            conn: self,
            on: On::Tx(&tx),
        };
        let value = f(Sql {
            conn: Conn::Postgres(handle),
            keep_revisions,
        })?;
        self.wait(tx.commit())?.map_err(pg_error)?;
        Ok(value)
    }
}

impl PgHandle<'_> {
    fn statement(&self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.conn.statements_lock().get(sql) {
            return Ok(s.clone());
        }
        let text = postgres_text(sql);
        let prepared = match self.on {
            On::Client(c) => self.conn.wait(c.prepare(&text))?,
            On::Tx(t) => self.conn.wait(t.prepare(&text))?,
        }
        .map_err(pg_error)?;
        self.conn
            .statements_lock()
            .insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        match self.on {
            On::Client(c) => self.conn.wait(c.execute(&stmt, &params))?,
            On::Tx(t) => self.conn.wait(t.execute(&stmt, &params))?,
        }
        .map_err(pg_error)
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = match self.on {
            On::Client(c) => self.conn.wait(c.query(&stmt, &params))?,
            On::Tx(t) => self.conn.wait(t.query(&stmt, &params))?,
        }
        .map_err(pg_error)?;
        rows.iter().map(row_of).collect()
    }
}

fn row_of(row: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i).map(Value::from)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)
                .map(|v| Value::from(v.map(i64::from)))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)
                .map(|v| Value::from(v.map(i64::from)))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i).map(Value::from)
        } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(ty) {
            row.try_get::<_, Option<String>>(i).map(Value::from)
        } else {
            return Err(StoreError::Corrupt(format!(
                "column `{}`: unexpected type {ty}",
                column.name()
            )));
        };
        out.push(value.map_err(pg_error)?);
    }
    Ok(Row(out))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    /// Every column type the store uses takes one of the three kinds; PostgreSQL refuses a
    /// mismatch itself.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}
