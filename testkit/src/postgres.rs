//! A throwaway PostgreSQL server for tests: its own data directory in a temporary directory, a
//! free loopback port, trust authentication, durability off (a test's data is worth nothing
//! after it), stopped and removed when dropped.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the directory is handed to
//! the `postgres` user and the server programs run as that user (`setpriv`, which execs in place:
//! the child this module holds is the postmaster itself, so a signal to it reaches the server,
//! not a wrapper). Clients (`psql`, `pg_isready`) run as whoever runs the tests.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to accept connections after it was started.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// The user the server runs as when the tests run as root (Debian's package creates it).
const SERVER_USER: &str = "postgres";
/// The database every test gets, beside PostgreSQL's own `postgres`.
pub const DATABASE: &str = "understudy";

/// A PostgreSQL server on `127.0.0.1:port()`, user `postgres` without password, database
/// [`DATABASE`].
pub struct PgServer {
    bin: PathBuf,
    /// Holds the data directory, the socket and the log; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    /// `Some(user)`: the server programs run as this user (the tests run as root).
    as_user: Option<String>,
    postmaster: Option<Child>,
}

impl PgServer {
    /// Initialises a data directory and starts the server on a free loopback port, ready for
    /// connections, with the database [`DATABASE`] created. Panics (naming `scripts/setup.sh`)
    /// when PostgreSQL is not installed, and with the server's log when it does not start.
    pub fn start() -> PgServer {
        let bin = server_bin().unwrap_or_else(|| {
            panic!(
                "PostgreSQL's server programs (initdb, postgres) were not found in \
                 /usr/lib/postgresql/*/bin, `pg_config --bindir` or PATH: run scripts/setup.sh"
            )
        });
        let as_user = running_as_root().then(|| SERVER_USER.to_string());
        // The server user must reach the directory: under root, /tmp (world-traversable) rather
        // than a TMPDIR that might be root's own.
        let parent = match as_user {
            Some(_) => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("understudy-pg-")
            .tempdir_in(&parent)
            .unwrap_or_else(|e| panic!("cannot make a directory in {}: {e}", parent.display()));
        if let Some(user) = &as_user {
            let out = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .output()
                .expect("run chown");
            assert!(
                out.status.success(),
                "chown {user}: {}: {}",
                dir.path().display(),
                text(&out.stderr)
            );
        }
        let mut server = PgServer {
            bin,
            dir,
            port: free_port(),
            as_user,
            postmaster: None,
        };
        server.initdb();
        server.spawn();
        server.wait_ready();
        server.psql_in("postgres", &format!("create database {DATABASE}"));
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/understudy`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Whether the postmaster is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match &mut self.postmaster {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Fast shutdown: open sessions are ended, what was committed stays. Waits until the server
    /// is gone (killed if it takes longer than 30 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let gone = signal(&child, "INT") && wait_exit(&mut child, STOP_LIMIT);
            if !gone {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "PostgreSQL did not stop within {STOP_LIMIT:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Starts the stopped server again on the same data directory and port; returns once it
    /// accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.postmaster.is_none(), "the server is running");
        self.spawn();
        self.wait_ready();
    }

    /// Runs `sql` in the database [`DATABASE`] with `psql -At`: its output, without the last
    /// newline. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(DATABASE, sql)
    }

    /// [`PgServer::psql`], or psql's error when it fails (the server may be down).
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = self.psql_command(DATABASE, sql);
        if out.status.success() {
            Ok(text(&out.stdout).trim_end_matches('\n').to_string())
        } else {
            Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
        }
    }

    fn psql_in(&self, database: &str, sql: &str) -> String {
        let out = self.psql_command(database, sql);
        assert!(
            out.status.success(),
            "psql `{sql}` on port {}: {}{}\nserver log:\n{}",
            self.port,
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout).trim_end_matches('\n').to_string()
    }

    fn psql_command(&self, database: &str, sql: &str) -> Output {
        let port = self.port.to_string();
        client(&self.bin, "psql")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &port, "-U", "postgres", "-d", database, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command running server program `program` as the server's user.
    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match &self.as_user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(path);
                c
            }
            None => Command::new(path),
        };
        // The server user may not read the tests' working directory.
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }

    fn initdb(&self) {
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            // The C locale exists everywhere; a machine's LANG may name one that is not built.
            .arg("--locale=C")
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb -D {} failed: {}{}",
            self.data().display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the server log");
        let child = self
            .server_command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.postmaster = Some(child);
    }

    /// Polls until the server accepts a query; panics with its log when it exits or takes longer
    /// than 30 s.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_LIMIT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if !self.is_running() {
                let status = self.postmaster.as_mut().and_then(|c| c.try_wait().ok());
                self.postmaster = None;
                panic!(
                    "PostgreSQL exited while starting ({status:?}); log:\n{}",
                    self.log()
                );
            }
            let listening = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
            if listening && self.ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not accept connections on port {} within {READY_LIMIT:?}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        client(&self.bin, "pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-t", "2"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PgServer {
    /// Immediate shutdown (nothing is kept), then the directory goes with `dir`.
    fn drop(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let gone = signal(&child, "QUIT") && wait_exit(&mut child, Duration::from_secs(10));
            if !gone {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The directory of the server programs: Debian's newest `/usr/lib/postgresql/<major>/bin`,
/// else `pg_config --bindir`, else the directory of `initdb` on PATH.
fn server_bin() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(text(&out.stdout).trim()))
        .filter(|bin| has_server(bin));
    if from_pg_config.is_some() {
        return from_pg_config;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| has_server(dir))
}

/// A client program from the server's directory, else from PATH.
fn client(bin: &Path, program: &str) -> Command {
    let beside = bin.join(program);
    if beside.is_file() {
        Command::new(beside)
    } else {
        Command::new(program)
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A loopback port free at the time of asking.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Sends `SIG<name>` to `child`: whether it was delivered.
fn signal(child: &Child, name: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits up to `limit` for `child` to exit: whether it did.
fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_starts_stops_and_starts_again_on_its_data() {
        let mut server = PgServer::start();
        assert!(server
            .url()
            .ends_with(&format!(":{}/understudy", server.port())));
        assert_eq!(server.psql("select 1"), "1");
        server.psql("create table kept (n int); insert into kept values (7)");
        server.stop();
        assert!(!server.is_running());
        assert!(
            server.try_psql("select 1").is_err(),
            "a stopped server answered"
        );
        server.start_again();
        assert_eq!(server.psql("select n from kept"), "7", "{}", server.log());
        let dir = server.dir.path().to_path_buf();
        let pid = server.postmaster.as_ref().unwrap().id();
        drop(server);
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "postgres {pid} left running"
        );
    }

    #[test]
    fn a_panicking_test_leaves_no_server_running() {
        let pid = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = pid.clone();
        let outcome = std::thread::spawn(move || {
            let server = PgServer::start();
            *seen.lock().unwrap() = server.postmaster.as_ref().map(Child::id);
            panic!("a test failing while the server runs");
        })
        .join();
        assert!(outcome.is_err());
        let pid = pid.lock().unwrap().expect("the server started");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "postgres {pid} left running"
        );
    }
}
