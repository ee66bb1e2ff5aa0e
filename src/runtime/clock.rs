//! The controller's clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds that advance with tokio's clock (so a paused test clock drives them too).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base_ms,
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
