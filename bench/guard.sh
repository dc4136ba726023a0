#!/usr/bin/env bash
# Cost of the anti-spoofing guard (the nft table inet headcni-guard: one `fib saddr . iif`
# lookup per packet that arrives on a pod veth). Two harness nodes (real Headscale, tailscaled,
# `headcni agent`, the plugin through cnitool); pods a and b on node 1, pod c on node 2. Each
# repetition measures, with the guard and without it (the order alternating between
# repetitions), one TCP stream with iperf3 for S seconds:
#
#   - pod a -> pod b on node 1 (veth to veth: the guard's relative cost is largest here),
#   - pod a -> pod c across the tailnet (userspace WireGuard is the bottleneck).
#
# The agents are stopped once the pods are up (they would put a removed guard back); the
# guard is removed with `nft delete table` and put back from its own listing.
#
#   sudo bench/guard.sh [--seconds S] [--reps N] [--out FILE]
#       defaults: 10 s, 5 repetitions
#
# Prints a table (also written to FILE, default target/guard-<time>.md). Everything lives in
# network namespaces created (and removed) here; HEADCNI_BIN skips the build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
SECONDS_EACH=10 REPS=5 OUT=""
while (($#)); do
	case "$1" in
	--seconds) SECONDS_EACH=$2; shift 2 ;;
	--reps) REPS=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	-h | --help) sed -n '2,19p' "$0"; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ "$SECONDS_EACH" =~ ^[0-9]+$ && "$REPS" =~ ^[0-9]+$ ]] || { echo "--seconds and --reps take whole numbers" >&2; exit 2; }
OUT=${OUT:-$repo/target/guard-$(date +%Y%m%d-%H%M%S).md}

export HC_PREFIX=${HC_PREFIX:-hcgd}
export HC_NODES=2
# shellcheck source=../integration/lib/peers.sh
source "$repo/integration/lib/peers.sh"
# shellcheck source=../integration/lib/headcni.sh
source "$repo/integration/lib/headcni.sh"
hc_require_root

peers_ensure
hcni_build
hc_state_init
hc_install_traps
hcni_stage
topo_up
hs_up_with_keys
for i in 1 2; do
	hcni_install "$i"
	hcni_node_up "$i" auto
done
_routes() { node_route_in_table52 1 "$(node_pod_cidr 2)" && node_route_in_table52 2 "$(node_pod_cidr 1)"; }
hc_wait_for 30 "each node routes the other's pod CIDR" _routes || hc_die "the nodes do not route each other's pods"

pod_add 1 a >/dev/null || hc_die "pod a: ADD failed"
B=$(pod_add 1 b) || hc_die "pod b: ADD failed"
C=$(pod_add 2 c) || hc_die "pod c: ADD failed"
node_spawn 1 iperf3-b ip netns exec "$(pod_ns b)" iperf3 -s -B "$B" -p 5201
node_spawn 2 iperf3-c ip netns exec "$(pod_ns c)" iperf3 -s -B "$C" -p 5201
hc_wait_for 30 "pod a reaches pod c" ping_ok "$(pod_where 1 a)" "$C" 1 || hc_die "no path from pod a to pod c"
for i in 1 2; do hcni_agent_stop "$i"; done
sleep 3

data=$HC_STATE_DIR/guard
mkdir -p "$data"
for i in 1 2; do
	node_exec "$i" nft list table inet headcni-guard >"$data/guard.n$i.nft" || hc_die "node $i has no guard"
done
guard() { # on|off
	local i
	for i in 1 2; do
		node_exec "$i" nft delete table inet headcni-guard 2>/dev/null || true
		if [[ "$1" == on ]]; then node_exec "$i" nft -f - <"$data/guard.n$i.nft"; fi
	done
}

measure() { # GUARD REP
	local g=$1 r=$2 path dst
	guard "$g"
	for path in same cross; do
		if [[ "$path" == same ]]; then dst=$B; else dst=$C; fi
		hc_log "rep $r, guard $g, $path node (${SECONDS_EACH}s)"
		pod_exec 1 a iperf3 -c "$dst" -p 5201 -t "$SECONDS_EACH" -J >"$data/$path.$g.$r.json" 2>/dev/null ||
			hc_die "iperf3 to $dst failed"
	done
}

for ((r = 1; r <= REPS; r++)); do
	if ((r % 2)); then measure on "$r"; measure off "$r"; else measure off "$r"; measure on "$r"; fi
done
guard on
drops=$(node_exec 1 nft list table inet headcni-guard | awk '/counter packets/ {for (i = 1; i <= NF; i++) if ($i == "packets") print $(i + 1)}')

mkdir -p "$(dirname "$OUT")"
python3 - "$data" "$REPS" "$SECONDS_EACH" "$("$HC_BIN" version)" "$(uptime)" "${drops:-?}" <<'EOF' | tee "$OUT"
import json, statistics, sys
data, reps, secs, version, load, drops = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def gbps(path, guard):
    out = []
    for r in range(1, reps + 1):
        with open(f"{data}/{path}.{guard}.{r}.json") as f:
            out.append(json.load(f)["end"]["sum_received"]["bits_per_second"] / 1e9)
    return out
print(f"guard cost: {version}; {reps} repetitions of {secs} s per case, order alternating; {load.strip()}")
print()
print("| path | guard | median Gbit/s | min | max | ratio on/off |")
print("|---|---|---|---|---|---|")
for path, label in [("same", "pod to pod, one node"), ("cross", "pod to pod, across the tailnet")]:
    on, off = gbps(path, "on"), gbps(path, "off")
    ratio = statistics.median(on) / statistics.median(off)
    for g, v in [("on", on), ("off", off)]:
        r = f"{ratio:.3f}" if g == "on" else ""
        print(f"| {label} | {g} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | {r} |")
print()
print(f"packets the guard dropped meanwhile (it should be none): {drops}")
EOF
hc_log "report written to $OUT"
