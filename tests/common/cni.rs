//! Pods made the way a container runtime makes them: the real CNI plugins
//! of `containernetworking-plugins` (`bridge` with `host-local` IPAM),
//! called with `CNI_COMMAND=ADD` and the network configuration on stdin,
//! inside a lab machine's namespace. Each pod is a network namespace of its
//! own, named under the lab's prefix so that the lab's teardown removes it
//! with the others.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

use super::{assert_success, output, output_with_stdin};

/// Where Debian installs the plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// A pod: its namespace and the address the IPAM plugin gave it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// Makes pod namespace `pod_ns` and adds it to the bridge `cni0` of the
/// machine in `node_ns`, with an address from `subnet` (the bridge holds
/// its first address and is the pod's gateway), interface MTU `mtu`;
/// host-local keeps its leases under `data_dir` (one per lab, so parallel
/// labs never share them).
pub fn add_pod(node_ns: &str, pod_ns: &str, subnet: Ipv4Net, mtu: u32, data_dir: &Path) -> Pod {
    assert_success(
        &output("ip", &["netns", "add", pod_ns]),
        "ip netns add (pod)",
    );
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": subnet.to_string() }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": data_dir.join(node_ns).to_string_lossy(),
        },
    });
    let netns = format!("CNI_NETNS=/run/netns/{pod_ns}");
    let container = format!("CNI_CONTAINERID={pod_ns}");
    let path = format!("CNI_PATH={CNI_BIN}");
    let plugin = format!("{CNI_BIN}/bridge");
    let out = output_with_stdin(
        "ip",
        &[
            "netns",
            "exec",
            node_ns,
            "env",
            "CNI_COMMAND=ADD",
            &container,
            &netns,
            "CNI_IFNAME=eth0",
            &path,
            &plugin,
        ],
        &config.to_string(),
    );
    assert_success(&out, "the CNI bridge plugin (ADD)");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the bridge plugin's result is not JSON: {e}"));
    let address = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in the bridge plugin's result: {result}"));
    let ip = address
        .parse::<Ipv4Net>()
        .unwrap_or_else(|e| panic!("bad pod address {address}: {e}"))
        .addr();
    assert!(subnet.contains(&ip), "pod address {ip} outside {subnet}");
    Pod {
        ns: pod_ns.to_owned(),
        ip,
    }
}
