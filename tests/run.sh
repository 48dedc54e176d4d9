#!/usr/bin/env bash
# The whole meshd test suite, as root on Debian: installs the Debian
# packages the tests use, then runs
#   0. the style checks: `cargo fmt --check` and `cargo clippy -D warnings`
#      (both builds; the rules are rustfmt.toml, clippy.toml and the
#      [lints] table of Cargo.toml);
#   1. the plain build: unit tests, CLI tests, and the network-namespace
#      tests with the real binaries (including interop with wireguard-go);
#   2. the simulation build (`--features sim`, boringtun on a mock clock):
#      deterministic mesh scenarios;
#   3. a few seconds of every fuzz target (fuzz/run.sh).
# The upgrade test runs the previous release's binaries, built here once.
set -euo pipefail
cd "$(dirname "$0")/.."

# The suite builds three trees (plain, sim, fuzz) on machines whose disk is
# bounded: no incremental caches (about 2 GB per tree), and the dev
# profile's debug info is line tables only (Cargo.toml).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite needs root (network namespaces, TUN devices): run it with sudo" >&2
    exit 1
fi

# systemd: `systemd-analyze verify` of the units (tests/systemd.rs, offline,
# no systemd as PID 1); strace: the system calls the confined daemons make;
# shellcheck: deploy/install.sh (tests/install.rs); etcd-server and
# etcd-client: a three-member etcd over overlay addresses, run inside the
# NAT lab's namespaces only (tests/lab_kube.rs), a three-member etcd on lab
# machines that keeps the mesh of two rendezvous servers in the NAT lab
# (tests/lab_servers.rs), and the store's etcd
# backend against one- and three-member clusters in namespaces of their own
# (tests/store_etcd.rs); protobuf-compiler and libprotobuf-dev (protoc and
# the well-known .proto files it imports): build dependencies of the
# etcd-client crate, so they come before the first cargo command;
# containernetworking-plugins: the CNI `bridge` and `host-local` plugins
# that make the pods of tests/lab_pods.rs; bird2: the BGP daemon whose
# routes on mesh0 meshd learns there; miniupnpd-iptables: the NAT-PMP, PCP
# and UPnP IGD router of tests/lab_portmap.rs, and miniupnpc's upnpc, which
# lists its mappings there; graphviz: `dot` renders the graph of
# `mesh-rendezvous paths --dot` in tests/lab_paths.rs.
packages=(iproute2 iputils-ping iptables conntrack procps wireguard-go wireguard-tools iperf3 systemd strace shellcheck etcd-server etcd-client protobuf-compiler libprotobuf-dev containernetworking-plugins bird2 miniupnpd-iptables miniupnpc graphviz)
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

# Known vulnerabilities: cargo audit needs the RustSec database from GitHub.
# Where GitHub is out of reach, say so; tests/dependencies.rs still holds
# the floors this project depends on.
if timeout 20 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
    command -v cargo-audit >/dev/null || cargo install --locked cargo-audit
    cargo audit
else
    echo "cargo audit skipped: the RustSec advisory database (github.com) is unreachable from here"
fi

# The previous release, for tests/lab_upgrade.rs: a live mesh of it is
# upgraded one machine at a time to this tree (DESIGN.md, "Rolling
# upgrades"). Built once from its commit into target/previous/, kept there.
previous_release="v0.3.0"
previous_commit=d0424cd
previous="$PWD/target/previous"
if [ "$(cat "$previous/release" 2>/dev/null)" != "$previous_release ($previous_commit)" ]; then
    if git cat-file -e "$previous_commit^{commit}" 2>/dev/null; then
        echo "building the previous release, $previous_release ($previous_commit), for the upgrade test"
        rm -rf "$previous"
        mkdir -p "$previous/src"
        git archive "$previous_commit" | tar -x -C "$previous/src"
        CARGO_PROFILE_DEV_DEBUG=false CARGO_TARGET_DIR="$previous/target" cargo build --locked --bins --manifest-path "$previous/src/Cargo.toml"
        cp "$previous/target/debug/meshd" "$previous/target/debug/meshctl" "$previous/target/debug/mesh-rendezvous" "$previous/"
        # Only the three binaries are kept: its build tree is gigabytes.
        rm -rf "$previous/target" "$previous/src"
        echo "$previous_release ($previous_commit)" >"$previous/release"
    else
        echo "NOTE: commit $previous_commit ($previous_release) is not in this clone; tests/lab_upgrade.rs will say it was skipped"
    fi
fi
if [ -f "$previous/release" ]; then
    export MESHD_PREVIOUS_RELEASE="$previous"
fi

# The style the code is held to: formatted, and no clippy warning in either
# build (the sim build compiles the simulation and its tests).
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --all --check
(cd fuzz && cargo fmt --all --check)
cargo clippy --locked --all-targets -- -D warnings
CARGO_TARGET_DIR=target/sim cargo clippy --locked --all-targets --features sim -- -D warnings

cargo test --locked
# Its own target directory: a sim build of the binaries (mock clock) must
# never replace the real ones that the namespace tests start.
CARGO_TARGET_DIR=target/sim cargo test --locked --features sim

# A short run of every fuzz target from its checked-in corpus (libFuzzer on
# the stable toolchain; longer runs: fuzz/README.md).
bash fuzz/run.sh 5
