#!/usr/bin/env bash
# Packet path benchmark of meshd against other userspace tunnels, as root.
#
# In one run, on this machine only: two network namespaces joined by a veth
# pair, and through each tunnel in turn a single-stream iperf3 TCP transfer
# from namespace a to namespace b (the median of --runs runs), the CPU of
# each tunnel daemon during those runs (utime+stime from /proc, % of one
# core), and the ping RTT through the tunnel. Tunnels:
#
#   veth                 the bare veth pair: the baseline every ratio uses
#   meshd                meshd with a static config (target/release/meshd)
#   wireguard-go         wireguard-go + wg (Debian packages)
#   boringtun            boringtun-cli + wg (cargo install boringtun-cli)
#   nebula               nebula, certificates from nebula-cert, static host map
#   meshd-relay          two meshd nodes joined through a mesh-rendezvous in a
#                        third namespace, their direct path dropped by
#                        iptables so every packet goes through the relay; the
#                        relay's per-node rate limits raised out of the way
#   meshd-relay-default  the same with the rendezvous's default rate limits
#   veth-vxlan           a flannel-style VXLAN (VNI 1, UDP 8472, inner MTU
#                        1330) over the bare veth: the baseline of the next
#   meshd-vxlan          the same VXLAN over meshd's mesh0, as flannel runs
#                        on a mesh node (pod traffic is UDP to meshd)
#   veth-pods            pod to pod: a pod on each node (its own namespace,
#                        made by the real CNI bridge + host-local plugins
#                        from /usr/lib/cni: a veth on the node's bridge
#                        cni0), pod CIDRs 10.244.1.0/24 on a and
#                        10.244.2.0/24 on b, routed between the nodes over
#                        the bare veth (10.244.2.0/24 via b's underlay
#                        address, as flannel's host-gw does): the baseline
#                        of the next two
#   meshd-pods-vxlan     the same pods over a flannel-style VXLAN on
#                        meshd's mesh0, routed the way flannel's vxlan
#                        backend routes them (10.244.2.0/24 via 10.244.2.0
#                        dev vx0 onlink, a permanent neighbour and an fdb
#                        entry for the peer's VTEP); pod MTU 1330
#   meshd-pods           the same pods routed natively over mesh0: each
#                        static peer's allowed-ips holds its pod CIDR, and
#                        meshd routes that prefix over mesh0; pod MTU 1380.
#                        Printed with the ratios meshd-pods ÷ meshd and
#                        meshd-pods ÷ meshd-pods-vxlan of the same run
#
# and meshd's resident memory: idle with one peer, after the transfers, and
# idle with 1000 configured peers (random keys, /32 allowed IPs, no
# endpoints). Every tunnel uses inner MTU 1380 (meshd's default).
#
# Prints Markdown tables on stdout (progress goes to stderr). Installs what
# is missing (Debian packages; boringtun-cli with cargo) unless --no-install;
# a tunnel that can't be had is skipped with a note in the table.
#
# Namespaces are named mb<pid>-<role> and have no link to the host's own
# namespace (both veth ends are created inside them); the underlay is the
# documentation range 192.0.2.0/24, the overlay 100.72.0.0/16, the pods
# 10.244.0.0/16. Everything the run creates is removed on any exit, Ctrl-C
# included.
#
# Usage: sudo benches/netns.sh [--runs N] [--seconds S] [--only NAME...]
#                              [--no-install] [--bin DIR] [--logs DIR] [--idle-wait S]
#   --runs N       iperf3 runs per tunnel (default 3); the table shows the median
#   --seconds S    length of each run (default 10)
#   --only NAME…   just these tunnels (names above; "rss" for the 1000-peer figure)
#   --no-install   skip what is missing instead of installing it
#   --bin DIR      where meshd, meshctl and mesh-rendezvous are (target/release)
#   --logs DIR     keep the daemons' logs, configs and iperf3 JSON there
#   --idle-wait S  before each tunnel, wait up to S seconds (default 300) for
#                  the machine to be idle: on a shared machine a compile
#                  running alongside halves what a tunnel gets. The table's
#                  "machine busy" column shows what the whole machine used
#                  during the runs, ours included

# Functions run through traps, wait_for and "$start" are not unreachable.
# shellcheck disable=SC2317
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ALL_TUNNELS=(veth meshd wireguard-go boringtun nebula meshd-relay meshd-relay-default veth-vxlan meshd-vxlan
    veth-pods meshd-pods-vxlan meshd-pods)

RUNS=3
SECONDS_PER_RUN=10
ONLY=()
INSTALL=1
BIN=$REPO/target/release
LOGS=""
IDLE_WAIT=300

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    echo "tunnels: ${ALL_TUNNELS[*]} (and rss for the memory figures)" >&2
    exit "${1:-2}"
}

while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=${2:?--runs needs a number}; shift 2 ;;
        --seconds) SECONDS_PER_RUN=${2:?--seconds needs a number}; shift 2 ;;
        --only)
            shift
            while [ $# -gt 0 ] && [[ $1 != --* ]]; do ONLY+=("$1"); shift; done
            [ ${#ONLY[@]} -gt 0 ] || { echo "--only needs at least one name" >&2; usage; }
            ;;
        --no-install) INSTALL=0; shift ;;
        --bin) BIN=${2:?--bin needs a directory}; shift 2 ;;
        --logs) LOGS=${2:?--logs needs a directory}; shift 2 ;;
        --idle-wait) IDLE_WAIT=${2:?--idle-wait needs a number}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "--runs: a positive number, not '$RUNS'" >&2; exit 2; }
