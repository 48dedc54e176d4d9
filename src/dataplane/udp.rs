//! meshd's one UDP socket.
//!
//! Does I/O. Dual-stack where the host has IPv6 (one socket, IPv4 peers as
//! v4-mapped addresses inside, plain IPv4 addresses everywhere else), IPv4
//! only where it has not. Large kernel buffers, because a burst the kernel
//! drops is a TCP stall inside the tunnel.
//!
//! Where the kernel offers them (Linux ≥ 4.18 / 5.0), the socket sends a
//! run of equal-sized datagrams to one destination as one UDP GSO send
//! (`UDP_SEGMENT`: one syscall and one trip down the stack for up to 64
//! datagrams) and receives with UDP GRO (`UDP_GRO`: the kernel hands over
//! consecutive datagrams of one flow as one buffer plus their size). Both
//! are what a TCP stream inside the tunnel turns into, and per-packet
//! syscalls, not crypto, are what bounds a userspace tunnel.

use std::io::{self, IoSlice};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};

use socket2::{Domain, Protocol, Socket, Type};

// Shared with the rendezvous; re-exported for the packet loop's callers.
pub use crate::sockets::{canonical, size_buffers};

/// Most datagrams the kernel segments from one GSO send (UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes of payload in one GSO send (one IP datagram's worth).
pub const MAX_GSO_BYTES: usize = 65_000;

#[derive(Debug)]
pub struct UdpSocket {
    inner: tokio::net::UdpSocket,
    dual_stack: bool,
    /// UDP GSO works on this socket; cleared for good on the first send the
    /// kernel refuses (some drivers reject it with EIO).
    gso: AtomicBool,
    /// UDP GRO is on: a receive may hold several datagrams.
    gro: bool,
}

/// One receive: `len` bytes from `from`, holding datagrams of `stride`
/// bytes each (the last may be shorter); `stride == len` for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub stride: usize,
}

impl UdpSocket {
    /// Binds `port` on every address (0 picks a free port).
    pub fn bind(port: u16) -> io::Result<Self> {
        let (socket, dual_stack) = match dual_stack_socket(port) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                (s, false)
            }
        };
        size_buffers(socket2::SockRef::from(&socket));
        socket.set_nonblocking(true)?;
        let gso = probe_gso(&socket);
        let gro = setsockopt(&socket, sockopt::UdpGroSegment, &true).is_ok();
        tracing::debug!(gso, gro, "UDP offloads");
        let inner = tokio::net::UdpSocket::from_std(socket.into())?;
        Ok(Self {
            inner,
            dual_stack,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    /// Whether sends may carry several datagrams ([`UdpSocket::try_send_segments`]).
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// One receive of one or more datagrams of one flow (UDP GRO), with
    /// their source as a plain (never v4-mapped) address.
    pub fn try_recv_batch(&self, buf: &mut [u8]) -> io::Result<Received> {
        if !self.gro {
            let (len, from) = self.try_recv_from(buf)?;
            return Ok(Received {
                len,
                from,
                stride: len,
            });
        }
        self.inner.try_io(tokio::io::Interest::READABLE, || {
            let mut iov = [io::IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(libc::c_int);
            let msg = recvmsg::<SockaddrStorage>(
                self.inner.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .map_err(io::Error::from)?;
            let len = msg.bytes;
            let mut stride = len;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(size) = c {
                        stride = usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(len);
                    }
                }
            }
            let from = msg
                .address
                .as_ref()
                .and_then(storage_to_addr)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            Ok(Received {
                len,
                from: canonical(from),
                stride,
            })
        })
    }

    /// Sends `segments` to `dst` as one UDP GSO send: every segment but the
    /// last must be `segment_len` bytes, the last at most that. Returns
    /// `Unsupported` (and never tries again) if the kernel refuses GSO: the
    /// caller then sends the segments one by one.
    pub fn try_send_segments(
        &self,
        segments: &[IoSlice<'_>],
        segment_len: u16,
        dst: SocketAddr,
    ) -> io::Result<usize> {
        if !self.gso() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let addr = SockaddrStorage::from(self.socket_addr(dst));
        let result = self.inner.try_io(tokio::io::Interest::WRITABLE, || {
            let cmsg = [ControlMessage::UdpGsoSegments(&segment_len)];
            sendmsg(
                self.inner.as_raw_fd(),
                segments,
                &cmsg,
                MsgFlags::empty(),
                Some(&addr),
            )
            .map_err(io::Error::from)
        });
        match result {
            // EIO: the device cannot checksum-offload GSO; EINVAL: no GSO.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                tracing::info!(error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                self.gso.store(false, Ordering::Relaxed);
                Err(io::ErrorKind::Unsupported.into())
            }
            other => other,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.inner.writable().await
    }

    pub fn local_port(&self) -> io::Result<u16> {
        self.inner.local_addr().map(|a| a.port())
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.inner.readable().await
    }

    /// One datagram, with its source as a plain (never v4-mapped) address.
    #[inline]
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.inner.try_recv_from(buf)?;
        Ok((n, canonical(from)))
    }

    #[inline]
    pub fn try_send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.inner.try_send_to(buf, self.socket_addr(dst))
    }

    pub async fn send_to(&self, buf: &[u8], dst: SocketAddr) -> io::Result<usize> {
        self.inner.send_to(buf, self.socket_addr(dst)).await
    }

    pub fn poll_send_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.inner.poll_send_ready(cx)
    }

    /// The socket's own address family's spelling of `addr`: v4-mapped on a
    /// dual-stack socket. quinn wants addresses as its socket spells them.
    pub fn native_addr(&self, addr: SocketAddr) -> SocketAddr {
        self.socket_addr(addr)
    }

    /// The bound address, in the socket's own family.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    #[inline]
    fn socket_addr(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }
}

