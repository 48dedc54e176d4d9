//! Node identity: x25519 static keys in WireGuard's base64 encoding.
//!
//! Pure, except [`keyfile`], which reads and writes private key files.
//! A node *is* its static key: the WireGuard public key names it everywhere
//! (peer map, API, logs as a short prefix).

pub mod cert_hash;
pub mod join_token;
pub mod keyfile;

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::{CryptoRng, RngCore};

pub use cert_hash::{CertHash, CertHashError};
pub use join_token::{JoinToken, JoinTokenError};

/// Why a key string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not valid base64 ({0}); expected 44 characters as printed by `wg genkey` / `meshctl genkey`")]
    Base64(String),
    #[error("decodes to {len} bytes; a WireGuard key is 32 bytes (44 base64 characters)")]
    Length { len: usize },
}

fn decode_key(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64
        .decode(s.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length { len: bytes.len() })
}

/// How many characters of a key's base64 form tell nodes apart in logs,
/// tables and metrics labels.
pub const SHORT_KEY_LEN: usize = 8;

/// The first [`SHORT_KEY_LEN`] characters of a key as printed (a
/// [`PublicKey`] or a key string from the API): the prefix `meshctl`, the
/// logs and the metrics show. Never panics, whatever the text.
pub fn short_key(key: impl fmt::Display) -> String {
    let mut text = key.to_string();
    if let Some((end, _)) = text.char_indices().nth(SHORT_KEY_LEN) {
        text.truncate(end);
    }
    text
}

/// A node's public key: its identity in the mesh.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first characters of the base64 form, for logs and tables
    /// ([`short_key`]).
    pub fn short(&self) -> String {
        short_key(self)
    }

    pub(crate) fn to_dalek(self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's private key. Never printed: `Debug` is redacted and there is no
/// `Display`; [`PrivateKey::to_base64`] is for writing key files only.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key, clamped as `wg genkey` clamps it (RFC 7748 §5), so the
    /// base64 form is byte-for-byte what WireGuard's tools would produce.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Self(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn public_key(&self) -> PublicKey {
        // x25519-dalek clamps on use, exactly as `wg pubkey` does, so an
        // unclamped key from elsewhere still yields WireGuard's public key.
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub(crate) fn to_dalek(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1 test vector (Alice), in WireGuard's base64.
    const ALICE_PRIVATE: [u8; 32] = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66,
        0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9,
        0x2c, 0x2a,
    ];
    const ALICE_PUBLIC: [u8; 32] = [
        0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7,
        0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b,
        0x4e, 0x6a,
    ];

    #[test]
    fn a_short_key_is_the_first_eight_characters_whether_from_a_key_or_its_text() {
        let key = PrivateKey::from_bytes(ALICE_PRIVATE).public_key();
        let text = key.to_string();
        assert_eq!(key.short(), &text[..8]);
        assert_eq!(short_key(&text), key.short());
        assert_eq!(short_key("abc"), "abc");
        // Text from a file or the API may be anything: cut by characters.
        assert_eq!(short_key("ééééééééé"), "éééééééé");
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        let private = PrivateKey::from_bytes(ALICE_PRIVATE);
        assert_eq!(private.public_key().as_bytes(), &ALICE_PUBLIC);
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        let k = PrivateKey::generate(&mut rand::rngs::OsRng);
        assert_eq!(k.0[0] & 7, 0);
        assert_eq!(k.0[31] & 0xc0, 0x40);
    }

    #[test]
    fn base64_round_trips_and_rejects_bad_input() {
        let public = PrivateKey::from_bytes(ALICE_PRIVATE).public_key();
        assert_eq!(public.to_string().parse::<PublicKey>(), Ok(public));
        assert!(matches!(
            "not base64!".parse::<PublicKey>(),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            "AAAA".parse::<PublicKey>(),
            Err(KeyError::Length { len: 3 })
        );
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let k = PrivateKey::from_bytes(ALICE_PRIVATE);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
