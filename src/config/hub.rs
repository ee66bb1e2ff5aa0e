//! The cluster file's `[hub]` table: which pub-sub backend carries the hub's messages and the
//! hub's bounds, validated into [`HubSettings`].

use std::time::Duration;

use serde::Deserialize;

use crate::config::source::{ConfigError, Source};
use crate::config::toml_spans::Spanned;
/// Which pub-sub backend carries the hub's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Embedded,
    Nats,
}

/// `[hub]` in a cluster file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpec {
    /// `"embedded"` (default) or `"nats"`.
    pub backend: Option<Spanned<BackendKind>>,
    /// `nats://host:port`, required with the NATS backend.
    pub nats_url: Option<Spanned<String>>,
    /// Largest message accepted, in bytes (default 65536).
    pub max_message_bytes: Option<Spanned<usize>>,
    /// Queue length of each subscriber (default 1024); a subscriber that lets it fill is cut.
    pub subscriber_queue: Option<Spanned<usize>>,
    /// Subscribers must present a signed token (default true; `false` opens the controller's
    /// state channel to anyone who reaches the admin port).
    pub subscriber_auth: Option<bool>,
    /// How long a rotated-out key stays valid by default (default 60000).
    pub rotation_grace_ms: Option<Spanned<u64>>,
    /// Base URL given to machines at registration (default: the admin endpoint's own address).
    pub public_url: Option<Spanned<String>>,
    /// How far a machine's clock may lag the controller's (default 2000): after a restart, a
    /// sender's messages numbered below the controller's clock less this are refused.
    pub max_clock_skew_ms: Option<Spanned<u64>>,
    /// Registry revisions kept per machine, the newest (default 1000).
    pub history_per_machine: Option<Spanned<u64>>,
}

/// Where the hub's messages travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubBackend {
    Embedded,
    Nats { url: String },
}

/// `[hub]` validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSettings {
    pub backend: HubBackend,
    pub max_message_bytes: usize,
    pub subscriber_queue: usize,
    pub subscriber_auth: bool,
    pub rotation_grace: Duration,
    pub public_url: Option<String>,
    /// Floor of each sender's sequence after a restart: the clock less this (see
    /// [`understudy_hub::envelope::restart_floor`]).
    pub max_clock_skew: Duration,
    /// Newest registry revisions kept per machine; older ones are pruned as new ones come.
    pub history_per_machine: u64,
}

const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
const MAX_MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256..=(16 << 20);
const DEFAULT_SUBSCRIBER_QUEUE: usize = 1024;
const SUBSCRIBER_QUEUE_RANGE: std::ops::RangeInclusive<usize> = 1..=1_000_000;
const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(60);
/// Longest grace a rotation may give an old key: a leaked key must not live on for days.
pub const MAX_ROTATION_GRACE_MS: u64 = 24 * 3600 * 1000;
const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 2000;
/// A larger skew would let a message captured that long before a restart be accepted after it.
const MAX_CLOCK_SKEW_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=3_600_000;
const DEFAULT_HISTORY_PER_MACHINE: u64 = 1000;
const HISTORY_PER_MACHINE_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            backend: HubBackend::Embedded,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            subscriber_auth: true,
            rotation_grace: DEFAULT_ROTATION_GRACE,
            public_url: None,
            max_clock_skew: Duration::from_millis(DEFAULT_MAX_CLOCK_SKEW_MS),
            history_per_machine: DEFAULT_HISTORY_PER_MACHINE,
        }
    }
}

