//! The relay shell inside mesh-rendezvous: quinn connections around the
//! pure [`RelayTable`].
//!
//! Does I/O. One task owns the table and every admitted connection's
//! handle; connection tasks feed it frames read from QUIC datagrams and
//! unidirectional streams, and it sends each forwarded frame the same way:
//! as a datagram when it fits, else on a fresh stream, so no packet up to
//! the mesh MTU is ever dropped for its size. Stream sends per destination
//! are bounded; beyond that a frame is dropped and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::{Command, DropReason, NodeId, RelayLimits, RelayTable};
use crate::rendezvous::registry::ConnId;
use super::stream::send_on_stream;
use crate::wire::relay::{fits_datagram, HEADER_LEN};

/// Stream sends in flight per destination before frames are dropped.
const STREAM_QUEUE: usize = 64;

/// What connection tasks tell the relay task.
#[derive(Debug)]
pub enum RelayInput {
    /// Registered nodes at start-up, so "offline" is told from "unknown".
    Register(NodeId),
    Connect { node: NodeId, conn: ConnId, connection: quinn::Connection },
    Disconnect { conn: ConnId },
    Remove(NodeId),
    Frame { conn: ConnId, frame: Bytes },
}

struct Destination {
    connection: quinn::Connection,
    streams: Arc<Semaphore>,
}

/// Runs the relay until every sender of `inputs` is gone.
pub async fn run(mut inputs: mpsc::Receiver<RelayInput>) {
    let mut table = RelayTable::new(RelayLimits::default());
    let mut conns: HashMap<ConnId, Destination> = HashMap::new();
    while let Some(input) = inputs.recv().await {
        match input {
            RelayInput::Register(node) => table.register(node),
            RelayInput::Connect { node, conn, connection } => {
                table.connect(node, conn);
                conns.insert(conn, Destination { connection, streams: Arc::new(Semaphore::new(STREAM_QUEUE)) });
            }
            RelayInput::Disconnect { conn } => {
                table.disconnect(conn);
                conns.remove(&conn);
            }
            RelayInput::Remove(node) => table.remove(node),
            RelayInput::Frame { conn, frame } => match table.handle_frame(conn, frame, Instant::now()) {
                Command::Forward { to, frame } => {
                    let Some(dest) = conns.get(&to) else {
                        table.count_drop(DropReason::DestinationOffline);
                        continue;
                    };
                    if !send(dest, frame) {
                        table.count_drop(DropReason::QueueFull);
                    }
                }
                Command::Drop { reason } => tracing::trace!(%reason, "relay drop"),
            },
        }
    }
}

/// Sends a frame as a datagram, or on its own stream when too big.
/// Returns false when the destination's stream queue is full.
fn send(dest: &Destination, frame: Bytes) -> bool {
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
