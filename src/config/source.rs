//! Where a config text came from and what is wrong with it: every config error names the file,
//! the line and the field.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: field `{field}`: {reason}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        reason: String,
    },
    #[error("{file}: dependency cycle between services: {}", services.join(" -> "))]
    Cycle { file: String, services: Vec<String> },
}

/// Where a spec came from, to name file and line in errors.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    pub(crate) fn invalid(
        &self,
        offset: usize,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line_of(offset),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Turns a toml parse/deserialize error into one naming file, line and field: the key path
    /// at the error's position (`services.media.condition.min_jobs`), or the missing field in
    /// the table there.
    pub fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        let line = self.line_of(offset);
        let reason = err.message().trim_end().to_string();
        let table = err
            .span()
            .and_then(|span| crate::config::toml_spans::path_at(self.text, span.start))
            .map(|path| crate::config::toml_spans::path_text(&path))
            .unwrap_or_default();
        let field = Some(with_missing(table, &reason))
            .filter(|f| !f.is_empty())
            .or_else(|| err.span().and_then(|_| field_at_line(self.text, line)))
            .unwrap_or_else(|| "(document)".to_string());
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            field,
            reason,
        }
    }

    /// An optional bound checked against its range (an error names `field` and the value), or
    /// `default` when it is not written.
    pub(crate) fn in_range<T: PartialOrd + Copy + std::fmt::Display>(
        &self,
        value: Option<&crate::config::toml_spans::Spanned<T>>,
        field: impl Into<String>,
        range: std::ops::RangeInclusive<T>,
        default: T,
    ) -> Result<T, ConfigError> {
        match value {
            Some(v) if !range.contains(v.get_ref()) => Err(self.invalid(
                v.span().start,
                field,
                format!(
                    "must be within {}..={}, got {}",
                    range.start(),
                    range.end(),
                    v.get_ref()
                ),
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        }
    }

    /// An error about `field`, on the line of the deepest part of `path` (the field's key path,
    /// or a part of it) that is written in the text, else at `fallback`.
    pub fn invalid_near(
        &self,
        field: impl Into<String>,
        path: &[crate::config::toml_spans::Step],
        fallback: usize,
        reason: impl Into<String>,
    ) -> ConfigError {
        let offset = (1..=path.len())
            .rev()
            .find_map(|n| crate::config::toml_spans::span_of(self.text, &path[..n]))
            .map_or(fallback, |span| span.start);
        self.invalid(offset, field, reason)
    }
}

/// `table.field` when `reason` says a field of `table` is missing (toml places that error on the
/// table).
fn with_missing(table: String, reason: &str) -> String {
    let missing = reason
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match missing {
        Some(name) if table.is_empty() => name.to_string(),
        Some(name) => format!("{table}.{name}"),
        None => table,
    }
}

/// The key assigned on a line (`key = ...`) or the table a header names (`[a.b]`).
fn field_at_line(text: &str, line: usize) -> Option<String> {
    let raw = text.lines().nth(line.checked_sub(1)?)?.trim();
    if let Some(header) = raw.strip_prefix('[') {
        return Some(
            header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let (key, _) = raw.split_once('=')?;
    Some(key.trim().to_string())
}
