//! Relay frames on QUIC unidirectional streams, for frames too big for a
//! datagram. Does I/O; used by both the rendezvous and the node.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::wire::relay::{stream_frame_len, stream_prefix, MAX_FRAME_LEN};

/// One frame on a fresh unidirectional stream: length prefix, then frame.
pub fn send_on_stream(
    connection: &quinn::Connection,
    streams: &Arc<Semaphore>,
    frame: Bytes,
) -> bool {
    let Ok(permit) = streams.clone().try_acquire_owned() else {
        return false;
    };
    let Ok(prefix) = stream_prefix(frame.len()) else {
        return true;
    };
    let connection = connection.clone();
    tokio::spawn(async move {
        let _permit = permit;
        if let Ok(mut stream) = connection.open_uni().await {
            if stream.write_all(&prefix).await.is_ok() && stream.write_all(&frame).await.is_ok() {
                let _ = stream.finish();
            }
        }
    });
    true
}

/// Reads one stream frame (prefix, then frame) from a unidirectional
/// stream, checking the length before allocating.
pub async fn read_stream_frame(stream: &mut quinn::RecvStream) -> Option<Bytes> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.ok()?;
    let len = stream_frame_len(prefix).ok()?;
    debug_assert!(len <= MAX_FRAME_LEN);
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame).await.ok()?;
    Some(Bytes::from(frame))
}
