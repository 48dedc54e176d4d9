//! Relay stream framing (relay/stream.rs) and control frame lengths (wire/control.rs), read in pieces.
//! The harness and what it asserts: `meshd::fuzzing::stream_framing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::stream_framing(data));
