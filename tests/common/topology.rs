//! The NAT lab's machines and addresses, read from `deploy/lab/topology`:
//! the file the lab's scripts build from, so the tests never restate an
//! address. Pure apart from reading that one file.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

/// What kind of site a lab node sits in (DESIGN.md, "Lab").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A public address on its own NIC.
    Public,
    /// A 1:1 NAT: the router forwards its public address to the node.
    OneToOne,
    /// MASQUERADE keeping the source port: endpoint-independent mapping.
    Cone,
    /// MASQUERADE with random ports: a new mapping per destination.
    Symmetric,
    /// One of two nodes on a shared private subnet behind one router.
    Lan,
    /// Behind Linux MASQUERADE with no firewall (the hard case).
    MasqueradeBare,
    /// Behind a home router behind a carrier-grade NAT.
    DoubleNat,
    /// IPv4 behind a NAT, and a public IPv6 address of its own.
    DualStack,
    /// Symmetric NAT on a router that maps ports while miniupnpd runs there
    /// (NAT-PMP, PCP, UPnP IGD; [`super::portmap`]).
    Upnp,
}

/// One node of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabNode {
    pub name: &'static str,
    pub kind: Kind,
    /// The router's machine name; `None` for a public node.
    pub router: Option<&'static str>,
    /// The address on the node's own NIC.
    pub address: Ipv4Addr,
    /// Where the internet sees it.
    pub public: Ipv4Addr,
    /// Its public IPv6 address, for a dual-stack node.
    pub address6: Option<Ipv6Addr>,
}

/// One rendezvous machine of the lab: a public host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RendezvousMachine {
    /// The machine's (and its namespace's) name.
    pub name: &'static str,
    /// Its public address and mesh-rendezvous's port.
    pub address: SocketAddrV4,
}

/// One NAT router of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    pub name: &'static str,
    /// How it maps and filters ("cone", "symmetric", "masquerade-bare"…:
    /// deploy/lab/topology lists them).
    pub kind: &'static str,
    /// "inet", or the router whose LAN its WAN side is on.
    pub uplink: &'static str,
    /// Its address on the uplink: public for a router on "inet".
    pub wan: Ipv4Addr,
    /// Its private address: the gateway of the nodes behind it.
    pub lan: Ipv4Addr,
    /// How long its UDP mappings live without traffic, when set short.
    pub udp_timeout: Option<Duration>,
    /// Its IPv6 address on the internet and the /64 it routes to its LAN.
    pub ipv6: Option<(Ipv6Addr, Ipv6Net)>,
}

#[derive(Debug)]
pub struct Topology {
    pub internet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The internet's IPv6 prefix, where some routers have IPv6.
    pub internet6: Option<Ipv6Net>,
    /// Where the first rendezvous machine's server listens: the only one a
    /// lab has unless `LAB_SERVERS` asks for more.
    pub rendezvous: SocketAddrV4,
    /// Every rendezvous machine, in the file's order (the first is
    /// [`Topology::rendezvous`]'s).
    pub rendezvous_machines: Vec<RendezvousMachine>,
    pub private_prefix_len: u8,
    /// In the file's order (the order the demo enrols them).
    pub nodes: Vec<LabNode>,
    pub routers: BTreeMap<&'static str, Router>,
}

/// The lab's topology, read once per test process.
pub fn topology() -> &'static Topology {
    static TOPOLOGY: OnceLock<Topology> = OnceLock::new();
    TOPOLOGY.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/lab/topology");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Topology::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

