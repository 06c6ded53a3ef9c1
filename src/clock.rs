//! Server time in unix milliseconds, movable in tests.
//!
//! Owns: the one source of `ts` and message-id time. Must not be used for timeouts (those use
//! monotonic timers).

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Clock {
    /// `Some` pins the clock (tests); `None` reads the system clock.
    fixed_ms: Cell<Option<u64>>,
}

impl Clock {
    pub fn system() -> Self {
        Clock {
            fixed_ms: Cell::new(None),
        }
    }

    pub fn fixed(ms: u64) -> Self {
        Clock {
            fixed_ms: Cell::new(Some(ms)),
        }
    }

    pub fn now_ms(&self) -> u64 {
        match self.fixed_ms.get() {
            Some(ms) => ms,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}
