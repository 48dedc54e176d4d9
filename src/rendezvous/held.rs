//! Group commit for a single server's file: the registry task goes on
//! deciding while the file is written, and what it decided waits here
//! until the commits before it are durable.
//!
//! Pure bookkeeping, no I/O: the registry task starts the saves and runs
//! what [`Held`] hands back. The registry's commands leave in the order it
//! queued them (one connection's welcome before the deltas after it);
//! a command waits for the save that holds every commit queued before it,
//! and a save starts only when none is being written, with every commit
//! made meanwhile. So a burst of joins costs one write of the file and one
//! copy of the state per save, not per join, and the registry task never
//! waits on the disk.

#![deny(clippy::disallowed_methods)]

use std::collections::VecDeque;

/// Commands waiting for saves, numbered in the order the saves start.
#[derive(Debug)]
pub struct Held<C> {
    /// Saves started; the one being written, if any, is number `started`.
    started: u64,
    /// Saves finished (durable, or failed and logged).
    done: u64,
    /// Each waiting command with the save it waits for, in order.
    queue: VecDeque<(u64, C)>,
}

impl<C> Default for Held<C> {
    fn default() -> Self {
        Self {
            started: 0,
            done: 0,
            queue: VecDeque::new(),
        }
    }
}

impl<C> Held<C> {
    /// A command queued after commits that are not saved yet (`unsaved`),
    /// or after commands that wait: kept (`None`) until they may go out;
    /// otherwise handed back, to run now.
    pub fn push(&mut self, command: C, unsaved: bool) -> Option<C> {
        let needs = if unsaved {
            // The commits go with the next save that starts.
            self.started + 1
        } else {
            match self.queue.back() {
                Some(&(needs, _)) => needs,
                None => return Some(command),
            }
        };
        self.queue.push_back((needs, command));
        None
    }

    /// Whether a save is being written.
    pub fn saving(&self) -> bool {
        self.started > self.done
    }

    /// A save starts (with every commit so far).
    pub fn started(&mut self) {
        debug_assert!(!self.saving(), "one save at a time");
        self.started += 1;
    }

    /// The save being written is done: the commands it frees, in order.
    pub fn finished(&mut self) -> impl Iterator<Item = C> + '_ {
        self.done = self.started;
        let free = self
            .queue
            .iter()
            .take_while(|(needs, _)| *needs <= self.done)
            .count();
        self.queue.drain(..free).map(|(_, command)| command)
    }

    /// Commands waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_unsaved_and_nothing_waiting_runs_at_once() {
        let mut held = Held::default();
        assert_eq!(held.push("send", false), Some("send"));
        assert!(held.is_empty());
        assert!(!held.saving());
    }

    #[test]
    fn a_command_after_a_commit_waits_for_the_save_that_holds_it() {
        let mut held = Held::default();
        assert_eq!(held.push("welcome a", true), None);
        // Nothing unsaved any more, but it must not pass the welcome.
        assert_eq!(held.push("delta", false), None);
        held.started();
        assert!(held.saving());
        assert_eq!(held.finished().collect::<Vec<_>>(), ["welcome a", "delta"]);
        assert!(!held.saving());
        assert_eq!(held.push("after", false), Some("after"));
    }

    #[test]
    fn commits_while_a_save_is_written_wait_for_the_next_save() {
        let mut held = Held::default();
        assert_eq!(held.push("welcome a", true), None);
        held.started();
        // Joins decided while the first save is being written.
        assert_eq!(held.push("welcome b", true), None);
        assert_eq!(held.push("delta b", false), None);
        assert_eq!(held.push("welcome c", true), None);
        assert_eq!(held.finished().collect::<Vec<_>>(), ["welcome a"]);
        // One save for both b and c.
        held.started();
        assert_eq!(
            held.finished().collect::<Vec<_>>(),
            ["welcome b", "delta b", "welcome c"]
        );
        assert!(held.is_empty());
    }

    #[test]
    fn order_is_kept_across_many_saves() {
        let mut held = Held::default();
        let mut out = Vec::new();
        let mut next = 0u32;
        for round in 0..50u32 {
            for i in 0..(round % 4) {
                let command = next;
                next += 1;
                out.extend(held.push(command, (round + i) % 3 == 0));
            }
            if held.saving() {
                out.extend(held.finished());
            }
            if round % 2 == 0 && !held.saving() {
                held.started();
            }
        }
        held.started();
        out.extend(held.finished());
        assert_eq!(out, (0..next).collect::<Vec<_>>());
    }
}
