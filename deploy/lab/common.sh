# Shared by deploy/lab/{up,demo,down}. Sourced, not run.
#
# The lab is a set of network namespaces on this machine with no link to
# the host's own namespace: a "switch" namespace holding a bridge, and one
# namespace per node, each wired to the bridge by a veth pair. Underlay
# addresses come from the documentation range 192.0.2.0/24 (RFC 5737), so
# nothing can leave the lab even by mistake.

set -euo pipefail

LAB_PREFIX=mlab
LAB_DIR=${LAB_DIR:-/run/meshd-lab}
LAB_NODES=(a b c)
RENDEZVOUS_IP=192.0.2.2
RENDEZVOUS_PORT=7443
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${MESHD_BIN:-$REPO/target/release}

ns() { echo "$LAB_PREFIX-$1"; }
underlay_ip() { echo "192.0.2.$((10 + $1))"; }
overlay_ip() { echo "100.72.0.$((1 + $1))"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "the lab needs root (network namespaces): run with sudo" >&2
        exit 1
    fi
}

lab_exists() { ip netns list | grep -q "^$(ns sw)\b"; }
