//! UDP socket helpers both binaries use: meshd's one socket
//! ([`crate::dataplane::udp`]) and the rendezvous's QUIC and relay socket
//! ([`crate::rendezvous::server`]).
//!
//! Does I/O ([`size_buffers`] sets socket options); [`canonical`] and
//! [`QuicSource`], the filter in front of the node's QUIC endpoint, are pure.
//! What only the node's packet loop needs (GSO, GRO, batching) stays in
//! `dataplane::udp`.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;

/// Kernel socket buffer size asked for (SO_RCVBUFFORCE when permitted).
const SOCKET_BUFFER: usize = 4 << 20;

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

/// The addresses whose QUIC datagrams reach the node's endpoint: the
/// rendezvous's, as the session resolved it before connecting (while a
/// node races its servers' handshakes, each of theirs). None (no session
/// tried yet) admits nothing.
#[derive(Debug, Default)]
pub struct QuicSource(std::sync::RwLock<Vec<SocketAddr>>);

impl QuicSource {
    /// The rendezvous is at `addr` from now on.
    pub fn set(&self, addr: SocketAddr) {
        self.set_all(&[addr]);
    }

    /// The rendezvous is one of `addrs` (a race of handshakes).
    pub fn set_all(&self, addrs: &[SocketAddr]) {
        if let Ok(mut source) = self.0.write() {
            *source = addrs.iter().copied().map(canonical).collect();
        }
    }

    /// Whether a datagram from `from` may reach the QUIC endpoint.
    pub fn admits(&self, from: SocketAddr) -> bool {
        let from = canonical(from);
        self.0.read().is_ok_and(|source| source.contains(&from))
    }
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

    #[test]
    fn buffers_are_sized_on_a_plain_udp_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        size_buffers(socket2::SockRef::from(&socket));
        let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        assert!(got > 0, "{got}");
    }

    #[test]
    fn only_the_rendezvous_address_feeds_the_quic_endpoint() {
        let source = QuicSource::default();
        let rendezvous: SocketAddr = "203.0.113.9:7443".parse().unwrap();
        assert!(
            !source.admits(rendezvous),
            "nothing before a session resolved the rendezvous"
        );
        source.set(rendezvous);
        assert!(source.admits(rendezvous));
        assert!(
            source.admits("[::ffff:203.0.113.9]:7443".parse().unwrap()),
            "as a dual-stack socket reports it"
        );
        assert!(
            !source.admits("203.0.113.9:7444".parse().unwrap()),
            "another port"
        );
        assert!(
            !source.admits("198.51.100.1:7443".parse().unwrap()),
            "another host"
        );
        let other: SocketAddr = "198.51.100.1:7443".parse().unwrap();
        source.set_all(&[rendezvous, other]);
        assert!(source.admits(rendezvous) && source.admits(other), "a race");
        source.set(other);
        assert!(
            !source.admits(rendezvous),
            "the race's loser, once it is over"
        );
    }
}
