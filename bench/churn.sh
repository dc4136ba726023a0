#!/usr/bin/env bash
# Churn benchmark: does pod churn disturb the tailnet? Two harness nodes (real Headscale,
# tailscaled, `headcni agent`, the plugin through cnitool), a client pod on node 1 and a server
# pod on node 2. Windows without and with churn alternate; in a churn window each node adds and
# deletes pods at RATE per second (about 5 alive at a time). In every window, measured at once:
#
#   - cross-node TCP throughput (iperf3, one stream, 1 s samples: the median counts),
#   - 100 Hz ping: loss and the longest run of lost replies,
#   - one new TCP connection per second (each must succeed within 2 s),
#   - tailscaled's own counters on both nodes (`tailscale debug metrics`): major link changes,
#     magicsock rebinds, packets queued to DERP.
#
#   sudo bench/churn.sh [--window S] [--reps N] [--rate R] [--bitrate B] [--out FILE]
#       defaults: 20 s windows, 3 repetitions of (quiet, churn), 5 pods per second per node;
#       --bitrate caps the TCP stream (iperf3 -b, e.g. 200M): on a machine whose CPU the
#       stream saturates, the churn's own CPU use lowers an uncapped stream whatever the
#       network does, and a capped one shows the network's stalls alone
#
# Prints a table (also written to FILE, default target/churn-<time>.md). Everything lives in
# network namespaces created (and removed) here; HEADCNI_BIN skips the build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
WINDOW=20 REPS=3 RATE=5 BITRATE="" OUT=""
while (($#)); do
	case "$1" in
	--window) WINDOW=$2; shift 2 ;;
	--reps) REPS=$2; shift 2 ;;
	--rate) RATE=$2; shift 2 ;;
	--bitrate) BITRATE=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	-h | --help) sed -n '2,22p' "$0"; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done
[[ "$WINDOW" =~ ^[0-9]+$ && "$REPS" =~ ^[0-9]+$ && "$RATE" =~ ^[0-9]+$ ]] ||
	{ echo "--window, --reps and --rate take whole numbers" >&2; exit 2; }
[[ -z "$BITRATE" || "$BITRATE" =~ ^[0-9]+[KMG]?$ ]] || { echo "--bitrate takes a rate such as 200M" >&2; exit 2; }
OUT=${OUT:-$repo/target/churn-$(date +%Y%m%d-%H%M%S).md}

export HC_PREFIX=${HC_PREFIX:-hcch}
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

pod_add 1 cli >/dev/null || hc_die "client pod: ADD failed"
SRV=$(pod_add 2 srv) || hc_die "server pod: ADD failed"
node_spawn 2 iperf3-srv ip netns exec "$(pod_ns srv)" iperf3 -s -B "$SRV" -p 5201
node_spawn 2 connect-srv ip netns exec "$(pod_ns srv)" \
	socat "TCP-LISTEN:7001,bind=$SRV,reuseaddr,fork" SYSTEM:'echo ok'
hc_wait_for 30 "the client pod reaches the server pod" ping_ok "$(pod_where 1 cli)" "$SRV" 1 ||
	hc_die "no path from the client pod to the server pod"
# Let disco settle on the direct path before the first window.
sleep 5

data=$HC_STATE_DIR/churn
mkdir -p "$data"

# The churn loop, run inside a node's context: every 1/RATE s one pod is added (namespace and
# CNI ADD through the node's conflist) and, once RATE pods are alive, the oldest is deleted.
# On TERM it deletes what is left and writes its counts.
# shellcheck disable=SC2016 # expanded by the shell inside the node
churn_loop='
set -u
rate=$1 stats=$2 cnitool=$3
export CNI_PATH=/opt/cni/bin NETCONFPATH=/etc/cni/net.d
adds=0 dels=0 fails=0 k=0
alive=()
add() { ip netns add "ch$1" && ip -n "ch$1" link set lo up &&
	"$cnitool" add headcni "/run/netns/ch$1" >/dev/null 2>&1; }
del() { "$cnitool" del headcni "/run/netns/ch$1" >/dev/null 2>&1; local rc=$?; ip netns del "ch$1" 2>/dev/null; return $rc; }
finish() {
	local p
	for p in "${alive[@]}"; do del "$p" || true; done
	printf "adds=%s dels=%s fails=%s\n" "$adds" "$dels" "$fails" >"$stats"
	exit 0
}
trap finish TERM INT
period=$(awk -v r="$rate" "BEGIN{printf \"%.6f\", 1/r}")
next=$(date +%s.%N)
while :; do
	if add "$k"; then adds=$((adds + 1)); else fails=$((fails + 1)); fi
	alive+=("$k")
	k=$((k + 1))
	if ((${#alive[@]} > rate)); then
		if del "${alive[0]}"; then dels=$((dels + 1)); else fails=$((fails + 1)); fi
		alive=("${alive[@]:1}")
	fi
	next=$(awk -v n="$next" -v p="$period" "BEGIN{printf \"%.6f\", n + p}")
	wait_s=$(awk -v n="$next" -v t="$(date +%s.%N)" "BEGIN{d = n - t; printf \"%.3f\", (d > 0 ? d : 0)}")
	sleep "$wait_s" & wait $!
done
'

ts_metrics() { # I FILE : tailscaled's counters on node I
	node_ts "$1" debug metrics >"$2" 2>/dev/null || : >"$2"
}

# One connection attempt per second to the server pod; prints ok/fail lines.
connect_probe() {
	local n
	for ((n = 0; n < WINDOW; n++)); do
		if [[ "$(pod_exec 1 cli timeout 2 socat -T 2 - "TCP:$SRV:7001,connect-timeout=2" </dev/null 2>/dev/null)" == ok ]]; then
			echo ok
		else
			echo fail
		fi
		sleep 1
	done
}

run_window() { # NAME KIND
	local w=$1 kind=$2 i ping_pid probe_pid
	hc_log "window $w ($kind, ${WINDOW}s)"
	for i in 1 2; do ts_metrics "$i" "$data/$w.n$i.before"; done
	if [[ "$kind" == churn ]]; then
		for i in 1 2; do
			node_spawn "$i" "churn-$w-n$i" bash -c "$churn_loop" churn "$RATE" "$data/$w.n$i.churn" "$CNITOOL_BIN"
		done
	fi
	pod_exec 1 cli ping -n -D -i 0.01 -W 1 -w "$WINDOW" "$SRV" >"$data/$w.ping" 2>&1 &
	ping_pid=$!
	connect_probe >"$data/$w.connect" &
	probe_pid=$!
	pod_exec 1 cli iperf3 -c "$SRV" -p 5201 -t "$WINDOW" -i 1 -J ${BITRATE:+-b "$BITRATE"} >"$data/$w.iperf.json" 2>/dev/null || true
	wait "$ping_pid" 2>/dev/null || true
	wait "$probe_pid" 2>/dev/null || true
	if [[ "$kind" == churn ]]; then
		for i in 1 2; do
			hc_stop_label "churn-$w-n$i" 30
		done
	fi
	for i in 1 2; do ts_metrics "$i" "$data/$w.n$i.after"; done
	printf '%s %s\n' "$w" "$kind" >>"$data/windows"
}

: >"$data/windows"
for ((r = 1; r <= REPS; r++)); do
	run_window "q$r" quiet
	run_window "c$r" churn
done

mkdir -p "$(dirname "$OUT")"
python3 "$here/churn_report.py" "$data" "$WINDOW" "$RATE" "$("$HC_BIN" version)" "${BITRATE:-uncapped}" "$(uptime)" | tee "$OUT"
hc_log "report written to $OUT"
