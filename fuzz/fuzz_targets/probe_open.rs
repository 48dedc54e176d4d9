//! Path probes (wire/probe.rs): `peek` and `ProbeKey::open` of arbitrary datagrams.
//! The harness and what it asserts: `meshd::fuzzing::probe_open`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::probe_open(data));
