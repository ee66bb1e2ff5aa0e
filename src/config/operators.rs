//! Operators: who may change things, by name. Each operator has a bearer token; the controller
//! keeps only its SHA-256 digest (an operators file lists names and digests, never tokens), and a
//! mutation is recorded with the name of the operator whose token it carried.
//!
//! Tokens are 256 random bits made by `understudy operator add`, so a plain SHA-256 suffices at
//! rest: there is no dictionary to try, and a slow password hash would only slow every call.
//!
//! ```toml
//! [[operator]]
//! name = "alice"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```

use std::fmt;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The name the single token of `[controller] token` / `UNDERSTUDY_TOKEN` acts under.
pub const SINGLE_TOKEN_OPERATOR: &str = "ops";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorsFile {
    #[serde(default)]
    operator: Vec<OperatorSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorSpec {
    name: String,
    token_sha256: String,
}

/// One operator: a name and the digest of its token.
#[derive(Clone, PartialEq, Eq)]
struct Operator {
    name: String,
    digest: [u8; 32],
}

/// Everyone who may call a mutating endpoint. Its `Debug` shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Operators {
    list: Vec<Operator>,
}

impl fmt::Debug for Operators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// The SHA-256 of a token, as kept at rest.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh token: 32 random bytes, base64url without padding (43 characters).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An operator's entry in the file format.
pub fn file_entry(name: &str, token: &str) -> String {
    let hex: String = token_digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("[[operator]]\nname = \"{name}\"\ntoken_sha256 = \"{hex}\"\n")
}

fn valid_operator_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl From<&str> for Operators {
    fn from(token: &str) -> Operators {
        Operators::single(token)
    }
}

impl From<String> for Operators {
    fn from(token: String) -> Operators {
        Operators::single(&token)
    }
}

impl Operators {
    /// Only the single token, acting as [`SINGLE_TOKEN_OPERATOR`].
    pub fn single(token: &str) -> Operators {
        Operators::default().with_token(token)
    }

    /// Adds the single token (an empty one adds nothing).
    pub fn with_token(mut self, token: &str) -> Operators {
        if !token.is_empty() {
            self.list.push(Operator {
                name: SINGLE_TOKEN_OPERATOR.to_string(),
                digest: token_digest(token),
            });
        }
        self
    }

    /// Reads an operators file; the error names the file and the entry at fault.
    pub fn from_file(path: &Path) -> Result<Operators, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Operators::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the file's text: names unique and well-formed, digests 64 hex digits, distinct.
    pub fn parse(text: &str) -> Result<Operators, String> {
        let file: OperatorsFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut list: Vec<Operator> = Vec::new();
        for (i, spec) in file.operator.into_iter().enumerate() {
            let at = format!("operator[{i}]");
            if !valid_operator_name(&spec.name) || spec.name == SINGLE_TOKEN_OPERATOR {
                return Err(format!(
                    "{at}.name `{}`: 1-64 characters of letters, digits, '-', '_', '.', '@', \
                     and not `{SINGLE_TOKEN_OPERATOR}` (the single token's name)",
                    spec.name
                ));
            }
            let digest =
                parse_digest(&spec.token_sha256.to_ascii_lowercase()).ok_or_else(|| {
                    format!("{at}.token_sha256: expected 64 hex digits (the SHA-256 of the token)")
                })?;
            if list.iter().any(|o| o.name == spec.name) {
                return Err(format!("{at}.name `{}` is listed twice", spec.name));
            }
            if list.iter().any(|o| o.digest == digest) {
                return Err(format!("{at}.token_sha256 is another operator's token"));
            }
            list.push(Operator {
                name: spec.name,
                digest,
            });
        }
        Ok(Operators { list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|o| o.name.as_str())
    }

    /// The operator whose token `presented` is. Every digest is compared, in constant time, so
    /// the time taken says nothing of which operator (if any) nearly matched.
    pub fn identify(&self, presented: &str) -> Option<&str> {
        let digest = token_digest(presented);
        let mut found = None;
        for operator in &self.list {
            if bool::from(operator.digest.ct_eq(&digest)) {
                found = found.or(Some(operator.name.as_str()));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_known_by_their_digest_and_named() {
        let (alice, bob) = (new_token(), new_token());
        assert_eq!(alice.len(), 43);
        assert_ne!(alice, bob);
        let text = format!(
            "{}\n{}",
            file_entry("alice", &alice),
            file_entry("bob", &bob)
        );
        assert!(!text.contains(&alice), "the file never holds a token");
        let operators = Operators::parse(&text).unwrap().with_token("s3cret");
        assert_eq!(operators.identify(&alice), Some("alice"));
        assert_eq!(operators.identify(&bob), Some("bob"));
        assert_eq!(operators.identify("s3cret"), Some(SINGLE_TOKEN_OPERATOR));
        assert_eq!(operators.identify("s3cre"), None);
        assert_eq!(operators.identify(""), None);
        assert_eq!(format!("{operators:?}"), r#"["alice", "bob", "ops"]"#);
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_entry() {
        let good = file_entry("alice", "t1");
        for (text, expected) in [
            (good.replace("alice", "al ice"), "operator[0].name `al ice`"),
            (good.replace("alice", "ops"), "operator[0].name `ops`"),
            (
                good.replace("token_sha256 = \"", "token_sha256 = \"zz"),
                "operator[0].token_sha256",
            ),
            (
                format!("{good}{good}"),
                "operator[1].name `alice` is listed twice",
            ),
            (
                format!("{good}{}", good.replace("alice", "bob")),
                "operator[1].token_sha256 is another operator's token",
            ),
            (format!("{good}extra = 1\n"), "unknown field `extra`"),
            (
                "[[operator]]\nname = \"x\"\n".to_string(),
                "missing field `token_sha256`",
            ),
        ] {
            let error = Operators::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{error} (expected {expected})");
        }
        assert!(Operators::parse("").unwrap().is_empty());
    }
}
