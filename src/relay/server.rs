//! The relay shell inside mesh-rendezvous: quinn connections around the
//! pure [`RelayTable`].
//!
//! Does I/O. One task owns the table and every admitted connection's
//! handle ([`Relay::spawn`]); each connection task feeds it the frames its
//! node sends, from QUIC datagrams and unidirectional streams, through an
//! [`Inlet`]. The relay task sends each forwarded frame the same way: as a
//! datagram when it fits, else on a fresh stream, so no packet up to the
//! mesh MTU is ever dropped for its size. Stream sends per destination are
//! bounded; beyond that a frame is dropped and counted.
//!
//! # The queue into the relay task
//!
//! Frames from every connection meet in one task, so one queue leads into
//! it. With one bound for everybody, a node flooding the relay would fill
//! that queue — its frames are refused by its rate limit only once the
//! relay task reads them — and every other node's frames would find the
//! queue full: the rate limit would protect the destinations, but not the
//! relay. So each connection has its own share of the queue instead:
//! frames worth [`INBOUND_SHARE`] units of [`SHARE_UNIT`] bytes (a frame
//! costs one unit per started `SHARE_UNIT` bytes, so the share bounds both
//! how many frames wait and how much memory they take). A datagram that
//! finds its connection's share used up is dropped at once and counted
//! ([`DropReason::InboundFull`]), as a full router queue would; a frame off
//! a relay stream waits for room, which holds back that stream, and QUIC
//! flow control its sender. A flooder fills its own share and no more, and
//! another node's frame waits behind at most one share per connection.
//! The channel itself needs no bound of its own: the shares bound it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::stream::send_on_stream;
use super::{Command, ConnId, DropReason, NodeId, PairStats, RelayLimits, RelayStats, RelayTable};
use crate::wire::relay::{fits_datagram, HEADER_LEN};

/// Stream sends in flight per destination before frames are dropped.
const STREAM_QUEUE: usize = 64;
/// Units of queue one connection may fill towards the relay task (see the
/// module docs): 512 full-size datagrams, or about 750 KB: a TCP window
/// through the relay in flight without drops.
pub const INBOUND_SHARE: u32 = 512;
/// Bytes of frame per unit of [`INBOUND_SHARE`]: one full-size relay frame
/// (a 1380-byte mesh0 packet in WireGuard and relay headers) is one unit.
pub const SHARE_UNIT: usize = 1500;

/// What the relay task is told.
#[derive(Debug)]
enum Input {
    /// Registered nodes at start-up, so "offline" is told from "unknown".
    Register(NodeId),
    Connect {
        node: NodeId,
        conn: ConnId,
        connection: quinn::Connection,
    },
    /// The connection's inlet is gone; `dropped` datagrams it refused were
    /// not reported yet.
    Disconnect {
        conn: ConnId,
        dropped: u64,
    },
    Remove(NodeId),
    /// A link to another server of the mesh is up on `conn`.
    Link {
        conn: ConnId,
        connection: quinn::Connection,
    },
    /// `node` is reached over link `via` (or is not, `None`).
    Route {
        node: NodeId,
        via: Option<ConnId>,
    },
    /// One frame, holding its part of its connection's share until the
    /// relay task has dealt with it; `dropped_before` datagrams refused
    /// since the connection's last frame.
    Frame {
        conn: ConnId,
        frame: Bytes,
        share: OwnedSemaphorePermit,
        dropped_before: u64,
    },
    /// The table's counters, for metrics.
    Snapshot(oneshot::Sender<RelaySnapshot>),
}

/// The relay's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelaySnapshot {
    /// Everything forwarded, and drops by reason.
    pub stats: RelayStats,
    /// Forwarded traffic per (source, destination) that carried something,
    /// ordered by source then destination.
    pub pairs: Vec<((NodeId, NodeId), PairStats)>,
}

impl RelaySnapshot {
    pub fn of(table: &RelayTable) -> Self {
        Self {
            stats: table.stats().clone(),
            pairs: table.pair_stats().collect(),
        }
    }
}

/// The rendezvous's handle on the relay task. Cheap to clone; the task runs
/// until every handle and [`Inlet`] is gone.
#[derive(Debug, Clone)]
pub struct Relay {
    inputs: mpsc::UnboundedSender<Input>,
}

