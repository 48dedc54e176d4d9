//! Start-up and teardown of a node: brings `mesh0` up, applies the node
//! agent's host changes, tears it all down.
//!
//! Does I/O. Order matters and is the contract with `meshctl`, systemd and
//! the tests: key → UDP socket → TUN → agent and driver → (rendezvous
//! session) → link configuration → env file ([`crate::kube::env`]) →
//! WireGuard UAPI socket (for `wg show`) → (metrics listener) → API socket
//! → `READY=1` to systemd ([`crate::systemd`]). The files and sockets
//! appear only once `mesh0` has its address, so a client that reaches them
//! talks to a node that is up; the env file is replaced when the address
//! changes. The address comes from the config, else from the cache of the last
//! peer map (so a node comes up while the rendezvous is down), else from
//! the rendezvous's first welcome. On the way out (`STOPPING=1`)
//! everything is undone in reverse.
//!
//! What the node decides is the agent's ([`crate::agent`]); the packet loop
//! ([`super::driver`]) hands its host changes here: new overlay addresses
//! (link, env file, and the first time the sockets and `READY=1`), the
//! prefixes behind peers (routes on the link, through the netlink diff),
//! the peer-map cache to save, the join token to forget.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{cache, candidates, driver, port, portmap, quic, tun, udp};
use crate::agent::{Agent, AgentConfig, HostChange};
use crate::config::Config;
use crate::control::metrics::{MetricsError, MetricsServer};
use crate::control::server::{ApiSocket, Ask, ServerError};
use crate::control::uapi::UapiSocket;
use crate::engine::{EngineError, NodeConfig};
use crate::identity::keyfile::{read_private_key, KeyFileError};
use crate::identity::{JoinToken, PrivateKey};
use crate::kube::env::{self as env_file, EnvError, MeshEnv};
use crate::netlink::{self, Link, LinkConfig, NetlinkError};
use crate::paths::NodeDir;
use crate::rendezvous::client::{self, ClientError};
use crate::sockets::QuicSource;
use crate::systemd::{Notice, Notifier, NotifySocket};
use crate::wire::control::PortTaken;

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
    RouteConflict {
        mesh: IpNet,
        route: IpNet,
        ifname: String,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Api(#[from] ServerError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Rendezvous(#[from] ClientError),
    #[error("cannot read the join token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
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
    /// Overrides `metrics-address` from the config.
    pub metrics: Option<SocketAddr>,
    /// Overrides `env-file` from the config.
    pub env_file: Option<PathBuf>,
    /// systemd's notification socket (`$NOTIFY_SOCKET`), if any.
    pub notify: Option<NotifySocket>,
}

/// How a node's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `shutdown` completed.
    Stopped,
    /// The node moved to another UDP port ([`port`]): run it again, which
    /// listens there.
    Restart,
}

