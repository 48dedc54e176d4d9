//! The rtnetlink shell: reads the link's state and applies [`Change`]s.
//!
//! Does I/O: one `NETLINK_ROUTE` socket per [`Link`], driven by a task on
//! the current tokio runtime. All the deciding happens in [`super::diff`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType, RouteVia,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkGetRequest, LinkUnspec, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{diff, errno, Change, LinkConfig, LinkState, NetlinkError, Owned};

/// An rtnetlink connection bound to one interface, remembering which
/// addresses and routes it added ([`Owned`]) so that it removes only those.
///
/// meshd's TUN device disappears with its file descriptor, and everything
/// on it with it; [`Link::teardown`] is for shutting down cleanly while the
/// device lives on (a persistent device, or a restart of the data path).
#[derive(Debug)]
pub struct Link {
    conn: Connection,
    ifname: String,
    index: u32,
    owned: Owned,
}

impl Link {
    /// Connects to rtnetlink on the current tokio runtime and resolves
    /// `ifname` to its index.
    pub async fn open(ifname: &str) -> Result<Link, NetlinkError> {
        let conn = Connection::new()?;
        let link = fetch_link(conn.handle.link().get().match_name(ifname), ifname).await?;
        Ok(Link {
            conn,
            ifname: ifname.into(),
            index: link.header.index,
            owned: Owned::default(),
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The addresses and routes this `Link` has added so far.
    pub fn owned(&self) -> &Owned {
        &self.owned
    }

    /// Reads the link's MTU, flags, addresses and routes from the kernel.
    pub async fn state(&self) -> Result<LinkState, NetlinkError> {
        let handle = &self.conn.handle;
        let link = fetch_link(handle.link().get().match_index(self.index), &self.ifname).await?;

        let addresses = handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute()
            .try_filter_map(
                |msg| async move { Ok(address_of(&msg.attributes, msg.header.prefix_len)) },
            )
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Query {
                what: "addresses",
                source,
            })?;

        let routes = main_routes(handle)
            .await?
            .into_iter()
            .filter_map(|r| (r.oif == Some(self.index)).then_some(r.prefix))
            .collect();

        Ok(LinkState {
            index: self.index,
            mtu: mtu_of(&link),
            up: link.header.flags.contains(LinkFlags::Up),
            addresses,
            routes,
        })
    }

    /// Brings the link to `desired`: reads its state, [`diff`]s, performs
    /// each change (logged at info) and returns the changes that took effect.
    ///
    /// Idempotent: adding what already exists counts as done. A route whose
    /// prefix is already routed through another interface (same prefix and
    /// metric) is not added, only warned about: stealing it could cut the
    /// host off, and overlaps with the mesh prefix itself are caught at
    /// startup by [`overlapping_routes`].
    pub async fn apply(&mut self, desired: &LinkConfig) -> Result<Vec<Change>, NetlinkError> {
        let current = self.state().await?;
        let mut applied = Vec::new();
        for change in diff(&current, desired, &self.owned) {
            match self.perform(change).await {
                Ok(()) => {
                    info!("{}", change.on(&self.ifname));
                    self.record(change);
                    applied.push(change);
                }
                Err(NetlinkError::Request { source, .. })
                    if matches!(change, Change::AddRoute(_))
                        && errno(&source) == Some(libc::EEXIST) =>
                {
                    warn!(
                        "cannot {}: the host already routes this prefix through another interface",
                        change.on(&self.ifname)
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(applied)
    }

    /// Removes the routes and addresses this `Link` added, routes first.
    /// Tries every one; returns the first failure. Ones already gone (or a
    /// link that is gone) count as removed.
    pub async fn teardown(&mut self) -> Result<(), NetlinkError> {
        let routes = self.owned.routes.iter().copied().map(Change::DelRoute);
        let addresses = self.owned.addresses.iter().copied().map(Change::DelAddress);
        let mut first_error = None;
        for change in routes.chain(addresses).collect::<Vec<_>>() {
            match self.perform(change).await {
                Ok(()) => {
                    info!("{}", change.on(&self.ifname));
                    self.record(change);
                }
                Err(e) => {
                    warn!("{e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends one change and waits for the kernel's answer. "Already there"
    /// for an address and "already gone" for a removal count as success.
    async fn perform(&self, change: Change) -> Result<(), NetlinkError> {
        let handle = &self.conn.handle;
        let index = self.index;
        let result = match change {
            Change::SetMtu(mtu) => {
                let msg = LinkUnspec::new_with_index(index).mtu(mtu.into()).build();
                handle.link().change(msg).execute().await
            }
            Change::SetUp => {
                let msg = LinkUnspec::new_with_index(index).up().build();
                handle.link().change(msg).execute().await
            }
            Change::AddAddress(net) => {
                let mut req = handle.address().add(index, net.addr(), net.prefix_len());
                if net.addr().is_ipv6() {
                    // Skip duplicate address detection (RFC 4862 §5.4): the
                    // address is derived from the node's key and unique in
                    // the mesh, and must be usable (bindable by etcd and
                    // kubelet) the moment meshd reports ready.
                    let msg = req.message_mut();
                    msg.header.flags |= AddressHeaderFlags::Nodad;
                    msg.attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                req.execute().await
            }
            Change::DelAddress(net) => {
                handle
                    .address()
                    .del(address_message(index, net))
                    .execute()
                    .await
            }
            Change::AddRoute(net) => {
                handle
                    .route()
                    .add(route_message(index, net))
                    .execute()
                    .await
            }
            Change::DelRoute(net) => {
                handle
                    .route()
                    .del(route_message(index, net))
                    .execute()
                    .await
            }
        };
        let benign = match change {
            Change::AddAddress(_) => &[libc::EEXIST][..],
            // EADDRNOTAVAIL: no such address; ESRCH: no such route; ENODEV:
            // the link itself is gone, taking its addresses and routes along.
            Change::DelAddress(_) | Change::DelRoute(_) => {
                &[libc::EADDRNOTAVAIL, libc::ESRCH, libc::ENODEV]
            }
            Change::SetMtu(_) | Change::SetUp | Change::AddRoute(_) => &[],
        };
        match result {
            Err(e) if errno(&e).is_some_and(|code| benign.contains(&code)) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                change: change.on(&self.ifname).to_string(),
                source,
            }),
            Ok(()) => Ok(()),
        }
    }

    fn record(&mut self, change: Change) {
        match change {
            Change::AddAddress(net) => self.owned.addresses.insert(net),
            Change::DelAddress(net) => self.owned.addresses.remove(&net),
            Change::AddRoute(net) => self.owned.routes.insert(net),
            Change::DelRoute(net) => self.owned.routes.remove(&net),
            Change::SetMtu(_) | Change::SetUp => false,
        };
    }
}

/// Routes of the host's main table that overlap `net` (either contains the
/// other), with the interface each goes through, skipping routes through
/// `except_ifindex` (meshd's own interface). Default routes are ignored:
/// they overlap everything and are overridden by any more specific route.
///
/// meshd calls this before configuring its interface and refuses to start
/// when the mesh prefix is already routed elsewhere, naming the route.
pub async fn overlapping_routes(
    net: IpNet,
    except_ifindex: Option<u32>,
) -> Result<Vec<(IpNet, String)>, NetlinkError> {
    let conn = Connection::new()?;
    let overlapping: Vec<(IpNet, u32)> = main_routes(&conn.handle)
        .await?
        .into_iter()
        .filter_map(|r| Some((r.prefix, r.oif?)))
        .filter(|&(route, oif)| {
            route.prefix_len() > 0
                && Some(oif) != except_ifindex
                && (route.contains(&net.network()) || net.contains(&route.network()))
        })
        .collect();
    if overlapping.is_empty() {
        return Ok(Vec::new());
    }
    let names: HashMap<u32, String> = conn
        .handle
        .link()
        .get()
        .execute()
        .map_ok(|link| (link.header.index, name_of(&link)))
        .try_collect()
        .await
        .map_err(|source| NetlinkError::Query {
            what: "links",
            source,
        })?;
    Ok(overlapping
        .into_iter()
        .map(|(route, oif)| {
            let name = names
                .get(&oif)
                .cloned()
                .unwrap_or_else(|| format!("ifindex {oif}"));
            (route, name)
        })
        .collect())
}

/// An rtnetlink handle and the task that drives its socket; dropping it
/// stops the task (netlink-proto's connection does not end on its own while
/// its unsolicited-message receiver is merely unused).
#[derive(Debug)]
struct Connection {
    handle: Handle,
    task: JoinHandle<()>,
}

impl Connection {
    fn new() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        Ok(Connection {
            handle,
            task: tokio::spawn(connection),
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The one link a by-name or by-index request asks for.
async fn fetch_link(request: LinkGetRequest, ifname: &str) -> Result<LinkMessage, NetlinkError> {
    let not_found = || NetlinkError::LinkNotFound {
        ifname: ifname.into(),
    };
    match request.execute().try_next().await {
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(not_found()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Err(not_found()),
        Err(source) => Err(NetlinkError::Query {
            what: "link",
            source,
        }),
    }
}

/// A unicast route of the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRoute {
    pub prefix: IpNet,
    /// The output interface (`None` for multipath routes).
    pub oif: Option<u32>,
    /// The next hop (`RTA_GATEWAY`, or `RTA_VIA` of an IPv4 route through
    /// an IPv6 next hop); `None` for a route straight onto the link.
    pub gateway: Option<IpAddr>,
    /// Who installed it (`RTPROT_*`: 2 kernel, 3 boot, 4 static, 12 BIRD…).
    pub protocol: u8,
}

/// Unicast IPv4 and IPv6 routes of the main table. Malformed entries are
/// skipped.
pub(super) async fn main_routes(handle: &Handle) -> Result<Vec<KernelRoute>, NetlinkError> {
    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        // Without NETLINK_GET_STRICT_CHK the kernel dumps every table
        // whatever the request says, so filter here.
        let mut dump = handle.route().get(query).execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|source| NetlinkError::Query {
                what: "routes",
                source,
            })?
        {
            if table_of(&msg) == u32::from(RouteHeader::RT_TABLE_MAIN)
                && msg.header.kind == RouteType::Unicast
            {
                if let Some(prefix) = destination_of(&msg) {
                    let oif = msg.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    });
                    let gateway = msg.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(v4))
                        | RouteAttribute::Via(RouteVia::Inet(v4)) => Some(IpAddr::V4(*v4)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(v6))
                        | RouteAttribute::Via(RouteVia::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                        _ => None,
                    });
                    routes.push(KernelRoute {
                        prefix,
                        oif,
                        gateway,
                        protocol: u8::from(msg.header.protocol),
                    });
                }
            }
        }
    }
    Ok(routes)
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The route's destination prefix; a route without `RTA_DST` is a default
/// route.
fn destination_of(msg: &RouteMessage) -> Option<IpNet> {
    let len = msg.header.destination_prefix_length;
    let dst = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    });
    let dst = match (dst, msg.header.address_family) {
        (Some(dst), _) => dst,
        (None, rtnetlink::packet_route::AddressFamily::Inet) => Ipv4Addr::UNSPECIFIED.into(),
        (None, rtnetlink::packet_route::AddressFamily::Inet6) => Ipv6Addr::UNSPECIFIED.into(),
        (None, _) => return None,
    };
    IpNet::new(dst, len).ok()
}

/// The local address of an address message (`IFA_LOCAL`, which differs from
/// `IFA_ADDRESS` on point-to-point links configured with a peer).
fn address_of(attributes: &[AddressAttribute], prefix_len: u8) -> Option<IpNet> {
    let local = attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNet::new(local.or(address)?, prefix_len).ok()
}

fn mtu_of(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0)
}

fn name_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("ifindex {}", link.header.index))
}

fn address_message(index: u32, net: IpNet) -> rtnetlink::packet_route::address::AddressMessage {
    match net {
        IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
        IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(n.addr(), n.prefix_len())
            .build(),
    }
}

/// `ip route add NET dev IFNAME`: no gateway on a point-to-point TUN. IPv4
/// wants scope link for a route without a gateway (as iproute2 sets it); the
/// kernel ignores the scope of IPv6 routes. The same message deletes the
/// route, so only the route meshd added (same device, protocol) matches.
fn route_message(index: u32, net: IpNet) -> RouteMessage {
    match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .output_interface(index)
            .build(),
    }
}
