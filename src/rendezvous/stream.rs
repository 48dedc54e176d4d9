//! Frames on a QUIC stream: the one piece of I/O both ends share.
//!
//! Does I/O (quinn streams). The length is checked against the caller's
//! limit before the body is allocated, so an unadmitted peer can't make us
//! reserve more than [`MAX_FRAME_UNADMITTED`](crate::wire::control::MAX_FRAME_UNADMITTED).
//!
//! Both ends read their control stream inside `select!` loops, where the
//! read is dropped whenever another branch wins. [`FrameReader`] keeps the
//! bytes of a partial frame in itself, so dropping [`FrameReader::next`]
//! loses nothing: the next call carries on where the last one stopped.
//! [`read_frame`] is for straight-line code only (it is not cancel-safe).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::control::{decode, encode, frame_len, FrameError};

/// Header bytes of a frame: the big-endian body length.
const HEADER: usize = 4;
/// A buffer that grew past this for one large frame (a peer map) is given
/// back once that frame is decoded, instead of being kept for the session.
const KEEP_CAPACITY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("control stream closed")]
    Closed,
    #[error("control stream ended inside a frame, after {have} of {want} bytes")]
    Truncated { have: usize, want: usize },
    #[error("control stream: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("control stream: {0}")]
    ReadChunk(#[from] quinn::ReadError),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame, or `Closed` at a clean end of stream.
///
/// Not cancel-safe: a frame half read when the future is dropped is lost,
/// and the stream is out of step from then on. Use [`FrameReader`] wherever
/// the read competes with other events.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<T, StreamError> {
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

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    send.write_all(&encode(msg)).await?;
    Ok(())
}

/// The receiving side of a control stream, read one frame at a time.
///
/// [`next`](Self::next) is cancel-safe: it only awaits quinn's cancel-safe
/// `read_chunk` and moves what that returned into `self` before it awaits
/// again, so a frame split across packets arrives whole however often the
/// read is dropped half-way.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    /// The frame read so far: header, then as much of the body as arrived.
    /// Grows with what arrives, never ahead of it.
    buf: Vec<u8>,
    /// The body length, once the header is complete and within the limit.
    body: Option<usize>,
    max: usize,
}

impl FrameReader {
    /// Reads frames of at most `max` body bytes from `recv`.
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: Vec::new(),
            body: None,
            max,
        }
    }

    /// How much of the frame being read has arrived (header included):
    /// whether a large frame is still coming.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Changes the limit for frames whose header has not been read yet
    /// (admission done: the peer may send larger frames).
    pub fn set_limit(&mut self, max: usize) {
        self.max = max;
    }

    /// The next whole frame, or `Closed` at a clean end of stream between
    /// frames. Cancel-safe (see the type's doc). After an error the stream
    /// is out of step: the caller closes it.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<T, StreamError> {
        self.fill().await?;
        let decoded = decode(self.buf.get(HEADER..).unwrap_or_default());
        self.reset();
        Ok(decoded?)
    }

    /// As [`next`](Self::next), but the frame's body undecoded (for a
    /// decoder with rules of its own, such as the hello's).
    pub async fn next_body(&mut self) -> Result<Vec<u8>, StreamError> {
        self.fill().await?;
        let body = self.buf.get(HEADER..).unwrap_or_default().to_vec();
        self.reset();
        Ok(body)
    }

    /// Reads until `buf` holds one whole frame. Cancel-safe.
    async fn fill(&mut self) -> Result<(), StreamError> {
        loop {
            let want = match self.body {
                Some(len) => HEADER + len,
                None => HEADER,
            };
            let have = self.buf.len();
            if have < want {
                // The only await: a chunk it returned is in `buf` before
                // anything else can run, and a dropped read returned none.
                match self.recv.read_chunk(want - have, true).await? {
                    Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                    None if have == 0 => return Err(StreamError::Closed),
                    None => return Err(StreamError::Truncated { have, want }),
                }
                continue;
            }
            if self.body.is_some() {
                return Ok(());
            }
            let header = self
                .buf
                .first_chunk::<HEADER>()
                .copied()
                .unwrap_or_default();
            let len = frame_len(header, self.max)?;
            self.body = Some(len);
            // Room for what is announced, within the limit just checked;
            // a large frame grows the buffer only as its bytes arrive.
            self.buf.reserve(len.min(KEEP_CAPACITY));
        }
    }

    /// Ready for the next frame.
    fn reset(&mut self) {
        self.body = None;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}
