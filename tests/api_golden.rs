//! Golden lines of the local API (meshd ↔ meshctl, `tests/golden/api/`).
//!
//! Each file is one response line exactly as meshd writes it on its socket
//! (the envelope with the version, compact JSON, a newline). `meshctl … --json`
//! prints the same documents, and scripts read them: a change of one byte
//! breaks somebody. The files are committed, never generated at test time;
//! they were written by meshd 0.2.0, whose API carried strings.
//!
//! A mesh is upgraded one machine at a time (DESIGN.md, "Rolling upgrades"),
//! so a meshctl of one release talks to a meshd of the other: the values
//! built below must serialize to the golden bytes, the golden bytes must read
//! back into the same values, and [`v0_2_0`], a frozen copy of the 0.2.0
//! types, must read what this release writes and write it back unchanged.
//! What 0.4.0 added (prefixes behind nodes: `routes`; port mapping:
//! `port_mapping` and the `mapped` candidate source; the family of a
//! direct path: `family`; another node behind the same NAT holding this
//! node's port: `port_taken`; when a peer's addresses last changed:
//! `addresses_changed_s`; `advertise-endpoint` not where the rendezvous
//! sees the node: `advertised_elsewhere`; QUIC sends the kernel refused:
//! `quic_send_errors`) has golden files of its own, written by 0.4.0;
//! 0.2.0 reads them without the new fields.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure is a panic"
)]

use std::path::PathBuf;

use std::str::FromStr;

use meshd::agent::learned::{Unusable, UnusableWhy};
use meshd::control::{
    AdvertisedElsewhere, AdvertisedRoute, CandidateInfo, CandidateSource, Envelope, Family,
    HolePunching, IoCounters, NetcheckInfo, PeerInfo, PeerPath, PeerRoutes, PingInfo,
    PortMappingInfo, RendezvousInfo, Request, Response, RoutesInfo, StatusInfo,
};
use meshd::wire::control::{MappingProtocol, NatMapping, PortTaken, RouteStatus};

/// RFC 7748 §6.1 Alice and Bob, as in proto/vectors.
const KEY_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
/// Public keys of the private keys 0x11… and 0x22….
const KEY_C: &str = "e06Qm75//kTEZaIgA31gjuNYl9Me+XLwf3SJLLD3PxM=";
const KEY_D: &str = "D6poTtKIZ7l/Smot7l34zpdOdrcBjj8iocTPJnhXDyA=";

/// `s` as whatever the field holds: an address, a prefix, a key, a `seen_at`.
fn v<T: FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

fn candidate(endpoint: &str, source: CandidateSource, answered: u64) -> CandidateInfo {
    CandidateInfo {
        endpoint: v(endpoint),
        source,
        alive: answered > 0,
        rtt_ms: (answered > 0).then_some(1.25),
        probes_sent: 4,
        probes_answered: answered,
    }
}

