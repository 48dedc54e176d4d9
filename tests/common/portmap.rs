//! The lab's port-mapping router: the real miniupnpd from Debian
//! (`miniupnpd-iptables`: NAT-PMP, PCP and UPnP IGD) on the router of the
//! lab's `upnp` node, and the small STUN responder on the lab's internet
//! that miniupnpd's own check (`ext_perform_stun`) needs before it maps
//! anything for an external address in a documentation range. Needs root;
//! does I/O (namespaces, processes, files).
//!
//! The STUN responder answers RFC 5389 binding requests with the
//! requester's address (MAPPED-ADDRESS and XOR-MAPPED-ADDRESS) and names
//! its second port as OTHER-ADDRESS (RFC 5780); a CHANGE-REQUEST for
//! another port is answered from that second port. The lab's internet has
//! one address for it, so a request to change the address is answered
//! from the same one: what miniupnpd checks is that answers it did not ask
//! for get through its router's firewall, which the change of port shows.
//! It answers at most [`STUN_ANSWERS`] requests and stops when dropped.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::in_namespace;
use super::lab::{eventually, MeshLab, START_DEADLINE};
use super::topology::{topology, Kind};

/// The STUN port on the lab's internet (RFC 5389's default).
pub const STUN_PORT: u16 = 3478;
/// The most requests one responder answers: miniupnpd sends four per check.
pub const STUN_ANSWERS: u64 = 400;
/// The label of the miniupnpd daemon in the lab.
pub const MINIUPNPD: &str = "miniupnpd";
/// The longest lease miniupnpd grants a PCP or NAT-PMP mapping here (its
/// `max_lifetime`): short, so renewals and expiries happen within a test.
pub const MAX_LIFETIME_S: u64 = 40;

