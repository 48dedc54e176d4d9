//! The UAPI request parser (control/uapi.rs), line by line.
//! The harness and what it asserts: `meshd::fuzzing::uapi_request`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshd::fuzzing::uapi_request(data));