/// A direct peer (every candidate source), a relayed one with its reason,
/// a static peer with no name and no path.
fn peers() -> Vec<PeerInfo> {
    vec![
        PeerInfo {
            name: Some("node-b".into()),
            public_key: v(KEY_B),
            overlay_ips: vec![v("100.72.0.2"), v("fd7a:1:2::2")],
            allowed_ips: vec![v("100.72.0.2/32"), v("fd7a:1:2::2/128")],
            endpoint: Some(v("203.0.113.12:51820")),
            path: PeerPath::Direct,
            family: None,
            rtt_ms: Some(1.25),
            last_handshake: Some(42),
            rx_bytes: 2048,
            tx_bytes: 1024,
            rx_packets: 12,
            tx_packets: 10,
            handshakes: 1,
            persistent_keepalive: Some(25),
            online: true,
            nat: NatMapping::EndpointIndependent,
            candidates: vec![
                candidate("203.0.113.12:51820", CandidateSource::Advertised, 4),
                candidate("[2001:db8::12]:51820", CandidateSource::Observed, 0),
                candidate("10.0.0.12:51820", CandidateSource::Local, 0),
                candidate("198.51.100.12:40000", CandidateSource::Learned, 2),
            ],
            relay_reason: None,
            routes: vec![],
            learned_routes: vec![],
            addresses_changed_s: None,
        },
        PeerInfo {
            name: Some("node-sym".into()),
            public_key: v(KEY_C),
            overlay_ips: vec![v("100.72.0.3"), v("fd7a:1:2::3")],
            allowed_ips: vec![v("100.72.0.3/32"), v("fd7a:1:2::3/128")],
            endpoint: None,
            path: PeerPath::Relay,
            family: None,
            rtt_ms: None,
            last_handshake: Some(7),
            rx_bytes: 0,
            tx_bytes: 96,
            rx_packets: 0,
            tx_packets: 1,
            handshakes: 1,
            persistent_keepalive: None,
            online: true,
            nat: NatMapping::EndpointDependent,
            candidates: vec![candidate(
                "198.51.100.3:60260",
                CandidateSource::Observed,
                0,
            )],
            relay_reason: Some(
                "both sides are behind endpoint-dependent (symmetric) NAT; tried \
                 198.51.100.3:60260 (seen by the rendezvous): 4 probes, no answer"
                    .into(),
            ),
            routes: vec![],
            learned_routes: vec![],
            addresses_changed_s: None,
        },
        PeerInfo {
            name: None,
            public_key: v(KEY_D),
            overlay_ips: vec![v("10.99.0.1")],
            allowed_ips: vec![v("10.99.0.1/32"), v("192.168.50.0/24")],
            endpoint: None,
            path: PeerPath::None,
            family: None,
            rtt_ms: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            handshakes: 0,
            persistent_keepalive: Some(25),
            online: false,
            nat: NatMapping::Unknown,
            candidates: vec![],
            relay_reason: None,
            routes: vec![],
            learned_routes: vec![],
            addresses_changed_s: None,
        },
    ]
}

/// A node of a mesh, seen by the rendezvous, its NAT-check port, a peer
/// by name and a static peer by short key.
fn status() -> StatusInfo {
    StatusInfo {
        name: Some("node-a".into()),
        public_key: v(KEY_A),
        overlay_ips: vec![v("100.72.0.1"), v("fd7a:1:2::1")],
        interface: "mesh0".into(),
        mtu: 1380,
        listen_port: 51820,
        addresses: vec![v("100.72.0.1/16"), v("fd7a:1:2::1/48")],
        peers: 3,
        peers_direct: 1,
        peers_relayed: 1,
        peers_offline: 1,
        nat: NatMapping::EndpointIndependent,
        seen_at: vec![
            v("203.0.113.1:51820 (rendezvous)"),
            v("203.0.113.1:51820 (rendezvous NAT check)"),
            v("203.0.113.1:51820 (node-b)"),
            v("[2001:db8::1]:51820 (D6poTtKI)"),
        ],
        rendezvous: Some(RendezvousInfo {
            connected: true,
            rtt_ms: Some(3.5),
        }),
        drops: [("bad_mac".to_owned(), 2), ("quic_queue_full".to_owned(), 1)].into(),
        cookie_replies_sent: 3,
        io: IoCounters {
            tun_reads: 10,
            tun_read_packets: 445,
            tun_writes: 8,
            tun_written_packets: 300,
            tun_write_errors: 0,
            udp_sends: 4,
            udp_sent_datagrams: 130,
            udp_send_errors: 2,
            quic_send_errors: 0,
            udp_receives: 9,
            udp_received_datagrams: 310,
        },
        port_mapping: None,
        port_taken: None,
        advertised_elsewhere: None,
    }
}

/// A node with static peers only: no name, no rendezvous, nobody sees it.
fn status_static() -> StatusInfo {
    StatusInfo {
        name: None,
        public_key: v(KEY_A),
        overlay_ips: vec![v("10.99.0.2")],
        interface: "wg-static".into(),
        mtu: 1420,
        listen_port: 51821,
        addresses: vec![v("10.99.0.2/24")],
        peers: 1,
        peers_direct: 0,
        peers_relayed: 0,
        peers_offline: 1,
        nat: NatMapping::Unknown,
        seen_at: vec![],
        rendezvous: None,
        drops: Default::default(),
        cookie_replies_sent: 0,
        io: IoCounters::default(),
        port_mapping: None,
        port_taken: None,
        advertised_elsewhere: None,
    }
}

