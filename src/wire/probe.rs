//! Path probes: authenticated ping/pong between two nodes on the shared socket.
//!
//! Pure. A probe measures whether one candidate path between two nodes
//! works and how long a round trip takes, independently of WireGuard
//! sessions (so switching path never needs a handshake). Both directions
//! are authenticated with a key derived from the two nodes' static-static
//! X25519 secret, so nobody else can forge a pong that makes a dead path
//! look alive; a pong answers one outstanding ping by its random id, so a
//! replayed pong proves nothing either, and a ping carries the time it was
//! sent, so an old one can be told from a fresh one. See proto/probe.md.
//!
//! Layout (all probes are [`PROBE_LEN`] bytes):
//!
//! ```text
//!  0       4       5       8                  20                      52
//!  +-------+-------+-------+------------------+-----------------------+
//!  | magic | type  | zero  | tx id (12)       | sender static key (32)|
//!  +-------+-------+-------+------------------+-----------------------+
//!  52                       71                 87
//!  +------------------------+-----------------+
//!  | observed addr (19)     | MAC (16)        |
//!  +------------------------+-----------------+
//! ```
//!
//! The magic's first byte is 0x00: neither a WireGuard type (1–4) nor a
//! QUIC packet (fixed bit 0x40). In a pong, the 19 bytes at 52 are the
//! address the ping came from, as the answering node saw it; in a ping they
//! are a flag byte (1: a timestamp follows) and the sender's clock in
//! milliseconds since the Unix epoch (big-endian u64), or all zero from a
//! node of release 0.1.0, whose pings carry no time.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::identity::{PrivateKey, PublicKey};

/// First bytes of every probe: 0x00 'M' 'P' and the probe version.
pub const MAGIC: [u8; 4] = [0x00, b'M', b'P', 1];
pub const PROBE_LEN: usize = 87;
const MAC_LEN: usize = 16;
const BODY_LEN: usize = PROBE_LEN - MAC_LEN;

type Blake2sMac128 = Blake2sMac<blake2::digest::consts::U16>;

/// A random id that pairs a pong with its ping.
pub type TxId = [u8; 12];

/// The flag byte at offset 52 of a ping that carries its send time.
const PING_TIMESTAMPED: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `sent_ms`: the pinger's clock when it sent the ping, in milliseconds
    /// since the Unix epoch; `None` from a 0.1.0 node (see [`super::probe`]).
    Ping { sent_ms: Option<u64> },
    /// `observed`: where the ping came from, as the answering node saw it.
    Pong { observed: SocketAddr },
}

/// A parsed probe whose MAC is not checked yet: only [`ProbeKey::open`]
/// turns it into something to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub tx: TxId,
    pub sender: PublicKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("probe of {len} bytes, expected {PROBE_LEN}")]
    Length { len: usize },
    #[error("not a probe (bad magic)")]
    Magic,
    #[error("unknown probe type {0}")]
    Type(u8),
    #[error("malformed observed address")]
    Address,
    #[error("probe MAC does not verify")]
    Mac,
}

/// Whether a datagram is a probe, by its first bytes.
#[inline]
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

/// Reads the unauthenticated header: who claims to have sent it.
pub fn peek(datagram: &[u8]) -> Result<Probe, ProbeError> {
    let bytes: &[u8; PROBE_LEN] = datagram.try_into().map_err(|_| ProbeError::Length {
        len: datagram.len(),
    })?;
    if bytes[..4] != MAGIC {
        return Err(ProbeError::Magic);
    }
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&bytes[8..20]);
    let mut sender = [0u8; 32];
    sender.copy_from_slice(&bytes[20..52]);
    let kind = match bytes[4] {
        1 => ProbeKind::Ping {
            sent_ms: decode_sent(&bytes[52..71]),
        },
        2 => ProbeKind::Pong {
            observed: decode_addr(&bytes[52..71])?,
        },
        other => return Err(ProbeError::Type(other)),
    };
    Ok(Probe {
        kind,
        tx,
        sender: PublicKey::from_bytes(sender),
    })
}

/// The key two nodes share for probes, derived from their static keys.
#[derive(Clone)]
pub struct ProbeKey([u8; 32]);

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeKey(<redacted>)")
    }
}

