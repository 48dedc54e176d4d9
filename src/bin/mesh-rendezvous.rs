//! `mesh-rendezvous`: admission, registry, peer maps and relay for a mesh.
//!
//! Not built yet: this binary only says so. Until it exists, meshes are
//! configured with static peers (`[[peer]]` in meshd.toml).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "mesh-rendezvous {}: not built yet. Configure static peers in meshd.toml for now \
         (see deploy/examples/meshd.toml).",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
