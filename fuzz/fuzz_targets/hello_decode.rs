//! Arbitrary bytes into the rendezvous's hello decoder (proto/control.md §5,
//! §6, §10): what any stranger who reaches the rendezvous's port can send.
//!
//! Decoding may fail but must never panic; a refusal never quotes more than
//! a bounded part of the input; and what decodes has version 1, re-encodes,
//! and decodes again to the same hello (so a duplicate key, which the
//! decoder refuses, can never be what made it pass). Seeds: the hello
//! vectors' `.json` bodies in proto/vectors/.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::wire::control::{decode_hello, encode, HelloError, PROTOCOL_VERSION};

/// Longest refusal text: the decoder's own words plus a bounded quote.
const MAX_MESSAGE: usize = 512;

fuzz_target!(|data: &[u8]| {
    match decode_hello(data) {
        Ok(hello) => {
            assert_eq!(hello.version, PROTOCOL_VERSION);
            let frame = encode(&hello);
            assert_eq!(decode_hello(frame.get(4..).unwrap_or_default()), Ok(hello));
        }
        Err(HelloError::Version { theirs }) => {
            assert_ne!(theirs, Some(u64::from(PROTOCOL_VERSION)))
        }
        Err(HelloError::Malformed(message)) => assert!(message.len() <= MAX_MESSAGE, "{message}"),
    }
});
