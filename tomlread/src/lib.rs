//! Reading TOML config text into typed values. Every config parser of the workspace reads its
//! text through [`read`], so a value that does not fit is reported alike everywhere: the field by
//! its path (`latency[1].quantile`), the place by line and column, then the problem.

use std::fmt;

/// Why a TOML text did not read into the asked type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    /// The path of the value that did not fit; `None` when it is the document itself.
    pub field: Option<String>,
    /// 1-based line and column of the problem, when TOML knows where it is.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl TomlError {
    /// The place and the problem, without the field: `line 3, column 7: invalid type ...`.
    pub fn located(&self) -> String {
        match self.at {
            Some((line, column)) => format!("line {line}, column {column}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.located())
    }
}

impl std::error::Error for TomlError {}

/// Reads `text` as a `T`, naming the field, line and column of whatever does not fit.
pub fn read<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path().to_string();
        let err = e.into_inner();
        TomlError {
            field: (path != ".").then_some(path),
            at: err.span().map(|span| line_column(text, span.start)),
            message: err.message().trim_end().to_string(),
        }
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        weight: u32,
    }

    #[test]
    fn a_misfit_is_named_by_path_line_and_column() {
        let text = "name = \"a\"\n[[items]]\nweight = 1\n[[items]]\nweight = -2\n";
        let err = read::<Doc>(text).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("items[1].weight"));
        assert_eq!(err.at, Some((5, 10)));
        assert!(err
            .to_string()
            .starts_with("field `items[1].weight`: line 5, column 10: "));
    }

    #[test]
    fn a_problem_of_the_document_names_no_field() {
        let err = read::<Doc>("items = []\n").unwrap_err();
        assert_eq!(err.field, None);
        assert!(err.message.contains("name"), "{err}");
        assert!(!err.to_string().starts_with("field"), "{err}");
    }

    #[test]
    fn a_syntax_error_has_its_place() {
        let err = read::<Doc>("name = \"a\"\nitems = [\n").unwrap_err();
        assert!(err.at.is_some(), "{err}");
    }

    #[test]
    fn good_text_reads() {
        let doc: Doc = read("name = \"a\"\nitems = [{ weight = 3 }]\n").unwrap();
        assert_eq!(doc.items.len(), 1);
    }
}
