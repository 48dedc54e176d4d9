//! Routes others install on the mesh interface — flannel's host-gw
//! backend, a BGP speaker such as BIRD — and a watch on the kernel's
//! routing table that says when they may have changed.
//!
//! Does I/O: one `NETLINK_ROUTE` socket subscribed to the IPv4 and IPv6
//! route groups, which also serves the dumps. Which peer a route names is
//! decided elsewhere (the agent, from the peers' overlay addresses).

use futures::StreamExt;
use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE};
use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::Handle;
use tokio::task::JoinHandle;

use super::link::{main_routes, KernelRoute};
use super::NetlinkError;

/// A subscription to route changes, and the routes through one interface.
#[derive(Debug)]
pub struct RouteWatch {
    handle: Handle,
    task: JoinHandle<()>,
    events: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        SocketAddr,
    )>,
    ifindex: u32,
}

impl RouteWatch {
    /// Subscribes to route changes, for the routes through `ifindex`.
    pub fn open(ifindex: u32) -> Result<Self, NetlinkError> {
        let (mut connection, handle, events) =
            rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
            .map_err(NetlinkError::Connect)?;
        Ok(Self {
            handle,
            task: tokio::spawn(connection),
            events,
            ifindex,
        })
    }

    /// Waits for the kernel to announce a route change (any route: the
    /// caller reads [`RouteWatch::routes`] again), then takes every
    /// announcement already queued with it. `false` once the socket is
    /// gone.
    pub async fn changed(&mut self) -> bool {
        if self.events.next().await.is_none() {
            return false;
        }
        while self.events.try_recv().is_ok() {}
        true
    }

    /// The routes of the main table through the interface.
    pub async fn routes(&self) -> Result<Vec<KernelRoute>, NetlinkError> {
        Ok(main_routes(&self.handle)
            .await?
            .into_iter()
            .filter(|r| r.oif == Some(self.ifindex))
            .collect())
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
