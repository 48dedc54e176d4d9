//! `meshd.toml` → validated [`Config`].
//!
//! Pure apart from [`Config::load`] and [`Config::load_first`], which read
//! the file. The vocabulary is
//! wg-quick's, in kebab-case; unknown keys are rejected with the file, the
//! line and the key, so a typo never silently falls back to a default.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::engine::PeerSpec;
use crate::identity::CertHash;
use crate::identity::PublicKey;
use crate::wire::control::MAX_ROUTES;

pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_INTERFACE: &str = "mesh0";
/// Fits a full inner packet into one 1500-byte underlay datagram over IPv6
/// (40) + UDP (8) + WireGuard (32) with room for the relay header: DESIGN.md "MTU".
pub const DEFAULT_MTU: u16 = 1380;
pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";
/// A hand-written config; `meshd join` writes one into its state directory.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/meshd/meshd.toml";
/// Where meshd writes its environment file (`kube::env`) while
/// the mesh interface is up, unless `env-file` says otherwise.
pub const DEFAULT_ENV_FILE: &str = "/run/meshd/env";
/// Where wg(8) looks for userspace WireGuard interfaces' UAPI sockets
/// (<https://www.wireguard.com/xplatform/>).
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// IPv6 needs 1280 on every link (RFC 8200 §5); below that the mesh cannot carry it.
pub const MIN_MTU: u16 = 1280;
pub const MAX_MTU: u16 = 9000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is the source, not in the message: `{:#}` prints it once.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no config file: looked for {}; enrol this node with `meshd join HOST:PORT --token-file \
         FILE --ca-hash sha256:…` (it writes one into its state directory), or pass --config FILE",
        list(looked)
    )]
    NotFound { looked: Vec<PathBuf> },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    pub interface: String,
    /// Overlay addresses with the mesh prefix length (`100.72.0.1/16`).
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
    /// The local API socket `meshctl` talks to.
    pub socket: PathBuf,
    /// A group whose members may use the API socket too (mode 0660); only
    /// root when absent (mode 0600).
    pub socket_group: Option<String>,
    /// The directory of the WireGuard UAPI socket `<interface>.sock` that
    /// `wg show` reads; only tests move it away from [`DEFAULT_UAPI_DIR`].
    pub uapi_dir: PathBuf,
    /// The environment file (`MESH_IP=`…) written while the interface is
    /// up, for kubelet's `EnvironmentFile=`: `kube::env`.
    pub env_file: PathBuf,
    /// Static peers; a keepalive of 0 is stored as `None` (off), as in wg-quick.
    pub peers: Vec<PeerSpec>,
    /// Where a rendezvous-managed node keeps its cache (address, peer map).
    pub state_dir: Option<PathBuf>,
    /// The node's name in the mesh (default: the hostname).
    pub name: Option<String>,
    /// A public address that reaches this node's UDP port (the 1:1 NAT case).
    pub advertise_endpoint: Option<SocketAddr>,
    /// Whether a rendezvous-managed node maps its UDP port on its gateway
    /// (PCP, NAT-PMP, UPnP IGD; `port-mapping = false` turns it off, for a
    /// network whose owner forbids it or a gateway that misbehaves).
    pub port_mapping: bool,
    /// Where Prometheus metrics are served over HTTP (`GET /metrics`), e.g.
    /// `127.0.0.1:9586`; off when absent.
    pub metrics_address: Option<SocketAddr>,
    pub rendezvous: Option<RendezvousConfig>,
    /// Prefixes behind this node (its pod CIDR) that it asks the mesh to
    /// route to it: network addresses, no default route, at most
    /// [`MAX_ROUTES`], each once. Needs a `[rendezvous]`, which decides.
    pub routes: Vec<IpNet>,
    /// flannel's `subnet.env` (`/run/flannel/subnet.env`): its
    /// `FLANNEL_SUBNET` and `FLANNEL_IPV6_SUBNET` are advertised beside
    /// `routes`, followed as flannel writes and rewrites the file. Needs a
    /// `[rendezvous]`.
    pub advertise_flannel_subnet: Option<PathBuf>,
}

