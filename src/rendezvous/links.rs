//! Links between the servers of one mesh, for the relay across servers
//! (proto/control.md §14): two nodes connected to different servers relay
//! through both.
//!
//! Does I/O. Of two servers, the one whose name sorts first connects
//! ([`Links::reconcile`]), over QUIC on the other's public address with the
//! link ALPN, trusting the mesh's pinned certificate as a node does. The
//! accepting server speaks first (a `ServerHello`, as to a node); the
//! connecting one answers a [`LinkHello`] naming itself, with a proof of
//! holding the static key it announced in the store, bound to this
//! connection ([`admission`]). So each end knows the other is a running
//! server of the mesh. A link up is handed to the relay, which sends the
//! frames of nodes on the other server over it and takes the other
//! server's frames for nodes here from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::admission;
use super::stream::{write_frame, FrameReader};
use super::tls;
use crate::identity::{CertHash, PrivateKey, PublicKey};
use crate::relay::server::{Inlet, Relay};
use crate::relay::{ConnId, NodeId};
use crate::wire::control::{LinkHello, ServerHello, MAX_FRAME_UNADMITTED, PROTOCOL_VERSION};
use crate::wire::untrusted::Untrusted;

/// Setup of a link, either end: handshake, hellos.
const LINK_DEADLINE: Duration = Duration::from_secs(10);
/// Between attempts at a link that failed or ended.
const RETRY: Duration = Duration::from_secs(2);
/// Connection ids of links this server opens: far above those the accept
/// loop hands out, so the two never meet.
const FIRST_OUTGOING: u64 = 1 << 62;

/// A link coming up or going down, for the registry task.
#[derive(Debug)]
pub enum LinkEvent {
    Up { server: String, conn: ConnId },
    Down { server: String, conn: ConnId },
}

/// What both ends of a link need.
pub struct LinkContext {
    pub endpoint: quinn::Endpoint,
    pub pin: CertHash,
    pub name: String,
    pub mesh_id: String,
    pub server_key: PrivateKey,
    /// The running servers' keys, as the store says.
    pub keys: watch::Receiver<BTreeMap<String, PublicKey>>,
    pub events: mpsc::Sender<LinkEvent>,
    pub relay: Relay,
    next_conn: AtomicU64,
}

impl LinkContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        endpoint: quinn::Endpoint,
        pin: CertHash,
        name: String,
        mesh_id: String,
        server_key: PrivateKey,
        keys: watch::Receiver<BTreeMap<String, PublicKey>>,
        events: mpsc::Sender<LinkEvent>,
        relay: Relay,
    ) -> Self {
        Self {
            endpoint,
            pin,
            name,
            mesh_id,
            server_key,
            keys,
            events,
            relay,
            next_conn: AtomicU64::new(FIRST_OUTGOING),
        }
    }
}

/// The registry task's view of the links: which server each link reaches,
/// and the tasks that keep this server's outgoing ones up.
pub struct Links {
    ctx: Arc<LinkContext>,
    up: HashMap<String, ConnId>,
    connectors: HashMap<String, JoinHandle<()>>,
}

impl Links {
    pub fn new(ctx: Arc<LinkContext>) -> Self {
        Self {
            ctx,
            up: HashMap::new(),
            connectors: HashMap::new(),
        }
    }

    /// Keeps a connecting task for each of `targets` (name, address, key)
    /// and none for a server that is gone.
    pub fn reconcile(&mut self, targets: Vec<(String, String, PublicKey)>) {
        self.connectors.retain(|name, task| {
            let keep = targets.iter().any(|(n, _, _)| n == name);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, addr, key) in targets {
            if self.connectors.contains_key(&name) {
                continue;
            }
            tracing::info!(server = %name, %addr, "linking to another server of the mesh");
            let task = tokio::spawn(connect(self.ctx.clone(), name.clone(), addr, key));
            self.connectors.insert(name, task);
        }
    }

    /// A link came up or went down; `routes` are the nodes connected to
    /// other servers (relay id, server), re-routed over the link that is up.
    pub fn handle(&mut self, event: LinkEvent, routes: &[(std::net::Ipv4Addr, String)]) {
        let server = match event {
            LinkEvent::Up { server, conn } => {
                tracing::info!(%server, %conn, "link to another server up");
                self.up.insert(server.clone(), conn);
                server
            }
            LinkEvent::Down { server, conn } => {
                tracing::info!(%server, %conn, "link to another server down");
                if self.up.get(&server) == Some(&conn) {
                    self.up.remove(&server);
                }
                server
            }
        };
        for (ipv4, at) in routes {
            if *at == server {
                self.route(*ipv4, Some(at));
            }
        }
    }

    /// The node with relay id `ipv4` is connected to `server`.
    pub fn route(&self, ipv4: std::net::Ipv4Addr, server: Option<&str>) {
        let Some(node) = NodeId::of_overlay(ipv4) else {
            return;
        };
        let via = server.and_then(|s| self.up.get(s)).copied();
        self.ctx.relay.route(node, via);
    }

    /// Stops the connecting tasks (the links end with the endpoint).
    pub fn close(&mut self) {
        for (_, task) in self.connectors.drain() {
            task.abort();
        }
    }
}

/// Keeps a link to `server` up, as the first of the two.
async fn connect(ctx: Arc<LinkContext>, server: String, addr: String, key: PublicKey) {
    loop {
        match connect_once(&ctx, &server, &addr, &key).await {
            Ok(()) => tracing::debug!(%server, "link ended"),
            Err(e) => tracing::debug!(%server, error = %e, "link attempt failed"),
        }
        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=RETRY);
        tokio::time::sleep(RETRY / 2 + jitter / 2).await;
    }
}

