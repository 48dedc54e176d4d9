//! The TUN device behind `mesh0`.
//!
//! Does I/O. Creation only: addresses, MTU, up state and routes are set
//! through rtnetlink by [`crate::netlink`], so there is one path for link
//! configuration and it can be diffed and undone.

use std::io;
use std::os::fd::AsRawFd;

pub use tun_rs::AsyncDevice as Tun;

use crate::offload::VnetHeader;

/// `TUNSETOFFLOAD` bits for UDP-tunnel GSO (Linux 6.18; `linux/if_tun.h`),
/// not in libc yet: super-packets inside a UDP tunnel, and those whose
/// outer UDP header has a checksum.
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x080;
const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

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
/// (`IFF_VNET_HDR` + `TUNSETOFFLOAD`: TSO4/6, USO where the kernel has it,
/// UDP-tunnel GSO where it has that too) where the kernel allows, so that
/// the stack hands meshd TCP super-packets of up to 64 KiB and takes
/// coalesced ones back; without them, one packet per read and write.
/// Returns the virtio-net header the device's reads and writes carry.
pub fn open(name: &str) -> Result<(Tun, VnetHeader), TunError> {
    match build(name, true) {
        Ok(tun) => {
            let header = udp_tunnel_gso(&tun);
            tracing::info!(
                tso = tun.tcp_gso(),
                uso = tun.udp_gso(),
                udp_tunnel_gso = header == VnetHeader::Tunnel,
                "TUN offloads"
            );
            Ok((tun, header))
        }
        Err(
            e @ (TunError::NoDevice { .. } | TunError::Permission { .. } | TunError::Busy { .. }),
        ) => Err(e),
        Err(e) => {
            tracing::info!(error = %e, "TUN offloads unavailable; one packet per read");
            Ok((build(name, false)?, VnetHeader::Legacy))
        }
    }
}

/// Asks for UDP-tunnel GSO (Linux 6.18 and later): without it the kernel
/// cuts a VXLAN device's super-packets (flannel's default backend, over
/// mesh0) into single packets before the TUN, and meshd reads them one per
/// system call. It needs the 24-byte virtio-net header, set first so that
/// no read is ever shorter than the offloads need; a kernel that does not
/// know the bits refuses the whole mask and changes nothing, and the header
/// goes back to 10 bytes.
fn udp_tunnel_gso(tun: &Tun) -> VnetHeader {
    if !tun.tcp_gso() {
        return VnetHeader::Legacy;
    }
    let fd = tun.as_raw_fd();
    let set_header = |size: VnetHeader| {
        let size = size.size() as libc::c_int;
        // SAFETY: `fd` is the live TUN descriptor `tun` owns; the ioctl reads
        // one int through the pointer, which outlives the call.
        unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) == 0 }
    };
    if !set_header(VnetHeader::Tunnel) {
        return VnetHeader::Legacy;
    }
    let mut offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    if tun.udp_gso() {
        offloads |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    let tunnel = offloads | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM;
    // SAFETY: as above; TUNSETOFFLOAD takes the mask by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tunnel)) } == 0 {
        return VnetHeader::Tunnel;
    }
    if set_header(VnetHeader::Legacy) {
        VnetHeader::Legacy
    } else {
        // Still 24 bytes long: read and write it so, tunnel fields unused.
        VnetHeader::Tunnel
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
