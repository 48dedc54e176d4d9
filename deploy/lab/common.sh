# shellcheck shell=bash disable=SC2034 # its variables are for the scripts sourcing it
# Shared by deploy/lab/{up,demo,down}. Sourced, not run.
#
# The lab is the NAT topology of DESIGN.md built out of network namespaces
# on this machine:
#
#   - "inet", the internet: a bridge with the documentation range
#     203.0.113.0/24 (RFC 5737). Public hosts and the public side of every
#     router hang off it;
#   - the rendezvous and two public nodes, with a public address on their NIC;
#   - nodes behind NAT routers, one router namespace per site:
#       nat11       1:1 NAT, a cloud VM with an elastic IP: the router DNATs
#                   its public address to the node and SNATs the node's
#                   traffic back to it; the node only has a private address;
#       cone        MASQUERADE: conntrack keeps the source port while it is
#                   free, so one socket gets one public port whatever the
#                   destination (endpoint-independent mapping), and only the
#                   remote ip:port it sent to can answer (a port-restricted
#                   cone);
#       sym1, sym2  MASQUERADE --random-fully: a new random public port for
#                   every destination (symmetric NAT), each behind its own
#                   router so that symmetric-to-symmetric can be tried;
#       lan1, lan2  two nodes on one private subnet behind one MASQUERADE
#                   router: the same-VPC pair.
#
# No namespace has a link to the host's own namespace: both ends of every
# veth pair are created inside lab namespaces. The internet namespace does
# not forward and has no default route, so a packet for an address outside
# the lab dies there. Private addresses exist only behind the lab's routers.
#
# Everything is named after LAB_PREFIX, so several labs can exist at once
# (the tests run one per test): set LAB_PREFIX (letters, digits, '_' and
# '-') and, if you like, LAB_DIR before calling up/down/demo.

set -euo pipefail

LAB_PREFIX=${LAB_PREFIX:-mlab}
if ! [[ $LAB_PREFIX =~ ^[A-Za-z0-9_][A-Za-z0-9_-]{0,31}$ ]]; then
    echo "LAB_PREFIX='$LAB_PREFIX': use 1 to 32 letters, digits, '_' or '-'" >&2
    exit 2
fi
# The default lab keeps its historical directory; another prefix gets its own.
if [ "$LAB_PREFIX" = mlab ]; then
    LAB_DIR=${LAB_DIR:-/run/meshd-lab}
else
    LAB_DIR=${LAB_DIR:-/run/meshd-lab-$LAB_PREFIX}
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${MESHD_BIN:-$REPO/target/release}

# The internet. Its own address is every public host's default gateway; as
# it does not forward, that gateway is a dead end for anything off the lab.
INTERNET_NET=203.0.113.0/24
INTERNET_GW=203.0.113.1
RENDEZVOUS_IP=203.0.113.2
RENDEZVOUS_PORT=7443

# The nodes meshd runs on, in the order the demo enrols them.
LAB_NODES=(pub1 pub2 nat11 cone sym1 sym2 lan1 lan2)

# What each node is. NODE_ROUTER is empty for a public node; NODE_IP is the
# address on the node's own NIC; NODE_PUBLIC is where the internet sees it
# (the router's public address for the NATed ones).
declare -A NODE_KIND=(
    [pub1]=public [pub2]=public
    [nat11]=one-to-one [cone]=cone [sym1]=symmetric [sym2]=symmetric
    [lan1]=lan [lan2]=lan
)
declare -A NODE_ROUTER=(
    [pub1]="" [pub2]=""
    [nat11]=r-nat11 [cone]=r-cone [sym1]=r-sym1 [sym2]=r-sym2
    [lan1]=r-lan [lan2]=r-lan
)
declare -A NODE_IP=(
    [pub1]=203.0.113.11 [pub2]=203.0.113.12
    [nat11]=10.11.0.2 [cone]=10.30.0.2 [sym1]=10.41.0.2 [sym2]=10.42.0.2
    [lan1]=192.168.50.11 [lan2]=192.168.50.12
)
declare -A NODE_PUBLIC=(
    [pub1]=203.0.113.11 [pub2]=203.0.113.12
    [nat11]=203.0.113.20 [cone]=203.0.113.30 [sym1]=203.0.113.41 [sym2]=203.0.113.42
    [lan1]=203.0.113.50 [lan2]=203.0.113.50
)

# The routers: public address on "wan", private address (the gateway of
# the nodes behind it) on "lan", and the private subnet's prefix length.
ROUTERS=(r-nat11 r-cone r-sym1 r-sym2 r-lan)
declare -A ROUTER_WAN=(
    [r-nat11]=203.0.113.20 [r-cone]=203.0.113.30
    [r-sym1]=203.0.113.41 [r-sym2]=203.0.113.42 [r-lan]=203.0.113.50
)
declare -A ROUTER_LAN=(
    [r-nat11]=10.11.0.1 [r-cone]=10.30.0.1
    [r-sym1]=10.41.0.1 [r-sym2]=10.42.0.1 [r-lan]=192.168.50.1
)
PRIVATE_PREFIX_LEN=24

# The namespace of a lab machine: "inet", "rv", a node or a router.
ns() { echo "$LAB_PREFIX-$1"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "the lab needs root (network namespaces): run with sudo" >&2
        exit 1
    fi
}

# Every namespace of this lab that exists now, one per line.
lab_namespaces() {
    ip netns list | awk '{print $1}' | grep "^$LAB_PREFIX-" || true
}

# The internet namespace is created first, so it marks a lab as up.
lab_exists() { ip netns list | awk '{print $1}' | grep -qx "$(ns inet)"; }
