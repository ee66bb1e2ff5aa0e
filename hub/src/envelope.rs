//! Signed envelopes: every hub message names its sender, a per-sender sequence number, a topic and a
//! JSON payload, and carries an HMAC-SHA256 over a canonical encoding of those four.
//!
//! Canonical form (the bytes the MAC covers), see [`canonical_bytes`]:
//! `"understudy-hub/v1" 0x00` then, for each of sender, seq (ASCII decimal), topic and the payload
//! as canonical JSON (object keys sorted recursively, no whitespace), its length as a big-endian
//! u64 followed by its bytes. Length prefixes make the encoding unambiguous without escaping; the
//! canonical JSON makes it independent of key order and spacing on the wire.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"understudy-hub/v1\0";
/// Shortest secret accepted: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;
const MAX_NAME_BYTES: usize = 128;

/// A message on the hub. `signature` is base64 of the HMAC-SHA256 of [`canonical_bytes`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub sender: String,
    pub seq: u64,
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub topic: String,
    pub payload: serde_json::Value,
    #[serde(default)]
    pub signature: Option<String>,
}

impl Envelope {
    /// A top-level string field of the payload (`service`, `role`, `status`), used by filters.
    pub fn payload_str(&self, field: &str) -> Option<&str> {
        self.payload.get(field).and_then(|v| v.as_str())
    }
}

/// The bytes the signature covers (see the module doc).
pub fn canonical_bytes(
    sender: &str,
    seq: u64,
    topic: &str,
    payload: &serde_json::Value,
) -> Vec<u8> {
    let mut json = String::new();
    write_canonical_json(payload, &mut json);
    let seq = seq.to_string();
    let mut out = Vec::with_capacity(DOMAIN.len() + 32 + sender.len() + topic.len() + json.len());
    out.extend_from_slice(DOMAIN);
    for part in [
        sender.as_bytes(),
        seq.as_bytes(),
        topic.as_bytes(),
        json.as_bytes(),
    ] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// JSON with object keys sorted at every level and no whitespace; strings and numbers as
/// serde_json prints them (so the form does not depend on serde_json's `preserve_order` feature).
fn write_canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical_json(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A sender's secret. Never printed: `Debug` shows only its length.
#[derive(Clone)]
pub struct SecretKey(Vec<u8>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is {0} bytes, at least {MIN_KEY_BYTES} are needed")]
    TooShort(usize),
    #[error("key is not valid base64")]
    NotBase64,
    #[error("sender id {0:?} is invalid: 1..=128 bytes of [A-Za-z0-9._:-]")]
    BadSender(String),
}

impl SecretKey {
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<SecretKey, KeyError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(SecretKey(bytes))
    }

    /// A fresh 256-bit key from the OS's generator, for a machine or balancer at registration.
    pub fn generate() -> SecretKey {
        use rand::RngCore;
        let mut bytes = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SecretKey(bytes)
    }

    /// A key as written in config files and registration answers: standard base64.
    pub fn from_base64(text: &str) -> Result<SecretKey, KeyError> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|_| KeyError::NotBase64)?;
        SecretKey::from_bytes(bytes)
    }

    /// Base64 of the key, for handing it to a machine at registration. Callers must not log it.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }

    /// HMAC-SHA256 of `message` under this key.
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC-SHA256 of `message` under this key (compared in constant time).
    pub fn verify_mac(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<redacted, {} bytes>)", self.0.len())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The wall clock in microseconds since the Unix epoch (1 for a clock set before 1970).
pub fn wall_clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1)
}

/// The sequence floor a verifier that just started gives a sender it has no record of: the wall
/// clock less `max_clock_skew`. A sender numbering by its clock (see [`Signer`]) is above it as
/// long as its clock lags by less than the skew; a message signed before that is refused as
/// `out_of_order`, which is what makes a message captured before a restart useless after it.
pub fn restart_floor(max_clock_skew: Duration) -> u64 {
    wall_clock_micros().saturating_sub(max_clock_skew.as_micros() as u64)
}

/// Signs messages of one sender with strictly increasing sequence numbers.
///
/// A signer made with [`Signer::new`] numbers each message `max(previous + 1, wall clock in
/// microseconds)`: its sequence always tracks the clock (it runs ahead only while it sends more
/// than a million messages a second). So a verifier that lost its memory of the sender (a
/// restart) can refuse everything older than "now less the allowed clock skew" without refusing
/// the live sender ([`Verifier::register_with_floor`], [`restart_floor`]).
#[derive(Debug)]
pub struct Signer {
    sender: String,
    key: SecretKey,
    next_seq: u64,
    numbering: Numbering,
}

/// How a signer picks the next sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// `max(previous + 1, wall clock in microseconds)`.
    WallClock,
    /// `previous + 1` from a given start: deterministic, for tests and replays of recorded traffic.
    Counter,
}

