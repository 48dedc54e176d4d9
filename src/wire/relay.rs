//! Relay frames: WireGuard packets carried between two nodes through the
//! rendezvous (proto/control.md §13, DESIGN.md "Wire" → Relay).
//!
//! Pure: the header layout, checked parsing and the stream framing. A node
//! that has no direct path to a peer sends the peer's (already encrypted)
//! WireGuard packet to the rendezvous over its admitted QUIC connection,
//! prefixed with a 5-byte header; the rendezvous forwards it to the peer's
//! connection with the header rewritten. The payload is opaque: the
//! rendezvous holds no key that could read it.
//!
//! Layout of a relay frame:
//!
//! ```text
//!  0        1                                   5
//!  +--------+--------+--------+--------+--------+---------------------------+
//!  | ver|knd|        node id (u32, big-endian)  | payload: 1..=65535 bytes  |
//!  +--------+--------+--------+--------+--------+---------------------------+
//! ```
//!
//! - Byte 0: the frame version in the high nibble ([`VERSION`], 1) and the
//!   kind in the low nibble ([`RelayKind`]; 1 is a WireGuard packet). So
//!   every version-1 packet frame starts with `0x11`, and an all-zero frame
//!   is never valid.
//! - Node id: never 0. On node → rendezvous it names the **destination**; on
//!   rendezvous → node it names the **source**, which the rendezvous writes
//!   itself from the connection the frame came in on. A node therefore cannot
//!   send as another: there is no field in which it could claim to.
//! - Payload: the WireGuard message, byte for byte, at least 1 and at most
//!   [`MAX_PAYLOAD`] bytes.
//!
//! A frame rides one QUIC DATAGRAM frame (RFC 9221) when it fits
//! ([`fits_datagram`]); otherwise it goes on a unidirectional QUIC stream as
//! a **stream frame**: the same bytes behind a 4-byte big-endian length that
//! counts header and payload, so the body of a stream frame is exactly a
//! datagram's content and [`parse`] reads both:
//!
//! ```text
//!  0                                   4                 9
//!  +--------+--------+--------+--------+-----------------+-----------------+
//!  |     length (u32, big-endian)      | header (5 bytes)| payload         |
//!  +--------+--------+--------+--------+-----------------+-----------------+
//!                                      |<------------- length ------------>|
//! ```
//!
//! Stream frames follow each other back to back on a stream. A reader checks
//! the length with [`stream_frame_len`] before it allocates or reads the body:
//! anything outside `HEADER_LEN + 1 ..= MAX_FRAME_LEN` is an error, whatever
//! follows. So nothing up to the mesh MTU is ever dropped for its size, and
//! no peer can make a reader reserve more than [`MAX_FRAME_LEN`] bytes.

use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// The frame version, the high nibble of byte 0.
pub const VERSION: u8 = 1;
/// Bytes of header before the payload.
pub const HEADER_LEN: usize = 5;
/// Largest payload: more than any WireGuard packet over a 65535-byte MTU.
pub const MAX_PAYLOAD: usize = 65_535;
/// Largest frame (header and payload), and so the largest stream frame
/// length a reader accepts.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD;
/// Bytes of length prefix before each stream frame.
pub const STREAM_PREFIX_LEN: usize = 4;

/// A node's relay id: its overlay IPv4 address as a number, which the
/// registry keeps unique within a mesh, so every peer map already carries
/// it. Never 0: zero is not a node, so a zeroed header never names one.
///
/// It lives here because the wire is where it has to mean the same thing at
/// both ends; [`crate::relay`] re-exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(NonZeroU32);

impl NodeId {
    /// `None` for 0, which names no node.
    pub const fn new(id: u32) -> Option<Self> {
        match NonZeroU32::new(id) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// The id of the node with this overlay IPv4 address.
    pub fn of_overlay(ip: std::net::Ipv4Addr) -> Option<Self> {
        Self::new(u32::from(ip))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node#{}", self.0)
    }
}

/// What a frame carries: the low nibble of byte 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayKind {
    /// A WireGuard message (any of types 1–4), opaque to the rendezvous.
    Packet,
}

impl RelayKind {
    const fn code(self) -> u8 {
        match self {
            RelayKind::Packet => 1,
        }
    }

    const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(RelayKind::Packet),
            _ => None,
        }
    }
}

