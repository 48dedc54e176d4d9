//! NAT checks: "where do you see me?" asked of mesh-rendezvous on a second
//! UDP port (proto/reflect.md).
//!
//! Pure. The rendezvous already tells a node where its QUIC connection
//! comes from; asking the same question on another port shows whether the
//! node's NAT keeps one public port for every destination
//! (endpoint-independent mapping, RFC 4787 §4.1) or picks a new one per
//! destination (endpoint-dependent) — the difference between a NAT that can
//! be punched through and one that needs the relay.
//!
//! Layout (request and response are both [`REFLECT_LEN`] bytes, so the
//! rendezvous never sends more than it received: no amplification):
//!
//! ```text
//!  0       4      5       8               20                      39
//!  +-------+------+-------+---------------+-----------------------+
//!  | magic | type | zero  | tx id (12)    | observed addr (19)    |
//!  +-------+------+-------+---------------+-----------------------+
//! ```
//!
//! Type 1 is a request (observed all zero), 2 a response (the request's
//! source as the rendezvous saw it). The magic's first byte is 0x00, like a
//! probe's: neither WireGuard nor QUIC. Responses are not authenticated; the
//! random transaction id only lets a node ignore ones it did not ask for.

use std::net::SocketAddr;

use super::probe::{decode_addr, encode_addr};

/// First bytes of every NAT check: 0x00 'M' 'R' and the version.
pub const MAGIC: [u8; 4] = [0x00, b'M', b'R', 1];
pub const REFLECT_LEN: usize = 39;
/// The rendezvous answers NAT checks on its QUIC port plus this.
pub const PORT_OFFSET: u16 = 1;

const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;

pub type TxId = [u8; 12];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflect {
    Request { tx: TxId },
    Response { tx: TxId, observed: SocketAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReflectError {
    #[error("NAT check of {len} bytes, expected {REFLECT_LEN}")]
    Length { len: usize },
    #[error("not a NAT check (bad magic)")]
    Magic,
    #[error("unknown NAT check type {0}")]
    Type(u8),
    #[error("bad address in a NAT check response")]
    Address,
}

impl Reflect {
    /// Checked parse of untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReflectError> {
        let bytes: &[u8; REFLECT_LEN] = bytes
            .try_into()
            .map_err(|_| ReflectError::Length { len: bytes.len() })?;
        if bytes[..4] != MAGIC {
            return Err(ReflectError::Magic);
        }
        let mut tx = [0u8; 12];
        tx.copy_from_slice(&bytes[8..20]);
        match bytes[4] {
            TYPE_REQUEST => Ok(Reflect::Request { tx }),
            TYPE_RESPONSE => {
                let observed = decode_addr(&bytes[20..]).map_err(|_| ReflectError::Address)?;
                Ok(Reflect::Response { tx, observed })
            }
            other => Err(ReflectError::Type(other)),
        }
    }

    pub fn encode(&self) -> [u8; REFLECT_LEN] {
        let mut out = [0u8; REFLECT_LEN];
        out[..4].copy_from_slice(&MAGIC);
        match self {
            Reflect::Request { tx } => {
                out[4] = TYPE_REQUEST;
                out[8..20].copy_from_slice(tx);
            }
            Reflect::Response { tx, observed } => {
                out[4] = TYPE_RESPONSE;
                out[8..20].copy_from_slice(tx);
                out[20..].copy_from_slice(&encode_addr(*observed));
            }
        }
        out
    }
}

/// The reflector's answer to one datagram: `None` for anything but a
/// well-formed request.
pub fn answer(datagram: &[u8], from: SocketAddr) -> Option<[u8; REFLECT_LEN]> {
    match Reflect::parse(datagram).ok()? {
        Reflect::Request { tx } => {
            let observed = SocketAddr::new(from.ip().to_canonical(), from.port());
            Some(Reflect::Response { tx, observed }.encode())
        }
        Reflect::Response { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_answered_with_its_source_in_as_many_bytes() {
        let request = Reflect::Request { tx: [7; 12] }.encode();
        let from: SocketAddr = "[::ffff:203.0.113.41]:3947".parse().unwrap();
        let response = answer(&request, from).expect("answered");
        assert_eq!(response.len(), request.len());
        assert_eq!(
            Reflect::parse(&response),
            Ok(Reflect::Response {
                tx: [7; 12],
                observed: "203.0.113.41:3947".parse().unwrap()
            })
        );
    }

    #[test]
    fn responses_and_garbage_get_no_answer_and_never_panic() {
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let response = Reflect::Response {
            tx: [1; 12],
            observed: from,
        }
        .encode();
        assert_eq!(
            answer(&response, from),
            None,
            "a response is never answered: no loops"
        );
        assert_eq!(Reflect::parse(&[]), Err(ReflectError::Length { len: 0 }));
        let mut bad = Reflect::Request { tx: [0; 12] }.encode();
        bad[4] = 9;
        assert_eq!(Reflect::parse(&bad), Err(ReflectError::Type(9)));
        bad[1] = b'X';
        assert_eq!(Reflect::parse(&bad), Err(ReflectError::Magic));
        let mut odd = response;
        odd[20] = 5;
        assert_eq!(Reflect::parse(&odd), Err(ReflectError::Address));
        for len in 0..60 {
            let _ = answer(&vec![0x00; len], from);
            let _ = Reflect::parse(&vec![0xff; len]);
        }
    }
}
