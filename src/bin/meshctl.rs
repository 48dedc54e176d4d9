//! `meshctl`: inspect and operate the local meshd. Thin: arguments → API
//! request (or key helper) → rendered output.
//!
//! A reader that stops early (`meshctl peers | head -1`) ends meshctl
//! quietly with status 0 ([`meshd::cli::Stdout`]).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use meshd::config::DEFAULT_ENV_FILE;
use meshd::control::{client, render, PeerInfo, Request, Response, StatusInfo};
use meshd::identity::PrivateKey;
use meshd::kube::env::MeshEnv;
use meshd::kube::generate::{
    self as kube, CalicoInstall, CalicoOptions, Encapsulation, FlannelBackend, KubeadmOptions,
    Mesh, Overrides, Stack,
};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect and operate the local meshd"
)]
struct Cli {
    /// meshd's local API socket.
    #[arg(long, global = true, env = "MESHD_SOCKET", default_value = meshd::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List peers with endpoint, last handshake and traffic.
    Peers {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show this node.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Probe a peer (name, overlay address or start of its key) and show
    /// the path each answer took and its round-trip time.
    Ping {
        peer: String,
        /// Number of probes.
        #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
        /// One JSON object per answer.
        #[arg(long)]
        json: bool,
    },
    /// Check UDP reachability of the rendezvous and this node's NAT behaviour.
    Netcheck {
        #[arg(long)]
        json: bool,
    },
    /// Prefixes behind nodes (pod CIDRs): this node's, with what the mesh
    /// decided on each, and those routed to each peer.
    Routes {
        #[arg(long)]
        json: bool,
    },
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Kubernetes on the overlay addresses: print settings for kubelet,
    /// flannel, calico, kubeadm or kubespray, or check a Node against the mesh.
    Kube(KubeArgs),
}

#[derive(clap::Args)]
struct KubeArgs {
    /// Read this node from FILE (`meshctl status --json`; `-` for stdin)
    /// instead of asking meshd.
    #[arg(long, global = true, value_name = "FILE")]
    status_json: Option<PathBuf>,
    /// Read the peers from FILE (`meshctl peers --json`); with
    /// --status-json and without this, the mesh is this node alone.
    #[arg(long, global = true, value_name = "FILE")]
    peers_json: Option<PathBuf>,
    /// This node's Kubernetes name, when it is not its mesh name.
    #[arg(long, global = true)]
    node_name: Option<String>,
    /// mesh0's MTU [default: the MTU meshd reports; from an older meshd that
    /// reports none, MESH_MTU in its env file, else 1380].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(576..))]
    mtu: Option<u16>,
    /// meshd's env file, read for the MTU when an older meshd does not
    /// report it.
    #[arg(long, global = true, value_name = "FILE", default_value = DEFAULT_ENV_FILE)]
    env_file: PathBuf,
    /// Dual stack: the overlay IPv6 address too, after the IPv4.
    #[arg(long, global = true)]
    dual_stack: bool,
    #[command(subcommand)]
    command: KubeCommand,
}

#[derive(Subcommand)]
enum KubeCommand {
    /// systemd drop-in: kubelet after meshd, with --node-ip on the overlay address.
    KubeletDropin {
        /// kubelet's path in the ExecStart= line.
        #[arg(long, default_value = "/usr/bin/kubelet")]
        kubelet: String,
    },
    /// Patch for the kube-flannel DaemonSet: --iface=mesh0 (MTU follows
    /// mesh0); with --backend host-gw, net-conf.json too.
    Flannel {
        /// vxlan: VXLAN inside mesh0; host-gw: pod subnets routed natively
        /// over mesh0 (meshd learns flannel's routes).
        #[arg(long, value_enum, default_value_t = FlannelBackendArg::Vxlan)]
        backend: FlannelBackendArg,
        /// The cluster's pod network, net-conf.json's Network (with
        /// --dual-stack, repeat for IPv6Network) [default: 10.244.0.0/16].
        /// host-gw only.
        #[arg(long = "pod-cidr", value_name = "CIDR")]
        pod_cidrs: Vec<IpNet>,
    },
    /// calico on mesh0 with its MTU: the operator's Installation, or --manifest.
    Calico {
        /// A patch of a manifest install's calico-node DaemonSet instead.
        #[arg(long)]
        manifest: bool,
        /// Between nodes over mesh0; never CrossSubnet.
        #[arg(long, value_enum, default_value_t = EncapsulationArg::Vxlan)]
        encapsulation: EncapsulationArg,
        /// No IPIP or VXLAN, BGP off: this node's pods in an IP pool of its
        /// own (--node-pod-cidr), advertised to the mesh by meshd.
        #[arg(long, conflicts_with = "encapsulation", requires = "node_pod_cidrs")]
        no_encapsulation: bool,
        /// IP pool CIDR (repeat for dual stack); with --no-encapsulation,
        /// the cluster's pod network the node's pool lies in.
        #[arg(
            long = "pod-cidr",
            value_name = "CIDR",
            default_value = "192.168.0.0/16"
        )]
        pod_cidrs: Vec<IpNet>,
        /// This node's pod CIDR: its IP pool and the prefix it advertises
        /// (repeat for dual stack). --no-encapsulation only.
        #[arg(
            long = "node-pod-cidr",
            value_name = "CIDR",
            requires = "no_encapsulation"
        )]
        node_pod_cidrs: Vec<IpNet>,
    },
    /// kubeadm init config: API server, kubelet and etcd on the overlay address.
    Kubeadm {
        /// HOST[:PORT] shared by all control-plane nodes (for HA later).
        #[arg(long)]
        control_plane_endpoint: Option<String>,
        /// networking.podSubnet (repeat for dual stack).
        #[arg(
            long = "pod-cidr",
            value_name = "CIDR",
            default_value = "10.244.0.0/16"
        )]
        pod_cidrs: Vec<IpNet>,
    },
    /// kubespray hosts.yml for the whole mesh.
    KubesprayInventory {
        /// Control-plane and etcd nodes [default: this node].
        #[arg(long, value_name = "NAME", num_args = 1..)]
        control_plane: Vec<String>,
    },
    /// Compare the Node's InternalIP and flannel/calico annotations with the
    /// overlay address; print a fix for each mismatch, fail if any.
    Check {
        /// Read the Node from FILE (`kubectl get node NAME -o json`; `-` for
        /// stdin) [default: run kubectl].
        #[arg(long, value_name = "FILE")]
        node_json: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FlannelBackendArg {
    Vxlan,
    HostGw,
}

#[derive(Clone, Copy, ValueEnum)]
enum EncapsulationArg {
    Vxlan,
    Ipip,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.chain().any(meshd::cli::reader_gone) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = meshd::cli::Stdout::lock();
    match cli.command {
        Command::Kube(args) => kube_command(&cli.socket, args, &mut out)?,
        Command::Genkey => {
            writeln!(
                out,
                "{}",
                PrivateKey::generate(&mut rand::rngs::OsRng).to_base64()
            )?;
        }
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("reading the private key from stdin")?;
            let key: PrivateKey = text.trim().parse().context("stdin is not a private key")?;
            writeln!(out, "{}", key.public_key())?;
        }
        Command::Peers { json } => match client::request("meshd", &cli.socket, Request::Peers)? {
            Response::Peers { peers } if json => {
                writeln!(out, "{}", serde_json::to_string_pretty(&peers)?)?
            }
            Response::Peers { peers } => write!(out, "{}", render::peers_table(&peers))?,
            other => unexpected(other)?,
        },
        Command::Ping { peer, count, json } => {
            let mut previous = None;
            let mut answered = 0;
            for i in 0..count {
                if i > 0 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                let reply = match client::request(
                    "meshd",
                    &cli.socket,
                    Request::Ping { peer: peer.clone() },
                )? {
                    Response::Pong(reply) => reply,
                    other => return unexpected(other),
                };
                if json {
                    writeln!(out, "{}", serde_json::to_string(&reply)?)?;
                } else {
                    write!(out, "{}", render::ping_line(&reply, previous))?;
                }
                out.flush()?;
                if reply.path.is_some() {
                    answered += 1;
                    previous = reply.path;
                }
            }
            if answered == 0 {
                bail!("no answer from {peer} to {count} probe(s)");
            }
        }
        Command::Netcheck { json } => {
            match client::request("meshd", &cli.socket, Request::Netcheck)? {
                Response::Netcheck(n) if json => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&n)?)?
                }
                Response::Netcheck(n) => write!(out, "{}", render::netcheck(&n))?,
                other => unexpected(other)?,
            }
        }
        Command::Routes { json } => match client::request("meshd", &cli.socket, Request::Routes)? {
            Response::Routes(r) if json => writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?,
            Response::Routes(r) => write!(out, "{}", render::routes(&r))?,
            Response::Error { message } if message.starts_with("unknown request") => bail!(
                "meshd: {message}\nthis meshd is older than meshctl and does not route prefixes; upgrade it"
            ),
            other => unexpected(other)?,
        },
        Command::Status { json } => match client::request("meshd", &cli.socket, Request::Status)? {
            Response::Status(s) if json => writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?,
            Response::Status(s) => write!(out, "{}", render::status(&s))?,
            other => unexpected(other)?,
        },
    }
    Ok(())
}