impl HubSettings {
    /// Validates `[hub]`; errors name the file, line and field.
    pub fn from_spec(spec: &HubSpec, source: &Source<'_>) -> Result<HubSettings, ConfigError> {
        let backend = backend_of(spec, source)?;
        let max_message_bytes = source.in_range(
            spec.max_message_bytes.as_ref(),
            "hub.max_message_bytes",
            MAX_MESSAGE_BYTES_RANGE,
            DEFAULT_MAX_MESSAGE_BYTES,
        )?;
        let subscriber_queue = source.in_range(
            spec.subscriber_queue.as_ref(),
            "hub.subscriber_queue",
            SUBSCRIBER_QUEUE_RANGE,
            DEFAULT_SUBSCRIBER_QUEUE,
        )?;
        let max_clock_skew_ms = source.in_range(
            spec.max_clock_skew_ms.as_ref(),
            "hub.max_clock_skew_ms",
            MAX_CLOCK_SKEW_MS_RANGE,
            DEFAULT_MAX_CLOCK_SKEW_MS,
        )?;
        let history_per_machine = source.in_range(
            spec.history_per_machine.as_ref(),
            "hub.history_per_machine",
            HISTORY_PER_MACHINE_RANGE,
            DEFAULT_HISTORY_PER_MACHINE,
        )?;
        Ok(HubSettings {
            backend,
            max_message_bytes,
            subscriber_queue,
            subscriber_auth: spec.subscriber_auth.unwrap_or(true),
            rotation_grace: rotation_grace_of(spec, source)?,
            public_url: public_url_of(spec, source)?,
            max_clock_skew: Duration::from_millis(max_clock_skew_ms),
            history_per_machine,
        })
    }
}

/// An error about `hub.FIELD`.
fn invalid(source: &Source<'_>, offset: usize, field: &str, reason: String) -> ConfigError {
    source.invalid(offset, format!("hub.{field}"), reason)
}

/// `backend` and `nats_url` together: the URL is required with NATS and refused without it.
fn backend_of(spec: &HubSpec, source: &Source<'_>) -> Result<HubBackend, ConfigError> {
    let kind = spec.backend.as_ref().map(|b| *b.get_ref());
    // Where `backend` is written, for errors about what it asks for.
    let backend_at = spec.backend.as_ref().map_or(0, |b| b.span().start);
    match (kind.unwrap_or(BackendKind::Embedded), &spec.nats_url) {
        (BackendKind::Embedded, None) => Ok(HubBackend::Embedded),
        (BackendKind::Embedded, Some(url)) => Err(invalid(
            source,
            url.span().start,
            "nats_url",
            "set, but backend is not \"nats\"".into(),
        )),
        (BackendKind::Nats, None) => Err(invalid(
            source,
            backend_at,
            "nats_url",
            "required with backend = \"nats\" (nats://host:port)".into(),
        )),
        (BackendKind::Nats, Some(url)) => nats_backend(url, source),
    }
}

/// A `nats://host:port` URL (the port is required: NATS has no implied one here).
fn nats_backend(url: &Spanned<String>, source: &Source<'_>) -> Result<HubBackend, ConfigError> {
    let text = url.get_ref().trim();
    let parsed: Option<http::Uri> = text.parse().ok();
    let ok = parsed.as_ref().is_some_and(|u| {
        u.scheme_str() == Some("nats") && u.authority().is_some_and(|a| a.port().is_some())
    });
    if !ok {
        return Err(invalid(
            source,
            url.span().start,
            "nats_url",
            format!("`{text}` is not nats://host:port"),
        ));
    }
    Ok(HubBackend::Nats {
        url: text.to_string(),
    })
}

fn rotation_grace_of(spec: &HubSpec, source: &Source<'_>) -> Result<Duration, ConfigError> {
    match &spec.rotation_grace_ms {
        Some(g) if *g.get_ref() > MAX_ROTATION_GRACE_MS => Err(invalid(
            source,
            g.span().start,
            "rotation_grace_ms",
            format!("must be at most {MAX_ROTATION_GRACE_MS} (one day)"),
        )),
        Some(g) => Ok(Duration::from_millis(*g.get_ref())),
        None => Ok(DEFAULT_ROTATION_GRACE),
    }
}