async fn connect_once(
    ctx: &LinkContext,
    server: &str,
    addr: &str,
    key: &PublicKey,
) -> Result<(), String> {
    let setup = async {
        let address = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to no address"))?;
        let config = tls::link_client_config(ctx.pin).map_err(|e| e.to_string())?;
        let connection = ctx
            .endpoint
            .connect_with(config, address, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        let mut frames = FrameReader::new(recv, MAX_FRAME_UNADMITTED);
        let hello: ServerHello = frames.next().await.map_err(|e| e.to_string())?;
        if hello.server_key != *key || hello.mesh_id != ctx.mesh_id {
            return Err(format!(
                "{addr} is not server {server} of this mesh (another key or mesh)"
            ));
        }
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
            .map_err(|_| "TLS exporter unavailable".to_owned())?;
        let link_hello = LinkHello {
            version: PROTOCOL_VERSION,
            server: ctx.name.clone(),
            proof: admission::proof(&ctx.server_key, key, &exporter),
        };
        write_frame(&mut send, &link_hello)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((connection, send))
    };
    let (connection, _send) = tokio::time::timeout(LINK_DEADLINE, setup)
        .await
        .map_err(|_| format!("no link within {LINK_DEADLINE:?}"))??;
    let conn = ConnId(ctx.next_conn.fetch_add(1, Ordering::Relaxed));
    serve(ctx, server, conn, connection).await;
    Ok(())
}

/// The accepting end: `connection` came with the link ALPN. Becomes a link
/// once the other end proves it is a running server of the mesh; anything
/// else is closed.
pub async fn accept(ctx: Arc<LinkContext>, connection: quinn::Connection, conn: ConnId) {
    let setup = async {
        let (mut send, recv) = connection.open_bi().await.ok()?;
        let mut frames = FrameReader::new(recv, MAX_FRAME_UNADMITTED);
        let hello = ServerHello {
            version: PROTOCOL_VERSION,
            mesh_id: ctx.mesh_id.clone(),
            server_key: ctx.server_key.public_key(),
        };
        write_frame(&mut send, &hello).await.ok()?;
        let link_hello: LinkHello = frames.next().await.ok()?;
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
            .ok()?;
        let key = ctx.keys.borrow().get(&link_hello.server).copied();
        let proven = link_hello.version == PROTOCOL_VERSION
            && link_hello.server != ctx.name
            && key.is_some_and(|key| {
                admission::verify(&ctx.server_key, &key, &exporter, &link_hello.proof)
            });
        if !proven {
            tracing::info!(
                server = %Untrusted(&link_hello.server),
                remote = %connection.remote_address(),
                "link refused: not a running server of this mesh"
            );
            return None;
        }
        Some((link_hello.server, send))
    };
    match tokio::time::timeout(LINK_DEADLINE, setup).await {
        Ok(Some((server, _send))) => serve(&ctx, &server, conn, connection).await,
        _ => connection.close(0u32.into(), b"not a link"),
    }
}

/// A proven link: handed to the relay, and its frames pumped in, until it
/// ends.
async fn serve(ctx: &LinkContext, server: &str, conn: ConnId, connection: quinn::Connection) {
    let mut inlet = ctx.relay.link(conn, connection.clone());
    let up = LinkEvent::Up {
        server: server.to_owned(),
        conn,
    };
    if ctx.events.send(up).await.is_err() {
        return;
    }
    pump(&connection, &mut inlet).await;
    drop(inlet);
    let down = LinkEvent::Down {
        server: server.to_owned(),
        conn,
    };
    let _ = ctx.events.send(down).await;
    connection.close(0u32.into(), b"link ends");
}

/// Datagrams and relay streams from `connection` into the relay, until the
/// connection ends.
async fn pump(connection: &quinn::Connection, inlet: &mut Inlet) {
    loop {
        tokio::select! {
            datagram = connection.read_datagram() => match datagram {
                Ok(frame) => {
                    inlet.datagram(frame);
                    tokio::task::consume_budget().await;
                }
                Err(_) => return,
            },
            stream = connection.accept_uni() => match stream {
                Ok(mut stream) => {
                    let frames = inlet.streams();
                    tokio::spawn(async move {
                        while let Some(frame) = crate::relay::stream::read_stream_frame(&mut stream).await {
                            if !frames.frame(frame).await {
                                break;
                            }
                        }
                    });
                }
                Err(_) => return,
            },
        }
    }
}
