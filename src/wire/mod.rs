//! Bytes on the wire: what arrives on meshd's one UDP socket.
//!
//! Pure. Everything on the socket is told apart by its first byte
//! (DESIGN.md "Wire"): WireGuard messages are types 1–4 followed by three
//! zero bytes; QUIC packets to and from the rendezvous have the fixed bit
//! (0x40) set (RFC 9000 §17); anything else is dropped and counted.
//! [`control`] is the protocol spoken inside the QUIC connection;
//! [`probe`] the path probes between nodes; [`reflect`] the NAT checks a
//! node asks of the rendezvous; [`relay`] the frames that carry WireGuard
//! packets between nodes through the rendezvous; [`untrusted`] bounds
//! what a peer's text can put in a log line; [`endpoint`] says which
//! addresses can never be a node's endpoint.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]
// Untrusted bytes are read through checked accessors (`get`, patterns,
// fixed-size arrays), never by an index that could panic.
#![deny(clippy::indexing_slicing)]

pub mod control;
pub mod digest;
pub mod endpoint;
pub mod probe;
pub mod reflect;
pub mod relay;
pub mod untrusted;

/// What a datagram on the shared socket is, by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    WireGuard,
    Quic,
    /// A path probe ([`probe::MAGIC`]).
    Probe,
    /// A NAT check answer from the rendezvous ([`reflect::MAGIC`]).
    Reflect,
    Unknown,
}

#[inline]
pub fn classify(datagram: &[u8]) -> DatagramKind {
    match datagram {
        [1..=4, 0, 0, 0, ..] => DatagramKind::WireGuard,
        [0x00, b'M', b'P', _, ..] => DatagramKind::Probe,
        [0x00, b'M', b'R', _, ..] => DatagramKind::Reflect,
        [b, ..] if b & 0x40 != 0 => DatagramKind::Quic,
        _ => DatagramKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demultiplexes_by_first_byte() {
        assert_eq!(classify(&[4, 0, 0, 0, 1, 2]), DatagramKind::WireGuard);
        assert_eq!(classify(&[1, 0, 0, 0]), DatagramKind::WireGuard);
        assert_eq!(classify(&[4, 0, 1, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[0xc3, 0, 0, 0, 1]), DatagramKind::Quic);
        assert_eq!(classify(&[0x41]), DatagramKind::Quic);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(
            classify(&reflect::Reflect::Request { tx: [0; 12] }.encode()),
            DatagramKind::Reflect
        );
    }
}
