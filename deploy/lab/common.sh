# shellcheck shell=bash disable=SC2034 # its variables are for the scripts sourcing it
# Shared by deploy/lab/{up,demo,down}. Sourced, not run.
#
# The lab is the NAT topology of DESIGN.md built out of network namespaces
# on this machine:
#
#   - "inet", the internet: a bridge with the documentation range
#     203.0.113.0/24 (RFC 5737). Public hosts and the public side of every
#     router hang off it;
#   - the rendezvous machine(s) and two public nodes, with a public address
#     on their NIC. A lab has one rendezvous machine, "rv", unless
#     LAB_SERVERS asks for more of the topology's (the demo builds both: two
#     servers of one mesh, sharing an etcd that runs on "rv");
#   - nodes behind NAT routers, one router namespace per site, each router
#     of a kind (deploy/lab/topology lists the kinds; up has one case of
#     rules per kind):
#       nat11       1:1 NAT, a cloud VM with an elastic IP: the router DNATs
#                   its public address to the node and SNATs the node's
#                   traffic back to it; the node only has a private address;
#       cone        MASQUERADE: conntrack keeps the source port while it is
#                   free, so one socket gets one public port whatever the
#                   destination (endpoint-independent mapping), and only the
#                   remote ip:port it sent to can answer (a port-restricted
#                   cone); unsolicited inbound is dropped on the WAN side;
#       cone2       the same, with 30 s UDP mappings: keepalives must hold;
#       sym1, sym2  MASQUERADE --random-fully: a new random public port for
#                   every destination (symmetric NAT), each behind its own
#                   router so that symmetric-to-symmetric can be tried;
#       lan1, lan2  two nodes on one private subnet behind one cone router
#                   without hairpinning: the same-VPC pair;
#       hair1/hair2 two nodes behind a cone router that hairpins;
#       bare        Linux MASQUERADE with no firewall at all (the hard case);
#       cgn         behind a home router that is itself behind a
#                   carrier-grade NAT (two layers of NAT);
#       v6a, v6b    dual stack: IPv4 behind symmetric NATs, a public IPv6
#                   /64 on each LAN, routed through a stateful firewall;
#       upnp        behind a home router that is a symmetric NAT until
#                   miniupnpd runs there and maps ports (NAT-PMP, PCP, UPnP
#                   IGD; the tests that need it start it).
#
# No namespace has a link to the host's own namespace: both ends of every
# veth pair are created inside lab namespaces. The internet namespace does
# forward IPv4 and has no default route, so a packet for an address outside
# the lab dies there; it routes IPv6 only between the routers' /64s of the
# topology. Private addresses exist only behind the lab's routers, and IPv6
# only where the topology gives it.
#
# Everything is named after LAB_PREFIX, so several labs can exist at once
# (the tests run one per test): set LAB_PREFIX (letters, digits, '_' and
# '-') and, if you like, LAB_DIR before calling up/down/demo. LAB_SERVERS
# (default 1) is how many of the topology's rendezvous machines `up` builds.

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

# The lab's machines and addresses come from deploy/lab/topology (the tests
# read the same file). The internet's own address is every public host's
# default gateway; as it does not forward, that gateway is a dead end for
# anything off the lab.
LAB_NODES=()
ROUTERS=()
RV_MACHINES=()
declare -A NODE_KIND=() NODE_ROUTER=() NODE_IP=() NODE_PUBLIC=() NODE_INET6=()
declare -A ROUTER_KIND=() ROUTER_UPLINK=() ROUTER_WAN=() ROUTER_LAN=() ROUTER_UDP_TIMEOUT=()
declare -A ROUTER_INET6=() ROUTER_PREFIX6=()
declare -A RV_IP=() RV_PORT=()
INTERNET6_NET="" INTERNET6_GW=""
# RV_MACHINES: the topology's rendezvous machines in the file's order, each
# with RV_IP (on its NIC, public) and RV_PORT (mesh-rendezvous's UDP port).
# NODE_KIND: public, one-to-one, cone, symmetric, lan, masquerade-bare,
# double-nat, dual-stack or upnp. NODE_ROUTER is empty for a public node;
# NODE_IP is the address on the node's own NIC; NODE_PUBLIC is where the
# internet sees it; NODE_INET6 its IPv6 address, if it has one. A router of
# ROUTER_KIND has its ROUTER_WAN address on "wan", on the internet or on
# the LAN of the router ROUTER_UPLINK names, and its private one (the
# gateway of the machines behind it) on "lan"; ROUTER_INET6 and ROUTER_PREFIX6
# (a /64) for a router that routes IPv6; ROUTER_UDP_TIMEOUT for one whose
# UDP mappings are short-lived.
while read -r record a b c d e; do
    case "$record" in
        "" | "#"*) ;;
        internet) INTERNET_NET=$a INTERNET_GW=$b ;;
        rendezvous) RV_MACHINES+=("$a") RV_IP[$a]=$b RV_PORT[$a]=$c ;;
        private-prefix-len) PRIVATE_PREFIX_LEN=$a ;;
        internet6) INTERNET6_NET=$a INTERNET6_GW=$b ;;
        router) ROUTERS+=("$a") ROUTER_KIND[$a]=$b ROUTER_UPLINK[$a]=$c ROUTER_WAN[$a]=$d ROUTER_LAN[$a]=$e ;;
        udp-timeout) ROUTER_UDP_TIMEOUT[$a]=$b ;;
        router6) ROUTER_INET6[$a]=$b ROUTER_PREFIX6[$a]=$c ;;
        node6) NODE_INET6[$a]=$b ;;
        node)
            LAB_NODES+=("$a")
            NODE_KIND[$a]=$b NODE_IP[$a]=$d NODE_PUBLIC[$a]=$e
            if [ "$c" = - ]; then NODE_ROUTER[$a]=""; else NODE_ROUTER[$a]=$c; fi
            ;;
        *)
            echo "deploy/lab/topology: unknown record '$record'" >&2
            exit 2
            ;;
    esac
done <"$REPO/deploy/lab/topology"
if [ "${#RV_MACHINES[@]}" -eq 0 ]; then
    echo "deploy/lab/topology: no rendezvous record" >&2
    exit 2
fi
# The first rendezvous machine: the only one of most labs.
RENDEZVOUS_IP=${RV_IP[${RV_MACHINES[0]}]} RENDEZVOUS_PORT=${RV_PORT[${RV_MACHINES[0]}]}

# The rendezvous machines of this lab: the first LAB_SERVERS of the topology's.
LAB_SERVERS=${LAB_SERVERS:-1}
if ! [[ $LAB_SERVERS =~ ^[1-9][0-9]*$ ]] || [ "$LAB_SERVERS" -gt "${#RV_MACHINES[@]}" ]; then
    echo "LAB_SERVERS='$LAB_SERVERS': the topology has 1 to ${#RV_MACHINES[@]} rendezvous machines" >&2
    exit 2
fi
LAB_RV=("${RV_MACHINES[@]:0:LAB_SERVERS}")

# The namespace of a lab machine: "inet", a rendezvous machine, a node or a
# router.
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