/// A bound on the files `meshctl kube` reads, checked before reading on.
const MAX_INPUT: u64 = 16 << 20;

/// FILE's text, or stdin's for `-`.
fn read_input(path: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_INPUT + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_INPUT + 1).read_to_string(&mut text))
    };
    read.with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_INPUT {
        bail!("{} is longer than {MAX_INPUT} bytes", path.display());
    }
    Ok(text)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<T> {
    let text = read_input(path)?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not `{what}` output", path.display()))
}

/// The mesh from files, or from meshd.
fn kube_mesh(socket: &std::path::Path, args: &KubeArgs, with_peers: bool) -> anyhow::Result<Mesh> {
    let mut overrides = Overrides {
        node_name: args.node_name.clone(),
        mtu: args.mtu,
        fallback_mtu: None,
    };
    let (status, peers): (StatusInfo, Vec<PeerInfo>) = match &args.status_json {
        Some(file) => {
            let peers = match &args.peers_json {
                Some(p) => parse_json(p, "meshctl peers --json")?,
                None => Vec::new(),
            };
            (parse_json(file, "meshctl status --json")?, peers)
        }
        None => {
            let status = match client::request("meshd", socket, Request::Status)? {
                Response::Status(s) => *s,
                other => return Err(unexpected_answer(other)),
            };
            let peers = match &args.peers_json {
                Some(p) => parse_json(p, "meshctl peers --json")?,
                None if with_peers => match client::request("meshd", socket, Request::Peers)? {
                    Response::Peers { peers } => peers,
                    other => return Err(unexpected_answer(other)),
                },
                None => Vec::new(),
            };
            // meshd reports mesh0's MTU; one older than the `mtu` field
            // reports 0, and its env file may still say.
            if overrides.mtu.is_none() && status.mtu == 0 {
                overrides.fallback_mtu = std::fs::read_to_string(&args.env_file)
                    .ok()
                    .and_then(|text| MeshEnv::parse(&text).ok())
                    .map(|env| env.mtu);
            }
            (status, peers)
        }
    };
    Ok(Mesh::from_api(&status, &peers, &overrides)?)
}

