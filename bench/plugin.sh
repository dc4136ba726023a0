#!/usr/bin/env bash
# Benchmark of the headcni plugin against the reference ptp + host-local and the kernel's floor,
# interleaved in one run, all inside network namespaces created (and removed) here.
#
#   sudo bench/plugin.sh [iterations]        (default 200; HEADCNI_IPAM=host-local to compare
#                                             the data plane with the same IPAM)
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=${1:-200}

if [[ ! -x /usr/lib/cni/ptp ]]; then
    apt-get install -y -q containernetworking-plugins >/dev/null
fi
# The static musl build is what ships (Dockerfile); fall back to the host build without it.
musl=x86_64-unknown-linux-musl
if rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
    cargo build --release --quiet --target "$musl" --bin headcni
    headcni_bin="target/$musl/release/headcni"
else
    echo "note: $musl not installed; measuring the dynamically linked build" >&2
    cargo build --release --quiet --bin headcni
    headcni_bin=target/release/headcni
fi
cargo build --release --quiet --example veth_floor

prefix="hcb$$"
scratch=$(mktemp -d)
cleanup() {
    for ns in "${prefix}h" "${prefix}a" "${prefix}b" "${prefix}c"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

for ns in h a b c; do ip netns add "${prefix}${ns}"; done
mkdir -p "$scratch/bin" "$scratch/run"
cp "$headcni_bin" "$scratch/bin/headcni"
gcc -O2 -o "$scratch/spawn" bench/spawn.c
ln -s headcni "$scratch/bin/headcni-ipam"

ip netns exec "${prefix}h" env \
    ITER="$ITER" HEADCNI_BIN="$scratch/bin" FLOOR_BIN="$PWD/target/release/examples/veth_floor" \
    SCRATCH="$scratch" SPAWN_BIN="$scratch/spawn" HEADCNI_IPAM="${HEADCNI_IPAM:-headcni-ipam}" \
    PODS="/run/netns/${prefix}a,/run/netns/${prefix}b,/run/netns/${prefix}c" \
    python3 bench/plugin_bench.py
