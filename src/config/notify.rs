//! The cluster file's `[notify]` table: the webhooks told of every rollout phase change, validated
//! into [`NotifySettings`] (delivered by src/runtime/notify.rs).

use std::time::Duration;

use serde::Deserialize;

use crate::config::source::{ConfigError, Source};
use crate::config::toml_spans::Spanned;

/// `[notify]` in a cluster file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// `[[notify.webhooks]]`: each is sent every phase change, in this order.
    #[serde(default)]
    pub webhooks: Vec<Spanned<WebhookSpec>>,
}

/// `[[notify.webhooks]]`: one receiver of phase changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// `http://HOST[:PORT]/PATH` (https is not supported).
    pub url: Spanned<String>,
    /// Deadline of one POST, in milliseconds (default 2000).
    pub timeout_ms: Option<Spanned<u64>>,
    /// POSTs tried per event before it is given up (default 6, 1..=20).
    pub attempts: Option<Spanned<u32>>,
    /// Delay before the first retry, in milliseconds, doubling at each retry up to 30 s
    /// (default 250).
    pub backoff_ms: Option<Spanned<u64>>,
}

/// One webhook, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: http::Uri,
    pub timeout: Duration,
    pub attempts: u32,
    /// Delay before the first retry; each further retry waits twice as long, at most
    /// [`MAX_BACKOFF`].
    pub backoff: Duration,
}

/// `[notify]` validated: no webhook (the default) means no notification at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NotifySettings {
    pub webhooks: Vec<Webhook>,
}

/// The longest wait between two attempts: a receiver down for minutes is retried at this pace.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT_MS: u64 = 2_000;
const TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=60_000;
const DEFAULT_ATTEMPTS: u32 = 6;
const ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=20;
const DEFAULT_BACKOFF_MS: u64 = 250;
const BACKOFF_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=30_000;

impl NotifySettings {
    /// Validates `[notify]`; errors name the file, line and field (`notify.webhooks[0].url`).
    pub fn from_spec(
        spec: &NotifySpec,
        source: &Source<'_>,
    ) -> Result<NotifySettings, ConfigError> {
        let webhooks = spec
            .webhooks
            .iter()
            .enumerate()
            .map(|(index, w)| webhook_of(index, w.get_ref(), source))
            .collect::<Result<_, _>>()?;
        Ok(NotifySettings { webhooks })
    }
}

/// One `[[notify.webhooks]]` entry checked.
fn webhook_of(index: usize, w: &WebhookSpec, source: &Source<'_>) -> Result<Webhook, ConfigError> {
    let field = |name: &str| format!("notify.webhooks[{index}].{name}");
    let url = http_url(w.url.get_ref())
        .map_err(|reason| source.invalid(w.url.span().start, field("url"), reason))?;
    let timeout_ms = source.in_range(
        w.timeout_ms.as_ref(),
        field("timeout_ms"),
        TIMEOUT_MS_RANGE,
        DEFAULT_TIMEOUT_MS,
    )?;
    let attempts = source.in_range(
        w.attempts.as_ref(),
        field("attempts"),
        ATTEMPTS_RANGE,
        DEFAULT_ATTEMPTS,
    )?;
    let backoff_ms = source.in_range(
        w.backoff_ms.as_ref(),
        field("backoff_ms"),
        BACKOFF_MS_RANGE,
        DEFAULT_BACKOFF_MS,
    )?;
    Ok(Webhook {
        url,
        timeout: Duration::from_millis(timeout_ms),
        attempts,
        backoff: Duration::from_millis(backoff_ms),
    })
}

