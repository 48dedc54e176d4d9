//! The QUIC-loopback harness of tests/rendezvous.rs, tests/relay.rs and
//! tests/metrics.rs: a mesh in a temporary state directory, its rendezvous
//! served on ephemeral loopback ports, nodes with QUIC endpoints of their
//! own, and a control connection driven by hand. No root needed.
//!
//! Nothing here waits on time: every step waits for a message, and
//! [`DEADLINE`] only turns a hang into a failure. (tests/common is the
//! other harness: real binaries in network namespaces.)
//!
//! Each test binary compiles this module on its own and uses only part of it.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshd::identity::{PrivateKey, PublicKey};
use meshd::rendezvous::admin::{self, AdminRequest, AdminResponse, NodeStatusInfo, TokenInfo};
use meshd::rendezvous::admission;
use meshd::rendezvous::client::{self, ClientConfig, ClientError, Session, Update};
use meshd::rendezvous::server::{Server, ServerError};
use meshd::rendezvous::setup::{self, Layout};
use meshd::rendezvous::stream::{read_frame, write_frame};
use meshd::rendezvous::tls::{self, CertHash};
use meshd::wire::control::{
    Hello, MeshInfo, NodeEntry, Proof, ServerHello, ServerMessage, MAX_FRAME, MAX_FRAME_UNADMITTED,
    PROTOCOL_VERSION,
};
use meshd::wire::relay::{encode_frame, parse, NodeId, RelayHeader, RelayKind};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Hang protection for a whole test; no test should come near it.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// A token lifetime no test outlives.
pub const HOUR: u64 = 3600;
pub const LISTEN_PORT: u16 = 51820;
/// How often an unanswered relay frame is sent again ([`resend_until`]).
/// Only a lost datagram makes a second one necessary.
pub const RESEND: Duration = Duration::from_millis(50);

