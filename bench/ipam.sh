#!/usr/bin/env bash
# headcni-ipam against the reference host-local, side by side in one run. Not a test: it prints
# the figures recorded in BENCHMARKS.md (## IPAM).
#
#   sudo bench/ipam.sh                        # the run recorded in BENCHMARKS.md
#   sudo ITER=20 BURST_RUNS=3 bench/ipam.sh   # quicker
#
# Every figure is whole processes (fork, exec, config on stdin, wait), as a runtime pays them:
#   a) one IPAM ADD on a /16 already holding 60,000 allocations; an untimed DEL before each run
#      restores the state. The plugins take turns within every iteration.
#   b) 200 parallel IPAM ADD processes into one empty /24, wall time (hyperfine; the plugins
#      take turns between runs).
#   c) one IPAM ADD at 0, 1,000 and 10,000 allocations (scaling).
#   d) headcni-ipam STATUS at 0, 110 and 60,000 allocations, and the bare process floor.
#   e) what an fsync of file and directory would add to each state update on this disk.
# headcni-ipam runs as the static musl build that ships (Dockerfile) and, for comparison, as the
# host's dynamically linked release build. Needs root; installs hyperfine, jq and
# containernetworking-plugins (host-local) when they are missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ITER=${ITER:-60}
BURST=${BURST:-200}
BURST_RUNS=${BURST_RUNS:-10}
HOST_LOCAL=${HOST_LOCAL:-/usr/lib/cni/host-local}
BIG=60000

if [ "$(id -u)" != 0 ]; then
    echo "bench/ipam.sh: run as root" >&2
    exit 1
fi
missing=()
command -v hyperfine >/dev/null || missing+=(hyperfine)
command -v jq >/dev/null || missing+=(jq)
[ -x "$HOST_LOCAL" ] || missing+=(containernetworking-plugins)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y "${missing[@]}"
fi

cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin headcni --example ipam-bench
DYNAMIC=$ROOT/target/release/headcni
TOOL=$ROOT/target/release/examples/ipam-bench
MUSL=x86_64-unknown-linux-musl
if [ -d "$(rustc --print sysroot)/lib/rustlib/$MUSL" ]; then
    CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
        cargo build --release --manifest-path "$ROOT/Cargo.toml" --bin headcni --target $MUSL
    STATIC=$ROOT/target/$MUSL/release/headcni
else
    echo "no $MUSL target installed: 'static' below is the dynamically linked build" >&2
    STATIC=$DYNAMIC
fi

