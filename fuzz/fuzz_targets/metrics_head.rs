//! The metrics endpoint (metrics/http.rs): what a client sends, answered by hyper.
//! The harness and what it asserts: `meshd::fuzzing::metrics_head`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::metrics_head(data));
