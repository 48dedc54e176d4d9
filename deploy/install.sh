#!/usr/bin/env bash
# One-command install of meshd on a node, or of mesh-rendezvous on a public
# VPS, as systemd services. Run it as root from a checkout (or from a copy
# of deploy/ next to target/release/):
#
#   deploy/install.sh rendezvous --public-addr rv.example.com:7443
#   deploy/install.sh rendezvous --public-addr rv2.example.com:7443 --server-name rv2 \
#       --etcd-endpoints http://10.0.0.1:2379,… --key-prefix /meshd/prod/ --certificate-from rv2-cert/
#   deploy/install.sh node --join "rv.example.com:7443 --token … --ca-hash sha256:…" --kubelet
#
# It installs the binaries to $PREFIX/bin (default /usr/local/bin), the
# units of deploy/systemd to /etc/systemd/system, enrols the node
# (`meshd join`, state in /var/lib/meshd) or creates the mesh
# (`mesh-rendezvous init`, state in /var/lib/mesh-rendezvous), and starts
# the service when systemd is PID 1. Running it again changes nothing; a
# changed binary, unit or node config restarts the running service.
# `--uninstall` removes what it installed, keeping the state directory
# (the node's key and address, the mesh's certificate and registry) unless
# `--purge`. `--dry-run` prints each action instead. DESTDIR=DIR installs
# into the root directory DIR (packaging, tests) and starts nothing.
set -euo pipefail