/// A parsed header. `node` is the destination on frames a node sends and the
/// source on frames it receives (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayHeader {
    pub kind: RelayKind,
    pub node: NodeId,
}

impl RelayHeader {
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        encode_header(self.kind, self.node, &mut out);
        out
    }
}

/// Why bytes are not a relay frame. No input makes a parser panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("relay frame of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    #[error("relay frame version {version}, this build speaks version {VERSION}")]
    Version { version: u8 },
    #[error("unknown relay frame kind {kind}")]
    Kind { kind: u8 },
    #[error("relay frame names node 0, which is no node")]
    ZeroNodeId,
    #[error("relay frame carries no payload")]
    EmptyPayload,
    #[error("relay payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    PayloadTooLarge { len: usize },
    #[error(
        "relay stream frame announces {len} bytes; a frame is {} to {MAX_FRAME_LEN} bytes",
        HEADER_LEN + 1
    )]
    FrameLength { len: u64 },
}

/// Writes a header into the first [`HEADER_LEN`] bytes of a buffer, e.g. the
/// headroom in front of a packet (`buf.first_chunk_mut()`).
pub fn encode_header(kind: RelayKind, node: NodeId, out: &mut [u8; HEADER_LEN]) {
    let [first, id @ ..] = out;
    *first = (VERSION << 4) | kind.code();
    *id = node.get().to_be_bytes();
}

/// Splits a relay frame (a datagram, or a stream frame's body) into its
/// header and payload.
pub fn parse(frame: &[u8]) -> Result<(RelayHeader, &[u8]), RelayError> {
    let Some((header, payload)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(RelayError::Truncated { len: frame.len() });
    };
    let [first, id @ ..] = *header;
    let version = first >> 4;
    if version != VERSION {
        return Err(RelayError::Version { version });
    }
    let kind = RelayKind::from_code(first & 0x0f).ok_or(RelayError::Kind { kind: first & 0x0f })?;
    let node = NodeId::new(u32::from_be_bytes(id)).ok_or(RelayError::ZeroNodeId)?;
    check_payload(payload.len())?;
    Ok((RelayHeader { kind, node }, payload))
}

