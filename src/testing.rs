//! Fixtures shared by the unit tests of several modules.

/// A value as the admin API shows it in JSON, for assertions on the wire form.
pub fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("API values serialise")
}