/// Runs a node from `config` until `shutdown` completes, then removes what
/// it added to the host.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, DataplaneError> {
    let private_key = read_private_key(&config.private_key_file)?;
    // For `wg showconf`, over the 0600 UAPI socket only; never logged.
    let uapi_key = private_key.clone();
    let state_dir = config
        .state_dir
        .clone()
        .filter(|_| config.rendezvous.is_some());
    let udp = Arc::new(bind(&config, movable(&config, state_dir.as_deref()))?);
    let listen_port = udp.local_port()?;
    let cached = match &state_dir {
        Some(dir) => cache::load(dir)?,
        None => None,
    };
    let name = config.name.clone().or_else(hostname);

    let (tun, vnet_header) = tun::open(&config.interface)?;
    let link = Link::open(&config.interface).await?;
    let now = Instant::now();
    let underlay_ips = candidates::gather(listen_port, &config.interface, &[], None)
        .into_iter()
        .map(|c| c.addr.ip())
        .collect();
    let has_rendezvous = config.rendezvous.is_some() && state_dir.is_some();
    let mut agent = Agent::new(
        AgentConfig {
            node: NodeConfig {
                private_key: private_key.clone(),
                addresses: config.addresses.clone(),
                mtu: config.mtu,
            },
            static_peers: config.peers.clone(),
            name: name.clone(),
            interface: config.interface.clone(),
            listen_port,
            underlay_ips,
            rendezvous: has_rendezvous,
            routes: config.routes.clone(),
            advertise_endpoint: config.advertise_endpoint,
        },
        rand::random(),
        now,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )?;
    let started_from_cache = cached.is_some();
    let mesh_nets: Vec<IpNet> = cached
        .iter()
        .flat_map(|c| [IpNet::V4(c.mesh.ipv4), IpNet::V6(c.mesh.ipv6)])
        .collect();
    if let Some(cache) = cached {
        // Its host changes reach us through the driver, after the link
        // configuration from the config file below.
        agent.handle_cached(cache, now);
    }

    // The rendezvous session speaks QUIC over the driver's socket.
    let (updates_tx, updates) = mpsc::channel(64);
    let (outbox_tx, outbox) = mpsc::channel(driver::OUTBOX);
    let (relay_conn_tx, relay_conn) = tokio::sync::watch::channel(None);
    let (relay_frames_tx, relay_frames) = mpsc::channel(driver::RELAY_INBOX);
    let relay_link = client::RelayLink {
        connection: relay_conn_tx,
        frames: relay_frames_tx,
    };
    let quic_source = Arc::new(QuicSource::default());
    // A mesh node maps its port on the gateway when the gateway lets it
    // (PCP, NAT-PMP, UPnP IGD) and announces the mapped address, unless
    // the config turns it off; a node with static peers only has nobody
    // to announce it to.
    let (port_info_tx, port_info) = mpsc::channel(8);
    let (mapped_tx, mapped) = tokio::sync::watch::channel(None);
    if has_rendezvous && !config.port_mapping {
        tracing::info!("port mapping off (port-mapping = false)");
    }
    let port_mapper = (has_rendezvous && config.port_mapping).then(|| {
        portmap::PortMapper::spawn(listen_port, mesh_nets.clone(), port_info_tx, mapped_tx)
    });
    let (quic, session) = match (&config.rendezvous, &state_dir) {
        (Some(rendezvous), Some(dir)) => {
            let (socket, quic_tx) = quic::SharedSocket::new(udp.clone());
            let endpoint = quinn::Endpoint::new_with_abstract_socket(
                crate::rendezvous::tls::endpoint_config(),
                None,
                socket.clone(),
                Arc::new(quinn::TokioRuntime),
            )?;
            let client_config = client::ClientConfig {
                servers: rendezvous.servers(),
                pin: rendezvous.ca_hash,
                name: name
                    .clone()
                    .unwrap_or_else(|| private_key.public_key().short()),
                listen_port,
                token: read_join_token(dir)?,
                routes: config.routes.clone(),
            };
            let extra_routes = config.advertise_flannel_subnet.clone().map(|path| {
                let (tx, rx) = tokio::sync::watch::channel(Vec::new());
                tokio::spawn(follow_flannel_subnet(path, tx));
                rx
            });
            let (interface, advertised) = (config.interface.clone(), config.advertise_endpoint);
            let mapped_rx_for_client = mapped.clone();
            let (interfaces_tx, interfaces_rx) = tokio::sync::watch::channel(());
            tokio::spawn(watch_addresses(interfaces_tx));
            let gather = move || {
                let mut found = candidates::gather(listen_port, &interface, &mesh_nets, advertised);
                // The gateway's mapping comes first: it is where anyone reaches this node.
                if let Some(mapped) = *mapped.borrow() {
                    found.retain(|c| c.addr != mapped.addr);
                    found.insert(0, mapped);
                    found.truncate(crate::wire::control::MAX_CANDIDATES);
                }
                found
            };
            let task = tokio::spawn(client::run(
                endpoint,
                client_config,
                private_key,
                gather,
                client::Channels {
                    updates: updates_tx,
                    outbox,
                    relay: relay_link,
                    quic_source: quic_source.clone(),
                    extra_routes,
                    mapped: Some(mapped_rx_for_client),
                    interfaces: Some(interfaces_rx),
                },
                started_from_cache,
            ));
            (Some((quic_tx, socket)), Some(task))
        }
        _ => (None, None),
    };
    let (quic, quic_socket) = quic.unzip();

    let (ask_tx, asks) = mpsc::channel(16);
    let (host_tx, host_changes) = mpsc::unbounded_channel();
    // Routes the cluster installs on mesh0 (flannel host-gw, BGP) name
    // peers' prefixes: read now and on every change.
    let (kernel_routes_tx, kernel_routes) = mpsc::channel(4);
    let route_watch = tokio::spawn(watch_routes(link.index(), kernel_routes_tx));
    let inputs = driver::Inputs {
        asks,
        updates: has_rendezvous.then_some(updates),
        quic,
        quic_socket,
        quic_source,
        outbox: has_rendezvous.then_some(outbox_tx),
        relay_connection: has_rendezvous.then_some(relay_conn),
        relay_frames: has_rendezvous.then_some(relay_frames),
        host: host_tx,
        kernel_routes: Some(kernel_routes),
        port_mapping: port_mapper.is_some().then_some(port_info),
    };
    let mut driver = driver::Driver::new(agent, tun, vnet_header, udp, inputs);
    let (stop, stopped) = oneshot::channel::<()>();
    let mut driver_task = tokio::spawn(async move {
        let result = driver
            .run(async {
                let _ = stopped.await;
            })
            .await;
        (driver, result)
    });

    let host_state_dir = state_dir.clone();
    let mut host = Host {
        socket: options.socket.unwrap_or_else(|| config.socket.clone()),
        env_file: options.env_file.unwrap_or_else(|| config.env_file.clone()),
        env_written: false,
        notifier: Notifier::new(options.notify.as_ref()),
        metrics_address: options.metrics.or(config.metrics_address),
        config,
        state_dir,
        link,
        addresses: Vec::new(),
        peer_routes: Vec::new(),
        asks: Some(ask_tx),
        api: None,
        uapi_key: Some(uapi_key),
        uapi: None,
        metrics: None,
        cache_writer: host_state_dir.map(|dir| cache::Writer::spawn(dir, cache::WRITE_EVERY)),
        listen_port,
        moved: false,
    };
    let result = host
        .run(
            started_from_cache,
            host_changes,
            session,
            &mut driver_task,
            shutdown,
        )
        .await;
    route_watch.abort();
    if let Some(mapper) = port_mapper {
        // The gateway forgets the mapping now rather than at its expiry.
        mapper.close().await;
    }
    if let Some(writer) = host.cache_writer.take() {
        // The last peer map reaches the disk before meshd exits.
        writer.close().await;
    }
    // A restart is the same service going on: systemd hears READY=1 from
    // the new run, not STOPPING=1 from this one.
    if !matches!(result, Ok(Ended::Restart)) {
        host.notifier.notify(&Notice::Stopping);
    }
    // Gone before the address is, so the file never names an address that
    // mesh0 no longer has.
    if host.env_written {
        if let Err(e) = env_file::remove(&host.env_file) {
            tracing::warn!(error = %e, "kubelet may read a stale overlay address");
        }
    }

    // Undo the link configuration while the TUN still exists; the device
    // itself goes with the driver, its only handle.
    let _ = stop.send(());
    let driver = match driver_task.await {
        Ok((driver, Err(e))) => {
            tracing::error!(error = %e, "driver stopped");
            Some(driver)
        }
        Ok((driver, Ok(()))) => Some(driver),
        Err(_) => None,
    };
    if let Some(api) = host.api.take() {
        api.abort();
    }
    if let Some(metrics) = host.metrics.take() {
        metrics.abort();
    }
    if let Some(uapi) = host.uapi.take() {
        // Awaited, so the socket file is gone before meshd exits.
        uapi.abort();
        let _ = uapi.await;
    }
    if let Err(e) = host.link.teardown().await {
        tracing::warn!(error = %e, "could not remove all addresses and routes");
    }
    drop(driver);
    tracing::info!(interface = %host.config.interface, "mesh interface down");
    result
}

