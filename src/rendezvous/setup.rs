//! The rendezvous state directory: creating a mesh and loading it back.
//!
//! Does file I/O and draws randomness (mesh id, keys, certificate). Layout:
//!
//! ```text
//! DIR/rendezvous.toml   listen address, public address
//! DIR/cert.der          self-signed certificate (nodes pin its SHA-256)
//! DIR/cert.key          its private key                       0600
//! DIR/server.key        x25519 static key, admission proofs   0600
//! DIR/registry.json     nodes, addresses, tokens (the Store)  0600
//! DIR/admin.sock        the running server's admin socket     0600
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::registry::RegistryState;
use super::store::{FileStore, Store, StoreError};
use super::tls::{self, CertHash, TlsError};
use crate::identity::keyfile::{read_private_key, write_atomic, write_private_key, KeyFileError};
use crate::identity::PrivateKey;
use crate::ipam::{self, IpamError};
use crate::wire::control::MeshInfo;

pub const DEFAULT_CIDR: &str = "100.72.0.0/16";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{dir} already holds a mesh (rendezvous.toml exists); use another --state-dir")]
    AlreadyInitialised { dir: PathBuf },
    #[error("{dir} holds no mesh: run `mesh-rendezvous init --state-dir {dir} …` first")]
    NotInitialised { dir: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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
}

/// `DIR/rendezvous.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RendezvousConfig {
    /// Where the server binds (UDP).
    pub listen: SocketAddr,
    /// How nodes reach it (`HOST:PORT`), printed in join lines.
    pub public_addr: String,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("rendezvous.toml")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.der")
    }
    pub fn cert_key(&self) -> PathBuf {
        self.dir.join("cert.key")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }
}

/// Everything a running server needs.
pub struct Loaded {
    pub layout: Layout,
    pub config: RendezvousConfig,
    pub cert_der: Vec<u8>,
    pub cert_key_der: Vec<u8>,
    pub server_key: PrivateKey,
    pub store: FileStore,
    pub state: RegistryState,
}

impl Loaded {
    pub fn cert_hash(&self) -> CertHash {
        CertHash::of(&self.cert_der)
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
    let layout = Layout::new(dir);
    if layout.config().exists() {
        return Err(SetupError::AlreadyInitialised { dir: dir.to_owned() });
    }
    ipam::validate_mesh_cidr(cidr)?;
    std::fs::create_dir_all(dir).map_err(|source| SetupError::Io { path: dir.to_owned(), source })?;

    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    let mut global_id = [0u8; 5];
    rng.fill_bytes(&mut global_id);
    let mesh = MeshInfo {
        id: id.iter().map(|b| format!("{b:02x}")).collect(),
        ipv4: cidr,
        ipv6: ipam::ula_prefix(global_id),
    };

    write_private_key(&layout.server_key(), &PrivateKey::generate(rng))?;
    let (cert, key) = tls::generate_certificate()?;
    let write = |path: PathBuf, bytes: &[u8], mode| {
        write_atomic(&path, bytes, mode).map_err(|source| SetupError::Io { path, source })
    };
    write(layout.cert(), &cert, 0o644)?;
    write(layout.cert_key(), &key, 0o600)?;
    FileStore::new(dir).save(&RegistryState::new(mesh.clone()))?;
    // Written last: its presence means the directory is complete.
    let config = RendezvousConfig { listen, public_addr: public_addr.to_owned() };
    let text = toml::to_string(&config).map_err(|e| SetupError::Config {
        path: layout.config(),
        message: e.to_string(),
    })?;
    write(layout.config(), text.as_bytes(), 0o644)?;
    Ok(mesh)
}

/// Loads an initialised state directory.
pub fn load(dir: &Path) -> Result<Loaded, SetupError> {
    let layout = Layout::new(dir);
    let config_path = layout.config();
    let text = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SetupError::NotInitialised { dir: dir.to_owned() })
        }
        Err(source) => return Err(SetupError::Io { path: config_path, source }),
    };
    let config: RendezvousConfig = toml::from_str(&text).map_err(|e| SetupError::Config {
        path: config_path.clone(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let read = |path: PathBuf| std::fs::read(&path).map_err(|source| SetupError::Io { path, source });
    let cert_der = read(layout.cert())?;
    let cert_key_der = read(layout.cert_key())?;
    let server_key = read_private_key(&layout.server_key())?;
    let store = FileStore::new(dir);
    let state = store
        .load()?
        .ok_or_else(|| SetupError::NotInitialised { dir: dir.to_owned() })?;
    Ok(Loaded { layout, config, cert_der, cert_key_der, server_key, store, state })
}

/// The default mesh prefix.
pub fn default_cidr() -> Ipv4Net {
    DEFAULT_CIDR.parse().unwrap_or_else(|_| unreachable!("constant"))
}
