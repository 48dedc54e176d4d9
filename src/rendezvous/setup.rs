//! The rendezvous state directory: creating a mesh and loading it back.
//!
//! Does file I/O and draws randomness (mesh id, keys, certificate). The
//! directory's files are named in [`crate::paths::RendezvousDir`].
//!
//! The lock ([`lock`]) keeps two writers of `registry.json` apart: a second
//! `serve` on the same directory refuses to start, and the CLI, which edits
//! the registry through the running server's admin socket, refuses to edit
//! the file itself while a server holds the directory.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::registry::RegistryState;
use super::store::etcd::EtcdConfig;
use super::store::{FileStore, Store, StoreError};
use super::tls::{self, TlsError};
use crate::identity::keyfile::{read_private_key, write_atomic, write_private_key, KeyFileError};
use crate::identity::CertHash;
use crate::identity::PrivateKey;
use crate::ipam::{self, IpamError};
use crate::relay::RelayLimits;
use crate::wire::control::MeshInfo;

pub const DEFAULT_CIDR: &str = "100.72.0.0/16";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{dir} already holds a mesh (rendezvous.toml exists); use another --state-dir")]
    AlreadyInitialised { dir: PathBuf },
    #[error("{dir} holds no mesh: run `mesh-rendezvous init --state-dir {dir} …` first")]
    NotInitialised { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--cidr: {0}")]
    Cidr(#[from] IpamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{dir} is in use by {holder}")]
    Locked { dir: PathBuf, holder: String },
    #[error("{dir} does not hold the mesh CA's key (ca.key): add servers on the host that does")]
    NoCaKey { dir: PathBuf },
    #[error(
        "the mesh of {dir} lives in etcd: run this against a running server \
         (`mesh-rendezvous serve --state-dir {dir}`, or any other server of the mesh)"
    )]
    NeedsServer { dir: PathBuf },
}

/// `DIR/rendezvous.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RendezvousConfig {
    /// Where the server binds (UDP).
    pub listen: SocketAddr,
    /// How nodes reach it (`HOST:PORT`), printed in join lines.
    pub public_addr: String,
    /// Where Prometheus metrics are served over HTTP (`GET /metrics`), e.g.
    /// `127.0.0.1:9587`; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<SocketAddr>,
    /// Per-node relay rate limits, the optional `[relay]` table; a key left
    /// out keeps its default. Not written by `init`, so a mesh that never
    /// set them follows the defaults of the running version.
    #[serde(default, skip_serializing_if = "is_default", with = "relay_section")]
    pub relay: RelayLimits,
    /// This server's name among the mesh's servers (in `nodes list` and
    /// the store's presence records); `rendezvous` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `[store]`: the mesh's state in etcd, shared by several servers;
    /// the file `registry.json` in the state directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<EtcdConfig>,
    /// `[routes]`: where the prefixes nodes advertise (their pod CIDRs)
    /// are routed without an operator's approval.
    #[serde(default, skip_serializing_if = "RoutesConfig::is_empty")]
    pub routes: RoutesConfig,
}

/// `[routes]` in `rendezvous.toml`:
///
/// ```toml
/// [routes]
/// # The cluster's pod CIDRs: a node's prefix inside one is routed to it
/// # unless another node's overlaps it; any other prefix waits for
/// # `mesh-rendezvous routes approve NODE PREFIX`. The same on every server.
/// routable = ["10.244.0.0/16", "fd10:244::/56"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    deny_unknown_fields,
    try_from = "RoutesSection"
)]
pub struct RoutesConfig {
    pub routable: Vec<IpNet>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RoutesSection {
    #[serde(default)]
    routable: Vec<IpNet>,
}

impl TryFrom<RoutesSection> for RoutesConfig {
    type Error = String;

