//! Relay frames (wire/relay.rs) and the relay table that forwards them.
//! The harness and what it asserts: `meshd::fuzzing::relay_frame`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::relay_frame(data));
