#!/usr/bin/env bash
# integration/demo.sh: HeadCNI on a two-node cluster on this machine, in one
# command (as root).
#
#   installs what is missing (Debian packages; tailscale, headscale, crictl and
#   cnitool built once at pinned versions), builds HeadCNI, starts Headscale
#   and 2 nodes (tailscaled + `headcni install` + `headcni agent` each), puts
#   2 pods on each node through the real plugin, and prints who got which
#   address, whether each pod reaches the pods of the other node across the
#   tailnet (and how fast), a few lines of each node's /metrics and
#   `headcni status`. Everything lives in network namespaces; nothing of the
#   machine's own network is touched.
#
# usage: integration/demo.sh [--keep] [--prefix P] [--kubernetes]
#   --keep        leave it running and print the commands to look around and to
#                 tear down (integration/teardown.sh P)
#   --kubernetes  the same on a real Kubernetes (kube-demo.sh): HeadCNI installed
#                 with Helm, `kubectl get nodes,pods -o wide`, the cross-node table
# env: HEADCNI_BIN (use this binary instead of building)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for a in "$@"; do
	[[ "$a" != --kubernetes ]] || exec "$here/kube-demo.sh" "$@"
done
export HC_PREFIX=${HC_PREFIX:-demo}
while (($#)); do
	case "$1" in
	--keep)
		export HC_KEEP=1
		shift
		;;
	--prefix)
		export HC_PREFIX=$2
		shift 2
		;;
	-h | --help)
		awk 'NR > 1 && /^#/ && !/shellcheck/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "unknown argument: $1 (try --help)" >&2
		exit 2
		;;
	esac
done
export HC_NODES=2

if [[ $EUID -ne 0 ]]; then
	echo "demo.sh needs root (it creates network namespaces): sudo $0 $*" >&2
	exit 1
fi
if [[ -z "${HEADCNI_BIN:-}" ]] && ! command -v cargo >/dev/null; then
	echo "cargo is needed to build HeadCNI (Rust ${RUST_MIN:-1.89} or newer: https://rustup.rs)," >&2
	echo "or point HEADCNI_BIN at a built headcni binary." >&2
	exit 1
fi

# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/headcni.sh
source "$here/lib/headcni.sh"

T0=$(hc_now)
if [[ -t 1 ]]; then
	say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	say() { printf '\n== %s\n' "$*"; }
fi

say "1/5 what the demo needs (installed once, cached)"
peers_ensure
hcni_build

hc_state_init
hc_install_traps
hcni_stage
[[ "$HC_JOIN" == agent ]] || hc_die "this headcni has no agent; the demo needs it"

say "2/5 Headscale and two nodes (tailscaled, headcni install, headcni agent)"
topo_up
hs_up_with_keys
for i in 1 2; do
	hcni_install "$i"
	# node 1 approves its route with an API key, node 2 through autoApprovers
	if ((i == 1)); then hcni_node_up "$i" api; else hcni_node_up "$i" auto; fi
done
_routes() { node_route_in_table52 1 "$(node_pod_cidr 2)" && node_route_in_table52 2 "$(node_pod_cidr 1)"; }
hc_wait_for 30 "each node routes the other's pod CIDR" _routes || hc_die "the nodes do not route each other's pods"

say "3/5 two pods per node, through the headcni plugin"
declare -A IP
for i in 1 2; do
	for p in p1 p2; do
		IP[$i/$p]=$(pod_add "$i" "$p") || hc_die "pod $p on node $i: ADD failed"
	done
done
# fresh peers need a few seconds for their first direct packets
hc_wait_for 30 "first packets across the tailnet" ping_ok "$(pod_where 1 p1)" "${IP[2/p1]}" 1 || true

say "4/5 pod to pod across the tailnet"
printf '%-6s %-7s %-13s %-13s %-7s %s\n' POD NODE ADDRESS "-> PEER POD" RESULT "RTT (ms)"
fails=0
for i in 1 2; do
	o=$((3 - i))
	for p in p1 p2; do
		for q in p1 p2; do
			if hc_wait_for 10 "ping" ping_ok "$(pod_where "$i" "$p")" "${IP[$o/$q]}" 1; then
				rtt=$(ping_rtt "$(pod_where "$i" "$p")" "${IP[$o/$q]}")
				res=ok
			else
				rtt=- res=FAIL fails=$((fails + 1))
			fi
			printf '%-6s %-7s %-13s %-13s %-7s %s\n' "$p" "node-$i" "${IP[$i/$p]}" "${IP[$o/$q]}" "$res" "$rtt"
		done
	done
done
seen=$(tcp_seen_source "$(pod_where 1 p1)" "$(pod_where 2 p1)" "${IP[2/p1]}" 7000)
printf '\nA TCP connection from node-1/p1 arrives at node-2/p1 from %s (the pod itself: no SNAT).\n' "${seen:-nothing}"

say "5/5 what Headscale and the nodes say"
printf 'Headscale (REST API), approved routes: %s\n' \
	"$(hs_api "$HC_STATE_DIR/apikey" GET node | jq -r '[.nodes[] | "\(.givenName) \((.approvedRoutes // []) | join(","))"] | join("; ")')"
printf '(node-1 approved its own route with an API key, node-2 was approved by the policy'"'"'s autoApprovers)\n'
for i in 1 2; do
	printf '\n-- node-%s: /metrics (excerpt)\n' "$i"
	hcni_metrics "$i" | grep -E '^headcni_(ip_allocations_total|ip_releases_total|pod_network_setup_duration_seconds_count|routes_(advertised|approved|accepted_from_peers)|ready|tailnet_backend_state\{state="Running"\})' |
		grep -v 'family="ipv6"' || true
	printf '\n-- node-%s: headcni status\n' "$i"
	hcni_status "$i" 2>&1 || true
done

printf '\n%s pod-to-pod pairs failed; demo took %s s.\n' "$fails" "$(hc_since "$T0")"

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	n1=$(node_ctx_pid 1)
	n2=$(node_ctx_pid 2)
	cat <<EOF

Left running (--keep). Look around (as root):
  nsenter -t $n1 -n -m -- bash                                  # a shell on node-1 (its network, its /etc/cni, /run/headcni, ...)
  nsenter -t $n1 -n -m -- $HC_BIN status                        # HeadCNI's view of node-1
  nsenter -t $n1 -n -m -- curl -s http://127.0.0.1:$HC_METRICS_PORT/metrics | grep ^headcni_
  nsenter -t $n1 -n -m -- ip netns exec pod-p1 ip addr          # pod p1 on node-1 (${IP[1/p1]})
  nsenter -t $n1 -n -m -- ip netns exec pod-p1 ping ${IP[2/p1]}       # ... to p1 on node-2
  nsenter -t $n1 -n -m -- ip route show table 52                # the other node's pod CIDR, via tailscale0
  nsenter -t $n1 -n -m -- $TAILSCALE_BIN status
  nsenter -t $n2 -n -m -- cat /etc/cni/net.d/10-headcni.conflist /run/headcni/subnet.env
  ip netns exec $HC_NS_HS $HEADSCALE_BIN -c $HC_HS_CONFIG nodes list-routes   # approved / available / serving
  nsenter -t $n2 -n -m -- ip netns add pod-x                    # one more pod on node-2:
  nsenter -t $n2 -n -m -- env CNI_PATH=/opt/cni/bin NETCONFPATH=/etc/cni/net.d $CNITOOL_BIN add headcni /run/netns/pod-x
  ls $HC_STATE_DIR/logs/                                        # every daemon's log
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
fi
((fails == 0))
