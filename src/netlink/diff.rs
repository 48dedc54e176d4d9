//! Desired interface state, the state the kernel reports, and the changes
//! that turn one into the other.
//!
//! Pure: no socket, no syscall. [`super::Link`] reads a [`LinkState`], asks
//! [`diff`] what to do and performs the resulting [`Change`]s.

// Pure: the clock and randomness are inputs (clippy.toml names what is
// forbidden).
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;

/// What meshd wants the interface to look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    pub ifname: String,
    pub mtu: u16,
    /// Interface addresses with their prefix length, e.g. `100.72.0.1/16`.
    pub addresses: Vec<IpNet>,
    /// Destinations routed into the interface (`dev mesh0`), usually
    /// [`routes_for`] the peers' allowed IPs.
    pub routes: Vec<IpNet>,
}

/// What the kernel has now for the link, as read back through rtnetlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    /// Every address on the link, including ones meshd did not add (the
    /// kernel's `fe80::/64` link-local address, for instance).
    pub addresses: Vec<IpNet>,
    /// Unicast routes of the main table whose output interface is this link,
    /// including the connected routes the kernel adds for each address.
    pub routes: Vec<IpNet>,
}

/// Addresses and routes that meshd itself added, so the only ones it may
/// remove again. Routes are stored with their host bits cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    pub addresses: BTreeSet<IpNet>,
    pub routes: BTreeSet<IpNet>,
}

/// One change to the interface.
///
/// `Display` names the change alone ("add route 10.99.0.0/24");
/// [`Change::on`] names the interface too, for logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    SetMtu(u16),
    SetUp,
    AddAddress(IpNet),
    DelAddress(IpNet),
    AddRoute(IpNet),
    DelRoute(IpNet),
}

impl Change {
    /// Renders the change with the interface it applies to:
    /// "add address 100.72.0.1/16 to mesh0".
    pub fn on<'a>(&'a self, ifname: &'a str) -> ChangeOn<'a> {
        ChangeOn {
            change: self,
            ifname,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::SetMtu(mtu) => write!(f, "set mtu {mtu}"),
            Change::SetUp => f.write_str("set link up"),
            Change::AddAddress(net) => write!(f, "add address {net}"),
            Change::DelAddress(net) => write!(f, "remove address {net}"),
            Change::AddRoute(net) => write!(f, "add route {net}"),
            Change::DelRoute(net) => write!(f, "remove route {net}"),
        }
    }
}

/// A [`Change`] together with its interface name; see [`Change::on`].
#[derive(Debug, Clone, Copy)]
pub struct ChangeOn<'a> {
    change: &'a Change,
    ifname: &'a str,
}

impl fmt::Display for ChangeOn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = self.ifname;
        match self.change {
            Change::SetMtu(mtu) => write!(f, "set mtu of {dev} to {mtu}"),
            Change::SetUp => write!(f, "set {dev} up"),
            Change::AddAddress(net) => write!(f, "add address {net} to {dev}"),
            Change::DelAddress(net) => write!(f, "remove address {net} from {dev}"),
            Change::AddRoute(net) => write!(f, "add route {net} dev {dev}"),
            Change::DelRoute(net) => write!(f, "remove route {net} dev {dev}"),
        }
    }
}

/// The changes that turn `current` into `desired`, in the order to apply
/// them: MTU, link up, removals, then additions.
///
/// The MTU comes first because the kernel drops IPv6 from a link whose MTU
/// is below 1280 (RFC 8200 §5); the link goes up before routes are added
/// because the kernel refuses an IPv4 route through a link that is down.
/// Addresses and routes that are not desired are removed only when they are
/// in `owned`: the kernel's link-local address and connected routes, or
/// anything an operator added, are never touched.
pub fn diff(current: &LinkState, desired: &LinkConfig, owned: &Owned) -> Vec<Change> {
    let mut changes = Vec::new();
    if current.mtu != u32::from(desired.mtu) {
        changes.push(Change::SetMtu(desired.mtu));
    }
    if !current.up {
        changes.push(Change::SetUp);
    }

    let have_addrs: BTreeSet<IpNet> = current.addresses.iter().copied().collect();
    let want_addrs: BTreeSet<IpNet> = desired.addresses.iter().copied().collect();
    let have_routes: BTreeSet<IpNet> = current.routes.iter().map(IpNet::trunc).collect();
    let want_routes: BTreeSet<IpNet> = desired.routes.iter().map(IpNet::trunc).collect();

    let stale = |have: &BTreeSet<IpNet>, want: &BTreeSet<IpNet>, mine: &BTreeSet<IpNet>| {
        have.iter()
            .filter(|net| !want.contains(net) && mine.contains(net))
            .copied()
            .collect::<Vec<_>>()
    };
    changes.extend(
        stale(&have_routes, &want_routes, &owned.routes)
            .into_iter()
            .map(Change::DelRoute),
    );
    changes.extend(
        stale(&have_addrs, &want_addrs, &owned.addresses)
            .into_iter()
            .map(Change::DelAddress),
    );
    changes.extend(
        want_addrs
            .difference(&have_addrs)
            .copied()
            .map(Change::AddAddress),
    );
    changes.extend(
        want_routes
            .difference(&have_routes)
            .copied()
            .map(Change::AddRoute),
    );
    changes
}