impl ProbeKey {
    /// Both nodes derive the same key: X25519 is symmetric. `None` for a
    /// low-order peer key, whose shared secret anyone could compute.
    pub fn derive(own: &PrivateKey, peer: &PublicKey) -> Option<Self> {
        let shared = own.to_dalek().diffie_hellman(&peer.to_dalek());
        if !shared.was_contributory() {
            return None;
        }
        let mut h = Blake2s256::new();
        h.update(b"meshd probe v1");
        h.update(shared.as_bytes());
        Some(Self(h.finalize().into()))
    }

    /// Writes a probe into `out` and returns it.
    pub fn seal<'a>(
        &self,
        kind: ProbeKind,
        tx: TxId,
        sender: &PublicKey,
        out: &'a mut [u8; PROBE_LEN],
    ) -> &'a [u8] {
        out.fill(0);
        out[..4].copy_from_slice(&MAGIC);
        out[8..20].copy_from_slice(&tx);
        out[20..52].copy_from_slice(sender.as_bytes());
        match kind {
            ProbeKind::Ping { sent_ms } => {
                out[4] = 1;
                if let Some(ms) = sent_ms {
                    out[52] = PING_TIMESTAMPED;
                    out[53..61].copy_from_slice(&ms.to_be_bytes());
                }
            }
            ProbeKind::Pong { observed } => {
                out[4] = 2;
                out[52..71].copy_from_slice(&encode_addr(observed));
            }
        }
        let tag = self
            .mac()
            .chain_update(&out[..BODY_LEN])
            .finalize()
            .into_bytes();
        out[BODY_LEN..].copy_from_slice(&tag);
        out
    }

    /// Verifies a datagram's MAC (constant time) and returns the probe.
    pub fn open(&self, datagram: &[u8]) -> Result<Probe, ProbeError> {
        let probe = peek(datagram)?;
        // `peek` checked the length: this split cannot fail.
        let (body, tag) = datagram
            .split_at_checked(BODY_LEN)
            .ok_or(ProbeError::Length {
                len: datagram.len(),
            })?;
        self.mac()
            .chain_update(body)
            .verify_slice(tag)
            .map_err(|_| ProbeError::Mac)?;
        Ok(probe)
    }

    fn mac(&self) -> Blake2sMac128 {
        <Blake2sMac128 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("32-byte key"))
    }
}

/// A ping's send time, if its flag says it carries one. Other flag values
/// are left for later versions and read as "no time".
fn decode_sent(field: &[u8]) -> Option<u64> {
    let ms: [u8; 8] = field.get(1..9)?.try_into().ok()?;
    (field.first() == Some(&PING_TIMESTAMPED)).then(|| u64::from_be_bytes(ms))
}

/// The length of an address in probes and NAT checks.
pub(crate) const ADDR_LEN: usize = 19;

/// `addr` in the 19-byte form of probes: family (4 or 6), port, 16 address
/// bytes (IPv4 as v4-mapped).
pub(crate) fn encode_addr(addr: SocketAddr) -> [u8; ADDR_LEN] {
    let v6 = match addr.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let mut out = [0u8; ADDR_LEN];
    out[0] = if addr.is_ipv4() { 4 } else { 6 };
    out[1..3].copy_from_slice(&addr.port().to_be_bytes());
    out[3..].copy_from_slice(&v6.octets());
    out
}