/// The Node as `kubectl get node NAME -o json` prints it.
fn kubectl_node(name: &str) -> anyhow::Result<String> {
    let output = match std::process::Command::new("kubectl")
        .args(["get", "node", name, "-o", "json"])
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("kubectl is not on PATH: pass --node-json FILE (from `kubectl get node {name} -o json`)")
        }
        Err(e) => bail!("running kubectl: {e}"),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        bail!(
            "kubectl get node {name}: {}",
            stderr.lines().next().unwrap_or("failed").trim()
        );
    }
    String::from_utf8(output.stdout).context("kubectl printed something that is not UTF-8")
}

fn kube_command(
    socket: &std::path::Path,
    args: KubeArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let with_peers = matches!(args.command, KubeCommand::KubesprayInventory { .. });
    let mesh = kube_mesh(socket, &args, with_peers)?;
    let stack = if args.dual_stack {
        Stack::Dual
    } else {
        Stack::Ipv4
    };
    let local = &mesh.local;
    match args.command {
        KubeCommand::KubeletDropin { kubelet } => {
            write!(out, "{}", kube::kubelet_dropin(local, stack, &kubelet)?)?
        }
        KubeCommand::Flannel { backend, pod_cidrs } => {
            let backend = match backend {
                FlannelBackendArg::Vxlan if !pod_cidrs.is_empty() => {
                    bail!(
                        "--pod-cidr is for --backend host-gw: VXLAN needs no net-conf.json change"
                    )
                }
                FlannelBackendArg::Vxlan => FlannelBackend::Vxlan,
                FlannelBackendArg::HostGw if pod_cidrs.is_empty() => FlannelBackend::HostGw {
                    pod_cidrs: vec!["10.244.0.0/16".parse()?],
                },
                FlannelBackendArg::HostGw => FlannelBackend::HostGw { pod_cidrs },
            };
            write!(out, "{}", kube::flannel(local, stack, &backend)?)?
        }
        KubeCommand::Calico {
            manifest,
            encapsulation,
            no_encapsulation,
            pod_cidrs,
            node_pod_cidrs,
        } => {
            let options = CalicoOptions {
                install: if manifest {
                    CalicoInstall::Manifest
                } else {
                    CalicoInstall::Operator
                },
                encapsulation: match encapsulation {
                    _ if no_encapsulation => Encapsulation::None,
                    EncapsulationArg::Vxlan => Encapsulation::Vxlan,
                    EncapsulationArg::Ipip => Encapsulation::Ipip,
                },
                pod_cidrs,
                node_pod_cidrs,
            };
            write!(out, "{}", kube::calico(local, stack, &options)?)?;
        }
        KubeCommand::Kubeadm {
            control_plane_endpoint,
            pod_cidrs,
        } => {
            let options = KubeadmOptions {
                control_plane_endpoint,
                pod_cidrs,
            };
            write!(out, "{}", kube::kubeadm(local, stack, &options)?)?;
        }
        KubeCommand::KubesprayInventory { control_plane } => {
            let inventory = kube::kubespray_inventory(&mesh, stack, &control_plane)?;
            write!(out, "{}", inventory.yaml)?;
            for note in &inventory.notes {
                eprintln!("meshctl: note: {note}");
            }
        }
        KubeCommand::Check { node_json } => {
            let (text, origin) = match &node_json {
                Some(path) if path.as_os_str() == "-" => (read_input(path)?, "stdin".to_owned()),
                Some(path) => (read_input(path)?, path.display().to_string()),
                None => (kubectl_node(&local.node.name)?, "kubectl".to_owned()),
            };
            let node = kube::parse_node(&text, &origin)?;
            let findings = kube::check(&node, &origin, local, stack)?;
            write!(out, "{}", kube::render_check(&node.name, &findings))?;
            out.flush()?;
            let n = kube::mismatches(&findings);
            if n > 0 {
                bail!("{n} mismatch(es) between Kubernetes and the mesh: run the fixes above");
            }
        }
    }
    Ok(())
}

fn unexpected(response: Response) -> anyhow::Result<()> {
    Err(unexpected_answer(response))
}

fn unexpected_answer(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message } => anyhow::anyhow!("meshd: {message}"),
        other => anyhow::anyhow!("meshd sent an unexpected answer: {other:?}"),
    }
}
