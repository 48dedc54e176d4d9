//! TLS and QUIC transport settings for the control connection, both ends.
//!
//! Pure configuration (no I/O) except the certificate generators, which
//! draw randomness. Nodes pin the SHA-256 of one certificate's DER, carried
//! by the join line, like kubeadm's `--discovery-token-ca-cert-hash`: the
//! mesh's CA ([`generate_ca`]), which issues each server's certificate
//! ([`issue_server_certificate`]), so one pin reaches every server of the
//! mesh. A server presents its certificate and the CA's; a node accepts a
//! chain whose CA has the pinned hash and which verifies against it, or —
//! as meshes made before there was a CA have it — a server certificate
//! whose own hash is pinned (that certificate then issues the certificates
//! of servers added later). No hostname: the pin is the trust.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use subtle::ConstantTimeEq;

/// The pin itself lives with the other identities: the node's config and
/// join line carry it without depending on the rendezvous.
pub use crate::identity::CertHash;
use crate::wire::control::{ALPN, LINK_ALPN};

/// The name the node asks for; irrelevant to trust, which is the pin.
pub const SERVER_NAME: &str = "mesh-rendezvous";
/// The server's idle timeout; a node's is shorter, and QUIC takes the
/// smaller of the two ends'.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A node's session: a keepalive about every second (well inside the
/// shortest common NAT UDP timeout, so the mapping WireGuard shares with
/// QUIC stays open), and a server silent for 3 s (three keepalives
/// unanswered) is gone, so a node whose server dies is at another within
/// about 4 s (`client::FAILOVER_JITTER`), and a pair it relayed for is
/// relayed by another within 5 s.
///
/// Each connection draws its interval from `NODE_KEEPALIVE_MIN ..=
/// NODE_KEEPALIVE`. QUIC restarts the keepalive timer on every packet
/// received, so one peer-map change sent to every member would otherwise
/// line up all their keepalives a second later, and again every second
/// after: a wave of N pings, and N acknowledgements, that a join or a
/// change arriving meanwhile waits behind. Intervals that differ drift
/// the members apart within a few seconds.
pub const NODE_KEEPALIVE: Duration = Duration::from_secs(1);
pub const NODE_KEEPALIVE_MIN: Duration = Duration::from_millis(800);
pub const NODE_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
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
    #[error("cannot generate the rendezvous certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
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

/// A mesh's CA: (certificate DER, PKCS#8 key DER). It signs server
/// certificates only.
pub fn generate_ca(mesh_id: &str) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("meshd mesh {mesh_id} CA"),
    );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
}

/// A server's certificate issued by the mesh's pinned certificate
/// (`issuer_der`, whose key is `issuer_key_der`): (certificate DER,
/// PKCS#8 key DER), for [`SERVER_NAME`], naming the server.
pub fn issue_server_certificate(
    issuer_der: &[u8],
    issuer_key_der: &[u8],
    server: &str,
) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let issuer_key = rcgen::KeyPair::try_from(issuer_key_der).map_err(generate)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(issuer_der), issuer_key)
        .map_err(generate)?;
    let mut params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).map_err(generate)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("mesh-rendezvous {server}"),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    Ok((cert.der().to_vec(), key.serialize_der()))
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

/// The rendezvous's QUIC server configuration: its certificate, then the
/// certificate that issued it (the mesh's CA) when there is one.
pub fn server_config(
    chain: Vec<Vec<u8>>,
    key_der: Vec<u8>,
) -> Result<quinn::ServerConfig, TlsError> {
    let config_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .map_err(config_err)?;
    // Nodes, and the mesh's other servers (links).
    tls.alpn_protocols = vec![ALPN.to_vec(), LINK_ALPN.to_vec()];
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

/// A server's QUIC client configuration for a link to another server of
/// the mesh: trusting the pinned certificate as a node does, speaking the
/// link protocol.
pub fn link_client_config(pin: CertHash) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(pin, LINK_ALPN)
}

/// A node's QUIC client configuration, trusting exactly the pinned certificate.
pub fn client_config(pin: CertHash) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(pin, ALPN)
}

fn client_config_for(pin: CertHash, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(keepalive_interval(&mut rand::thread_rng())))
        // The rendezvous opens the control stream (it speaks first), and
        // relay streams for frames too big for a datagram.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(RELAY_STREAMS.into())
        .max_idle_timeout(Some(NODE_IDLE_TIMEOUT.try_into().map_err(|_| TlsError::Config("idle timeout".into()))?))
        .initial_mtu(INITIAL_MTU);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One connection's keepalive interval, within `NODE_KEEPALIVE_MIN ..=
