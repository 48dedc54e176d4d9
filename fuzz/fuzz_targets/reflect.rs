//! The NAT check (wire/reflect.rs): parsing and the reflector's answer.
//! The harness and what it asserts: `meshd::fuzzing::reflect`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::reflect(data));
