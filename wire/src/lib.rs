//! The messages a balancer exchanges with the controller, as JSON over the balancer's admin HTTP port.
//!
//! The controller pushes a [`BalancerConfig`] (`PUT /api/v1/balancers/{service}/config`) and reads
//! a [`StatsReport`] since a cursor (`GET /api/v1/balancers/{service}/stats?since=CURSOR`).
//! These types are the contract between `proxy/` and `src/`; both sides use this very crate, so
//! the controller does not need the balancer (pingora) for them. Their OpenAPI schemas
//! (`utoipa::ToSchema`) are derived here too, so the balancer's document
//! (`GET /api/v1/openapi.json` on its admin port) and the controller's show these very types.
//!
//! Two helpers both sides share live here too: [`check_health_path`] (the check of a
//! [`MachineEntry::health_path`]) and [`write_key_file`] (a balancer's key file, written by the
//! balancer on rotation and by the controller's CLI).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use understudy_hub::SecretKey;
use utoipa::ToSchema;

/// Admin path of a balancer's config, for `service`.
pub fn config_path(service: &str) -> String {
    format!("/api/v1/balancers/{service}/config")
}

/// Admin path of a balancer's config key, for `service` (`PUT`: rotation, see [`KeyRotation`]).
pub fn config_key_path(service: &str) -> String {
    format!("/api/v1/balancers/{service}/config-key")
}

/// Payload of a key rotation: an envelope from the controller on the config topic, signed with
/// the balancer's CURRENT key, sent only to `PUT` [`config_key_path`] (never over the hub, since
/// it carries the next key). `Debug` does not show the key.
#[derive(Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub service: String,
    /// The next key, standard base64.
    pub rotate_key: String,
}

impl std::fmt::Debug for KeyRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRotation")
            .field("service", &self.service)
            .field("rotate_key", &"<redacted>")
            .finish()
    }
}

/// Answer to a key rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeyRotationAck {
    pub service: String,
    /// How long the previous key is still accepted (until the first config under the new one).
    pub grace_ms: u64,
}

/// Admin path of a balancer's stats, for `service`, since `cursor` (0 = from the start).
pub fn stats_path(service: &str, cursor: u64) -> String {
    format!("/api/v1/balancers/{service}/stats?since={cursor}")
}

/// Which configuration a machine is in: serving callers, or receiving mirrored copies only.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PoolRole {
    Active,
    Simulation,
}

impl PoolRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolRole::Active => "active",
            PoolRole::Simulation => "simulation",
        }
    }
}

impl std::fmt::Display for PoolRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One machine behind a balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineEntry {
    /// Unique within the config.
    #[schema(min_length = 1, example = "media-v1-a")]
    pub id: String,
    /// Software version the machine runs, e.g. "v1".
    #[schema(min_length = 1, example = "v1")]
    pub version: String,
    /// `host:port` of the machine's HTTP listener: `ip:port`, or a name resolved once when the
    /// config is applied (refused when it does not resolve within 2 s).
    #[schema(example = "127.0.0.1:7001")]
    pub address: String,
    /// Relative share of new sessions/jobs, 1..=1000 (0 is refused: remove the machine instead).
    #[serde(default = "default_weight")]
    #[schema(minimum = 1, maximum = 1000, default = 100)]
    pub weight: u32,
    pub config: PoolRole,
    /// Path the balancer probes with `GET` (an answer in 200..=399 passes); without one the
    /// probe is a TCP connect. Either way a machine failing `limits.health_fall` probes in a row
    /// gets no new caller job until a probe passes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "/healthz", pattern = "^/[!-~]*$", max_length = 1024)]
    pub health_path: Option<String>,
}

fn default_weight() -> u32 {
    100
}