/// The state directory where this node may record a move of its port:
/// none with an `advertise-endpoint`, whose port something outside
/// (a port forward, a 1:1 NAT) depends on.
fn movable<'a>(config: &Config, state_dir: Option<&'a Path>) -> Option<&'a Path> {
    state_dir.filter(|_| config.advertise_endpoint.is_none())
}

/// The node's UDP socket, on the port it moved to if it did, else the
/// configured one.
fn bind(config: &Config, movable: Option<&Path>) -> Result<udp::UdpSocket, DataplaneError> {
    let configured = config.listen_port;
    if let (port, Some(moved)) = port::listen_port(configured, movable) {
        match udp::UdpSocket::bind(port) {
            Ok(udp) => {
                tracing::info!(
                    port, configured, held_by = %moved.held_by,
                    "listening on the port this node moved to: another node behind the same NAT holds the configured one"
                );
                return Ok(udp);
            }
            Err(e) => {
                tracing::warn!(port, configured, error = %e, "cannot bind the port this node moved to; using the configured one");
            }
        }
    }
    udp::UdpSocket::bind(configured).map_err(|source| DataplaneError::Udp {
        port: configured,
        source,
    })
}

/// Applies the agent's host changes to the link, the env file, the
/// sockets and the cache.
struct Host {
    config: Config,
    socket: PathBuf,
    env_file: PathBuf,
    /// Whether this meshd wrote `env_file` (and so removes it on the way out).
    env_written: bool,
    notifier: Notifier,
    /// Where to serve metrics, if anywhere.
    metrics_address: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    link: Link,
    /// The overlay addresses mesh0 has.
    addresses: Vec<IpNet>,
    /// The prefixes behind mesh peers (their accepted routes) that mesh0
    /// routes, besides the static peers' allowed IPs.
    peer_routes: Vec<IpNet>,
    /// Handed to the API socket once the interface is up.
    asks: Option<mpsc::Sender<Ask>>,
    api: Option<JoinHandle<()>>,
    /// Handed to the UAPI socket once the interface is up.
    uapi_key: Option<PrivateKey>,
    uapi: Option<JoinHandle<()>>,
    metrics: Option<JoinHandle<()>>,
    /// Writes the cache off the packet loop's thread (this runtime has one).
    cache_writer: Option<cache::Writer>,
    /// The UDP port the node listens on.
    listen_port: u16,
    /// The node moved to another port and must start again.
    moved: bool,
}

