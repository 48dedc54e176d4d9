//! `meshd`: the node agent. Thin: arguments → config → [`meshd::dataplane::run`].

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{ArgGroup, Parser, Subcommand};
use meshd::cli::{init_logging, shutdown_signal, LogFormat, Stdout};
use meshd::config::{
    Config, DEFAULT_CONFIG_FILE, DEFAULT_INTERFACE, DEFAULT_LISTEN_PORT, DEFAULT_SOCKET,
};
use meshd::identity::CertHash;
use meshd::join::JoinOptions;
use meshd::paths::NodeDir;

const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";

#[derive(Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh node agent")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bring up the mesh interface and run until SIGTERM/SIGINT.
    Run {
        /// Node configuration (TOML).
        #[arg(long, short, conflicts_with = "state_dir")]
        config: Option<PathBuf>,
        /// A state directory written by `meshd join` (its meshd.toml).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Local API socket for meshctl (overrides `socket` in the config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9586
        /// (overrides `metrics-address` in the config).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Where to write MESH_IP=… while the interface is up (overrides
        /// `env-file` in the config).
        #[arg(long, value_name = "PATH")]
        env_file: Option<PathBuf>,
    },
    /// Enrol this node in a mesh: `meshd join HOST:PORT --token … --ca-hash sha256:…`.
    #[command(group(ArgGroup::new("token_source").required(true).args(["token", "token_file"])))]
    Join {
        /// The rendezvous, HOST:PORT.
        server: String,
        /// The join token. Every local user can read it in `ps` while join
        /// runs: prefer --token-file.
        #[arg(long)]
        token: Option<String>,
        /// Read the join token from FILE (its first line), or from standard
        /// input with `-`, so that it never appears on a command line.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// SHA-256 of the rendezvous certificate, from the join line.
        #[arg(long)]
        ca_hash: CertHash,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Name in the mesh (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = DEFAULT_LISTEN_PORT)]
        listen_port: u16,
        /// A public IP:PORT that reaches this node's UDP port (1:1 NAT, port forward).
        #[arg(long)]
        advertise_endpoint: Option<SocketAddr>,
        #[arg(long, default_value = DEFAULT_INTERFACE)]
        interface: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Prefixes behind this node (its pod CIDR) to ask the mesh to
        /// route here, comma-separated; the rendezvous decides
        /// (`meshctl routes` shows what it said).
        #[arg(long, value_name = "CIDR,…", value_delimiter = ',')]
        advertise_routes: Vec<ipnet::IpNet>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_FILE)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read our stdout has stopped: nothing left to say.
        Err(e) if e.chain().any(meshd::cli::reader_gone) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { config } => {
            Config::load(&config)?;
            writeln!(Stdout::lock(), "{}: ok", config.display())?;
        }
        Command::Join {
            server,
            token,
            token_file,
            ca_hash,
            state_dir,
            name,
            listen_port,
            advertise_endpoint,
            interface,
            socket,
            advertise_routes,
        } => {
            let token = match (token, token_file) {
                (Some(token), _) => token.parse().map_err(meshd::join::JoinError::Token)?,
                (None, Some(file)) => meshd::join::read_token(&file)?,
                (None, None) => anyhow::bail!(
                    "give the join token with --token-file FILE (or - for stdin) or --token"
                ),
            };
            let options = JoinOptions {
                server,
                token,
                ca_hash,
                state_dir,
                name,
                listen_port,
                advertise_endpoint,
                interface,
                socket,
                routes: advertise_routes,
            };
            let path = meshd::join::join(&options, &mut rand::rngs::OsRng)?;
            let mut out = Stdout::lock();
            writeln!(out, "enrolled: {} written", path.display())?;
            writeln!(
                out,
                "start the node with: meshd run --state-dir {}",
                options.state_dir.display()
            )?;
        }
        Command::Run {
            config,
            state_dir,
            socket,
            metrics,
            env_file,
        } => {
            let config = match (config, state_dir) {
                (Some(path), _) => Config::load(&path)?,
                (None, Some(dir)) => Config::load(&NodeDir::new(&dir).config())?,
                // A node enrolled with the defaults, else a hand-written config.
                (None, None) => Config::load_first(&[
                    NodeDir::new(Path::new(DEFAULT_STATE_DIR)).config(),
                    PathBuf::from(DEFAULT_CONFIG_FILE),
                ])?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let notify = meshd::systemd::NotifySocket::from_env();
            let options = meshd::dataplane::RunOptions {
                socket,
                metrics,
                env_file,
                notify,
            };
            let ended =
                runtime.block_on(meshd::dataplane::run(config, options, shutdown_signal()))?;
            if ended == meshd::dataplane::Ended::Restart {
                drop(runtime);
                // The same command again, as the same process (systemd's
                // main PID stays): it reads the port the node moved to.
                let mut args = std::env::args_os();
                let err = std::process::Command::new("/proc/self/exe")
                    .arg0(args.next().unwrap_or_else(|| "meshd".into()))
                    .args(args)
                    .exec();
                return Err(anyhow::Error::new(err).context("cannot start meshd again"));
            }
        }
    }
    Ok(())
}
