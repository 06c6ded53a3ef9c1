//! Server time in unix milliseconds, movable in tests.
//!
//! Owns: the one source of `ts` and message-id time. Must not be used for timeouts (those use
//! monotonic timers).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How far the dev clock was moved forward, process-wide (only `--dev-clock` moves it, so tests
/// can cross edit windows and retention without sleeping). Zero in production.
static DEV_OFFSET_MS: AtomicU64 = AtomicU64::new(0);

/// Moves every shard's clock forward by `ms` (tests only: the caller checks `dev_clock`).
pub fn advance_dev_clock(ms: u64) {
    DEV_OFFSET_MS.fetch_add(ms, Ordering::Relaxed);
}

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
            None => {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
                    + DEV_OFFSET_MS.load(Ordering::Relaxed)
            }
        }
    }
}