impl Signer {
    /// A signer whose sequence tracks the wall clock in microseconds: a sender that restarts keeps
    /// numbering above what the verifier last saw from it, and above a restarted verifier's floor.
    pub fn new(sender: &str, key: SecretKey) -> Result<Signer, KeyError> {
        Signer::with_numbering(sender, key, wall_clock_micros(), Numbering::WallClock)
    }

    /// A signer numbering `first_seq`, `first_seq + 1`, ... without looking at the clock (tests,
    /// recorded traffic). A verifier with a clock-based floor refuses it once it falls behind.
    pub fn starting_at(sender: &str, key: SecretKey, first_seq: u64) -> Result<Signer, KeyError> {
        Signer::with_numbering(sender, key, first_seq, Numbering::Counter)
    }

    fn with_numbering(
        sender: &str,
        key: SecretKey,
        first_seq: u64,
        numbering: Numbering,
    ) -> Result<Signer, KeyError> {
        if !valid_name(sender) {
            return Err(KeyError::BadSender(sender.to_string()));
        }
        Ok(Signer {
            sender: sender.to_string(),
            key,
            next_seq: first_seq,
            numbering,
        })
    }

    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// Switches to a rotated key; the sequence goes on.
    pub fn rotate(&mut self, key: SecretKey) {
        self.key = key;
    }

    /// A single-use token for `GET /api/v1/hub/subscribe` when the hub asks subscribers to
    /// authenticate: base64 of an envelope on topic `hub.subscribe`.
    pub fn subscribe_token(&mut self) -> String {
        let envelope = self.sign(SUBSCRIBE_TOPIC, serde_json::json!({}));
        BASE64.encode(serde_json::to_vec(&envelope).expect("an envelope serializes"))
    }

    /// Signs `payload` on `topic` with the next sequence number (see [`Signer`]).
    pub fn sign(&mut self, topic: &str, payload: serde_json::Value) -> Envelope {
        let seq = match self.numbering {
            Numbering::WallClock => self.next_seq.max(wall_clock_micros()),
            Numbering::Counter => self.next_seq,
        };
        self.next_seq = seq.saturating_add(1);
        let mac = self
            .key
            .mac(&canonical_bytes(&self.sender, seq, topic, &payload));
        Envelope {
            sender: self.sender.clone(),
            seq,
            topic: topic.to_string(),
            payload,
            signature: Some(BASE64.encode(mac)),
        }
    }
}

/// Each sender's keys. Rotation: [`Keyring::rotate`] installs a new key; the previous one stays
/// valid until the first message verified under the new key, or until `grace` has passed,
/// whichever comes first. This lets in-flight messages land while capping how long a possibly
/// leaked key stays useful.
#[derive(Debug, Default)]
pub struct Keyring {
    senders: HashMap<String, SenderKeys>,
}

#[derive(Debug)]
struct SenderKeys {
    current: SecretKey,
    previous: Option<(SecretKey, Instant)>,
}

/// Which key verified a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyUsed {
    Current,
    Previous,
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Registers `sender` with `key`, replacing any key it had (a re-registration, not a rotation:
    /// the old key stops working at once).
    pub fn insert(&mut self, sender: &str, key: SecretKey) -> Result<(), KeyError> {
        if !valid_name(sender) {
            return Err(KeyError::BadSender(sender.to_string()));
        }
        self.senders.insert(
            sender.to_string(),
            SenderKeys {
                current: key,
                previous: None,
            },
        );
        Ok(())
    }

    /// Rotates `sender` to `key`; the old key is accepted until `now + grace` or the first
    /// message under the new key. Returns false when the sender is unknown.
    pub fn rotate(&mut self, sender: &str, key: SecretKey, grace: Duration, now: Instant) -> bool {
        match self.senders.get_mut(sender) {
            Some(keys) => {
                let old = std::mem::replace(&mut keys.current, key);
                keys.previous = Some((old, now + grace));
                true
            }
            None => false,
        }
    }

    pub fn remove(&mut self, sender: &str) -> bool {
        self.senders.remove(sender).is_some()
    }

    pub fn contains(&self, sender: &str) -> bool {
        self.senders.contains_key(sender)
    }

    /// Checks `mac` for `message` under the sender's keys; `None` when the sender is unknown.
    fn check(
        &mut self,
        sender: &str,
        message: &[u8],
        mac: &[u8],
        now: Instant,
    ) -> Option<Option<KeyUsed>> {
        let keys = self.senders.get_mut(sender)?;
        if bool::from(keys.current.mac(message).ct_eq(mac)) {
            return Some(Some(KeyUsed::Current));
        }
        if let Some((old, until)) = &keys.previous {
            if now < *until && bool::from(old.mac(message).ct_eq(mac)) {
                return Some(Some(KeyUsed::Previous));
            }
        }
        Some(None)
    }

    fn retire_previous(&mut self, sender: &str) {
        if let Some(keys) = self.senders.get_mut(sender) {
            keys.previous = None;
        }
    }
}

