//! Proof that a node holds the private half of the key it registers.
//!
//! Pure. The proof is a BLAKE2s-256 MAC keyed with the static-static
//! X25519 secret of node and rendezvous, over a domain label, the QUIC
//! connection's TLS exporter value (RFC 8446 §7.5) and the node's public
//! key. Only the two key holders can compute it, and the exporter binds it
//! to one TLS session: a proof lifted from one connection is worthless on
//! another. See proto/control.md "Admission proof".

use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac256;

use crate::identity::{PrivateKey, PublicKey};
use crate::wire::control::Proof;

/// TLS exporter label for the admission proof.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshd-admission";
const DOMAIN: &[u8] = b"meshd admission v1";

/// Node side: the proof to put in the hello.
pub fn proof(node_private: &PrivateKey, server_public: &PublicKey, exporter: &[u8; 32]) -> Proof {
    let node_public = node_private.public_key();
    let shared = node_private
        .to_dalek()
        .diffie_hellman(&server_public.to_dalek());
    Proof(
        mac(shared.as_bytes())
            .chain_update(transcript(exporter, &node_public))
            .finalize()
            .into_bytes()
            .into(),
    )
}

/// Server side: whether `proof` was made by the holder of `node_public`'s
/// private key for this connection. Constant time in the MAC comparison.
pub fn verify(
    server_private: &PrivateKey,
    node_public: &PublicKey,
    exporter: &[u8; 32],
    proof: &Proof,
) -> bool {
    let shared = server_private
        .to_dalek()
        .diffie_hellman(&node_public.to_dalek());
    // A low-order public key makes the shared secret all zeros, which
    // anyone can compute: such a key proves nothing.
    if !shared.was_contributory() {
        return false;
    }
    mac(shared.as_bytes())
        .chain_update(transcript(exporter, node_public))
        .verify_slice(&proof.0)
        .is_ok()
}

fn mac(key: &[u8; 32]) -> Blake2sMac256 {
    // A 32-byte key is always valid for BLAKE2s (up to 32 bytes).
    <Blake2sMac256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("32-byte key"))
}

fn transcript(exporter: &[u8; 32], node_public: &PublicKey) -> Vec<u8> {
    [DOMAIN, exporter, node_public.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from_bytes([seed; 32])
    }

    #[test]
    fn the_key_holder_proves_possession() {
        let (node, server) = (key(1), key(2));
        let exporter = [7u8; 32];
        let p = proof(&node, &server.public_key(), &exporter);
        assert!(verify(&server, &node.public_key(), &exporter, &p));
    }

    #[test]
    fn a_proof_does_not_transfer_to_another_connection_or_key() {
        let (node, server, other) = (key(1), key(2), key(3));
        let p = proof(&node, &server.public_key(), &[7u8; 32]);
        assert!(
            !verify(&server, &node.public_key(), &[8u8; 32], &p),
            "other connection"
        );
        assert!(
            !verify(&server, &other.public_key(), &[7u8; 32], &p),
            "other key"
        );
    }

    #[test]
    fn a_low_order_key_proves_nothing() {
        let server = key(2);
        // The all-zero point: X25519 with it is all zeros for every scalar.
        let zero = PublicKey::from_bytes([0u8; 32]);
        let forged = Proof(
            mac(&[0u8; 32])
                .chain_update(transcript(&[7u8; 32], &zero))
                .finalize()
                .into_bytes()
                .into(),
        );
        assert!(!verify(&server, &zero, &[7u8; 32], &forged));
    }
}