type DriverTask = JoinHandle<(driver::Driver, std::io::Result<()>)>;

impl Host {
    async fn run(
        &mut self,
        from_cache: bool,
        mut changes: mpsc::UnboundedReceiver<HostChange>,
        mut session: Option<JoinHandle<ClientError>>,
        driver: &mut DriverTask,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Ended, DataplaneError> {
        if !self.config.addresses.is_empty() {
            self.bring_up(self.config.addresses.clone()).await?;
        }
        if self.config.addresses.is_empty() && !from_cache {
            self.notifier.notify(&Notice::Status(
                "waiting for the rendezvous to assign an overlay address".into(),
            ));
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(Ended::Stopped),
                Some(change) = changes.recv() => {
                    self.apply(change).await?;
                    if self.moved {
                        return Ok(Ended::Restart);
                    }
                }
                Some(ended) = async {
                    match session.as_mut() {
                        Some(task) => Some(task.await),
                        None => None,
                    }
                }, if session.is_some() => {
                    session = None;
                    if let Ok(error) = ended {
                        // Refused before ever being admitted: nothing to run.
                        return Err(error.into());
                    }
                }
                ended = &mut *driver => {
                    return Err(match ended {
                        Ok((_, Err(e))) => DataplaneError::Io(e),
                        _ => DataplaneError::Io(std::io::Error::other("the packet loop stopped")),
                    });
                }
            }
        }
    }

    async fn apply(&mut self, change: HostChange) -> Result<(), DataplaneError> {
        tracing::debug!(%change, "host change");
        match change {
            HostChange::Addresses(addresses) => {
                if addresses != self.addresses {
                    self.bring_up(addresses).await?;
                }
            }
            // Hands the cache to its writer, which writes it soon on another
            // thread, at most once a second (a storm of updates costs one write).
            HostChange::SaveCache(cache) => {
                if let Some(writer) = &self.cache_writer {
                    writer.save(cache);
                }
            }
            HostChange::Registered => {
                if let Some(dir) = &self.state_dir {
                    // Registered: the token has done its job.
                    let _ = std::fs::remove_file(NodeDir::new(dir).join_token());
                }
            }
            HostChange::PortTaken(taken) => self.move_port(&taken),
            HostChange::Routes(routes) => {
                self.peer_routes = routes;
                // Before mesh0 has an address, bring_up installs them.
                if !self.addresses.is_empty() {
                    let desired = self.desired(self.addresses.clone());
                    // Routes are added and removed by the diff; one the
                    // kernel refuses costs that prefix, not the node.
                    if let Err(e) = self.link.apply(&desired).await {
                        tracing::warn!(error = %e, "cannot route the prefixes behind peers over mesh0");
                    }
                }
            }
        }
        Ok(())
    }

