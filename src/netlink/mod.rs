//! Interface configuration: MTU, link state, addresses and routes of `mesh0`
//! through rtnetlink, never by running `ip`.
//!
//! Desired state → diff → apply, as innernet's `shared/netlink.rs` does it:
//!
//! - [`diff`] (pure, in `diff.rs`) compares a [`LinkConfig`] with the
//!   [`LinkState`] read from the kernel and returns [`Change`]s, each with a
//!   `Display` that reads well in logs. It removes only what meshd added
//!   ([`Owned`]): the kernel's link-local address and connected routes, and
//!   anything an operator added, are left alone. [`routes_for`] (pure) turns
//!   the peers' allowed IPs into the routes the interface needs.
//! - [`Link`] (I/O, in `link.rs`) holds an rtnetlink connection bound to one
//!   interface, reads its state, applies the diff and undoes its own
//!   changes on [`Link::teardown`]. [`overlapping_routes`] (I/O) finds host
//!   routes that collide with the mesh prefix, so meshd can refuse to start
//!   and say which route is in the way.
//! - [`RouteWatch`] (I/O, in `watch.rs`) reads the routes others install
//!   on the interface with their gateways (flannel host-gw, BIRD), and says
//!   when the routing table changed.
//!
//! Everything here needs CAP_NET_ADMIN except reading state.

mod diff;
mod link;
mod watch;

pub use diff::{diff, routes_for, Change, ChangeOn, LinkConfig, LinkState, Owned};
pub use link::{overlapping_routes, KernelRoute, Link};
pub use watch::{AddressWatch, RouteWatch};

/// Errors of the netlink layer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {ifname} does not exist; meshd creates it at startup, so it was removed or never created")]
    LinkNotFound { ifname: String },
    #[error("cannot read {what} from the kernel: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot {change}: {source}{}", permission_hint(.source))]
    Request {
        change: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The errno carried by a kernel NACK.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

fn permission_hint(e: &rtnetlink::Error) -> &'static str {
    if errno(e) == Some(libc::EPERM) {
        "; meshd needs CAP_NET_ADMIN (run it as root or grant it the capability)"
    } else {
        ""
    }
}
