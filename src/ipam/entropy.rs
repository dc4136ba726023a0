//! What the allocator is handed from outside: the kernel's random source and the wall clock.
//! [`super::allocator`] has neither of its own, so that every choice it makes can be replayed
//! in tests with a fixed source.

use std::time::{SystemTime, UNIX_EPOCH};

/// A uniformly random value in `0..bound` from the kernel's random source (rejection sampling,
/// so no value is favoured). Falls back to the clock if getrandom fails, which it does not on
/// any supported kernel; randomness is a spreading policy here, never a security property.
pub fn os_random_below(bound: u128) -> u128 {
    if bound <= 1 {
        return 0;
    }
    // Values at or above `limit` would make the modulo uneven.
    let limit = u128::MAX - (u128::MAX % bound);
    loop {
        let mut bytes = [0u8; 16];
        let filled = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).unwrap_or(0);
        let value = if filled == bytes.len() {
            u128::from_le_bytes(bytes)
        } else {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            now.as_nanos().wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ u128::from(std::process::id())
        };
        if value < limit {
            return value % bound;
        }
    }
}

/// Unix seconds now (when an allocation was made).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_random_stays_below_the_bound() {
        for bound in [1u128, 2, 3, 7, 1 << 64, u128::MAX] {
            for _ in 0..50 {
                assert!(os_random_below(bound) < bound);
            }
        }
    }
}