fn pong_direct() -> PingInfo {
    PingInfo {
        peer: "node-b".into(),
        overlay_ip: Some(v("100.72.0.2")),
        path: Some(PeerPath::Direct),
        endpoint: Some(v("[2001:db8::12]:51820")),
        rtt_ms: Some(0.42),
    }
}

fn pong_relay() -> PingInfo {
    PingInfo {
        peer: "node-sym".into(),
        overlay_ip: Some(v("100.72.0.3")),
        path: Some(PeerPath::Relay),
        endpoint: None,
        rtt_ms: Some(4.25),
    }
}

/// No answer in time from a static peer (short key, no overlay address).
fn pong_lost() -> PingInfo {
    PingInfo {
        peer: "D6poTtKI".into(),
        overlay_ip: None,
        path: None,
        endpoint: None,
        rtt_ms: None,
    }
}

fn netcheck_symmetric() -> NetcheckInfo {
    NetcheckInfo {
        rendezvous: Some(v("203.0.113.2:7443")),
        quic_connected: true,
        quic_rtt_ms: Some(1.5),
        quic_seen_at: Some(v("203.0.113.41:3947")),
        reflector: Some(v("203.0.113.2:7444")),
        reflector_seen_at: Some(v("203.0.113.41:60260")),
        reflector_rtt_ms: Some(0.8),
        mapping: NatMapping::EndpointDependent,
        mapping_from_peers: NatMapping::EndpointDependent,
        hole_punching: HolePunching::Unlikely,
        explanation: "the rendezvous's two ports see this node at 203.0.113.41:3947 and \
                      203.0.113.41:60260: its NAT picks a new public port for every destination"
            .into(),
        port_mapping: None,
    }
}

fn netcheck_public() -> NetcheckInfo {
    NetcheckInfo {
        rendezvous: Some(v("[2001:db8::2]:7443")),
        quic_connected: true,
        quic_rtt_ms: Some(0.3),
        quic_seen_at: Some(v("[2001:db8::11]:51820")),
        reflector: Some(v("[2001:db8::2]:7444")),
        reflector_seen_at: Some(v("[2001:db8::11]:51820")),
        reflector_rtt_ms: Some(0.25),
        mapping: NatMapping::None,
        mapping_from_peers: NatMapping::None,
        hole_punching: HolePunching::NotNeeded,
        explanation: "an address on its own interface: no NAT".into(),
        port_mapping: None,
    }
}

fn netcheck_cone() -> NetcheckInfo {
    NetcheckInfo {
        hole_punching: HolePunching::Likely,
        mapping: NatMapping::EndpointIndependent,
        mapping_from_peers: NatMapping::Unknown,
        explanation: "both rendezvous ports see this node at 203.0.113.30:51820".into(),
        quic_seen_at: Some(v("203.0.113.30:51820")),
        reflector_seen_at: Some(v("203.0.113.30:51820")),
        ..netcheck_symmetric()
    }
}

/// No rendezvous address known yet, nothing answered.
fn netcheck_silent() -> NetcheckInfo {
    NetcheckInfo {
        rendezvous: None,
        quic_connected: false,
        quic_rtt_ms: None,
        quic_seen_at: None,
        reflector: None,
        reflector_seen_at: None,
        reflector_rtt_ms: None,
        mapping: NatMapping::Unknown,
        mapping_from_peers: NatMapping::Unknown,
        hole_punching: HolePunching::Unknown,
        explanation: "the rendezvous's NAT-check port (its QUIC port + 1) did not answer".into(),
        port_mapping: None,
    }
}