/// `[rendezvous]`: the mesh server this node joined.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RendezvousConfig {
    /// `HOST:PORT` of the mesh's servers, comma-separated, resolved at
    /// every connection attempt.
    pub address: String,
    /// SHA-256 of the rendezvous certificate (`sha256:<hex>`).
    pub ca_hash: CertHash,
}

impl RendezvousConfig {
    /// The servers `address` names, in order.
    pub fn servers(&self) -> Vec<String> {
        self.address
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    private_key_file: PathBuf,
    #[serde(default = "default_listen_port")]
    listen_port: u16,
    #[serde(default = "default_interface")]
    interface: String,
    #[serde(default)]
    address: Option<OneOrMany<IpNet>>,
    #[serde(default = "default_mtu")]
    mtu: u16,
    #[serde(default = "default_socket")]
    socket: PathBuf,
    socket_group: Option<String>,
    #[serde(default = "default_uapi_dir")]
    uapi_dir: PathBuf,
    #[serde(default = "default_env_file")]
    env_file: PathBuf,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
    state_dir: Option<PathBuf>,
    name: Option<String>,
    advertise_endpoint: Option<SocketAddr>,
    #[serde(default = "default_port_mapping")]
    port_mapping: bool,
    metrics_address: Option<SocketAddr>,
    rendezvous: Option<RendezvousConfig>,
    #[serde(default)]
    routes: AdvertisedRoutes,
    advertise_flannel_subnet: Option<PathBuf>,
}

/// `routes = [...]`, checked while parsing so that an error points at the
/// line and column of the prefix at fault.
#[derive(Default)]
struct AdvertisedRoutes(Vec<IpNet>);

impl<'de> Deserialize<'de> for AdvertisedRoutes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let nets = Vec::<RoutePrefix>::deserialize(d)?;
        let nets: Vec<IpNet> = nets.into_iter().map(|RoutePrefix(net)| net).collect();
        validate_routes(&nets).map_err(D::Error::custom)?;
        Ok(Self(nets))
    }
}

/// One advertised prefix, checked by [`validate_route`].
struct RoutePrefix(IpNet);

