//! Routes others install on the mesh interface — flannel's host-gw
//! backend, a BGP speaker such as BIRD — and a watch on the kernel's
//! routing table that says when they may have changed; and a watch on the
//! host's addresses and links, for a node whose own addresses change
//! (a new DHCP lease, an interface going away).
//!
//! Does I/O: a `NETLINK_ROUTE` socket per watch, subscribed to the groups
//! it needs; the route watch's also serves the dumps. Which peer a route
//! names is decided elsewhere (the agent, from the peers' overlay
//! addresses).

use futures::StreamExt;
use rtnetlink::constants::{
    RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
};
use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::Handle;
use tokio::task::JoinHandle;

use super::link::{main_routes, KernelRoute};
use super::NetlinkError;

/// A netlink socket subscribed to some multicast groups.
#[derive(Debug)]
struct Subscription {
    handle: Handle,
    task: JoinHandle<()>,
    events: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        SocketAddr,
    )>,
}

impl Subscription {
    fn open(groups: u32) -> Result<Self, NetlinkError> {
        let (mut connection, handle, events) =
            rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(NetlinkError::Connect)?;
        Ok(Self {
            handle,
            task: tokio::spawn(connection),
            events,
        })
    }

    /// Waits for an announcement, then takes every one already queued
    /// with it. `false` once the socket is gone.
    async fn changed(&mut self) -> bool {
        if self.events.next().await.is_none() {
            return false;
        }
        while self.events.try_recv().is_ok() {}
        true
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A subscription to route changes, and the routes through one interface.
#[derive(Debug)]
pub struct RouteWatch {
    subscription: Subscription,
    ifindex: u32,
}

impl RouteWatch {
    /// Subscribes to route changes, for the routes through `ifindex`.
    pub fn open(ifindex: u32) -> Result<Self, NetlinkError> {
        Ok(Self {
            subscription: Subscription::open(RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)?,
            ifindex,
        })
    }

    /// Waits for the kernel to announce a route change (any route: the
    /// caller reads [`RouteWatch::routes`] again), then takes every
    /// announcement already queued with it. `false` once the socket is
    /// gone.
    pub async fn changed(&mut self) -> bool {
        self.subscription.changed().await
    }

    /// The routes of the main table through the interface.
    pub async fn routes(&self) -> Result<Vec<KernelRoute>, NetlinkError> {
        Ok(main_routes(&self.subscription.handle)
            .await?
            .into_iter()
            .filter(|r| r.oif == Some(self.ifindex))
            .collect())
    }
}

/// A subscription to the host's address and link changes (any interface:
/// the caller reads what it needs again).
#[derive(Debug)]
pub struct AddressWatch {
    subscription: Subscription,
}

impl AddressWatch {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            subscription: Subscription::open(
                RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK,
            )?,
        })
    }

    /// Waits for an address or link change, then takes every announcement
    /// already queued with it. `false` once the socket is gone.
    pub async fn changed(&mut self) -> bool {
        self.subscription.changed().await
    }
}