/// Every golden file with the response it holds.
fn responses() -> Vec<(&'static str, Response)> {
    vec![
        ("peers", Response::Peers { peers: peers() }),
        ("peers_empty", Response::Peers { peers: vec![] }),
        ("status", Response::Status(Box::new(status()))),
        ("status_static", Response::Status(Box::new(status_static()))),
        ("pong_direct", Response::Pong(pong_direct())),
        ("pong_relay", Response::Pong(pong_relay())),
        ("pong_lost", Response::Pong(pong_lost())),
        (
            "netcheck_symmetric",
            Response::Netcheck(Box::new(netcheck_symmetric())),
        ),
        (
            "netcheck_public",
            Response::Netcheck(Box::new(netcheck_public())),
        ),
        (
            "netcheck_cone",
            Response::Netcheck(Box::new(netcheck_cone())),
        ),
        (
            "netcheck_silent",
            Response::Netcheck(Box::new(netcheck_silent())),
        ),
        (
            "error",
            Response::Error {
                message: "no peer matches 'node-x': give a name, an overlay address or the \
                          start of a key (see meshctl peers)"
                    .into(),
            },
        ),
    ]
}

/// The peers of [`peers`], node-b with prefixes behind it (0.4.0).
fn peers_with_routes() -> Vec<PeerInfo> {
    let mut peers = peers();
    if let Some(b) = peers.first_mut() {
        b.routes = vec![v("10.244.2.0/24"), v("fd00:244:2::/64")];
        b.allowed_ips.extend(b.routes.clone());
    }
    peers
}

/// The peers of [`peers`] as this meshd writes them, with the family of
/// each direct path, and one more peer direct over IPv6 (0.4.0).
fn peers_with_families() -> Vec<PeerInfo> {
    let mut peers = peers();
    if let Some(b) = peers.first_mut() {
        b.family = Some(Family::Ipv4);
    }
    peers.push(PeerInfo {
        name: Some("node-v6".into()),
        public_key: v(KEY_A),
        overlay_ips: vec![v("100.72.0.4"), v("fd7a:1:2::4")],
        allowed_ips: vec![v("100.72.0.4/32"), v("fd7a:1:2::4/128")],
        endpoint: Some(v("[2001:db8:44::2]:51820")),
        path: PeerPath::Direct,
        family: Some(Family::Ipv6),
        rtt_ms: Some(1.25),
        last_handshake: Some(3),
        rx_bytes: 512,
        tx_bytes: 256,
        rx_packets: 4,
        tx_packets: 4,
        handshakes: 1,
        persistent_keepalive: Some(25),
        online: true,
        nat: NatMapping::EndpointDependent,
        candidates: vec![
            candidate("[2001:db8:44::2]:51820", CandidateSource::Local, 4),
            candidate("203.0.113.44:40512", CandidateSource::Observed, 0),
        ],
        relay_reason: None,
        routes: vec![],
        learned_routes: vec![],
        addresses_changed_s: None,
    });
    peers
}

/// node-a's prefixes, one for each decision, and the peers' (0.4.0).
fn routes() -> RoutesInfo {
    let advertised =
        |prefix: &str, decision: Option<RouteStatus>, explanation: &str| AdvertisedRoute {
            prefix: v(prefix),
            decision,
            explanation: explanation.into(),
        };
    RoutesInfo {
        advertised: vec![
            advertised("10.244.1.0/24", Some(RouteStatus::Accepted), "accepted"),
            advertised(
                "10.244.0.0/16",
                Some(RouteStatus::Overlaps {
                    node: "node-b".into(),
                    held: v("10.244.2.0/24"),
                }),
                "overlaps 10.244.2.0/24, which node-b advertised first",
            ),
            advertised(
                "192.168.7.0/24",
                Some(RouteStatus::AwaitingApproval),
                "outside the mesh's routable ranges: waiting for approval (on the rendezvous: \
                 mesh-rendezvous routes approve node-a 192.168.7.0/24)",
            ),
            advertised(
                "100.72.9.0/24",
                Some(RouteStatus::OverlapsMesh),
                "overlaps the mesh's overlay addresses",
            ),
            advertised(
                "10.245.0.0/24",
                None,
                "no decision yet: waiting for the rendezvous",
            ),
        ],
        peers: vec![PeerRoutes {
            name: Some("node-b".into()),
            public_key: v(KEY_B),
            routes: vec![v("10.244.2.0/24"), v("fd00:244:2::/64")],
        }],
        learned: vec![PeerRoutes {
            name: Some("node-sym".into()),
            public_key: v(KEY_C),
            routes: vec![v("10.245.3.0/24")],
        }],
        unusable: vec![Unusable {
            prefix: v("10.245.9.0/24"),
            gateway: None,
            why: UnusableWhy::NoGateway,
        }],
    }
}

