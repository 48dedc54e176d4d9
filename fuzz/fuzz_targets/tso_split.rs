//! TSO/USO splitting of a TUN read (offload/tso.rs).
//! The harness and what it asserts: `meshd::fuzzing::tso_split`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::tso_split(data));