/// How many of `items` (from the first) one GSO send can carry: the same
/// destination, every datagram as long as the first but the last (which may
/// be shorter), at most [`MAX_GSO_SEGMENTS`] and [`MAX_GSO_BYTES`] in all.
/// At least 1 for a non-empty slice.
pub fn gso_run<T>(items: &[T], dst_and_len: impl Fn(&T) -> (SocketAddr, usize)) -> usize {
    let Some((dst, segment)) = items.first().map(&dst_and_len) else {
        return 0;
    };
    let mut total = segment;
    let mut n = 1;
    for item in &items[1..] {
        let (d, len) = dst_and_len(item);
        if d != dst || len > segment || n == MAX_GSO_SEGMENTS || total + len > MAX_GSO_BYTES {
            break;
        }
        n += 1;
        total += len;
        if len < segment {
            break;
        }
    }
    n
}

/// Whether the kernel accepts UDP_SEGMENT on this socket.
fn probe_gso(socket: &Socket) -> bool {
    // Setting a segment size of 0 per socket is a no-op that fails only
    // where UDP GSO is unknown.
    setsockopt(socket, sockopt::UdpGsoSegment, &0).is_ok()
}

fn storage_to_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    s.as_sockaddr_in6().map(|v6| {
        SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        ))
    })
}

fn dual_stack_socket(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gso_run_is_one_destination_of_equal_sizes_with_a_shorter_tail() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let run = |items: &[(SocketAddr, usize)]| gso_run(items, |&(d, l)| (d, l));
        assert_eq!(run(&[]), 0);
        assert_eq!(
            run(&[(a, 1400), (a, 1400), (a, 600), (a, 1400)]),
            3,
            "the shorter one ends the run"
        );
        assert_eq!(
            run(&[(a, 1400), (a, 1400), (b, 1400)]),
            2,
            "another destination ends it"
        );
        assert_eq!(run(&[(a, 600), (a, 1400)]), 1, "a longer one cannot follow");
        assert_eq!(run(&vec![(a, 100); 100]), MAX_GSO_SEGMENTS);
        assert_eq!(run(&vec![(a, 1400); 100]), MAX_GSO_BYTES / 1400);
    }

    #[tokio::test]
    async fn loopback_round_trip_in_both_families() {
        let a = UdpSocket::bind(0).unwrap();
        let b = UdpSocket::bind(0).unwrap();
        let dst = SocketAddr::from(([127, 0, 0, 1], b.local_port().unwrap()));
        a.send_to(b"hello", dst).await.unwrap();
        b.readable().await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = loop {
            match b.try_recv_from(&mut buf) {
                Ok(r) => break r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => b.readable().await.unwrap(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&buf[..n], b"hello");
        assert!(from.is_ipv4(), "{from}");
    }
}