/// The whole desired state of one balancer. Replaces the previous one atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "service": "media",
    "version": 2,
    "mirror_fraction": 0.5,
    "machines": [
        {"id": "media-v1-a", "version": "v1", "address": "127.0.0.1:7001", "config": "active"},
        {"id": "media-v2-a", "version": "v2", "address": "127.0.0.1:7002", "config": "simulation"}
    ]
}))]
pub struct BalancerConfig {
    /// The balancer's service: the same as in the path it is pushed to.
    #[schema(min_length = 1)]
    pub service: String,
    /// Monotonic config version; a push with a version lower than the running one is refused
    /// and a push of the running version is an idempotent no-op.
    pub version: u64,
    /// The pushing controller's fencing epoch, which grows at each takeover: a balancer refuses
    /// a config from an epoch lower than the highest it has applied (a controller that lost its
    /// lead cannot switch anything), whatever the config's version.
    #[serde(default)]
    #[schema(default = 0)]
    pub epoch: u64,
    /// Fraction of jobs copied to the simulation pool, 0.0..=1.0.
    #[serde(default = "default_mirror_fraction")]
    #[schema(minimum = 0.0, maximum = 1.0, default = 1.0)]
    pub mirror_fraction: f64,
    /// Compare a digest of the answers' bodies as well as their status: the older form of
    /// `compare = "body"`, still accepted (both given must agree).
    #[serde(default)]
    #[schema(default = false)]
    pub compare_body: bool,
    /// How a copy's answer is compared with the active one; absent: `status` (or `body` when
    /// `compare_body` is true). See [`BalancerConfig::compare_mode`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareMode>,
    /// Answer headers compared as fields named `header:NAME` when `compare = "fields"`:
    /// names, lower case, at most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 16, example = json!(["etag"]))]
    pub compare_headers: Vec<String>,
    /// How long a removed machine that still holds sessions is kept for them.
    #[serde(default = "default_drain_timeout_ms")]
    #[schema(default = 30000)]
    pub drain_timeout_ms: u64,
    /// At least one `active`; ids unique.
    #[schema(min_items = 1)]
    pub machines: Vec<MachineEntry>,
}

/// How a mirrored copy's answer is compared with the active machine's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompareMode {
    /// The status alone.
    #[default]
    Status,
    /// The status and a digest of the whole body.
    Body,
    /// The status, the named headers and, for JSON bodies, each field (a body that is not JSON
    /// or is too large is compared by digest): see [`AnswerDiff`].
    Fields,
}

impl CompareMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CompareMode::Status => "status",
            CompareMode::Body => "body",
            CompareMode::Fields => "fields",
        }
    }

    /// The `(compare_body, compare)` pair a config carries for this mode: `body` is sent in its
    /// older form, which balancers of every age read.
    pub fn wire_form(self) -> (bool, Option<CompareMode>) {
        match self {
            CompareMode::Status => (false, None),
            CompareMode::Body => (true, None),
            CompareMode::Fields => (false, Some(CompareMode::Fields)),
        }
    }
}

impl std::fmt::Display for CompareMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BalancerConfig {
    /// The comparison asked for: `compare`, or its older form `compare_body`; both given must
    /// agree.
    pub fn compare_mode(&self) -> Result<CompareMode, String> {
        resolve_compare(self.compare_body, self.compare)
    }
}

/// `compare_body` and `compare` read together (the cluster file and the balancer's config both
/// accept either): equivalent forms agree, disagreeing ones are an error naming both.
pub fn resolve_compare(
    compare_body: bool,
    compare: Option<CompareMode>,
) -> Result<CompareMode, String> {
    match (compare_body, compare) {
        (false, None) => Ok(CompareMode::Status),
        (true, None) | (true, Some(CompareMode::Body)) => Ok(CompareMode::Body),
        (false, Some(mode)) => Ok(mode),
        (true, Some(mode)) => Err(format!(
            "compare_body = true means compare = \"body\", but compare = \"{mode}\" is given too: \
             keep one of them"
        )),
    }
}

/// The most answer headers compared (`compare_headers`).
pub const MAX_COMPARE_HEADERS: usize = 16;

/// Checks the header names of `compare_headers`: HTTP tokens, at most [`MAX_COMPARE_HEADERS`],
/// no duplicates; returned in lower case, in the given order.
pub fn check_compare_headers(names: &[String]) -> Result<Vec<String>, String> {
    if names.len() > MAX_COMPARE_HEADERS {
        return Err(format!(
            "{} header names, more than the {MAX_COMPARE_HEADERS} allowed",
            names.len()
        ));
    }
    let mut checked: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || name.len() > 128 || !name.chars().all(token) {
            return Err(format!(
                "{name:?} is not a header name (1 to 128 of letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if checked.contains(&lower) {
            return Err(format!("header {lower:?} is named twice"));
        }
        checked.push(lower);
    }
    Ok(checked)
}

/// A balancer's refusal of a pushed config (409): the message, and why, for the controller to act
/// on (a newer version runs: move past it; a newer epoch was applied: another controller leads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConfigRefusal {
    pub error: String,
    pub reason: RefusalReason,
}

/// Why a pushed config was refused with 409.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// Its version is older than the running one.
    StaleVersion,
    /// Its fencing epoch is older than the highest applied.
    StaleEpoch,
}

