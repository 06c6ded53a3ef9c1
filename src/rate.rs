//! Token buckets for per-connection rate limits.
//!
//! Owns: the arithmetic of "N per second with a burst of 2N". Must not know what is limited;
//! the caller turns `Err(retry_ms)` into a `rate_limited` error.

use std::cell::Cell;
use std::time::Instant;

/// A token bucket refilled at `per_second`, holding at most two seconds' worth (starts full).
pub struct TokenBucket {
    per_second: f64,
    tokens: Cell<f64>,
    refilled: Cell<Instant>,
}

impl TokenBucket {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        TokenBucket {
            per_second,
            tokens: Cell::new(per_second * 2.0),
            refilled: Cell::new(Instant::now()),
        }
    }

    /// Takes one token at `now`; `Err(ms until the next token)` when the bucket is empty.
    pub fn take(&self, now: Instant) -> Result<(), u64> {
        let elapsed = now
            .saturating_duration_since(self.refilled.get())
            .as_secs_f64();
        let tokens = (self.tokens.get() + elapsed * self.per_second).min(self.per_second * 2.0);
        self.refilled.set(now);
        if tokens >= 1.0 {
            self.tokens.set(tokens - 1.0);
            Ok(())
        } else {
            self.tokens.set(tokens);
            Err((((1.0 - tokens) / self.per_second) * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let bucket = TokenBucket::new(5);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(bucket.take(start).is_ok());
        }
        let retry = bucket.take(start).unwrap_err();
        assert!((1..=200).contains(&retry), "retry {retry}");
        assert!(bucket.take(start + Duration::from_millis(200)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(200)).is_err());
    }
}
