//! `meshd`: the node agent. Thin: arguments → config → [`meshd::dataplane::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "meshd", version, about = "WireGuard mesh node agent")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Bring up the mesh interface and run until SIGTERM/SIGINT.
    Run {
        /// Node configuration (TOML).
        #[arg(long, short, default_value = "/etc/meshd/meshd.toml")]
        config: PathBuf,
        /// Local API socket for meshctl (overrides `socket` in the config).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/meshd/meshd.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { config } => {
            meshd::config::Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Run { config, socket } => {
            let config = meshd::config::Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let options = meshd::dataplane::RunOptions { socket };
            runtime.block_on(meshd::dataplane::run(config, options, shutdown_signal()))?;
            Ok(())
        }
    }
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the only way out is SIGKILL; say so.
        tracing::warn!("cannot install signal handlers; stop meshd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