impl<'de> Deserialize<'de> for RoutePrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let net = IpNet::deserialize(d)?;
        validate_route(&net).map_err(D::Error::custom)?;
        Ok(Self(net))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawPeer {
    public_key: PublicKey,
    endpoint: Option<SocketAddr>,
    #[serde(default)]
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

fn default_port_mapping() -> bool {
    true
}
fn default_listen_port() -> u16 {
    DEFAULT_LISTEN_PORT
}
fn default_interface() -> String {
    DEFAULT_INTERFACE.to_owned()
}
fn default_mtu() -> u16 {
    DEFAULT_MTU
}
fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_uapi_dir() -> PathBuf {
    PathBuf::from(DEFAULT_UAPI_DIR)
}
fn default_env_file() -> PathBuf {
    PathBuf::from(DEFAULT_ENV_FILE)
}

/// `a`, `a and b`, `a, b and c`.
fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => "nothing".to_owned(),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Reads and validates the first of `paths` that exists (meshd's
    /// defaults: the state directory's, then the hand-written one). A file
    /// that exists but cannot be read is that file's error, not a reason to
    /// look on; when none exists, the error lists every place it looked.
    pub fn load_first(paths: &[PathBuf]) -> Result<Self, ConfigError> {
        for path in paths {
            match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                _ => return Self::load(path),
            }
        }
        Err(ConfigError::NotFound {
            looked: paths.to_vec(),
        })
    }

    /// Parses and validates config text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };

        validate_interface_name(&raw.interface).map_err(|m| invalid("interface", m))?;
        if !(MIN_MTU..=MAX_MTU).contains(&raw.mtu) {
            return Err(invalid(
                "mtu",
                format!(
                    "{} is out of range; expected {MIN_MTU}..={MAX_MTU}",
                    raw.mtu
                ),
            ));
        }
        let addresses = match raw.address {
            Some(OneOrMany::One(a)) => vec![a],
            Some(OneOrMany::Many(v)) => v,
            None => Vec::new(),
        };
        if addresses.is_empty() && raw.rendezvous.is_none() {
            return Err(invalid(
                "address",
                "expected this node's overlay address (e.g. \"100.72.0.1/16\"), or a [rendezvous] section that assigns one".into(),
            ));
        }
        if raw.rendezvous.is_some() && raw.state_dir.is_none() {
            return Err(invalid(
                "state-dir",
                "a node with a [rendezvous] needs a state directory for its address and peer cache"
                    .into(),
            ));
        }
        if let Some(name) = &raw.name {
            validate_node_name(name).map_err(|m| invalid("name", m))?;
        }
        if raw.advertise_flannel_subnet.is_some() && raw.rendezvous.is_none() {
            return Err(invalid(
                "advertise-flannel-subnet",
                "prefixes are advertised through a [rendezvous], which this file has none of"
                    .into(),
            ));
        }
        if !raw.routes.0.is_empty() && raw.rendezvous.is_none() {
            return Err(invalid(
                "routes",
                "prefixes are advertised through a [rendezvous], which this file has none of; \
                 with static peers only, list the prefix in each peer's `allowed-ips` instead"
                    .into(),
            ));
        }
        if raw.env_file.file_name().is_none() {
            return Err(invalid(
                "env-file",
                format!(
                    "{:?} names a directory; expected a file such as \"/run/meshd/env\"",
                    raw.env_file
                ),
            ));
        }

        let mut seen_keys = HashSet::new();
        let mut seen_nets: Vec<(IpNet, PublicKey)> = Vec::new();
        let mut peers = Vec::with_capacity(raw.peers.len());
        for (i, p) in raw.peers.into_iter().enumerate() {
            let key = |field: &str| format!("peer[{i}].{field}");
            if !seen_keys.insert(p.public_key) {
                return Err(invalid(
                    &key("public-key"),
                    format!("{} is listed twice", p.public_key),
                ));
            }
            for net in &p.allowed_ips {
                if net.trunc() != *net {
                    return Err(invalid(
                        &key("allowed-ips"),
                        format!("{net} has host bits set; did you mean {}?", net.trunc()),
                    ));
                }
                if let Some((other, owner)) = seen_nets.iter().find(|(o, _)| o == net) {
                    return Err(invalid(
                        &key("allowed-ips"),
                        format!("{other} is already routed to peer {owner}"),
                    ));
                }
                seen_nets.push((*net, p.public_key));
            }
            if let Some(endpoint) = p.endpoint {
                if endpoint.port() == 0 {
                    return Err(invalid(
                        &key("endpoint"),
                        "port 0 is not a valid endpoint port".into(),
                    ));
                }
            }
            peers.push(PeerSpec {
                public_key: p.public_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive.filter(|&s| s > 0),
            });
        }

        Ok(Config {
            private_key_file: raw.private_key_file,
            listen_port: raw.listen_port,
            interface: raw.interface,
            addresses,
            mtu: raw.mtu,
            socket: raw.socket,
            socket_group: raw.socket_group,
            uapi_dir: raw.uapi_dir,
            env_file: raw.env_file,
            peers,
            state_dir: raw.state_dir,
            name: raw.name,
            advertise_endpoint: raw.advertise_endpoint,
            port_mapping: raw.port_mapping,
            metrics_address: raw.metrics_address,
            rendezvous: raw.rendezvous,
            routes: raw.routes.0,
            advertise_flannel_subnet: raw.advertise_flannel_subnet,
        })
    }
}

