#!/usr/bin/env bash
# integration/smoke-tailnet.sh: the harness infrastructure end to end.
#
#   peers -> underlay namespaces -> Headscale -> tailscaled per node -> join
#   with the tailscale CLI (tagged pre-auth key, pod CIDR advertised,
#   auto-approved by the policy) -> tailnet and pod-CIDR pings, source
#   addresses, DF/MTU, TCP bulk -> containerd (crictl) and podman containers
#   on the reference ptp network, pinged across nodes -> restarts of
#   headscale and tailscaled -> teardown, and a check that nothing is left.
#
# Exits non-zero on any failure; tears down on exit, error, Ctrl-C or TERM.
#
# usage: integration/smoke-tailnet.sh [--nodes N] [--prefix P] [--keep]
#   --keep   leave everything running on success (tear down later with
#            integration/teardown.sh P)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

while (($#)); do
	case "$1" in
	--nodes)
		export HC_NODES=$2
		shift 2
		;;
	--prefix)
		export HC_PREFIX=$2
		shift 2
		;;
	--keep)
		export HC_KEEP=1
		shift
		;;
	-h | --help)
		sed -n '2,17p' "$0"
		exit 0
		;;
	*)
		echo "unknown argument: $1" >&2
		exit 2
		;;
	esac
done

# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/node.sh
source "$here/lib/node.sh"
# shellcheck source=lib/runtimes.sh
source "$here/lib/runtimes.sh"
# shellcheck source=lib/checks.sh
source "$here/lib/checks.sh"

hc_require_root
((HC_NODES >= 2)) || hc_die "--nodes must be at least 2"

declare -a REPORT=()
report() { REPORT+=("$(printf '%-52s %s' "$1" "$2")"); }
step() { hc_log "== $*"; }

T_START=$(hc_now)

step "peers (install what is missing, build pinned versions once)"
t=$(hc_now)
peers_ensure
report "peers ready" "$(hc_since "$t") s"

# The root namespace before: compared after teardown.
ROOT_BEFORE=$(topo_root_view)

hc_state_init
hc_install_traps

step "topology"
t=$(hc_now)
topo_up
report "underlay + $HC_NODES nodes" "$(hc_since "$t") s"

step "headscale"
t=$(hc_now)
hs_write_config
hs_start
uid=$(hs_create_user "$HC_HS_USER")
hs_create_authkey "$HC_STATE_DIR/authkey"
hs_create_apikey "$HC_STATE_DIR/apikey"
report "headscale up, user id $uid, keys made" "$(hc_since "$t") s"
for f in authkey apikey apikey.header; do
	[[ "$(stat -c %a "$HC_STATE_DIR/$f")" == 600 ]] || hc_die "$f is not mode 0600"
done

step "tailscaled on every node"
for ((i = 1; i <= HC_NODES; i++)); do node_tailscaled_start "$i"; done

step "join with the CLI; node-2 approved through the REST API, the others by autoApprovers"
_approved_by_api() { # I CIDR : join with autoApprovers off, then approve by REST
	local i=$1 cidr=$2
	hs_set_autoapprove 0
	node_ts_up "$i" "$HC_STATE_DIR/authkey" >>"$HC_STATE_DIR/logs/join-n$i.log" 2>&1 ||
		hc_die "node $i failed to join (see $HC_STATE_DIR/logs/join-n$i.log)"
	t_join=$(hc_since "$t")
	hc_wait_for 10 "node-$i advertises $cidr" hs_node_available "node-$i" "$cidr" ||
		hc_die "node-$i does not advertise $cidr"
	sleep 1
	! hs_route_approved "node-$i" "$cidr" || hc_die "$cidr approved without autoApprovers or API"
	before=$(hs_node_field node-1 '.approved_routes')
	t_api=$(hc_now)
	hs_approve_routes "$HC_STATE_DIR/apikey" "node-$i" "$cidr" >"$HC_STATE_DIR/approve-n$i.json"
	hc_wait_for 10 "route $cidr of node-$i approved" hs_route_serving "node-$i" "$cidr" ||
		hc_die "route $cidr of node-$i not approved by the API call"
	[[ "$(hs_node_field node-1 '.approved_routes')" == "$before" ]] ||
		hc_die "approving node-$i changed node-1's routes"
	report "node-$i approve_routes call -> serving" "$(hc_since "$t_api") s"
	hs_set_autoapprove 1
}
for ((i = 1; i <= HC_NODES; i++)); do
	cidr=$(node_pod_cidr "$i")
	t=$(hc_now)
	if ((i == 2)); then
		_approved_by_api "$i" "$cidr"
		how="API"
	else
		node_ts_up "$i" "$HC_STATE_DIR/authkey" >>"$HC_STATE_DIR/logs/join-n$i.log" 2>&1 ||
			hc_die "node $i failed to join (see $HC_STATE_DIR/logs/join-n$i.log)"
		t_join=$(hc_since "$t")
		hc_wait_for 30 "route $cidr of node-$i approved" hs_route_approved "node-$i" "$cidr" ||
			hc_die "route $cidr of node-$i was not auto-approved"
		how="autoApprovers"
	fi
	[[ "$(node_ts_backend_state "$i")" == Running ]] || hc_die "node $i is not Running"
	report "node-$i join (tailscale up -> Running)" "$t_join s"
	report "node-$i $cidr approved ($how), from up" "$(hc_since "$t") s"
