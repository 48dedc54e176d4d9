//! Overlay address derivation: which IPv4 and IPv6 address a node gets.
//!
//! Pure: no I/O, no clock, no randomness (the random mesh id of
//! [`ula_prefix`] is an input). The rendezvous registry calls these to
//! allocate, and persists the result, so a node's address never depends on
//! who else joined after it.
//!
//! - **IPv4**: the host part starts at a hash of the node's public key and
//!   probes linearly (wrapping) through the mesh CIDR; the registry takes the
//!   first address no other node holds. Without collisions the address is a
//!   pure function of key and CIDR; with them, the order of joins decides,
//!   and the registry's store remembers the outcome.
//! - **IPv6**: a ULA `/48` (RFC 4193) chosen when the mesh is created, and
//!   80 bits from a hash of the key. Two keys collide with probability about
//!   2^-80 per pair; [`ipv6_candidates`] still gives the registry alternatives.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use crate::identity::PublicKey;

/// Domain separation: the IPv4 and IPv6 derivations never share a hash.
const V4_DOMAIN: &[u8] = b"meshd ipam v4\0";
const V6_DOMAIN: &[u8] = b"meshd ipam v6\0";

/// Shortest mesh prefix accepted.
pub const MIN_PREFIX_LEN: u8 = 8;
/// Longest mesh prefix accepted.
pub const MAX_PREFIX_LEN: u8 = 30;
/// How many IPv6 addresses [`ipv6_candidates`] offers per key.
pub const IPV6_ATTEMPTS: u32 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error(
        "mesh CIDR {net} is too large: a prefix shorter than /{MIN_PREFIX_LEN} would claim a \
         large share of the IPv4 space and almost surely overlap routes on the nodes; \
         use e.g. 100.72.0.0/16"
    )]
    TooLarge { net: Ipv4Net },
    #[error(
        "mesh CIDR {net} is too small: a prefix longer than /{MAX_PREFIX_LEN} leaves no \
         address for nodes once the network and broadcast addresses are excluded; \
         use e.g. 100.72.0.0/16"
    )]
    TooSmall { net: Ipv4Net },
    #[error("mesh CIDR {net} has host bits set; did you mean {network}?")]
    HostBitsSet { net: Ipv4Net, network: Ipv4Net },
}

/// Checks a mesh CIDR chosen by an operator.
pub fn validate_mesh_cidr(net: Ipv4Net) -> Result<(), IpamError> {
    if net.prefix_len() < MIN_PREFIX_LEN {
        return Err(IpamError::TooLarge { net });
    }
    if net.prefix_len() > MAX_PREFIX_LEN {
        return Err(IpamError::TooSmall { net });
    }
    if net.addr() != net.network() {
        return Err(IpamError::HostBitsSet {
            net,
            network: net.trunc(),
        });
    }
    Ok(())
}

/// Addresses of `net` a node may hold: all but the network and broadcast
/// address (RFC 919 semantics; /31 and /32 therefore have none).
pub fn usable_hosts(net: Ipv4Net) -> u64 {
    let host_bits = 32 - u32::from(net.prefix_len().min(32));
    if host_bits < 2 {
        0
    } else {
        (1u64 << host_bits) - 2
    }
}

/// The IPv4 addresses `key` may get in `net`, in order of preference: the
/// hashed start, then linear probing through the rest of the usable range,
/// wrapping, each usable address exactly once. Deterministic in `key` and
/// `net`; empty when `net` has no usable address.
pub fn ipv4_candidates(key: &PublicKey, net: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let usable = usable_hosts(net);
    let start = if usable == 0 {
        0
    } else {
        hash_u64(V4_DOMAIN, key) % usable
    };
    // The first usable host is network + 1; network + usable is the last one
    // below broadcast. Both fit in u32 because usable <= 2^32 - 2.
    let first = u64::from(u32::from(net.network())) + 1;
    (0..usable).map(move |i| {
        let host = (start + i) % usable;
        Ipv4Addr::from((first + host) as u32)
    })
}

