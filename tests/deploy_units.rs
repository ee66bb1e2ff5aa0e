//! The production deployment of docs/deploy.md, checked as far as a test can without a cluster:
//! the files of `examples/deploy/` are valid for the binaries that will read them and agree with
//! each other, the two systemd units pass `systemd-analyze verify`, and every flag the guide and
//! the units show exists in the binaries' `--help`.
//!
//! The `understudy-proxy` binary belongs to another package of the workspace, so Cargo does not
//! build it for this test: it is taken from the same target directory as `understudy`
//! (`cargo build --release --workspace` builds both).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNDERSTUDY: &str = env!("CARGO_BIN_EXE_understudy");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> PathBuf {
    repo().join("examples/deploy").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `understudy-proxy` beside `understudy` in the target directory.
fn proxy_binary() -> PathBuf {
    let path = Path::new(UNDERSTUDY).with_file_name("understudy-proxy");
    assert!(
        path.is_file(),
        "{} is missing: this test reads the balancer binary of the same build; run \
         `cargo build --release --workspace` (or `cargo build --release -p understudy-proxy`) first",
        path.display()
    );
    path
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        // The token must not leak in from the environment of whoever runs the tests.
        .env_remove("UNDERSTUDY_TOKEN")
        .env_remove("UNDERSTUDY_URL")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary directory")
}

/// The example cluster file as installed: in a directory of its own with `keys/media.key` (a
/// fresh key from `understudy keygen`, as the guide makes it) beside it. Returns the directory
/// (dropped: removed) and the file.
fn installed_cluster() -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir("deploy-cluster-");
    let file = dir.path().join("cluster.toml");
    std::fs::copy(example("cluster.toml"), &file).unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let key = dir.path().join("keys/media.key");
    let made = run(Path::new(UNDERSTUDY), &["keygen", key.to_str().unwrap()]);
    assert_eq!(made.status.code(), Some(0), "{}", text(&made));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "a key file is readable by its owner only"
    );
    // A second keygen would orphan whoever holds the key: refused unless forced.
    let again = run(Path::new(UNDERSTUDY), &["keygen", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    (dir, file)
}

#[test]
fn the_cluster_example_passes_check_once_its_key_is_in_place() {
    // As shipped it holds no key, and `check` reads the key file: it must say which field.
    let shipped = run(
        Path::new(UNDERSTUDY),
        &["check", example("cluster.toml").to_str().unwrap()],
    );
    assert_eq!(shipped.status.code(), Some(2), "{}", text(&shipped));
    assert!(
        String::from_utf8_lossy(&shipped.stderr).contains("services.media.balancer_key_file"),
        "{}",
        text(&shipped)
    );

    let (_dir, file) = installed_cluster();
    let file = file.to_str().unwrap();
    let checked = run(Path::new(UNDERSTUDY), &["check", file]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(out.contains("valid: 1 services, 4 machines"), "{out}");
    assert!(out.contains("1. media"), "{out}");

    // The guide's offline plans: v2 and v3 are candidates of media.
    for version in ["v2", "v3"] {
        let target = format!("media={version}");
        let plan = run(
            Path::new(UNDERSTUDY),
            &["release", &target, "--dry-run", "--config", file],
        );
        assert_eq!(plan.status.code(), Some(0), "{}", text(&plan));
        let out = String::from_utf8_lossy(&plan.stdout);
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()[..]
                    .starts_with(&["1", "media", "v1", version])),
            "{out}"
        );
    }
}