done
# every node accepts every other node's route
t=$(hc_now)
for ((i = 1; i <= HC_NODES; i++)); do
	for ((j = 1; j <= HC_NODES; j++)); do
		((i == j)) && continue
		hc_wait_for 30 "node $i installs $(node_pod_cidr "$j")" \
			node_route_in_table52 "$i" "$(node_pod_cidr "$j")" ||
			hc_die "node $i has no route to $(node_pod_cidr "$j") in table 52"
	done
done
report "routes in every peer's table 52 (after last)" "$(hc_since "$t") s"
hs_node_field node-1 '{id, tags, approved_routes, available_routes, subnet_routes}' >"$HC_STATE_DIR/node-1.cli.json"
hs_api "$HC_STATE_DIR/apikey" GET node | jq '.nodes[0] | {id, givenName, nodeKey, tags, approvedRoutes, availableRoutes, subnetRoutes}' \
	>"$HC_STATE_DIR/node-1.rest.json"

step "tailnet pings"
declare -a TS_IP=()
for ((i = 1; i <= HC_NODES; i++)); do TS_IP[i]=$(node_ts_ip4 "$i"); done
# The first packets may find a peer without endpoints yet ("no UDP or DERP
# addr"): wait for the mesh, and report how long it took.
t=$(hc_now)
for ((i = 1; i <= HC_NODES; i++)); do
	for ((j = 1; j <= HC_NODES; j++)); do
		((i == j)) && continue
		hc_wait_for 30 "node $i pings node $j" ping_ok "$(node_ns "$i")" "${TS_IP[j]}" 1 ||
			hc_die "node $i cannot ping node $j at ${TS_IP[j]}"
	done
done
report "full mesh of tailnet pings (after routes)" "$(hc_since "$t") s"
path=$(node_ts 1 ping -c 5 "${TS_IP[2]}" 2>&1 | tail -n1 || true)
report "node-1 -> node-2 tailscale ping" "$path"

step "stand-in pods: pod CIDR routes across the tailnet"
declare -a POD=()
for ((i = 1; i <= HC_NODES; i++)); do POD[i]=$(pod_netns_add "$i" 1); done
table=$(printf '%-8s %-6s %-14s %-14s %s\n' POD NODE ADDRESS "-> PEER" "RTT ms")
for ((i = 1; i <= HC_NODES; i++)); do
	for ((j = 1; j <= HC_NODES; j++)); do
		((i == j)) && continue
		rtt=$(ping_rtt "$(node_ns "$i")-p1" "${POD[j]}")
		[[ "$rtt" != - ]] || hc_die "pod on node $i cannot reach pod ${POD[j]} on node $j"
		table+=$'\n'$(printf '%-8s %-6s %-14s %-14s %s' "p1" "n$i" "${POD[i]}" "${POD[j]}" "$rtt")
	done
done
seen=$(tcp_seen_source "$(node_ns 1)-p1" "$(node_ns 2)-p1" "${POD[2]}" 7001)
[[ "$seen" == "${POD[1]}" ]] || hc_die "pod on node 2 saw source '$seen', expected ${POD[1]} (SNAT?)"
seen2=$(tcp_seen_source "$(node_ns 2)-p1" "$(node_ns 1)-p1" "${POD[1]}" 7002)
[[ "$seen2" == "${POD[2]}" ]] || hc_die "pod on node 1 saw source '$seen2', expected ${POD[2]}"
report "TCP pod source seen across nodes (no SNAT)" "n2 saw $seen, n1 saw $seen2"
ok=$(df_probe "$(node_ns 1)-p1" "${POD[2]}" 1252)
big=$(df_probe "$(node_ns 1)-p1" "${POD[2]}" 1253)
[[ "$ok" == ok && "$big" == frag-needed* ]] || hc_die "DF probe: 1280-byte packet '$ok', 1281-byte packet '$big'"
report "DF 1280 B / 1281 B across the tailnet" "$ok / $big"
t=$(hc_now)
tcp_bulk "$(node_ns 1)-p1" "$(node_ns 2)-p1" "${POD[2]}" 7003 64 || hc_die "64 MiB TCP bulk pod->pod failed"
report "TCP bulk 64 MiB pod n1 -> pod n2" "$(hc_since "$t") s"

step "underlay: nodes reach the internet namespace with their own address"
seen=$(tcp_seen_source "$(node_ns 1)" "$HC_NS_INET" "$HC_INET_ADDR" 7004)
[[ "$seen" == "$(node_addr 1)" ]] || hc_die "internet saw '$seen' from node 1, expected $(node_addr 1)"
report "internet ns sees node-1 as" "$seen"
if ping_ok "$(node_ns 1)-p1" "$HC_INET_ADDR" 1; then
	hc_die "a pod reached the internet namespace without masquerade (route leak?)"
