//! The layout of the two state directories: the node's (`meshd join`
//! writes it, `meshd run` reads and updates it) and the rendezvous's
//! (`mesh-rendezvous init` writes it, `serve` and the offline commands use
//! it). Every file name under them is here and nowhere else.
//!
//! Pure: it names paths and touches nothing. The names are part of the
//! on-disk format that rolling upgrades keep (DESIGN.md "Rolling
//! upgrades"): an older binary must find what a newer one wrote.

use std::path::{Path, PathBuf};

/// The node's state directory (`/var/lib/meshd` by default):
///
/// ```text
/// DIR/meshd.toml    the node's config ([rendezvous] section included)
/// DIR/private.key   its WireGuard key                          0600
/// DIR/join.token    the join token, deleted once admitted      0600
/// DIR/cache.json    address and last peer map (written by run)
/// DIR/port.json     the UDP port run moved to, when another node behind
///                   the same NAT held the configured one (from 0.4.0)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDir {
    dir: PathBuf,
}

impl NodeDir {
    /// File name of the node's config inside its state directory.
    pub const CONFIG: &'static str = "meshd.toml";
    const PRIVATE_KEY: &'static str = "private.key";
    const JOIN_TOKEN: &'static str = "join.token";
    const CACHE: &'static str = "cache.json";
    const PORT: &'static str = "port.json";

    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `meshd.toml`: what `meshd run --state-dir DIR` reads.
    pub fn config(&self) -> PathBuf {
        self.dir.join(Self::CONFIG)
    }

    /// `private.key`: the node's WireGuard key.
    pub fn private_key(&self) -> PathBuf {
        self.dir.join(Self::PRIVATE_KEY)
    }

    /// `join.token`: the token `meshd join` stored, until admission.
    pub fn join_token(&self) -> PathBuf {
        self.dir.join(Self::JOIN_TOKEN)
    }

    /// `cache.json`: what the rendezvous last told the node.
    pub fn cache(&self) -> PathBuf {
        self.dir.join(Self::CACHE)
    }

    /// `port.json`: the UDP port the node moved to ([`crate::dataplane::port`]).
    pub fn port(&self) -> PathBuf {
        self.dir.join(Self::PORT)
    }
}

/// The rendezvous's state directory:
///
/// ```text
/// DIR/rendezvous.toml   listen address, public address, metrics address, [relay] limits
/// DIR/ca.der            the mesh's CA, which nodes pin (absent in a mesh
///                       made before 0.4.0: cert.der is pinned then)
/// DIR/ca.key            its private key, on the servers that issue   0600
/// DIR/cert.der          this server's certificate, issued by the CA
///                       (or self-signed and pinned, before 0.4.0)
/// DIR/cert.key          its private key                       0600
/// DIR/server.key        x25519 static key, admission proofs   0600
/// DIR/registry.json     nodes, addresses, tokens (the Store)  0600
/// DIR/admin.sock        the running server's admin socket     0600
/// DIR/rendezvous.lock   flock: held by `serve` for its life, and by an
///                       offline edit of registry.json while it lasts     0600
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousDir {
    dir: PathBuf,
}

impl RendezvousDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("rendezvous.toml")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.der")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
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

    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join("rendezvous.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names older releases wrote and read: changing one strands every
    /// upgraded machine's state.
    #[test]
    fn the_file_names_are_the_ones_0_1_0_and_0_2_0_use() {
        let node = NodeDir::new(Path::new("/var/lib/meshd"));
        let names = [
            node.config(),
            node.private_key(),
            node.join_token(),
            node.cache(),
        ];
        assert_eq!(
            names.map(|p| p.display().to_string()),
            [
                "/var/lib/meshd/meshd.toml",
                "/var/lib/meshd/private.key",
                "/var/lib/meshd/join.token",
                "/var/lib/meshd/cache.json",
            ]
        );
        let rv = RendezvousDir::new(Path::new("/r"));
        let names = [
            rv.config(),
            rv.cert(),
            rv.cert_key(),
            rv.server_key(),
            rv.registry(),
            rv.admin_socket(),
            rv.lock(),
        ];
        assert_eq!(
            names.map(|p| p.display().to_string()),
            [
                "/r/rendezvous.toml",
                "/r/cert.der",
                "/r/cert.key",
                "/r/server.key",
                "/r/registry.json",
                "/r/admin.sock",
                "/r/rendezvous.lock",
            ]
        );
    }
}