    /// Another node behind our NAT holds the public port ours needs: the
    /// move is written down and the node starts again on the new port,
    /// unless the port is pinned (see [`movable`]) or the move can't be
    /// recorded, when the node stays (relayed to the peers the other node
    /// talks to) and says so.
    fn move_port(&mut self, taken: &PortTaken) {
        let Some(dir) = movable(&self.config, self.state_dir.as_deref()) else {
            tracing::warn!(
                port = self.listen_port, held_by = %taken.by, free = taken.port,
                "another node behind the same NAT holds this node's port, and advertise-endpoint pins it: peers the other node talks to reach this one through the relay; give one of them another listen-port"
            );
            return;
        };
        if taken.port <= self.listen_port {
            return;
        }
        let moved = port::Moved {
            port: taken.port,
            instead_of: self.config.listen_port,
            held_by: taken.by.clone(),
        };
        match port::save(dir, &moved) {
            Ok(()) => {
                tracing::info!(
                    from = self.listen_port, to = taken.port, held_by = %taken.by,
                    "another node behind the same NAT holds this node's port: moving to a free one (restarting)"
                );
                self.moved = true;
            }
            Err(e) => tracing::warn!(
                error = %e, held_by = %taken.by,
                "another node behind the same NAT holds this node's port, and the move cannot be recorded: staying"
            ),
        }
    }

    /// What mesh0 should look like with `addresses`: routes for the static
    /// peers' allowed IPs and the prefixes behind mesh peers.
    fn desired(&self, addresses: Vec<IpNet>) -> LinkConfig {
        let static_ips = self
            .config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied());
        LinkConfig {
            ifname: self.config.interface.clone(),
            mtu: self.config.mtu,
            routes: netlink::routes_for(
                &addresses,
                static_ips.chain(self.peer_routes.iter().copied()),
            ),
            addresses,
        }
    }

    /// Configures the link for `addresses` and, the first time, opens the API.
    async fn bring_up(&mut self, addresses: Vec<IpNet>) -> Result<(), DataplaneError> {
        check_route_conflicts(&self.config.interface, &addresses).await?;
        let desired = self.desired(addresses.clone());
        if self.env_written {
            // Moving: the file must never name an address mesh0 no longer has.
            if let Err(e) = env_file::remove(&self.env_file) {
                tracing::warn!(error = %e, "kubelet may read a stale overlay address");
            }
            self.env_written = false;
        }
        self.link.apply(&desired).await?;
        self.addresses = addresses.clone();
        tracing::info!(interface = %self.config.interface, ?addresses, "mesh interface up");
        let first = self.asks.is_some();
        match env_file::write(
            &self.env_file,
            &MeshEnv::new(&addresses, &self.config.interface, self.config.mtu),
        ) {
            Ok(()) => self.env_written = true,
            // kubelet cannot start without it: refuse to start rather than
            // report ready.
            Err(e) if first => return Err(e.into()),
            Err(e) => tracing::warn!(error = %e, "kubelet may read a stale overlay address"),
        }
        if let Some(asks) = self.asks.take() {
            if let Some(key) = self.uapi_key.take() {
                self.uapi = serve_uapi(&self.config, key, asks.clone()).await;
            }
            if let Some(addr) = self.metrics_address {
                let metrics = MetricsServer::bind(addr).await?;
                tracing::info!(addr = %metrics.local_addr().unwrap_or(addr), "serving Prometheus metrics at /metrics");
                self.metrics = Some(tokio::spawn(metrics.serve_node(asks.clone())));
            }
            let api = ApiSocket::bind_for_group(&self.socket, self.config.socket_group.as_deref())
                .await?;
            self.api = Some(tokio::spawn(api.serve_asks(asks)));
        }
        let status = format!(
            "{} up: {}",
            self.config.interface,
            self.addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.notifier.notify(&if first {
            Notice::Ready { status }
        } else {
            Notice::Status(status)
        });
        Ok(())
    }
}

/// Opens the WireGuard UAPI socket for `wg show`. Without it the node
/// still works, so a failure is a warning, not an error.
async fn serve_uapi(
    config: &Config,
    key: PrivateKey,
    asks: mpsc::Sender<Ask>,
) -> Option<JoinHandle<()>> {
    match UapiSocket::bind(&config.uapi_dir, &config.interface).await {
        Ok(socket) => {
            tracing::debug!(path = %socket.path().display(), "answering wg(8) on the WireGuard UAPI socket");
            Some(tokio::spawn(socket.serve(key, asks)))
        }
        Err(e) => {
            tracing::warn!(error = %e, interface = %config.interface, "`wg show` cannot list this node's peers");
            None
        }
    }
}

