//! Frames on a QUIC stream: the one piece of I/O both ends share.
//!
//! Does I/O (quinn streams). The length is checked against the caller's
//! limit before the body is allocated, so an unadmitted peer can't make us
//! reserve more than [`MAX_FRAME_UNADMITTED`](crate::wire::control::MAX_FRAME_UNADMITTED).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::control::{decode, encode, frame_len, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("control stream closed")]
    Closed,
    #[error("control stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame, or `Closed` at a clean end of stream.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, max: usize) -> Result<T, StreamError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Err(StreamError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = frame_len(header, max)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(decode(&body)?)
}

pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), StreamError> {
    send.write_all(&encode(msg)).await?;
    Ok(())
}