/// NODE_KEEPALIVE`.
fn keepalive_interval(rng: &mut impl rand::Rng) -> Duration {
    rng.gen_range(NODE_KEEPALIVE_MIN..=NODE_KEEPALIVE)
}

/// Accepts the certificate whose SHA-256 is pinned, or one it issued
/// (presented with it); still checks the handshake signatures, so only the
/// holder of the server certificate's key can present it.
#[derive(Debug)]
struct PinnedCertificate {
    pin: CertHash,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned =
            |cert: &CertificateDer<'_>| bool::from(CertHash::of(cert).0.ct_eq(&self.pin.0));
        if pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let unpinned = || {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        };
        // The CA comes with the server's certificate; it is trusted for
        // its hash, and the server's certificate for its signature.
        let Some(ca) = intermediates.iter().find(|c| pinned(c)) else {
            return Err(unpinned());
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).map_err(|_| unpinned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|_| unpinned())?;
        let name = ServerName::try_from(SERVER_NAME).map_err(|_| unpinned())?;
        verifier.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
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
    fn keepalive_intervals_stay_in_their_range_and_differ() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let drawn: Vec<Duration> = (0..1000).map(|_| keepalive_interval(&mut rng)).collect();
        let (low, high) = (drawn.iter().min().unwrap(), drawn.iter().max().unwrap());
        assert!(
            *low >= NODE_KEEPALIVE_MIN && *high <= NODE_KEEPALIVE,
            "{low:?}..{high:?}"
        );
        // Spread over most of the range, so members drift apart.
        assert!(
            *high - *low > Duration::from_millis(180),
            "{low:?}..{high:?}"
        );
        // Three unanswered keepalives still fit in the idle timeout.
        assert!(NODE_KEEPALIVE * 3 <= NODE_IDLE_TIMEOUT);
    }

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
        server_config(vec![cert.clone()], key).unwrap();
        client_config(CertHash::of(&cert)).unwrap();
    }

    fn verify(pin: &[u8], chain: &[&[u8]]) -> Result<ServerCertVerified, rustls::Error> {
        let verifier = PinnedCertificate {
            pin: CertHash::of(pin),
            provider: provider(),
        };
        let certs: Vec<CertificateDer<'_>> =
            chain.iter().map(|c| CertificateDer::from(*c)).collect();
        let (leaf, rest) = certs.split_first().unwrap();
        verifier.verify_server_cert(
            leaf,
            rest,
            &ServerName::try_from(SERVER_NAME).unwrap(),
            &[],
            UnixTime::now(),
        )
    }

    #[test]
    fn a_server_certificate_issued_by_the_pinned_ca_is_accepted_with_it() {
        let (ca, ca_key) = generate_ca("m1").unwrap();
        let (rv1, _) = issue_server_certificate(&ca, &ca_key, "rv1").unwrap();
        let (rv2, _) = issue_server_certificate(&ca, &ca_key, "rv2").unwrap();
        verify(&ca, &[&rv1, &ca]).unwrap();
        verify(&ca, &[&rv2, &ca]).unwrap();
        // Not without the CA in the chain, whose hash is the trust.
        assert!(verify(&ca, &[&rv1]).is_err());
    }

    #[test]
    fn another_meshs_ca_or_a_self_signed_stranger_is_refused() {
        let (ca, _) = generate_ca("m1").unwrap();
        let (other, other_key) = generate_ca("m2").unwrap();
        let (theirs, _) = issue_server_certificate(&other, &other_key, "rv1").unwrap();
        // Their CA presented as if it were ours: not the pinned hash.
        assert!(verify(&ca, &[&theirs, &other]).is_err());
        // Our CA presented with a certificate it did not issue.
        assert!(verify(&ca, &[&theirs, &ca]).is_err());
        let (stranger, _) = generate_certificate().unwrap();
        assert!(verify(&ca, &[&stranger, &ca]).is_err());
    }

    #[test]
    fn a_mesh_from_before_the_ca_adds_servers_issued_by_its_pinned_certificate() {
        let (old, old_key) = generate_certificate().unwrap();
        verify(&old, &[&old]).unwrap();
        let (added, _) = issue_server_certificate(&old, &old_key, "rv2").unwrap();
        verify(&old, &[&added, &old]).unwrap();
    }
}