fn read_join_token(dir: &Path) -> Result<Option<JoinToken>, DataplaneError> {
    let path = NodeDir::new(dir).join_token();
    match std::fs::read_to_string(&path) {
        Ok(t) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| DataplaneError::Token {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DataplaneError::Token { path, source }),
    }
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()?
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
}

/// DESIGN.md: meshd refuses to start when a host route already claims part
/// of the mesh prefix, since traffic for those peers would silently leave
/// through the wrong interface.
async fn check_route_conflicts(interface: &str, addresses: &[IpNet]) -> Result<(), DataplaneError> {
    for address in addresses {
        let mesh = address.trunc();
        for (route, ifname) in netlink::overlapping_routes(mesh, None).await? {
            if ifname == interface {
                continue;
            }
            // A wider route (a default, or a /10 that covers us) loses to
            // our more specific one; only a route inside the mesh steals traffic.
            if mesh.contains(&route) {
                return Err(DataplaneError::RouteConflict {
                    mesh,
                    route,
                    ifname,
                });
            }
        }
    }
    Ok(())
}

/// How long a burst of route changes (a BGP session coming up installs
/// many at once) may last before the routes are read again.
const ROUTES_SETTLE: Duration = Duration::from_millis(200);
/// Routes are read again this often even without an announcement (a
/// netlink socket drops announcements when its buffer overflows).
const ROUTES_REREAD: Duration = Duration::from_secs(30);

/// Sends the routes through `ifindex` to the driver: now, after every
/// change the kernel announces, and every [`ROUTES_REREAD`]. Ends when the
/// driver is gone; a netlink failure is logged and ends only the watch
/// (peers keep what they had).
/// Marks `tx` whenever the host's addresses or links change, a moment
/// after the last of a burst (a lease renewal adds and removes several at
/// once), until nobody listens.
async fn watch_addresses(tx: tokio::sync::watch::Sender<()>) {
    let mut watch = match netlink::AddressWatch::open() {
        Ok(watch) => watch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the host's addresses: a changed address reaches peers with the next session only");
            return;
        }
    };
    while watch.changed().await {
        tokio::time::sleep(ADDRESS_SETTLE).await;
        if tx.send(()).is_err() {
            return;
        }
    }
}

/// How long address changes are let settle before candidates are gathered.
const ADDRESS_SETTLE: Duration = Duration::from_millis(250);

async fn watch_routes(ifindex: u32, tx: mpsc::Sender<Vec<netlink::KernelRoute>>) {
    let mut watch = match netlink::RouteWatch::open(ifindex) {
        Ok(watch) => watch,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the routing table: routes others install on mesh0 are not learned");
            return;
        }
    };
    loop {
        match watch.routes().await {
            Ok(routes) => {
                if tx.send(routes).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the routes on mesh0"),
        }
        tokio::select! {
            alive = watch.changed() => {
                if !alive {
                    tracing::warn!("the routing table watch ended: routes others install on mesh0 are no longer followed");
                    return;
                }
                tokio::time::sleep(ROUTES_SETTLE).await;
            }
            () = tokio::time::sleep(ROUTES_REREAD) => {}
        }
    }
}

/// How often flannel's `subnet.env` is read again.
const FLANNEL_REREAD: Duration = Duration::from_secs(2);

/// Follows flannel's `subnet.env` at `path`: the subnets in it, whenever
/// they change (none while the file is missing: flannel has not given this
/// node one yet, or took it back). Ends when nobody listens.
async fn follow_flannel_subnet(path: PathBuf, tx: tokio::sync::watch::Sender<Vec<IpNet>>) {
    let mut complained = false;
    loop {
        let subnets = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match crate::kube::flannel::subnets(&text) {
                Ok(subnets) => Some(subnets),
                Err(e) => {
                    if !complained {
                        tracing::warn!(file = %path.display(), error = %e, "flannel's subnet file is not understood; advertising what it said before");
                    }
                    complained = true;
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Vec::new()),
            Err(e) => {
                if !complained {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read flannel's subnet file");
                }
                complained = true;
                None
            }
        };
        if let Some(subnets) = subnets {
            complained = false;
            tx.send_if_modified(|current| {
                let changed = *current != subnets;
                if changed {
                    tracing::info!(file = %path.display(), ?subnets, "flannel's subnet for this node");
                    current.clone_from(&subnets);
                }
                changed
            });
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(FLANNEL_REREAD) => {}
        }
    }
}