    fn try_from(section: RoutesSection) -> Result<Self, String> {
        for range in &section.routable {
            if range.trunc() != *range {
                return Err(format!(
                    "routable range {range} has host bits set: did you mean {}?",
                    range.trunc()
                ));
            }
        }
        Ok(Self {
            routable: section.routable,
        })
    }
}

impl RoutesConfig {
    fn is_empty(&self) -> bool {
        self.routable.is_empty()
    }
}

impl RendezvousConfig {
    /// This server's name among the mesh's servers.
    pub fn server_name(&self) -> &str {
        self.server_name
            .as_deref()
            .unwrap_or(super::registry::DEFAULT_SERVER_NAME)
    }
}

fn is_default(limits: &RelayLimits) -> bool {
    *limits == RelayLimits::default()
}

/// `[relay]` in `rendezvous.toml`:
///
/// ```toml
/// [relay]
/// bytes-per-second = 50000000   # payload bytes a node may relay per second
/// packets-per-second = 50000
/// burst-ms = 100                # each bucket holds this long's worth of its rate
/// # What may be relayed towards one node, all sources together; by default
/// # the same as what one node may send.
/// destination-bytes-per-second = 50000000
/// destination-packets-per-second = 50000
/// ```
///
/// Validated as it is read ([`RelayLimits::new`]): a zero would stop all
/// relaying and is refused with the line it is on.
mod relay_section {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    struct RelaySection {
        #[serde(default = "default_bytes")]
        bytes_per_second: u64,
        #[serde(default = "default_packets")]
        packets_per_second: u64,
        #[serde(default = "default_burst_ms")]
        burst_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        destination_bytes_per_second: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        destination_packets_per_second: Option<u64>,
    }

    fn default_bytes() -> u64 {
        RelayLimits::DEFAULT_BYTES_PER_SEC
    }

    fn default_packets() -> u64 {
        RelayLimits::DEFAULT_PACKETS_PER_SEC
    }