/// Node names travel in the peer map and show in tables: printable, short.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > crate::wire::control::MAX_NAME {
        return Err(format!(
            "{name:?} must be 1 to {} characters long",
            crate::wire::control::MAX_NAME
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{name:?} must not contain spaces or control characters"
        ));
    }
    Ok(())
}

/// A prefix this node may advertise (`routes`, `--advertise-routes`): a
/// network address with its host bits clear, and not a default route (a
/// node that claimed every address would take the mesh's underlay traffic
/// into the tunnel).
pub fn validate_route(net: &IpNet) -> Result<(), String> {
    if net.trunc() != *net {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} is a default route; advertise the prefixes behind this node (its pod CIDR), \
             not every address"
        ));
    }
    Ok(())
}

/// The prefixes a node advertises, together: at most [`MAX_ROUTES`] (what
/// the rendezvous accepts in a hello), each once.
pub fn validate_routes(nets: &[IpNet]) -> Result<(), String> {
    if nets.len() > MAX_ROUTES {
        return Err(format!(
            "{} prefixes; a node advertises at most {MAX_ROUTES} (merge adjacent ones)",
            nets.len()
        ));
    }
    for (i, net) in nets.iter().enumerate() {
        if nets[..i].contains(net) {
            return Err(format!("{net} is listed twice"));
        }
    }
    Ok(())
}

