//! The CPU work behind the `spin` method, for the `work_1ms` figure.
//!
//! The wordcount example plugin serves `spin(iterations: u64) -> u64`: it
//! hashes its own previous result `iterations` times with FNV-1a and looks at
//! the clock every 2^16 rounds to honour the call's deadline. The figure
//! compares that call against the very same loop run in-process and inside
//! the floor, so this module repeats the loop round for round, deadline checks
//! included. The harness checks that all three return the same hash.

use std::time::Instant;

/// The FNV-1a 64-bit offset basis, where every hash starts.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// The FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// How many rounds pass between two looks at the clock, as in the plugin.
pub const ROUNDS_PER_DEADLINE_CHECK: u64 = 1 << 16;

/// Folds `bytes` into the FNV-1a state `state`.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    let mut hash = state;
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Hashes the running hash `iterations` times and returns the last value, or
/// `None` when `deadline` passed before the last round.
pub fn spin(iterations: u64, deadline: Instant) -> Option<u64> {
    let mut hash = FNV_OFFSET_BASIS;
    for round in 0..iterations {
        let is_deadline_check_round = round % ROUNDS_PER_DEADLINE_CHECK == 0;
        if is_deadline_check_round && Instant::now() >= deadline {
            return None;
        }
        hash = fnv1a(hash, &hash.to_le_bytes());
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vector() {
        // FNV-1a 64 of "a" from the reference test suite.
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn spin_is_deterministic_and_stops_at_a_past_deadline() {
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(spin(0, later), Some(FNV_OFFSET_BASIS));
        assert_eq!(spin(1000, later), spin(1000, later));
        assert_ne!(spin(1000, later), spin(1001, later));
        assert_eq!(spin(10, Instant::now()), None);
    }
}