fn default_mirror_fraction() -> f64 {
    1.0
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

/// How one job (or one mirrored copy) ended, as seen by the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// 4xx answer.
    ClientError,
    /// 5xx answer.
    ServerError,
    Timeout,
    ConnectFailure,
}

impl Outcome {
    pub fn is_ok(self) -> bool {
        matches!(self, Outcome::Ok)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectFailure => "connect_failure",
        }
    }
}

/// Outcome counters of one series.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutcomeCounts {
    pub ok: u64,
    pub client_error: u64,
    pub server_error: u64,
    pub timeout: u64,
    pub connect_failure: u64,
}

/// Latency and outcomes of one (version, configuration) of the service, over the stats window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SeriesStats {
    pub version: String,
    pub config: PoolRole,
    pub outcomes: OutcomeCounts,
    /// Latency in microseconds: an HdrHistogram, V2 serialization (uncompressed), base64.
    pub histogram: String,
}

/// One side of a mirrored job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobObservation {
    pub machine: String,
    pub version: String,
    pub latency_us: u64,
    pub outcome: Outcome,
    /// HTTP status, when an answer came.
    pub status: Option<u16>,
}

/// A job served by the active pool and its mirrored copy: the same input, the same moment.
/// A job copied to several simulation versions (v2, and a v1 A/A control) yields one pair each,
/// with the same `job`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobPair {
    /// Balancer-local job number, increasing in arrival order.
    pub job: u64,
    pub session: Option<String>,
    pub active: JobObservation,
    pub simulation: JobObservation,
    /// Status equal (and body digest equal, or no field differing, as the config asks).
    pub matched: bool,
    /// Where the answers differ, field by field (`compare = "fields"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<AnswerDiff>,
}

/// The differences between a copy's answer and the active one, field by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "kind": "fields",
    "paths": [{"path": "items[].price", "active": "12.5", "simulation": "13.0"}]
}))]
pub struct AnswerDiff {
    pub kind: DiffKind,
    /// Why the bodies were compared by digest (`kind = "digest"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_reason: Option<DigestReason>,
    /// The paths where the answers differ, empty when they agree: JSON paths (`user.name`,
    /// `items[].price`: array indexes collapse to `[]`, id-like object keys to `{}`),
    /// `header:NAME`, `(status)`, `(body)` (bodies compared by digest) and `(more)` (past the
    /// first [`MAX_DIFF_PATHS`]).
    #[serde(default)]
    pub paths: Vec<FieldDifference>,
}

/// The most differing paths a pair reports; more are reported as one `(more)` entry.
pub const MAX_DIFF_PATHS: usize = 16;

/// How the bodies of a pair were compared in `fields` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiffKind {
    /// Both bodies were JSON (or both empty): compared field by field.
    Fields,
    /// By a digest of the whole body (see `digest_reason`).
    Digest,
}

/// Why a `fields` comparison fell back to the body's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DigestReason {
    /// A body is not JSON.
    NotJson,
    /// A body is larger than the balancer keeps (256 KiB).
    TooLarge,
    /// The balancer held as many answer bodies as it allows at once.
    OverBudget,
}

impl DigestReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestReason::NotJson => "not_json",
            DigestReason::TooLarge => "too_large",
            DigestReason::OverBudget => "over_budget",
        }
    }
}

/// One differing path of a pair, with a sample of both values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldDifference {
    pub path: String,
    /// The active answer's value, as JSON text cut to 80 characters; absent where the
    /// answer has no such field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// The copy's value, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulation: Option<String>,
}

/// Whether a machine takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Serving,
    /// Removed from the config, kept only for the sessions it still holds.
    Draining,
}

/// Whether a machine answers, as the balancer's probes and jobs see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MachineHealth {
    /// Not probed yet.
    #[default]
    Unknown,
    /// The last probe passed.
    Answering,
    /// `limits.health_fall` probes (or connections of jobs) in a row failed: it gets no new
    /// caller job (copies still go to a failing simulation machine, so that the judge sees it).
    Failing,
}

impl MachineHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineHealth::Unknown => "unknown",
            MachineHealth::Answering => "answering",
            MachineHealth::Failing => "failing",
        }
    }
}

/// A machine of the running config, or a removed one still draining its sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineStatus {
    pub id: String,
    pub version: String,
    pub config: PoolRole,
    pub state: MachineState,
    /// Sustained sessions currently pinned to the machine.
    pub sessions: u64,
    /// Absent from the reports of balancers built before health probes: `unknown`.
    #[serde(default)]
    pub health: MachineHealth,
    /// Why the last failed probe or connection failed (names the address), while failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
}

