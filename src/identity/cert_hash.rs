//! The rendezvous's identity as a node pins it: the SHA-256 of its
//! certificate's DER, carried by the join line (`sha256:<hex>`), like
//! kubeadm's `--discovery-token-ca-cert-hash`.
//!
//! Pure. Both sides use it: the rendezvous prints it, the node's config,
//! `meshd join` and the TLS verifier ([`crate::rendezvous::tls`]) check it.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A string that is not a certificate hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad certificate hash {0:?}: expected sha256:<64 hex digits> as printed by `mesh-rendezvous token create`")]
pub struct CertHashError(String);

/// SHA-256 of a certificate's DER: the value a join line pins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CertHash(pub [u8; 32]);

impl CertHash {
    pub fn of(cert_der: &[u8]) -> Self {
        Self(Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for CertHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CertHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CertHash {
    type Err = CertHashError;
    fn from_str(s: &str) -> Result<Self, CertHashError> {
        let bad = || CertHashError(s.to_owned());
        let digits = s.strip_prefix("sha256:").ok_or_else(bad)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl serde::Serialize for CertHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CertHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cert_hash_reads_back_what_it_prints_and_refuses_other_text() {
        let hash = CertHash::of(b"cert");
        let text = hash.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<CertHash>().unwrap(), hash);
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &text[..text.len() - 1],
            &text.replace("sha256:", ""),
        ] {
            let err = bad.parse::<CertHash>().unwrap_err().to_string();
            assert!(err.contains("token create"), "{bad:?}: {err}");
        }
    }
}
