//! Human-readable tables for `meshctl`. Pure: data in, text out.

use std::fmt::{Display, Write as _};

use super::{
    AdvertisedElsewhere, Family, IoCounters, NetcheckInfo, PeerInfo, PeerPath, PingInfo,
    PortMappingInfo, RendezvousInfo, RoutesInfo, StatusInfo,
};
#[cfg(test)]
use crate::wire::control::MappingProtocol;
use crate::wire::control::RouteStatus;

/// `meshctl peers`: one line per peer, aligned columns, then for every
/// relayed peer the reason it is relayed.
/// How long `meshctl peers` says that a peer's addresses changed.
const ADDRESS_NEWS: u64 = 3600;

pub fn peers_table(peers: &[PeerInfo]) -> String {
    let header = [
        "NAME",
        "ADDRESS",
        "PEER",
        "PATH",
        "RTT",
        "HANDSHAKE",
        "RX",
        "TX",
        "STATUS",
    ];
    let rows: Vec<[String; 9]> = peers
        .iter()
        .map(|p| {
            [
                p.name.clone().unwrap_or_else(|| "-".into()),
                // The overlay IPv4 when there is one: what operators type.
                p.overlay_ips
                    .first()
                    .map(ToString::to_string)
                    .or_else(|| p.allowed_ips.first().map(ToString::to_string))
                    .unwrap_or_else(|| "-".into()),
                p.public_key.short(),
                match (&p.endpoint, p.path) {
                    // The family from the endpoint where an older meshd
                    // did not say.
                    (Some(endpoint), _) => format!(
                        "direct {} {endpoint}",
                        p.family.unwrap_or_else(|| Family::of(*endpoint))
                    ),
                    (None, path) => path.to_string(),
                },
                p.rtt_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                p.last_handshake.map_or_else(|| "never".into(), ago),
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
                match (p.online, p.addresses_changed_s) {
                    (true, Some(s)) if s < ADDRESS_NEWS => format!("online, moved {}", ago(s)),
                    (false, Some(s)) if s < ADDRESS_NEWS => format!("offline, moved {}", ago(s)),
                    (true, _) => "online".to_owned(),
                    (false, _) => "offline".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    for p in peers {
        if let Some(reason) = &p.relay_reason {
            let name = p.name.clone().unwrap_or_else(|| p.public_key.to_string());
            let _ = write!(out, "\n{name} is relayed: {reason}.\n");
        }
    }
    out
}

/// `meshctl routes`: this node's prefixes with the mesh's decision on
/// each, then the prefixes routed to each peer.
pub fn routes(r: &RoutesInfo) -> String {
    let mut out = String::new();
    if r.advertised.is_empty() {
        out.push_str("this node advertises no prefixes (routes in meshd.toml, or meshd join --advertise-routes)\n");
    } else {
        out.push_str("advertised by this node:\n");
        let width = r
            .advertised
            .iter()
            .map(|a| a.prefix.to_string().len())
            .max()
            .unwrap_or(0);
        for a in &r.advertised {
            let state = match &a.decision {
                Some(RouteStatus::Accepted) => "accepted",
                Some(RouteStatus::AwaitingApproval) | None => "pending",
                Some(
                    RouteStatus::Overlaps { .. } | RouteStatus::OverlapsMesh | RouteStatus::Invalid,
                ) => "refused",
            };
            let prefix = a.prefix.to_string();
            match a.decision {
                Some(RouteStatus::Accepted) => {
                    let _ = writeln!(out, "  {prefix:<width$}  {state}");
                }
                _ => {
                    let _ = writeln!(out, "  {prefix:<width$}  {state}: {}", a.explanation);
                }
            }
        }
    }
    if r.peers.is_empty() && r.learned.is_empty() {
        out.push_str("no peer has prefixes behind it\n");
    }
    peer_prefixes(&mut out, "routed to peers:", &r.peers);
    peer_prefixes(
        &mut out,
        "learned from the routing table (routes via a peer's overlay address):",
        &r.learned,
    );
    if !r.unusable.is_empty() {
        out.push_str("routes on mesh0 that name no peer (their traffic goes nowhere):\n");
        let width = r
            .unusable
            .iter()
            .map(|u| u.prefix.to_string().len())
            .max()
            .unwrap_or(0);
        for u in &r.unusable {
            let prefix = u.prefix.to_string();
            let via = u.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            let _ = writeln!(out, "  {prefix:<width$}{via}  {}", u.why.describe());
        }
    }
    out
}

/// A table of prefixes and the peers they lead to, under `title`; nothing
/// when there are none.
fn peer_prefixes(out: &mut String, title: &str, peers: &[crate::control::PeerRoutes]) {
    if peers.is_empty() {
        return;
    }
    out.push_str(title);
    out.push('\n');
    let rows: Vec<(String, String)> = peers
        .iter()
        .flat_map(|p| {
            let name = p.name.clone().unwrap_or_else(|| p.public_key.short());
            p.routes
                .iter()
                .map(move |net| (net.to_string(), name.clone()))
        })
        .collect();
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (net, name) in rows {
        let _ = writeln!(out, "  {net:<width$}  {name}");
    }
}

/// `meshctl status`: key: value lines.
pub fn status(s: &StatusInfo) -> String {
    let mut out = String::new();
    if let Some(name) = &s.name {
        let _ = writeln!(out, "name:        {name}");
    }
    let _ = writeln!(out, "public key:  {}", s.public_key);
    let _ = match s.mtu {
        0 => writeln!(out, "interface:   {}", s.interface),
        mtu => writeln!(out, "interface:   {} (MTU {mtu})", s.interface),
    };
    let _ = writeln!(out, "addresses:   {}", list(&s.addresses));
    let _ = writeln!(out, "listen port: {}", s.listen_port);
    if let Some(AdvertisedElsewhere { advertised, seen }) = &s.advertised_elsewhere {
        let _ = writeln!(
            out,
            "advertised:  {advertised}, but the rendezvous sees this node at {seen}: peers may not reach it there; update advertise-endpoint if the address changed"
        );
    }
    if let Some(taken) = &s.port_taken {
        let _ = writeln!(
            out,
            "             held behind the same NAT by {} (the rendezvous sees it there): peers it talks to reach this node through the relay; set listen-port = {} here",
            taken.by, taken.port
        );
    }
    let _ = writeln!(out, "NAT:         {}", s.nat.describe());
    if !s.seen_at.is_empty() {
        let _ = writeln!(out, "seen at:     {}", list(&s.seen_at));
    }
    match &s.rendezvous {
        Some(RendezvousInfo {
            connected: true,
            rtt_ms,
        }) => {
            let rtt = rtt_ms.map_or_else(String::new, |ms| format!(", rtt {ms:.1}ms"));
            let _ = writeln!(out, "rendezvous:  connected{rtt}");
        }
        Some(RendezvousInfo {
            connected: false, ..
        }) => {
            let _ = writeln!(
                out,
                "rendezvous:  not connected (tunnels stay up; reconnecting)"
            );
        }
        None => {}
    }
    let _ = writeln!(
        out,
        "peers:       {} ({} direct, {} relayed, {} offline)",
        s.peers, s.peers_direct, s.peers_relayed, s.peers_offline
    );
    if !s.drops.is_empty() {
        let drops: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "drops:       {}", drops.join(" "));
    }
    if let Some(line) = batching(&s.io) {
        let _ = writeln!(out, "batching:    {line}");
    }
    if let Some(p) = &s.port_mapping {
        let _ = writeln!(out, "port map:    {}", port_mapping(p));
    }
    out
}

/// One line of what port mapping on the gateway gave.
pub fn port_mapping(p: &PortMappingInfo) -> String {
    let answered = if p.answered.is_empty() {
        "none of PCP, NAT-PMP, UPnP IGD answered".to_owned()
    } else {
        format!("{} answered", list(&p.answered))
    };
    let gateway = p
        .gateway
        .map_or_else(|| "no gateway".to_owned(), |g| format!("gateway {g}"));
    match (p.external, p.protocol) {
        (Some(external), Some(protocol)) => format!(
            "{external} through {protocol}{} ({gateway}; {answered})",
            p.lifetime_s
                .map_or_else(String::new, |s| format!(", lifetime {s}s"))
        ),
        _ => match &p.error {
            Some(why) => format!("none: {why} ({gateway}; {answered})"),
            None => format!("none yet ({gateway}; {answered})"),
        },
    }
}

/// Packets per system call on the packet path (about 1 everywhere means
/// the offloads are off), and failed writes if any.
fn batching(io: &IoCounters) -> Option<String> {
    let parts: Vec<String> = io
        .ops()
        .iter()
        .filter(|op| op.calls > 0)
        .map(|op| format!("{} {:.1}", op.label, op.packets as f64 / op.calls as f64))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let mut line = format!("{} packets per call", parts.join(", "));
    if io.tun_write_errors + io.udp_send_errors + io.quic_send_errors > 0 {
        line += &format!(
            " (failed: {} TUN writes, {} UDP sends, {} QUIC sends)",
            io.tun_write_errors, io.udp_send_errors, io.quic_send_errors
        );
    }
    Some(line)
}

/// `a, b, c`.
fn list(items: &[impl Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line of `meshctl ping`; `previous` is the path of the last reply,
/// so that an upgrade from the relay to a direct path is called out.
pub fn ping_line(p: &PingInfo, previous: Option<PeerPath>) -> String {
    let who = match &p.overlay_ip {
        Some(ip) => format!("{} ({ip})", p.peer),
        None => p.peer.clone(),
    };
    let (Some(path), Some(rtt)) = (p.path, p.rtt_ms) else {
        return format!("no answer from {who} within 2s\n");
    };
    let via = match &p.endpoint {
        Some(endpoint) => format!("{path} {endpoint}"),
        None => path.to_string(),
    };
    let mut line = format!("pong from {who} via {via} in {rtt:.1}ms\n");
    if previous == Some(PeerPath::Relay) && path == PeerPath::Direct {
        line.push_str(&format!("path upgraded: relay -> {via}\n"));
    }
    line
}

/// `meshctl netcheck`: key: value lines, then the explanation.
pub fn netcheck(n: &NetcheckInfo) -> String {
    let or_dash =
        |v: &Option<_>| v.map_or_else(|| "-".into(), |a: std::net::SocketAddr| a.to_string());
    let ms = |v: Option<f64>| v.map_or_else(String::new, |ms| format!(", rtt {ms:.1}ms"));
    let mut out = String::new();
    let _ = writeln!(out, "rendezvous:         {}", or_dash(&n.rendezvous));
    let _ = writeln!(
        out,
        "QUIC (UDP):         {}{}",
        if n.quic_connected {
            "connected"
        } else {
            "not connected"
        },
        ms(n.quic_rtt_ms)
    );
    let _ = writeln!(out, "seen by QUIC port:  {}", or_dash(&n.quic_seen_at));
    let answered = match &n.reflector_seen_at {
        Some(at) => format!("{at}{}", ms(n.reflector_rtt_ms)),
        None => "no answer".into(),
    };
    let _ = writeln!(
        out,
        "seen by check port: {answered} (port {})",
        or_dash(&n.reflector)
    );
    let _ = writeln!(out, "NAT mapping:        {}", n.mapping.describe());
    let _ = writeln!(
        out,
        "seen by peers:      {}",
        n.mapping_from_peers.describe()
    );
    let _ = writeln!(out, "hole punching:      {}", n.hole_punching);
    if let Some(p) = &n.port_mapping {
        let _ = writeln!(out, "port mapping:       {}", port_mapping(p));
    }
    let _ = writeln!(out, "\n{}.", n.explanation);
    out
}

/// "3s ago", "5m ago", "2h ago", "4d ago".
pub fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// IEC units, one decimal above bytes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &str, endpoint: Option<&str>, hs: Option<u64>, rx: u64, tx: u64) -> PeerInfo {
        PeerInfo {
            name: endpoint.map(|_| "node-b".into()),
            overlay_ips: vec!["100.72.0.2".parse().unwrap()],
            public_key: key.parse().unwrap(),
            allowed_ips: vec!["100.72.0.2/32".parse().unwrap()],
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            path: if endpoint.is_some() {
                PeerPath::Direct
            } else {
                PeerPath::Relay
            },
            family: None,
            rtt_ms: endpoint.map(|_| 0.42),
            last_handshake: hs,
            rx_bytes: rx,
            tx_bytes: tx,
            rx_packets: 0,
            tx_packets: 0,
            handshakes: 0,
            persistent_keepalive: None,
            online: hs.is_some(),
            nat: crate::wire::control::NatMapping::Unknown,
            candidates: vec![],
            relay_reason: endpoint
                .is_none()
                .then(|| "both sides are behind endpoint-dependent (symmetric) NAT".into()),
            routes: vec![],
            learned_routes: vec![],
            addresses_changed_s: None,
        }
    }

    #[test]
    fn a_peer_whose_addresses_changed_lately_says_when() {
        let key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        let moved = |s| PeerInfo {
            addresses_changed_s: s,
            ..peer(key, Some("203.0.113.9:51820"), Some(3), 0, 0)
        };
        let status = |p| peers_table(&[p]).lines().nth(1).unwrap().to_owned();
        assert!(status(moved(Some(12))).ends_with("online, moved 12s ago"));
        assert!(status(moved(Some(600))).ends_with("online, moved 10m ago"));
        // An hour on it is no news.
        assert!(status(moved(Some(3600))).ends_with("  online"));
        assert!(status(moved(None)).ends_with("  online"));
    }

    #[test]
    fn routes_show_each_decision_and_each_peer_prefix() {
        use crate::control::{AdvertisedRoute, PeerRoutes};
        let net = |s: &str| s.parse().unwrap();
        let info = RoutesInfo {
            advertised: vec![
                AdvertisedRoute {
                    prefix: net("10.244.3.0/24"),
                    decision: Some(RouteStatus::Accepted),
                    explanation: "accepted".into(),
                },
                AdvertisedRoute {
                    prefix: net("10.244.0.0/16"),
                    decision: Some(RouteStatus::Overlaps {
                        node: "node-b".into(),
                        held: net("10.244.1.0/24"),
                    }),
                    explanation: "overlaps 10.244.1.0/24, which node-b advertised first".into(),
                },
                AdvertisedRoute {
                    prefix: net("192.168.7.0/24"),
                    decision: Some(RouteStatus::AwaitingApproval),
                    explanation: "waiting for approval".into(),
                },
            ],
            peers: vec![PeerRoutes {
                name: Some("node-b".into()),
                public_key: "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
                    .parse()
                    .unwrap(),
                routes: vec![net("10.244.1.0/24"), net("fd00:244:1::/64")],
            }],
            learned: vec![PeerRoutes {
                name: Some("node-c".into()),
                public_key: "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
                    .parse()
                    .unwrap(),
                routes: vec![net("10.245.2.0/24")],
            }],
            unusable: vec![crate::agent::learned::Unusable {
                prefix: net("10.245.9.0/24"),
                gateway: None,
                why: crate::agent::learned::UnusableWhy::NoGateway,
            }],
        };
        let expected = "\
advertised by this node:
  10.244.3.0/24   accepted
  10.244.0.0/16   refused: overlaps 10.244.1.0/24, which node-b advertised first
  192.168.7.0/24  pending: waiting for approval
routed to peers:
  10.244.1.0/24    node-b
  fd00:244:1::/64  node-b
learned from the routing table (routes via a peer's overlay address):
  10.245.2.0/24  node-c
routes on mesh0 that name no peer (their traffic goes nowhere):
  10.245.9.0/24  no gateway, so it names no peer: route it via the peer's overlay address (BIRD: `direct;` on the BGP session)
";
        assert_eq!(routes(&info), expected);
        let empty = routes(&RoutesInfo::default());
        assert!(
            empty.contains("advertises no prefixes") && empty.contains("no peer"),
            "{empty}"
        );
    }

    #[test]
    fn peers_table_renders_fixed_input() {
        let peers = [
            peer(
                "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
                Some("192.0.2.2:51820"),
                Some(42),
                2048,
                100,
            ),
            peer(
                "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=",
                None,
                None,
                0,
                0,
            ),
        ];
        let expected = "\
NAME    ADDRESS     PEER      PATH                         RTT    HANDSHAKE  RX       TX     STATUS
node-b  100.72.0.2  hSDwCYkw  direct IPv4 192.0.2.2:51820  0.4ms  42s ago    2.0 KiB  100 B  online
-       100.72.0.2  3p7bfXt9  relay                        -      never      0 B      0 B    offline

3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08= is relayed: both sides are behind endpoint-dependent (symmetric) NAT.
";
        assert_eq!(peers_table(&peers), expected);
    }

    #[test]
    fn a_direct_path_shows_its_family() {
        let mut v6 = peer(
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
            Some("[2001:db8:44::2]:51820"),
            Some(1),
            0,
            0,
        );
        v6.family = Some(Family::Ipv6);
        assert!(
            peers_table(&[v6]).contains("direct IPv6 [2001:db8:44::2]:51820"),
            "{}",
            peers_table(&[])
        );
    }

    #[test]
    fn ping_lines_name_the_path_and_call_out_an_upgrade() {
        let relayed = PingInfo {
            peer: "node-b".into(),
            overlay_ip: Some("100.72.0.2".parse().unwrap()),
            path: Some(PeerPath::Relay),
            endpoint: None,
            rtt_ms: Some(4.25),
        };
        assert_eq!(
            ping_line(&relayed, None),
            "pong from node-b (100.72.0.2) via relay in 4.2ms\n"
        );
        let direct = PingInfo {
            path: Some(PeerPath::Direct),
            endpoint: Some("203.0.113.12:51820".parse().unwrap()),
            rtt_ms: Some(1.0),
            ..relayed.clone()
        };
        assert_eq!(
            ping_line(&direct, Some(PeerPath::Relay)),
            "pong from node-b (100.72.0.2) via direct 203.0.113.12:51820 in 1.0ms\n\
             path upgraded: relay -> direct 203.0.113.12:51820\n"
        );
        let lost = PingInfo {
            path: None,
            rtt_ms: None,
            endpoint: None,
            ..relayed
        };
        assert_eq!(
            ping_line(&lost, Some(PeerPath::Relay)),
            "no answer from node-b (100.72.0.2) within 2s\n"
        );
    }

    #[test]
    fn netcheck_renders_fixed_input() {
        let n = NetcheckInfo {
            rendezvous: Some("203.0.113.2:7443".parse().unwrap()),
            quic_connected: true,
            quic_rtt_ms: Some(1.5),
            quic_seen_at: Some("203.0.113.41:3947".parse().unwrap()),
            reflector: Some("203.0.113.2:7444".parse().unwrap()),
            reflector_seen_at: Some("203.0.113.41:60260".parse().unwrap()),
            reflector_rtt_ms: Some(0.8),
            mapping: crate::wire::control::NatMapping::EndpointDependent,
            mapping_from_peers: crate::wire::control::NatMapping::Unknown,
            hole_punching: crate::control::HolePunching::Unlikely,
            explanation: "a new port per destination".into(),
            port_mapping: None,
        };
        let expected = "\
rendezvous:         203.0.113.2:7443
QUIC (UDP):         connected, rtt 1.5ms
seen by QUIC port:  203.0.113.41:3947
seen by check port: 203.0.113.41:60260, rtt 0.8ms (port 203.0.113.2:7444)
NAT mapping:        endpoint-dependent (symmetric)
seen by peers:      not known yet
hole punching:      unlikely

a new port per destination.
";
        assert_eq!(netcheck(&n), expected);
    }

    #[test]
    fn status_shows_packets_per_call_once_there_is_traffic() {
        let mut s = StatusInfo {
            interface: "mesh0".into(),
            ..StatusInfo::default()
        };
        assert!(!status(&s).contains("batching"));
        s.io = IoCounters {
            tun_reads: 10,
            tun_read_packets: 445,
            udp_sends: 4,
            udp_sent_datagrams: 130,
            udp_send_errors: 2,
            quic_send_errors: 1,
            ..IoCounters::default()
        };
        assert!(
            status(&s).contains("batching:    TUN read 44.5, UDP send 32.5 packets per call (failed: 0 TUN writes, 2 UDP sends, 1 QUIC sends)\n"),
            "{}",
            status(&s)
        );
    }

    #[test]
    fn port_mapping_says_what_answered_and_what_was_mapped() {
        let mut p = PortMappingInfo {
            gateway: Some("10.70.0.1".parse().unwrap()),
            answered: vec![
                MappingProtocol::Pcp,
                MappingProtocol::NatPmp,
                MappingProtocol::Upnp,
            ],
            protocol: Some(MappingProtocol::Pcp),
            external: Some("203.0.113.70:51820".parse().unwrap()),
            lifetime_s: Some(60),
            error: None,
        };
        assert_eq!(
            port_mapping(&p),
            "203.0.113.70:51820 through PCP, lifetime 60s (gateway 10.70.0.1; PCP, NAT-PMP, UPnP IGD answered)"
        );
        p = PortMappingInfo {
            answered: vec![],
            error: Some("the gateway 10.70.0.1 answers none of PCP, NAT-PMP, UPnP IGD".into()),
            ..PortMappingInfo::default()
        };
        assert_eq!(
            port_mapping(&p),
            "none: the gateway 10.70.0.1 answers none of PCP, NAT-PMP, UPnP IGD (no gateway; none of PCP, NAT-PMP, UPnP IGD answered)"
        );
    }

    #[test]
    fn units_and_ages() {
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(ago(59), "59s ago");
        assert_eq!(ago(3600), "1h ago");
    }
}