/// `[[balancers]]` of the balancer example, by service.
fn balancer_example() -> understudy_proxy::ProcessConfig {
    let config = understudy_proxy::ProcessConfig::from_toml_str(&read(&example("balancer.toml")))
        .unwrap_or_else(|e| panic!("examples/deploy/balancer.toml: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("examples/deploy/balancer.toml: {e}"));
    config
}

#[test]
fn the_balancer_example_is_valid_and_agrees_with_the_cluster() {
    // `understudy-proxy` has no check-only flag: the file goes through the parser and the
    // validation `spawn` runs before anything starts (no socket is bound here).
    let process = balancer_example();
    let (_dir, file) = installed_cluster();
    let cluster = understudy::config::cluster::load_file(&file).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(process.balancers.len(), 1);
    let spec = &process.balancers[0];
    let media = &cluster.services["media"];
    // The controller reaches this balancer's admin port.
    assert_eq!(
        media.balancer.as_deref(),
        Some(format!("http://{}", process.admin).as_str()),
        "the cluster's balancer URL for media is not the balancer's admin address"
    );
    assert_eq!(spec.config.service, "media");
    assert!(
        spec.internal_listen.is_some(),
        "the guide relies on an internal listener"
    );
    // Any config the controller pushes (version 1 and up) replaces the file's.
    assert_eq!(spec.config.version, 0);
    assert_eq!(spec.config.mirror_fraction, 0.0);
    assert_eq!(
        spec.config.drain_timeout_ms,
        media.drain_timeout.as_millis() as u64
    );

    // The file's machines are the service's steady state: its active machines and its controls.
    let in_file: BTreeSet<(String, String, String, u32, String)> = spec
        .config
        .machines
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                m.version.clone(),
                m.address.clone(),
                m.weight,
                format!("{:?}", m.config),
            )
        })
        .collect();
    let steady: BTreeSet<(String, String, String, u32, String)> = cluster
        .machines_of("media")
        .filter(|m| {
            m.config == understudy_wire::PoolRole::Active || m.version == media.declared_version
        })
        .map(|m| {
            (
                m.id.clone(),
                m.version.clone(),
                m.address.clone(),
                m.weight,
                format!("{:?}", m.config),
            )
        })
        .collect();
    assert_eq!(in_file, steady);
    // What the guide's walk-through needs: v1 active, a v1 control, v2 and v3 candidates.
    let versions: BTreeMap<&str, (&str, String)> = cluster
        .machines_of("media")
        .map(|m| {
            (
                m.id.as_str(),
                (m.version.as_str(), format!("{:?}", m.config)),
            )
        })
        .collect();
    assert_eq!(versions["media-v1-a"], ("v1", "Active".to_string()));
    assert_eq!(
        versions["media-v1-control"],
        ("v1", "Simulation".to_string())
    );
    assert_eq!(versions["media-v2-a"], ("v2", "Simulation".to_string()));
    assert_eq!(versions["media-v3-a"], ("v3", "Simulation".to_string()));
}

/// A unit's `Key=value` lines (comments and sections left out), in order.
fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values<'a>(directives: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    directives
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The value of `--flag VALUE` in a command line.
fn flag_values<'a>(command: &'a str, flag: &str) -> Vec<&'a str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1])
        .collect()
}

#[test]
fn the_units_run_what_the_guide_describes() {
    let controller = read(&example("understudy-controller.service"));
    let proxy = read(&example("understudy-proxy.service"));
    let c = directives(&controller);
    let p = directives(&proxy);
    for (name, d) in [("controller", &c), ("proxy", &p)] {
        for (key, value) in [
            ("User", "understudy"),
            ("Group", "understudy"),
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("Environment", "NO_COLOR=1"),
            ("ReadWritePaths", "-/etc/understudy/keys"),
        ] {
            assert!(
                values(d, key).contains(&value),
                "{name} unit: no {key}={value}"
            );
        }
    }
    assert_eq!(values(&c, "StateDirectory"), ["understudy"]);
    assert!(values(&c, "ReadWritePaths").contains(&"/var/lib/understudy"));
    // The controller ends cleanly on systemd's default SIGTERM (tests/real_processes.rs stops one
    // so): no other stop signal is set.
    assert!(values(&c, "KillSignal").is_empty());

    let controller_start = values(&c, "ExecStart")[0];
    assert!(controller_start.starts_with("/usr/local/bin/understudy controller "));
    let cluster_path = Path::new(flag_values(controller_start, "--config")[0]);
    assert_eq!(cluster_path, Path::new("/etc/understudy/cluster.toml"));
    assert_eq!(
        values(&c, "ExecStartPre"),
        [format!("/usr/local/bin/understudy check {}", cluster_path.display()).as_str()]
    );
    let proxy_start = values(&p, "ExecStart")[0];
    assert!(proxy_start.starts_with("/usr/local/bin/understudy-proxy "));
    assert_eq!(
        values(&p, "ExecStartPre"),
        [format!("{proxy_start} --check").as_str()],
        "the proxy unit checks exactly what it will start"
    );
    assert_eq!(
        flag_values(proxy_start, "--config"),
        ["/etc/understudy/balancer.toml"]
    );

    // The controller's database is in the state directory, and the controller signs media's
    // configs with the very file the proxy unit gives media's balancer.
    let spec: toml::Value = toml::from_str(&read(&example("cluster.toml"))).unwrap();
    let database = Path::new(spec["controller"]["database"].as_str().unwrap());
    assert!(database.starts_with("/var/lib/understudy"), "{database:?}");
    let key_file = cluster_path.parent().unwrap().join(
        spec["services"]["media"]["balancer_key_file"]
            .as_str()
            .unwrap(),
    );
    // One --key-file per balancer of balancer.toml, and the marker key.
    let keys: BTreeMap<&str, &str> = flag_values(proxy_start, "--key-file")
        .into_iter()
        .map(|kv| kv.split_once('=').expect("--key-file SERVICE=PATH"))
        .collect();
    let services: Vec<String> = balancer_example()
        .balancers
        .iter()
        .map(|b| b.config.service.clone())
        .collect();
    assert_eq!(
        keys.keys().map(|s| s.to_string()).collect::<Vec<_>>(),
        services
    );
    assert_eq!(Path::new(keys["media"]), key_file);
    assert!(key_file.starts_with("/etc/understudy/keys"));
    assert_eq!(
        flag_values(proxy_start, "--marker-key-file"),
        ["/etc/understudy/keys/marker.key"]
    );
}