impl Relay {
    /// Starts the relay task with these per-node limits.
    pub fn spawn(limits: RelayLimits) -> (Self, JoinHandle<()>) {
        let (relay, inbox) = Self::unstarted();
        (relay, tokio::spawn(run(inbox, limits)))
    }

    /// A handle and the inbox a relay task would read.
    fn unstarted() -> (Self, mpsc::UnboundedReceiver<Input>) {
        let (inputs, inbox) = mpsc::unbounded_channel();
        (Self { inputs }, inbox)
    }

    /// A node the registry knows, online or not.
    pub fn register(&self, node: NodeId) {
        let _ = self.inputs.send(Input::Register(node));
    }

    /// A node the registry removed: frames to it are unknown from now on.
    pub fn remove(&self, node: NodeId) {
        let _ = self.inputs.send(Input::Remove(node));
    }

    /// `node` was admitted on `conn`: frames to it go to `connection` from
    /// now on, and the returned inlet carries its frames to the relay.
    /// Dropping the inlet disconnects `conn`.
    pub fn connect(&self, node: NodeId, conn: ConnId, connection: quinn::Connection) -> Inlet {
        let _ = self.inputs.send(Input::Connect {
            node,
            conn,
            connection,
        });
        self.inlet(conn)
    }

    /// A link to another server of the mesh is up on `conn`: link frames
    /// come in through the returned inlet, and frames for the nodes routed
    /// over it go out on `connection`. Dropping the inlet takes it down.
    pub fn link(&self, conn: ConnId, connection: quinn::Connection) -> Inlet {
        let _ = self.inputs.send(Input::Link { conn, connection });
        self.inlet(conn)
    }

    /// `node` is connected to the server link `via` reaches (`None`: to no
    /// server this one has a link to).
    pub fn route(&self, node: NodeId, via: Option<ConnId>) {
        let _ = self.inputs.send(Input::Route { node, via });
    }

    /// The relay's counters, once the relay task has dealt with what was
    /// queued before; `None` if it has stopped.
    pub async fn snapshot(&self) -> Option<RelaySnapshot> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Snapshot(reply)).ok()?;
        answer.await.ok()
    }

    fn inlet(&self, conn: ConnId) -> Inlet {
        Inlet {
            streams: StreamInlet {
                conn,
                inputs: self.inputs.clone(),
                share: Arc::new(Semaphore::new(INBOUND_SHARE as usize)),
            },
            dropped: 0,
        }
    }
}

/// One admitted connection's way into the relay task, with its share of
/// the queue (see the module docs).
#[derive(Debug)]
pub struct Inlet {
    streams: StreamInlet,
    /// Datagrams refused since the last frame that got through.
    dropped: u64,
}

impl Inlet {
    /// A frame out of a DATAGRAM: queued if the connection's share has
    /// room, else dropped and counted.
    pub fn datagram(&mut self, frame: Bytes) {
        let StreamInlet {
            conn,
            inputs,
            share,
        } = &self.streams;
        let Ok(share) = share.clone().try_acquire_many_owned(cost(&frame)) else {
            tracing::trace!(%conn, "relay inlet full; datagram dropped");
            self.dropped += 1;
            return;
        };
        let dropped_before = std::mem::take(&mut self.dropped);
        let _ = inputs.send(Input::Frame {
            conn: *conn,
            frame,
            share,
            dropped_before,
        });
    }

    /// A handle for a task that reads one of the connection's relay streams.
    pub fn streams(&self) -> StreamInlet {
        self.streams.clone()
    }
}

impl Drop for Inlet {
    fn drop(&mut self) {
        let StreamInlet { conn, inputs, .. } = &self.streams;
        let _ = inputs.send(Input::Disconnect {
            conn: *conn,
            dropped: self.dropped,
        });
    }
}

/// Frames off one connection's relay streams, sharing the connection's
/// queue with its datagrams.
#[derive(Debug, Clone)]
pub struct StreamInlet {
    conn: ConnId,
    inputs: mpsc::UnboundedSender<Input>,
    share: Arc<Semaphore>,
}

impl StreamInlet {
    /// Waits for room in the connection's share, then queues the frame.
    /// False once the relay has stopped.
    pub async fn frame(&self, frame: Bytes) -> bool {
        let Ok(share) = self.share.clone().acquire_many_owned(cost(&frame)).await else {
            return false;
        };
        self.inputs
            .send(Input::Frame {
                conn: self.conn,
                frame,
                share,
                dropped_before: 0,
            })
            .is_ok()
    }
}