/// Everything measured since a cursor. Reading with `since = report.cursor` next time gives the
/// following window with nothing lost and nothing counted twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsReport {
    pub service: String,
    /// Version of the running config.
    pub config_version: u64,
    /// Pass as `since` on the next read.
    pub cursor: u64,
    pub series: Vec<SeriesStats>,
    pub pairs: Vec<JobPair>,
    /// Pairs the balancer no longer held for this window (retention overflow); 0 when lossless.
    pub pairs_lost: u64,
    /// Mirror copies dropped (queue full) in the window.
    pub mirror_dropped: u64,
    pub machines: Vec<MachineStatus>,
}

/// Answer to a config push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PushAck {
    pub service: String,
    pub version: u64,
}

/// Error body of every admin error answer (refusals of signed messages and of stats cursors add a
/// `reason`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// A refused signed message (config, key rotation or read): what was wrong and the reason it is
/// counted under in `understudy_balancer_config_rejected_total`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefusalBody {
    pub error: String,
    /// `unsigned`, `bad_signature`, `unknown_sender`, `replayed`, `out_of_order`,
    /// `forbidden_topic`, `malformed`, `oversized`, `bad_config` (a verified payload that is not
    /// a config) or `key_file` (the rotated key could not be written; the old key stays).
    pub reason: String,
}

/// Why a stats cursor is refused.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CursorProblem {
    /// Ahead of the latest cursor: the balancer restarted; read from 0.
    CursorAhead,
    /// Older than the windows kept: read again from `oldest_cursor`.
    CursorTooOld,
}

/// A stats read refused for its cursor.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CursorRefusal {
    pub error: String,
    pub reason: CursorProblem,
    /// The oldest cursor still served (`cursor_too_old`); null for `cursor_ahead`.
    pub oldest_cursor: Option<u64>,
}

/// The longest health path accepted.
pub const MAX_HEALTH_PATH: usize = 1024;

/// A health path is written into the probe's request line as is: an origin-form target of
/// visible ASCII only, so that it cannot end the line or smuggle a header.
pub fn check_health_path(path: &str) -> Result<&str, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} does not start with '/'"));
    }
    if path.len() > MAX_HEALTH_PATH {
        return Err(format!(
            "{} bytes, more than the {MAX_HEALTH_PATH} allowed",
            path.len()
        ));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '#') {
        return Err(format!(
            "{path:?} holds {c:?}: only visible ASCII, no '#', is allowed in a request target"
        ));
    }
    Ok(path)
}

/// Writes `key` (base64) to `path` atomically (a temporary file renamed over it), readable by
/// its owner only.
pub fn write_key_file(path: &Path, key: &SecretKey) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-rotate");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(key.to_base64().as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_health_path_that_could_end_the_request_line_is_refused() {
        assert_eq!(check_health_path("/healthz"), Ok("/healthz"));
        assert_eq!(check_health_path("/a/b?c=d&e=%20"), Ok("/a/b?c=d&e=%20"));
        for (path, problem) in [
            ("healthz", "does not start with '/'"),
            ("/a b", "' '"),
            ("/a\r\nX-Injected: 1", "holds '"),
            ("/#frag", "'#'"),
            ("/caf\u{e9}", "only visible ASCII"),
        ] {
            let err = check_health_path(path).unwrap_err();
            assert!(err.contains(problem), "{path:?}: {err}");
        }
        let longest = format!("/{}", "a".repeat(MAX_HEALTH_PATH - 1));
        assert!(check_health_path(&longest).is_ok());
        let err = check_health_path(&format!("{longest}a")).unwrap_err();
        assert!(err.contains("more than the 1024 allowed"), "{err}");
    }

    #[test]
    fn a_key_file_is_written_whole_and_for_its_owner_only() {
        let dir = std::env::temp_dir().join(format!("understudy-wire-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("media.key");
        let key = SecretKey::generate();
        write_key_file(&path, &key).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", key.to_base64()));
        assert_eq!(
            SecretKey::from_base64(&text).unwrap().to_base64(),
            key.to_base64()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Rewritten (a rotation): the new key replaces the old, no temporary file is left.
        let next = SecretKey::generate();
        write_key_file(&path, &next).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            next.to_base64()
        );
        assert!(!path.with_extension("tmp-rotate").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
