#!/usr/bin/env bash
# Builds every fuzz target of fuzz/Cargo.toml with cargo-fuzz (libFuzzer)
# and runs each for SECONDS (default 10), starting from its checked-in
# corpus in fuzz/corpus/<target>/. Exits non-zero, with the input that did
# it in fuzz/artifacts/<target>/, if any target panics, leaks past the
# memory limit or hangs. See fuzz/README.md.
#
#   fuzz/run.sh [SECONDS]
#
# Works on the stable toolchain: cargo-fuzz passes libFuzzer's -Z flags,
# which RUSTC_BOOTSTRAP=1 lets stable rustc take. No sanitizer by default
# (Rust is memory-safe but for its few unsafe blocks, and an ASan build of
# every dependency takes much longer); FUZZ_SANITIZER=address turns it on.
# Overflow checks and debug assertions are on (-a).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-10}
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: fuzz/run.sh [SECONDS]  (each target runs SECONDS, default 10)" >&2
    exit 2
fi
sanitizer=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.2

if ! command -v cargo-fuzz >/dev/null; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1

start=$SECONDS
cargo fuzz build -O -a --sanitizer "$sanitizer"
built=$((SECONDS - start))
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=target/$host/release

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
targets=$(cargo fuzz list)
for target in $targets; do
    # New inputs go to a scratch directory: the checked-in corpus only seeds.
    mkdir -p "$work/$target" "artifacts/$target"
    seeds=()
    [ ! -d "corpus/$target" ] || seeds+=("corpus/$target")
    # The control decoder's seeds are the protocol's golden vectors.
    [ "$target" != control_decode ] || seeds+=(../proto/vectors)
    log=$work/$target.log
    if "$bin_dir/$target" "$work/$target" "${seeds[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        echo "fuzz $target: ${runs:-?} runs in ${seconds}s, no failure"
    else
        failed+=("$target")
        echo "fuzz $target: FAILED; the end of its log:" >&2
        tail -n 60 "$log" >&2
        echo "the input is in fuzz/artifacts/$target/; reproduce with: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a $target artifacts/$target/<file>)" >&2
    fi
done
count=$(wc -w <<<"$targets")
echo "fuzz: built in ${built}s, $count targets × ${seconds}s, $((count - ${#failed[@]})) passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