/// Appends a whole frame (header, then payload) to `out`: a datagram's
/// content, or a stream frame's body.
pub fn encode_frame(
    header: RelayHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RelayError> {
    check_payload(payload.len())?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends a stream frame (length prefix, header, payload) to `out`.
pub fn encode_stream_frame(
    header: RelayHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RelayError> {
    check_payload(payload.len())?;
    out.reserve(STREAM_PREFIX_LEN + HEADER_LEN + payload.len());
    out.extend_from_slice(&stream_prefix(HEADER_LEN + payload.len())?);
    encode_frame(header, payload, out)
}

/// The length prefix for a frame of `frame_len` bytes (header included), for
/// a writer that sends the prefix and an existing frame separately.
pub fn stream_prefix(frame_len: usize) -> Result<[u8; STREAM_PREFIX_LEN], RelayError> {
    match u32::try_from(frame_len) {
        Ok(len) if (HEADER_LEN + 1..=MAX_FRAME_LEN).contains(&frame_len) => Ok(len.to_be_bytes()),
        _ => Err(RelayError::FrameLength {
            len: frame_len as u64,
        }),
    }
}

/// The frame length a stream frame's prefix announces, checked against
/// [`MAX_FRAME_LEN`] (and the smallest possible frame) before the reader
/// allocates or reads anything more.
pub fn stream_frame_len(prefix: [u8; STREAM_PREFIX_LEN]) -> Result<usize, RelayError> {
    let len = u32::from_be_bytes(prefix);
    match usize::try_from(len) {
        Ok(len) if (HEADER_LEN + 1..=MAX_FRAME_LEN).contains(&len) => Ok(len),
        _ => Err(RelayError::FrameLength {
            len: u64::from(len),
        }),
    }
}

/// One stream frame read out of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFrame<'a> {
    pub header: RelayHeader,
    pub payload: &'a [u8],
    /// Bytes of `buf` it took, prefix included: where the next frame starts.
    pub consumed: usize,
}

/// Reads the first stream frame in `buf`: `Ok(None)` when `buf` does not yet
/// hold all of it (read more and call again; the length has been checked, so
/// it is safe to wait for at most `STREAM_PREFIX_LEN + MAX_FRAME_LEN` bytes).
///
/// The prefix is checked before anything else: an oversized length is an
/// error as soon as its four bytes are there. A stream that reads with
/// `read_exact` uses [`stream_frame_len`] and [`parse`] directly instead.
pub fn decode_stream_frame(buf: &[u8]) -> Result<Option<StreamFrame<'_>>, RelayError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<STREAM_PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = stream_frame_len(*prefix)?;
    let Some(frame) = rest.get(..len) else {
        return Ok(None);
    };
    let (header, payload) = parse(frame)?;
    Ok(Some(StreamFrame {
        header,
        payload,
        consumed: STREAM_PREFIX_LEN + len,
    }))
}

/// Whether a frame with `payload_len` bytes of payload fits one QUIC
/// DATAGRAM on a connection whose `quinn::Connection::max_datagram_size()`
/// is `max_datagram_size` (`None`: the peer takes no datagrams, so nothing
/// fits). That size changes with the path MTU; a send that still fails with
/// "too large" goes on the stream instead.
pub fn fits_datagram(payload_len: usize, max_datagram_size: Option<usize>) -> bool {
    let frame_len = payload_len.checked_add(HEADER_LEN);
    matches!((frame_len, max_datagram_size), (Some(len), Some(max)) if len <= max)
}

fn check_payload(len: usize) -> Result<(), RelayError> {
    match len {
        0 => Err(RelayError::EmptyPayload),
        len if len > MAX_PAYLOAD => Err(RelayError::PayloadTooLarge { len }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn packet_to(id: u32) -> RelayHeader {
        RelayHeader {
            kind: RelayKind::Packet,
            node: node(id),
        }
    }

    /// A small deterministic generator: tests need no random source.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn the_header_is_version_and_kind_then_the_node_id_big_endian() {
        let mut out = [0u8; HEADER_LEN];
        encode_header(RelayKind::Packet, node(0x0102_0304), &mut out);
        assert_eq!(out, [0x11, 0x01, 0x02, 0x03, 0x04]);
        assert_eq!(packet_to(0x0102_0304).to_bytes(), out);
    }

    #[test]
    fn a_frame_round_trips_with_its_payload_untouched() {
        let payload = [4, 0, 0, 0, 0xaa, 0xbb];
        let mut frame = Vec::new();
        encode_frame(packet_to(7), &payload, &mut frame).unwrap();
        assert_eq!(frame, [0x11, 0, 0, 0, 7, 4, 0, 0, 0, 0xaa, 0xbb]);
        assert_eq!(parse(&frame), Ok((packet_to(7), &payload[..])));
    }

    #[test]
    fn malformed_frames_are_named_errors() {
        assert_eq!(parse(&[]), Err(RelayError::Truncated { len: 0 }));
        assert_eq!(
            parse(&[0x11, 0, 0, 1]),
            Err(RelayError::Truncated { len: 4 })
        );
        assert_eq!(
            parse(&[0x21, 0, 0, 0, 1, 9]),
            Err(RelayError::Version { version: 2 })
        );
        assert_eq!(
            parse(&[0x00, 0, 0, 0, 1, 9]),
            Err(RelayError::Version { version: 0 })
        );
        assert_eq!(
            parse(&[0x12, 0, 0, 0, 1, 9]),
            Err(RelayError::Kind { kind: 2 })
        );
        assert_eq!(parse(&[0x11, 0, 0, 0, 0, 9]), Err(RelayError::ZeroNodeId));
        assert_eq!(parse(&[0x11, 0, 0, 0, 1]), Err(RelayError::EmptyPayload));
        let mut big = vec![0x11, 0, 0, 0, 1];
        big.resize(HEADER_LEN + MAX_PAYLOAD + 1, 0);
        assert_eq!(
            parse(&big),
            Err(RelayError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        big.pop();
        assert!(parse(&big).is_ok());
    }

    #[test]
    fn encoders_refuse_what_the_parser_would_refuse() {
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(packet_to(1), &[], &mut out),
            Err(RelayError::EmptyPayload)
        );
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            encode_stream_frame(packet_to(1), &big, &mut out),
            Err(RelayError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn random_bytes_never_panic_the_parsers() {
        let seed = 0x5eed_0001;
        let mut rng = XorShift(seed);
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            let len = (rng.next() % 48) as usize;
            buf.extend((0..len).map(|_| rng.next() as u8));
            // Bias towards plausible frames so the deeper checks run too.
            if round % 2 == 0 {
                if let Some(first) = buf.first_mut() {
                    *first = 0x11;
                }
            }
            if let Ok((header, payload)) = parse(&buf) {
                assert_eq!(
                    header.to_bytes()[..],
                    buf[..HEADER_LEN],
                    "seed {seed:#x} round {round}"
                );
                assert_eq!(payload.len(), buf.len() - HEADER_LEN);
            }
            let _ = decode_stream_frame(&buf);
        }
    }

    #[test]
    fn stream_frames_round_trip_back_to_back() {
        let mut stream = Vec::new();
        encode_stream_frame(packet_to(3), b"first", &mut stream).unwrap();
        let big = vec![0x5a; MAX_PAYLOAD];
        encode_stream_frame(packet_to(9), &big, &mut stream).unwrap();
        assert_eq!(
            stream[..STREAM_PREFIX_LEN + HEADER_LEN],
            [0, 0, 0, 10, 0x11, 0, 0, 0, 3]
        );

        let first = decode_stream_frame(&stream).unwrap().unwrap();
        assert_eq!((first.header, first.payload), (packet_to(3), &b"first"[..]));
        let second = decode_stream_frame(&stream[first.consumed..])
            .unwrap()
            .unwrap();
        assert_eq!((second.header, second.payload), (packet_to(9), &big[..]));
        assert_eq!(first.consumed + second.consumed, stream.len());
    }

    #[test]
    fn a_partial_stream_frame_asks_for_more() {
        let mut stream = Vec::new();
        encode_stream_frame(packet_to(3), b"payload", &mut stream).unwrap();
        for end in 0..stream.len() {
            assert_eq!(decode_stream_frame(&stream[..end]), Ok(None), "{end} bytes");
        }
        assert!(decode_stream_frame(&stream).unwrap().is_some());
    }

    #[test]
    fn an_oversized_stream_length_is_rejected_from_its_prefix_alone() {
        let too_big = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        let err = RelayError::FrameLength {
            len: MAX_FRAME_LEN as u64 + 1,
        };
        assert_eq!(stream_frame_len(too_big), Err(err));
        // Only the four prefix bytes exist: nothing was waited for or allocated.
        assert_eq!(decode_stream_frame(&too_big), Err(err));
        assert_eq!(
            stream_frame_len([0xff; 4]),
            Err(RelayError::FrameLength {
                len: u64::from(u32::MAX)
            })
        );
        // A frame needs a header and at least one payload byte.
        for len in 0..=HEADER_LEN as u32 {
            assert_eq!(
                stream_frame_len(len.to_be_bytes()),
                Err(RelayError::FrameLength {
                    len: u64::from(len)
                })
            );
        }
        assert_eq!(
            stream_frame_len((MAX_FRAME_LEN as u32).to_be_bytes()),
            Ok(MAX_FRAME_LEN)
        );
        assert_eq!(
            stream_prefix(MAX_FRAME_LEN + 1),
            Err(RelayError::FrameLength {
                len: MAX_FRAME_LEN as u64 + 1
            })
        );
    }

    #[test]
    fn a_payload_fits_a_datagram_when_header_and_payload_do() {
        assert!(fits_datagram(1195, Some(1200)));
        assert!(!fits_datagram(1196, Some(1200)));
        assert!(!fits_datagram(1, Some(HEADER_LEN)));
        assert!(
            !fits_datagram(1, None),
            "a peer without datagram support takes the stream"
        );
        assert!(!fits_datagram(usize::MAX, Some(usize::MAX)));
    }

    #[test]
    fn node_zero_is_no_node() {
        assert_eq!(NodeId::new(0), None);
        assert_eq!(node(5).get(), 5);
        assert_eq!(node(5).to_string(), "node#5");
        assert!(serde_json::from_str::<NodeId>("0").is_err());
        assert_eq!(serde_json::from_str::<NodeId>("5").unwrap(), node(5));
        assert_eq!(serde_json::to_string(&node(5)).unwrap(), "5");
    }
}
