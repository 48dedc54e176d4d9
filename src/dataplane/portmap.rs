//! The port mapper's shell: asks the node's default gateway to map meshd's
//! UDP port with PCP and NAT-PMP (the `crab_nat` crate) or UPnP IGD
//! (`igd-next`), renews the mapping and removes it on the way out, as
//! [`crate::portmap::Mapper`] decides.
//!
//! Does I/O, on a task of its own: a gateway that is slow or silent never
//! holds up the packet loop. Each request is bounded ([`REQUEST_DEADLINE`]);
//! the network (default gateway, the node's address towards it) is read
//! again every [`NETWORK_RECHECK`], and a change starts a fresh probe. What
//! it learns goes to the agent (for `status`, `netcheck` and the relay
//! reasons) and to the rendezvous session, which announces the mapped
//! address as a candidate.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use crab_nat::{natpmp, pcp, InternetProtocol, PortMapping, PortMappingOptions, TimeoutConfig};
use igd_next::aio::tokio::Tokio;
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::control::PortMappingInfo;
use crate::portmap::{Action, Answered, Mapper, Mapping, ProbeResult, REQUESTED_LIFETIME};
use crate::wire::control::{Candidate, CandidateKind, MappingProtocol};

/// The longest any one exchange with the gateway may take.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How often the default gateway and the node's address are read again.
pub const NETWORK_RECHECK: Duration = Duration::from_secs(10);
/// How long removing the mapping may hold up meshd's exit.
pub const REMOVE_DEADLINE: Duration = Duration::from_secs(2);
/// How a mapping is described to a UPnP gateway (its port list shows it).
const DESCRIPTION: &str = "meshd";
/// NAT-PMP and PCP retries: 250 ms, then twice more, at most a second
/// apart (RFC 6886 §3.1 allows fewer than nine tries).
const RETRIES: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};
/// The SSDP multicast address of UPnP discovery.
const SSDP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 255, 250)), 1900);

