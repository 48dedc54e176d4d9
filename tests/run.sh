#!/usr/bin/env bash
# The whole meshd test suite, as root on Debian: installs the Debian
# packages the tests use, then runs
#   1. the plain build: unit tests, CLI tests, and the network-namespace
#      tests with the real binaries (including interop with wireguard-go);
#   2. the simulation build (`--features sim`, boringtun on a mock clock):
#      deterministic mesh scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite needs root (network namespaces, TUN devices): run it with sudo" >&2
    exit 1
fi

packages=(iproute2 iputils-ping iptables procps wireguard-go wireguard-tools iperf3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo test --locked
cargo test --locked --features sim
