#!/usr/bin/env bash
# headcni-ipam against the reference host-local, side by side in one run. Not a test: it prints
# figures for BENCHMARKS.md (## IPAM).
#
#   sudo bench/ipam.sh                      # the full run recorded in BENCHMARKS.md
#   sudo RUNS=10 ROUNDS=2 bench/ipam.sh     # quicker
#
# Measures, with the release build and whole processes (fork + exec + the plugin's work):
#   a) one IPAM ADD on a /16 already holding 60,000 allocations (each run's DEL, untimed,
#      restores the state), in ROUNDS rounds alternating which plugin runs first;
#   b) 200 parallel IPAM ADD processes into one empty range, wall time;
#   c) ADD at 0, 1k and 10k allocations (scaling);
#   d) headcni-ipam STATUS at 0, 110 and 60,000 allocations;
#   e) what an fsync of file and directory would add to each state update on this disk.
# Needs root (it installs hyperfine, jq and containernetworking-plugins when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-30}
ROUNDS=${ROUNDS:-4}
BURST=${BURST:-200}
BURST_RUNS=${BURST_RUNS:-3}
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
HEADCNI=$ROOT/target/release/headcni
TOOL=$ROOT/target/release/examples/ipam-bench

# On the node's disk (like /var/lib), not on a tmpfs.
WORK=$(mktemp -d /var/tmp/headcni-ipam-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin" "$WORK/run" "$WORK/results"
ln -s "$HEADCNI" "$WORK/bin/headcni-ipam"
ln -s "$HOST_LOCAL" "$WORK/bin/host-local"

# conf <file> <type> <dataDir> <subnet> [cniVersion]
conf() {
    printf '{"cniVersion":"%s","name":"bench","run_dir":"%s","log_file":"%s","ipam":{"type":"%s","subnet":"%s","dataDir":"%s"}}\n' \
        "${5:-1.0.0}" "$WORK/run" "$WORK/ipam.log" "$2" "$4" "$3" >"$1"
}

# cni <verb> <plugin> <conf> <container>: the command line a runtime's exec amounts to.
cni() {
    echo "CNI_COMMAND=$1 CNI_CONTAINERID=$4 CNI_NETNS=/var/run/netns/$4 CNI_IFNAME=eth0 CNI_PATH=$WORK/bin $WORK/bin/$2 < $3"
}

# host-local's own layout, written directly: one file per address named by the address,
# content "<container id>\r\n<ifname>", plus last_reserved_ip.0. Same addresses as ours:
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

# stats <name> <json files...>: median and p90 in ms of every timed run of <name>.
stats() {
    local name=$1
    shift
    jq -rs --arg n "$name" '[.[].results[] | select(.command == $n) | .times[]] | sort
        | "\(.[(length / 2 | floor)] * 1000 | . * 1000 | round / 1000) \(.[((length - 1) * 0.9 | round)] * 1000 | . * 1000 | round / 1000) \(length)"' "$@"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

echo "== $(date -u +%FT%TZ) $(uname -r), $(nproc) cores, headcni $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), host-local $(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null || echo '?')"

# ---- a) ADD on a /16 holding 60,000 allocations -------------------------------------------
conf "$WORK/ours.json" headcni-ipam "$WORK/ours" 10.128.0.0/16
conf "$WORK/hl.json" host-local "$WORK/hl" 10.128.0.0/16
fill_ours "$WORK/ours" $BIG
fill_host_local "$WORK/hl" $BIG
echo "state: ours $(stat -c %s "$WORK"/ours/bench/state.*) bytes in one file; host-local $(ls "$WORK/hl/bench" | wc -l) files"
ours_add=$(cni ADD headcni-ipam "$WORK/ours.json" bench-add)
ours_del=$(cni DEL headcni-ipam "$WORK/ours.json" bench-add)
hl_add=$(cni ADD host-local "$WORK/hl.json" bench-add)
hl_del=$(cni DEL host-local "$WORK/hl.json" bench-add)
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then
        set -- -n ours-60k --prepare "$ours_del" "$ours_add" -n host-local-60k --prepare "$hl_del" "$hl_add"
    else
        set -- -n host-local-60k --prepare "$hl_del" "$hl_add" -n ours-60k --prepare "$ours_del" "$ours_add"
    fi
    hyperfine --style basic --warmup 3 --runs "$RUNS" --export-json "$WORK/results/add60k-$round.json" "$@"
done
eval "$ours_del"
eval "$hl_del"
used=$("$HEADCNI" ipam stats --data-dir "$WORK/ours" --network bench --json | jq '.networks[0].used')
[ "$used" = $BIG ] || { echo "ours holds $used allocations, expected $BIG" >&2; exit 1; }
read -r ours_med ours_p90 ours_n <<<"$(stats ours-60k "$WORK"/results/add60k-*.json)"
read -r hl_med hl_p90 hl_n <<<"$(stats host-local-60k "$WORK"/results/add60k-*.json)"

# ---- b) 200 parallel ADD processes into one empty range -----------------------------------
cat >"$WORK/burst.sh" <<'EOF'
#!/bin/bash
# burst.sh <plugin> <conf> <count> <bin dir>: <count> ADD processes at once, then wait.
for ((i = 0; i < $3; i++)); do
    CNI_COMMAND=ADD CNI_CONTAINERID=burst$i CNI_NETNS=/var/run/netns/burst$i CNI_IFNAME=eth0 \
        CNI_PATH=$4 "$4/$1" <"$2" >/dev/null 2>&1 &
done
wait
EOF
chmod +x "$WORK/burst.sh"
conf "$WORK/ours-burst.json" headcni-ipam "$WORK/ours-burst" 10.129.0.0/24
conf "$WORK/hl-burst.json" host-local "$WORK/hl-burst" 10.129.0.0/24
ours_burst="$WORK/burst.sh headcni-ipam $WORK/ours-burst.json $BURST $WORK/bin"
hl_burst="$WORK/burst.sh host-local $WORK/hl-burst.json $BURST $WORK/bin"
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then
        set -- -n ours-burst --prepare "rm -rf $WORK/ours-burst" "$ours_burst" -n host-local-burst --prepare "rm -rf $WORK/hl-burst" "$hl_burst"
    else
        set -- -n host-local-burst --prepare "rm -rf $WORK/hl-burst" "$hl_burst" -n ours-burst --prepare "rm -rf $WORK/ours-burst" "$ours_burst"
    fi
    hyperfine --style basic --runs "$BURST_RUNS" --export-json "$WORK/results/burst-$round.json" "$@"
    # Each run must have handed out BURST distinct addresses.
    got_ours=$("$HEADCNI" ipam list --data-dir "$WORK/ours-burst" --network bench --json | jq '[.allocations[].address] | unique | length')
    got_hl=$(find "$WORK/hl-burst/bench" -name '10.*' | wc -l)
    if [ "$got_ours" != "$BURST" ] || [ "$got_hl" != "$BURST" ]; then
        echo "burst: ours $got_ours, host-local $got_hl distinct addresses, expected $BURST" >&2
        exit 1
    fi
done
read -r ob_med ob_p90 ob_n <<<"$(stats ours-burst "$WORK"/results/burst-*.json)"
read -r hb_med hb_p90 hb_n <<<"$(stats host-local-burst "$WORK"/results/burst-*.json)"

# ---- c) scaling ------------------------------------------------------------------------------
scaling=()
for count in 0 1000 10000; do
    rm -rf "$WORK/ours-s" "$WORK/hl-s"
    conf "$WORK/ours-s.json" headcni-ipam "$WORK/ours-s" 10.128.0.0/16
    conf "$WORK/hl-s.json" host-local "$WORK/hl-s" 10.128.0.0/16
    fill_ours "$WORK/ours-s" $count
    fill_host_local "$WORK/hl-s" $count
    hyperfine --style basic --warmup 3 --runs "$RUNS" --export-json "$WORK/results/scale-$count.json" \
        -n "ours-$count" --prepare "$(cni DEL headcni-ipam "$WORK/ours-s.json" bench-add)" "$(cni ADD headcni-ipam "$WORK/ours-s.json" bench-add)" \
        -n "host-local-$count" --prepare "$(cni DEL host-local "$WORK/hl-s.json" bench-add)" "$(cni ADD host-local "$WORK/hl-s.json" bench-add)"
    read -r om _ _ <<<"$(stats "ours-$count" "$WORK/results/scale-$count.json")"
    read -r hm _ _ <<<"$(stats "host-local-$count" "$WORK/results/scale-$count.json")"
    scaling+=("| $count | $om | $hm | $(ratio "$om" "$hm") |")
done
scaling+=("| $BIG | $ours_med | $hl_med | $(ratio "$ours_med" "$hl_med") |")

# ---- d) STATUS -------------------------------------------------------------------------------
status_rows=()
for count in 0 110 $BIG; do
    rm -rf "$WORK/st"
    conf "$WORK/st.json" headcni-ipam "$WORK/st" 10.128.0.0/16 1.1.0
    [ "$count" = 0 ] || fill_ours "$WORK/st" $count
    hyperfine --style basic --warmup 10 --runs $((RUNS * 3)) --export-json "$WORK/results/status-$count.json" \
        -n "status-$count" "$(cni STATUS headcni-ipam "$WORK/st.json" unused)"
    read -r sm sp _ <<<"$(stats "status-$count" "$WORK/results/status-$count.json")"
    status_rows+=("| $count | $sm | $sp |")
done
hyperfine --style basic --warmup 10 --runs $((RUNS * 3)) --export-json "$WORK/results/version.json" \
    -n version "CNI_COMMAND=VERSION $WORK/bin/headcni-ipam < /dev/null"
read -r vm vp _ <<<"$(stats version "$WORK/results/version.json")"

# ---- e) fsync --------------------------------------------------------------------------------
fsync_small=$("$TOOL" fsync "$WORK" 110 300)
fsync_big=$("$TOOL" fsync "$WORK" $BIG 20)

cat <<EOF

==== summary (milliseconds; median and p90 over all rounds) ====
a) IPAM ADD, whole process, /16 holding $BIG allocations ($ROUNDS rounds x $RUNS runs, alternating)
| plugin | median | p90 | runs |
|---|---|---|---|
| headcni-ipam | $ours_med | $ours_p90 | $ours_n |
| host-local | $hl_med | $hl_p90 | $hl_n |
ratio headcni-ipam / host-local (median): $(ratio "$ours_med" "$hl_med")  (goal <= 0.2)

b) $BURST parallel IPAM ADD processes into one empty /24, wall time ($ROUNDS rounds x $BURST_RUNS runs)
| plugin | median | p90 | runs |
|---|---|---|---|
| headcni-ipam | $ob_med | $ob_p90 | $ob_n |
| host-local | $hb_med | $hb_p90 | $hb_n |
ratio headcni-ipam / host-local (median): $(ratio "$ob_med" "$hb_med")  (goal <= 0.3)

c) IPAM ADD by allocations already held (median)
| allocations | headcni-ipam | host-local | ratio |
|---|---|---|---|
$(printf '%s\n' "${scaling[@]}")

d) headcni-ipam STATUS, whole process
| allocations | median | p90 |
|---|---|---|
$(printf '%s\n' "${status_rows[@]}")
process floor (VERSION, no work): median $vm, p90 $vp

e) atomic state replacement with and without fsync (file + directory), this disk
$fsync_small
$fsync_big
EOF
