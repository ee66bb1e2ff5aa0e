//! The `understudy-proxy` binary: reads its TOML, serves, refuses a bad file with exit code 2.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_understudy-proxy");

#[tokio::test]
async fn serves_the_balancers_of_its_config_file() {
    let v1 = Machine::start("v1", Behaviour::Echo).await;
    let mut file = tempfile_in_target("good.toml");
    write!(file.1, "{}", media_config(&v1.addr.to_string(), "")).unwrap();
    let key = key_file("media.key");
    let marker = key_file("marker.key");
    let mut child = Command::new(BIN)
        .args(["--config", file.0.to_str().unwrap()])
        .args(["--key-file", &format!("media={}", key.display())])
        .args(["--marker-key-file", marker.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let admin_line = lines.next().unwrap().unwrap();
    let balancer_line = lines.next().unwrap().unwrap();
    assert!(
        admin_line.starts_with("admin http://127.0.0.1:"),
        "{admin_line}"
    );
    let listen = balancer_line
        .strip_prefix("balancer media listening on ")
        .unwrap_or_else(|| panic!("{balancer_line}"));
    let answer = Http::new()
        .job(listen.parse().unwrap(), None, "hello")
        .await;
    assert_eq!(answer.body, "v1:hello");
    // SIGTERM: a clean exit.
    kill_term(child.id());
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_file(&file.0);
}

#[test]
fn a_bad_file_exits_2_naming_the_field() {
    let mut file = tempfile_in_target("bad.toml");
    write!(file.1, "{}", media_config("127.0.0.1:9", "weight = 0")).unwrap();
    let out = Command::new(BIN)
        .args(["--config", file.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("balancers[0].config.machines[0].weight"),
        "{err}"
    );
}

/// Without keys the binary does not start, unless told to run insecure (then it warns).
#[test]
fn without_keys_it_refuses_to_start_unless_told_to_run_insecure() {
    let mut file = tempfile_in_target("keyless.toml");
    write!(file.1, "{}", media_config("127.0.0.1:9", "")).unwrap();
    let out = Command::new(BIN)
        .args(["--config", file.0.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no key for the balancer of \"media\""),
        "{err}"
    );
    assert!(err.contains("--insecure-no-key"), "{err}");

    let mut child = Command::new(BIN)
        .args(["--config", file.0.to_str().unwrap(), "--insecure-no-key"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("admin http://"));
    kill_term(child.id());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("WARN") && log.contains("insecure-no-key"),
        "{log}"
    );
}

/// `--check` validates the file and the keys as a start would, binds nothing, and says so.
#[test]
fn check_validates_without_starting() {
    let mut file = tempfile_in_target("check.toml");
    write!(file.1, "{}", media_config("127.0.0.1:9", "")).unwrap();
    let key = key_file("check-media.key");
    let marker = key_file("check-marker.key");
    let check = |keys: &[&str]| {
        Command::new(BIN)
            .args(["--config", file.0.to_str().unwrap(), "--check"])
            .args(keys)
            .output()
            .unwrap()
    };
    let key_arg = format!("media={}", key.display());
    let good = check(&[
        "--key-file",
        &key_arg,
        "--marker-key-file",
        marker.to_str().unwrap(),
    ]);
    assert!(good.status.success(), "{good:?}");
    assert_eq!(
        String::from_utf8_lossy(&good.stdout),
        "valid: balancers of media\n"
    );
    // Without the marker key: the start would be refused, so is the check.
    let bad = check(&["--key-file", &key_arg]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no marker key"));
    // A key for a service the file does not run is named too.
    let stray = format!("billing={}", key.display());
    let bad = check(&[
        "--key-file",
        &key_arg,
        "--key-file",
        &stray,
        "--marker-key-file",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("billing"),
        "{bad:?}"
    );
}

/// A one-balancer file: `media` with one active machine at `address` (plus `extra`, a TOML line
/// in the machine's table).
fn media_config(address: &str, extra: &str) -> String {
    format!(
        r#"
admin = "127.0.0.1:0"
[[balancers]]
listen = "127.0.0.1:0"
[balancers.config]
service = "media"
version = 1
[[balancers.config.machines]]
id = "a"
version = "v1"
address = "{address}"
config = "active"
{extra}
"#
    )
}

/// A fresh key file (base64) under the target dir.
fn key_file(name: &str) -> std::path::PathBuf {
    let (path, _) = tempfile_in_target(name);
    understudy_proxy::write_key_file(&path, &understudy_hub::SecretKey::generate()).unwrap();
    path
}

/// A file under the target dir, unique per test (no tempfile crate in this package).
fn tempfile_in_target(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("understudy-proxy-{}-{name}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}

fn kill_term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
