//! Commands that work on recorded files, with no controller running: `judge`, `judge-bench`
//! (and the pair recorder behind it) and `predict`.

pub mod judge;
pub mod predict;
pub mod record;