[[ $SECONDS_PER_RUN =~ ^[1-9][0-9]*$ ]] || { echo "--seconds: a positive number, not '$SECONDS_PER_RUN'" >&2; exit 2; }
[[ $IDLE_WAIT =~ ^[0-9]+$ ]] || { echo "--idle-wait: a number of seconds, not '$IDLE_WAIT'" >&2; exit 2; }
for name in "${ONLY[@]}"; do
    [[ " ${ALL_TUNNELS[*]} rss " == *" $name "* ]] || { echo "--only: unknown name '$name'" >&2; usage; }
done
if [ "$(id -u)" -ne 0 ]; then
    echo "needs root (network namespaces, TUN devices): run it with sudo" >&2
    exit 1
fi

selected() { # selected NAME: whether NAME is to be measured
    [ ${#ONLY[@]} -eq 0 ] || [[ " ${ONLY[*]} " == *" $1 "* ]]
}

# --- cleanup: everything this run creates is named after PREFIX ----------

PREFIX="mb$$-"
WG_PREFIX="mb$$" # interface names of wireguard-go/boringtun: their UAPI sockets are host-wide
WORK=$(mktemp -d "/tmp/meshd-bench.XXXXXX")
PIDS=()

our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX" || true
}

kill_namespaces() {
    local ns pid waited=0
    # SIGTERM first, so the daemons take their interfaces down themselves.
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
    done
    PIDS=()
    for ns in $(our_namespaces); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -f /var/run/wireguard/"$WG_PREFIX"*.sock
}

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM HUP
    kill_namespaces
    if [ -n "$LOGS" ]; then
        rm -rf "${WORK:?}/bin" && mkdir -p "$LOGS" && cp -r "$WORK"/. "$LOGS"/ && echo "logs and configs: $LOGS" >&2
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM HUP

log() { echo "[$(date +%T)] $*" >&2; }

# --- tools ---------------------------------------------------------------

apt_updated=0
need_debian() { # need_debian COMMAND PACKAGE: whether COMMAND is there (installed if allowed)
    command -v "$1" >/dev/null && return 0
    [ "$INSTALL" = 1 ] || return 1
    log "installing $2"
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2 || true
    command -v "$1" >/dev/null
}

for tool in "iperf3 iperf3" "jq jq" "ping iputils-ping" "iptables iptables" "ip iproute2"; do
    # shellcheck disable=SC2086 # two words on purpose
    need_debian $tool || { echo "cannot run without ${tool%% *}" >&2; exit 1; }
done

boringtun_bin() {
    command -v boringtun-cli 2>/dev/null && return 0
    [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli" ] && { echo "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli"; return 0; }
    [ "$INSTALL" = 1 ] && command -v cargo >/dev/null || return 1
    log "installing boringtun-cli with cargo (a few minutes)"
    cargo install --locked boringtun-cli >&2 || return 1
    echo "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli"
}

# --- namespaces ----------------------------------------------------------

A=${PREFIX}a B=${PREFIX}b R=${PREFIX}r S=${PREFIX}s
POD_A=${PREFIX}pa POD_B=${PREFIX}pb # the pods on a and b
A_IP=192.0.2.1 B_IP=192.0.2.2 R_IP=192.0.2.3
A_OV=100.72.0.1 B_OV=100.72.0.2
MTU=1380
PORT=51820

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

new_ns() {
    ip netns add "$1"
    ip -n "$1" link set lo up
}

# a and b, one veth pair between them.
pair_up() {
    kill_namespaces
    new_ns "$A"
    new_ns "$B"
    ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
    ip -n "$A" addr add $A_IP/24 dev eth0
    ip -n "$B" addr add $B_IP/24 dev eth0
    ip -n "$A" link set eth0 up
    ip -n "$B" link set eth0 up
}

# a, b and r on a bridge in a switch namespace.
triangle_up() {
    kill_namespaces
    new_ns "$S"
    ip -n "$S" link add br0 type bridge
    ip -n "$S" link set br0 up
    local ns addr
    for ns in "$A:$A_IP" "$B:$B_IP" "$R:$R_IP"; do
        addr=${ns#*:} ns=${ns%%:*}
        new_ns "$ns"
        ip -n "$S" link add "p${ns: -1}" type veth peer name eth0 netns "$ns"
        ip -n "$S" link set "p${ns: -1}" master br0
        ip -n "$S" link set "p${ns: -1}" up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

spawn() { # spawn NS LOG PROGRAM ARGS...: starts a daemon in NS; its pid in SPAWNED
    local ns=$1 logfile=$2
    shift 2
    ip netns exec "$ns" "$@" >"$logfile" 2>&1 </dev/null &
    SPAWNED=$!
    disown "$SPAWNED" # no "Killed" notices: kill_namespaces ends it
    PIDS+=("$SPAWNED")
}

wait_for() { # wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

alive() { kill -0 "$1" 2>/dev/null; }

# --- measurements --------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { # cpu_ticks PID: utime+stime of a process (all its threads)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    # Fields after the ")" that ends the command name: utime is 14, stime 15.
    echo "${stat##*) }" | awk '{print $12 + $13}'
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

METRICS_PORT=9586 # meshd's and mesh-rendezvous's metrics, on each namespace's loopback

scrape() { # scrape NS: the Prometheus text of the daemon serving metrics in NS
    in_ns "$1" timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$METRICS_PORT &&
        printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 && cat <&3" 2>/dev/null || true
}

drops() { # drops NS: "reason count, …" of the non-zero drop counters in NS's metrics
    scrape "$1" | awk '/_dropped_packets_total\{/ && $NF > 0 {
        match($0, /reason="[^"]*"/)
        printf "%s%s %s", sep, substr($0, RSTART + 8, RLENGTH - 9), $NF
        sep = ", "
    }'
}

drop_note() { # drop_note LABEL NS...: "; drops LABEL: …" when any were counted
    local label=$1 ns d out=""
    shift
    for ns in "$@"; do
        d=$(drops "$ns")
        [ -n "$d" ] && out+="${out:+; }${ns#"$PREFIX"}: $d"
    done
    [ -n "$out" ] && echo "; $label drops ($out)"
    return 0
}

cpu_jiffies() { # cpu_jiffies: "busy total" jiffies of all CPUs since boot
    awk '/^cpu / {busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6}' /proc/stat
}

busy_pct() { # busy_pct "BUSY TOTAL" "BUSY TOTAL": % of all CPUs busy between two samples
    awk -v a="$1" -v b="$2" 'BEGIN {split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0)}'
}

wait_idle() { # waits up to IDLE_WAIT s for 2 s in a row under 15 % busy
    local deadline=$((SECONDS + IDLE_WAIT)) quiet=0 a b pct said=0
    [ "$IDLE_WAIT" -gt 0 ] || return 0
    while [ "$quiet" -lt 2 ]; do
        a=$(cpu_jiffies)
        sleep 1
        b=$(cpu_jiffies)
        pct=$(busy_pct "$a" "$b")
        if [ "$pct" -lt 15 ]; then
            quiet=$((quiet + 1))
        else
            quiet=0
            [ "$said" = 1 ] || log "waiting for the machine to be idle (${pct}% busy)"
            said=1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            [ "$quiet" -gt 0 ] || log "the machine is still busy (${pct}%): measuring anyway"
            return
        fi
    done
}

median() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) exit; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

ping_avg() { # ping_avg FROM_NS TO: average RTT in ms of 20 pings
    in_ns "$1" ping -n -q -c 20 -i 0.05 -W 1 "$2" 2>/dev/null |
        awk -F'/' '/^(rtt|round-trip)/ {print $5}'
}

# measure NAME FROM_NS TO_IP NOTE PID...: iperf3 b ← a through TO_IP, with the
# CPU of each PID; appends a result line and keeps the median in
# MEDIANS[NAME]. The iperf3 server runs in namespace b, or in TO_NS if set.
RESULTS=()
declare -A MEDIANS=()
BASELINE=""
LAST_MED=""
VXLAN_BASELINE=""
BASELINE_PING=""
measure() {
    local name=$1 from=$2 to=$3 note=$4
    shift 4
    local pids=("$@") to_ns
    to_ns=${TO_NS:-$B}
    if ! wait_for 30 "$name to carry a ping" in_ns "$from" ping -n -c 1 -W 1 "$to"; then
        skip "$name" "no ping through the tunnel within 30 s"
        return
    fi
    local rtt
    rtt=$(ping_avg "$from" "$to")

    spawn "$to_ns" "$WORK/iperf3-server-$name.log" iperf3 -s -B "$to"
    local server=$SPAWNED
    wait_for 10 "iperf3 server" in_ns "$to_ns" sh -c "ss -Hltn 'sport = :5201' | grep -q ." || true

    local gbits=() retrs=() before=() after=() run start end total_wall=0 i
    local busy=0 total=0 j0 j1
    local ticks=()
    for i in "${!pids[@]}"; do ticks[i]=0; done
    for run in $(seq "$RUNS"); do
        for i in "${!pids[@]}"; do before[i]=$(cpu_ticks "${pids[i]}"); done
        j0=$(cpu_jiffies)
        start=$(date +%s.%N)
        local json="$WORK/iperf3-$name-$run.json"
        if ! in_ns "$from" timeout --foreground $((SECONDS_PER_RUN + 30)) \
            iperf3 -c "$to" -t "$SECONDS_PER_RUN" -J >"$json" 2>"$json.err"; then
            log "$name run $run: iperf3 failed: $(jq -r '.error // empty' "$json" 2>/dev/null) $(head -c 300 "$json.err")"
            continue
        fi
        end=$(date +%s.%N)
        j1=$(cpu_jiffies)
        busy=$((busy + ${j1% *} - ${j0% *}))
        total=$((total + ${j1#* } - ${j0#* }))
        for i in "${!pids[@]}"; do
            after[i]=$(cpu_ticks "${pids[i]}")
            ticks[i]=$((ticks[i] + after[i] - before[i]))
        done
        total_wall=$(awk -v a="$start" -v b="$end" -v t="$total_wall" 'BEGIN {print t + b - a}')
        local bps
        bps=$(jq -r '.end.sum_received.bits_per_second' "$json")
        gbits+=("$(awk -v b="$bps" 'BEGIN {printf "%.3f", b / 1e9}')")
        retrs+=("$(jq -r '.end.sum_sent.retransmits // 0' "$json")")
        log "$name run $run: ${gbits[-1]} Gbit/s"
    done
    kill "$server" 2>/dev/null || true
    for i in "${!pids[@]}"; do
        alive "${pids[i]}" || note+="; warning: daemon $((i + 1)) exited during the runs"
    done
    if [ ${#gbits[@]} -eq 0 ]; then
        skip "$name" "every iperf3 run failed"
        return
    fi

    local med retr cpu="" pct
    med=$(printf '%s\n' "${gbits[@]}" | median)
    retr=$(printf '%s\n' "${retrs[@]}" | median)
    for i in "${!pids[@]}"; do
        pct=$(awk -v t="${ticks[i]}" -v hz="$CLK_TCK" -v w="$total_wall" 'BEGIN {printf "%.0f", 100 * t / hz / w}')
        cpu+="${cpu:+ / }$pct"
    done
    if [ "$name" = veth ]; then
        BASELINE=$med
        BASELINE_PING=$rtt
    fi
    LAST_MED=$med
    MEDIANS[$name]=$med
    local ratio="–" added="–"
    if [ -n "$BASELINE" ]; then
        ratio=$(awk -v m="$med" -v b="$BASELINE" 'BEGIN {printf "%.3f", m / b}')
    fi
    if [ -n "$BASELINE_PING" ] && [ -n "$rtt" ]; then
        added=$(awk -v r="$rtt" -v b="$BASELINE_PING" 'BEGIN {printf "%+.3f", r - b}')
    fi
    local machine
    machine=$(busy_pct "0 0" "$busy $total")
    RESULTS+=("| $name | $med | ${gbits[*]} | $ratio | $retr | ${cpu:-–} | $machine | ${rtt:-–} | $added | $note |")
}

skip() { # skip NAME WHY
    log "skipping $1: $2"
    RESULTS+=("| $1 | – | – | – | – | – | – | – | – | skipped: $2 |")
}

# --- tunnels -------------------------------------------------------------

keypair() { # keypair NAME: $WORK/NAME.key (0600) and $WORK/NAME.pub
    (umask 077 && wg genkey >"$WORK/$1.key")
    wg pubkey <"$WORK/$1.key" >"$WORK/$1.pub"
}

meshd_ready() { # meshd_ready SOCKET
    "$BIN/meshctl" --socket "$1" status --json >/dev/null 2>&1
}

# meshd_config NAME ADDRESS [PEER_NAME PEER_ENDPOINT PEER_OVERLAY [PEER_PREFIX]]:
# a static config; PEER_PREFIX (a pod CIDR) joins the peer's allowed-ips.
meshd_config() {
    local name=$1 address=$2
    cat >"$WORK/$name.toml" <<EOF
private-key-file = "$WORK/$name.key"
listen-port = $PORT
interface = "mesh0"
address = "$address/16"
mtu = $MTU
socket = "$WORK/$name.sock"
uapi-dir = "$WORK/uapi-$name"
EOF
    if [ $# -ge 5 ]; then
        local allowed="\"$5/32\""
        [ -n "${6:-}" ] && allowed+=", \"$6\""
        cat >>"$WORK/$name.toml" <<EOF

[[peer]]
public-key = "$(cat "$WORK/$3.pub")"
endpoint = "$4"
allowed-ips = [$allowed]
EOF
    fi
}

start_meshd() { # start_meshd NS NAME: runs meshd with $WORK/NAME.toml; pid in SPAWNED
    spawn "$1" "$WORK/meshd-$2.log" "$BIN/meshd" run --config "$WORK/$2.toml" --socket "$WORK/$2.sock" \
        --metrics "127.0.0.1:$METRICS_PORT"
    local pid=$SPAWNED
    wait_for 20 "meshd $2 to be ready" meshd_ready "$WORK/$2.sock" || { alive "$pid" || tail -5 "$WORK/meshd-$2.log" >&2; return 1; }
    SPAWNED=$pid
}

MESHD_RSS_IDLE="" MESHD_RSS_AFTER=""

bench_veth() {
    pair_up
    measure veth "$A" "$B_IP" "kernel only"
}

# meshd_pair NAME [A_PODS B_PODS]: meshd on a and b (static config, each
# the other's peer, with the pod CIDR behind it if given), their pids in PA
# and PB; skips NAME and fails if either can't be had.
PA="" PB=""
meshd_pair() {
    if [ ! -x "$BIN/meshd" ]; then
        skip "$1" "no $BIN/meshd: cargo build --release --locked --bins"
        return 1
    fi
    pair_up
    keypair ma
    keypair mb
    meshd_config ma $A_OV mb "$B_IP:$PORT" $B_OV "${3:-}"
    meshd_config mb $B_OV ma "$A_IP:$PORT" $A_OV "${2:-}"
    start_meshd "$A" ma || { skip "$1" "meshd did not start"; return 1; }
    PA=$SPAWNED
    start_meshd "$B" mb || { skip "$1" "meshd did not start"; return 1; }
    PB=$SPAWNED
    wait_for 30 "meshd tunnel" in_ns "$A" ping -n -c 1 -W 1 $B_OV || true
}

bench_meshd() {
    meshd_pair meshd || return 0
    local pa=$PA pb=$PB
    sleep 1
    MESHD_RSS_IDLE=$(rss_kb "$pa")
    measure meshd "$A" $B_OV "static config" "$pa" "$pb"
    MESHD_RSS_AFTER=$(rss_kb "$pa")
    RESULTS[-1]="${RESULTS[-1]% |}$(drop_note meshd "$A" "$B")$(batching_note) |"
}

# vxlan_up DEV A_LOCAL B_LOCAL: a flannel-style VXLAN between a and b over DEV.
A_VX=10.244.0.1 B_VX=10.244.0.2
vxlan_up() {
    ip -n "$A" link add vx0 type vxlan id 1 local "$2" remote "$3" dstport 8472 dev "$1"
    ip -n "$B" link add vx0 type vxlan id 1 local "$3" remote "$2" dstport 8472 dev "$1"
    ip -n "$A" addr add $A_VX/24 dev vx0
    ip -n "$B" addr add $B_VX/24 dev vx0
    ip -n "$A" link set vx0 mtu $((MTU - 50)) up
    ip -n "$B" link set vx0 mtu $((MTU - 50)) up
}

bench_veth_vxlan() {
    pair_up
    vxlan_up eth0 $A_IP $B_IP
    measure veth-vxlan "$A" $B_VX "VXLAN over the bare veth"
    VXLAN_BASELINE=$LAST_MED
}

bench_meshd_vxlan() {
    meshd_pair meshd-vxlan || return 0
    vxlan_up mesh0 $A_OV $B_OV
    measure meshd-vxlan "$A" $B_VX "VXLAN over meshd's mesh0" "$PA" "$PB"
    RESULTS[-1]="${RESULTS[-1]% |}$(batching_note) |"
    if [ -n "$VXLAN_BASELINE" ]; then
        RESULTS[-1]="${RESULTS[-1]% |}; $(awk -v m="$LAST_MED" -v b="$VXLAN_BASELINE" 'BEGIN {printf "%.3f", m / b}') × veth-vxlan |"
    fi
}

# --- pods ----------------------------------------------------------------

# Pod CIDRs of nodes a and b; the bridge (the pods' gateway) holds the first
# address of each, flannel's VTEP the network address.
A_PODS=10.244.1.0/24 B_PODS=10.244.2.0/24
A_VTEP=10.244.1.0 B_VTEP=10.244.2.0
A_VTEP_MAC=02:0a:f4:01:00:00 B_VTEP_MAC=02:0a:f4:02:00:00
CNI_BIN=/usr/lib/cni
POD_IP="" POD_B_IP=""

need_cni() { # need_cni NAME: whether the CNI plugins are there; skips NAME if not
    need_debian "$CNI_BIN/bridge" containernetworking-plugins && [ -x "$CNI_BIN/host-local" ] && return 0
    skip "$1" "the CNI plugins (containernetworking-plugins) can't be installed"
    return 1
}

# add_pod NODE_NS POD_NS SUBNET MTU: makes POD_NS a pod of NODE_NS the way a
# container runtime does: the bridge plugin, CNI_COMMAND=ADD, the network
# configuration on stdin, run in the node's namespace (a veth from the
# node's bridge cni0 to the pod's eth0, an address from host-local, a
# default route through the bridge). The pod's address in POD_IP.
add_pod() {
    local node=$1 pod=$2 subnet=$3 mtu=$4 result
    new_ns "$pod"
    result=$(in_ns "$node" env CNI_COMMAND=ADD CNI_CONTAINERID="$pod" CNI_NETNS="/run/netns/$pod" \
        CNI_IFNAME=eth0 CNI_PATH=$CNI_BIN $CNI_BIN/bridge <<EOF
{
  "cniVersion": "1.0.0",
  "name": "pods",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipMasq": false,
  "mtu": $mtu,
  "ipam": {
    "type": "host-local",
    "ranges": [[{"subnet": "$subnet"}]],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dataDir": "$WORK/cni/$node"
  }
}
EOF
    ) || { log "the CNI bridge plugin failed in $node: $result"; return 1; }
    POD_IP=$(jq -r '.ips[0].address // empty' <<<"$result")
    POD_IP=${POD_IP%/*}
    [ -n "$POD_IP" ] || { log "no address in the bridge plugin's result: $result"; return 1; }
}

# pods_up MTU: a pod on a (A_PODS) and one on b (B_PODS), interface MTU MTU;
# b's pod's address in POD_B_IP. The nodes forward.
pods_up() {
    rm -rf "$WORK/cni"
    add_pod "$A" "$POD_A" $A_PODS "$1" || return 1
    add_pod "$B" "$POD_B" $B_PODS "$1" || return 1
    POD_B_IP=$POD_IP
    in_ns "$A" sysctl -qw net.ipv4.ip_forward=1
    in_ns "$B" sysctl -qw net.ipv4.ip_forward=1
}

# flannel_vxlan_up: what flannel's vxlan backend sets up on a and b, its
# VXLAN device on mesh0: a VTEP per node with no learning and its pod
# CIDR's network address, and for the other node a route to its pod CIDR
# through its VTEP address (onlink), a permanent neighbour entry for that
# address and a forwarding entry sending its VTEP's MAC to its overlay IP.
flannel_vxlan_up() {
    local side ns local_ov vtep mac peer_pods peer_vtep peer_mac peer_ov
    for side in a b; do
        if [ $side = a ]; then
            ns=$A local_ov=$A_OV vtep=$A_VTEP mac=$A_VTEP_MAC
            peer_pods=$B_PODS peer_vtep=$B_VTEP peer_mac=$B_VTEP_MAC peer_ov=$B_OV
        else
            ns=$B local_ov=$B_OV vtep=$B_VTEP mac=$B_VTEP_MAC
            peer_pods=$A_PODS peer_vtep=$A_VTEP peer_mac=$A_VTEP_MAC peer_ov=$A_OV
        fi
        ip -n "$ns" link add vx0 address $mac type vxlan id 1 local "$local_ov" dstport 8472 nolearning dev mesh0
        ip -n "$ns" addr add "$vtep/32" dev vx0
        ip -n "$ns" link set vx0 mtu $((MTU - 50)) up
        ip -n "$ns" route add "$peer_pods" via "$peer_vtep" dev vx0 onlink
        ip -n "$ns" neigh add "$peer_vtep" lladdr $peer_mac dev vx0 nud permanent
        bridge -n "$ns" fdb add $peer_mac dev vx0 dst "$peer_ov" self permanent
    done
}

batching_note() { # batching_note: "; packets per call a: …; b: …" from meshctl status
    local side line out=""
    for side in a b; do
        line=$("$BIN/meshctl" --socket "$WORK/m$side.sock" status 2>/dev/null | sed -n 's/^batching: *//p')
        [ -n "$line" ] && out+="; $side: ${line/ packets per call/}"
    done
    [ -n "$out" ] && echo "; packets per call$out"
    return 0
}

ratio() { # ratio A B: MEDIANS[A] / MEDIANS[B], or "–" if either is missing
    if [ -n "${MEDIANS[$1]:-}" ] && [ -n "${MEDIANS[$2]:-}" ]; then
        awk -v m="${MEDIANS[$1]}" -v b="${MEDIANS[$2]}" 'BEGIN {printf "%.3f", (b > 0 ? m / b : 0)}'
    else
        echo "–"
    fi
}

bench_veth_pods() {
    need_cni veth-pods || return 0
    pair_up
    pods_up $MTU || { skip veth-pods "the CNI plugins made no pods"; return 0; }
    ip -n "$A" route add $B_PODS via $B_IP
    ip -n "$B" route add $A_PODS via $A_IP
    TO_NS=$POD_B measure veth-pods "$POD_A" "$POD_B_IP" \
        "pod to pod (CNI bridge), pod CIDRs routed over the bare veth; pod MTU $MTU"
}

bench_meshd_pods_vxlan() {
    need_cni meshd-pods-vxlan || return 0
    meshd_pair meshd-pods-vxlan || return 0
    pods_up $((MTU - 50)) || { skip meshd-pods-vxlan "the CNI plugins made no pods"; return 0; }
    flannel_vxlan_up
    TO_NS=$POD_B measure meshd-pods-vxlan "$POD_A" "$POD_B_IP" \
        "pod to pod (CNI bridge) over flannel-style VXLAN on mesh0; pod MTU $((MTU - 50))" "$PA" "$PB"
    RESULTS[-1]="${RESULTS[-1]% |}$(drop_note meshd "$A" "$B")$(batching_note) |"
}

bench_meshd_pods() {
    need_cni meshd-pods || return 0
    meshd_pair meshd-pods $A_PODS $B_PODS || return 0
    # meshd routes each static peer's allowed prefixes over mesh0 itself.
    if ! wait_for 20 "meshd's routes to the pod CIDRs" \
        sh -c "ip -n '$A' route show $B_PODS dev mesh0 | grep -q . && ip -n '$B' route show $A_PODS dev mesh0 | grep -q ."; then
        skip meshd-pods "meshd installed no route to the peer's pod CIDR on mesh0"
        return 0
    fi
    local route
    route=$(ip -n "$A" route show $B_PODS)
    route=${route%% }
    pods_up $MTU || { skip meshd-pods "the CNI plugins made no pods"; return 0; }
    TO_NS=$POD_B measure meshd-pods "$POD_A" "$POD_B_IP" \
        "pod to pod (CNI bridge), pod CIDRs in allowed-ips, meshd's route on a: $route; pod MTU $MTU" "$PA" "$PB"
    RESULTS[-1]="${RESULTS[-1]% |}$(drop_note meshd "$A" "$B")$(batching_note)"
    RESULTS[-1]+="; $(ratio meshd-pods meshd) × meshd, $(ratio meshd-pods meshd-pods-vxlan) × meshd-pods-vxlan |"
}

# wg_configure NS IFACE KEY LOCAL_OVERLAY PEER_KEY PEER_IP PEER_OVERLAY: configures
# a wireguard-go/boringtun interface with wg and ip, as wg-quick would.
wg_configure() {
    local ns=$1 iface=$2 key=$3 overlay=$4 peer=$5 peer_ip=$6 peer_overlay=$7
    in_ns "$ns" wg set "$iface" private-key "$WORK/$key.key" listen-port $PORT \
        peer "$(cat "$WORK/$peer.pub")" endpoint "$peer_ip:$PORT" allowed-ips "$peer_overlay/32"
    ip -n "$ns" addr add "$overlay/16" dev "$iface"
    ip -n "$ns" link set "$iface" mtu $MTU up
}

# bench_wg NAME START_FUNCTION: a wg-configured userspace WireGuard on both sides.
bench_wg() {
    local name=$1 start=$2 pids=() side ns iface
    pair_up
    keypair "${name}a"
    keypair "${name}b"
    for side in a b; do
        ns=${PREFIX}$side iface="$WG_PREFIX$side"
        "$start" "$ns" "$iface" "$WORK/$name-$side.log" || { skip "$name" "$name did not start"; return; }
        pids+=("$SPAWNED")
        if ! wait_for 20 "$name $side UAPI socket" test -S "/var/run/wireguard/$iface.sock"; then
            skip "$name" "no UAPI socket from $name"
            return
        fi
    done
    wg_configure "$A" "${WG_PREFIX}a" "${name}a" $A_OV "${name}b" $B_IP $B_OV
    wg_configure "$B" "${WG_PREFIX}b" "${name}b" $B_OV "${name}a" $A_IP $A_OV
    measure "$name" "$A" $B_OV "$3" "${pids[@]}"
}

start_wireguard_go() { # NS IFACE LOG
    spawn "$1" "$3" env LOG_LEVEL=error wireguard-go -f "$2"
    # wireguard-go -f stays in the foreground; env execs it, so this is its pid.
}

start_boringtun() { # NS IFACE LOG
    spawn "$1" "$3" "$BORINGTUN" --foreground --disable-drop-privileges --log "$3.boringtun" "$2"
}

bench_wireguard_go() {
    if ! need_debian wireguard-go wireguard-go || ! need_debian wg wireguard-tools; then
        skip wireguard-go "the wireguard-go and wireguard-tools packages can't be installed"
        return
    fi
    local version
    version=$(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || echo '?')
    bench_wg wireguard-go start_wireguard_go "wireguard-go $version"
}

bench_boringtun() {
    if ! need_debian wg wireguard-tools; then
        skip boringtun "wg (wireguard-tools) can't be installed"
        return
    fi
    if ! BORINGTUN=$(boringtun_bin); then
        skip boringtun "boringtun-cli is not installed and can't be (cargo install boringtun-cli)"
        return
    fi
    bench_wg boringtun start_boringtun "$("$BORINGTUN" --version 2>/dev/null || echo boringtun-cli)"
}

bench_nebula() {
    if ! need_debian nebula nebula || ! command -v nebula-cert >/dev/null; then
        skip nebula "the nebula package can't be installed"
        return
    fi
    pair_up
    local d=$WORK/nebula side ns ip ov peer_ip peer_ov pids=()
    mkdir -p "$d"
    nebula-cert ca -name meshd-bench -out-crt "$d/ca.crt" -out-key "$d/ca.key" >/dev/null
    for side in a b; do
        if [ $side = a ]; then
            ns=$A ip=$A_IP ov=$A_OV peer_ip=$B_IP peer_ov=$B_OV
        else
            ns=$B ip=$B_IP ov=$B_OV peer_ip=$A_IP peer_ov=$A_OV
        fi
        nebula-cert sign -ca-crt "$d/ca.crt" -ca-key "$d/ca.key" -name "$side" -ip "$ov/16" \
            -out-crt "$d/$side.crt" -out-key "$d/$side.key" >/dev/null
        cat >"$d/$side.yml" <<EOF
pki:
  ca: $d/ca.crt
  cert: $d/$side.crt
  key: $d/$side.key
static_host_map:
  "$peer_ov": ["$peer_ip:4242"]
lighthouse:
  am_lighthouse: false
  hosts: []
listen:
  host: $ip
  port: 4242
punchy:
  punch: false
tun:
  disabled: false
  dev: nebula1
  mtu: $MTU
logging:
  level: warning
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
EOF
        spawn "$ns" "$d/$side.log" nebula -config "$d/$side.yml"
        pids+=("$SPAWNED")
    done
    wait_for 20 "nebula interface" ip -n "$A" link show nebula1 || true
    measure nebula "$A" $B_OV "nebula $(nebula -version 2>/dev/null | awk '{print $2}')" "${pids[@]}"
}

relayed() { # relayed FROM TO: whether relay node FROM reaches TO through the relay
    "$BIN/meshctl" --socket "$WORK/relay-$1/meshd.sock" peers --json 2>/dev/null |
        jq -e --arg p "node-$2" 'any(.[]; .name == $p and .path == "relay")' >/dev/null
}

both_relayed() { relayed a b && relayed b a; }

# bench_relay NAME LIMITS: meshd a ↔ b through a mesh-rendezvous on r, the
# direct path between a and b dropped by iptables in a.
bench_relay() {
    local name=$1 limits=$2
    if [ ! -x "$BIN/meshd" ] || [ ! -x "$BIN/mesh-rendezvous" ]; then
        skip "$name" "no meshd/mesh-rendezvous in $BIN: cargo build --release --locked --bins"
        return
    fi
    triangle_up
    local rv=$WORK/rendezvous
    rm -rf "$rv" "$WORK"/relay-*
    in_ns "$R" "$BIN/mesh-rendezvous" --state-dir "$rv" init --listen 0.0.0.0:7443 \
        --public-addr "$R_IP:7443" >"$WORK/rendezvous-init.log" 2>&1
    if [ "$limits" = raised ]; then
        # Far above what one core can relay: measure the path, not the limiter.
        printf '\n[relay]\nbytes-per-second = 100000000000\npackets-per-second = 100000000\n' >>"$rv/rendezvous.toml"
    fi
    spawn "$R" "$WORK/rendezvous-$name.log" "$BIN/mesh-rendezvous" --state-dir "$rv" serve \
        --metrics "127.0.0.1:$METRICS_PORT"
    local prv=$SPAWNED
    wait_for 20 "mesh-rendezvous admin socket" test -S "$rv/admin.sock" || { skip "$name" "mesh-rendezvous did not start"; return; }
    local join
    join=$(in_ns "$R" "$BIN/mesh-rendezvous" --state-dir "$rv" token create --ttl 1h --uses 2 | grep '^meshd join ' | head -1)
    [ -n "$join" ] || { skip "$name" "no join line from mesh-rendezvous token create"; return; }
    # Only the WireGuard/probe traffic between a and b: the rendezvous, on
    # the same socket, stays reachable, so the pair has to relay.
    in_ns "$A" iptables -I INPUT -s $B_IP -p udp -j DROP
    in_ns "$A" iptables -I OUTPUT -d $B_IP -p udp -j DROP
    local side ns pids=() dir
    for side in a b; do
        ns=${PREFIX}$side dir=$WORK/relay-$side
        # shellcheck disable=SC2086 # the join line's words
        if ! in_ns "$ns" "$BIN/meshd" ${join#meshd } --state-dir "$dir" --name "node-$side" \
            --socket "$dir/meshd.sock" >"$WORK/join-$side.log" 2>&1; then
            skip "$name" "meshd join failed: $(tail -1 "$WORK/join-$side.log")"
            return
        fi
        grep -q '^uapi-dir' "$dir/meshd.toml" || sed -i "1i uapi-dir = \"$dir/uapi\"" "$dir/meshd.toml"
        spawn "$ns" "$WORK/meshd-$name-$side.log" "$BIN/meshd" run --state-dir "$dir" \
            --metrics "127.0.0.1:$METRICS_PORT"
        pids+=("$SPAWNED")
    done
    for side in a b; do
        wait_for 30 "meshd $side" meshd_ready "$WORK/relay-$side/meshd.sock" || { skip "$name" "meshd did not start"; return; }
    done
    local b_ov
    b_ov=$("$BIN/meshctl" --socket "$WORK/relay-b/meshd.sock" status --json | jq -r '[.overlay_ips[] | select(test("^[0-9.]+$"))][0]')
    wait_for 60 "a and b to settle on the relay" both_relayed || true
    local note="through the relay"
    [ "$limits" = raised ] && note+=", relay rate limits raised" || note+=", default relay rate limits"
    note+="; CPU: meshd a / meshd b / mesh-rendezvous"
    measure "$name" "$A" "$b_ov" "$note" "${pids[@]}" "$prv"
    for side in a b; do
        "$BIN/meshctl" --socket "$WORK/relay-$side/meshd.sock" peers --json >"$WORK/peers-$name-$side.json" 2>&1 || true
    done
    RESULTS[-1]="${RESULTS[-1]% |}$(drop_note meshd "$A" "$B")$(drop_note relay "$R") |"
    if ! relayed a b; then
        RESULTS[-1]="${RESULTS[-1]% |} (warning: a's path to b is no longer the relay) |"
    fi
}

# meshd with 1000 configured peers: resident memory once it is up and idle.
MESHD_RSS_1000=""
bench_rss() {
    [ -x "$BIN/meshd" ] || return 0
    kill_namespaces
    new_ns "$A"
    keypair big
    meshd_config big $A_OV
    local i
    for i in $(seq 1000); do
        printf '\n[[peer]]\npublic-key = "%s"\nallowed-ips = ["100.72.%d.%d/32"]\n' \
            "$(head -c 32 /dev/urandom | base64)" $((10 + i / 250)) $((1 + i % 250))
    done >>"$WORK/big.toml"
    start_meshd "$A" big || { log "meshd with 1000 peers did not start"; return 0; }
    local pid=$SPAWNED
    sleep 3
    MESHD_RSS_1000=$(rss_kb "$pid")
    local peers
    peers=$("$BIN/meshctl" --socket "$WORK/big.sock" peers --json | jq length)
    log "meshd with $peers peers: VmRSS ${MESHD_RSS_1000} kB"
    kill_namespaces
}

# --- the run -------------------------------------------------------------

# A private copy of the binaries: a rebuild during the run (cargo build by
# someone else) must not change what is measured halfway through.
built=$(date -u -r "$BIN/meshd" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?')
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git -C "$REPO" status --porcelain --untracked-files=no -- src Cargo.toml 2>/dev/null | head -1)
if [ -x "$BIN/meshd" ]; then
    mkdir -p "$WORK/bin"
    for b in meshd meshctl mesh-rendezvous; do
        [ -x "$BIN/$b" ] && cp "$BIN/$b" "$WORK/bin/$b"
    done
    BIN=$WORK/bin
fi

started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for tunnel in "${ALL_TUNNELS[@]}"; do
    selected "$tunnel" || continue
    wait_idle
    log "== $tunnel"
    case $tunnel in
        veth) bench_veth ;;
        meshd) bench_meshd ;;
        wireguard-go) bench_wireguard_go ;;
        boringtun) bench_boringtun ;;
        nebula) bench_nebula ;;
        meshd-relay) bench_relay meshd-relay raised ;;
        meshd-relay-default) bench_relay meshd-relay-default default ;;
        veth-vxlan) bench_veth_vxlan ;;
        meshd-vxlan) bench_meshd_vxlan ;;
        veth-pods) bench_veth_pods ;;
        meshd-pods-vxlan) bench_meshd_pods_vxlan ;;
        meshd-pods) bench_meshd_pods ;;
    esac
    kill_namespaces
