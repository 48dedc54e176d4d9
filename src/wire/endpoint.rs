//! Whether an address can be a node's endpoint at all.
//!
//! Pure. Candidates come from peers (announced through the rendezvous) and
//! from packets' sources; some addresses can never name another machine's
//! socket, and one that did would aim probes at the prober itself, its own
//! link or a whole group. The node and the rendezvous both refuse them with
//! [`unusable`], so the two never disagree on what a candidate may be.

use std::net::{IpAddr, SocketAddr};

/// Why an address can't be an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// Port 0.
    PortZero,
    /// `0.0.0.0` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`: the prober itself.
    Loopback,
    /// `224.0.0.0/4` or `ff00::/8`.
    Multicast,
    /// `169.254.0.0/16` or `fe80::/10` (RFC 4291 §2.5.6): meaningless off the link.
    LinkLocal,
    /// `255.255.255.255`.
    Broadcast,
}

/// Why `addr` can't be an endpoint, or `None` when it can. An IPv4 address
/// mapped into IPv6 is judged as the IPv4 address it is.
pub fn unusable(addr: SocketAddr) -> Option<Unusable> {
    if addr.port() == 0 {
        return Some(Unusable::PortZero);
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return Some(Unusable::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Unusable::Loopback);
    }
    if ip.is_multicast() {
        return Some(Unusable::Multicast);
    }
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some(Unusable::LinkLocal),
        IpAddr::V4(v4) if v4.is_broadcast() => Some(Unusable::Broadcast),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some(Unusable::LinkLocal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(s: &str) -> Option<Unusable> {
        unusable(s.parse().unwrap())
    }

    #[test]
    fn each_kind_of_unusable_address_is_named() {
        assert_eq!(judge("198.51.100.1:0"), Some(Unusable::PortZero));
        assert_eq!(judge("0.0.0.0:51820"), Some(Unusable::Unspecified));
        assert_eq!(judge("[::]:51820"), Some(Unusable::Unspecified));
        assert_eq!(judge("127.0.0.1:51820"), Some(Unusable::Loopback));
        assert_eq!(judge("[::1]:51820"), Some(Unusable::Loopback));
        assert_eq!(judge("224.0.0.1:51820"), Some(Unusable::Multicast));
        assert_eq!(judge("[ff02::1]:51820"), Some(Unusable::Multicast));
        assert_eq!(judge("169.254.1.1:51820"), Some(Unusable::LinkLocal));
        assert_eq!(judge("[fe80::1]:51820"), Some(Unusable::LinkLocal));
        assert_eq!(judge("255.255.255.255:51820"), Some(Unusable::Broadcast));
    }

    #[test]
    fn a_mapped_ipv4_address_is_judged_as_ipv4() {
        assert_eq!(judge("[::ffff:127.0.0.1]:51820"), Some(Unusable::Loopback));
        assert_eq!(
            judge("[::ffff:169.254.0.9]:51820"),
            Some(Unusable::LinkLocal)
        );
        assert_eq!(judge("[::ffff:198.51.100.1]:51820"), None);
    }

    #[test]
    fn public_and_private_addresses_are_usable() {
        for a in [
            "198.51.100.1:51820",
            "10.0.0.1:51820",
            "[2001:db8::1]:51820",
            "[fd00::1]:51820",
        ] {
            assert_eq!(judge(a), None, "{a}");
        }
    }
}
