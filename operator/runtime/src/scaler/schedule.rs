//! When each module's heads are decided within a tick. Deciding every module at the tick's
//! start makes the last of a thousand wait for all the others' signals (a passive declare
//! each, on a few channels): its decision is late by the whole loop. Instead each module has
//! a phase, a slot of the interval fixed by its key, and is decided once per interval at its
//! slot: the same cadence for every head, the broker's and the pods' reads spread evenly, and
//! the lag of a decision is measured from its own slot.

use std::time::Duration;

/// Slots per interval: at a 1 s tick, a module is due every 1 s at one of ten 100 ms slots.
pub const SLOTS: u32 = 10;

/// The slot of the interval module `key` is decided in, in `0..slots`. Stable for a key (a
/// module keeps its cadence while others come and go) and spread evenly over many keys.
pub fn phase(key: &str, slots: u32) -> u32 {
    // FNV-1a: fixed across processes and releases, unlike the standard library's hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    u32::try_from(hash % u64::from(slots.max(1))).unwrap_or(0)
}

/// The length of one slot of `interval`.
pub fn slot_length(interval: Duration, slots: u32) -> Duration {
    interval / slots.max(1)
}

/// The slot of the `n`-th slot tick since the loop started.
pub fn slot_of_tick(n: u64, slots: u32) -> u32 {
    u32::try_from(n % u64::from(slots.max(1))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_thousand_modules_spread_evenly_over_the_slots() {
        let mut counts = [0u32; SLOTS as usize];
        for i in 0..1000 {
            counts[phase(&format!("ns-{}/module-{i}", i % 7), SLOTS) as usize] += 1;
        }
        // Even would be 100 each: no slot carries more than half again as many.
        assert!(
            counts.iter().all(|&c| (60..=150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_phase_of_a_key_does_not_change_between_calls_or_processes() {
        // A literal: a restarted operator gives each module the same slot.
        assert_eq!(phase("shop/ledger", SLOTS), phase("shop/ledger", SLOTS));
        assert_eq!(phase("shop/ledger", SLOTS), 3);
    }

    #[test]
    fn every_slot_comes_once_per_interval() {
        let seen: Vec<u32> = (0..u64::from(SLOTS) * 2)
            .map(|n| slot_of_tick(n, SLOTS))
            .collect();
        for slot in 0..SLOTS {
            assert_eq!(seen.iter().filter(|&&s| s == slot).count(), 2, "{seen:?}");
        }
        assert_eq!(
            slot_length(Duration::from_secs(1), SLOTS),
            Duration::from_millis(100)
        );
    }

    proptest! {
        #[test]
        fn a_phase_is_always_a_slot(key in ".*", slots in 0u32..64) {
            let p = phase(&key, slots);
            prop_assert!(p < slots.max(1));
            prop_assert!(slot_length(Duration::from_secs(1), slots) > Duration::ZERO);
        }
    }
}
