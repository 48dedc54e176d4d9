//! flannel's `subnet.env`: the subnet flannel's `alloc` (or any) backend
//! gave this node, which meshd can advertise as its pod CIDR
//! (`advertise-flannel-subnet` in meshd.toml), so that flannel plus meshd is
//! a complete setup without VXLAN. Pure.
//!
//! flannel writes, e.g.:
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.3.1/24
//! FLANNEL_IPV6_SUBNET=fd10:244:0:3::1/64
//! FLANNEL_MTU=1380
//! FLANNEL_IPMASQ=true
//! ```
//!
//! `FLANNEL_SUBNET` is the bridge's address with the subnet's length; the
//! prefix to advertise is its network.

use ipnet::IpNet;

/// The node's pod subnets from a `subnet.env`, as networks: IPv4 first,
/// then IPv6; none when flannel has not written them yet. A value that is
/// not a prefix is an error naming the line.
pub fn subnets(env: &str) -> Result<Vec<IpNet>, String> {
    let mut nets = Vec::new();
    for key in ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"] {
        let Some(value) = env.lines().find_map(|line| {
            let (k, v) = line.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        }) else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        let net: IpNet = value
            .parse()
            .map_err(|e| format!("{key}={value:?} is not a prefix: {e}"))?;
        nets.push(net.trunc());
    }
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subnets_flannel_gave_this_node_are_read_as_networks() {
        let env = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n\
                   FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET=fd10:244:0:3::1/64\n\
                   FLANNEL_MTU=1380\nFLANNEL_IPMASQ=true\n";
        let nets = subnets(env).unwrap();
        let want: Vec<IpNet> = vec![
            "10.244.3.0/24".parse().unwrap(),
            "fd10:244:0:3::/64".parse().unwrap(),
        ];
        assert_eq!(nets, want);
        assert!(subnets("").unwrap().is_empty());
        assert!(subnets("FLANNEL_NETWORK=10.244.0.0/16\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_value_that_is_no_prefix_is_an_error_naming_it() {
        let err = subnets("FLANNEL_SUBNET=10.244.3.1\n").unwrap_err();
        assert!(err.contains("FLANNEL_SUBNET"), "{err}");
        let err = subnets("FLANNEL_SUBNET=\u{0}garbage/99\n").unwrap_err();
        assert!(err.contains("not a prefix"), "{err}");
    }
}