/// What a node behind a router that answers PCP and NAT-PMP shows (0.4.0).
fn port_mapped() -> PortMappingInfo {
    PortMappingInfo {
        gateway: Some(v("10.70.0.1")),
        answered: vec![MappingProtocol::Pcp, MappingProtocol::NatPmp],
        protocol: Some(MappingProtocol::Pcp),
        external: Some(v("203.0.113.70:51820")),
        lifetime_s: Some(60),
        error: None,
    }
}

/// A node whose gateway answers none of the protocols (0.4.0).
fn port_unmapped() -> PortMappingInfo {
    PortMappingInfo {
        gateway: Some(v("10.41.0.1")),
        answered: vec![],
        protocol: None,
        external: None,
        lifetime_s: None,
        error: Some("the gateway 10.41.0.1 answers none of PCP, NAT-PMP, UPnP IGD".into()),
    }
}

/// node-b reached through the port its router mapped (0.4.0).
fn peers_mapped() -> Vec<PeerInfo> {
    let mut peers = peers();
    if let Some(b) = peers.first_mut() {
        b.endpoint = Some(v("203.0.113.70:51820"));
        b.candidates.insert(
            0,
            candidate("203.0.113.70:51820", CandidateSource::Mapped, 4),
        );
    }
    peers
}

/// node-b's router got a new public address 12 s ago.
fn peers_moved() -> Vec<PeerInfo> {
    let mut peers = peers();
    if let Some(b) = peers.first_mut() {
        b.addresses_changed_s = Some(12);
    }
    peers
}

/// Golden files of 0.4.0's additions, with the response each holds.
fn responses_0_4_0() -> Vec<(&'static str, Response)> {
    vec![
        (
            "status_port_mapping",
            Response::Status(Box::new(StatusInfo {
                port_mapping: Some(port_mapped()),
                ..status()
            })),
        ),
        (
            "status_port_taken",
            Response::Status(Box::new(StatusInfo {
                port_taken: Some(PortTaken {
                    by: "node-b".into(),
                    port: 51821,
                }),
                ..status()
            })),
        ),
        (
            "status_advertised_elsewhere",
            Response::Status(Box::new(StatusInfo {
                advertised_elsewhere: Some(AdvertisedElsewhere {
                    advertised: v("198.51.100.7:51820"),
                    seen: v("203.0.113.99:51820"),
                }),
                ..status()
            })),
        ),
        (
            "status_quic_send_errors",
            Response::Status(Box::new(StatusInfo {
                io: IoCounters {
                    quic_send_errors: 5,
                    ..status().io
                },
                ..status()
            })),
        ),
        (
            "netcheck_port_mapping",
            Response::Netcheck(Box::new(NetcheckInfo {
                port_mapping: Some(port_unmapped()),
                ..netcheck_symmetric()
            })),
        ),
        (
            "peers_mapped",
            Response::Peers {
                peers: peers_mapped(),
            },
        ),
        (
            "peers_moved",
            Response::Peers {
                peers: peers_moved(),
            },
        ),
        (
            "peers_routes",
            Response::Peers {
                peers: peers_with_routes(),
            },
        ),
        ("routes", Response::Routes(Box::new(routes()))),
        ("routes_empty", Response::Routes(Box::default())),
        (
            "peers_family",
            Response::Peers {
                peers: peers_with_families(),
            },
        ),
    ]
}

