//! The TUN device behind `mesh0`.
//!
//! Does I/O. Creation only: addresses, MTU, up state and routes are set
//! through rtnetlink by [`crate::netlink`], so there is one path for link
//! configuration and it can be diffed and undone.

use std::io;

pub use tun_rs::AsyncDevice as Tun;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("cannot create TUN device {name}: /dev/net/tun is missing (load the `tun` module: `modprobe tun`)")]
    NoDevice { name: String },
    #[error("cannot create TUN device {name}: permission denied (meshd needs CAP_NET_ADMIN; run it as root or via its systemd unit)")]
    Permission { name: String },
    #[error("cannot create TUN device {name}: an interface with that name exists and is in use (another meshd?)")]
    Busy { name: String },
    #[error("cannot create TUN device {name}: {source}")]
    Other { name: String, source: io::Error },
}

/// Creates the TUN device `name`, down and unconfigured, with offloads
/// (`IFF_VNET_HDR` + `TUNSETOFFLOAD`: TSO4/6, USO where the kernel has it)
/// where the kernel allows, so that the stack hands meshd TCP super-packets
/// of up to 64 KiB and takes coalesced ones back; without them, one packet
/// per read and write.
pub fn open(name: &str) -> Result<Tun, TunError> {
    match build(name, true) {
        Ok(tun) => Ok(tun),
        Err(
            e @ (TunError::NoDevice { .. } | TunError::Permission { .. } | TunError::Busy { .. }),
        ) => Err(e),
        Err(e) => {
            tracing::info!(error = %e, "TUN offloads unavailable; one packet per read");
            build(name, false)
        }
    }
}

fn build(name: &str, offload: bool) -> Result<Tun, TunError> {
    let name_owned = || name.to_owned();
    tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(offload)
        // Down until netlink has given it its address and MTU.
        .enable(false)
        .build_async()
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) => TunError::NoDevice { name: name_owned() },
            Some(libc::EPERM) | Some(libc::EACCES) => TunError::Permission { name: name_owned() },
            Some(libc::EBUSY) => TunError::Busy { name: name_owned() },
            _ => TunError::Other { name: name_owned(), source },
        })
}