/// `key`'s IPv6 address in `prefix`: the prefix, and the remaining bits (80
/// of them in a /48) from a hash of the key.
pub fn ipv6_for(key: &PublicKey, prefix: Ipv6Net) -> Ipv6Addr {
    derive_v6(key, prefix, 0)
}

/// [`ipv6_for`] first, then [`IPV6_ATTEMPTS`]` - 1` alternatives from the
/// same hash with a counter, for the registry to use should the first one
/// ever be taken. Deterministic in `key` and `prefix`.
pub fn ipv6_candidates(key: &PublicKey, prefix: Ipv6Net) -> impl Iterator<Item = Ipv6Addr> {
    let key = *key;
    (0..IPV6_ATTEMPTS).map(move |n| derive_v6(&key, prefix, n))
}

/// The RFC 4193 §3.1 prefix `fdXX:XXXX:XXXX::/48` for a 40-bit global id,
/// which the caller draws at random (§3.2) when the mesh is created.
pub fn ula_prefix(global_id: [u8; 5]) -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&global_id);
    Ipv6Net::new_assert(Ipv6Addr::from(octets), 48)
}

fn derive_v6(key: &PublicKey, prefix: Ipv6Net, counter: u32) -> Ipv6Addr {
    let digest = Sha256::new()
        .chain_update(V6_DOMAIN)
        .chain_update(key.as_bytes())
        .chain_update(counter.to_be_bytes())
        .finalize();
    let mut wide = [0u8; 16];
    wide.copy_from_slice(&digest[..16]);
    let hashed = u128::from_be_bytes(wide);
    let len = u32::from(prefix.prefix_len().min(128));
    let host_mask = u128::MAX.checked_shr(len).unwrap_or(0);
    let mut host = hashed & host_mask;
    // An all-zero host part is the Subnet-Router anycast address (RFC 4291
    // §2.6.1), never a node's.
    if host == 0 {
        host = 1 & host_mask;
    }
    Ipv6Addr::from((u128::from(prefix.network()) & !host_mask) | host)
}