const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

/// Runs `systemd-analyze verify --man=no` on `unit` and returns what it said about the unit: every
/// output line that names the unit's file or anything of Understudy (its binaries' paths, its
/// user). A non-zero exit is a problem too.
///
/// `systemd-analyze verify` (systemd 252) exits 0 after an unknown directive or a value it cannot
/// parse (it logs `Unknown key ...`, `Failed to parse ...` and ignores the line), so the exit code
/// alone proves little: the output is what is checked. Lines about other units of the host
/// (targets the unit is ordered after) are printed, not held against it. systemd 252 does not look
/// `User=` up (no line at all for a user missing on this machine); should a later version warn
/// about the missing `understudy` user, that line is printed and tolerated, since the user is
/// created at installation (docs/deploy.md), not on the machine running the tests.
fn verify(unit: &Path) -> Vec<String> {
    let out = Command::new(SYSTEMD_ANALYZE)
        .args(["verify", "--man=no"])
        .arg(unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {SYSTEMD_ANALYZE}: {e}"));
    let name = unit.file_name().unwrap().to_str().unwrap();
    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!("exit {:?}", out.status.code()));
    }
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in all.lines().filter(|l| !l.trim().is_empty()) {
        let ours = line.contains(name) || line.to_lowercase().contains("understudy");
        let user_lookup = line.to_lowercase().contains("user")
            && line.contains("understudy")
            && !line.contains(".service:");
        if ours && !user_lookup {
            problems.push(line.to_string());
        } else {
            println!("systemd-analyze ({name}), not counted: {line}");
        }
    }
    problems
}

/// `unit` copied into `dir` with its binaries replaced by the ones of this build (verify checks
/// that every command exists and is executable).
fn with_built_binaries(dir: &Path, unit: &str) -> PathBuf {
    let quote = |p: &Path| {
        let p = p.to_str().expect("a UTF-8 target directory");
        if p.contains(char::is_whitespace) {
            format!("\"{p}\"")
        } else {
            p.to_string()
        }
    };
    let text = read(&example(unit))
        .replace("/usr/local/bin/understudy-proxy", &quote(&proxy_binary()))
        .replace(
            "/usr/local/bin/understudy ",
            &format!("{} ", quote(Path::new(UNDERSTUDY))),
        );
    assert!(!text.contains("/usr/local/bin/"), "{unit}: a path left");
    let path = dir.join(unit);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !Path::new(SYSTEMD_ANALYZE).exists() {
        println!("SKIPPED: {SYSTEMD_ANALYZE} is not installed; the units were not verified");
        return;
    }
    let dir = temp_dir("deploy-units-");
    for unit in ["understudy-controller.service", "understudy-proxy.service"] {
        let path = with_built_binaries(dir.path(), unit);
        let problems = verify(&path);
        assert!(
            problems.is_empty(),
            "systemd-analyze verify {unit}:\n{}",
            problems.join("\n")
        );
    }
    // The check itself: a misspelt directive and a missing binary must both be seen.
    let good = read(&dir.path().join("understudy-proxy.service"));
    let broken = [
        (
            "misspelt.service",
            good.replacen("NoNewPrivileges=", "NoNewPrivilege=", 1),
        ),
        (
            "nobinary.service",
            good.replacen(
                "understudy-proxy --config",
                "understudy-proxy-gone --config",
                1,
            ),
        ),
    ];
    for (name, text) in broken {
        assert_ne!(text, good, "{name}: nothing was broken");
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        assert!(
            !verify(&path).is_empty(),
            "{name}: systemd-analyze said nothing about a broken unit: the check proves nothing"
        );
    }
}