/// A STUN responder on `address` (ports [`STUN_PORT`] and the next) in a
/// lab namespace; stops when dropped.
pub struct StunResponder {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StunResponder {
    pub fn start(ns: &str, address: Ipv4Addr) -> Self {
        let bind = |port| {
            in_namespace(ns, move || {
                UdpSocket::bind((address, port))
                    .unwrap_or_else(|e| panic!("bind the STUN port {address}:{port}: {e}"))
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        };
        let (primary, other) = (bind(STUN_PORT), bind(STUN_PORT + 1));
        for s in [&primary, &other] {
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("set a read timeout");
        }
        let other_addr = SocketAddrV4::new(address, STUN_PORT + 1);
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    for socket in [&primary, &other] {
                        let Ok((n, SocketAddr::V4(from))) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        if answered.load(Ordering::Relaxed) >= STUN_ANSWERS {
                            continue;
                        }
                        let Some((response, change_port)) =
                            stun_response(&buf[..n], from, other_addr)
                        else {
                            continue;
                        };
                        let out = if change_port { &other } else { socket };
                        if out.send_to(&response, from).is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        StunResponder {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for StunResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The answer to a binding request, and whether it asked for another port;
/// `None` for anything else.
fn stun_response(
    request: &[u8],
    from: SocketAddrV4,
    other: SocketAddrV4,
) -> Option<(Vec<u8>, bool)> {
    const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
    const COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    let header = request.get(..20)?;
    if header[..2] != BINDING_REQUEST || header[4..8] != COOKIE {
        return None;
    }
    let mut change_port = false;
    let mut attrs = &request[20..];
    while let (Some(t), Some(l)) = (attrs.get(..2), attrs.get(2..4)) {
        let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
        let value = attrs.get(4..4 + len)?;
        if t == [0x00, 0x03] && len == 4 {
            change_port = value[3] & 0x02 != 0;
        }
        attrs = attrs.get(4 + len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    let address = |kind: u16, port: u16, ip: [u8; 4]| {
        let mut a = Vec::with_capacity(12);
        a.extend_from_slice(&kind.to_be_bytes());
        a.extend_from_slice(&8u16.to_be_bytes());
        a.extend_from_slice(&[0, 1]);
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&ip);
        a
    };
    let ip = from.ip().octets();
    let xored: Vec<u8> = ip.iter().zip(COOKIE).map(|(a, c)| a ^ c).collect();
    let mut body = address(0x0001, from.port(), ip);
    body.extend(address(
        0x0020,
        from.port() ^ 0x2112,
        [xored[0], xored[1], xored[2], xored[3]],
    ));
    body.extend(address(0x802c, other.port(), other.ip().octets()));
    let mut response = vec![0x01, 0x01];
    response.extend_from_slice(&u16::try_from(body.len()).ok()?.to_be_bytes());
    response.extend_from_slice(&header[4..20]);
    response.extend(body);
    Some((response, change_port))
}

/// The lab's port-mapping router and its node.
pub fn upnp_router() -> (&'static str, &'static str) {
    let node = topology().the(Kind::Upnp);
    let router = node.router.expect("the upnp node sits behind a router");
    (router, node.name)
}

/// Where miniupnpd keeps its leases in `lab`.
pub fn lease_file(lab: &MeshLab) -> std::path::PathBuf {
    lab.dir().join("miniupnpd.leases")
}

/// Starts miniupnpd on the upnp node's router (NAT-PMP, PCP and UPnP IGD
/// on its LAN side), its STUN check against `stun` on the lab's internet;
/// returns once it maps (its STUN check passed) and listens.
pub fn start_miniupnpd(lab: &MeshLab, stun: Ipv4Addr) {
    let (router, _) = upnp_router();
    let lan = topology().private_subnet_of(topology().the(Kind::Upnp));
    let conf = lab.dir().join("miniupnpd.conf");
    let text = format!(
        "ext_ifname=wan\n\
         listening_ip=lan\n\
         http_port=0\n\
         enable_natpmp=yes\n\
         enable_upnp=yes\n\
         secure_mode=yes\n\
         system_uptime=no\n\
         ext_perform_stun=yes\n\
         ext_stun_host={stun}\n\
         ext_stun_port={STUN_PORT}\n\
         lease_file={leases}\n\
         uuid=3d5a1f0c-7e2b-4c1a-9a55-2f1d2c3b4a70\n\
         min_lifetime=20\n\
         max_lifetime={MAX_LIFETIME_S}\n\
         allow 1024-65535 {lan} 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        leases = lease_file(lab).display(),
    );
    fs::write(&conf, text).expect("write miniupnpd.conf");
    let pid = lab.dir().join("miniupnpd.pid");
    lab.spawn(
        router,
        MINIUPNPD,
        "/usr/sbin/miniupnpd",
        &[
            "-d",
            "-f",
            conf.to_str().expect("UTF-8 path"),
            "-P",
            pid.to_str().expect("UTF-8 path"),
        ],
    );
    eventually(
        "miniupnpd passes its STUN check and listens for NAT-PMP/PCP",
        START_DEADLINE,
        || {
            lab.assert_running(MINIUPNPD);
            let log = lab.log(MINIUPNPD);
            if log.contains("Port forwarding is now disabled") {
                panic!("miniupnpd's STUN check failed:\n{log}");
            }
            if log.contains("Port forwarding is now enabled")
                && log.contains("Listening for NAT-PMP/PCP traffic")
            {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    );
}

/// Stops miniupnpd as its service stops it and as a router restart ends
/// its flows: SIGTERM, then its chains flushed (what its
/// `iptables_removeall.sh` does, which Debian's service runs after it), then
/// the router's connection tracking forgotten. miniupnpd itself leaves its
/// rules in place when it exits.
pub fn stop_miniupnpd(lab: &MeshLab) {
    let (router, _) = upnp_router();
    lab.stop(MINIUPNPD);
    for (table, chain) in [
        ("nat", "MINIUPNPD"),
        ("nat", "MINIUPNPD-POSTROUTING"),
        ("filter", "MINIUPNPD"),
        ("mangle", "MINIUPNPD"),
    ] {
        lab.run_in(router, &["iptables-legacy", "-t", table, "-F", chain]);
    }
    lab.run_in(router, &["conntrack", "-F"]);
}

/// One mapping in miniupnpd's lease file: `UDP:51820:10.70.0.2:51820:<expiry>:<description>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub protocol: String,
    pub external_port: u16,
    pub internal: SocketAddr,
    /// When it ends, in seconds since the epoch (0: never).
    pub expires: u64,
    pub description: String,
}

/// The mappings miniupnpd's lease file lists now.
pub fn leases(lab: &MeshLab) -> Vec<Lease> {
    let text = fs::read_to_string(lease_file(lab)).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ':');
            let protocol = f.next()?.to_owned();
            let external_port = f.next()?.parse().ok()?;
            let ip: Ipv4Addr = f.next()?.parse().ok()?;
            let port: u16 = f.next()?.parse().ok()?;
            let expires = f.next()?.parse().ok()?;
            Some(Lease {
                protocol,
                external_port,
                internal: SocketAddr::from((ip, port)),
                expires,
                description: f.next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// `upnpc -u <the router's description> -l` (miniupnpc) on `node`: the
/// mappings the router lists over UPnP IGD, each as
/// `UDP 51820->10.70.0.2:51820`. Its description URL is where miniupnpd's
/// log says it listens (upnpc's own discovery takes a router with an
/// external address in a documentation range for a disconnected one and
/// lists nothing).
pub fn upnpc_list(lab: &MeshLab, node: &str) -> Vec<String> {
    let log = lab.log(MINIUPNPD);
    let port = log
        .lines()
        .rev()
        .filter_map(|l| l.split("HTTP listening on port ").nth(1))
        .find_map(|p| p.trim().parse::<u16>().ok())
        .expect("miniupnpd says where it listens for HTTP");
    let router = topology().routers[upnp_router().0].lan;
    let url = format!("http://{router}:{port}/rootDesc.xml");
    let out = lab.exec_in(node, &["timeout", "20", "upnpc", "-u", &url, "-l"]);
    println!(
        "upnpc -u {url} -l:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let _index: u32 = words.next()?.parse().ok()?;
            let protocol = words.next()?;
            let mapping = words.next()?;
            mapping
                .contains("->")
                .then(|| format!("{protocol} {mapping}"))
        })
        .collect()
}
