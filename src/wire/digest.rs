//! A digest of a peer map that does not depend on the order of its
//! entries and is kept up to date one entry at a time: the sum, lane by
//! lane (four wrapping 64-bit lanes), of the SHA-256 of each entry's JSON
//! as the wire carries it (proto/control.md §6, `peers_digest`).
//!
//! A node that comes back to a server offers the digest of the map it
//! holds; a server whose map for that node has the same digest welcomes
//! it without the map (`peers_unchanged`). A server keeps one running sum
//! for the whole mesh and subtracts the node's own entry, so a welcome
//! costs it no pass over the map; a node adds and subtracts an entry per
//! change it hears. A wrong digest (a lost change, a forged offer) only
//! means the whole map is sent, as before: the digest never lets a node
//! ask for anything but its own welcome.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::control::{EncodedEntry, NodeEntry};
use crate::identity::PublicKey;

/// The digest of a set of peer-map entries (see the module's text). On
/// the wire: 64 lowercase hexadecimal digits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MapDigest([u64; 4]);

impl MapDigest {
    /// The digest of `entry` alone, as the wire carries it. `None` only if
    /// the entry cannot be encoded, which a `NodeEntry` always can.
    pub fn of(entry: &NodeEntry) -> Option<Self> {
        let json = serde_json::to_vec(entry).ok()?;
        Some(Self::of_json(&json))
    }

    /// The digest of the entry whose wire JSON is `json`.
    pub fn of_json(json: &[u8]) -> Self {
        Self::from_bytes(Sha256::digest(json).into())
    }

    /// The digest of the set with `other`'s entries added.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        let mut lanes = self.0;
        for (lane, add) in lanes.iter_mut().zip(other.0) {
            *lane = lane.wrapping_add(add);
        }
        Self(lanes)
    }

    /// The digest of the set with `other`'s entries taken out.
    #[must_use]
    pub fn minus(self, other: Self) -> Self {
        let mut lanes = self.0;
        for (lane, sub) in lanes.iter_mut().zip(other.0) {
            *lane = lane.wrapping_sub(sub);
        }
        Self(lanes)
    }

    fn to_bytes(self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (chunk, lane) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&lane.to_le_bytes());
        }
        bytes
    }

    fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut lanes = [0u64; 4];
        for (lane, chunk) in lanes.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            *lane = u64::from_le_bytes(word);
        }
        Self(lanes)
    }
}

impl std::fmt::Display for MapDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.to_bytes()))
    }
}

impl Serialize for MapDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MapDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut bytes)
            .map_err(|_| serde::de::Error::custom("a peer-map digest is 64 hexadecimal digits"))?;
        Ok(Self::from_bytes(bytes))
    }
}

/// The digest of each node's entry and their sum: the digest of the whole
/// set, or of the set less one node's entry, without a pass over it. The
/// server keeps one for what its nodes were told, a node one for what it
/// holds.
#[derive(Debug, Default, Clone)]
pub struct DigestSet {
    entries: HashMap<PublicKey, MapDigest>,
    total: MapDigest,
}

impl DigestSet {
    /// `entry` in place of the node's earlier one; `false` (and the node
    /// left out) only if it cannot be encoded, which a `NodeEntry` always can.
    pub fn upsert(&mut self, entry: &NodeEntry) -> bool {
        let Some(digest) = MapDigest::of(entry) else {
            self.remove(&entry.public_key);
            return false;
        };
        self.insert(entry.public_key, digest);
        true
    }

    /// The entry `key`'s, already encoded, in place of its earlier one.
    pub fn upsert_encoded(&mut self, key: PublicKey, entry: &EncodedEntry) {
        self.insert(key, MapDigest::of_json(entry.json().as_bytes()));
    }

    fn insert(&mut self, key: PublicKey, digest: MapDigest) {
        self.remove(&key);
        self.total = self.total.plus(digest);
        self.entries.insert(key, digest);
    }

    /// The node's entry taken out.
    pub fn remove(&mut self, key: &PublicKey) {
        if let Some(digest) = self.entries.remove(key) {
            self.total = self.total.minus(digest);
        }
    }