fn hash_u64(domain: &[u8], key: &PublicKey) -> u64 {
    let digest = Sha256::new()
        .chain_update(domain)
        .chain_update(key.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_allocation_is_deterministic() {
        let mesh = net("100.72.0.0/16");
        let a: Vec<_> = ipv4_candidates(&key(1), mesh).take(5).collect();
        let b: Vec<_> = ipv4_candidates(&key(1), mesh).take(5).collect();
        assert_eq!(a, b);
        assert_ne!(ipv4_candidates(&key(2), mesh).next(), a.first().copied());
    }

    #[test]
    fn derivation_is_pinned_so_addresses_never_move_between_releases() {
        // Computed independently (sha256 of the domain prefix and the key);
        // changing the derivation would move nodes on their next join.
        let first = ipv4_candidates(&key(1), net("100.72.0.0/16")).next();
        assert_eq!(first, Some(Ipv4Addr::new(100, 72, 198, 160)));
        let v6 = ipv6_for(&key(1), ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]));
        assert_eq!(
            v6,
            "fd12:3456:789a:fb39:616f:f5cb:7444:225b"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
    }

    #[test]
    fn small_net_yields_every_usable_host_exactly_once() {
        let mesh = net("10.9.8.0/29");
        for k in 0..=40u8 {
            let all: Vec<_> = ipv4_candidates(&key(k), mesh).collect();
            let unique: BTreeSet<_> = all.iter().copied().collect();
            let expected: BTreeSet<_> = (1..=6).map(|h| Ipv4Addr::new(10, 9, 8, h)).collect();
            assert_eq!(all.len(), 6);
            assert_eq!(unique, expected);
        }
    }

    #[test]
    fn probing_continues_after_the_hashed_start_and_wraps() {
        let mesh = net("10.9.8.0/29");
        let all: Vec<_> = ipv4_candidates(&key(7), mesh).collect();
        for pair in all.windows(2) {
            let (a, b) = (u32::from(pair[0]), u32::from(pair[1]));
            assert!(b == a + 1 || (a == u32::from(Ipv4Addr::new(10, 9, 8, 6)) && b == a - 5));
        }
    }

    #[test]
    fn network_and_broadcast_are_never_returned() {
        for mesh in [
            net("192.168.7.0/30"),
            net("10.0.0.0/28"),
            net("100.72.0.0/16"),
        ] {
            let net_addr = mesh.network();
            let broadcast = mesh.broadcast();
            for k in 0..=255u8 {
                let first = ipv4_candidates(&key(k), mesh).next().unwrap();
                assert!(mesh.contains(&first));
                assert_ne!(first, net_addr);
                assert_ne!(first, broadcast);
            }
        }
        assert!(ipv4_candidates(&key(3), net("10.0.0.0/28"))
            .all(|a| a != Ipv4Addr::new(10, 0, 0, 0) && a != Ipv4Addr::new(10, 0, 0, 15)));
    }

    #[test]
    fn nets_without_usable_hosts_yield_nothing() {
        assert_eq!(ipv4_candidates(&key(1), net("10.0.0.0/31")).count(), 0);
        assert_eq!(ipv4_candidates(&key(1), net("10.0.0.1/32")).count(), 0);
    }

    #[test]
    fn a_zero_prefix_does_not_overflow() {
        let first = ipv4_candidates(&key(1), net("0.0.0.0/0")).next().unwrap();
        assert_ne!(first, Ipv4Addr::new(0, 0, 0, 0));
        assert_ne!(first, Ipv4Addr::BROADCAST);
        assert_eq!(usable_hosts(net("0.0.0.0/0")), (1u64 << 32) - 2);
    }

    #[test]
    fn ipv6_address_lies_inside_the_prefix() {
        let prefix = ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]);
        for k in 0..=50u8 {
            let addr = ipv6_for(&key(k), prefix);
            assert!(prefix.contains(&addr), "{addr} not in {prefix}");
            assert_ne!(addr, prefix.network());
            assert_eq!(ipv6_for(&key(k), prefix), addr);
        }
        assert_ne!(ipv6_for(&key(1), prefix), ipv6_for(&key(2), prefix));
    }

    #[test]
    fn ipv6_alternatives_start_with_the_primary_address_and_differ() {
        let prefix = ula_prefix([1, 2, 3, 4, 5]);
        let all: Vec<_> = ipv6_candidates(&key(9), prefix).collect();
        assert_eq!(all.len(), IPV6_ATTEMPTS as usize);
        assert_eq!(all[0], ipv6_for(&key(9), prefix));
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len());
        assert!(all.iter().all(|a| prefix.contains(a)));
    }

    #[test]
    fn ipv6_host_bits_are_masked_for_any_prefix_length() {
        let p64: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        assert!(p64.contains(&ipv6_for(&key(1), p64)));
        let p128: Ipv6Net = "fd00::7/128".parse().unwrap();
        assert_eq!(
            ipv6_for(&key(1), p128),
            "fd00::7".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn ula_prefix_follows_rfc4193() {
        let prefix = ula_prefix([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(prefix.to_string(), "fd12:3456:789a::/48");
    }

    #[test]
    fn mesh_cidr_must_be_between_slash_8_and_slash_30_without_host_bits() {
        assert_eq!(validate_mesh_cidr(net("100.72.0.0/16")), Ok(()));
        assert_eq!(validate_mesh_cidr(net("10.0.0.0/8")), Ok(()));
        assert_eq!(validate_mesh_cidr(net("10.0.0.4/30")), Ok(()));
        assert!(matches!(
            validate_mesh_cidr(net("10.0.0.0/7")),
            Err(IpamError::TooLarge { .. })
        ));
        assert!(matches!(
            validate_mesh_cidr(net("10.0.0.0/31")),
            Err(IpamError::TooSmall { .. })
        ));
        let err = validate_mesh_cidr(net("100.72.1.0/16")).unwrap_err();
        assert_eq!(
            err,
            IpamError::HostBitsSet {
                net: net("100.72.1.0/16"),
                network: net("100.72.0.0/16")
            }
        );
        assert!(
            err.to_string().contains("did you mean 100.72.0.0/16"),
            "{err}"
        );
    }
}