impl Topology {
    /// Parses the file's records (see the file for its columns).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut internet, mut gateway, mut prefix_len) = (None, None, None);
        let mut internet6 = None;
        let (mut udp_timeouts, mut routers6, mut nodes6) =
            (Vec::new(), Vec::new(), BTreeMap::new());
        let (mut nodes, mut routers, mut rendezvous_machines) =
            (Vec::new(), BTreeMap::new(), Vec::<RendezvousMachine>::new());
        for (n, line) in text.lines().enumerate() {
            let words: Vec<&'static str> = line
                .split_whitespace()
                .map(|w| &*Box::leak(w.to_owned().into_boxed_str()))
                .collect();
            let at = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            let ip = |w: &str| w.parse::<Ipv4Addr>().map_err(|e| at(&e.to_string()));
            match words.as_slice() {
                [] => {}
                [first, ..] if first.starts_with('#') => {}
                ["internet", net, gw] => {
                    internet = Some(net.parse().map_err(|e| at(&format!("{e}")))?);
                    gateway = Some(ip(gw)?);
                }
                ["rendezvous", name, addr, port] => {
                    let port = port.parse().map_err(|e| at(&format!("{e}")))?;
                    if rendezvous_machines.iter().any(|m| m.name == *name) {
                        return Err(at(&format!("a second rendezvous machine {name}")));
                    }
                    rendezvous_machines.push(RendezvousMachine {
                        name,
                        address: SocketAddrV4::new(ip(addr)?, port),
                    });
                }
                ["private-prefix-len", len] => {
                    prefix_len = Some(len.parse().map_err(|e| at(&format!("{e}")))?);
                }
                ["internet6", net, _gw] => {
                    internet6 = Some(net.parse().map_err(|e| at(&format!("{e}")))?);
                }
                ["router", name, kind, uplink, wan, lan] => {
                    let router = Router {
                        name,
                        kind,
                        uplink,
                        wan: ip(wan)?,
                        lan: ip(lan)?,
                        udp_timeout: None,
                        ipv6: None,
                    };
                    routers.insert(*name, router);
                }
                ["udp-timeout", router, seconds] => {
                    let seconds = seconds.parse().map_err(|e| at(&format!("{e}")))?;
                    udp_timeouts.push((*router, Duration::from_secs(seconds)));
                }
                ["router6", router, wan, prefix] => {
                    let wan: Ipv6Addr = wan.parse().map_err(|e| at(&format!("{e}")))?;
                    let prefix: Ipv6Net = prefix.parse().map_err(|e| at(&format!("{e}")))?;
                    routers6.push((*router, (wan, prefix)));
                }
                ["node6", node, address] => {
                    let address: Ipv6Addr = address.parse().map_err(|e| at(&format!("{e}")))?;
                    nodes6.insert(*node, address);
                }
                ["node", name, kind, router, address, public] => nodes.push(LabNode {
                    name,
                    kind: match *kind {
                        "public" => Kind::Public,
                        "one-to-one" => Kind::OneToOne,
                        "cone" => Kind::Cone,
                        "symmetric" => Kind::Symmetric,
                        "lan" => Kind::Lan,
                        "masquerade-bare" => Kind::MasqueradeBare,
                        "double-nat" => Kind::DoubleNat,
                        "dual-stack" => Kind::DualStack,
                        "upnp" => Kind::Upnp,
                        other => return Err(at(&format!("unknown kind {other}"))),
                    },
                    router: (*router != "-").then_some(*router),
                    address: ip(address)?,
                    public: ip(public)?,
                    address6: None,
                }),
                _ => return Err(at("not a record")),
            }
        }
        for (name, timeout) in udp_timeouts {
            let router = routers
                .get_mut(name)
                .ok_or(format!("udp-timeout names an unknown router {name}"))?;
            router.udp_timeout = Some(timeout);
        }
        for (name, ipv6) in routers6 {
            let router = routers
                .get_mut(name)
                .ok_or(format!("router6 names an unknown router {name}"))?;
            router.ipv6 = Some(ipv6);
        }
        for (name, address) in nodes6 {
            let node = nodes
                .iter_mut()
                .find(|n| n.name == name)
                .ok_or(format!("node6 names an unknown node {name}"))?;
            node.address6 = Some(address);
        }
        let topology = Topology {
            internet: internet.ok_or("no internet record")?,
            gateway: gateway.ok_or("no internet record")?,
            internet6,
            rendezvous: rendezvous_machines
                .first()
                .ok_or("no rendezvous record")?
                .address,
            rendezvous_machines,
            private_prefix_len: prefix_len.ok_or("no private-prefix-len record")?,
            nodes,
            routers,
        };
        if let Some(node) = topology
            .nodes
            .iter()
            .find(|n| n.router.is_some_and(|r| !topology.routers.contains_key(r)))
        {
            return Err(format!("node {} names an unknown router", node.name));
        }
        Ok(topology)
    }

    /// The lab node called `name`; panics if there is none.
    pub fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("the lab has no node {name}"))
    }

    /// The private subnet `node` sits in behind its router; panics for a
    /// public node.
    pub fn private_subnet_of(&self, node: &LabNode) -> Ipv4Net {
        let router = node
            .router
            .and_then(|r| self.routers.get(r))
            .unwrap_or_else(|| panic!("{} is not behind a router", node.name));
        Ipv4Net::new(router.lan, self.private_prefix_len)
            .unwrap_or_else(|e| panic!("private-prefix-len: {e}"))
            .trunc()
    }

    /// The router called `name`; panics if there is none.
    pub fn router(&self, name: &str) -> &Router {
        self.routers
            .get(name)
            .unwrap_or_else(|| panic!("the lab has no router {name}"))
    }

    /// The router `node` sits behind; panics for a public node.
    pub fn router_of(&self, node: &str) -> &Router {
        let router = self.node(node).router;
        self.router(router.unwrap_or_else(|| panic!("{node} is not behind a router")))
    }

    /// The rendezvous machine called `name`.
    pub fn rendezvous_machine(&self, name: &str) -> &RendezvousMachine {
        self.rendezvous_machines
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("the lab has no rendezvous machine {name}"))
    }

    /// The address on the NIC of `machine`, a rendezvous machine or a node.
    pub fn address_of(&self, machine: &str) -> Ipv4Addr {
        match self.rendezvous_machines.iter().find(|m| m.name == machine) {
            Some(m) => *m.address.ip(),
            None => self.node(machine).address,
        }
    }

    /// The only node of `kind` (the lab has one of each but lan and
    /// symmetric); panics otherwise.
    pub fn the(&self, kind: Kind) -> &LabNode {
        let mut of_kind = self.nodes.iter().filter(|n| n.kind == kind);
        match (of_kind.next(), of_kind.next()) {
            (Some(node), None) => node,
            _ => panic!("the lab does not have exactly one {kind:?} node"),
        }
    }
}