/// The help text of `understudy SUB` or `understudy-proxy`.
fn help(program: &Path, sub: Option<&str>) -> String {
    let mut args: Vec<&str> = sub.into_iter().collect();
    args.push("--help");
    let out = run(program, &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{} {args:?}: {}",
        program.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `help` lists `flag` as a whole word (`--config` is not `--config-feed-hub`).
fn lists(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        !help[at + flag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

fn flags_in(words: &[&str]) -> Vec<String> {
    words
        .iter()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.split('=')
                .next()
                .unwrap()
                .trim_end_matches([',', ')', '`'])
                .to_string()
        })
        .collect()
}

/// Command lines of the guide's code blocks and of the units' Exec lines that run `understudy` or
/// `understudy-proxy`: (program name, the words after it). Continuation lines are joined,
/// comments, prompts and leading `VAR=value` assignments dropped.
fn commands_shown() -> Vec<(String, Vec<String>)> {
    let mut lines = Vec::new();
    let guide = read(&repo().join("docs/deploy.md"));
    let mut in_block = false;
    let mut pending = String::new();
    for line in guide.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.split(" #").next().unwrap();
        match line.trim_end().strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                lines.push(std::mem::take(&mut pending));
            }
        }
    }
    for unit in ["understudy-controller.service", "understudy-proxy.service"] {
        for (key, value) in directives(&read(&example(unit))) {
            if key.starts_with("Exec") {
                lines.push(value);
            }
        }
    }
    let mut commands = Vec::new();
    for line in lines {
        let line = line.trim().trim_start_matches("$ ");
        let words: Vec<&str> = line
            .split_whitespace()
            .skip_while(|w| {
                w.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                })
            })
            .collect();
        let Some(first) = words.first() else { continue };
        let program = first.rsplit('/').next().unwrap();
        if program == "understudy" || program == "understudy-proxy" {
            commands.push((
                program.to_string(),
                words[1..].iter().map(|w| w.to_string()).collect(),
            ));
        }
    }
    commands
}

/// Flags named alone in the guide's text (`` `--insecure-no-key` ``, `` `--key-env SERVICE=VAR` ``).
fn flags_in_text() -> Vec<String> {
    let guide = read(&repo().join("docs/deploy.md"));
    let mut flags = Vec::new();
    let mut in_block = false;
    for line in guide.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && span.starts_with("--") {
                flags.extend(flags_in(&span.split_whitespace().collect::<Vec<_>>()));
            }
        }
    }
    flags
}

#[test]
fn every_flag_the_guide_and_the_units_show_exists() {
    let understudy = Path::new(UNDERSTUDY);
    let proxy = proxy_binary();
    let proxy_help = help(&proxy, None);
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    for (program, words) in commands_shown() {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let (help_text, shown) = if program == "understudy-proxy" {
            (proxy_help.clone(), "understudy-proxy".to_string())
        } else {
            let sub = words
                .first()
                .copied()
                .unwrap_or_else(|| panic!("`understudy` without a subcommand in the guide"));
            let text = helps
                .entry(sub.to_string())
                .or_insert_with(|| help(understudy, Some(sub)))
                .clone();
            (text, format!("understudy {sub}"))
        };
        for flag in flags_in(&words) {
            assert!(
                lists(&help_text, &flag),
                "`{shown}` has no flag {flag} (docs/deploy.md or a unit shows it)"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} flags found: the parser missed the commands"
    );

    // Flags named in the text: some `understudy` subcommand or `understudy-proxy` has each.
    for sub in [
        "status",
        "release",
        "approve",
        "abort",
        "rollback",
        "controller",
        "check",
        "keygen",
    ] {
        helps
            .entry(sub.to_string())
            .or_insert_with(|| help(understudy, Some(sub)));
    }
    let all: Vec<&String> = helps.values().chain([&proxy_help]).collect();
    let named = flags_in_text();
    assert!(
        named.len() >= 10,
        "only {} flags named in the text",
        named.len()
    );
    for flag in named {
        assert!(
            all.iter().any(|h| lists(h, &flag)),
            "docs/deploy.md names {flag}, which no `understudy` subcommand nor `understudy-proxy` has"
        );
    }
}
