//! meshd's one UDP socket.
//!
//! Does I/O. Dual-stack where the host has IPv6 (one socket, IPv4 peers as
//! v4-mapped addresses inside, plain IPv4 addresses everywhere else), IPv4
//! only where it has not. Large kernel buffers, because a burst the kernel
//! drops is a TCP stall inside the tunnel.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel socket buffer size asked for (SO_RCVBUFFORCE when permitted).
const SOCKET_BUFFER: usize = 4 << 20;

#[derive(Debug)]
pub struct UdpSocket {
    inner: tokio::net::UdpSocket,
    dual_stack: bool,
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
        let inner = tokio::net::UdpSocket::from_std(socket.into())?;
        Ok(Self { inner, dual_stack })
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

    pub fn poll_send_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
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

fn dual_stack_socket(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

/// Asks for [`SOCKET_BUFFER`]-sized kernel buffers on a UDP socket (the
/// rendezvous's relay socket too): a burst the kernel drops is a TCP stall
/// inside the tunnel, the usual cause of low relay ceilings.
pub fn size_buffers(s: socket2::SockRef<'_>) {
    // The FORCE options ignore net.core.{r,w}mem_max but need CAP_NET_ADMIN,
    // which meshd has; without it, take what the sysctl allows.
    if set_int_option(&s, libc::SO_RCVBUFFORCE, SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if set_int_option(&s, libc::SO_SNDBUFFORCE, SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
}

fn set_int_option(s: &Socket, option: libc::c_int, value: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket fd, and a pointer/length pair to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// v4-mapped IPv6 (`::ffff:a.b.c.d`) → plain IPv4, so the engine sees one
/// spelling per address and roaming comparisons work.
#[inline]
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_become_plain_v4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(canonical(v6), v6);
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