/// Reads the 19-byte form [`encode_addr`] writes.
pub(crate) fn decode_addr(bytes: &[u8]) -> Result<SocketAddr, ProbeError> {
    let Some(&[family, port_hi, port_lo, ref octets @ ..]) = bytes.get(..ADDR_LEN) else {
        return Err(ProbeError::Address);
    };
    let octets: [u8; 16] = octets.try_into().map_err(|_| ProbeError::Address)?;
    let port = u16::from_be_bytes([port_hi, port_lo]);
    let ip = Ipv6Addr::from(octets);
    match family {
        4 => ip
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(v4.into(), port))
            .ok_or(ProbeError::Address),
        6 => Ok(SocketAddr::new(ip.into(), port)),
        _ => Err(ProbeError::Address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (PrivateKey, PrivateKey) {
        (
            PrivateKey::from_bytes([1; 32]),
            PrivateKey::from_bytes([2; 32]),
        )
    }

    #[test]
    fn both_sides_derive_the_same_key_and_a_pong_round_trips() {
        let (a, b) = keys();
        let ka = ProbeKey::derive(&a, &b.public_key()).unwrap();
        let kb = ProbeKey::derive(&b, &a.public_key()).unwrap();
        let observed: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut buf = [0u8; PROBE_LEN];
        let wire = ka
            .seal(
                ProbeKind::Pong { observed },
                [9; 12],
                &a.public_key(),
                &mut buf,
            )
            .to_vec();
        assert!(is_probe(&wire));
        let probe = kb.open(&wire).unwrap();
        assert_eq!(
            probe,
            Probe {
                kind: ProbeKind::Pong { observed },
                tx: [9; 12],
                sender: a.public_key()
            }
        );
    }

    #[test]
    fn a_third_party_cannot_forge_or_alter_a_probe() {
        let (a, b) = keys();
        let mallory = PrivateKey::from_bytes([3; 32]);
        let kb = ProbeKey::derive(&b, &a.public_key()).unwrap();
        let forged_key = ProbeKey::derive(&mallory, &b.public_key()).unwrap();
        let mut buf = [0u8; PROBE_LEN];
        // Mallory claims to be a.
        let ping = ProbeKind::Ping {
            sent_ms: Some(1_700_000_000_000),
        };
        let wire = forged_key
            .seal(ping, [1; 12], &a.public_key(), &mut buf)
            .to_vec();
        assert_eq!(kb.open(&wire), Err(ProbeError::Mac));
        // A genuine probe with one bit flipped.
        let ka = ProbeKey::derive(&a, &b.public_key()).unwrap();
        let mut wire = ka.seal(ping, [1; 12], &a.public_key(), &mut buf).to_vec();
        wire[10] ^= 1;
        assert_eq!(kb.open(&wire), Err(ProbeError::Mac));
        // Nor its send time: the timestamp is inside the MAC.
        let mut wire = ka.seal(ping, [1; 12], &a.public_key(), &mut buf).to_vec();
        wire[60] ^= 1;
        assert_eq!(kb.open(&wire), Err(ProbeError::Mac));
    }

    #[test]
    fn a_ping_carries_its_send_time_and_a_0_1_ping_reads_as_untimed() {
        let (a, b) = keys();
        let ka = ProbeKey::derive(&a, &b.public_key()).unwrap();
        let kb = ProbeKey::derive(&b, &a.public_key()).unwrap();
        let mut buf = [0u8; PROBE_LEN];
        let ping = ProbeKind::Ping {
            sent_ms: Some(1_764_864_000_123),
        };
        let wire = ka.seal(ping, [4; 12], &a.public_key(), &mut buf).to_vec();
        assert_eq!(kb.open(&wire).unwrap().kind, ping);
        // Release 0.1.0 left bytes 52..71 of a ping zero.
        let old = ka
            .seal(
                ProbeKind::Ping { sent_ms: None },
                [4; 12],
                &a.public_key(),
                &mut buf,
            )
            .to_vec();
        assert!(old[52..71].iter().all(|b| *b == 0));
        assert_eq!(
            kb.open(&old).unwrap().kind,
            ProbeKind::Ping { sent_ms: None }
        );
    }

    #[test]
    fn malformed_probes_are_errors_not_panics() {
        assert_eq!(peek(&[]), Err(ProbeError::Length { len: 0 }));
        assert_eq!(peek(&[0u8; PROBE_LEN]), Err(ProbeError::Magic));
        let mut bad = [0u8; PROBE_LEN];
        bad[..4].copy_from_slice(&MAGIC);
        bad[4] = 7;
        assert_eq!(peek(&bad), Err(ProbeError::Type(7)));
        bad[4] = 2;
        bad[52] = 5;
        assert_eq!(peek(&bad), Err(ProbeError::Address));
        for len in 0..PROBE_LEN + 2 {
            let _ = peek(&vec![0xff; len]);
        }
    }

    #[test]
    fn probes_are_neither_wireguard_nor_quic() {
        assert_eq!(
            crate::wire::classify(&MAGIC),
            crate::wire::DatagramKind::Probe
        );
    }
}
