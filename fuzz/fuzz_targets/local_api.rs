//! The local API's request parsing (control/server.rs).
//! The harness and what it asserts: `meshd::fuzzing::local_api`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::local_api(data));
