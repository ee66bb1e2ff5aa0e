//! The admin HTTP API: router, typed errors, auth layer, OpenAPI document, and a client for it.

pub mod admin;
pub mod client;
pub mod extract;
pub mod openapi;
