//! Minting message ids: unique server-wide, increasing with time.
//!
//! Owns: the id layout `(ms since 2020-01-01) << 23 | shard << 16 | counter` (41 bits of
//! milliseconds last until 2089; 7 bits of shard, 16 of counter). Each shard mints its own ids,
//! so no coordination is needed; ids of one shard strictly increase, and ids across shards
//! compare by time to the millisecond. Must not read the clock anywhere else for ids.

use std::cell::Cell;

use crate::clock::Clock;
use crate::ids::{MsgId, ShardId};

/// 2020-01-01T00:00:00Z in unix milliseconds.
const EPOCH_MS: u64 = 1_577_836_800_000;
const SHARD_BITS: u32 = 7;
const COUNTER_BITS: u32 = 16;
/// Most shards the id layout can tell apart.
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;

pub struct MsgIdMinter {
    shard: u64,
    /// Last (millisecond, counter) handed out; the millisecond never goes backwards even if the
    /// wall clock does, and borrows from the future when one millisecond's counter runs out.
    last_ms: Cell<u64>,
    counter: Cell<u64>,
}

impl MsgIdMinter {
    /// `floor` is the highest id this shard ever minted (from the store), so ids stay
    /// increasing across restarts even if the clock stepped back meanwhile.
    pub fn new(shard: ShardId, floor: Option<MsgId>) -> Self {
        assert!(
            shard.0 < MAX_SHARDS,
            "shard {} exceeds the id layout",
            shard.0
        );
        let (last_ms, counter) = match floor {
            Some(MsgId(id)) => (id >> (SHARD_BITS + COUNTER_BITS), id & 0xffff),
            None => (0, 0),
        };
        MsgIdMinter {
            shard: shard.0 as u64,
            last_ms: Cell::new(last_ms),
            counter: Cell::new(counter),
        }
    }

    pub fn mint(&self, clock: &Clock) -> MsgId {
        let now = clock.now_ms().saturating_sub(EPOCH_MS);
        let (ms, counter) = if now > self.last_ms.get() {
            (now, 0)
        } else if self.counter.get() + 1 < (1 << COUNTER_BITS) {
            (self.last_ms.get(), self.counter.get() + 1)
        } else {
            (self.last_ms.get() + 1, 0)
        };
        self.last_ms.set(ms);
        self.counter.set(counter);
        MsgId((ms << (SHARD_BITS + COUNTER_BITS)) | (self.shard << COUNTER_BITS) | counter)
    }
}

/// The lowest id any shard mints at unix millisecond `ms`: every id below it was minted
/// earlier (up to ids that borrowed from the future when a millisecond's counter ran out).
pub fn first_id_at(ms: u64) -> MsgId {
    MsgId(ms.saturating_sub(EPOCH_MS) << (SHARD_BITS + COUNTER_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_are_unique_across_shards() {
        let clock = Clock::fixed(1_733_150_000_123);
        let a = MsgIdMinter::new(ShardId(0), None);
        let b = MsgIdMinter::new(ShardId(1), None);
        let mut seen = std::collections::HashSet::new();
        let mut last = 0;
        for _ in 0..70_000 {
            let id = a.mint(&clock).0;
            assert!(id > last);
            last = id;
            assert!(seen.insert(id));
            assert!(seen.insert(b.mint(&clock).0));
        }
    }

    #[test]
    fn ids_minted_after_a_moment_are_not_below_its_first_id() {
        let at = 1_733_150_000_123;
        let minter = MsgIdMinter::new(ShardId(5), None);
        let id = minter.mint(&Clock::fixed(at));
        assert!(first_id_at(at) <= id && id < first_id_at(at + 1));
    }

    #[test]
    fn ids_stay_above_the_floor_when_the_clock_steps_back() {
        let late = MsgIdMinter::new(ShardId(3), None).mint(&Clock::fixed(1_800_000_000_000));
        let restarted = MsgIdMinter::new(ShardId(3), Some(late));
        assert!(restarted.mint(&Clock::fixed(1_700_000_000_000)) > late);
    }
}
