//! The headcni-ipam state parser on arbitrary bytes: a damaged file must give an error, never a
//! panic, and whatever parses must survive being written and read again with the same
//! allocations and range sets (nothing lost or invented on the next write). `salvage`, which reads damaged files line by line, must never
//! panic either, and what it salvages must be a valid state.
//!
//!     cargo +nightly fuzz run ipam_state -- -max_total_time=60

#![no_main]

use headcni::ipam::state::{State, salvage};
use libfuzzer_sys::fuzz_target;

const BOOT: &str = "6f1c9f0e-7d7f-4a39-9f54-1b2f7c1d0a11";

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = State::parse(data, BOOT) {
        let bytes = state.encode();
        let again = State::parse(&bytes, BOOT).expect("a parsed state re-encodes to a readable one");
        assert!(again.allocations().eq(state.allocations()), "allocations changed on the way");
        assert_eq!(again.header(), state.header(), "range sets changed on the way");
    }
    let salvaged = salvage(data, BOOT);
    let bytes = salvaged.state.encode();
    assert!(State::parse(&bytes, BOOT).is_ok(), "salvage produced an unreadable state");
});
