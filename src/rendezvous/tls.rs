//! TLS and QUIC transport settings for the control connection, both ends.
//!
//! Pure configuration (no I/O) except [`generate_certificate`], which draws
//! randomness. The rendezvous has a self-signed certificate; nodes pin the
//! SHA-256 of its DER, carried by the join line, like kubeadm's
//! `--discovery-token-ca-cert-hash`. No CA, no hostname: the pin is the trust.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::wire::control::ALPN;

/// The name the node asks for; irrelevant to trust, which is the pin.
pub const SERVER_NAME: &str = "mesh-rendezvous";
/// Keepalive from nodes: well inside the shortest common NAT UDP timeout
/// (30 s), so the mapping WireGuard shares with QUIC stays open.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Relay streams open at once in each direction (one per oversized frame).
const RELAY_STREAMS: u32 = 64;
/// The largest UDP payload a 1500-byte underlay carries over IPv6 (1500 −
/// 40 − 8), and QUIC's packet size from the start instead of 1200. A relay
/// frame of a full `mesh0` packet (1380 + 32 of WireGuard + 5 of relay
/// header) then fits one DATAGRAM frame; at 1200 every full-size packet
/// would take a stream of its own. The node's end cannot run path-MTU
/// discovery (its socket is shared with WireGuard, which must be allowed to
/// fragment on narrower paths), so a narrower path fragments these packets
/// rather than losing them; the rendezvous's end discovers and, on loss,
/// falls back to 1200 (quinn's black-hole detection).
const INITIAL_MTU: u16 = 1452;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad certificate hash {0:?}: expected sha256:<64 hex digits> as printed by `mesh-rendezvous token create`")]
    BadHash(String),
    #[error("cannot generate the rendezvous certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

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
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::BadHash(s.to_owned());
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).map_err(|_| bad())?;
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

/// A fresh self-signed certificate: (certificate DER, PKCS#8 key DER).
pub fn generate_certificate() -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((
        certified.cert.der().to_vec(),
        certified.signing_key.serialize_der(),
    ))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Endpoint settings for both ends. Greasing the QUIC fixed bit (RFC 9287)
/// is off: meshd tells QUIC from WireGuard on its shared socket by that
/// very bit, so a greased packet would be dropped as garbage.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    // 4-byte connection ids instead of 8: every relayed packet carries one,
    // and with them a full mesh0 packet fits one DATAGRAM frame at
    // INITIAL_MTU (see there). quinn never hands out an id already in use,
    // so the smaller space costs nothing but a few retries at very large
    // meshes.
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CID_LEN)));
    config
}

/// Length of the connection ids either end chooses.
const CID_LEN: usize = 4;

/// The rendezvous's QUIC server configuration.
pub fn server_config(cert_der: Vec<u8>, key_der: Vec<u8>) -> Result<quinn::ServerConfig, TlsError> {
    let config_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .map_err(config_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The server opens the one control stream; a node may open none, and
    // unidirectional streams only for relay frames too big for a datagram.
    transport
        // Discover up to what an IPv4 path of 1500 bytes carries; an IPv6
        // path settles at INITIAL_MTU.
        .mtu_discovery_config(Some({
            let mut mtud = quinn::MtuDiscoveryConfig::default();
            mtud.upper_bound(1472);
            mtud
        }))
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(RELAY_STREAMS.into())
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|_| TlsError::Config("idle timeout".into()))?))
        .initial_mtu(INITIAL_MTU);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A node's QUIC client configuration, trusting exactly the pinned certificate.
pub fn client_config(pin: CertHash) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEPALIVE))
        // The rendezvous opens the control stream (it speaks first), and
        // relay streams for frames too big for a datagram.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(RELAY_STREAMS.into())
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|_| TlsError::Config("idle timeout".into()))?))
        .initial_mtu(INITIAL_MTU);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts the one certificate whose SHA-256 is pinned; still checks the
/// handshake signatures, so only the holder of its key can present it.
#[derive(Debug)]
struct PinnedCertificate {
    pin: CertHash,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if bool::from(CertHash::of(end_entity).0.ct_eq(&self.pin.0)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_hash_round_trips_and_rejects_garbage() {
        let h = CertHash::of(b"certificate");
        assert_eq!(h.to_string().parse::<CertHash>().unwrap(), h);
        for bad in [
            "",
            "sha256:",
            "md5:00",
            "sha256:zz",
            &format!("sha256:{}", "é".repeat(32)),
        ] {
            assert!(bad.parse::<CertHash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn configs_build_from_a_generated_certificate() {
        let (cert, key) = generate_certificate().unwrap();
        server_config(cert.clone(), key).unwrap();
        client_config(CertHash::of(&cert)).unwrap();
    }
}
