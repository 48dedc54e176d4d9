//! The engine's datagram path with a real peer: raw bytes, and real handshakes and data replayed or mutated.
//! The harness and what it asserts: `meshd::fuzzing::engine_datagram`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::engine_datagram(data));
