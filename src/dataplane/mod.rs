//! The node shell: brings `mesh0` up, runs the event loop, tears it down.
//!
//! Does I/O. Order matters and is the contract with `meshctl`, systemd and
//! the tests: key → UDP socket → TUN → link configuration → engine → API
//! socket. The API socket appears only once `mesh0` has its address, so a
//! client that reaches it talks to a node that is up. On the way out
//! everything is undone in reverse.

pub mod driver;
pub mod tun;
pub mod udp;

use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::control::server::{ApiSocket, ServerError};
use crate::engine::{EngineError, Node, NodeConfig};
use crate::identity::keyfile::{read_private_key, KeyFileError};
use crate::netlink::{self, Link, LinkConfig, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("cannot bind UDP port {port}: {source}{hint}", hint = port_hint(source))]
    Udp { port: u16, source: std::io::Error },
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(
        "the mesh prefix {mesh} overlaps the host route {route} on {ifname}; \
         choose another mesh prefix or remove that route"
    )]
    RouteConflict { mesh: IpNet, route: IpNet, ifname: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Api(#[from] ServerError),
    #[error("packet I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

fn port_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => " (another meshd or WireGuard uses it; set listen-port)",
        _ => "",
    }
}

/// Where the node's files go when not taken from the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides `socket` from the config.
    pub socket: Option<PathBuf>,
}

/// Runs a node from `config` until `shutdown` completes, then removes what
/// it added to the host.
pub async fn run(config: Config, options: RunOptions, shutdown: impl Future<Output = ()>) -> Result<(), DataplaneError> {
    let private_key = read_private_key(&config.private_key_file)?;
    let udp = udp::UdpSocket::bind(config.listen_port)
        .map_err(|source| DataplaneError::Udp { port: config.listen_port, source })?;
    let listen_port = udp.local_port()?;

    check_route_conflicts(&config).await?;
    let tun = tun::open(&config.interface)?;
    let mut link = Link::open(&config.interface).await?;
    let desired = LinkConfig {
        ifname: config.interface.clone(),
        mtu: config.mtu,
        addresses: config.addresses.clone(),
        routes: netlink::routes_for(
            &config.addresses,
            config.peers.iter().flat_map(|p| p.allowed_ips.iter().copied()),
        ),
    };
    let result = async {
        link.apply(&desired).await?;

        let now = Instant::now();
        let mut node = Node::new(
            NodeConfig { private_key, addresses: config.addresses.clone(), mtu: config.mtu },
            now,
        );
        for peer in &config.peers {
            node.add_peer(peer.clone(), now)?;
        }
        tracing::info!(
            interface = %config.interface,
            public_key = %node.public_key(),
            addresses = ?config.addresses,
            listen_port,
            peers = config.peers.len(),
            "mesh interface up"
        );

        let socket_path = options.socket.clone().unwrap_or_else(|| config.socket.clone());
        let api = ApiSocket::bind(&socket_path).await?;
        let (ask_tx, ask_rx) = mpsc::channel(16);
        let info = driver::NodeInfo {
            interface: config.interface.clone(),
            listen_port,
            addresses: config.addresses.iter().map(ToString::to_string).collect(),
        };
        let mut driver = driver::Driver::new(node, tun, udp, ask_rx, info);
        let result = tokio::select! {
            () = api.serve(ask_tx) => Ok(()),
            r = driver.run(shutdown) => r.map_err(DataplaneError::from),
        };
        // Undo the link configuration while the TUN still exists; the
        // device itself goes when the driver (its only handle) is dropped.
        Ok::<_, DataplaneError>((driver, result))
    }
    .await;
    let (driver, result) = match result {
        Ok((driver, result)) => (Some(driver), result),
        Err(e) => (None, Err(e)),
    };
    teardown(&mut link, &config.interface).await;
    drop(driver);
    result
}

async fn teardown(link: &mut Link, interface: &str) {
    if let Err(e) = link.teardown().await {
        tracing::warn!(error = %e, "could not remove all addresses and routes");
    }
    tracing::info!(%interface, "mesh interface down");
}

/// DESIGN.md: meshd refuses to start when a host route already claims part
/// of the mesh prefix, since traffic for those peers would silently leave
/// through the wrong interface.
async fn check_route_conflicts(config: &Config) -> Result<(), DataplaneError> {
    for address in &config.addresses {
        let mesh = address.trunc();
        for (route, ifname) in netlink::overlapping_routes(mesh, None).await? {
            if ifname == config.interface {
                continue;
            }
            // A wider route (a default, or a /10 that covers us) loses to
            // our more specific one; only a route inside the mesh steals traffic.
            if mesh.contains(&route) {
                return Err(DataplaneError::RouteConflict { mesh, route, ifname });
            }
        }
    }
    Ok(())
}