    fn default_burst_ms() -> u64 {
        u64::try_from(RelayLimits::DEFAULT_BURST.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn serialize<S: Serializer>(limits: &RelayLimits, s: S) -> Result<S::Ok, S::Error> {
        RelaySection {
            bytes_per_second: limits.bytes_per_sec(),
            packets_per_second: limits.packets_per_sec(),
            burst_ms: u64::try_from(limits.burst().as_millis()).unwrap_or(u64::MAX),
            destination_bytes_per_second: Some(limits.destination_bytes_per_sec())
                .filter(|rate| *rate != limits.bytes_per_sec()),
            destination_packets_per_second: Some(limits.destination_packets_per_sec())
                .filter(|rate| *rate != limits.packets_per_sec()),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RelayLimits, D::Error> {
        let section = RelaySection::deserialize(d)?;
        let limits = RelayLimits::new(
            section.bytes_per_second,
            section.packets_per_second,
            Duration::from_millis(section.burst_ms),
        )
        .map_err(serde::de::Error::custom)?;
        limits
            .with_destination(
                section
                    .destination_bytes_per_second
                    .unwrap_or(section.bytes_per_second),
                section
                    .destination_packets_per_second
                    .unwrap_or(section.packets_per_second),
            )
            .map_err(serde::de::Error::custom)
    }
}

/// Paths inside a state directory (the name this module has always used).
pub use crate::paths::RendezvousDir as Layout;

/// An exclusive hold on a state directory (`DIR/rendezvous.lock`, flock),
/// released when dropped or when the process ends, however it ends.
#[derive(Debug)]
pub struct StateLock {
    file: std::fs::File,
}

impl Drop for StateLock {
    /// Empties the holder's record before the lock goes, so that a command
    /// that only held it for a moment leaves the directory as it found it
    /// (what `install.sh` run twice checks). A holder that dies leaves its
    /// record, which says nothing once the flock is gone.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// Gives every buffer of 128 KiB or more its own mapping, returned to the
/// system when it is freed. A welcome at thousands of nodes is megabytes
/// and lives until its node has acknowledged it; after such a buffer is
/// freed, glibc's malloc raises its mapping threshold, later welcomes come
/// from the heap, and the heap stays as large as the most welcomes ever in
/// flight at once (measured at 2,000 nodes: 173 MiB resident, 139 MiB with
/// the threshold fixed). For `serve`, before its threads start.
pub fn return_large_buffers_at_once() {
    #[cfg(target_env = "gnu")]
    // SAFETY: sets one of malloc's tuning parameters; takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// What a lock file says about its holder, at most this long in an error.
const MAX_HOLDER: usize = 200;

/// Takes the state directory's lock, or says who holds it
/// ([`SetupError::Locked`]) without waiting. `holder` names the taker in
/// the lock file (with its pid), for whoever finds the lock held.
pub fn lock(dir: &Path, holder: &str) -> Result<StateLock, SetupError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let layout = Layout::new(dir);
    if !layout.config().exists() {
        return Err(SetupError::NotInitialised {
            dir: dir.to_owned(),
        });
    }
    let path = layout.lock();
    let io = |source| SetupError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a file descriptor this function owns, open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::WouldBlock {
            return Err(io(error));
        }
        let mut text = String::new();
        let _ = (&file).take(MAX_HOLDER as u64).read_to_string(&mut text);
        let text = text.trim();
        let holder = if text.is_empty() {
            "another process".to_owned()
        } else {
            text.to_owned()
        };
        return Err(SetupError::Locked {
            dir: dir.to_owned(),
            holder,
        });
    }
    let record = format!("{holder} (pid {})\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(record.as_bytes()))
        .map_err(io)?;
    Ok(StateLock { file })
}

/// Everything a running server needs.
pub struct Loaded {
    pub layout: Layout,
    pub config: RendezvousConfig,
    pub cert_der: Vec<u8>,
    pub cert_key_der: Vec<u8>,
    /// The mesh's CA, which issued `cert_der`; `None` in a mesh made
    /// before there was one, whose pinned certificate is `cert_der`.
    pub ca_der: Option<Vec<u8>>,
    pub server_key: PrivateKey,
    pub backend: Backend,
}

/// Where the mesh's state is.
pub enum Backend {
    /// The file of a single server, as loaded.
    File {
        store: FileStore,
        state: RegistryState,
    },
    /// etcd, shared by the mesh's servers: read when the server starts.
    Etcd(EtcdConfig),
}

impl Loaded {
    /// What join lines pin: the CA's hash, or the server certificate's in a
    /// mesh from before the CA.
    pub fn cert_hash(&self) -> CertHash {
        CertHash::of(self.ca_der.as_deref().unwrap_or(&self.cert_der))
    }

    /// What the server presents: its certificate, then the CA's.
    pub fn cert_chain(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.cert_der.clone())
            .chain(self.ca_der.clone())
            .collect()
    }
}

/// Creates a mesh in `dir`: id, address plan, keys and certificate.
pub fn init<R: RngCore + CryptoRng>(
    dir: &Path,
    listen: SocketAddr,
    public_addr: &str,
    cidr: Ipv4Net,
    rng: &mut R,
) -> Result<MeshInfo, SetupError> {
    let options = InitOptions {
        listen,
        public_addr: public_addr.to_owned(),
        cidr,
        server_name: None,
        store: None,
        certificate_from: None,
    };
    init_with(dir, &options, rng)
}

/// What `mesh-rendezvous init` is told.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub listen: SocketAddr,
    pub public_addr: String,
    pub cidr: Ipv4Net,
    pub server_name: Option<String>,
    /// etcd, for a mesh of several servers: the mesh is then created in
    /// etcd (or an existing one joined) by [`claim_mesh`], not in a file.
    pub store: Option<EtcdConfig>,
    /// A server added to a mesh: the directory `server add` wrote (this
    /// server's certificate and key, and the mesh's pinned certificate)
    /// instead of a new CA.
    pub certificate_from: Option<PathBuf>,
}

/// [`init`] with every option.
pub fn init_with<R: RngCore + CryptoRng>(
    dir: &Path,
    options: &InitOptions,
    rng: &mut R,
) -> Result<MeshInfo, SetupError> {
    let InitOptions {
        listen,
        ref public_addr,
        cidr,
        ref server_name,
        ref store,
        ref certificate_from,
    } = *options;
    if let Some(name) = server_name {
        if !super::registry::is_dns_label(name) {
            return Err(SetupError::Config {
                path: Layout::new(dir).config(),
                message: format!(
                    "server name {name:?} is not a DNS label (a-z, 0-9 and '-', at most 63)"
                ),
            });
        }
    }
    let layout = Layout::new(dir);
    if layout.config().exists() {
        return Err(SetupError::AlreadyInitialised {
            dir: dir.to_owned(),
        });
    }
    ipam::validate_mesh_cidr(cidr)?;
    std::fs::create_dir_all(dir).map_err(|source| SetupError::Io {
        path: dir.to_owned(),
        source,
    })?;

    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    let mut global_id = [0u8; 5];
    rng.fill_bytes(&mut global_id);
    let mesh = MeshInfo {
        id: hex::encode(id),
        ipv4: cidr,
        ipv6: ipam::ula_prefix(global_id),
    };

    write_private_key(&layout.server_key(), &PrivateKey::generate(rng))?;
    let write = |path: PathBuf, bytes: &[u8], mode| {
        write_atomic(&path, bytes, mode).map_err(|source| SetupError::Io { path, source })
    };
    let name = server_name
        .as_deref()
        .unwrap_or(super::registry::DEFAULT_SERVER_NAME);
    let (ca, cert, key) = match certificate_from {
        Some(from) => {
            let from = Layout::new(from);
            let read = |path: PathBuf| {
                std::fs::read(&path).map_err(|source| SetupError::Io { path, source })
            };
            (read(from.ca())?, read(from.cert())?, read(from.cert_key())?)
        }
        None => {
            let (ca, ca_key) = tls::generate_ca(&mesh.id)?;
            write(layout.ca_key(), &ca_key, 0o600)?;
            let (cert, key) = tls::issue_server_certificate(&ca, &ca_key, name)?;
            (ca, cert, key)
        }
    };
    write(layout.ca(), &ca, 0o644)?;
    write(layout.cert(), &cert, 0o644)?;
    write(layout.cert_key(), &key, 0o600)?;
    if store.is_none() {
        FileStore::new(dir).save(&RegistryState::new(mesh.clone()))?;
    }
    // Written last: its presence means the directory is complete.
    let config = RendezvousConfig {
        listen,
        public_addr: public_addr.to_owned(),
        metrics_address: None,
        relay: RelayLimits::default(),
        server_name: server_name.clone(),
        store: store.clone(),
        routes: RoutesConfig::default(),
    };
    let text = toml::to_string(&config).map_err(|e| SetupError::Config {
        path: layout.config(),
        message: e.to_string(),
    })?;
    write(layout.config(), text.as_bytes(), 0o644)?;
    Ok(mesh)
}

/// Creates `mesh` in etcd, or, when the prefix holds a mesh already (a
/// server added to it), the mesh found there: `(mesh, created)`.
pub async fn claim_mesh(
    config: &EtcdConfig,
    mesh: &MeshInfo,
) -> Result<(MeshInfo, bool), super::store::etcd::EtcdError> {
    use super::store::kv::{Outcome, Txn};
    use super::store::records::{self, Key, Value};
    let store = super::store::etcd::EtcdStore::connect(config).await?;
    let key = Key::Mesh.path();
    let txn = Txn::new()
        .absent(key.clone())
        .put(key.clone(), records::encode(&Value::Mesh(mesh.clone())));
    let outcome = store.txn(&txn).await?;
    let found = match outcome {
        Outcome::Committed { .. } => (mesh.clone(), true),
        _ => {
            let got = store.get(std::slice::from_ref(&key)).await?;
            let existing = got.into_iter().flatten().next().and_then(|kv| {
                match records::decode(&Key::Mesh, &kv.value) {
                    Ok(Value::Mesh(m)) => Some(m),
                    _ => None,
                }
            });
            match existing {
                Some(m) => (m, false),
                None => {
                    return Err(super::store::etcd::EtcdError::BadMesh {
                        prefix: config.prefix.clone(),
                    })
                }
            }
        }
    };
    let _ = store.revoke_lease().await;
    Ok(found)
}

/// Issues the certificate of a server added to the mesh of `dir` (which
/// holds the key of the mesh's pinned certificate: the CA's, or a pre-CA
/// server's own) into `out`, for `init --certificate-from` on that server.
pub fn add_server(dir: &Path, name: &str, out: &Path) -> Result<CertHash, SetupError> {
    let layout = Layout::new(dir);
    if !super::registry::is_dns_label(name) {
        return Err(SetupError::Config {
            path: layout.config(),
            message: format!(
                "server name {name:?} is not a DNS label (a-z, 0-9 and '-', at most 63)"
            ),
        });
    }
    let read =
        |path: PathBuf| std::fs::read(&path).map_err(|source| SetupError::Io { path, source });
    let (issuer, issuer_key) = if layout.ca().exists() {
        let key = read(layout.ca_key()).map_err(|_| SetupError::NoCaKey {
            dir: dir.to_owned(),
        })?;
        (read(layout.ca())?, key)
    } else {
        (read(layout.cert())?, read(layout.cert_key())?)
    };
    let (cert, key) = tls::issue_server_certificate(&issuer, &issuer_key, name)?;
    let out_layout = Layout::new(out);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|source| SetupError::Io {
            path: out.to_owned(),
            source,
        })?;
    let write = |path: PathBuf, bytes: &[u8], mode| {
        write_atomic(&path, bytes, mode).map_err(|source| SetupError::Io { path, source })
    };
    write(out_layout.ca(), &issuer, 0o644)?;
    write(out_layout.cert(), &cert, 0o644)?;
    write(out_layout.cert_key(), &key, 0o600)?;
    Ok(CertHash::of(&issuer))
}

/// Loads an initialised state directory.
pub fn load(dir: &Path) -> Result<Loaded, SetupError> {
    let layout = Layout::new(dir);
    let config_path = layout.config();
    let text = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SetupError::NotInitialised {
                dir: dir.to_owned(),
            })
        }
        Err(source) => {
            return Err(SetupError::Io {
                path: config_path,
                source,
            })
        }
    };
    let config: RendezvousConfig = toml::from_str(&text).map_err(|e| SetupError::Config {
        path: config_path.clone(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let read =
        |path: PathBuf| std::fs::read(&path).map_err(|source| SetupError::Io { path, source });
    let cert_der = read(layout.cert())?;
    let cert_key_der = read(layout.cert_key())?;
    let ca_der = match std::fs::read(layout.ca()) {
        Ok(der) => Some(der),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SetupError::Io {
                path: layout.ca(),
                source,
            })
        }
    };
    let server_key = read_private_key(&layout.server_key())?;
    let backend = match &config.store {
        Some(etcd) => Backend::Etcd(etcd.clone()),
        None => {
            let mut store = FileStore::new(dir);
            let mut state = store.load()?.ok_or_else(|| SetupError::NotInitialised {
                dir: dir.to_owned(),
            })?;
            // A v0.1.0 state's names become unique labels, once, on disk.
            if state.migrate_names() {
                store.save(&state)?;
            }
            Backend::File { store, state }
        }
    };
    Ok(Loaded {
        layout,
        config,
        cert_der,
        cert_key_der,
        ca_der,
        server_key,
        backend,
    })
}

/// The default mesh prefix.
pub fn default_cidr() -> Ipv4Net {
    DEFAULT_CIDR
        .parse()
        .unwrap_or_else(|_| unreachable!("constant"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"0.0.0.0:7443\"\npublic-addr = \"rv.example.com:7443\"\n";

    fn parse(text: &str) -> Result<RendezvousConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn initialised() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Layout::new(dir.path()).config(), BASE).unwrap();
        dir
    }

    #[test]
    fn a_held_state_directory_cannot_be_locked_again_and_the_refusal_names_the_holder() {
        let dir = initialised();
        let held = lock(dir.path(), "mesh-rendezvous serve").unwrap();
        match lock(dir.path(), "an offline edit") {
            Err(SetupError::Locked { holder, .. }) => {
                assert_eq!(
                    holder,
                    format!("mesh-rendezvous serve (pid {})", std::process::id())
                );
            }
            other => panic!("expected the directory to be locked, got {other:?}"),
        }
        drop(held);
        let again = lock(dir.path(), "an offline edit").unwrap();
        let text = std::fs::read_to_string(Layout::new(dir.path()).lock()).unwrap();
        assert!(text.starts_with("an offline edit (pid "), "{text}");
        drop(again);
    }

    #[test]
    fn an_uninitialised_directory_is_not_locked_but_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            lock(dir.path(), "x"),
            Err(SetupError::NotInitialised { .. })
        ));
        assert!(!Layout::new(dir.path()).lock().exists());
    }

    #[test]
    fn relay_limits_default_when_the_relay_table_is_absent() {
        let config = parse(BASE).unwrap();
        assert_eq!(config.relay, RelayLimits::default());
    }

    #[test]
    fn relay_limits_are_read_from_the_relay_table_and_missing_keys_keep_their_defaults() {
        let config = parse(&format!(
            "{BASE}[relay]\npackets-per-second = 200\nburst-ms = 50\n"
        ))
        .unwrap();
        let expected = RelayLimits::new(
            RelayLimits::DEFAULT_BYTES_PER_SEC,
            200,
            Duration::from_millis(50),
        )
        .unwrap();
        assert_eq!(config.relay, expected);
    }

    #[test]
    fn destination_relay_limits_follow_the_per_node_ones_unless_set() {
        let config = parse(&format!("{BASE}[relay]\npackets-per-second = 200\n")).unwrap();
        assert_eq!(config.relay.destination_packets_per_sec(), 200);
        assert_eq!(
            config.relay.destination_bytes_per_sec(),
            RelayLimits::DEFAULT_BYTES_PER_SEC
        );
        let config = parse(&format!(
            "{BASE}[relay]\ndestination-packets-per-second = 300\n"
        ))
        .unwrap();
        assert_eq!(
            config.relay.packets_per_sec(),
            RelayLimits::DEFAULT_PACKETS_PER_SEC
        );
        assert_eq!(config.relay.destination_packets_per_sec(), 300);
        let text = toml::to_string(&config).unwrap();
        assert!(
            text.contains("destination-packets-per-second = 300"),
            "{text}"
        );
        assert!(!text.contains("destination-bytes-per-second"), "{text}");
        assert_eq!(parse(&text).unwrap(), config);
        let zero = parse(&format!(
            "{BASE}[relay]\ndestination-bytes-per-second = 0\n"
        ))
        .unwrap_err();
        assert!(
            zero.contains("destination bytes per second is zero"),
            "{zero}"
        );
    }

    #[test]
    fn relay_limits_that_would_stop_relaying_or_unknown_relay_keys_are_refused_with_their_line() {
        let zero = parse(&format!("{BASE}[relay]\nbytes-per-second = 0\n")).unwrap_err();
        assert!(
            zero.contains("line 3") && zero.contains("bytes per second is zero"),
            "{zero}"
        );
        let unknown = parse(&format!("{BASE}[relay]\npackets-per-sec = 10\n")).unwrap_err();
        assert!(
            unknown.contains("unknown field `packets-per-sec`"),
            "{unknown}"
        );
        let negative = parse(&format!("{BASE}[relay]\nburst-ms = -1\n")).unwrap_err();
        assert!(
            negative.contains("line 4") && negative.contains("expected u64"),
            "{negative}"
        );
    }

    #[test]
    fn routable_ranges_are_read_written_back_and_refused_with_host_bits() {
        assert!(parse(BASE).unwrap().routes.routable.is_empty());
        let config = parse(&format!(
            "{BASE}[routes]\nroutable = [\"10.244.0.0/16\", \"fd10:244::/56\"]\n"
        ))
        .unwrap();
        assert_eq!(config.routes.routable.len(), 2);
        assert_eq!(parse(&toml::to_string(&config).unwrap()).unwrap(), config);
        let host = parse(&format!("{BASE}[routes]\nroutable = [\"10.244.1.1/16\"]\n")).unwrap_err();
        assert!(host.contains("did you mean 10.244.0.0/16"), "{host}");
        let typo = parse(&format!("{BASE}[routes]\nroutables = []\n")).unwrap_err();
        assert!(typo.contains("unknown field `routables`"), "{typo}");
        let bad = parse(&format!("{BASE}[routes]\nroutable = [\"10.244/16\"]\n")).unwrap_err();
        assert!(bad.contains("line 4"), "{bad}");
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given_before_the_relay_table() {
        assert_eq!(parse(BASE).unwrap().metrics_address, None);
        let config = parse(&format!(
            "{BASE}metrics-address = \"127.0.0.1:9587\"\n[relay]\nburst-ms = 50\n"
        ))
        .unwrap();
        assert_eq!(
            config.metrics_address,
            Some("127.0.0.1:9587".parse().unwrap())
        );
        assert_eq!(parse(&toml::to_string(&config).unwrap()).unwrap(), config);
        let bad = parse(&format!("{BASE}metrics-address = \"localhost\"\n")).unwrap_err();
        assert!(
            bad.contains("line 3") && bad.contains("metrics-address"),
            "{bad}"
        );
        let typo = parse(&format!("{BASE}metrics-adress = \"127.0.0.1:9587\"\n")).unwrap_err();
        assert!(typo.contains("unknown field `metrics-adress`"), "{typo}");
    }

    #[test]
    fn a_store_section_and_a_server_name_are_read_and_written_back() {
        let text = r#"
listen = "0.0.0.0:7443"
public-addr = "rv1.example.com:7443"
server-name = "rv1"

[store]
etcd-endpoints = ["10.0.0.1:2379", "10.0.0.2:2379"]
key-prefix = "/meshd/prod/"
"#;
        let config = parse(text).unwrap();
        assert_eq!(config.server_name(), "rv1");
        let store = config.store.as_ref().unwrap();
        assert_eq!(store.endpoints.len(), 2);
        assert_eq!(store.prefix, "/meshd/prod/");
        assert_eq!(parse(&toml::to_string(&config).unwrap()).unwrap(), config);
        let bad = text.replace("/meshd/prod/", "no-slash");
        let err = parse(&bad).unwrap_err();
        assert!(err.contains("key-prefix"), "{err}");
    }

    #[test]
    fn relay_limits_are_left_out_of_a_new_config_and_written_back_when_set() {
        let new = RendezvousConfig {
            listen: "0.0.0.0:7443".parse().unwrap(),
            public_addr: "rv.example.com:7443".into(),
            metrics_address: None,
            relay: RelayLimits::default(),
            server_name: None,
            store: None,
            routes: RoutesConfig::default(),
        };
        let text = toml::to_string(&new).unwrap();
        assert!(!text.contains("relay"), "{text}");
        assert!(
            !text.contains("store") && !text.contains("server-name"),
            "{text}"
        );
        let tuned = RendezvousConfig {
            relay: RelayLimits::new(1_000, 10, Duration::from_millis(20)).unwrap(),
            ..new
        };
        assert_eq!(parse(&toml::to_string(&tuned).unwrap()).unwrap(), tuned);
    }
}
