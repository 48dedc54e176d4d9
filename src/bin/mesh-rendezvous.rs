//! `mesh-rendezvous`: creates a mesh, admits nodes, hands out overlay
//! addresses and distributes the peer map. Thin: arguments → library.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use ipnet::{IpNet, Ipv4Net};
use meshd::cli::{reader_gone, Stdout};
use meshd::control::client::{self, ClientError};
use meshd::rendezvous::admin::{self, AdminRequest, AdminResponse};
use meshd::rendezvous::store::etcd::{EtcdConfig, EtcdTls};
use meshd::rendezvous::{paths, server, setup};

const DEFAULT_STATE_DIR: &str = "/var/lib/mesh-rendezvous";
/// Who holds the state directory's lock, as its lock file says.
const SERVER_HOLDER: &str = "a running mesh-rendezvous serve";
const OFFLINE_HOLDER: &str = "an offline mesh-rendezvous edit of registry.json";
/// How long `serve` waits for an offline edit to finish.
const OFFLINE_EDIT_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "mesh-rendezvous",
    version,
    about = "Admission, addresses and peer maps for a meshd mesh"
)]
struct Cli {
    /// Where the mesh's keys, certificate and registry live.
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a mesh: id, address plan, server key and certificate.
    Init {
        /// UDP address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// HOST:PORT nodes use to reach this server (printed in join lines).
        #[arg(long)]
        public_addr: String,
        /// IPv4 overlay prefix of the mesh (of a new one: a server added to
        /// a mesh in etcd takes the mesh's).
        #[arg(long, default_value = setup::DEFAULT_CIDR)]
        cidr: Ipv4Net,
        /// This server's name among the mesh's servers (a DNS label).
        #[arg(long)]
        server_name: Option<String>,
        /// Keep the mesh in etcd, shared by several servers: its client
        /// URLs, comma-separated (http://HOST:2379, or https:// with --etcd-ca).
        #[arg(long, value_delimiter = ',', requires = "key_prefix")]
        etcd_endpoints: Vec<String>,
        /// Where the mesh's keys live in etcd, one prefix per mesh
        /// (e.g. /meshd/prod/). The first server creates the mesh there;
        /// the next ones join it.
        #[arg(long, requires = "etcd_endpoints")]
        key_prefix: Option<String>,
        /// CA of etcd's server certificates (TLS to etcd).
        #[arg(long, requires = "etcd_endpoints")]
        etcd_ca: Option<PathBuf>,
        /// Client certificate and key, when etcd asks for one.
        #[arg(long, requires = "etcd_ca", requires = "etcd_key")]
        etcd_cert: Option<PathBuf>,
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// A server added to a mesh: the directory `mesh-rendezvous server
        /// add` wrote for it (its certificate, and the mesh's pinned one).
        #[arg(long, value_name = "DIR", requires = "etcd_endpoints")]
        certificate_from: Option<PathBuf>,
    },
    /// The mesh's servers.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Run the server until SIGTERM/SIGINT.
    Serve {
        /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9587
        /// (overrides `metrics-address` in rendezvous.toml).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registered nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Overlay addresses, and those of removed nodes held back from new ones.
    #[command(subcommand)]
    Addresses(AddressesCommand),
    /// Prefixes behind nodes (pod CIDRs): what each node advertises, and
    /// whether its peers route it.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// The mesh's paths at a glance: for every pair of nodes, direct over
    /// IPv4 or IPv6, relayed or down, with the RTT, as each side reports it
    /// (rows: from, columns: to), and the share of pairs that go direct.
    /// Each server has the reports of the nodes connected to it.
    Paths {
        /// The matrix as JSON.
        #[arg(long, conflicts_with = "dot")]
        json: bool,
        /// A Graphviz graph (`| dot -Tsvg > mesh.svg`): direct edges solid,
        /// relayed ones dashed and red.
        #[arg(long)]
        dot: bool,
    },
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// Every advertised prefix, whether it is routed, and why not.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Route PREFIX to NODE (by name or key) although it lies outside the
    /// routable ranges of rendezvous.toml; it still must not overlap an
    /// earlier prefix of another node.
    Approve { node: String, prefix: IpNet },
    /// Take back an approval: the prefix waits again.
    Unapprove { node: String, prefix: IpNet },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print the `meshd join` line that uses it.
    Create {
        /// How long it stays valid (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it (default: any number until it expires).
        #[arg(long, conflicts_with = "for_node")]
        uses: Option<u32>,
        /// For a rebuilt machine: one join by a new key that takes over this
        /// node (name or key): its name and overlay addresses; its old key
        /// is removed.
        #[arg(long = "for", value_name = "NODE")]
        for_node: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a node (by name or key): it leaves every peer map and can no longer connect.
    /// Its overlay addresses stay quarantined (given to no new node) until released.
    Remove {
        node: String,
        /// Free its addresses at once instead.
        #[arg(long)]
        release: bool,
    },
    /// Give a node (by name or key) another name: a DNS label no other node has.
    Rename { node: String, name: String },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// The mesh's running servers, where nodes reach them, and how many
    /// nodes each has.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Issue the certificate of a new server of this mesh (run where the
    /// mesh CA's key is), into DIR; copy DIR to the new server and run
    /// `mesh-rendezvous init --certificate-from DIR --etcd-endpoints … --key-prefix …` there.
    Add {
        /// The new server's name (a DNS label).
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AddressesCommand {
    /// Every overlay address held: by a node, or quarantined after its removal.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Hand a removed node's addresses (either one names both) back to the pool.
    Release {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        address: Option<IpAddr>,
        /// Release every quarantined address.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    meshd::cli::init_logging(meshd::cli::LogFormat::Text);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `… | head` had all it wanted: not a failure (cli::Stdout).
        Err(e) if e.chain().any(reader_gone) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-rendezvous: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli.state_dir.as_path();
    match cli.command {
        Command::Init {
            listen,
            public_addr,
            cidr,
            server_name,
            etcd_endpoints,
            key_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            certificate_from,
        } => {
            let store = key_prefix.map(|prefix| {
                let mut etcd = EtcdConfig::new(etcd_endpoints, prefix);
                etcd.tls = etcd_ca.map(|ca| EtcdTls {
                    ca,
                    cert: etcd_cert,
                    key: etcd_key,
                });
                etcd
            });
            if let Some(etcd) = &store {
                etcd.validate()?;
            }
            let options = setup::InitOptions {
                listen,
                public_addr,
                cidr,
                server_name,
                store: store.clone(),
                certificate_from,
            };
            let mut mesh = setup::init_with(dir, &options, &mut rand::rngs::OsRng)?;
            let mut created = true;
            if let Some(etcd) = &store {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                let claimed = runtime.block_on(setup::claim_mesh(etcd, &mesh));
                let (found, new) = match claimed {
                    Ok(found) => found,
                    Err(e) => {
                        // Not a mesh yet: `init` may be run again.
                        let _ = std::fs::remove_file(setup::Layout::new(dir).config());
                        return Err(e.into());
                    }
                };
                mesh = found;
                created = new;
            }
            let verb = if created { "created" } else { "joined" };
            let place = match &store {
                Some(etcd) => format!("etcd under {}", etcd.prefix),
                None => dir.display().to_string(),
            };
            writeln!(Stdout::lock(), "mesh {} {verb} in {place}", mesh.id)?;
            writeln!(Stdout::lock(), "  IPv4 {}  IPv6 {}", mesh.ipv4, mesh.ipv6)?;
            writeln!(Stdout::lock(), "next: mesh-rendezvous serve --state-dir {0}, then mesh-rendezvous token create --state-dir {0}", dir.display())?;
        }
        Command::Server(ServerCommand::List { json }) => {
            match admin_request(dir, AdminRequest::ListServers)? {
                AdminResponse::Servers { servers } if json => writeln!(
                    Stdout::lock(),
                    "{}",
                    serde_json::to_string_pretty(&servers)?
                )?,
                AdminResponse::Servers { servers } => {
                    writeln!(Stdout::lock(), "{:<20} {:<28} NODES", "SERVER", "ADDRESS")?;
                    for s in servers {
                        writeln!(
                            Stdout::lock(),
                            "{:<20} {:<28} {}",
                            s.name,
                            s.public_addr,
                            s.nodes
                        )?;
                    }
                }
                other => unexpected(other)?,
            }
        }
        Command::Server(ServerCommand::Add { name, out }) => {
            let pin = setup::add_server(dir, &name, &out)?;
            writeln!(
                Stdout::lock(),
                "server {name}: certificate in {} (the join lines' pin stays {pin})",
                out.display()
            )?;
            writeln!(
                Stdout::lock(),
                "next, on {name}: mesh-rendezvous init --certificate-from DIR --server-name {name} \
                 --etcd-endpoints … --key-prefix … --listen … --public-addr …, then serve"
            )?;
        }
        Command::Serve { metrics } => {
            // Held until the process ends: no other server and no offline
            // edit writes registry.json meanwhile.
            let _lock = lock_for_serve(dir)?;
            let mut loaded = setup::load(dir)?;
            if metrics.is_some() {
                loaded.config.metrics_address = metrics;
            }
            writeln!(
                Stdout::lock(),
                "join lines pin this certificate: {}",
                loaded.cert_hash()
            )?;
            setup::return_large_buffers_at_once();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(server::serve(loaded, meshd::cli::shutdown_signal()))?;
        }
        Command::Token(TokenCommand::Create {
            ttl,
            uses,
            for_node,
        }) => {
            let request = AdminRequest::CreateToken {
                ttl_secs: ttl.as_secs(),
                max_uses: uses,
                for_node,
            };
            match admin_request(dir, request)? {
                AdminResponse::Token { token, servers, .. } => {
                    let loaded = setup::load(dir)?;
                    let servers = if servers.is_empty() {
                        loaded.config.public_addr.clone()
                    } else {
                        servers.join(",")
                    };
                    writeln!(
                        Stdout::lock(),
                        "meshd join {servers} --token {token} --ca-hash {}",
                        loaded.cert_hash()
                    )?;
                }
                other => unexpected(other)?,
            }
        }
        Command::Token(TokenCommand::List { json }) => {
            match admin_request(dir, AdminRequest::ListTokens)? {
                AdminResponse::Tokens { tokens } if json => {
                    writeln!(Stdout::lock(), "{}", serde_json::to_string_pretty(&tokens)?)?
                }
                AdminResponse::Tokens { tokens } => {
                    writeln!(
                        Stdout::lock(),
                        "{:<10} {:<10} {:<6} {:<22} CREATED",
                        "ID",
                        "STATUS",
                        "USES",
                        "EXPIRES"
                    )?;
                    for t in tokens {
                        let uses = match t.max_uses {
                            Some(max) => format!("{}/{max}", t.uses),
                            None => t.uses.to_string(),
                        };
                        writeln!(
                            Stdout::lock(),
                            "{:<10} {:<10} {:<6} {:<22} {}",
                            t.id,
                            t.status,
                            uses,
                            time(t.expires_at),
                            time(t.created_at)
                        )?;
                    }
                }
                other => unexpected(other)?,
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            match admin_request(dir, AdminRequest::RevokeToken { id })? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
        Command::Nodes(NodesCommand::List { json }) => {
            match admin_request(dir, AdminRequest::ListNodes)? {
                AdminResponse::Nodes { nodes } if json => {
                    writeln!(Stdout::lock(), "{}", serde_json::to_string_pretty(&nodes)?)?
                }
                AdminResponse::Nodes { nodes } => {
                    // Several servers: which one each node is on.
                    let several = nodes
                        .iter()
                        .filter_map(|n| n.server.as_deref())
                        .any(|s| s != meshd::rendezvous::registry::DEFAULT_SERVER_NAME);
                    writeln!(
                        Stdout::lock(),
                        "{:<20} {:<15} {:<8} {:<10} LAST SEEN",
                        "NAME",
                        "IPV4",
                        if several { "SERVER" } else { "ONLINE" },
                        "KEY"
                    )?;
                    for n in nodes {
                        let key = meshd::identity::short_key(&n.public_key);
                        let online = match (&n.server, n.online) {
                            (Some(server), true) if several => server.as_str(),
                            (_, true) => "yes",
                            (_, false) => "no",
                        };
                        writeln!(
                            Stdout::lock(),
                            "{:<20} {:<15} {:<8} {:<10} {}",
                            n.name,
                            n.ipv4,
                            online,
                            key,
                            time(n.last_seen)
                        )?;
                    }
                }
                other => unexpected(other)?,
            }
        }
        Command::Nodes(NodesCommand::Remove { node, release }) => {
            match admin_request(dir, AdminRequest::RemoveNode { node, release })? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
        Command::Nodes(NodesCommand::Rename { node, name }) => {
            match admin_request(dir, AdminRequest::RenameNode { node, name })? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
        Command::Addresses(AddressesCommand::List { json }) => {
            match admin_request(dir, AdminRequest::ListAddresses)? {
                AdminResponse::Addresses { addresses } if json => writeln!(
                    Stdout::lock(),
                    "{}",
                    serde_json::to_string_pretty(&addresses)?
                )?,
                AdminResponse::Addresses { addresses } => {
                    writeln!(
                        Stdout::lock(),
                        "{:<15} {:<40} {:<12} {:<20} REMOVED",
                        "IPV4",
                        "IPV6",
                        "STATUS",
                        "NODE"
                    )?;
                    for a in addresses {
                        let removed = a.removed_at.map_or_else(|| "-".to_owned(), time);
                        writeln!(
                            Stdout::lock(),
                            "{:<15} {:<40} {:<12} {:<20} {removed}",
                            a.ipv4,
                            a.ipv6,
                            a.status,
                            a.name
                        )?;
                    }
                }
                other => unexpected(other)?,
            }
        }
        Command::Routes(RoutesCommand::List { json }) => {
            match admin_request(dir, AdminRequest::ListRoutes)? {
                AdminResponse::Routes { nodes } if json => {
                    writeln!(Stdout::lock(), "{}", serde_json::to_string_pretty(&nodes)?)?
                }
                AdminResponse::Routes { nodes } => {
                    let mut out = Stdout::lock();
                    writeln!(
                        out,
                        "{:<20} {:<24} {:<20} STATUS",
                        "NODE", "PREFIX", "SINCE"
                    )?;
                    for node in nodes {
                        for route in &node.routes {
                            writeln!(
                                out,
                                "{:<20} {:<24} {:<20} {}",
                                node.name,
                                route.decision.prefix.to_string(),
                                time(route.since),
                                route.decision.status.describe()
                            )?;
                        }
                        for approved in node
                            .approved
                            .iter()
                            .filter(|p| !node.routes.iter().any(|r| r.decision.prefix == **p))
                        {
                            writeln!(
                                out,
                                "{:<20} {:<24} {:<20} approved, not advertised",
                                node.name,
                                approved.to_string(),
                                "-"
                            )?;
                        }
                    }
                }
                other => unexpected(other)?,
            }
        }
        Command::Paths { json, dot } => match admin_request(dir, AdminRequest::ListPaths)? {
            AdminResponse::Paths { matrix } if json => {
                writeln!(Stdout::lock(), "{}", serde_json::to_string_pretty(&matrix)?)?
            }
            AdminResponse::Paths { matrix } if dot => {
                write!(Stdout::lock(), "{}", paths::render_dot(&matrix))?
            }
            AdminResponse::Paths { matrix } => {
                write!(Stdout::lock(), "{}", paths::render_table(&matrix))?
            }
            other => unexpected(other)?,
        },
        Command::Routes(RoutesCommand::Approve { node, prefix }) => {
            let request = AdminRequest::ApproveRoute {
                node,
                prefix,
                withdraw: false,
            };
            match admin_request(dir, request)? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
        Command::Routes(RoutesCommand::Unapprove { node, prefix }) => {
            let request = AdminRequest::ApproveRoute {
                node,
                prefix,
                withdraw: true,
            };
            match admin_request(dir, request)? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
        Command::Addresses(AddressesCommand::Release { address, all: _ }) => {
            match admin_request(dir, AdminRequest::ReleaseAddresses { address })? {
                AdminResponse::Done { message } => writeln!(Stdout::lock(), "{message}")?,
                other => unexpected(other)?,
            }
        }
    }
    Ok(())
}

/// The state directory's lock for `serve`: refused at once while another
/// server holds it, waited for while anything else does (an offline edit,
/// or a command that has taken the lock and not yet written who it is).
fn lock_for_serve(dir: &Path) -> anyhow::Result<setup::StateLock> {
    let end = std::time::Instant::now() + OFFLINE_EDIT_PATIENCE;
    loop {
        match setup::lock(dir, SERVER_HOLDER) {
            Err(setup::SetupError::Locked { holder, .. })
                if !holder.starts_with(SERVER_HOLDER) && std::time::Instant::now() < end =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(setup::SetupError::Locked { holder, .. }) => bail!(
                "{} is in use by {holder}: stop that first, or give this server its own --state-dir",
                dir.display()
            ),
            other => return Ok(other?),
        }
    }
}

/// Asks the running server, or edits the stored state when none runs. The
/// offline edit holds the state directory's lock, and refuses while a
/// server holds it (a server whose admin socket is gone or does not answer):
/// editing registry.json under a running server would be lost or undo its
/// changes.
fn admin_request(dir: &Path, request: AdminRequest) -> anyhow::Result<AdminResponse> {
    let socket = setup::Layout::new(dir).admin_socket();
    match client::request("mesh-rendezvous", &socket, request.clone()) {
        Ok(response) => Ok(response),
        Err(unreachable @ (ClientError::NotRunning { .. } | ClientError::Refused { .. })) => {
            let _lock = match setup::lock(dir, OFFLINE_HOLDER) {
                Ok(lock) => Some(lock),
                // Let the offline edit say so, as before.
                Err(setup::SetupError::NotInitialised { .. }) => None,
                Err(setup::SetupError::Locked { holder, .. }) => bail!(
                    "{} is in use by {holder}, but its admin socket does not answer ({unreachable}); \
                     registry.json is not edited under a running server: restart it (systemctl restart \
                     mesh-rendezvous) and try again",
                    dir.display()
                ),
                Err(other) => return Err(other.into()),
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            Ok(admin::apply_offline(
                dir,
                request,
                now,
                &mut rand::rngs::OsRng,
            )?)
        }
        Err(e) => Err(e.into()),
    }
}

fn unexpected(response: AdminResponse) -> anyhow::Result<()> {
    match response {
        AdminResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

fn time(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