/// Routes needed for the peers' allowed IPs: every allowed prefix with its
/// host bits cleared, except those inside one of the interface's own address
/// prefixes (for `100.72.0.1/16` the kernel adds the connected route
/// `100.72.0.0/16` itself). Sorted and deduplicated.
pub fn routes_for(addresses: &[IpNet], allowed_ips: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let connected: Vec<IpNet> = addresses.iter().map(IpNet::trunc).collect();
    allowed_ips
        .into_iter()
        .map(|net| net.trunc())
        .filter(|net| !connected.iter().any(|c| c.contains(net)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix parses")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn desired(addresses: &[&str], routes: &[&str]) -> LinkConfig {
        LinkConfig {
            ifname: "mesh0".into(),
            mtu: 1380,
            addresses: nets(addresses),
            routes: nets(routes),
        }
    }

    /// A link as meshd left it: up, right MTU, the kernel's extras present.
    fn configured(addresses: &[&str], routes: &[&str]) -> LinkState {
        LinkState {
            index: 7,
            mtu: 1380,
            up: true,
            addresses: nets(addresses),
            routes: nets(routes),
        }
    }

    fn owned(addresses: &[&str], routes: &[&str]) -> Owned {
        Owned {
            addresses: nets(addresses).into_iter().collect(),
            routes: nets(routes).into_iter().collect(),
        }
    }

    #[test]
    fn a_fresh_link_gets_mtu_then_up_then_addresses_then_routes() {
        let fresh = LinkState {
            index: 7,
            mtu: 1500,
            up: false,
            addresses: vec![],
            routes: vec![],
        };
        let want = desired(&["100.72.0.1/16", "fd00:72::1/64"], &["10.99.0.0/24"]);
        assert_eq!(
            diff(&fresh, &want, &Owned::default()),
            vec![
                Change::SetMtu(1380),
                Change::SetUp,
                Change::AddAddress(net("100.72.0.1/16")),
                Change::AddAddress(net("fd00:72::1/64")),
                Change::AddRoute(net("10.99.0.0/24")),
            ]
        );
    }

    #[test]
    fn a_link_that_matches_needs_no_changes() {
        let want = desired(&["100.72.0.1/16"], &["10.99.0.0/24"]);
        let now = configured(&["100.72.0.1/16"], &["100.72.0.0/16", "10.99.0.0/24"]);
        let mine = owned(&["100.72.0.1/16"], &["10.99.0.0/24"]);
        assert!(diff(&now, &want, &mine).is_empty());
    }

    #[test]
    fn diff_never_removes_what_meshd_did_not_add() {
        let want = desired(&["100.72.0.1/16"], &[]);
        let now = configured(
            &["100.72.0.1/16", "fe80::1234/64", "192.0.2.9/24"],
            &["100.72.0.0/16", "fe80::/64", "198.51.100.0/24"],
        );
        assert!(diff(&now, &want, &owned(&["100.72.0.1/16"], &[])).is_empty());
    }

    #[test]
    fn owned_addresses_and_routes_no_longer_desired_are_removed_routes_first() {
        let want = desired(&["100.72.0.1/16"], &["10.99.0.0/24"]);
        let now = configured(
            &["100.72.0.1/16", "100.73.0.1/16"],
            &[
                "100.72.0.0/16",
                "100.73.0.0/16",
                "10.99.0.0/24",
                "10.98.0.0/24",
            ],
        );
        let mine = owned(
            &["100.72.0.1/16", "100.73.0.1/16"],
            &["10.99.0.0/24", "10.98.0.0/24"],
        );
        assert_eq!(
            diff(&now, &want, &mine),
            vec![
                Change::DelRoute(net("10.98.0.0/24")),
                Change::DelAddress(net("100.73.0.1/16"))
            ]
        );
    }

    #[test]
    fn routes_are_compared_without_host_bits() {
        let want = desired(&[], &["10.99.0.7/24"]);
        let now = configured(&[], &["10.99.0.0/24"]);
        assert!(diff(&now, &want, &Owned::default()).is_empty());
    }

    #[test]
    fn an_address_with_another_prefix_length_is_a_different_address() {
        let want = desired(&["100.72.0.1/16"], &[]);
        let now = configured(&["100.72.0.1/24"], &[]);
        let mine = owned(&["100.72.0.1/24"], &[]);
        assert_eq!(
            diff(&now, &want, &mine),
            vec![
                Change::DelAddress(net("100.72.0.1/24")),
                Change::AddAddress(net("100.72.0.1/16"))
            ]
        );
    }

    #[test]
    fn routes_inside_the_mesh_prefix_are_not_added() {
        let addrs = nets(&["100.72.0.1/16", "fd00:72::1/48"]);
        let allowed = nets(&["100.72.3.4/32", "100.72.0.0/16", "fd00:72:0:5::9/128"]);
        assert!(routes_for(&addrs, allowed).is_empty());
    }

    #[test]
    fn routes_for_clears_host_bits_and_deduplicates() {
        let addrs = nets(&["100.72.0.1/16"]);
        let allowed = nets(&[
            "10.99.0.7/24",
            "10.99.0.0/24",
            "fd00:99::1/64",
            "100.72.9.9/32",
        ]);
        assert_eq!(
            routes_for(&addrs, allowed),
            nets(&["10.99.0.0/24", "fd00:99::/64"])
        );
    }

    #[test]
    fn a_prefix_wider_than_the_mesh_prefix_still_gets_a_route() {
        let addrs = nets(&["100.72.0.1/16"]);
        assert_eq!(
            routes_for(&addrs, nets(&["100.64.0.0/10"])),
            nets(&["100.64.0.0/10"])
        );
    }

    #[test]
    fn changes_read_well_in_logs() {
        assert_eq!(
            Change::AddAddress(net("100.72.0.1/16"))
                .on("mesh0")
                .to_string(),
            "add address 100.72.0.1/16 to mesh0"
        );
        assert_eq!(
            Change::DelRoute(net("10.99.0.0/24"))
                .on("mesh0")
                .to_string(),
            "remove route 10.99.0.0/24 dev mesh0"
        );
        assert_eq!(Change::SetMtu(1380).to_string(), "set mtu 1380");
    }
}
