//! The metrics endpoint's request head (control/metrics.rs), read by read.
//! The harness and what it asserts: `meshd::fuzzing::metrics_head`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::metrics_head(data));