/// Linux interface names: 1..=15 bytes (IFNAMSIZ - 1), no '/', no whitespace.
fn validate_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 characters long"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    /// The error as `meshd` prints it: with its causes, as anyhow's `{:#}`.
    fn printed(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text += &format!(": {c}");
            cause = c.source();
        }
        text
    }

    #[test]
    fn with_no_config_anywhere_the_error_lists_every_place_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let looked = [
            dir.path().join("state/meshd.toml"),
            dir.path().join("etc/meshd.toml"),
        ];
        let e = Config::load_first(&looked).unwrap_err();
        let text = printed(&e);
        for path in &looked {
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
        assert!(text.contains("meshd join"), "{text}");
        assert!(text.contains("--config"), "{text}");
        assert!(!text.contains("os error"), "{text}");
    }

    #[test]
    fn the_first_config_that_exists_is_loaded_and_an_unreadable_one_is_named_with_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (
            dir.path().join("first.toml"),
            dir.path().join("second.toml"),
        );
        std::fs::write(
            &second,
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n",
        )
        .unwrap();
        let config = Config::load_first(&[first.clone(), second.clone()]).unwrap();
        assert_eq!(config.private_key_file, PathBuf::from("/k"));
        // A directory where the file should be: it exists, so it is the error.
        std::fs::create_dir(&first).unwrap();
        let text = printed(&Config::load_first(&[first.clone(), second]).unwrap_err());
        assert!(
            text.starts_with(&format!("cannot read config file {}: ", first.display())),
            "{text}"
        );
        assert_eq!(text.matches("os error").count(), 1, "{text}");
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/meshd/meshd.toml"), text)
    }

    #[test]
    fn minimal_config_gets_the_defaults() {
        let c = parse("private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n").unwrap();
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.interface, "mesh0");
        assert_eq!(c.mtu, 1380);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.uapi_dir, PathBuf::from("/var/run/wireguard"));
        assert_eq!(c.env_file, PathBuf::from("/run/meshd/env"));
        assert_eq!(c.addresses, vec!["100.72.0.1/16".parse::<IpNet>().unwrap()]);
        assert!(c.port_mapping);
    }

    #[test]
    fn port_mapping_can_be_turned_off_and_takes_only_a_boolean() {
        let base = "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n";
        assert!(
            !parse(&format!("{base}port-mapping = false\n"))
                .unwrap()
                .port_mapping
        );
        let err = parse(&format!("{base}port-mapping = \"no\"\n")).unwrap_err();
        assert!(err.to_string().contains("port-mapping"), "{err}");
    }

    #[test]
    fn the_wireguard_socket_directory_can_be_moved() {
        let c = parse(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\nuapi-dir = \"/tmp/wg\"\n",
        )
        .unwrap();
        assert_eq!(c.uapi_dir, PathBuf::from("/tmp/wg"));
    }

    #[test]
    fn the_env_file_can_be_moved_but_must_name_a_file() {
        let base = "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n";
        let c = parse(&format!("{base}env-file = \"/run/mesh/env\"\n")).unwrap();
        assert_eq!(c.env_file, PathBuf::from("/run/mesh/env"));
        let err = parse(&format!("{base}env-file = \"/run/meshd/..\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`env-file`"), "{err}");
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        let base = "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n";
        assert_eq!(parse(base).unwrap().metrics_address, None);
        let c = parse(&format!("{base}metrics-address = \"127.0.0.1:9586\"\n")).unwrap();
        assert_eq!(c.metrics_address, Some("127.0.0.1:9586".parse().unwrap()));
        let err = parse(&format!("{base}metrics-address = \"9586\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metrics-address") && err.contains("line 3"),
            "{err}"
        );
    }

    #[test]
    fn full_peer_parses() {
        let c = parse(&format!(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n\
             [[peer]]\npublic-key = \"{KEY}\"\nendpoint = \"203.0.113.2:51820\"\n\
             allowed-ips = [\"100.72.0.2/32\"]\npersistent-keepalive = 25\n"
        ))
        .unwrap();
        let p = &c.peers[0];
        assert_eq!(p.public_key.to_string(), KEY);
        assert_eq!(p.endpoint, Some("203.0.113.2:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
    }

    #[test]
    fn unknown_key_is_rejected_with_file_and_key() {
        let err =
            parse("private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\nlisten-prot = 1\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("/etc/meshd/meshd.toml"), "{err}");
        assert!(err.contains("listen-prot"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_peer_key_says_what_is_expected() {
        let err = parse(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n[[peer]]\npublic-key = \"xyz\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("public-key") && err.contains("44 characters"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let base = "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n";
        let err = parse(&format!("{base}mtu = 100\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`mtu`") && err.contains("1280"), "{err}");
        let err = parse(&format!("{base}interface = \"a/b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`interface`"), "{err}");
        let err = parse("private-key-file = \"/k\"\naddress = \"100.72.0.300/16\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("address"), "{err}");
        let err = parse(&format!(
            "{base}[[peer]]\npublic-key = \"{KEY}\"\nallowed-ips = [\"100.72.0.2/16\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("peer[0].allowed-ips") && err.contains("100.72.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_peers_are_rejected() {
        let err = parse(&format!(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\n\
             [[peer]]\npublic-key = \"{KEY}\"\n[[peer]]\npublic-key = \"{KEY}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("peer[1].public-key") && err.contains("twice"),
            "{err}"
        );
    }

    #[test]
    fn a_rendezvous_node_needs_no_address_but_a_state_dir() {
        let rendezvous = "[rendezvous]\naddress = \"rv.example:7443\"\n\
             ca-hash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n";
        let c = parse(&format!(
            "private-key-file = \"/k\"\nstate-dir = \"/var/lib/meshd\"\n{rendezvous}"
        ))
        .unwrap();
        assert!(c.addresses.is_empty());
        assert_eq!(c.rendezvous.unwrap().address, "rv.example:7443");
        let err = parse(&format!("private-key-file = \"/k\"\n{rendezvous}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("state-dir"), "{err}");
        let err = parse("private-key-file = \"/k\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`address`") && err.contains("[rendezvous]"),
            "{err}"
        );
        let bad_hash = "[rendezvous]\naddress = \"rv:7443\"\nca-hash = \"md5:00\"\n";
        let err = parse(&format!(
            "private-key-file = \"/k\"\nstate-dir = \"/s\"\n{bad_hash}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("ca-hash") && err.contains("sha256:"), "{err}");
    }

    const RENDEZVOUS: &str =
        "state-dir = \"/var/lib/meshd\"\n[rendezvous]\naddress = \"rv.example:7443\"\n\
         ca-hash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n";

    /// A rendezvous node whose `routes` line is line 2.
    fn with_routes(routes: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "private-key-file = \"/k\"\nroutes = {routes}\n{RENDEZVOUS}"
        ))
    }

    #[test]
    fn advertised_routes_are_read_in_order() {
        let c = with_routes(r#"["10.244.3.0/24", "fd00:244:3::/64", "192.168.7.0/24"]"#).unwrap();
        let want: Vec<IpNet> = ["10.244.3.0/24", "fd00:244:3::/64", "192.168.7.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(c.routes, want);
        let none = parse(&format!("private-key-file = \"/k\"\n{RENDEZVOUS}")).unwrap();
        assert!(none.routes.is_empty());
    }

    #[test]
    fn an_advertised_route_that_is_no_prefix_is_named_with_its_line() {
        for bad in [r#"["10.244.3.0/33"]"#, r#"["pods"]"#, r#""10.244.3.0/24""#] {
            let err = with_routes(bad).unwrap_err().to_string();
            assert!(
                err.contains("/etc/meshd/meshd.toml") && err.contains("line 2"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn an_advertised_route_with_host_bits_says_which_network_was_meant() {
        let err = with_routes(r#"["10.244.3.0/24", "10.244.4.1/24"]"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2")
                && err.contains("10.244.4.1/24 has host bits set")
                && err.contains("10.244.4.0/24"),
            "{err}"
        );
    }

    #[test]
    fn a_default_route_or_a_prefix_twice_is_refused() {
        let err = with_routes(r#"["0.0.0.0/0"]"#).unwrap_err().to_string();
        assert!(
            err.contains("default route") && err.contains("line 2"),
            "{err}"
        );
        let err = with_routes(r#"["::/0"]"#).unwrap_err().to_string();
        assert!(err.contains("default route"), "{err}");
        let err = with_routes(r#"["10.244.3.0/24", "10.244.3.0/24"]"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listed twice") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn at_most_max_routes_prefixes_are_advertised() {
        let list = |n: usize| {
            let nets: Vec<String> = (0..n).map(|i| format!("\"10.{i}.0.0/16\"")).collect();
            format!("[{}]", nets.join(", "))
        };
        assert_eq!(
            with_routes(&list(MAX_ROUTES)).unwrap().routes.len(),
            MAX_ROUTES
        );
        let err = with_routes(&list(MAX_ROUTES + 1)).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains(&format!("at most {MAX_ROUTES}")),
            "{err}"
        );
    }

    #[test]
    fn flannels_subnet_file_is_followed_only_with_a_rendezvous() {
        let c = parse(&format!(
            "private-key-file = \"/k\"\nadvertise-flannel-subnet = \"/run/flannel/subnet.env\"\n{RENDEZVOUS}"
        ))
        .unwrap();
        assert_eq!(
            c.advertise_flannel_subnet.as_deref(),
            Some(Path::new("/run/flannel/subnet.env"))
        );
        let err = parse(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\nadvertise-flannel-subnet = \"/x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`advertise-flannel-subnet`") && err.contains("[rendezvous]"),
            "{err}"
        );
    }

    #[test]
    fn routes_without_a_rendezvous_are_refused_and_the_error_says_what_to_do_instead() {
        let err = parse(
            "private-key-file = \"/k\"\naddress = \"100.72.0.1/16\"\nroutes = [\"10.244.3.0/24\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`routes`") && err.contains("[rendezvous]") && err.contains("allowed-ips"),
            "{err}"
        );
    }

    #[test]
    fn example_configs_in_deploy_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n > 0, "no example configs in {}", dir.display());
    }
}
