//! Where each admitted node's connection is: quinn moves a connection when
//! the node's packets come from a new address (and the new path answers),
//! and says so to nobody. The server looks once a second, for all of its
//! connections at once: one timer and one pass, not a timer and a wakeup
//! of every connection's task, which at 10,000 nodes was 10,000 wakeups a
//! second, each polling every read the task waits on.
//!
//! Does no I/O itself: the server's task calls [`Moves::moved`] on its tick
//! and tells the registry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::registry::ConnId;
use crate::sockets::canonical;

/// The admitted connections and where each was last seen.
#[derive(Clone, Default)]
pub struct Moves {
    watched: Arc<Mutex<HashMap<ConnId, Watched>>>,
}

struct Watched {
    connection: quinn::Connection,
    at: SocketAddr,
}

impl Moves {
    /// Watches `connection`, now at `at`, until the guard is dropped.
    pub fn watch(&self, conn: ConnId, connection: quinn::Connection, at: SocketAddr) -> Watching {
        self.lock().insert(conn, Watched { connection, at });
        Watching {
            conn,
            moves: self.clone(),
        }
    }

    /// The connections that moved since the last call, each with where it
    /// is now.
    pub fn moved(&self) -> Vec<(ConnId, SocketAddr)> {
        let mut moved = Vec::new();
        for (conn, watched) in self.lock().iter_mut() {
            let now_at = canonical(watched.connection.remote_address());
            if now_at != watched.at {
                watched.at = now_at;
                moved.push((*conn, now_at));
            }
        }
        moved
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Watched>> {
        // The map stays whole whatever panicked while holding it.
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection watched by [`Moves`]; dropping it stops the watch.
pub struct Watching {
    conn: ConnId,
    moves: Moves,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.moves.lock().remove(&self.conn);
    }
}
