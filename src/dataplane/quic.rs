//! quinn's view of meshd's one UDP socket.
//!
//! Does I/O. The driver reads every datagram and hands the QUIC ones (first
//! byte with 0x40 set, see [`crate::wire`]) to this adapter through a
//! bounded channel; quinn sends straight on the shared socket. So the
//! rendezvous sees exactly the NAT mapping WireGuard uses, and one firewall
//! port is enough.
//!
//! The node's QUIC endpoint talks to its rendezvous and nobody else, so
//! the driver asks [`QuicSource`] (in [`crate::sockets`]) before it queues a datagram: QUIC-looking
//! datagrams from any other address are dropped and counted, and a
//! stranger's flood can't fill the queue the rendezvous's packets need.
//!
//! A send the kernel refuses (no route while a roaming node's network
//! changes, a firewall's reject) is a lost datagram to quinn, as with
//! quinn's own sockets: an error handed back would stop the connection's
//! driver for good, timers and all, and the node would never notice its
//! session was gone.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use super::udp::{UdpSocket, MAX_GSO_SEGMENTS};

/// QUIC datagrams waiting for quinn; beyond this they are dropped (QUIC
/// recovers) rather than queued without bound.
pub const INBOX: usize = 256;

/// One QUIC datagram the driver demultiplexed.
pub struct QuicDatagram {
    pub from: SocketAddr,
    pub data: bytes::Bytes,
}

pub struct SharedSocket {
    udp: Arc<UdpSocket>,
    inbox: Mutex<mpsc::Receiver<QuicDatagram>>,
    /// Sends the kernel refused, taken as lost.
    send_errors: AtomicU64,
}

impl SharedSocket {
    /// The adapter, and the sender the driver feeds it with.
    pub fn new(udp: Arc<UdpSocket>) -> (Arc<Self>, mpsc::Sender<QuicDatagram>) {
        let (tx, rx) = mpsc::channel(INBOX);
        (
            Arc::new(Self {
                udp,
                inbox: Mutex::new(rx),
                send_errors: AtomicU64::new(0),
            }),
            tx,
        )
    }

    /// Sends the kernel refused since meshd started, taken as lost.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    /// One transmit on the socket, as one GSO send where it holds several
    /// packets.
    fn send(&self, transmit: &Transmit) -> io::Result<()> {
        let dst = transmit.destination;
        let Some(size) = transmit
            .segment_size
            .filter(|&s| s < transmit.contents.len())
        else {
            return self.udp.try_send_to(transmit.contents, dst).map(|_| ());
        };
        let segment_len =
            u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match self
            .udp
            .try_send_segments(&[IoSlice::new(transmit.contents)], segment_len, dst)
        {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                // GSO just turned out unavailable: one by one. A WouldBlock
                // half-way makes quinn send the whole transmit again; QUIC
                // discards the duplicates.
                for packet in transmit.contents.chunks(size) {
                    self.udp.try_send_to(packet, dst)?;
                }
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }
}

impl fmt::Debug for SharedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSocket").finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for SharedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            udp: self.udp.clone(),
        })
    }

    /// quinn may hand over several equal-sized QUIC packets at once (the
    /// relay's datagrams, mostly): one GSO send for all of them.
    fn max_transmit_segments(&self) -> usize {
        if self.udp.gso() {
            MAX_GSO_SEGMENTS
        } else {
            1
        }
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.send(transmit) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                let count = self.send_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if count.is_power_of_two() {
                    tracing::info!(
                        dst = %transmit.destination,
                        error = %e,
                        count,
                        "QUIC send failed: taken as lost"
                    );
                }
                Ok(())
            }
            other => other,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut inbox) = self.inbox.lock() else {
            return Poll::Ready(Err(io::Error::other("QUIC inbox lock poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let datagram = if n == 0 {
                match inbox.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(io::Error::other("meshd driver stopped")))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match inbox.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            // A datagram larger than quinn's buffer is not a QUIC packet we sent for.
            let Some(dst) = bufs[n].get_mut(..datagram.data.len()) else {
                continue;
            };
            dst.copy_from_slice(&datagram.data);
            meta[n] = RecvMeta {
                addr: self.udp.native_addr(datagram.from),
                len: datagram.data.len(),
                stride: datagram.data.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

#[derive(Debug)]
struct Writable {
    udp: Arc<UdpSocket>,
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.udp.poll_send_ready(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a failure is a panic")]

    use super::*;

    /// A send the kernel refuses must not reach quinn as an error: its
    /// connection driver would stop for good and the node's session with
    /// it, silently (seen when a roaming node's link went down before its
    /// new route came up: "Network is unreachable").
    #[tokio::test]
    async fn a_refused_send_is_a_lost_datagram_not_an_error() {
        let udp = Arc::new(UdpSocket::bind(0).unwrap());
        let (socket, _inbox) = SharedSocket::new(udp.clone());
        // tokio sends only once the socket has been seen writable.
        std::future::poll_fn(|cx| udp.poll_send_ready(cx))
            .await
            .unwrap();
        let transmit = |destination, contents, segment_size| Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        // Broadcast without SO_BROADCAST: the kernel says EACCES.
        let refused = SocketAddr::from(([255, 255, 255, 255], 9));
        assert!(socket.send(&transmit(refused, b"x", None)).is_err());
        socket.try_send(&transmit(refused, b"x", None)).unwrap();
        socket
            .try_send(&transmit(refused, &[0; 2400], Some(1200)))
            .unwrap();
        assert_eq!(socket.send_errors.load(Ordering::Relaxed), 2);

        // And the socket still sends.
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = peer.local_addr().unwrap();
        socket.try_send(&transmit(to, b"hello", None)).unwrap();
        let mut buf = [0; 16];
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(socket.send_errors.load(Ordering::Relaxed), 2);
    }
}