SCRIPT=${0##*/}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NODE_STATE=/var/lib/meshd                 # meshd.service: StateDirectory=meshd
RENDEZVOUS_STATE=/var/lib/mesh-rendezvous # mesh-rendezvous.service: StateDirectory=
UNIT_DIR=/etc/systemd/system
KUBELET_DROPIN=/etc/systemd/system/kubelet.service.d/kubelet-meshd.conf
# The binaries' directory the units in deploy/systemd name in ExecStart=.
UNIT_BIN_DIR=/usr/local/bin

usage() {
    cat <<EOF
usage: $SCRIPT node --join "HOST:PORT --token TOKEN --ca-hash sha256:HASH"|-
                  [--name NAME] [--advertise-endpoint IP:PORT] [--kubelet]
       $SCRIPT node --no-join [--kubelet]
       $SCRIPT rendezvous --public-addr HOST:PORT [--listen ADDR:PORT]
                  [--cidr CIDR] [--token-ttl 24h] [--token-uses 10]
                  [--etcd-endpoints URL[,URL…] --key-prefix PREFIX --server-name NAME
                   [--etcd-ca FILE [--etcd-cert FILE --etcd-key FILE]]
                   [--certificate-from DIR]]
       $SCRIPT node|rendezvous --uninstall [--purge]

  node         meshd and meshctl, meshd.service, enrolment with the join
               line that \`mesh-rendezvous token create\` prints ("meshd join"
               in front is fine); state in $NODE_STATE. \`--join -\` reads
               the line from standard input, so the token never sits in a
               command line; meshd join gets the token on its standard input
    --name NAME                  name in the mesh (default: the hostname)
    --advertise-endpoint IP:PORT a public address that reaches UDP 51820 here
                                 (1:1 NAT cloud VM, port forward)
    --kubelet                    also the kubelet drop-in: --node-ip = overlay
                                 address, kubelet after meshd
    --no-join                    install files only; enrol later with meshd join
  rendezvous   mesh-rendezvous, mesh-rendezvous.service, the mesh (created
               once, state in $RENDEZVOUS_STATE), a join line
    --public-addr HOST:PORT      how nodes reach this server
    --listen ADDR:PORT           where it binds (default 0.0.0.0:PORT of --public-addr)
    --cidr CIDR                  overlay IPv4 prefix (default 100.72.0.0/16)
    --token-ttl, --token-uses    of the printed join line (default 24h, 10 nodes)
   one of several servers of a mesh, its state in etcd (without these: one
   server, its state in $RENDEZVOUS_STATE/registry.json):
    --etcd-endpoints URLS        etcd's client URLs, comma-separated
    --key-prefix PREFIX          the mesh's keys in etcd, e.g. /meshd/prod/; the
                                 first server creates the mesh there, the next join it
    --server-name NAME           this server's name in the mesh (a DNS label)
    --etcd-ca FILE               CA of etcd's certificates (https:// endpoints);
    --etcd-cert, --etcd-key FILE a client certificate for etcd; the three are
                                 copied to $RENDEZVOUS_STATE/etcd/, where the
                                 service's dynamic user can read them
    --certificate-from DIR       a server added to the mesh: the directory
                                 \`mesh-rendezvous server add NAME --out DIR\` wrote
                                 on the first server (which holds the mesh CA's key)
  --uninstall  remove what this script installs (same PREFIX); --purge also
               removes the state directory
  --bin-dir DIR  prebuilt binaries (default: target/release of this checkout,
               built with \`cargo build --release --locked --bins\` if missing)
  --dry-run    print every action instead of doing it

environment: PREFIX  binaries go to PREFIX/bin (default /usr/local)
             DESTDIR install under this root directory; nothing is started
EOF
}

bad_usage() {
    echo "$SCRIPT: $*" >&2
    usage >&2
    exit 2
}

die() {
    echo "$SCRIPT: error: $*" >&2
    exit 1
}

say() {
    echo "==> $*"
}

# ---------------------------------------------------------------- arguments

ROLE=
JOIN=
NO_JOIN=0
NAME=
ADVERTISE=
KUBELET=0
PUBLIC_ADDR=
LISTEN=
CIDR=
TOKEN_TTL=
TOKEN_USES=
ETCD_ENDPOINTS=
KEY_PREFIX=
ETCD_CA=
ETCD_CERT=
ETCD_KEY=
SERVER_NAME=
CERTIFICATE_FROM=
UNINSTALL=0
PURGE=0
BIN_DIR=
DRY_RUN=0

[ $# -gt 0 ] || bad_usage "say what to install: node or rendezvous"
case $1 in
    node | rendezvous) ROLE=$1 ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown role '$1': expected node or rendezvous" ;;
esac
shift

# The value of option $1, or a usage error when it is missing.
value() {
    if [ $# -lt 2 ] || [ -z "$2" ] || [[ $2 == --* ]]; then
        bad_usage "$1 needs a value"
    fi
    printf '%s' "$2"
}

while [ $# -gt 0 ]; do
    option=$1
    case $option in
        --*=*) set -- "${option%%=*}" "${option#*=}" "${@:2}"; continue ;;
    esac
    case $option in
        --join) JOIN=$(value "$@"); shift ;;
        --no-join) NO_JOIN=1 ;;
        --name) NAME=$(value "$@"); shift ;;
        --advertise-endpoint) ADVERTISE=$(value "$@"); shift ;;
        --kubelet) KUBELET=1 ;;
        --public-addr) PUBLIC_ADDR=$(value "$@"); shift ;;
        --listen) LISTEN=$(value "$@"); shift ;;
        --cidr) CIDR=$(value "$@"); shift ;;
        --token-ttl) TOKEN_TTL=$(value "$@"); shift ;;
        --token-uses) TOKEN_USES=$(value "$@"); shift ;;
        --etcd-endpoints) ETCD_ENDPOINTS=$(value "$@"); shift ;;
        --key-prefix) KEY_PREFIX=$(value "$@"); shift ;;
        --etcd-ca) ETCD_CA=$(value "$@"); shift ;;
        --etcd-cert) ETCD_CERT=$(value "$@"); shift ;;
        --etcd-key) ETCD_KEY=$(value "$@"); shift ;;
        --server-name) SERVER_NAME=$(value "$@"); shift ;;
        --certificate-from) CERTIFICATE_FROM=$(value "$@"); shift ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --bin-dir) BIN_DIR=$(value "$@"); shift ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) bad_usage "unknown option '$option' for $ROLE" ;;
    esac
    shift
done

# Options that belong to the other role, or only to installing.
only_for() {
    local role=$1 flag=$2 given=$3
    if [ -n "$given" ] && [ "$given" != 0 ] && [ "$ROLE" != "$role" ]; then
        bad_usage "$flag is for '$SCRIPT $role', not $ROLE"
    fi
}
only_for node --join "$JOIN"
only_for node --no-join "$NO_JOIN"
only_for node --name "$NAME"
only_for node --advertise-endpoint "$ADVERTISE"
only_for node --kubelet "$KUBELET"
only_for rendezvous --public-addr "$PUBLIC_ADDR"
only_for rendezvous --listen "$LISTEN"
only_for rendezvous --cidr "$CIDR"
only_for rendezvous --token-ttl "$TOKEN_TTL"
only_for rendezvous --token-uses "$TOKEN_USES"
only_for rendezvous --etcd-endpoints "$ETCD_ENDPOINTS"
only_for rendezvous --key-prefix "$KEY_PREFIX"
only_for rendezvous --etcd-ca "$ETCD_CA"
only_for rendezvous --etcd-cert "$ETCD_CERT"
only_for rendezvous --etcd-key "$ETCD_KEY"
only_for rendezvous --server-name "$SERVER_NAME"
only_for rendezvous --certificate-from "$CERTIFICATE_FROM"

if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
    bad_usage "--purge goes with --uninstall"
fi

HOST_PORT='^([^[:space:]/]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$'
IP_PORT='^([0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$'

JOIN_ARGS=()
JOIN_TOKEN=
if [ "$JOIN" = - ]; then
    IFS= read -r JOIN || [ -n "$JOIN" ] || bad_usage "--join -: no join line on standard input"
fi
if [ "$UNINSTALL" = 1 ]; then
    for given in "$JOIN" "$NAME" "$ADVERTISE" "$PUBLIC_ADDR" "$LISTEN" "$CIDR" "$TOKEN_TTL" "$TOKEN_USES" "$BIN_DIR" \
        "$ETCD_ENDPOINTS" "$KEY_PREFIX" "$ETCD_CA" "$ETCD_CERT" "$ETCD_KEY" "$SERVER_NAME" "$CERTIFICATE_FROM"; do
        [ -z "$given" ] || bad_usage "--uninstall takes no other options than --purge and --dry-run"
    done
    if [ "$NO_JOIN" = 1 ] || [ "$KUBELET" = 1 ]; then
        bad_usage "--uninstall takes no other options than --purge and --dry-run"
    fi
elif [ "$ROLE" = node ]; then
    if [ -z "$JOIN" ] && [ "$NO_JOIN" = 0 ]; then
        bad_usage "node needs --join \"HOST:PORT --token … --ca-hash …\" (the line \`mesh-rendezvous token create\` printed), or --no-join"
    fi
    [ -z "$JOIN" ] || [ "$NO_JOIN" = 0 ] || bad_usage "--join and --no-join exclude each other"
    if [ "$NO_JOIN" = 1 ] && { [ -n "$NAME" ] || [ -n "$ADVERTISE" ]; }; then
        bad_usage "--name and --advertise-endpoint are part of the enrolment: not with --no-join"
    fi
    if [ -n "$JOIN" ]; then
        read -r -a JOIN_ARGS <<<"$JOIN"
        # The whole line as printed is fine too.
        [ "${JOIN_ARGS[0]:-}" != sudo ] || JOIN_ARGS=("${JOIN_ARGS[@]:1}")
        if [ "${JOIN_ARGS[0]:-}" = meshd ] && [ "${JOIN_ARGS[1]:-}" = join ]; then
            JOIN_ARGS=("${JOIN_ARGS[@]:2}")
        fi
        [[ ${JOIN_ARGS[0]:-} =~ $HOST_PORT ]] ||
            bad_usage "--join must start with the rendezvous HOST:PORT, got '${JOIN_ARGS[0]:-}'"
        # The token is taken out of the arguments: meshd join reads it on
        # its standard input (--token-file -), not from its command line,
        # where every local user could see it.
        has_token=0 has_hash=0 next_is_token=0 rest=()
        for word in "${JOIN_ARGS[@]}"; do
            if [ "$next_is_token" = 1 ]; then
                JOIN_TOKEN=$word next_is_token=0
                continue
            fi
            case $word in
                --token) has_token=1 next_is_token=1; continue ;;
                --token=*) has_token=1 JOIN_TOKEN=${word#--token=}; continue ;;
                --token-file | --token-file=*) has_token=1 ;;
                --ca-hash | --ca-hash=*) has_hash=1 ;;
                --state-dir | --state-dir=*) bad_usage "--join must not set --state-dir: the service uses $NODE_STATE" ;;
            esac
            rest+=("$word")
        done
        [ "$next_is_token" = 0 ] || bad_usage "--join: --token needs a value"
        JOIN_ARGS=("${rest[@]}")
        [ -z "$JOIN_TOKEN" ] || JOIN_ARGS+=(--token-file -)
        if [ "$has_token" = 0 ] || [ "$has_hash" = 0 ]; then
            bad_usage "--join needs --token and --ca-hash: paste the whole line \`mesh-rendezvous token create\` printed"
        fi
    fi
    if [ -n "$NAME" ] && [[ $NAME =~ [[:space:][:cntrl:]] ]]; then
        bad_usage "--name '$NAME' must not contain spaces"
    fi
    if [ -n "$ADVERTISE" ] && ! [[ $ADVERTISE =~ $IP_PORT ]]; then
        bad_usage "--advertise-endpoint '$ADVERTISE' is not IP:PORT (a public address, e.g. 198.51.100.7:51820)"
    fi
else
    [ -n "$PUBLIC_ADDR" ] || bad_usage "rendezvous needs --public-addr HOST:PORT (the address nodes reach it at)"
    [[ $PUBLIC_ADDR =~ $HOST_PORT ]] || bad_usage "--public-addr '$PUBLIC_ADDR' is not HOST:PORT"
    LISTEN=${LISTEN:-0.0.0.0:${PUBLIC_ADDR##*:}}
    [[ $LISTEN =~ $IP_PORT ]] || bad_usage "--listen '$LISTEN' is not IP:PORT"
    TOKEN_TTL=${TOKEN_TTL:-24h}
    TOKEN_USES=${TOKEN_USES:-10}
    [[ $TOKEN_USES =~ ^[1-9][0-9]*$ ]] || bad_usage "--token-uses '$TOKEN_USES' is not a positive number"
    [[ $TOKEN_TTL =~ ^[0-9]+[a-z]+$ ]] || bad_usage "--token-ttl '$TOKEN_TTL' is not a duration such as 30m, 24h or 7d"
    if [ -n "$ETCD_ENDPOINTS" ] || [ -n "$KEY_PREFIX" ]; then
        if [ -z "$ETCD_ENDPOINTS" ] || [ -z "$KEY_PREFIX" ]; then
            bad_usage "--etcd-endpoints and --key-prefix go together: the mesh's etcd and where its keys are"
        fi
        [ -n "$SERVER_NAME" ] ||
            bad_usage "a server of a mesh on etcd needs --server-name NAME, its own among the mesh's servers"
        [[ $KEY_PREFIX == */ ]] || bad_usage "--key-prefix '$KEY_PREFIX' must end with / (e.g. /meshd/prod/)"
    else
        for given in "$ETCD_CA" "$ETCD_CERT" "$ETCD_KEY" "$CERTIFICATE_FROM"; do
            [ -z "$given" ] ||
                bad_usage "--etcd-ca, --etcd-cert, --etcd-key and --certificate-from are for a mesh on etcd: add --etcd-endpoints and --key-prefix"
        done
    fi
    if [ -n "$ETCD_CERT$ETCD_KEY" ]; then
        if [ -z "$ETCD_CERT" ] || [ -z "$ETCD_KEY" ] || [ -z "$ETCD_CA" ]; then
            bad_usage "--etcd-cert and --etcd-key go together, with --etcd-ca"
        fi
    fi
    for file in "$ETCD_CA" "$ETCD_CERT" "$ETCD_KEY"; do
        [ -z "$file" ] || [ -f "$file" ] || bad_usage "$file: no such file"
    done
    if [ -n "$CERTIFICATE_FROM" ]; then
        [ -d "$CERTIFICATE_FROM" ] ||
            bad_usage "--certificate-from $CERTIFICATE_FROM is not a directory (\`mesh-rendezvous server add NAME --out DIR\` writes it)"
        CERTIFICATE_FROM=$(cd "$CERTIFICATE_FROM" && pwd)
    fi
    [ -z "$SERVER_NAME" ] || [[ $SERVER_NAME =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] ||
        bad_usage "--server-name '$SERVER_NAME' is not a DNS label (a-z, 0-9 and '-', at most 63)"
fi

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
if [[ $PREFIX != /* ]] || [[ $PREFIX =~ [[:space:]] ]]; then
    bad_usage "PREFIX '$PREFIX' must be an absolute path without spaces"
fi
PREFIX=${PREFIX%/}
if [ -n "$DESTDIR" ]; then
    [[ $DESTDIR == /* ]] || DESTDIR=$PWD/$DESTDIR
    DESTDIR=${DESTDIR%/}
fi
if [ -n "$BIN_DIR" ]; then
    [ -d "$BIN_DIR" ] || bad_usage "--bin-dir $BIN_DIR is not a directory"
    BIN_DIR=$(cd "$BIN_DIR" && pwd)
fi

if [ "$DRY_RUN" = 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    die "installing services takes root: run it with sudo (or --dry-run to see what it would do)"
fi

# -------------------------------------------------------------------- actions

# Runs a command, or prints it under --dry-run.
act() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# act, with the command's own output on stdout dropped.
act_quietly() {
    if [ "$DRY_RUN" = 1 ]; then
        act "$@"
    else
        "$@" >/dev/null
    fi
}

# systemctl, when this script may drive systemd: systemd is PID 1 and the
# install goes to this system, not into DESTDIR.
systemd_running() {
    [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

CHANGED=0 # a file the service runs on was (or would be) changed

# install_file MODE SOURCE TARGET: TARGET (under DESTDIR) becomes a copy of
# SOURCE with MODE, unless it already is one.
install_file() {
    local mode=$1 source=$2 target=$DESTDIR$3
    if [ -f "$target" ] && [ ! -L "$target" ] && cmp -s "$source" "$target" &&
        [ "$(stat -c %a "$target")" = "${mode#0}" ]; then
        echo "    $3: up to date"
        return
    fi
    act install -D -m "$mode" "$source" "$target"
    CHANGED=1
}

# remove TARGET (under DESTDIR) if it is there.
remove() {
    local target=$DESTDIR$1
    if [ -e "$target" ] || [ -L "$target" ]; then
        act rm -f "$target"
    fi
}

# A unit from deploy/systemd, its ExecStart= paths moved to PREFIX/bin.
install_unit() {
    local unit=$1 text
    text=$(<"$REPO/deploy/systemd/$unit")
    text=${text//"$UNIT_BIN_DIR/"/"$PREFIX/bin/"}
    printf '%s\n' "$text" >"$TMP/$unit"
    install_file 0644 "$TMP/$unit" "$UNIT_DIR/$unit"
}

# Where the binaries come from: --bin-dir, else this checkout's
# target/release, built when one of them is missing.
binaries() {
    local missing=0 name
    if [ -n "$BIN_DIR" ]; then
        for name in "$@"; do
            [ -x "$BIN_DIR/$name" ] || bad_usage "--bin-dir $BIN_DIR has no executable $name"
        done
        return
    fi
    local target=${CARGO_TARGET_DIR:-target}
    [[ $target == /* ]] || target=$REPO/$target
    BIN_DIR=$target/release
    for name in "$@"; do
        [ -x "$BIN_DIR/$name" ] || missing=1
    done
    [ "$missing" = 1 ] || return 0
    [ -f "$REPO/Cargo.toml" ] ||
        die "no binaries in $BIN_DIR and no checkout to build them from: pass --bin-dir DIR"
    if [ "$DRY_RUN" = 0 ] && ! command -v cargo >/dev/null; then
        die "cargo is not on root's PATH: build first with \`cargo build --release --locked --bins\` in $REPO, or pass --bin-dir DIR"
    fi
    say "building the release binaries in $REPO"
    act cargo build --manifest-path "$REPO/Cargo.toml" --release --locked --bins
}

# A checksum of FILE (under DESTDIR), empty when it is missing.
checksum() {
    if [ -f "$DESTDIR$1" ]; then
        sha256sum <"$DESTDIR$1"
    fi
}

# ----------------------------------------------------------------------- node

install_node() {
    binaries meshd meshctl
    say "installing meshd and meshctl to ${DESTDIR}$PREFIX/bin"
    install_file 0755 "$BIN_DIR/meshd" "$PREFIX/bin/meshd"
    install_file 0755 "$BIN_DIR/meshctl" "$PREFIX/bin/meshctl"
    install_unit meshd.service
    # The drop-in changes kubelet, not meshd: it restarts nothing.
    local kubelet_changed=0 meshd_changed=$CHANGED
    if [ "$KUBELET" = 1 ]; then
        CHANGED=0
        install_file 0644 "$REPO/deploy/kubernetes/kubelet-meshd.conf" "$KUBELET_DROPIN"
        kubelet_changed=$CHANGED
        CHANGED=$meshd_changed
    fi

    local meshd=$DESTDIR$PREFIX/bin/meshd config=$NODE_STATE/meshd.toml
    if [ "${#JOIN_ARGS[@]}" -gt 0 ]; then
        say "enrolling: meshd join ${JOIN_ARGS[0]} (state in $NODE_STATE)"
        local before after args=("${JOIN_ARGS[@]}")
        [ -z "$NAME" ] || args+=(--name "$NAME")
        [ -z "$ADVERTISE" ] || args+=(--advertise-endpoint "$ADVERTISE")
        before=$(checksum "$config")
        # join only writes the state directory (key kept, token saved); the
        # token is presented, and spent, when meshd first connects. A node
        # the rendezvous knows needs no token, so joining again is harmless.
        act_quietly "$meshd" join "${args[@]}" --state-dir "$DESTDIR$NODE_STATE" <<<"$JOIN_TOKEN"
        if [ -n "$DESTDIR" ] && [ "$DRY_RUN" = 0 ]; then
            # Paths in the config are the installed system's, not DESTDIR's.
            local text from=$DESTDIR$NODE_STATE to=$NODE_STATE
            text=$(<"$DESTDIR$config")
            printf '%s\n' "${text//"$from"/"$to"}" >"$TMP/meshd.toml"
            cmp -s "$TMP/meshd.toml" "$DESTDIR$config" || install -m 0644 "$TMP/meshd.toml" "$DESTDIR$config"
        fi
        after=$(checksum "$config")
        [ "$before" = "$after" ] || CHANGED=1
    fi

    if [ -n "$DESTDIR" ]; then
        say "installed under $DESTDIR; on the target system: systemctl enable --now meshd"
    elif ! systemd_running; then
        say "systemd is not PID 1 here: start meshd by hand with"
        echo "    $PREFIX/bin/meshd run --state-dir $NODE_STATE"
    else
        act systemctl daemon-reload
        if [ "${#JOIN_ARGS[@]}" -eq 0 ] && [ ! -f "$config" ]; then
            say "not enrolled yet: meshd join HOST:PORT --token … --ca-hash …, then systemctl enable --now meshd"
        else
            if [ "$CHANGED" = 1 ] && systemctl -q is-active meshd; then
                say "restarting meshd: its binary, unit or config changed"
                act systemctl restart meshd
            fi
            say "starting meshd (returns once mesh0 has its address)"
            act systemctl enable --now meshd ||
                die "meshd did not start: see journalctl -u meshd -n 50"
        fi
        if [ "$kubelet_changed" = 1 ] && systemctl -q is-active kubelet; then
            say "kubelet runs: systemctl restart kubelet to move it to the overlay address"
        fi
    fi
    cat <<EOF
==> next: meshctl status; meshctl peers; meshctl netcheck
    open UDP 51820 to this node if it has a public or 1:1-NAT address
EOF
}

uninstall_node() {
    if systemd_running && [ -f "$UNIT_DIR/meshd.service" ]; then
        act systemctl disable --now meshd
    fi
    say "removing meshd, meshctl, meshd.service and the kubelet drop-in"
    remove "$PREFIX/bin/meshd"
    remove "$PREFIX/bin/meshctl"
    remove "$UNIT_DIR/meshd.service"
    remove "$KUBELET_DROPIN"
    local dropins=$DESTDIR${KUBELET_DROPIN%/*}
    if [ -d "$dropins" ] && [ -z "$(ls -A "$dropins")" ]; then
        act rmdir "$dropins"
    fi
    ! systemd_running || act systemctl daemon-reload
    if [ "$PURGE" = 1 ]; then
        say "purging $NODE_STATE"
        act rm -rf "$DESTDIR$NODE_STATE"
    elif [ -e "$DESTDIR$NODE_STATE" ]; then
        say "kept $NODE_STATE (this node's key and overlay address): --purge removes it"
    fi
}

# ----------------------------------------------------------------- rendezvous

install_rendezvous() {
    local rv=$DESTDIR$PREFIX/bin/mesh-rendezvous state=$DESTDIR$RENDEZVOUS_STATE existing=
    if [ -f "$state/rendezvous.toml" ]; then
        existing=$(sed -n 's/^public-addr = "\(.*\)"$/\1/p' "$state/rendezvous.toml")
        [ "$existing" = "$PUBLIC_ADDR" ] ||
            die "$RENDEZVOUS_STATE holds a mesh for --public-addr $existing: install with that (or edit public-addr in its rendezvous.toml), or --uninstall --purge first (every node must join again)"
    fi
    binaries mesh-rendezvous
    say "installing mesh-rendezvous to ${DESTDIR}$PREFIX/bin"
    install_file 0755 "$BIN_DIR/mesh-rendezvous" "$PREFIX/bin/mesh-rendezvous"
    install_unit mesh-rendezvous.service

    # etcd's TLS files, copied where the service's dynamic user can read
    # them (a client key is usually root's alone where it was put).
    local etcd_ca='' etcd_cert='' etcd_key=''
    if [ -n "$ETCD_CA" ]; then
        etcd_ca=$RENDEZVOUS_STATE/etcd/ca.pem
        install_file 0600 "$ETCD_CA" "$etcd_ca"
    fi
    if [ -n "$ETCD_CERT" ]; then
        etcd_cert=$RENDEZVOUS_STATE/etcd/client.pem etcd_key=$RENDEZVOUS_STATE/etcd/client.key
        install_file 0600 "$ETCD_CERT" "$etcd_cert"
        install_file 0600 "$ETCD_KEY" "$etcd_key"
    fi

    if [ -n "$existing" ]; then
        say "the mesh in $RENDEZVOUS_STATE exists: kept"
    else
        local init=(init --listen "$LISTEN" --public-addr "$PUBLIC_ADDR")
        [ -z "$CIDR" ] || init+=(--cidr "$CIDR")
        [ -z "$SERVER_NAME" ] || init+=(--server-name "$SERVER_NAME")
        if [ -n "$ETCD_ENDPOINTS" ]; then
            say "creating this server in $RENDEZVOUS_STATE, the mesh in etcd under $KEY_PREFIX"
            init+=(--etcd-endpoints "$ETCD_ENDPOINTS" --key-prefix "$KEY_PREFIX")
            # Read now from DESTDIR; the config names the system's paths.
            [ -z "$etcd_ca" ] || init+=(--etcd-ca "$DESTDIR$etcd_ca")
            [ -z "$etcd_cert" ] || init+=(--etcd-cert "$DESTDIR$etcd_cert" --etcd-key "$DESTDIR$etcd_key")
            [ -z "$CERTIFICATE_FROM" ] || init+=(--certificate-from "$CERTIFICATE_FROM")
        else
            say "creating the mesh in $RENDEZVOUS_STATE"
        fi
        if [ "$DRY_RUN" = 1 ]; then
            act "$rv" --state-dir "$state" "${init[@]}"
        else
            # "mesh … created in …", or "joined" by a server added to it.
            local said
            said=$("$rv" --state-dir "$state" "${init[@]}")
            echo "    ${said%%$'\n'*}"
            if [ -n "$DESTDIR" ] && [ -n "$etcd_ca" ]; then
                local text
                text=$(<"$state/rendezvous.toml")
                printf '%s\n' "${text//"$state"/"$RENDEZVOUS_STATE"}" >"$TMP/rendezvous.toml"
                install -m 0644 "$TMP/rendezvous.toml" "$state/rendezvous.toml"
            fi
        fi
        act chmod 0700 "$state" # as the unit's StateDirectoryMode=
    fi

    local line=''
    local token=(token create --ttl "$TOKEN_TTL" --uses "$TOKEN_USES")
    if [ -z "$ETCD_ENDPOINTS" ]; then
        # The token before the start: with the server stopped it is written
        # to the registry file, with it running it goes through its admin
        # socket.
        say "creating a join token (valid $TOKEN_TTL, $TOKEN_USES nodes)"
        if [ "$DRY_RUN" = 1 ]; then
            act "$rv" --state-dir "$state" "${token[@]}"
            line="meshd join $PUBLIC_ADDR --token TOKEN --ca-hash sha256:HASH"
        else
            line=$("$rv" --state-dir "$state" "${token[@]}")
        fi
    fi
    if [ "$DRY_RUN" = 0 ] && [ -z "$DESTDIR" ]; then
        # Files written as root belong to whoever owns the state directory
        # (the service's dynamic user once it has run).
        chown -R --reference="$state/" "$state/"
    fi

    if [ -n "$DESTDIR" ]; then
        say "installed under $DESTDIR; on the target system: systemctl enable --now mesh-rendezvous"
    elif ! systemd_running; then
        say "systemd is not PID 1 here: start the rendezvous by hand with"
        echo "    $PREFIX/bin/mesh-rendezvous --state-dir $RENDEZVOUS_STATE serve"
    else
        act systemctl daemon-reload
        if [ "$CHANGED" = 1 ] && systemctl -q is-active mesh-rendezvous; then
            say "restarting mesh-rendezvous: its binary, unit or etcd certificates changed"
            act systemctl restart mesh-rendezvous
        fi
        say "starting mesh-rendezvous"
        act systemctl enable --now mesh-rendezvous ||
            die "mesh-rendezvous did not start: see journalctl -u mesh-rendezvous -n 50"
    fi

    if [ -n "$ETCD_ENDPOINTS" ]; then
        # The mesh's tokens live in etcd: a running server creates one, and
        # its join line names every server of the mesh.
        if [ "$DRY_RUN" = 1 ]; then
            say "creating a join token (valid $TOKEN_TTL, $TOKEN_USES nodes) once it runs"
            act "$rv" --state-dir "$state" "${token[@]}"
            line="meshd join $PUBLIC_ADDR,… --token TOKEN --ca-hash sha256:HASH"
        elif [ -z "$DESTDIR" ] && systemd_running; then
            say "creating a join token (valid $TOKEN_TTL, $TOKEN_USES nodes)"
            local _
            for _ in $(seq 100); do
                [ -S "$state/admin.sock" ] && break
                sleep 0.1
            done
            line=$("$rv" --state-dir "$state" "${token[@]}") ||
                die "no join token: see journalctl -u mesh-rendezvous -n 50"
        else
            say "the mesh's tokens are in etcd: once it runs, its join line comes from"
            echo "    $PREFIX/bin/mesh-rendezvous --state-dir $RENDEZVOUS_STATE ${token[*]}"
        fi
    fi

    local port=${LISTEN##*:}
    echo "==> open UDP $port (QUIC: admission, peer maps, relay) and UDP $((port + 1)) (NAT check) to this host"
    if [ -n "$line" ]; then
        cat <<EOF
==> join line (valid $TOKEN_TTL, $TOKEN_USES nodes; another: mesh-rendezvous token create --ttl 24h --uses 10):
$line
==> on each node, from a checkout with target/release built or copied:
    sudo deploy/install.sh node --join "${line#meshd join }" --kubelet
EOF
    fi
    if [ -n "$ETCD_ENDPOINTS" ] && [ -z "$CERTIFICATE_FROM" ]; then
        cat <<EOF
==> another server of this mesh: here, where the mesh CA's key is,
    mesh-rendezvous --state-dir $RENDEZVOUS_STATE server add NAME --out DIR
    then copy DIR to it and there: deploy/install.sh rendezvous --public-addr HOST:PORT \\
        --server-name NAME --etcd-endpoints $ETCD_ENDPOINTS --key-prefix $KEY_PREFIX --certificate-from DIR
EOF
    fi
}

uninstall_rendezvous() {
    if systemd_running && [ -f "$UNIT_DIR/mesh-rendezvous.service" ]; then
        act systemctl disable --now mesh-rendezvous
    fi
    say "removing mesh-rendezvous and mesh-rendezvous.service"
    remove "$PREFIX/bin/mesh-rendezvous"
    remove "$UNIT_DIR/mesh-rendezvous.service"
    ! systemd_running || act systemctl daemon-reload
    if [ "$PURGE" = 1 ]; then
        # With DynamicUser= systemd keeps the directory in /var/lib/private.
        say "purging $RENDEZVOUS_STATE (the mesh: certificate, keys, registry)"
        act rm -rf "$DESTDIR$RENDEZVOUS_STATE" "$DESTDIR/var/lib/private/mesh-rendezvous"
    elif [ -e "$DESTDIR$RENDEZVOUS_STATE" ]; then
        say "kept $RENDEZVOUS_STATE (the mesh: certificate, keys, registry): --purge removes it"
    fi
}

case $ROLE/$UNINSTALL in
    node/0) install_node ;;
    node/1) uninstall_node ;;
    rendezvous/0) install_rendezvous ;;
    rendezvous/1) uninstall_rendezvous ;;
esac
