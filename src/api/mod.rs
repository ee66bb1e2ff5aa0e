//! The admin HTTP API: router, typed errors, auth layer, OpenAPI document, and a client for it.

pub mod admin;
pub mod auth;
pub mod client;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod leader;
pub mod machines;
pub mod monitor;
pub mod openapi;
pub mod predictions;
