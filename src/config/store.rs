//! Where the controller keeps its state (`[controller] database` or `store`), and the lease by which
//! controllers sharing a store decide which of them leads.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The controller's store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// A SQLite file, created when missing.
    Sqlite(PathBuf),
    /// SQLite in memory (lost on exit).
    Memory,
    /// A PostgreSQL database shared by the controllers of several hosts.
    Postgres(Box<PgTarget>),
}

impl StoreLocation {
    /// SQLite at `path`; `:memory:` keeps it in memory.
    pub fn sqlite(path: PathBuf) -> StoreLocation {
        if path.as_os_str() == ":memory:" {
            StoreLocation::Memory
        } else {
            StoreLocation::Sqlite(path)
        }
    }

    /// Whether several controllers can share it (and so must hold a lease to act).
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Memory => f.write_str(":memory:"),
            StoreLocation::Postgres(target) => f.write_str(&target.shown),
        }
    }
}

/// A PostgreSQL connection target, parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    /// The URL without its password, for logs and errors.
    pub shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PartialEq for PgTarget {
    fn eq(&self, other: &PgTarget) -> bool {
        self.shown == other.shown && self.config.get_password() == other.config.get_password()
    }
}

/// How long the server may take to accept a connection before the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl FromStr for PgTarget {
    type Err = String;

    /// `postgres://user[:password]@host[:port]/database[?options]` (also `postgresql://`).
    fn from_str(url: &str) -> Result<PgTarget, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("expected a postgres://user@host:port/database URL".to_string());
        }
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err("the URL names no host".to_string());
        }
        let Some(user) = config.get_user().map(str::to_string) else {
            return Err("the URL names no user (postgres://USER@host/database)".to_string());
        };
        let Some(database) = config.get_dbname().map(str::to_string) else {
            return Err("the URL names no database (postgres://user@host/DATABASE)".to_string());
        };
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("understudy");
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let shown = format!("postgres://{user}@{host}:{port}/{database}");
        Ok(PgTarget { config, shown })
    }
}

/// The lease controllers sharing a store hold to lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease lasts unless renewed; it is renewed every third of it, and a standby
    /// asks for it as often.
    pub period: Duration,
    /// This controller's name in the lease (unique among the controllers of one store).
    pub name: String,
    /// The admin URL others are told to send mutations to while this controller leads (default:
    /// `http://` and the bound admin address).
    pub advertise_url: Option<String>,
}

impl LeaseSettings {
    /// How often the leader renews and a standby asks.
    pub fn poll(&self) -> Duration {
        self.period / 3
    }
}

/// A name for this controller when the file gives none: the host and the process.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_is_parsed_and_shown_without_its_password() {
        let t: PgTarget = "postgres://ops:secret@db.internal:6543/understudy"
            .parse()
            .unwrap();
        assert_eq!(t.shown, "postgres://ops@db.internal:6543/understudy");
        assert_eq!(t.config.get_password(), Some(&b"secret"[..]));
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn a_bad_store_url_is_refused_with_what_is_wrong() {
        let cases = [
            ("mysql://x@h/db", "expected a postgres://"),
            ("postgres://h/db", "names no user"),
            ("postgres://u@h", "names no database"),
            ("postgres://u@h:notaport/db", "not a PostgreSQL URL"),
        ];
        for (url, want) in cases {
            let err = url.parse::<PgTarget>().unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
    }
}