/// Fails the test instead of hanging it.
pub async fn within_deadline(test: impl Future<Output = ()>) {
    if tokio::time::timeout(DEADLINE, test).await.is_err() {
        panic!("the test did not finish within {DEADLINE:?}");
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A mesh in a temporary state directory, as `mesh-rendezvous init` makes it.
pub struct Mesh {
    dir: tempfile::TempDir,
    pub info: MeshInfo,
}

impl Mesh {
    pub fn init() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let info = setup::init(
            dir.path(),
            listen,
            "127.0.0.1:0",
            setup::default_cidr(),
            &mut rand::rngs::OsRng,
        )
        .expect("init a mesh");
        Self { dir, info }
    }

    /// As [`Mesh::init`], with metrics on an ephemeral loopback port.
    pub fn with_metrics() -> Self {
        let mesh = Self::init();
        mesh.append_config("metrics-address = \"127.0.0.1:0\"\n");
        mesh
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a `[relay]` table with these keys to `rendezvous.toml`.
    pub fn set_relay_limits(&self, keys: &str) {
        self.append_config(&format!("\n[relay]\n{keys}"));
    }

    fn append_config(&self, text: &str) {
        let path = Layout::new(self.path()).config();
        let mut config = std::fs::read_to_string(&path).expect("read rendezvous.toml");
        config.push_str(text);
        std::fs::write(&path, config).expect("write rendezvous.toml");
    }

    /// A join token, created on the stored state (no server running).
    pub fn token(&self, ttl_secs: u64, max_uses: Option<u32>) -> String {
        let request = AdminRequest::CreateToken {
            ttl_secs,
            max_uses,
            for_node: None,
        };
        match admin::apply_offline(self.path(), request, now_unix(), &mut rand::rngs::OsRng) {
            Ok(AdminResponse::Token { token, .. }) => token,
            other => panic!("creating a token: {other:?}"),
        }
    }

    pub fn revoke(&self, id: &str) {
        let request = AdminRequest::RevokeToken { id: id.to_owned() };
        match admin::apply_offline(self.path(), request, now_unix(), &mut rand::rngs::OsRng) {
            Ok(AdminResponse::Done { .. }) => {}
            other => panic!("revoking token {id}: {other:?}"),
        }
    }

    /// Loads the state directory and serves it on ephemeral ports.
    pub async fn serve(&self) -> Rendezvous {
        let loaded = setup::load(self.path()).expect("load the state directory");
        let pin = loaded.cert_hash();
        let server = Server::bind(loaded).await.expect("bind the rendezvous");
        let addr = server.local_addr().expect("the bound address");
        let metrics = server.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Rendezvous {
            addr,
            pin,
            metrics,
            layout: Layout::new(self.path()),
            stop,
            task,
        }
    }
}

/// A running rendezvous.
pub struct Rendezvous {
    pub addr: SocketAddr,
    pub pin: CertHash,
    metrics: Option<SocketAddr>,
    layout: Layout,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Rendezvous {
    pub fn client_config(&self, node: &Node, token: Option<&str>) -> ClientConfig {
        ClientConfig {
            servers: vec![self.addr.to_string()],
            pin: self.pin,
            name: node.name.clone(),
            listen_port: LISTEN_PORT,
            token: token.map(|t| t.parse().expect("a join token")),
            routes: Vec::new(),
        }
    }

    /// Where it serves metrics (a mesh made [`Mesh::with_metrics`]).
    pub fn metrics(&self) -> SocketAddr {
        self.metrics.expect("metrics are on")
    }

    /// One request through the running server's admin socket.
    pub async fn admin(&self, request: AdminRequest) -> AdminResponse {
        let socket = self.layout.admin_socket();
        tokio::task::spawn_blocking(move || {
            meshd::control::client::request::<_, AdminResponse>("mesh-rendezvous", &socket, request)
        })
        .await
        .expect("the admin request task")
        .expect("the admin socket answers")
    }

    /// Removes `node` (a key or a name) as the operator does, its address
    /// quarantined; the server must answer that it is done.
    pub async fn remove_node(&self, node: &str) {
        match self
            .admin(AdminRequest::RemoveNode {
                node: node.to_owned(),
                release: false,
            })
            .await
        {
            AdminResponse::Done { .. } => {}
            other => panic!("removing {node}: {other:?}"),
        }
    }

    pub async fn nodes(&self) -> Vec<NodeStatusInfo> {
        match self.admin(AdminRequest::ListNodes).await {
            AdminResponse::Nodes { nodes } => nodes,
            other => panic!("nodes list: {other:?}"),
        }
    }

    pub async fn tokens(&self) -> Vec<TokenInfo> {
        match self.admin(AdminRequest::ListTokens).await {
            AdminResponse::Tokens { tokens } => tokens,
            other => panic!("token list: {other:?}"),
        }
    }

    /// Shuts the server down and waits until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the rendezvous task panicked")
            .expect("the rendezvous stops cleanly");
    }
}

/// A simulated node: its key and its own UDP socket.
pub struct Node {
    pub name: String,
    pub key: PrivateKey,
    pub endpoint: quinn::Endpoint,
}

impl Node {
    pub fn new(name: &str) -> Self {
        Self::with_key(name, PrivateKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn with_key(name: &str, key: PrivateKey) -> Self {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address"))
            .expect("a client endpoint");
        Self {
            name: name.to_owned(),
            key,
            endpoint,
        }
    }

    /// A node whose socket is on `ip` (any of 127.0.0.0/8): to the
    /// rendezvous, a source of its own, with its own share of pending
    /// admissions.
    pub fn on(name: &str, ip: std::net::Ipv4Addr) -> Self {
        let endpoint =
            quinn::Endpoint::client(SocketAddr::from((ip, 0))).expect("a client endpoint");
        Self {
            name: name.to_owned(),
            key: PrivateKey::generate(&mut rand::rngs::OsRng),
            endpoint,
        }
    }

    /// The same node on a fresh socket.
    pub fn with_new_endpoint(&self) -> Self {
        Self::with_key(&self.name, self.key.clone())
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("the endpoint's address")
    }

    /// Admission with the library's client ([`client::admit`]). A token
    /// the client would not send (it is not a join token at all) goes in a
    /// hello written by hand, and the server's refusal comes back as the
    /// client's.
    pub async fn join(
        &self,
        rendezvous: &Rendezvous,
        token: Option<&str>,
    ) -> Result<(Session, Welcomed), ClientError> {
        if let Some(garbage) = token.filter(|t| t.parse::<meshd::identity::JoinToken>().is_err()) {
            let (_raw, answer) = RawConnection::admit(self, rendezvous, garbage).await;
            return match answer {
                ServerMessage::Rejected { reason, message } => Err(ClientError::Rejected {
                    server: rendezvous.addr.to_string(),
                    reason,
                    message,
                }),
                other => panic!("a hello with {garbage:?} answered {other:?}"),
            };
        }
        let config = rendezvous.client_config(self, token);
        let (session, update) =
            client::admit(&self.endpoint, &config, &self.key, Vec::new()).await?;
        Ok((session, welcomed(update)))
    }
}

/// The fields of an [`Update::Welcome`].
#[derive(Debug)]
pub struct Welcomed {
    pub node: NodeEntry,
    pub mesh: MeshInfo,
    pub observed: SocketAddr,
    pub peers: Vec<NodeEntry>,
}

pub fn welcomed(update: Update) -> Welcomed {
    match update {
        Update::Welcome {
            node,
            mesh,
            observed,
            peers,
            ..
        } => Welcomed {
            node,
            mesh,
            observed,
            peers,
        },
        other => panic!("admission should yield a welcome, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Relay frames between admitted members
// ---------------------------------------------------------------------------

/// An admitted node with its session, kept open (a dropped session reads
/// as the node leaving). Its relay id is its overlay IPv4 address
/// ([`NodeId::of_overlay`]).
pub struct Member {
    pub id: NodeId,
    pub node: Node,
    pub session: Session,
}

impl Member {
    pub async fn join(
        rendezvous: &Rendezvous,
        name: &str,
        token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let node = Node::new(name);
        let (session, welcome) = node.join(rendezvous, token).await?;
        Ok(Self {
            id: NodeId::of_overlay(welcome.node.ipv4).expect("an overlay address is a relay id"),
            node,
            session,
        })
    }

    /// [`Member::join`] with a token that must admit it.
    pub async fn admit(rendezvous: &Rendezvous, name: &str, token: &str) -> Self {
        Self::join(rendezvous, name, Some(token))
            .await
            .unwrap_or_else(|e| panic!("{name} is admitted: {e}"))
    }

    pub fn connection(&self) -> &quinn::Connection {
        self.session.connection()
    }

    /// One relay frame to `to`, as a datagram.
    pub fn send(&self, to: NodeId, payload: &[u8]) {
        self.send_raw(frame(to, payload));
    }

    /// Any bytes, as one datagram.
    pub fn send_raw(&self, datagram: Bytes) {
        self.connection()
            .send_datagram(datagram)
            .expect("the connection takes datagrams");
    }

    /// The next relay frame that arrives: its source and its payload.
    pub async fn receive(&self) -> (NodeId, Vec<u8>) {
        let datagram = self
            .connection()
            .read_datagram()
            .await
            .expect("the connection stays up");
        let (header, payload) =
            parse(&datagram).expect("the relay forwards only frames that parse");
        (header.node, payload.to_vec())
    }
}

/// A relay frame as a node writes it: addressed to `to`.
pub fn frame(to: NodeId, payload: &[u8]) -> Bytes {
    let mut out = Vec::new();
    encode_frame(
        RelayHeader {
            kind: RelayKind::Packet,
            node: to,
        },
        payload,
        &mut out,
    )
    .expect("a valid frame");
    out.into()
}

/// Has `from` send `frame` until `receiving` is done; returns its output.
/// Frames ride QUIC datagrams, which may be lost: the first send is at
/// once, later ones every [`RESEND`] until the receiver has what it waits
/// for.
pub async fn resend_until<T>(from: &Member, frame: Bytes, receiving: impl Future<Output = T>) -> T {
    tokio::pin!(receiving);
    let mut resend = tokio::time::interval(RESEND);
    loop {
        tokio::select! {
            received = &mut receiving => return received,
            _ = resend.tick() => from.send_raw(frame.clone()),
        }
    }
}

// ---------------------------------------------------------------------------
// The control protocol by hand
// ---------------------------------------------------------------------------

/// A hello as a node would send it, with whatever key and proof the test picks.
pub fn hello(public_key: PublicKey, proof: Proof, token: Option<&str>) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        public_key,
        name: "hand-written".into(),
        listen_port: LISTEN_PORT,
        token: token.map(str::to_owned),
        candidates: Vec::new(),
        proof,
        routes: Vec::new(),
        peers_digest: None,
    }
}

/// A control connection driven by hand, up to the point where the node
/// speaks: the server's hello has been read and the exporter value taken.
pub struct RawConnection {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub server_hello: ServerHello,
    pub exporter: [u8; 32],
}

impl RawConnection {
    pub async fn open(endpoint: &quinn::Endpoint, rendezvous: &Rendezvous) -> Self {
        let config = tls::client_config(rendezvous.pin).expect("a client configuration");
        Self::open_with(endpoint, rendezvous, config).await
    }

    /// [`RawConnection::open`] with a QUIC configuration of the test's own.
    pub async fn open_with(
        endpoint: &quinn::Endpoint,
        rendezvous: &Rendezvous,
        config: quinn::ClientConfig,
    ) -> Self {
        let connection = endpoint
            .connect_with(config, rendezvous.addr, tls::SERVER_NAME)
            .expect("connect")
            .await
            .expect("the QUIC handshake");
        // The rendezvous opens the control stream and speaks first.
        let (send, mut recv) = connection
            .accept_bi()
            .await
            .expect("the server's control stream");
        let server_hello: ServerHello = read_frame(&mut recv, MAX_FRAME_UNADMITTED)
            .await
            .expect("the server's hello");
        let mut exporter = [0u8; 32];
        connection
            .export_keying_material(&mut exporter, admission::EXPORTER_LABEL, &[])
            .expect("the TLS exporter");
        Self {
            connection,
            send,
            recv,
            server_hello,
            exporter,
        }
    }

    /// `node` proves its own key and joins with `token`, speaking the
    /// protocol by hand as any member may; returns the connection and the
    /// rendezvous's answer to the hello.
    pub async fn admit(node: &Node, rendezvous: &Rendezvous, token: &str) -> (Self, ServerMessage) {
        let mut raw = Self::open(&node.endpoint, rendezvous).await;
        let proof = admission::proof(&node.key, &raw.server_hello.server_key, &raw.exporter);
        raw.send_hello(&hello(node.public_key(), proof, Some(token)))
            .await;
        let answer = raw.answer().await;
        (raw, answer)
    }

    pub async fn send_hello(&mut self, hello: &Hello) {
        write_frame(&mut self.send, hello)
            .await
            .expect("send the hello");
    }

    pub async fn answer(&mut self) -> ServerMessage {
        read_frame(&mut self.recv, MAX_FRAME)
            .await
            .expect("the server's answer")
    }
}
