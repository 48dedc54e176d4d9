//! The rendezvous's NAT-check port: answers "where do you see me?"
//! ([`crate::wire::reflect`]) on its QUIC port + 1.
//!
//! Does I/O (one UDP socket). A node compares this answer with the address
//! the QUIC port sees to tell a cone NAT from a symmetric one
//! (`meshctl netcheck`). Every answer is exactly as long as its request, so
//! the port can't be used to amplify a spoofed flood; anything but a
//! well-formed request is dropped silently.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

use crate::wire::reflect::{self, REFLECT_LEN};

/// The NAT-check socket, bound and not yet serving.
pub struct Reflector {
    socket: UdpSocket,
}

impl Reflector {
    /// Binds the port next to the QUIC `listen` address.
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Self> {
        let addr = SocketAddr::new(
            listen.ip(),
            listen.port().wrapping_add(reflect::PORT_OFFSET),
        );
        Ok(Self {
            socket: UdpSocket::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers requests until the task is dropped.
    pub async fn serve(self) {
        // One byte more than a request, to tell an oversized datagram apart.
        let mut buf = [0u8; REFLECT_LEN + 1];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "NAT-check port receive failed");
                    continue;
                }
            };
            let Some(answer) = buf.get(..n).and_then(|d| reflect::answer(d, from)) else {
                tracing::trace!(%from, len = n, "not a NAT check; dropped");
                continue;
            };
            if let Err(e) = self.socket.send_to(&answer, from).await {
                tracing::debug!(%from, error = %e, "NAT-check answer not sent");
            }
        }
    }
}
