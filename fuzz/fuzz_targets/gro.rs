//! The receive coalescer (offload/gro.rs): every packet written once, virtio headers consistent.
//! The harness and what it asserts: `meshd::fuzzing::gro`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::gro(data));