/// The running port mapper.
pub struct PortMapper {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl PortMapper {
    /// Starts mapping `port` on the default gateway. What the mapper knows
    /// goes to `info` whenever it changes; the candidate to announce (or
    /// none) to `candidate`. `mesh` are the mesh's overlay prefixes, refused
    /// as external addresses.
    pub fn spawn(
        port: u16,
        mesh: Vec<IpNet>,
        info: mpsc::Sender<PortMappingInfo>,
        candidate: watch::Sender<Option<Candidate>>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(port, mesh, info, candidate, stopped));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Removes the mapping from the gateway (waiting at most
    /// [`REMOVE_DEADLINE`]) and stops.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let deadline = REMOVE_DEADLINE + Duration::from_millis(500);
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// The node's view of its network: the default gateway and its own
/// address towards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    gateway: Option<Ipv4Addr>,
    local: Option<IpAddr>,
}

impl Network {
    fn read() -> Self {
        let gateway = std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|text| crate::portmap::default_gateway(&text));
        // Connecting a UDP socket sends nothing: it asks the kernel which
        // source address a packet to the gateway would carry.
        let local = gateway.and_then(|gw| {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            socket.connect((gw, crab_nat::GATEWAY_PORT)).ok()?;
            Some(socket.local_addr().ok()?.ip())
        });
        Self { gateway, local }
    }
}

/// What the shell holds to renew and remove the mapping.
enum Held {
    /// PCP or NAT-PMP (and the external address NAT-PMP said separately).
    Pmp(PortMapping, IpAddr),
    Upnp(Gateway<Tokio>, u16),
}

async fn run(
    port: u16,
    mesh: Vec<IpNet>,
    info_tx: mpsc::Sender<PortMappingInfo>,
    candidate_tx: watch::Sender<Option<Candidate>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Some(internal) = NonZeroU16::new(port) else {
        return;
    };
    let mut mapper = Mapper::new(Instant::now());
    mapper.set_mesh(mesh);
    let mut network = Network::read();
    let mut held: Option<Held> = None;
    let mut published: Option<PortMappingInfo> = None;
    let mut recheck = tokio::time::interval(NETWORK_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Some(action) = mapper.poll_action(Instant::now()) {
            let request = async {
                match action {
                    Action::Probe => {
                        if let Some(old) = held.take() {
                            remove(old, internal).await;
                        }
                        let (result, new) = probe(network, internal).await;
                        held = new;
                        mapper.handle_probe(result, Instant::now());
                    }
                    Action::Renew(mapping) => {
                        let result = match held.as_mut() {
                            Some(h) => renew(h, mapping).await,
                            None => Err("nothing held to renew".into()),
                        };
                        mapper.handle_renewal(result, Instant::now());
                    }
                }
            };
            tokio::select! {
                () = request => {}
                _ = &mut stopped => {
                    // Whatever was granted meanwhile is the gateway's to expire.
                    return;
                }
            }
            if mapper.mapping(Instant::now()).is_none() && mapper.to_remove().is_none() {
                held = None;
            }
            if mapper.refused() > 0 {
                tracing::debug!(refused = mapper.refused(), "gateway answers refused so far");
            }
        }
        let now = Instant::now();
        let info = mapper.info(now);
        if published.as_ref() != Some(&info) {
            let candidate = mapper.mapping(now).map(|m| Candidate {
                addr: m.external,
                kind: CandidateKind::Advertised,
                mapped: Some(m.protocol),
            });
            candidate_tx.send_if_modified(|c| {
                let changed = *c != candidate;
                *c = candidate;
                changed
            });
            if info_tx.send(info.clone()).await.is_err() {
                return;
            }
            published = Some(info);
        }
        let wake = mapper
            .poll_timeout()
            .map_or(now + NETWORK_RECHECK, |(at, _)| at);
        tokio::select! {
            _ = &mut stopped => break,
            () = tokio::time::sleep_until(wake.into()) => {}
            _ = recheck.tick() => {
                let now_network = Network::read();
                if now_network != network {
                    tracing::info!(gateway = ?now_network.gateway, local = ?now_network.local, "the network changed: probing the gateway for port mapping");
                    network = now_network;
                    mapper.handle_network_change(Instant::now());
                }
            }
        }
    }
    if let Some(h) = held.take() {
        if tokio::time::timeout(REMOVE_DEADLINE, remove(h, internal))
            .await
            .is_err()
        {
            tracing::debug!("the gateway did not confirm the mapping's removal in time");
        }
    }
}

/// Asks the gateway with every protocol at once, then maps with the
/// preferred one that answered: PCP (its answer is the mapping), NAT-PMP,
/// UPnP IGD.
async fn probe(network: Network, internal: NonZeroU16) -> (ProbeResult, Option<Held>) {
    let (Some(gateway), Some(local)) = (network.gateway, network.local) else {
        return (
            ProbeResult {
                gateway: network.gateway.map(IpAddr::V4),
                answered: Answered::default(),
                mapping: Err("no default gateway".into()),
            },
            None,
        );
    };
    let options = PortMappingOptions {
        external_port: Some(internal),
        lifetime_seconds: Some(u32::try_from(REQUESTED_LIFETIME.as_secs()).unwrap_or(7200)),
        timeout_config: Some(RETRIES),
    };
    let gw = crab_nat::GatewayAddress::IpV4(gateway);
    let (pcp, nat_pmp, upnp) = tokio::join!(
        bounded(pcp::port_mapping(
            pcp::BaseMapRequest::new(gw, local, InternetProtocol::Udp, internal),
            None,
            None,
            options,
        )),
        bounded(natpmp::external_address(gw, Some(RETRIES))),
        bounded(search_upnp(gateway, local)),
    );
    let answered = Answered {
        pcp: matches!(pcp, Some(Ok(_))),
        nat_pmp: matches!(nat_pmp, Some(Ok(_))),
        upnp: matches!(upnp, Some(Ok(_))),
    };
    let result = |mapping| ProbeResult {
        gateway: Some(IpAddr::V4(gateway)),
        answered,
        mapping,
    };
    if let Some(Ok(m)) = pcp {
        let external = match m.mapping_type() {
            crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
            crab_nat::PortMappingType::NatPmp => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let mapping = pmp_mapping(&m, external, MappingProtocol::Pcp);
        return (result(Ok(mapping)), Some(Held::Pmp(m, external)));
    }
    if let Some(Ok(external)) = nat_pmp {
        let external = IpAddr::V4(external);
        return match bounded(natpmp::port_mapping(
            gw,
            InternetProtocol::Udp,
            internal,
            options,
        ))
        .await
        {
            Some(Ok(m)) => {
                let mapping = pmp_mapping(&m, external, MappingProtocol::NatPmp);
                (result(Ok(mapping)), Some(Held::Pmp(m, external)))
            }
            Some(Err(e)) => (
                result(Err(format!("NAT-PMP refused the mapping: {e}"))),
                None,
            ),
            None => (
                result(Err("NAT-PMP did not answer the mapping".into())),
                None,
            ),
        };
    }
    if let Some(Ok(igd)) = upnp {
        let local = SocketAddr::new(local, internal.get());
        return match bounded(map_upnp(&igd, local)).await {
            Some(Ok((external, port))) => {
                let mapping = Mapping {
                    protocol: MappingProtocol::Upnp,
                    external,
                    lifetime: REQUESTED_LIFETIME,
                };
                (result(Ok(mapping)), Some(Held::Upnp(igd, port)))
            }
            Some(Err(e)) => (
                result(Err(format!("UPnP IGD refused the mapping: {e}"))),
                None,
            ),
            None => (
                result(Err("UPnP IGD did not answer the mapping".into())),
                None,
            ),
        };
    }
    let why = match upnp {
        Some(Err(e)) if e.starts_with("answered by") => e,
        _ => format!("the gateway {gateway} answers none of PCP, NAT-PMP, UPnP IGD"),
    };
    (result(Err(why)), None)
}

/// Renews `held`, which holds `mapping`.
async fn renew(held: &mut Held, mapping: Mapping) -> Result<Mapping, String> {
    match held {
        Held::Pmp(m, external) => match bounded(m.renew()).await {
            Some(Ok(())) => {
                let external = match m.mapping_type() {
                    crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
                    crab_nat::PortMappingType::NatPmp => *external,
                };
                Ok(pmp_mapping(m, external, mapping.protocol))
            }
            Some(Err(e)) => Err(format!("{} refused the renewal: {e}", mapping.protocol)),
            None => Err(format!("{} did not answer the renewal", mapping.protocol)),
        },
        Held::Upnp(igd, port) => {
            let local = match Network::read().local {
                Some(ip) => SocketAddr::new(ip, mapping.external.port()),
                None => return Err("no address towards the gateway".into()),
            };
            let lease = u32::try_from(REQUESTED_LIFETIME.as_secs()).unwrap_or(7200);
            match bounded(igd.add_port(PortMappingProtocol::UDP, *port, local, lease, DESCRIPTION))
                .await
            {
                Some(Ok(())) => Ok(mapping),
                Some(Err(e)) => Err(format!("UPnP IGD refused the renewal: {e}")),
                None => Err("UPnP IGD did not answer the renewal".into()),
            }
        }
    }
}

async fn remove(held: Held, internal: NonZeroU16) {
    let removed = match held {
        Held::Pmp(m, _) => bounded(m.try_drop()).await.is_some_and(|r| r.is_ok()),
        Held::Upnp(igd, port) => bounded(igd.remove_port(PortMappingProtocol::UDP, port))
            .await
            .is_some_and(|r| r.is_ok()),
    };
    if removed {
        tracing::info!(
            port = internal.get(),
            "port mapping removed from the gateway"
        );
    } else {
        tracing::debug!(
            port = internal.get(),
            "the gateway did not confirm the removal of the port mapping"
        );
    }
}

fn pmp_mapping(m: &PortMapping, external: IpAddr, protocol: MappingProtocol) -> Mapping {
    Mapping {
        protocol,
        external: SocketAddr::new(external, m.external_port().get()),
        lifetime: Duration::from_secs(m.lifetime().into()),
    }
}

/// An SSDP search for an Internet Gateway Device, believed only if the
/// default gateway itself answers (another host on the LAN could claim to
/// be the router).
async fn search_upnp(gateway: Ipv4Addr, local: IpAddr) -> Result<Gateway<Tokio>, String> {
    let options = SearchOptions {
        bind_addr: SocketAddr::new(local, 0),
        broadcast_address: SSDP,
        timeout: Some(Duration::from_secs(3)),
        single_search_timeout: Some(Duration::from_secs(3)),
    };
    let igd = igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(|e| e.to_string())?;
    if igd.addr.ip() != IpAddr::V4(gateway) {
        return Err(format!(
            "answered by {}, not the default gateway {gateway}: not believed",
            igd.addr.ip()
        ));
    }
    Ok(igd)
}

/// Maps `local`'s port on `igd`, the same port outside if it is free, and
/// says where the internet reaches it.
async fn map_upnp(igd: &Gateway<Tokio>, local: SocketAddr) -> Result<(SocketAddr, u16), String> {
    let lease = u32::try_from(REQUESTED_LIFETIME.as_secs()).unwrap_or(7200);
    let external_ip = igd.get_external_ip().await.map_err(|e| e.to_string())?;
    let port = match igd
        .add_port(
            PortMappingProtocol::UDP,
            local.port(),
            local,
            lease,
            DESCRIPTION,
        )
        .await
    {
        Ok(()) => local.port(),
        Err(_) => igd
            .add_any_port(PortMappingProtocol::UDP, local, lease, DESCRIPTION)
            .await
            .map_err(|e| e.to_string())?,
    };
    Ok((SocketAddr::new(external_ip, port), port))
}

/// `request`, or `None` past [`REQUEST_DEADLINE`].
async fn bounded<T>(request: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(REQUEST_DEADLINE, request).await.ok()
}