/// Why a message was refused. Each has its own label in `understudy_hub_rejected_total{reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("oversized: at least {size} bytes, the limit is {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("unsigned: the message carries no signature")]
    Unsigned,
    #[error("unknown sender {0:?}")]
    UnknownSender(String),
    #[error("bad signature from {0:?}")]
    BadSignature(String),
    #[error("replayed: {sender:?} already sent seq {seq}")]
    Replayed { sender: String, seq: u64 },
    #[error("out of order: {sender:?} sent seq {seq} after {last}")]
    OutOfOrder { sender: String, seq: u64, last: u64 },
    #[error("forbidden: {sender:?} may not publish on topic {topic:?}")]
    ForbiddenTopic { sender: String, topic: String },
}

impl Rejection {
    /// The metric label and the `reason` of JSON errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Oversized { .. } => "oversized",
            Rejection::Malformed(_) => "malformed",
            Rejection::Unsigned => "unsigned",
            Rejection::UnknownSender(_) => "unknown_sender",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::Replayed { .. } => "replayed",
            Rejection::OutOfOrder { .. } => "out_of_order",
            Rejection::ForbiddenTopic { .. } => "forbidden_topic",
        }
    }

    pub const ALL_REASONS: [&'static str; 8] = [
        "oversized",
        "malformed",
        "unsigned",
        "unknown_sender",
        "bad_signature",
        "replayed",
        "out_of_order",
        "forbidden_topic",
    ];
}

/// How many of a sender's last accepted sequence numbers are remembered to tell a replay (a
/// number already accepted) from a message that arrived late (a number never seen, below the last
/// one). The last accepted numbers, not a range of numbers: senders number by their clock in
/// microseconds, so consecutive messages are far apart.
const SEQ_WINDOW: usize = 64;

#[derive(Debug, Clone)]
struct SeqState {
    /// The highest seq accepted, or the floor when that is higher.
    last: u64,
    /// The last accepted seqs, oldest first, at most [`SEQ_WINDOW`].
    recent: VecDeque<u64>,
}

impl SeqState {
    fn accept(&mut self, seq: u64) {
        if self.recent.len() == SEQ_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(seq);
        self.last = seq;
    }
}

/// Verifies raw messages: size, form, signature, sequence; counts every refusal by reason.
/// Sequence rule: each sender's seq must be strictly greater than the last accepted one. A seq
/// equal to one of the sender's last 64 accepted is `replayed`; any other seq at or below the last
/// is `out_of_order` (an older replay is reported as out of order: both are refused).
/// The last seq per sender is kept in memory; a verifier that restarts restores a floor per sender
/// ([`Verifier::register_with_floor`]) so what it accepted before is not accepted again.
#[derive(Debug)]
pub struct Verifier {
    keyring: Keyring,
    seqs: HashMap<String, SeqState>,
    max_bytes: usize,
    rejected: IntCounterVec,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering hub metric {name}: {source}")]
    Register {
        name: &'static str,
        source: prometheus::Error,
    },
}

pub(crate) fn register_counter_vec(
    registry: &Registry,
    name: &'static str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let counter = IntCounterVec::new(Opts::new(name, help), labels)
        .map_err(|source| MetricsError::Register { name, source })?;
    registry
        .register(Box::new(counter.clone()))
        .map_err(|source| MetricsError::Register { name, source })?;
    Ok(counter)
}

impl Verifier {
    /// Registers `understudy_hub_rejected_total{reason}` in `registry` (every reason at 0).
    pub fn new(
        keyring: Keyring,
        max_bytes: usize,
        registry: &Registry,
    ) -> Result<Verifier, MetricsError> {
        let rejected = register_counter_vec(
            registry,
            "understudy_hub_rejected_total",
            "Hub messages refused, by reason",
            &["reason"],
        )?;
        for reason in Rejection::ALL_REASONS {
            rejected.with_label_values(&[reason]);
        }
        Ok(Verifier {
            keyring,
            seqs: HashMap::new(),
            max_bytes,
            rejected,
        })
    }

    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.keyring
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Registers (or re-registers) a sender; its sequence starts afresh.
    pub fn register(&mut self, sender: &str, key: SecretKey) -> Result<(), KeyError> {
        self.keyring.insert(sender, key)?;
        self.seqs.remove(sender);
        Ok(())
    }

    /// Registers a sender whose messages numbered `floor` or below are refused (`out_of_order`):
    /// for a verifier that restarts, with the floor the larger of the last sequence number it
    /// persisted for the sender and [`restart_floor`], so a message captured before the restart
    /// is not accepted after it.
    pub fn register_with_floor(
        &mut self,
        sender: &str,
        key: SecretKey,
        floor: u64,
    ) -> Result<(), KeyError> {
        self.register(sender, key)?;
        self.restore_floor(sender, floor);
        Ok(())
    }

