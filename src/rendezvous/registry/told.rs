//! What this server's nodes were told of the mesh: every node's entry as
//! last announced, kept as the JSON it was sent as. A welcome is these
//! entries copied out, not the map encoded again (at thousands of nodes the
//! encoding was most of a join's cost), and a node that offers the digest
//! of the map it holds is checked against their [`DigestSet`] without a
//! pass over the map.
//!
//! Every change of an entry is announced as it happens
//! ([`super::Registry`]'s `announce_delta`), and each announcement passes
//! through here, so this is the map the records make.

use std::collections::HashMap;

use crate::identity::PublicKey;
use crate::wire::control::{EncodedEntry, NodeEntry};
use crate::wire::digest::{DigestSet, MapDigest};

#[derive(Debug, Default)]
pub struct Told {
    encoded: HashMap<PublicKey, EncodedEntry>,
    digests: DigestSet,
}

impl Told {
    /// `entry` in place of the node's earlier one.
    pub fn upsert(&mut self, entry: &NodeEntry) {
        let key = entry.public_key;
        match EncodedEntry::new(entry) {
            Some(encoded) => {
                self.digests.upsert_encoded(key, &encoded);
                self.encoded.insert(key, encoded);
            }
            // Never: a `NodeEntry` always encodes. A welcome falls back to
            // the record, and an offer does not match.
            None => self.remove(&key),
        }
    }

    /// The node's entry taken out (the node was removed).
    pub fn remove(&mut self, key: &PublicKey) {
        self.encoded.remove(key);
        self.digests.remove(key);
    }

    /// The entry the nodes were told of `key`, as sent.
    pub fn get(&self, key: &PublicKey) -> Option<&EncodedEntry> {
        self.encoded.get(key)
    }

    /// The digest of the map `key` is welcomed with: every entry but its own.
    pub fn digest_without(&self, key: &PublicKey) -> MapDigest {
        self.digests.without(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::NatMapping;

    fn entry(n: u8, name: &str) -> NodeEntry {
        NodeEntry {
            public_key: PublicKey::from_bytes([n; 32]),
            name: name.into(),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
            ipv6: "fd00::1".parse().unwrap(),
            candidates: Vec::new(),
            nat: NatMapping::Unknown,
            routes: Vec::new(),
        }
    }

    #[test]
    fn keeps_the_latest_entry_as_sent_and_the_digest_of_the_rest() {
        let mut told = Told::default();
        told.upsert(&entry(1, "one"));
        told.upsert(&entry(2, "two"));
        told.upsert(&entry(2, "renamed"));
        told.upsert(&entry(3, "three"));
        told.remove(&PublicKey::from_bytes([3; 32]));

        let two = told.get(&PublicKey::from_bytes([2; 32])).unwrap();
        assert_eq!(
            two.json(),
            serde_json::to_string(&entry(2, "renamed")).unwrap()
        );
        assert!(told.get(&PublicKey::from_bytes([3; 32])).is_none());

        // What node 1 holds: every entry but its own, as it was told them.
        let mut held = DigestSet::default();
        held.upsert(&entry(2, "renamed"));
        assert_eq!(
            told.digest_without(&PublicKey::from_bytes([1; 32])),
            held.total()
        );
        held.upsert(&entry(2, "two"));
        assert_ne!(
            told.digest_without(&PublicKey::from_bytes([1; 32])),
            held.total(),
            "an older entry does not match"
        );
    }
}
