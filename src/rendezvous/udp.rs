//! The server's UDP socket as quinn sees it: the runtime's own, with the
//! GSO batch capped at [`BATCH`] datagrams.
//!
//! quinn keeps a transmit buffer in every connection, sized for the largest
//! batch the socket accepts the first time a connection has more than one
//! datagram to send (its handshake already does): ten datagrams, 16 KiB,
//! for as long as the connection lives. That was a quarter of the server's
//! memory per node, for batches that only the relay's bulk traffic fills.
//! A cap of [`BATCH`] keeps most of what batching gives the relay path and
//! a third of the buffer (BENCHMARKS.md, "Memory per node").

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// The most datagrams quinn hands the socket in one send.
pub const BATCH: usize = 3;

/// `socket` for quinn, on `runtime`, with batches of at most [`BATCH`].
pub fn wrap(
    runtime: &dyn Runtime,
    socket: std::net::UdpSocket,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    Ok(Arc::new(CappedBatches {
        inner: runtime.wrap_udp_socket(socket)?,
    }))
}

struct CappedBatches {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl fmt::Debug for CappedBatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CappedBatches").finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for CappedBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(BATCH)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_are_capped_and_datagrams_still_flow() {
        let runtime = quinn::TokioRuntime;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uncapped = runtime
            .wrap_udp_socket(socket.try_clone().unwrap())
            .unwrap()
            .max_transmit_segments();
        let capped = wrap(&runtime, socket).unwrap();
        assert_eq!(capped.max_transmit_segments(), uncapped.min(BATCH));
        assert!(capped.max_transmit_segments() >= 1);

        // A datagram sent through the wrapper arrives.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let transmit = Transmit {
            destination: peer.local_addr().unwrap(),
            ecn: None,
            contents: b"through the cap",
            segment_size: None,
            src_ip: None,
        };
        let mut poller = capped.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .unwrap();
        capped.try_send(&transmit).unwrap();
        let mut buf = [0u8; 64];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"through the cap");
        assert_eq!(from, capped.local_addr().unwrap());
    }
}