fn requests() -> Vec<Request> {
    vec![
        Request::Peers,
        Request::Status,
        Request::Ping {
            peer: "node-b".into(),
        },
        Request::Netcheck,
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/api")
}

fn golden(name: &str) -> String {
    let path = golden_dir().join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What meshd writes on its socket: the envelope, compact, then a newline.
fn line<T: serde::Serialize>(body: T) -> String {
    serde_json::to_string(&Envelope::new(body)).unwrap() + "\n"
}

#[test]
fn every_response_is_written_byte_for_byte_as_meshd_0_2_0_wrote_it() {
    for (name, response) in responses() {
        assert_eq!(line(&response), golden(name), "{name}.json");
    }
}

#[test]
fn every_request_is_written_byte_for_byte_as_meshctl_0_2_0_wrote_it() {
    let written: String = requests().into_iter().map(line).collect();
    assert_eq!(written, golden("requests"));
}

#[test]
fn what_0_4_0_added_is_written_byte_for_byte_and_reads_back() {
    for (name, response) in responses_0_4_0() {
        assert_eq!(line(&response), golden(name), "{name}.json");
        let back: Envelope<Response> = serde_json::from_str(&golden(name)).unwrap();
        assert_eq!(back.body, response, "{name}.json");
    }
    assert_eq!(line(Request::Routes), golden("requests_0_4_0"));
    let back: Envelope<Request> = serde_json::from_str(&golden("requests_0_4_0")).unwrap();
    assert_eq!(back.body, Request::Routes);
}

#[test]
fn meshctl_0_2_0_reads_peers_with_routes_as_the_peers_it_knew() {
    let old: Envelope<v0_2_0::Response> = serde_json::from_str(&golden("peers_routes")).unwrap();
    let v0_2_0::Response::Peers { peers } = old.body else {
        panic!("peers_routes.json is not a peers answer to 0.2.0");
    };
    assert_eq!(peers.len(), 3);
    assert!(peers[0].allowed_ips.contains(&"10.244.2.0/24".to_owned()));
}

#[test]
fn meshctl_0_2_0_reads_port_mapping_as_the_status_netcheck_and_peers_it_knew() {
    for name in [
        "status_port_mapping",
        "netcheck_port_mapping",
        "peers_mapped",
    ] {
        let old: Envelope<v0_2_0::Response> = serde_json::from_str(&golden(name))
            .unwrap_or_else(|e| panic!("0.2.0 cannot read {name}: {e}"));
        if let v0_2_0::Response::Peers { peers } = old.body {
            assert_eq!(peers[0].candidates[0].source, "mapped");
        }
    }
}

#[test]
fn meshctl_0_2_0_reads_peers_with_a_family_as_the_peers_it_knew() {
    let old: Envelope<v0_2_0::Response> = serde_json::from_str(&golden("peers_family")).unwrap();
    let v0_2_0::Response::Peers { peers } = old.body else {
        panic!("peers_family.json is not a peers answer to 0.2.0");
    };
    assert_eq!(peers.len(), 4);
    assert_eq!(peers[3].endpoint.as_deref(), Some("[2001:db8:44::2]:51820"));
    assert_eq!(peers[3].path, "direct");
}

#[test]
fn what_meshd_0_2_0_wrote_reads_back_into_the_same_values() {
    for (name, response) in responses() {
        let back: Envelope<Response> = serde_json::from_str(&golden(name))
            .unwrap_or_else(|e| panic!("{name}.json does not read back: {e}"));
        assert_eq!(back.body, response, "{name}.json");
    }
    let text = golden("requests");
    let back: Vec<Request> = text
        .lines()
        .map(|l| serde_json::from_str::<Envelope<Request>>(l).unwrap().body)
        .collect();
    assert_eq!(back, requests());
}

#[test]
fn meshctl_0_2_0_reads_what_this_meshd_writes_and_writes_it_back_unchanged() {
    for (name, response) in responses() {
        let written = line(&response);
        let old: Envelope<v0_2_0::Response> = serde_json::from_str(&written)
            .unwrap_or_else(|e| panic!("0.2.0 cannot read {name}: {e}\n{written}"));
        assert_eq!(
            serde_json::to_string(&old).unwrap() + "\n",
            written,
            "{name}"
        );
    }
}

#[test]
fn this_meshctl_reads_what_meshd_0_2_0_writes_with_every_field() {
    for (name, _) in responses() {
        let text = golden(name);
        let old: Envelope<v0_2_0::Response> = serde_json::from_str(&text).unwrap();
        let new: Envelope<Response> =
            serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
        assert_eq!(line(&new.body), text, "{name}");
    }
}

/// The API types of meshd 0.2.0, frozen: strings where this release has
/// addresses, keys and enums. Never change them; they stand for the
/// meshctl and meshd already deployed.
mod v0_2_0 {
    use std::collections::BTreeMap;

    use meshd::wire::control::NatMapping;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "response", rename_all = "snake_case")]
    pub enum Response {
        Peers { peers: Vec<PeerInfo> },
        Status(Box<StatusInfo>),
        Pong(PingInfo),
        Netcheck(Box<NetcheckInfo>),
        Error { message: String },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PingInfo {
        pub peer: String,
        pub overlay_ip: Option<String>,
        pub path: Option<String>,
        pub endpoint: Option<String>,
        pub rtt_ms: Option<f64>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct NetcheckInfo {
        pub rendezvous: Option<String>,
        pub quic_connected: bool,
        pub quic_rtt_ms: Option<f64>,
        pub quic_seen_at: Option<String>,
        pub reflector: Option<String>,
        pub reflector_seen_at: Option<String>,
        pub reflector_rtt_ms: Option<f64>,
        pub mapping: NatMapping,
        pub mapping_from_peers: NatMapping,
        pub hole_punching: String,
        pub explanation: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PeerInfo {
        pub name: Option<String>,
        pub public_key: String,
        pub overlay_ips: Vec<String>,
        pub allowed_ips: Vec<String>,
        pub endpoint: Option<String>,
        pub path: String,
        pub rtt_ms: Option<f64>,
        pub last_handshake: Option<u64>,
        pub rx_bytes: u64,
        pub tx_bytes: u64,
        #[serde(default)]
        pub rx_packets: u64,
        #[serde(default)]
        pub tx_packets: u64,
        #[serde(default)]
        pub handshakes: u64,
        pub persistent_keepalive: Option<u16>,
        pub online: bool,
        pub nat: NatMapping,
        pub candidates: Vec<CandidateInfo>,
        pub relay_reason: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CandidateInfo {
        pub endpoint: String,
        pub source: String,
        pub alive: bool,
        pub rtt_ms: Option<f64>,
        pub probes_sent: u64,
        pub probes_answered: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct StatusInfo {
        pub name: Option<String>,
        pub public_key: String,
        pub overlay_ips: Vec<String>,
        pub interface: String,
        #[serde(default)]
        pub mtu: u16,
        pub listen_port: u16,
        pub addresses: Vec<String>,
        pub peers: usize,
        pub peers_direct: usize,
        pub peers_relayed: usize,
        pub peers_offline: usize,
        pub nat: NatMapping,
        pub seen_at: Vec<String>,
        pub rendezvous: Option<RendezvousInfo>,
        pub drops: BTreeMap<String, u64>,
        pub cookie_replies_sent: u64,
        #[serde(default)]
        pub io: IoCounters,
    }

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct IoCounters {
        pub tun_reads: u64,
        pub tun_read_packets: u64,
        pub tun_writes: u64,
        pub tun_written_packets: u64,
        pub tun_write_errors: u64,
        pub udp_sends: u64,
        pub udp_sent_datagrams: u64,
        pub udp_send_errors: u64,
        pub udp_receives: u64,
        pub udp_received_datagrams: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct RendezvousInfo {
        pub connected: bool,
        pub rtt_ms: Option<f64>,
    }
}
