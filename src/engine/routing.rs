//! Cryptokey routing: longest-prefix match over peers' allowed IPs.
//!
//! Pure. WireGuard paper §2: the table maps an inner destination to the peer
//! that encrypts it, and an inner source to the only peer allowed to send it.
//!
//! One hash map per prefix length, probed from the longest length present:
//! a lookup costs at most as many probes as there are distinct lengths in
//! use (typically two or three: the peers' /32s, a pod CIDR, a default).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: PrefixTable<u32, T>,
    v6: PrefixTable<u128, T>,
}

#[derive(Debug, Clone)]
struct PrefixTable<K, T> {
    /// Sorted by prefix length, longest first.
    by_len: Vec<(u8, HashMap<K, T>)>,
}

impl<K: Copy + Eq + std::hash::Hash, T: Copy> PrefixTable<K, T> {
    fn new() -> Self {
        Self { by_len: Vec::new() }
    }

    fn insert(&mut self, len: u8, key: K, value: T) -> Option<T> {
        let slot = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_len[i].0 == len => i,
            Some(i) => {
                self.by_len.insert(i, (len, HashMap::new()));
                i
            }
            None => {
                self.by_len.push((len, HashMap::new()));
                self.by_len.len() - 1
            }
        };
        self.by_len[slot].1.insert(key, value)
    }

    fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) {
        for (_, map) in &mut self.by_len {
            map.retain(|_, v| !pred(v));
        }
        self.by_len.retain(|(_, m)| !m.is_empty());
    }

    #[inline]
    fn lookup(&self, addr: K, mask: impl Fn(K, u8) -> K) -> Option<T> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(addr, *len)).copied())
    }
}

#[inline]
fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

#[inline]
fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<T: Copy> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: PrefixTable::new(),
            v6: PrefixTable::new(),
        }
    }
}

impl<T: Copy + PartialEq> AllowedIps<T> {
    /// Routes `net` to `value`, returning the previous owner of exactly `net`.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self
                .v4
                .insert(n.prefix_len(), u32::from(n.network()), value),
            IpNet::V6(n) => self
                .v6
                .insert(n.prefix_len(), u128::from(n.network()), value),
        }
    }

    /// Removes every prefix routed to `value`.
    pub fn remove_value(&mut self, value: T) {
        self.v4.remove_where(|v| *v == value);
        self.v6.remove_where(|v| *v == value);
    }

    /// The owner of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a), mask_v4),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), mask_v6),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::default();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("100.72.0.0/16"), 1);
        t.insert(net("100.72.0.2/32"), 2);
        assert_eq!(t.lookup(ip("100.72.0.2")), Some(2));
        assert_eq!(t.lookup(ip("100.72.0.3")), Some(1));
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(0));
        assert_eq!(t.lookup(ip("fd00::1")), None);
    }

    #[test]
    fn v6_prefixes_and_removal() {
        let mut t = AllowedIps::default();
        t.insert(net("fd7a::/48"), 1);
        t.insert(net("fd7a::5/128"), 2);
        t.insert(net("::/0"), 3);
        assert_eq!(t.lookup(ip("fd7a::5")), Some(2));
        assert_eq!(t.lookup(ip("fd7a::6")), Some(1));
        t.remove_value(2);
        assert_eq!(t.lookup(ip("fd7a::5")), Some(1));
        t.remove_value(1);
        assert_eq!(t.lookup(ip("fd7a::5")), Some(3));
    }

    #[test]
    fn insert_replaces_exact_prefix_owner() {
        let mut t = AllowedIps::default();
        assert_eq!(t.insert(net("10.0.0.0/8"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/8"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(2));
    }
}