/// Units of share a frame takes: one per started [`SHARE_UNIT`] bytes. At
/// most 55 for the largest frame, so every frame fits an empty share.
fn cost(frame: &Bytes) -> u32 {
    let units = frame.len().div_ceil(SHARE_UNIT).max(1);
    u32::try_from(units)
        .unwrap_or(INBOUND_SHARE)
        .min(INBOUND_SHARE)
}

struct Destination {
    connection: quinn::Connection,
    streams: Arc<Semaphore>,
}

/// Runs the relay until every sender of `inputs` is gone.
async fn run(mut inputs: mpsc::UnboundedReceiver<Input>, limits: RelayLimits) {
    let mut table = RelayTable::new(limits);
    let mut conns: HashMap<ConnId, Destination> = HashMap::new();
    while let Some(input) = inputs.recv().await {
        match input {
            Input::Register(node) => table.register(node),
            Input::Connect {
                node,
                conn,
                connection,
            } => {
                table.connect(node, conn);
                conns.insert(
                    conn,
                    Destination {
                        connection,
                        streams: Arc::new(Semaphore::new(STREAM_QUEUE)),
                    },
                );
            }
            Input::Disconnect { conn, dropped } => {
                table.count_drops(DropReason::InboundFull, dropped);
                table.disconnect(conn);
                conns.remove(&conn);
            }
            Input::Remove(node) => table.remove(node),
            Input::Link { conn, connection } => {
                table.connect_link(conn);
                conns.insert(
                    conn,
                    Destination {
                        connection,
                        streams: Arc::new(Semaphore::new(STREAM_QUEUE)),
                    },
                );
            }
            Input::Route { node, via } => table.route(node, via),
            Input::Frame {
                conn,
                frame,
                share,
                dropped_before,
            } => {
                table.count_drops(DropReason::InboundFull, dropped_before);
                match table.handle_frame(conn, frame, Instant::now()) {
                    Command::Forward { to, frame } => match conns.get(&to) {
                        Some(dest) => {
                            if !send(dest, frame) {
                                table.count_drop(DropReason::QueueFull);
                            }
                        }
                        None => table.count_drop(DropReason::DestinationOffline),
                    },
                    Command::Drop { reason } => tracing::trace!(%reason, "relay drop"),
                }
                // The frame has left the queue: its room is the connection's again.
                drop(share);
            }
            Input::Snapshot(reply) => {
                let _ = reply.send(RelaySnapshot::of(&table));
            }
        }
    }
}