/// An `http://HOST[:PORT]/PATH` URL. The error does not repeat the URL: its path may be a secret
/// (a Slack hook's is), and the error names the line anyway.
fn http_url(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text
        .trim()
        .parse()
        .map_err(|e| format!("not a URL ({e}): expected http://HOST[:PORT]/PATH"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        Some("http") | None => Err("expected http://HOST[:PORT]/PATH".to_string()),
        Some(other) => Err(format!(
            "scheme `{other}` is not supported: expected http://HOST[:PORT]/PATH"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::parse;
    use crate::testing::SAMPLE;

    /// The sample cluster with `notify` written after it (a table or array-of-tables text).
    fn with_notify(notify: &str) -> String {
        format!("{SAMPLE}\n{notify}\n")
    }

    fn error_of(text: &str) -> (usize, String, String) {
        match parse("c.toml", text).expect_err("must be refused") {
            ConfigError::Invalid {
                line,
                field,
                reason,
                ..
            } => (line, field, reason),
            other => panic!("unexpected {other}"),
        }
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).expect(needle) + 1
    }

    #[test]
    fn good_config_reads_alike_in_every_form() {
        let tables = with_notify(
            "[[notify.webhooks]]\nurl = \"http://127.0.0.1:9999/hooks/a\"\n\
             [[notify.webhooks]]\nurl = \"http://hooks.example:8080/b\"\n\
             timeout_ms = 500\nattempts = 3\nbackoff_ms = 100\n",
        );
        let inline = with_notify(
            "[notify]\nwebhooks = [{ url = \"http://127.0.0.1:9999/hooks/a\" }, \
             { url = \"http://hooks.example:8080/b\", timeout_ms = 500, attempts = 3, \
             backoff_ms = 100 }]\n",
        );
        // Dotted keys at the top, before the first table header.
        let dotted = format!(
            "notify.webhooks = [{{ url = \"http://127.0.0.1:9999/hooks/a\" }}, \
             {{ url = \"http://hooks.example:8080/b\", timeout_ms = 500, attempts = 3, \
             backoff_ms = 100 }}]\n{SAMPLE}"
        );
        let first = parse("c.toml", &tables).expect("valid").notify;
        assert_eq!(
            first.webhooks,
            vec![
                Webhook {
                    url: "http://127.0.0.1:9999/hooks/a".parse().unwrap(),
                    timeout: Duration::from_millis(2000),
                    attempts: 6,
                    backoff: Duration::from_millis(250),
                },
                Webhook {
                    url: "http://hooks.example:8080/b".parse().unwrap(),
                    timeout: Duration::from_millis(500),
                    attempts: 3,
                    backoff: Duration::from_millis(100),
                },
            ]
        );
        for text in [inline, dotted] {
            assert_eq!(parse("c.toml", &text).expect("valid").notify, first);
        }
    }

    #[test]
    fn without_the_table_nothing_is_notified() {
        let cluster = parse("c.toml", SAMPLE).expect("valid");
        assert_eq!(cluster.notify, NotifySettings::default());
        let empty = parse("c.toml", &with_notify("[notify]\n")).expect("valid");
        assert!(empty.notify.webhooks.is_empty());
    }

    #[test]
    fn bad_url_names_the_field_and_line_not_the_secret() {
        for (url, expected) in [
            ("https://hooks.slack.com/services/SECRET", "scheme `https`"),
            ("ftp://example/SECRET", "scheme `ftp`"),
            ("/SECRET/path/only", "expected http://"),
            ("http://exa mple/SECRET", "not a URL"),
        ] {
            let text = with_notify(&format!(
                "[[notify.webhooks]]\nurl = \"http://127.0.0.1:1/ok\"\n\
                 [[notify.webhooks]]\nurl = \"{url}\"\n"
            ));
            let (line, field, reason) = error_of(&text);
            assert_eq!(field, "notify.webhooks[1].url", "{url}");
            assert_eq!(line, line_of(&text, url), "{url}");
            assert!(reason.contains(expected), "{url}: {reason}");
            assert!(!reason.contains("SECRET"), "{url}: {reason}");
        }
    }

    #[test]
    fn bad_attempts_timeout_and_backoff_are_refused() {
        for (key, value) in [
            ("attempts", "0"),
            ("attempts", "21"),
            ("timeout_ms", "0"),
            ("timeout_ms", "60001"),
            ("backoff_ms", "0"),
            ("backoff_ms", "30001"),
        ] {
            let text = with_notify(&format!(
                "[[notify.webhooks]]\nurl = \"http://127.0.0.1:1/\"\n{key} = {value}\n"
            ));
            let (line, field, reason) = error_of(&text);
            assert_eq!(field, format!("notify.webhooks[0].{key}"));
            assert_eq!(line, line_of(&text, &format!("{key} = {value}")));
            assert!(reason.contains("must be within"), "{reason}");
        }
        for ok in ["attempts = 1", "attempts = 20", "backoff_ms = 30000"] {
            let text = with_notify(&format!(
                "[[notify.webhooks]]\nurl = \"http://127.0.0.1:1/\"\n{ok}\n"
            ));
            parse("c.toml", &text).expect(ok);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = with_notify("[[notify.webhooks]]\nurl = \"http://127.0.0.1:1/\"\nretries = 3\n");
        let (line, field, reason) = error_of(&text);
        assert_eq!(field, "notify.webhooks[0].retries");
        assert_eq!(line, line_of(&text, "retries"));
        assert!(reason.contains("unknown field"), "{reason}");
        let text = with_notify("[notify]\nwebhook = []\n");
        let (_, field, reason) = error_of(&text);
        assert_eq!(field, "notify.webhook");
        assert!(reason.contains("unknown field"), "{reason}");
    }

    #[test]
    fn a_missing_url_is_named() {
        let text = with_notify("[[notify.webhooks]]\nattempts = 2\n");
        let (_, field, reason) = error_of(&text);
        assert_eq!(field, "notify.webhooks[0].url");
        assert!(reason.contains("missing field"), "{reason}");
    }
}
