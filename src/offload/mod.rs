//! The TUN device's offloads, done by hand where the kernel hands them to
//! userspace: [`tso`] cuts the super-packets meshd reads into segments
//! (TCP, UDP, and both inside a UDP tunnel such as VXLAN), [`gro`] joins
//! the TCP segments and UDP datagrams meshd writes into super-packets.
//!
//! Pure: bytes in, bytes out, each write's virtio-net header included.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

pub mod gro;
pub mod tso;

/// The virtio-net header in front of every TUN read and write; the device
/// is told its length (`TUNSETVNETHDRSZ`) and the kernel reads and writes
/// exactly that many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VnetHeader {
    /// `struct virtio_net_hdr`, 10 bytes: TSO and USO.
    Legacy,
    /// `struct virtio_net_hdr_v1_hash_tunnel`, 24 bytes: the legacy fields,
    /// `num_buffers` and the hash report (unused by a TUN), then the offsets
    /// of the outer transport header and the inner network header, which a
    /// UDP-tunnel super-packet (`VIRTIO_NET_HDR_GSO_UDP_TUNNEL_*`) needs.
    Tunnel,
}

impl VnetHeader {
    /// Its length in bytes.
    pub const fn size(self) -> usize {
        match self {
            Self::Legacy => tun_rs::VIRTIO_NET_HDR_LEN,
            Self::Tunnel => 24,
        }
    }
}

/// virtio-net header flag: the transport checksum field holds the
/// pseudo-header sum and the rest is still to be added (`CHECKSUM_PARTIAL`).
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio-net header flag: the outer UDP header of a UDP-tunnel
/// super-packet needs its checksum (`SKB_GSO_UDP_TUNNEL_CSUM`).
const VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM: u8 = 8;
/// GSO type bits: the super-packet is inside a UDP tunnel over IPv4 / IPv6.
const VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
const VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
/// Where the tunnel offsets sit in [`VnetHeader::Tunnel`].
const VNET_OUTER_TH_OFFSET: usize = 20;
const VNET_INNER_NH_OFFSET: usize = 22;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// The unfolded one's-complement sum of a TCP/UDP pseudo-header:
/// `addresses` is source then destination (8 or 32 bytes).
fn pseudo_header(addresses: &[u8], proto: u8, len: u16) -> u64 {
    let words: u64 = addresses
        .chunks_exact(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    words + u64::from(proto) + u64::from(len)
}

/// Folds a one's-complement sum into 16 bits (not inverted).
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
