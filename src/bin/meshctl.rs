//! `meshctl`: inspect and operate the local meshd. Thin: arguments → API
//! request (or key helper) → rendered output.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use meshd::control::{client, render, Request, Response};
use meshd::identity::PrivateKey;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect and operate the local meshd")]
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
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Genkey => {
            writeln!(out, "{}", PrivateKey::generate(&mut rand::rngs::OsRng).to_base64())?;
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
            Response::Peers { peers } if json => writeln!(out, "{}", serde_json::to_string_pretty(&peers)?)?,
            Response::Peers { peers } => write!(out, "{}", render::peers_table(&peers))?,
            other => unexpected(other)?,
        },
        Command::Ping { peer, count, json } => {
            let mut previous: Option<String> = None;
            let mut answered = 0;
            for i in 0..count {
                if i > 0 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                let reply = match client::request("meshd", &cli.socket, Request::Ping { peer: peer.clone() })? {
                    Response::Pong(reply) => reply,
                    other => return unexpected(other),
                };
                if json {
                    writeln!(out, "{}", serde_json::to_string(&reply)?)?;
                } else {
                    write!(out, "{}", render::ping_line(&reply, previous.as_deref()))?;
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
        Command::Netcheck { json } => match client::request("meshd", &cli.socket, Request::Netcheck)? {
            Response::Netcheck(n) if json => writeln!(out, "{}", serde_json::to_string_pretty(&n)?)?,
            Response::Netcheck(n) => write!(out, "{}", render::netcheck(&n))?,
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

fn unexpected(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Error { message } => bail!("meshd: {message}"),
        other => bail!("meshd sent an unexpected answer: {other:?}"),
    }
}