fi
report "pod -> internet without masquerade" "fails, as it must"

step "netfilter inside a node"
node_netfilter_summary 1 >"$HC_STATE_DIR/netfilter-n1.txt"
fwmode=$(grep -o 'netfilter running in [a-z]* mode' "$HC_STATE_DIR/logs/tailscaled-n1.log" | head -n1 || true)
report "tailscaled netfilter" "${fwmode:-unknown}"

step "runtimes: containerd (CRI, crictl) and podman (CNI) on the reference ptp network"
declare -a CTD_IP=() PM_IP=()
for ((i = 1; i <= HC_NODES; i++)); do
	rt_ref_plugins "$i"
	rt_ref_conflist "$i"
	t=$(hc_now)
	ctd_start "$i"
	pod=$(ctd_run_pod "$i" "web$i")
	CTD_IP[i]=$(ctd_pod_ip "$i" "$pod")
	report "n$i crictl pod (start containerd + run pod)" "${CTD_IP[i]} in $(hc_since "$t") s"
	t=$(hc_now)
	pm_prepare "$i"
	pm_run "$i" "c$i" >/dev/null
	PM_IP[i]=$(pm_ip "$i" "c$i")
	report "n$i podman container" "${PM_IP[i]} in $(hc_since "$t") s"
	ping_ok "$(node_ns "$i")" "${CTD_IP[i]}" || hc_die "node $i cannot ping its crictl pod ${CTD_IP[i]}"
	ping_ok "$(node_ns "$i")" "${PM_IP[i]}" || hc_die "node $i cannot ping its podman container ${PM_IP[i]}"
done
# across nodes, from inside the containers
out=$(ctd_exec 1 "$(node_crictl 1 pods --name web1 -q | head -n1)" ping -c 2 -W 2 "${PM_IP[2]}" 2>&1) ||
	hc_die "crictl pod on n1 cannot ping podman container on n2: $out"
report "crictl pod n1 -> podman ctr n2" "$(tail -n1 <<<"$out")"
out=$(node_podman 2 exec c2 ping -c 2 -W 2 "${CTD_IP[1]}" 2>&1) ||
	hc_die "podman container on n2 cannot ping crictl pod on n1: $out"
report "podman ctr n2 -> crictl pod n1" "$(tail -n1 <<<"$out")"

step "restarts: headscale, then tailscaled on node 1"
t=$(hc_now)
hs_restart
ping_ok "$(node_ns 1)-p1" "${POD[2]}" 3 || hc_die "pod traffic broke across a headscale restart"
report "headscale restart, pods still talk" "$(hc_since "$t") s"
# the nodes' map polls reconnect (their first retry tries TLS on the same
# port and times out): wait, so the next step measures only tailscaled
hc_wait_for 60 "all nodes online in headscale again" hs_all_online "$HC_NODES" ||
	hc_die "nodes did not reconnect to headscale after its restart"
report "headscale restart -> all nodes online again" "$(hc_since "$t") s"
t=$(hc_now)
node_tailscaled_restart 1
_running() { [[ "$(node_ts_backend_state "$1")" == Running ]]; }
hc_wait_for 60 "node 1 Running again" _running 1 || hc_die "node 1 not Running after restart"
hc_wait_for 60 "pod traffic after tailscaled restart" ping_ok "$(node_ns 1)-p1" "${POD[2]}" 1 ||
	hc_die "pod traffic did not come back after a tailscaled restart"
report "tailscaled n1 restart -> pod traffic back" "$(hc_since "$t") s"

printf '\n%s\n\n' "$table"
printf '%s\n' "${REPORT[@]}"
printf '\nnode JSON (CLI):  %s\nnode JSON (REST): %s\n' \
	"$(jq -c . "$HC_STATE_DIR/node-1.cli.json")" "$(jq -c . "$HC_STATE_DIR/node-1.rest.json")"
printf 'approve_routes response (node-2): %s\n' \
	"$(jq -c '.node | {id, givenName, approvedRoutes, availableRoutes, subnetRoutes}' "$HC_STATE_DIR/approve-n2.json")"
printf 'netfilter in n1:  %s\n' "$(tr '\n' ';' <"$HC_STATE_DIR/netfilter-n1.txt")"

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	cat <<EOF

Left running (--keep). Look around:
  ip netns list | grep '^$HC_PREFIX-'
  export HC_PREFIX=$HC_PREFIX; source $here/lib/peers.sh; source $here/lib/node.sh; node_ts 1 status
  nsenter -t \$(cat $(node_dir 1)/ctx.pid) -n -m -- bash     # a shell "on" node 1
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
	exit 0
fi

step "teardown and leak check"
trap - EXIT INT TERM HUP
hc_teardown
topo_leak_check "$ROOT_BEFORE" || hc_die "teardown left something behind"
hc_log "smoke-tailnet passed in $(hc_since "$T_START") s"
echo "1 passed, 0 failed"