done
if selected rss; then
    wait_idle
    log "== meshd with 1000 peers"
    bench_rss
fi

mb() { [ -n "$1" ] && awk -v k="$1" 'BEGIN {printf "%.1f MB", k / 1024}' || echo "–"; }

echo "Machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), Linux $(uname -r); load average $load_before before, $(cut -d' ' -f1-3 /proc/loadavg) after"
echo "Date: $started; meshd binary built $built (repository at $commit${dirty:+ with uncommitted changes}); iperf3 $(iperf3 --version | awk 'NR == 1 {print $2}'), one TCP stream a → b, $SECONDS_PER_RUN s × $RUNS runs, inner MTU $MTU"
echo
if [ ${#RESULTS[@]} -gt 0 ]; then
    echo "| tunnel | Gbit/s (median) | runs (Gbit/s) | × veth | TCP retransmits per run (median) | daemon CPU a / b (% of a core) | machine busy (% of all CPUs) | ping avg (ms) | added RTT (ms) | note |"
    echo "|---|---:|---|---:|---:|---|---:|---:|---:|---|"
    printf '%s\n' "${RESULTS[@]}"
fi
if selected meshd-pods; then
    echo
    echo "| pod traffic, same run | ratio | target |"
    echo "|---|---:|---:|"
    echo "| meshd-pods ÷ meshd (pods over native routes ÷ node to node) | $(ratio meshd-pods meshd) | ≥ 0.9 |"
    echo "| meshd-pods ÷ meshd-pods-vxlan (native routes ÷ flannel VXLAN on mesh0) | $(ratio meshd-pods meshd-pods-vxlan) | ≥ 2 |"
    echo "| meshd-pods ÷ veth-pods | $(ratio meshd-pods veth-pods) | – |"
    echo "| veth-pods ÷ veth | $(ratio veth-pods veth) | – |"
fi
if selected meshd || selected rss; then
    echo
    echo "| meshd memory (VmRSS) | |"
    echo "|---|---:|"
    selected meshd && echo "| idle, 1 peer | $(mb "$MESHD_RSS_IDLE") |"
    selected meshd && echo "| after the transfers, 1 peer | $(mb "$MESHD_RSS_AFTER") |"
    selected rss && echo "| idle, 1000 peers | $(mb "$MESHD_RSS_1000") |"
fi
exit 0