/// `public_url` without its trailing slash; only a scheme and an authority (no path).
fn public_url_of(spec: &HubSpec, source: &Source<'_>) -> Result<Option<String>, ConfigError> {
    let Some(url) = &spec.public_url else {
        return Ok(None);
    };
    let text = url.get_ref().trim().trim_end_matches('/');
    let parsed: Option<http::Uri> = text.parse().ok();
    let ok = parsed.as_ref().is_some_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https"))
            && u.authority().is_some()
            && matches!(u.path(), "" | "/")
    });
    if !ok {
        return Err(invalid(
            source,
            url.span().start,
            "public_url",
            format!("`{text}` is not http://host:port (no path)"),
        ));
    }
    Ok(Some(text.to_string()))
}
#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<HubSettings, ConfigError> {
        let source = Source {
            file: "c.toml",
            text,
        };
        #[derive(Deserialize)]
        struct Wrapper {
            hub: HubSpec,
        }
        let wrapper: Wrapper = toml::from_str(text).map_err(|e| source.toml_error(&e))?;
        HubSettings::from_spec(&wrapper.hub, &source)
    }

    #[test]
    fn hub_table_defaults_and_errors_name_the_field() {
        assert_eq!(settings("[hub]\n").unwrap(), HubSettings::default());
        let nats =
            settings("[hub]\nbackend = \"nats\"\nnats_url = \"nats://127.0.0.1:4222\"\n").unwrap();
        assert_eq!(
            nats.backend,
            HubBackend::Nats {
                url: "nats://127.0.0.1:4222".into()
            }
        );
        let full = settings(
            "[hub]\nmax_message_bytes = 1024\nsubscriber_queue = 8\nsubscriber_auth = true\nrotation_grace_ms = 5\npublic_url = \"http://127.0.0.1:7070/\"\n",
        )
        .unwrap();
        assert_eq!(full.max_message_bytes, 1024);
        assert_eq!(full.subscriber_queue, 8);
        assert!(full.subscriber_auth);
        assert_eq!(full.rotation_grace, Duration::from_millis(5));
        assert_eq!(full.public_url.as_deref(), Some("http://127.0.0.1:7070"));
        let defaults = HubSettings::default();
        assert_eq!(defaults.max_clock_skew, Duration::from_millis(2000));
        assert_eq!(defaults.history_per_machine, 1000);
        let replay = settings("[hub]\nmax_clock_skew_ms = 500\nhistory_per_machine = 3\n").unwrap();
        assert_eq!(replay.max_clock_skew, Duration::from_millis(500));
        assert_eq!(replay.history_per_machine, 3);

        for (text, field, line) in [
            ("[hub]\nbackend = \"kafka\"\n", "hub.backend", 2),
            ("[hub]\nbackend = \"nats\"\n", "hub.nats_url", 2),
            (
                "[hub]\nbackend = \"nats\"\nnats_url = \"http://x:1\"\n",
                "hub.nats_url",
                3,
            ),
            ("[hub]\nnats_url = \"nats://x:1\"\n", "hub.nats_url", 2),
            (
                "[hub]\nmax_message_bytes = 10\n",
                "hub.max_message_bytes",
                2,
            ),
            ("[hub]\nsubscriber_queue = 0\n", "hub.subscriber_queue", 2),
            (
                "[hub]\nrotation_grace_ms = 999999999999\n",
                "hub.rotation_grace_ms",
                2,
            ),
            ("[hub]\npublic_url = \"ftp://x\"\n", "hub.public_url", 2),
            ("[hub]\nmax_clock_skew_ms = 0\n", "hub.max_clock_skew_ms", 2),
            (
                "[hub]\nmax_clock_skew_ms = 3600001\n",
                "hub.max_clock_skew_ms",
                2,
            ),
            (
                "[hub]\nhistory_per_machine = 0\n",
                "hub.history_per_machine",
                2,
            ),
            ("[hub]\nqueue = 3\n", "hub.queue", 2),
        ] {
            match settings(text) {
                Err(ConfigError::Invalid {
                    field: f, line: l, ..
                }) => {
                    assert_eq!((f.as_str(), l), (field, line), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