/// Sends a frame as a datagram, or on its own stream when too big.
/// Returns false when the destination's stream queue is full.
fn send(dest: &Destination, frame: Bytes) -> bool {
    // The whole frame must fit (a link frame's second header included).
    let payload_len = frame.len().saturating_sub(HEADER_LEN);
    if fits_datagram(payload_len, dest.connection.max_datagram_size()) {
        match dest.connection.send_datagram(frame.clone()) {
            Ok(()) => return true,
            // The path's datagram size shrank under us: use a stream.
            Err(quinn::SendDatagramError::TooLarge) => {}
            Err(_) => return true,
        }
    }
    send_on_stream(&dest.connection, &dest.streams, frame)
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;
    use crate::wire::relay::{encode_frame, RelayHeader, RelayKind, MAX_FRAME_LEN};

    fn frame(payload_len: usize) -> Bytes {
        let header = RelayHeader {
            kind: RelayKind::Packet,
            node: NodeId::new(7).unwrap(),
        };
        let mut out = Vec::new();
        encode_frame(header, &vec![4; payload_len], &mut out).unwrap();
        out.into()
    }

    /// The frames waiting in the relay task's inbox: (connection, dropped
    /// before it); other inputs are ignored.
    fn queued(inbox: &mut mpsc::UnboundedReceiver<Input>) -> Vec<(ConnId, u64)> {
        let mut frames = Vec::new();
        while let Ok(input) = inbox.try_recv() {
            if let Input::Frame {
                conn,
                dropped_before,
                ..
            } = input
            {
                frames.push((conn, dropped_before));
            }
        }
        frames
    }

    #[test]
    fn a_flooding_connection_fills_its_own_share_of_the_relay_queue_and_no_one_elses() {
        // The relay task is stalled: nothing leaves the queue.
        let (relay, mut inbox) = Relay::unstarted();
        let mut flooder = relay.inlet(ConnId(1));
        let mut other = relay.inlet(ConnId(2));
        let share = INBOUND_SHARE as usize;
        for _ in 0..10 * share {
            flooder.datagram(frame(100));
        }
        other.datagram(frame(100));
        let waiting = queued(&mut inbox);
        assert_eq!(waiting.len(), share + 1);
        assert!(waiting[..share].iter().all(|f| *f == (ConnId(1), 0)));
        assert_eq!(
            waiting[share],
            (ConnId(2), 0),
            "the other connection's frame still gets in"
        );

        // Once the relay has dealt with them (the frames and their shares
        // dropped above), the flooder gets in again, reporting what it lost.
        flooder.datagram(frame(100));
        assert_eq!(queued(&mut inbox), vec![(ConnId(1), 9 * share as u64)]);
    }

    #[test]
    fn a_large_frame_takes_more_of_the_share_and_a_stream_frame_waits_for_room_instead_of_being_dropped(
    ) {
        let (relay, mut inbox) = Relay::unstarted();
        let mut inlet = relay.inlet(ConnId(1));
        let streams = inlet.streams();
        // Frames of about 5 KB take several units each: as many fit as the
        // share allows, and what is left is less than a 2 KB frame needs.
        let (big, small) = (cost(&frame(5_000)), cost(&frame(2_000)));
        assert!(big > 1 && small > 1, "both take more than one unit");
        let fit = INBOUND_SHARE / big;
        assert!(
            INBOUND_SHARE - fit * big < small,
            "the rest cannot take a 2 KB frame"
        );
        for _ in 0..fit + 13 {
            inlet.datagram(frame(5_000));
        }
        let held: Vec<Input> = std::iter::from_fn(|| inbox.try_recv().ok()).collect();
        assert_eq!(held.len(), fit as usize);

        let mut stream_frame = Box::pin(streams.frame(frame(2_000)));
        assert!(
            (&mut stream_frame).now_or_never().is_none(),
            "a full share holds the stream frame back"
        );
        drop(held);
        assert_eq!(
            stream_frame.now_or_never(),
            Some(true),
            "room again: the stream frame is queued"
        );
        assert_eq!(queued(&mut inbox), vec![(ConnId(1), 0)]);
    }

    #[test]
    fn dropping_an_inlet_disconnects_its_connection_and_reports_what_it_dropped() {
        let (relay, mut inbox) = Relay::unstarted();
        let mut inlet = relay.inlet(ConnId(3));
        for _ in 0..INBOUND_SHARE + 5 {
            inlet.datagram(frame(10));
        }
        drop(inlet);
        let last = std::iter::from_fn(|| inbox.try_recv().ok()).last();
        assert!(
            matches!(
                last,
                Some(Input::Disconnect {
                    conn: ConnId(3),
                    dropped: 5
                })
            ),
            "{last:?}"
        );
    }

    #[tokio::test]
    async fn a_snapshot_counts_every_frame_queued_before_it() {
        let (relay, task) = Relay::spawn(RelayLimits::default());
        let mut stranger = relay.inlet(ConnId(9));
        stranger.datagram(frame(10));
        stranger.datagram(frame(10));
        let snapshot = relay.snapshot().await.expect("the relay runs");
        assert_eq!(snapshot.stats.dropped(DropReason::NotAdmitted), 2);
        assert_eq!(snapshot.stats.forwarded, PairStats::default());
        assert!(snapshot.pairs.is_empty());
        drop((stranger, relay));
        task.await.unwrap();
    }

    #[test]
    fn a_relay_frame_costs_one_unit_per_started_datagram_of_bytes_and_the_largest_fits_a_share() {
        let of_len = |len: usize| cost(&Bytes::from(vec![0u8; len]));
        assert_eq!(of_len(0), 1);
        assert_eq!(of_len(HEADER_LEN + 1), 1);
        assert_eq!(of_len(SHARE_UNIT), 1);
        assert_eq!(of_len(SHARE_UNIT + 1), 2);
        assert_eq!(
            of_len(MAX_FRAME_LEN) as usize,
            MAX_FRAME_LEN.div_ceil(SHARE_UNIT)
        );
        // A full-size mesh0 packet (1380) in WireGuard (32) and relay headers is one unit.
        assert_eq!(of_len(1380 + 32 + HEADER_LEN), 1);
        assert!(of_len(MAX_FRAME_LEN) <= INBOUND_SHARE);
    }
}
