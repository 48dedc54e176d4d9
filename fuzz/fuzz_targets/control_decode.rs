//! Arbitrary bytes into the control-protocol decoder (proto/control.md).
//!
//! Every input is tried twice for each message type and under both limits:
//! as a whole frame (header included), which exercises the length check, and
//! as a frame body, which is what the `.json` files in proto/vectors/ are, so
//! they make good seeds. Decoding may fail but must never panic, and whatever
//! decodes must survive an encode/decode round trip unchanged.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use meshd::wire::control::{
    decode, decode_frame, encode, FrameError, Hello, NodeMessage, ServerHello, ServerMessage,
    MAX_FRAME, MAX_FRAME_UNADMITTED,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    check::<ServerHello>(data);
    check::<Hello>(data);
    check::<ServerMessage>(data);
    check::<NodeMessage>(data);
});

fn check<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    for max in [MAX_FRAME_UNADMITTED, MAX_FRAME] {
        match decode_frame::<T>(data, max) {
            Ok((msg, used)) => {
                assert!(used <= data.len() && used - 4 <= max);
                round_trip(&msg);
            }
            Err(FrameError::TooLarge { len, max: limit }) => assert!(len > limit && limit == max),
            Err(FrameError::Malformed(_)) => {}
        }
    }
    if let Ok(msg) = decode::<T>(data) {
        round_trip(&msg);
    }
}

/// What we send, we read back as the same message.
fn round_trip<T>(msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = encode(msg);
    let (again, used) = decode_frame::<T>(&frame, usize::MAX).expect("re-encoded message decodes");
    assert_eq!(used, frame.len());
    assert_eq!(&again, msg);
}