# On the node's disk (like /var/lib), not on a tmpfs.
WORK=$(mktemp -d /var/tmp/headcni-ipam-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/static" "$WORK/dynamic" "$WORK/run"
ln -s "$STATIC" "$WORK/static/headcni-ipam"
ln -s "$DYNAMIC" "$WORK/dynamic/headcni-ipam"
ln -s "$HOST_LOCAL" "$WORK/static/host-local"
OURS=$WORK/static/headcni-ipam
OURS_DYN=$WORK/dynamic/headcni-ipam
HL=$WORK/static/host-local

# conf <file> <type> <dataDir> <subnet> [cniVersion]
conf() {
    printf '{"cniVersion":"%s","name":"bench","run_dir":"%s","log_file":"%s","ipam":{"type":"%s","subnet":"%s","dataDir":"%s"}}\n' \
        "${5:-1.0.0}" "$WORK/run" "$WORK/ipam.log" "$2" "$4" "$3" >"$1"
}

# host-local's own layout, written directly: one file per address named by the address,
# content "<container id>\r\n<ifname>", plus last_reserved_ip.0. The same addresses as ours:
# from 10.128.0.2 up (10.128.0.1 is the gateway).
fill_host_local() {
    local dir=$1/bench count=$2 i n ip=""
    mkdir -p "$dir"
    for ((i = 0; i < count; i++)); do
        n=$((i + 2))
        ip="10.128.$((n >> 8)).$((n & 255))"
        printf '%016x%016x%016x%016x\r\neth0' "$i" $((i ^ 0x5a5a)) $((i * 7919)) $((i + 1)) >"$dir/$ip"
    done
    [ -z "$ip" ] || printf '%s' "$ip" >"$dir/last_reserved_ip.0"
}

fill_ours() {
    "$TOOL" fill "$1" bench 10.128.0.0/16 "$2" >/dev/null
}

declare -A MED P90 RUNS
# timed <iterations> <case args...>: runs ipam-bench time and keeps median and p90 per case.
timed() {
    local name med p90 n
    while read -r name med p90 n; do
        MED[$name]=$med
        P90[$name]=$p90
        RUNS[$name]=$n
    done < <("$TOOL" time "$@")
}

# Flushes what earlier steps left dirty, so that their writeback does not land in the next
# measurement (it slows file creation and renames for every plugin alike, but unevenly).
settle() {
    sync
    sleep 2
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

echo "== $(date -u +%FT%TZ) $(uname -r), $(nproc) cores, headcni $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), host-local $(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null || echo '?')"

# ---- a) ADD on a /16 holding 60,000 allocations -------------------------------------------
conf "$WORK/ours.json" headcni-ipam "$WORK/ours" 10.128.0.0/16
conf "$WORK/hl.json" host-local "$WORK/hl" 10.128.0.0/16
fill_ours "$WORK/ours" $BIG
fill_host_local "$WORK/hl" $BIG
settle
echo "60k state: ours $(stat -c %s "$WORK"/ours/bench/state.*) bytes in one file; host-local $(find "$WORK/hl/bench" -type f | wc -l) files"
timed "$ITER" \
    --case ours-60k ADD DEL "$OURS" "$WORK/ours.json" bench-add \
    --case ours-dynamic-60k ADD DEL "$OURS_DYN" "$WORK/ours.json" bench-add \
    --case host-local-60k ADD DEL "$HL" "$WORK/hl.json" bench-add
used=$("$STATIC" ipam stats --data-dir "$WORK/ours" --network bench --json | jq '.networks[0].used')
[ "$used" = $((BIG + 1)) ] || { echo "ours holds $used allocations, expected $((BIG + 1))" >&2; exit 1; }

# ---- b) 200 parallel ADD processes into one empty range -----------------------------------
cat >"$WORK/burst.sh" <<'EOF'
#!/bin/bash
# burst.sh <plugin> <conf> <count>: <count> ADD processes at once, then wait for all.
# Nothing but the fork happens in the loop, so that the launcher is as cheap as it can be.
export CNI_COMMAND=ADD CNI_IFNAME=eth0 CNI_PATH=${1%/*}
for ((i = 0; i < $3; i++)); do
    CNI_CONTAINERID=burst$i CNI_NETNS=/var/run/netns/burst$i "$1" <"$2" >/dev/null 2>&1 &
done
wait
EOF
chmod +x "$WORK/burst.sh"
settle
conf "$WORK/ours-burst.json" headcni-ipam "$WORK/ours-burst" 10.129.0.0/24
conf "$WORK/hl-burst.json" host-local "$WORK/hl-burst" 10.129.0.0/24
for ((run = 1; run <= BURST_RUNS; run++)); do
    hyperfine --style basic --runs 1 --export-json "$WORK/burst-$run.json" \
        -n ours-burst --prepare "rm -rf $WORK/ours-burst && sync" "$WORK/burst.sh $OURS $WORK/ours-burst.json $BURST" \
        -n ours-dynamic-burst --prepare "rm -rf $WORK/ours-burst && sync" "$WORK/burst.sh $OURS_DYN $WORK/ours-burst.json $BURST" \
        -n host-local-burst --prepare "rm -rf $WORK/hl-burst && sync" "$WORK/burst.sh $HL $WORK/hl-burst.json $BURST" >/dev/null
    # Every run hands out BURST distinct addresses (the last one's state is still there).
    got_ours=$("$STATIC" ipam list --data-dir "$WORK/ours-burst" --network bench --json | jq '[.allocations[].address] | unique | length')
    got_hl=$(find "$WORK/hl-burst/bench" -name '10.*' | wc -l)
    if [ "$got_ours" != "$BURST" ] || [ "$got_hl" != "$BURST" ]; then
        echo "burst: ours $got_ours, host-local $got_hl distinct addresses, expected $BURST" >&2
        exit 1
    fi
done
for name in ours-burst ours-dynamic-burst host-local-burst; do
    read -r MED[$name] P90[$name] RUNS[$name] < <(jq -rs --arg n "$name" \
        '[.[].results[] | select(.command == $n) | .mean * 1000] | sort
         | "\(.[(length / 2 | floor)] | . * 10 | round / 10) \(.[((length - 1) * 0.9 | round)] | . * 10 | round / 10) \(length)"' \
        "$WORK"/burst-*.json)
done

# ---- c) scaling ------------------------------------------------------------------------------
for count in 0 1000 10000; do
    rm -rf "$WORK/ours-s" "$WORK/hl-s"
    conf "$WORK/ours-s.json" headcni-ipam "$WORK/ours-s" 10.128.0.0/16
    conf "$WORK/hl-s.json" host-local "$WORK/hl-s" 10.128.0.0/16
    [ "$count" = 0 ] || fill_ours "$WORK/ours-s" "$count"
    fill_host_local "$WORK/hl-s" "$count"
    settle
    timed "$ITER" \
        --case "ours-$count" ADD DEL "$OURS" "$WORK/ours-s.json" bench-add \
        --case "host-local-$count" ADD DEL "$HL" "$WORK/hl-s.json" bench-add
done

# ---- d) STATUS -------------------------------------------------------------------------------
for count in 0 110 $BIG; do
    rm -rf "$WORK/st-$count"
    conf "$WORK/st-$count.json" headcni-ipam "$WORK/st-$count" 10.128.0.0/16 1.1.0
    [ "$count" = 0 ] || fill_ours "$WORK/st-$count" "$count"
done
settle
timed $((ITER * 5)) \
    --case status-0 STATUS - "$OURS" "$WORK/st-0.json" unused \
    --case status-110 STATUS - "$OURS" "$WORK/st-110.json" unused \
    --case status-$BIG STATUS - "$OURS" "$WORK/st-$BIG.json" unused \
    --case version VERSION - "$OURS" "$WORK/st-0.json" unused \
    --case version-dynamic VERSION - "$OURS_DYN" "$WORK/st-0.json" unused

# ---- e) fsync --------------------------------------------------------------------------------
settle
fsync_small=$("$TOOL" fsync "$WORK" 110 300)
fsync_big=$("$TOOL" fsync "$WORK" $BIG 20)

row() { echo "| $1 | ${MED[$2]} | ${P90[$2]} | ${RUNS[$2]} |"; }

cat <<EOF

==== summary: milliseconds, median and p90 ====
a) IPAM ADD, whole process, on a /16 holding $BIG allocations
| plugin | median | p90 | runs |
|---|---|---|---|
$(row "headcni-ipam (static, as shipped)" ours-60k)
$(row "headcni-ipam (dynamically linked)" ours-dynamic-60k)
$(row "host-local $(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null)" host-local-60k)
ratio to host-local (median): static $(ratio "${MED[ours-60k]}" "${MED[host-local-60k]}"), dynamic $(ratio "${MED[ours-dynamic-60k]}" "${MED[host-local-60k]}")  (goal <= 0.2)

b) $BURST parallel IPAM ADD processes into one empty /24, wall time of the whole burst
| plugin | median | p90 | runs |
|---|---|---|---|
$(row "headcni-ipam (static, as shipped)" ours-burst)
$(row "headcni-ipam (dynamically linked)" ours-dynamic-burst)
$(row "host-local" host-local-burst)
ratio to host-local (median): static $(ratio "${MED[ours-burst]}" "${MED[host-local-burst]}"), dynamic $(ratio "${MED[ours-dynamic-burst]}" "${MED[host-local-burst]}")  (goal <= 0.3)

c) IPAM ADD by allocations already held (median; headcni-ipam static)
| allocations | headcni-ipam | host-local | ratio |
|---|---|---|---|
| 0 | ${MED[ours-0]} | ${MED[host-local-0]} | $(ratio "${MED[ours-0]}" "${MED[host-local-0]}") |
| 1000 | ${MED[ours-1000]} | ${MED[host-local-1000]} | $(ratio "${MED[ours-1000]}" "${MED[host-local-1000]}") |
| 10000 | ${MED[ours-10000]} | ${MED[host-local-10000]} | $(ratio "${MED[ours-10000]}" "${MED[host-local-10000]}") |
| $BIG | ${MED[ours-60k]} | ${MED[host-local-60k]} | $(ratio "${MED[ours-60k]}" "${MED[host-local-60k]}") |

d) headcni-ipam STATUS, whole process (static)
| allocations | median | p90 | runs |
|---|---|---|---|
$(row 0 status-0)
$(row 110 status-110)
$(row $BIG status-$BIG)
$(row "VERSION (the process floor: no work)" version)
$(row "VERSION, dynamically linked" version-dynamic)

e) atomic state replacement with and without fsync (file + directory), this disk
$fsync_small
$fsync_big
EOF