    /// The digest of every entry.
    pub fn total(&self) -> MapDigest {
        self.total
    }

    /// The digest of every entry but `key`'s: the map `key` is welcomed with.
    pub fn without(&self, key: &PublicKey) -> MapDigest {
        self.entries
            .get(key)
            .map_or(self.total, |own| self.total.minus(*own))
    }
}

/// The entries a node holds, and their [`DigestSet`]: what it offers when
/// it comes back ([`HeldMap::digest`]), and the map it passes on when the
/// welcome says nothing changed ([`HeldMap::entries`]).
#[derive(Debug, Default, Clone)]
pub struct HeldMap {
    entries: BTreeMap<PublicKey, NodeEntry>,
    digests: DigestSet,
    /// Set by a whole map (a welcome): until then nothing is offered.
    complete: bool,
}

impl HeldMap {
    /// A welcome's whole map replaces what was held.
    pub fn replace(&mut self, peers: &[NodeEntry]) {
        self.entries.clear();
        self.digests = DigestSet::default();
        self.complete = true;
        for peer in peers {
            self.upsert(peer);
        }
    }

    /// A peer joined or changed.
    pub fn upsert(&mut self, peer: &NodeEntry) {
        self.complete &= self.digests.upsert(peer);
        self.entries.insert(peer.public_key, peer.clone());
    }

    /// A peer was removed from the mesh.
    pub fn remove(&mut self, key: &PublicKey) {
        self.entries.remove(key);
        self.digests.remove(key);
    }

    /// What to offer in a hello: the digest of the whole map held, once
    /// one was received.
    pub fn digest(&self) -> Option<MapDigest> {
        self.complete.then_some(self.digests.total())
    }

    /// The map held, in key order.
    pub fn entries(&self) -> Vec<NodeEntry> {
        self.entries.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::NatMapping;

    fn entry(n: u8) -> NodeEntry {
        NodeEntry {
            public_key: PublicKey::from_bytes([n; 32]),
            name: format!("n{n}"),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
            ipv6: "fd00::1".parse().unwrap(),
            candidates: Vec::new(),
            nat: NatMapping::Unknown,
            routes: Vec::new(),
        }
    }

    fn digest(entries: &[NodeEntry]) -> MapDigest {
        entries.iter().fold(MapDigest::default(), |d, e| {
            d.plus(MapDigest::of(e).unwrap())
        })
    }

    #[test]
    fn the_digest_is_the_same_in_any_order_and_changes_with_any_entry() {
        let a = [entry(1), entry(2), entry(3)];
        let b = [entry(3), entry(1), entry(2)];
        assert_eq!(digest(&a), digest(&b));
        let mut other = entry(2);
        other.name = "other".into();
        assert_ne!(digest(&a), digest(&[entry(1), other, entry(3)]));
        let two = [entry(1), entry(2)];
        assert_ne!(digest(&a), digest(&two), "a missing entry shows");
        assert_eq!(
            digest(&a).minus(MapDigest::of(&entry(3)).unwrap()),
            digest(&two),
            "taking one out is subtracting it"
        );
    }

    #[test]
    fn a_held_map_follows_changes_and_offers_nothing_before_a_whole_map() {
        let mut held = HeldMap::default();
        held.upsert(&entry(1));
        assert_eq!(held.digest(), None, "deltas alone are not a map");
        held.replace(&[entry(1), entry(2)]);
        held.upsert(&entry(3));
        let mut moved = entry(2);
        moved.name = "moved".into();
        held.upsert(&moved);
        held.remove(&PublicKey::from_bytes([1; 32]));
        assert_eq!(held.digest(), Some(digest(&[moved.clone(), entry(3)])));
        assert_eq!(held.entries(), [moved, entry(3)]);
    }

    #[test]
    fn the_wire_form_is_64_hex_digits_and_anything_else_is_refused() {
        let d = digest(&[entry(7)]);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<MapDigest>(&json).unwrap(), d);
        for bad in [
            "\"00\"",
            "\"zz\"",
            "7",
            "null",
            &format!("\"{}\"", "0".repeat(66)),
        ] {
            assert!(serde_json::from_str::<MapDigest>(bad).is_err(), "{bad}");
        }
    }
}