    /// Raises `sender`'s floor to `floor` (never lowers it): from now on only a sequence number
    /// above both the floor and the last accepted one is accepted. Works for a sender without a
    /// key yet too (it applies once the key is installed with [`Verifier::keyring_mut`]).
    pub fn restore_floor(&mut self, sender: &str, floor: u64) {
        match self.seqs.get_mut(sender) {
            Some(state) => state.last = state.last.max(floor),
            None => {
                // Nothing below the floor was accepted here: all of it is out of order.
                self.seqs.insert(
                    sender.to_string(),
                    SeqState {
                        last: floor,
                        recent: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// The highest sequence number accepted (or the floor) of every sender this verifier has
    /// one for: what a verifier persists to restore floors after a restart.
    pub fn last_seqs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.seqs
            .iter()
            .map(|(sender, state)| (sender.as_str(), state.last))
    }

    /// Counts a refusal decided outside the verifier (e.g. a body too large to read whole).
    pub fn count(&self, rejection: &Rejection) {
        self.rejected.with_label_values(&[rejection.reason()]).inc();
    }

    /// Verifies one message as received on the wire.
    pub fn verify_bytes(&mut self, raw: &[u8], now: Instant) -> Result<Envelope, Rejection> {
        let result = self.check_bytes(raw, now);
        if let Err(rejection) = &result {
            self.count(rejection);
        }
        result
    }

    /// Verifies an already-decoded envelope (e.g. from a NATS message).
    pub fn verify(&mut self, envelope: Envelope, now: Instant) -> Result<Envelope, Rejection> {
        let result = self.check_envelope(envelope, now);
        if let Err(rejection) = &result {
            self.count(rejection);
        }
        result
    }

    fn check_bytes(&mut self, raw: &[u8], now: Instant) -> Result<Envelope, Rejection> {
        if raw.len() > self.max_bytes {
            return Err(Rejection::Oversized {
                size: raw.len(),
                limit: self.max_bytes,
            });
        }
        let envelope: Envelope =
            serde_json::from_slice(raw).map_err(|e| Rejection::Malformed(e.to_string()))?;
        self.check_envelope(envelope, now)
    }

    fn check_envelope(&mut self, envelope: Envelope, now: Instant) -> Result<Envelope, Rejection> {
        if !valid_name(&envelope.sender) {
            return Err(Rejection::Malformed(format!(
                "sender {:?} is not 1..=128 bytes of [A-Za-z0-9._:-]",
                envelope.sender
            )));
        }
        if !valid_name(&envelope.topic) {
            return Err(Rejection::Malformed(format!(
                "topic {:?} is not 1..=128 bytes of [A-Za-z0-9._:-]",
                envelope.topic
            )));
        }
        let Some(signature) = envelope.signature.as_deref().filter(|s| !s.is_empty()) else {
            return Err(Rejection::Unsigned);
        };
        let mac = BASE64
            .decode(signature)
            .map_err(|_| Rejection::Malformed("signature is not base64".into()))?;
        let message = canonical_bytes(
            &envelope.sender,
            envelope.seq,
            &envelope.topic,
            &envelope.payload,
        );
        let used = match self.keyring.check(&envelope.sender, &message, &mac, now) {
            None => return Err(Rejection::UnknownSender(envelope.sender)),
            Some(None) => return Err(Rejection::BadSignature(envelope.sender)),
            Some(Some(used)) => used,
        };
        self.accept_seq(&envelope.sender, envelope.seq)?;
        if used == KeyUsed::Current {
            self.keyring.retire_previous(&envelope.sender);
        }
        Ok(envelope)
    }

    fn accept_seq(&mut self, sender: &str, seq: u64) -> Result<(), Rejection> {
        match self.seqs.get_mut(sender) {
            None => {
                let mut state = SeqState {
                    last: seq,
                    recent: VecDeque::with_capacity(SEQ_WINDOW),
                };
                state.accept(seq);
                self.seqs.insert(sender.to_string(), state);
                Ok(())
            }
            Some(state) if seq > state.last => {
                state.accept(seq);
                Ok(())
            }
            Some(state) => {
                if state.recent.contains(&seq) {
                    Err(Rejection::Replayed {
                        sender: sender.to_string(),
                        seq,
                    })
                } else {
                    Err(Rejection::OutOfOrder {
                        sender: sender.to_string(),
                        seq,
                        last: state.last,
                    })
                }
            }
        }
    }
}

/// For balancers: accepts only messages signed by the controller, on the config topic, and
/// decodes their payload. A balancer applies a config only when this returns it.
#[derive(Debug)]
pub struct ControllerVerifier {
    controller_id: String,
    verifier: Verifier,
}

/// Topic of the envelope in a hub subscribe token (the HTTP transport checks it).
pub const SUBSCRIBE_TOPIC: &str = "hub.subscribe";
/// The controller's sender id: what balancers and machines accept controller messages from.
pub const CONTROLLER_ID: &str = "controller";
/// Topic of configs the controller pushes to balancers.
pub const CONFIG_TOPIC: &str = "control.balancer-config";
/// Topic of the controller's signed reads of a balancer's admin endpoint (stats, config): the
/// envelope travels in the `x-understudy-auth` header, its payload names the path it reads.
pub const READ_TOPIC: &str = "control.balancer-read";
/// The header a signed read travels in (base64 of the envelope's JSON).
pub const READ_AUTH_HEADER: &str = "x-understudy-auth";

#[derive(Debug, thiserror::Error)]
pub enum ConfigRejection {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("config payload does not decode: {0}")]
    Payload(serde_json::Error),
}

impl ControllerVerifier {
    pub fn new(
        controller_id: &str,
        controller_key: SecretKey,
        max_bytes: usize,
        registry: &Registry,
    ) -> Result<ControllerVerifier, ControllerVerifierError> {
        let mut keyring = Keyring::new();
        keyring.insert(controller_id, controller_key)?;
        Ok(ControllerVerifier {
            controller_id: controller_id.to_string(),
            verifier: Verifier::new(keyring, max_bytes, registry)?,
        })
    }

    /// Refuses (`out_of_order`) every config numbered `floor` or below: a balancer that starts
    /// sets it to [`restart_floor`], so a config captured before its restart is not applied
    /// after it while the controller (numbering by its clock) goes on being accepted.
    pub fn restore_floor(&mut self, floor: u64) {
        let id = self.controller_id.clone();
        self.verifier.restore_floor(&id, floor);
    }

    /// Rotation of the controller's key, as announced to the balancer out of band.
    pub fn rotate(&mut self, key: SecretKey, grace: Duration, now: Instant) {
        let id = self.controller_id.clone();
        self.verifier.keyring_mut().rotate(&id, key, grace, now);
    }

    /// Verifies a raw config message and decodes its payload as `T` (e.g. the wire's
    /// `BalancerConfig`).
    pub fn verify_config<T: serde::de::DeserializeOwned>(
        &mut self,
        raw: &[u8],
        now: Instant,
    ) -> Result<T, ConfigRejection> {
        self.verify_on(CONFIG_TOPIC, raw, now)
    }

    /// Verifies a raw message that must be on `topic` and decodes its payload as `T`. A
    /// balancer keeps one verifier per topic, so that reads and config pushes are sequenced
    /// apart (a read racing a push does not make either look replayed).
    pub fn verify_on<T: serde::de::DeserializeOwned>(
        &mut self,
        topic: &str,
        raw: &[u8],
        now: Instant,
    ) -> Result<T, ConfigRejection> {
        let envelope = self.verifier.verify_bytes(raw, now)?;
        // The keyring holds only the controller, so the sender is the controller here.
        if envelope.topic != topic {
            let rejection = Rejection::ForbiddenTopic {
                sender: envelope.sender,
                topic: envelope.topic,
            };
            self.verifier.count(&rejection);
            return Err(rejection.into());
        }
        serde_json::from_value(envelope.payload).map_err(ConfigRejection::Payload)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerVerifierError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes(vec![byte; 32]).unwrap()
    }

    fn verifier_with(sender: &str, k: SecretKey) -> (Verifier, Registry) {
        let registry = Registry::new();
        let mut ring = Keyring::new();
        ring.insert(sender, k).unwrap();
        (Verifier::new(ring, 4096, &registry).unwrap(), registry)
    }

    fn rejected(registry: &Registry, reason: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "understudy_hub_rejected_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    fn bytes(e: &Envelope) -> Vec<u8> {
        serde_json::to_vec(e).unwrap()
    }

    #[test]
    fn canonical_form_ignores_key_order_and_spacing() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a" : { "x":"s", "y":[1, 2] }, "b": 1 }"#).unwrap();
        assert_eq!(
            canonical_bytes("m1", 7, "t", &a),
            canonical_bytes("m1", 7, "t", &b)
        );
        let mut json = String::new();
        write_canonical_json(&a, &mut json);
        assert_eq!(json, r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        // Length prefixes: moving a byte between fields changes the encoding.
        assert_ne!(
            canonical_bytes("m1", 7, "t", &a),
            canonical_bytes("m", 17, "t", &a)
        );
    }

    #[test]
    fn signed_message_verifies_and_reordered_json_still_verifies() {
        let mut signer = Signer::starting_at("m1", key(1), 1).unwrap();
        let (mut verifier, _) = verifier_with("m1", key(1));
        let env = signer.sign("state", json!({"service": "media", "status": "running"}));
        let sig = env.signature.clone().unwrap();
        let raw = format!(
            r#"{{"signature":"{sig}","payload":{{"status":"running","service":"media"}},"topic":"state","seq":1,"sender":"m1"}}"#
        );
        let got = verifier
            .verify_bytes(raw.as_bytes(), Instant::now())
            .unwrap();
        assert_eq!(got.payload_str("service"), Some("media"));
    }

    #[test]
    fn each_rejection_has_its_reason_and_is_counted() {
        let now = Instant::now();
        let mut signer = Signer::starting_at("m1", key(1), 10).unwrap();
        let (mut verifier, registry) = verifier_with("m1", key(1));

        let big = signer.sign("state", json!({ "blob": "x".repeat(5000) }));
        let r = verifier.verify_bytes(&bytes(&big), now).unwrap_err();
        assert_eq!(r.reason(), "oversized");

        let r = verifier.verify_bytes(b"{not json", now).unwrap_err();
        assert_eq!(r.reason(), "malformed");
        let r = verifier
            .verify_bytes(
                br#"{"sender":"m1","seq":1,"topic":"t","payload":1,"extra":2}"#,
                now,
            )
            .unwrap_err();
        assert_eq!(r.reason(), "malformed");

        let mut unsigned = signer.sign("state", json!({}));
        unsigned.signature = None;
        assert_eq!(
            verifier.verify_bytes(&bytes(&unsigned), now).unwrap_err(),
            Rejection::Unsigned
        );

        let mut stranger = Signer::starting_at("m9", key(1), 1).unwrap();
        let r = verifier.verify_bytes(&bytes(&stranger.sign("state", json!({}))), now);
        assert_eq!(r.unwrap_err().reason(), "unknown_sender");

        let mut forger = Signer::starting_at("m1", key(2), 100).unwrap();
        let r = verifier.verify_bytes(&bytes(&forger.sign("state", json!({}))), now);
        assert_eq!(r.unwrap_err().reason(), "bad_signature");

        let mut tampered = signer.sign("state", json!({"status": "running"}));
        tampered.payload = json!({"status": "down"});
        let r = verifier.verify_bytes(&bytes(&tampered), now);
        assert_eq!(r.unwrap_err().reason(), "bad_signature");

        let first = signer.sign("state", json!({"n": 1}));
        let second = signer.sign("state", json!({"n": 2}));
        let third = signer.sign("state", json!({"n": 3}));
        verifier.verify_bytes(&bytes(&first), now).unwrap();
        verifier.verify_bytes(&bytes(&third), now).unwrap();
        let r = verifier.verify_bytes(&bytes(&third), now).unwrap_err();
        assert_eq!(r.reason(), "replayed");
        let r = verifier.verify_bytes(&bytes(&first), now).unwrap_err();
        assert_eq!(r.reason(), "replayed");
        let r = verifier.verify_bytes(&bytes(&second), now).unwrap_err();
        assert_eq!(r.reason(), "out_of_order");

        for (reason, n) in [
            ("oversized", 1),
            ("malformed", 2),
            ("unsigned", 1),
            ("unknown_sender", 1),
            ("bad_signature", 2),
            ("replayed", 2),
            ("out_of_order", 1),
        ] {
            assert_eq!(rejected(&registry, reason), n, "{reason}");
        }
    }

    #[test]
    fn signer_numbers_by_the_wall_clock_and_never_repeats() {
        let before = wall_clock_micros();
        let mut signer = Signer::new("m1", key(1)).unwrap();
        let first = signer.sign("state", json!({})).seq;
        assert!(first >= before, "{first} < {before}");
        // Faster than the clock ticks: still strictly increasing.
        let burst: Vec<u64> = (0..100)
            .map(|_| signer.sign("state", json!({})).seq)
            .collect();
        assert!(burst.windows(2).all(|w| w[1] > w[0]));
        assert!(burst[0] > first);
        std::thread::sleep(Duration::from_millis(5));
        let later = signer.sign("state", json!({})).seq;
        assert!(later >= burst[99] + 5000, "tracks the clock: {later}");
        // A counter signer does not look at the clock.
        let mut counter = Signer::starting_at("m1", key(1), 7).unwrap();
        assert_eq!(counter.sign("state", json!({})).seq, 7);
        assert_eq!(counter.sign("state", json!({})).seq, 8);
    }

    #[test]
    fn replays_are_told_from_late_messages_whatever_the_gaps_between_seqs() {
        let now = Instant::now();
        let (mut verifier, _) = verifier_with("m1", key(1));
        // Seqs a million apart, as a clock-numbered sender's are.
        let mut signer = Signer::starting_at("m1", key(1), 1_000_000).unwrap();
        let sent: Vec<Envelope> = (0..70)
            .map(|i| {
                signer.next_seq = 1_000_000 * (i + 1);
                signer.sign("state", json!({ "n": i }))
            })
            .collect();
        let late = {
            signer.next_seq = 1_500_000;
            signer.sign("state", json!({}))
        };
        for e in &sent {
            verifier.verify_bytes(&bytes(e), now).unwrap();
        }
        for e in &sent[6..] {
            let r = verifier.verify_bytes(&bytes(e), now).unwrap_err();
            assert_eq!(r.reason(), "replayed", "seq {}", e.seq);
        }
        // Older than the last 64 accepted, or never accepted: out of order.
        for e in [&sent[5], &late] {
            let r = verifier.verify_bytes(&bytes(e), now).unwrap_err();
            assert_eq!(r.reason(), "out_of_order", "seq {}", e.seq);
        }
    }

    #[test]
    fn a_floor_refuses_what_was_captured_before_a_restart_but_not_the_live_sender() {
        let now = Instant::now();
        let skew = Duration::from_secs(2);
        let mut signer = Signer::new("m1", key(1)).unwrap();
        let (mut before, _) = verifier_with("m1", key(1));
        let first = signer.sign("state", json!({"n": 1}));
        let captured = signer.sign("state", json!({"n": 2}));
        before.verify_bytes(&bytes(&first), now).unwrap();
        before.verify_bytes(&bytes(&captured), now).unwrap();
        let persisted: HashMap<String, u64> = before
            .last_seqs()
            .map(|(s, seq)| (s.to_string(), seq))
            .collect();
        assert_eq!(persisted["m1"], captured.seq);

        // The restart: a new verifier, the floor restored.
        let registry = Registry::new();
        let mut after = Verifier::new(Keyring::new(), 4096, &registry).unwrap();
        let floor = persisted["m1"].max(restart_floor(skew));
        after.register_with_floor("m1", key(1), floor).unwrap();
        for old in [&captured, &first] {
            let r = after.verify_bytes(&bytes(old), now).unwrap_err();
            assert_eq!(r.reason(), "out_of_order", "{old:?}");
        }
        // Signed long ago (never accepted here, e.g. not yet persisted): below the clock floor.
        let stale_seq = wall_clock_micros() - 3 * 1_000_000;
        let mut stale = Signer::starting_at("m1", key(1), stale_seq).unwrap();
        let r = after.verify_bytes(&bytes(&stale.sign("state", json!({}))), now);
        assert_eq!(r.unwrap_err().reason(), "out_of_order");
        assert_eq!(rejected(&registry, "out_of_order"), 3);
        // The live sender goes on.
        after
            .verify_bytes(&bytes(&signer.sign("state", json!({"n": 3}))), now)
            .unwrap();

        // A sender whose clock lags by less than the skew is never refused by the floor.
        let mut fresh = Verifier::new(Keyring::new(), 4096, &Registry::new()).unwrap();
        fresh
            .register_with_floor("m2", key(2), restart_floor(skew))
            .unwrap();
        let lagging_seq = wall_clock_micros() - 1_500_000;
        let mut lagging = Signer::starting_at("m2", key(2), lagging_seq).unwrap();
        fresh
            .verify_bytes(&bytes(&lagging.sign("state", json!({}))), now)
            .unwrap();
        // A floor only ever rises, and the replay window survives raising it.
        let mut m3 = Signer::starting_at("m3", key(3), 100).unwrap();
        fresh.register("m3", key(3)).unwrap();
        let accepted = m3.sign("state", json!({}));
        fresh.verify_bytes(&bytes(&accepted), now).unwrap();
        fresh.restore_floor("m3", 50);
        fresh.restore_floor("m3", 110);
        let r = fresh.verify_bytes(&bytes(&accepted), now).unwrap_err();
        assert_eq!(r.reason(), "replayed");
        let r = fresh
            .verify_bytes(&bytes(&m3.sign("state", json!({}))), now)
            .unwrap_err();
        assert_eq!(r.reason(), "out_of_order", "101 is below the floor 110");
        let mut m3 = Signer::starting_at("m3", key(3), 111).unwrap();
        fresh
            .verify_bytes(&bytes(&m3.sign("state", json!({}))), now)
            .unwrap();
    }

    #[test]
    fn rotation_accepts_old_key_until_first_new_message() {
        let start = Instant::now();
        let (mut verifier, _) = verifier_with("m1", key(1));
        let mut old = Signer::starting_at("m1", key(1), 1).unwrap();
        let in_flight = old.sign("state", json!({"n": 1}));
        verifier
            .keyring_mut()
            .rotate("m1", key(2), Duration::from_secs(60), start);
        verifier.verify_bytes(&bytes(&in_flight), start).unwrap();
        old.rotate(key(2));
        verifier
            .verify_bytes(&bytes(&old.sign("state", json!({"n": 2}))), start)
            .unwrap();
        // The new key has been used: the old one is retired.
        let mut stale = Signer::starting_at("m1", key(1), 50).unwrap();
        let r = verifier.verify_bytes(&bytes(&stale.sign("state", json!({}))), start);
        assert_eq!(r.unwrap_err().reason(), "bad_signature");
    }

    #[test]
    fn rotation_grace_period_ends() {
        let start = Instant::now();
        let (mut verifier, _) = verifier_with("m1", key(1));
        verifier
            .keyring_mut()
            .rotate("m1", key(2), Duration::from_secs(5), start);
        let mut old = Signer::starting_at("m1", key(1), 1).unwrap();
        verifier
            .verify_bytes(
                &bytes(&old.sign("s", json!({}))),
                start + Duration::from_secs(4),
            )
            .unwrap();
        let r = verifier.verify_bytes(
            &bytes(&old.sign("s", json!({}))),
            start + Duration::from_secs(5),
        );
        assert_eq!(r.unwrap_err().reason(), "bad_signature");
    }

    #[test]
    fn keys_are_never_printed() {
        let k = SecretKey::from_base64("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0").unwrap();
        let mut ring = Keyring::new();
        ring.insert("m1", k.clone()).unwrap();
        let signer = Signer::starting_at("m1", k.clone(), 1).unwrap();
        let shown = format!("{k:?} {ring:?} {signer:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("redacted"));
        assert_eq!(
            SecretKey::from_bytes(vec![0; 8]).unwrap_err(),
            KeyError::TooShort(8)
        );
        assert_eq!(
            SecretKey::from_base64("!!").unwrap_err(),
            KeyError::NotBase64
        );
    }

    #[test]
    fn balancer_applies_only_controller_signed_configs() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Cfg {
            version: u64,
        }
        let registry = Registry::new();
        let mut balancer = ControllerVerifier::new("controller", key(7), 4096, &registry).unwrap();
        let mut controller = Signer::starting_at("controller", key(7), 1).unwrap();
        let good = controller.sign(CONFIG_TOPIC, json!({"version": 3}));
        let cfg: Cfg = balancer
            .verify_config(&bytes(&good), Instant::now())
            .unwrap();
        assert_eq!(cfg, Cfg { version: 3 });

        let mut machine = Signer::starting_at("m1", key(7), 5).unwrap();
        let r = balancer.verify_config::<Cfg>(
            &bytes(&machine.sign(CONFIG_TOPIC, json!({"version": 4}))),
            Instant::now(),
        );
        assert!(matches!(
            r,
            Err(ConfigRejection::Rejected(Rejection::UnknownSender(_)))
        ));
        let mut impostor = Signer::starting_at("controller", key(8), 9).unwrap();
        let r = balancer.verify_config::<Cfg>(
            &bytes(&impostor.sign(CONFIG_TOPIC, json!({"version": 4}))),
            Instant::now(),
        );
        assert!(matches!(
            r,
            Err(ConfigRejection::Rejected(Rejection::BadSignature(_)))
        ));
        let other = controller.sign("state", json!({"version": 5}));
        let r = balancer.verify_config::<Cfg>(&bytes(&other), Instant::now());
        assert!(matches!(
            r,
            Err(ConfigRejection::Rejected(Rejection::ForbiddenTopic { .. }))
        ));
        let r = balancer.verify_config::<Cfg>(&bytes(&good), Instant::now());
        assert!(matches!(
            r,
            Err(ConfigRejection::Rejected(Rejection::Replayed { .. }))
        ));
    }

    #[test]
    fn a_restarted_balancer_refuses_a_config_signed_before_its_floor() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Cfg {
            version: u64,
        }
        let mut controller = Signer::new("controller", key(7)).unwrap();
        let captured = controller.sign(CONFIG_TOPIC, json!({"version": 1}));
        let mut first_boot =
            ControllerVerifier::new("controller", key(7), 4096, &Registry::new()).unwrap();
        first_boot
            .verify_config::<Cfg>(&bytes(&captured), Instant::now())
            .unwrap();
        // Restart: the floor is the clock now less the skew. Pretend the capture is older than
        // the skew by signing it 3 s in the past.
        let old = wall_clock_micros() - 3_000_000;
        let mut past = Signer::starting_at("controller", key(7), old).unwrap();
        let captured_long_ago = past.sign(CONFIG_TOPIC, json!({"version": 1}));
        let mut rebooted =
            ControllerVerifier::new("controller", key(7), 4096, &Registry::new()).unwrap();
        rebooted.restore_floor(restart_floor(Duration::from_secs(2)));
        let r = rebooted.verify_config::<Cfg>(&bytes(&captured_long_ago), Instant::now());
        assert!(matches!(
            r,
            Err(ConfigRejection::Rejected(Rejection::OutOfOrder { .. }))
        ));
        let cfg: Cfg = rebooted
            .verify_config(
                &bytes(&controller.sign(CONFIG_TOPIC, json!({"version": 2}))),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(cfg, Cfg { version: 2 });
    }
}
