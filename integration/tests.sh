#!/usr/bin/env bash
# integration/tests.sh: HeadCNI across nodes, on the real Headscale,
# tailscaled, plugin and runtimes (see integration/README.md).
#
# Setup: peers, the static release build (or $HEADCNI_BIN), underlay, Headscale,
# then on each of 2 nodes tailscaled, `headcni install` and `headcni agent`
# (zero-config join with a pre-auth key file, autoApprovers), and two pods
# per node attached through the real plugin. Then the tests, in this order:
#
#   pod_to_pod        ICMP and TCP across nodes both ways; the receiver sees the pod's own address
#   mtu               pod MTU = tailnet MTU; largest DF packet passes, one byte more fails cleanly; TCP bulk both ways
#   masquerade        pods reach the "internet" namespace, which sees the node's underlay address
#   runtimes_across   a crictl (containerd CRI) pod and a podman container on headcni, across nodes
#   metrics_status    /metrics counts each node's ADDs, DELs (and their time) and errors, each peer's path and
#                     the IPAM pool; `headcni status` shows peers, their paths and routes
#   relay_path        node 1 drops UDP to and from node 2: status, --json and /metrics say relay, pods still
#                     talk (DERP); unblocked: direct again; pods quiet: idle, not relay; the times are reported
#   silent_agent      a stopped agent: `headcni status` exits 1 and says so (the time is reported)
#   route_lifecycle   node 3 joins (API key), leaves; node 4 joins (autoApprovers), leaves; times; no foreign approvals
#   restarts          agent, tailscaled and headscale restarted under traffic; traffic returns, addresses stay
#
# usage: integration/tests.sh [--prefix P] [--keep] [--list] [--inject CODE] [TEST...]
#   TEST...   run only these (setup always runs), e.g. `tests.sh mtu restarts`
#   --keep    leave everything running at the end (integration/teardown.sh P)
#   --inject  shell code run after the setup, before the tests: a fault, to
#             see a test fail, e.g. --inject 'pod_exec 1 p1 ip link set eth0 mtu 1500'
# env: HEADCNI_BIN (skip the build), HC_JOIN=agent|cli (cli: debug path without
#      the agent), HC_IPAM=headcni-ipam|host-local, HC_KEEP_STATE=1 (keep logs)
# Exits non-zero when any test fails; tears down on exit, error and Ctrl-C.
# shellcheck disable=SC2317 # test functions and helpers are called by name (tr_run, hc_wait_for)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ALL_TESTS=(pod_to_pod mtu masquerade runtimes_across metrics_status relay_path silent_agent route_lifecycle restarts)
# shellcheck source=lib/args.sh
source "$here/lib/args.sh"
TR_ALLOW_INJECT=1
declare -a WANT=()
tr_parse_args "$@"

export HC_PREFIX=${HC_PREFIX:-hct}
export HC_NODES=2
# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/headcni.sh
source "$here/lib/headcni.sh"
# shellcheck source=lib/testing.sh
source "$here/lib/testing.sh"

hc_require_root

# --- helpers shared by the tests ---------------------------------------------------

needs_agent() { [[ "$HC_JOIN" == agent ]] || skip "needs headcni agent (HC_JOIN=$HC_JOIN)"; }

# wait_ping WHERE DST [TIMEOUT] : poll until DST answers (fresh peers take ~5 s).
wait_ping() { hc_wait_for "${3:-20}" "$1 pings $2" ping_ok "$1" "$2" 1; }

# pods_mesh : every setup pod reaches the same-index pod on the other node.
pods_mesh() {
	local p
	for p in p1 p2; do
		wait_ping "$(pod_where 1 "$p")" "$(pod_ip 2 "$p")" "${1:-20}" || return 1
		wait_ping "$(pod_where 2 "$p")" "$(pod_ip 1 "$p")" "${1:-20}" || return 1
	done
}

# routes_everywhere NODES... : each node has every other node's pod CIDR in table 52.
routes_everywhere() {
	local i j
	for i in "$@"; do
		for j in "$@"; do
			((i == j)) && continue
			node_route_in_table52 "$i" "$(node_pod_cidr "$j")" || return 1
		done
	done
}

# REST views of Headscale (the API the agent uses; camelCase)
hs_rest_nodes() { hs_api "$HC_STATE_DIR/apikey" GET node; }
# hs_rest_approved HOSTNAME : the node's approvedRoutes, sorted, comma separated.
hs_rest_approved() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.approvedRoutes // [])[]] | sort | join(",")'
}
hs_rest_has_approved() { [[ ",$(hs_rest_approved "$1")," == *",$2,"* ]]; }
hs_rest_available() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.availableRoutes // [])[]] | sort | join(",")'
}
hs_rest_has_available() { [[ ",$(hs_rest_available "$1")," == *",$2,"* ]]; }
# all nodes' approved routes, one "host=routes" line each (for before/after)
hs_rest_approved_all() {
	hs_rest_nodes | jq -r '.nodes[] | "\(.givenName)=\([(.approvedRoutes // [])[]] | sort | join(","))"' | sort
}

# --- setup -------------------------------------------------------------------------

tr_setup_begin
hs_up_with_keys
for ((i = 1; i <= HC_NODES; i++)); do
	hcni_install "$i"
	hcni_node_up "$i" auto
done
hc_wait_for 30 "pod CIDR routes in every table 52" routes_everywhere 1 2 ||
	hc_die "the nodes did not install each other's pod CIDR routes"
for ((i = 1; i <= HC_NODES; i++)); do
	for p in p1 p2; do
		pod_add "$i" "$p" >/dev/null || hc_die "pod $p on node $i: ADD failed"
	done
done
pods_mesh 30 || hc_die "setup pods do not reach each other across the nodes"
SETUP_S=$(hc_since "$T_SETUP")
hc_log "== setup done in ${SETUP_S}s (cluster part; whole run so far $(hc_elapsed)s)"
if [[ -n "$INJECT" ]]; then
	hc_warn "injecting a fault: $INJECT"
	eval "$INJECT"
fi

# --- the tests ----------------------------------------------------------------------

# (1) pod to pod across nodes, ICMP and TCP, both directions, no SNAT.
t_pod_to_pod() {
	local a b ia ib rtt seen port=7101
	for a in 1 2; do
		b=$((3 - a))
		ia=$(pod_ip "$a" p1)
		ib=$(pod_ip "$b" p1)
		[[ "$(pod_addr_now "$a" p1)" == "$ia" ]] || hc_die "pod p1 on node $a has $(pod_addr_now "$a" p1), ADD said $ia"
		cidr_has "$(node_pod_cidr "$a")" "$ia" || hc_die "pod p1 on node $a got $ia, outside $(node_pod_cidr "$a")"
		wait_ping "$(pod_where "$a" p1)" "$ib" 20 || hc_die "ICMP n${a}/p1 -> n${b}/p1 ($ib) fails"
		rtt=$(ping_rtt "$(pod_where "$a" p1)" "$ib")
		[[ "$rtt" != - ]] || hc_die "ICMP n${a}/p1 -> $ib lost packets after the first reply"
		seen=$(tcp_seen_source "$(pod_where "$a" p1)" "$(pod_where "$b" p1)" "$ib" "$port")
		[[ "$seen" == "$ia" ]] || hc_die "TCP n${a}/p1 -> n${b}/p1: receiver saw source '$seen', expected $ia (SNAT?)"
		note "n$a/p1 $ia -> n$b/p1 $ib: ICMP rtt ${rtt} ms, TCP source seen $seen"
		port=$((port + 1))
	done
	# same node, pod to pod (local routing through the node)
	wait_ping "$(pod_where 1 p1)" "$(pod_ip 1 p2)" 5 || hc_die "n1/p1 cannot reach n1/p2 on the same node"
	seen=$(tcp_seen_source "$(pod_where 1 p2)" "$(pod_where 1 p1)" "$(pod_ip 1 p1)" "$port")
	[[ "$seen" == "$(pod_ip 1 p2)" ]] || hc_die "same node TCP: saw '$seen', expected $(pod_ip 1 p2)"
	note "same node n1/p2 -> n1/p1: TCP source seen $seen"
}

# (2) MTU: the pods get the tailnet's MTU, the largest DF packet passes, one
# byte more fails with an error (not silence), TCP bulk completes both ways.
t_mtu() {
	local tsmtu podmtu filemtu ok big
	tsmtu=$(node_exec 1 cat /sys/class/net/tailscale0/mtu)
	filemtu=$(sed -n 's/^HEADCNI_MTU=//p' "$(hcni_node_file 1)")
	podmtu=$(pod_exec 1 p1 cat /sys/class/net/eth0/mtu)
	note "tailscale0 $tsmtu, node file $filemtu, pod eth0 $podmtu"
	[[ "$filemtu" == "$tsmtu" ]] || hc_die "node file MTU $filemtu differs from tailscale0's $tsmtu"
	[[ "$podmtu" == "$tsmtu" ]] || hc_die "pod MTU $podmtu differs from the tailnet's $tsmtu"
	local payload=$((podmtu - 28))
	wait_ping "$(pod_where 1 p1)" "$(pod_ip 2 p1)" 20 || hc_die "no connectivity to start with"
	for _ in 1 2 3; do
		ok=$(df_probe "$(pod_where 1 p1)" "$(pod_ip 2 p1)" "$payload")
		[[ "$ok" == ok ]] && break
	done
	big=$(df_probe "$(pod_where 1 p1)" "$(pod_ip 2 p1)" $((payload + 1)))
	note "DF ICMP $((payload + 28)) B: $ok; $((payload + 29)) B: $big"
	[[ "$ok" == ok ]] || hc_die "a DF packet of $((payload + 28)) B (the pod MTU) does not pass: $ok"
	[[ "$big" == frag-needed* ]] || hc_die "a DF packet of $((payload + 29)) B did not fail cleanly: $big"
	ok=$(df_probe "$(pod_where 2 p2)" "$(pod_ip 1 p2)" "$payload")
	[[ "$ok" == ok ]] || hc_die "reverse: a DF packet of $((payload + 28)) B n2 -> n1 does not pass: $ok"
	local t0
	t0=$(hc_now)
	tcp_bulk "$(pod_where 1 p1)" "$(pod_where 2 p1)" "$(pod_ip 2 p1)" 7201 32 ||
		hc_die "TCP bulk 32 MiB n1/p1 -> n2/p1 did not complete"
	note "TCP 32 MiB n1 -> n2 in $(hc_since "$t0") s"
	t0=$(hc_now)
	tcp_bulk "$(pod_where 2 p2)" "$(pod_where 1 p2)" "$(pod_ip 1 p2)" 7202 32 ||
		hc_die "TCP bulk 32 MiB n2/p2 -> n1/p2 did not complete"
	note "TCP 32 MiB n2 -> n1 in $(hc_since "$t0") s"
}

# (3) a pod reaches a host outside the cluster, masqueraded to the node's address.
t_masquerade() {
	needs_agent
	local i seen
	for i in 1 2; do
		wait_ping "$(pod_where "$i" p1)" "$HC_INET_ADDR" 10 || hc_die "pod n$i/p1 cannot reach the internet host"
		seen=$(tcp_seen_source "$(pod_where "$i" p1)" "$HC_NS_INET" "$HC_INET_ADDR" $((7300 + i)))
		[[ "$seen" == "$(node_addr "$i")" ]] ||
			hc_die "internet host saw '$seen' from pod n$i/p1, expected node $i's $(node_addr "$i") (masquerade)"
		note "pod n$i/p1 $(pod_ip "$i" p1) -> internet: seen as $seen (node $i's underlay address)"
	done
	# across nodes the pod address is still kept (no masquerade inside the cluster)
	seen=$(tcp_seen_source "$(pod_where 2 p2)" "$(pod_where 1 p2)" "$(pod_ip 1 p2)" 7303)
	[[ "$seen" == "$(pod_ip 2 p2)" ]] || hc_die "pod to pod after masquerade check: saw '$seen'"
	note "nft tables in node 1: $(ip netns exec "$(node_ns 1)" nft list tables 2>/dev/null | tr '\n' ' ')"
}

# real runtimes on the headcni network, across nodes
t_runtimes_across() {
	local pod ip1 ip2 out
	ctd_start 1
	pod=$(ctd_run_pod 1 xweb)
	ip1=$(ctd_pod_ip 1 "$pod")
	cidr_has "$(node_pod_cidr 1)" "$ip1" || hc_die "crictl pod on node 1 got $ip1"
	pm_prepare 2
	HC_CNI_NET=$HC_NET pm_run 2 xc2 >/dev/null
	ip2=$(pm_ip 2 xc2)
	cidr_has "$(node_pod_cidr 2)" "$ip2" || hc_die "podman container on node 2 got $ip2"
	note "crictl pod n1 $ip1, podman container n2 $ip2"
	hc_wait_for 20 "crictl pod n1 -> podman n2" ctd_exec 1 "$pod" ping -c 1 -W 1 "$ip2" ||
		hc_die "crictl pod on n1 cannot ping the podman container on n2"
	out=$(node_podman 2 exec xc2 ping -c 3 -W 2 "$ip1" 2>&1) ||
		hc_die "podman container on n2 cannot ping the crictl pod on n1: $out"
	note "podman n2 -> crictl n1: $(tail -n1 <<<"$out")"
	out=$(ctd_exec 1 "$pod" ping -c 3 -W 2 "$(pod_ip 2 p1)" 2>&1) || hc_die "crictl pod n1 -> pod n2/p1: $out"
	ctd_rm_pod 1 "$pod"
	pm_rm 2 xc2
	! node_pod_routes 1 | grep -qx "$ip1" || hc_die "route to $ip1 left on node 1 after rmp"
	! node_pod_routes 2 | grep -qx "$ip2" || hc_die "route to $ip2 left on node 2 after podman rm"
	note "removed: no route left to $ip1 (n1) or $ip2 (n2)"
	ctd_stop 1
}

# (6) /metrics counts the ADDs, DELs and failed ADDs that happened on each
# node; `headcni status` shows the right peers and routes.
t_metrics_status() {
	needs_agent
	local i k
	local -A A0 R0 S0 E0
	local al='headcni_ip_allocations_total{family="ipv4"}' rl='headcni_ip_releases_total{family="ipv4"}'
	local sl='headcni_pod_network_setup_duration_seconds_count' el='headcni_network_errors_total{operation="add"}'
	local dl='headcni_pod_network_teardown_duration_seconds_count'
	local -A D0
	for i in 1 2; do
		A0[$i]=$(hcni_metric "$i" "$al")
		R0[$i]=$(hcni_metric "$i" "$rl")
		S0[$i]=$(hcni_metric "$i" "$sl")
		E0[$i]=$(hcni_metric "$i" "$el")
		D0[$i]=$(hcni_metric "$i" "$dl")
	done
	# node 1: 3 ADDs, 2 DELs, 1 failed ADD; node 2: 1 ADD, 1 DEL
	local -A mip
	for k in 1 2 3; do mip[$k]=$(pod_add 1 "m$k") || hc_die "ADD m$k on node 1 failed"; done
	pod_del 1 m1
	pod_del 1 m2
	pod_add 2 m1 >/dev/null || hc_die "ADD m1 on node 2 failed"
	pod_del 2 m1
	hcni_ipam_holds 1 "${mip[3]}" || hc_die "node 1's IPAM does not hold m3's ${mip[3]}"
	for k in 1 2; do
		! hcni_ipam_holds 1 "${mip[$k]}" || hc_die "node 1's IPAM still holds m$k's ${mip[$k]} after DEL"
	done
	# a failing ADD: the pod already has an eth0 (code 101)
	node_exec 1 ip netns add pod-bad
	node_exec 1 ip -n pod-bad link add eth0 type veth peer name eth1
	if node_cnitool 1 add "$HC_NET" /run/netns/pod-bad >/dev/null 2>&1; then
		hc_die "ADD into a pod that already has eth0 succeeded"
	fi
	node_cnitool 1 del "$HC_NET" /run/netns/pod-bad >/dev/null 2>&1 || true
	node_exec 1 ip netns delete pod-bad
	local -A want_a=([1]=3 [2]=1) want_r=([1]=2 [2]=1) want_e=([1]=1 [2]=0)
	for i in 1 2; do
		local da dr ds de
		da=$(($(hcni_metric "$i" "$al") - A0[$i]))
		dr=$(($(hcni_metric "$i" "$rl") - R0[$i]))
		ds=$(($(hcni_metric "$i" "$sl") - S0[$i]))
		de=$(($(hcni_metric "$i" "$el") - E0[$i]))
		note "node $i: allocations +$da, releases +$dr, setups +$ds, add errors +$de (expected +${want_a[$i]} +${want_r[$i]} +${want_a[$i]} +${want_e[$i]})"
		((da == want_a[$i] && dr == want_r[$i] && ds == want_a[$i] && de == want_e[$i])) ||
			hc_die "node $i's /metrics does not count what happened there"
	done
	# DEL latency: one observation per successful DEL on its own node (node 1: m1, m2 and the
	# runtime's DEL after the failed ADD; node 2: m1)
	local -A want_d=([1]=3 [2]=1)
	for i in 1 2; do
		local dd=$(($(hcni_metric "$i" "$dl") - D0[$i])) want=${want_d[$i]}
		note "node $i: DEL times observed +$dd (expected +$want)"
		((dd == want)) || hc_die "node $i's headcni_pod_network_teardown_duration_seconds does not count its DELs"
	done
	# each peer's path, and the pool's use, as a dashboard shows them (tailscaled keeps a path
	# only while traffic flows, so the pods talk first; the gauges are set at the end of each
	# pass: the path shows within a pass interval)
	wait_ping "$(pod_where 1 p1)" "$(pod_ip 2 p1)" 20 || hc_die "n1/p1 cannot reach n2/p1"
	wait_ping "$(pod_where 2 p1)" "$(pod_ip 1 p1)" 20 || hc_die "n2/p1 cannot reach n1/p1"
	local path_metric
	_direct() { (($(hcni_metric "$1" "$2") == 1)); }
	for i in 1 2; do
		path_metric="headcni_tailnet_peer_path{peer=\"$(node_hostname $((3 - i)))\",path=\"direct\"}"
		hc_wait_for 12 "node $i: $path_metric" _direct "$i" "$path_metric" ||
			hc_die "node $i: $path_metric is not 1 ($(hcni_metrics "$i" | grep '^headcni_tailnet_peer_path' | tr '\n' ' '))"
	done
	if [[ "$(hcni_ipam_kind 1)" == headcni-ipam ]]; then
		local used_metric held
		used_metric="headcni_ipam_addresses_used{network=\"$HC_NET\",pool=\"$(node_pod_cidr 1)\"}"
		held=$(hcni_ipam 1 list --json | jq '.allocations | length')
		(($(hcni_metric 1 "$used_metric") == held)) ||
			hc_die "node 1: $used_metric is $(hcni_metric 1 "$used_metric"), the store holds $held"
		note "node 1: $used_metric = $held, peer path to node-2 direct"
	fi
	# a second scrape counts nothing twice
	((($(hcni_metric 1 "$al") - A0[1]) == 3)) || hc_die "allocations changed on a second scrape"
	hcni_metrics 1 | grep -E '^headcni_(ip_|pod_network_setup_duration_seconds_(count|sum)|routes_|ready)' |
		head -n 12 >"$HC_STATE_DIR/tests/metrics-n1.txt"

	# status
	hcni_has_status || hc_die "this headcni has no 'status' subcommand"
	local js j other
	for i in 1 2; do
		other=$((3 - i))
		js=$(hcni_status "$i" --json) || hc_die "headcni status --json failed on node $i"
		printf '%s\n' "$js" >"$HC_STATE_DIR/tests/status-n$i.json"
		hcni_status "$i" >"$HC_STATE_DIR/tests/status-n$i.txt" 2>&1 || true
		# The IPAM line counts what the store holds.
		if [[ "$(hcni_ipam_kind "$i")" == headcni-ipam ]]; then
			local held
			held=$(hcni_ipam "$i" list --json | jq '.allocations | length')
			jq -e --argjson n "$held" '.ipam.plugin == "headcni-ipam" and .ipam.used == $n and .ipam.total > $n' \
				<<<"$js" >/dev/null || hc_die "node $i status: IPAM usage $(jq -c '.ipam' <<<"$js") is not $held in use"
		fi
		# status --json speaks camelCase (snake_case accepted too)
		js=$(jq -c '{backendState: (.backendState // .backend_state), podCidrs: (.podCidrs // .pod_cidrs),
			routes, peers: [.peers[] | {hostname, routes}], problems}' <<<"$js")
		note "node $i status: $(jq -c 'del(.problems)' <<<"$js")"
		jq -e '.backendState == "Running"' <<<"$js" >/dev/null || hc_die "node $i status: backend not Running"
		jq -e --arg c "$(node_pod_cidr "$i")" '.podCidrs == [$c]' <<<"$js" >/dev/null ||
			hc_die "node $i status: pod CIDRs are not [$(node_pod_cidr "$i")]"
		jq -e --arg c "$(node_pod_cidr "$i")" \
			'any(.routes[]; .cidr == $c and .advertised == true and .approved == true)' <<<"$js" >/dev/null ||
			hc_die "node $i status: own route not shown advertised and approved"
		jq -e --arg h "$(node_hostname "$other")" --arg c "$(node_pod_cidr "$other")" \
			'any(.peers[]; .hostname == $h and (.routes | index($c) != null))' <<<"$js" >/dev/null ||
			hc_die "node $i status: peer $(node_hostname "$other") with route $(node_pod_cidr "$other") not shown"
		jq -e --arg c "$(node_pod_cidr "$i")" '[.peers[] | select(.routes | index($c) != null)] | length == 0' \
			<<<"$js" >/dev/null || hc_die "node $i status: a peer is shown with this node's own pod CIDR"
		jq -e '(.problems // []) | length == 0' <<<"$js" >/dev/null ||
			hc_die "node $i status reports problems on a healthy node: $(jq -c '.problems' <<<"$js")"
		grep -q "peer *$(node_hostname "$other").*, direct" "$HC_STATE_DIR/tests/status-n$i.txt" ||
			hc_die "node $i: the text of headcni status names no peer $(node_hostname "$other") with a direct path"
	done
}

# (6b) the path to a peer on the real tailnet, as tailscaled uses it and as headcni reports it
# (`headcni status`, its --json, the agent's headcni_tailnet_peer_path; tailscale's own `status`
# is the reference): direct while pods talk; relayed through Headscale's embedded DERP server
# while node 1 drops every UDP packet to and from node 2's underlay address (in an nft table of
# its own in node 1's namespace; TCP to Headscale and its DERP server stays open), with pod
# traffic still flowing; direct again once the block is gone; idle once the pods are quiet.
t_relay_path() {
	needs_agent
	local peer n2 tbl=test-relay-block holder hst t0 took rtt_direct rtt_relay seen drops derp gap replies sent
	local ping_log=$HC_STATE_DIR/tests/relay-ping seen_file=$HC_STATE_DIR/tests/relay-paths.txt
	local -A first=()
	peer=$(node_hostname 2)
	n2=$(node_addr 2)

	# _observe WANT : the path to node 2 as node 1's four views give it, into $seen_file;
	# remembers when each view first said WANT (seconds since $t0)
	_observe() {
		local want=$1 text json metrics metric=none ts v
		text=$(hcni_status 1 2>&1 | awk -v h="$peer" '$1 == "peer" && $2 == h { print $NF }') || true
		json=$(hcni_status 1 --json 2>/dev/null | jq -r --arg h "$peer" '.peers[] | select(.hostname == $h) | .path') || true
		metrics=$(hcni_metrics 1 2>/dev/null) || true
		for v in direct relay idle; do
			if grep -qxF "headcni_tailnet_peer_path{peer=\"$peer\",path=\"$v\"} 1" <<<"$metrics"; then metric=$v; fi
		done
		# tailscale status: "active; direct ADDR, ...", "active; relay "REGION", ...", "idle, ..."
		ts=$(node_ts 1 status 2>/dev/null | awk -v h="$peer" '$2 == h {
			if ($5 == "active;") print ($6 == "peer-relay" ? "relay" : $6); else { sub(/,.*/, "", $5); print $5 } }') || true
		printf 'tailscale status %s, headcni status %s, status --json %s, /metrics %s\n' \
			"${ts:-none}" "${text:-none}" "${json:-none}" "$metric" >"$seen_file"
		for v in "tailscale status=$ts" "headcni status=$text" "status --json=$json" "/metrics=$metric"; do
			if [[ "${v#*=}" == "$want" && -z "${first[${v%%=*}]:-}" ]]; then first[${v%%=*}]=$(hc_since "$t0"); fi
		done
	}
	_all_say() { # PATH
		_observe "$1"
		[[ "$(<"$seen_file")" == "tailscale status $1, headcni status $1, status --json $1, /metrics $1" ]]
	}
	# _wait_path PATH TIMEOUT WHAT : every view says PATH; notes when each first did
	_wait_path() {
		first=()
		t0=$(hc_now)
		# (hc_wait_for runs _all_say in this shell: `first` keeps what it saw)
		hc_wait_for "$2" "node 1's views of $peer all say $1 ($3)" _all_say "$1" ||
			hc_die "$3: node 1 does not report $peer $1 after $2 s: $(<"$seen_file")"
		took=$(hc_since "$t0")
		note "$3: every view says $1 after $took s (tailscale status ${first[tailscale status]:-?} s," \
			"headcni status ${first[headcni status]:-?} s, --json ${first[status --json]:-?} s, /metrics ${first[/metrics]:-?} s)"
	}
	_unblock() { node_exec 1 nft delete table netdev "$tbl" >/dev/null 2>&1 || true; }
	# whatever happens, the tests after this one find the path free and no pinger running
	trap '_unblock; pinger_stop "$ping_log"' EXIT

	# pods talk all the time: tailscaled keeps a path (and says which) only while traffic flows
	pinger_start "$(pod_where 1 p1)" "$(pod_ip 2 p1)" "$ping_log"
	_wait_path direct 30 "pods talking"
	rtt_direct=$(ping_rtt "$(pod_where 1 p2)" "$(pod_ip 2 p2)")

	# the block: node 1's eth0 drops UDP to and from node 2's underlay address, as it leaves and
	# as it arrives (netdev hooks: a send still succeeds and the packet vanishes, as behind a
	# firewall; dropped on the way out of the stack, tailscaled would see the send fail and give
	# up the path at once). Recorded first, so that teardown removes the table even if this
	# shell dies.
	holder=$(node_ctx_pid 1)
	hst=$(hc_pid_starttime "$holder")
	hc_record nscmd "$holder" "$hst" nft delete table netdev "$tbl"
	node_exec 1 nft -f - <<-NFT
		table netdev $tbl {
			chain in { type filter hook ingress device eth0 priority 0; ip saddr $n2 ip protocol udp counter drop; }
			chain out { type filter hook egress device eth0 priority 0; ip daddr $n2 ip protocol udp counter drop; }
		}
	NFT
	_wait_path relay 60 "UDP to and from $n2 dropped on node 1"
	# pod traffic still flows both ways, through the DERP server
	wait_ping "$(pod_where 1 p2)" "$(pod_ip 2 p2)" 20 || hc_die "n1/p2 cannot reach n2/p2 through the relay"
	wait_ping "$(pod_where 2 p2)" "$(pod_ip 1 p2)" 20 || hc_die "n2/p2 cannot reach n1/p2 through the relay"
	rtt_relay=$(ping_rtt "$(pod_where 1 p2)" "$(pod_ip 2 p2)")
	[[ "$rtt_relay" != - ]] || hc_die "n1/p2 -> n2/p2 lost pings through the relay"
	seen=$(tcp_seen_source "$(pod_where 1 p2)" "$(pod_where 2 p2)" "$(pod_ip 2 p2)" 7401)
	[[ "$seen" == "$(pod_ip 1 p2)" ]] || hc_die "TCP n1/p2 -> n2/p2 through the relay: the receiver saw '$seen'"
	# the direct path was tried and dropped (else the relayed path would prove nothing)
	drops=$(node_exec 1 nft list table netdev "$tbl" |
		awk '{ for (i = 1; i < NF; i++) if ($i == "packets") s += $(i + 1) } END { print s + 0 }')
	((drops > 0)) || hc_die "the block dropped no packet: the direct path was never tried"
	_all_say relay || hc_die "the path changed while the block holds: $(<"$seen_file")"
	derp=$(node_ts_status_json 1 | jq -r --arg h "$peer" '.Peer[] | select(.HostName == $h) | .Relay')
	note "through DERP region '$derp': pods ping both ways (rtt $rtt_relay ms; direct $rtt_direct ms), TCP keeps the pod source; $drops UDP packets dropped"

	_unblock
	_wait_path direct 60 "block removed"
	pinger_stop "$ping_log"
	read -r gap replies sent < <(pinger_gap "$ping_log")
	note "n1/p1 -> n2/p1 every 0.2 s throughout: $replies of $sent answered, longest gap $gap s"

	# quiet pods: tailscaled stops probing node 2's endpoint after its 45 s session timeout and
	# says idle; an idle peer is no relayed one (else the relay-only alert fires on quiet nodes)
	_wait_path idle 120 "pods quiet"
	trap - EXIT
}

# (3b) a stopped agent is found silent; how long that took is reported (BENCHMARKS.md), not
# asserted: the wait only bounds the test
t_silent_agent() {
	needs_agent
	local interval t0 took out=$HC_STATE_DIR/tests/status-silent.txt
	interval=$(hcni_http 2 /status | jq -er '.reportIntervalSecs') || hc_die "node 2's agent announces no report interval"
	hcni_status 2 >"$out" 2>&1 || hc_die "node 2's status reports a problem before the test: $(cat "$out")"
	hcni_agent_stop 2
	t0=$(hc_now)
	_silent() { ! hcni_status 2 >"$out" 2>&1 && grep -q 'the agent is silent' "$out"; }
	hc_wait_for $((4 * interval + 15)) "node 2's status finds its agent silent" _silent ||
		hc_die "node 2's status did not find the stopped agent silent: $(cat "$out")"
	took=$(hc_since "$t0")
	note "agent stopped: headcni status exits 1 with 'the agent is silent' after ${took} s (report interval ${interval} s; twice that is the design)"
	grep -q 'agent        SILENT' "$out" || hc_die "the status screen does not show the agent SILENT: $(cat "$out")"
	hcni_agent_start 2
	hc_wait_daemon 60 "$(hcni_agent_label 2)" "agent n2 ready again" hcni_ready 2 || hc_die "agent n2 not ready after restart"
	hc_wait_for 20 "node 2's status all good again" hcni_status 2 || hc_die "node 2's status still reports a problem"
}

# (4) route lifecycle with a joining and leaving node, both approval paths.
t_route_lifecycle() {
	needs_agent
	local before after t0 t_adv t_appr t_route t_reach n
	# A route node 2 advertises besides its pod CIDR, left unapproved: bait
	# for an agent that approves more than its own routes.
	local bait=10.250.2.0/24
	node_ts 2 set --advertise-routes "$(node_pod_cidr 2),$bait" >/dev/null
	hc_wait_for 15 "node-2 advertises the bait route" hs_rest_has_available node-2 "$bait" ||
		hc_die "node-2 does not advertise $bait"

	_join() { # N MODE : node N joins; measures; checks the others untouched
		local n=$1 mode=$2 cidr ip
		cidr=$(node_pod_cidr "$n")
		before=$(hs_rest_approved_all)
		topo_node_add "$n"
		hcni_install "$n"
		t0=$(hc_now)
		node_tailscaled_start "$n"
		hcni_agent_start "$n" "$mode"
		hc_wait_daemon 30 "$(hcni_agent_label "$n")" "node-$n advertises $cidr" hs_rest_has_available "node-$n" "$cidr" ||
			hc_die "node-$n does not advertise $cidr"
		t_adv=$(hc_since "$t0")
		hc_wait_daemon 30 "$(hcni_agent_label "$n")" "node-$n's $cidr approved" hs_rest_has_approved "node-$n" "$cidr" ||
			hc_die "node-$n's $cidr was not approved ($mode)"
		t_appr=$(hc_since "$t0")
		hc_wait_for 30 "$cidr routed on nodes 1 and 2" routes_everywhere 1 2 "$n" ||
			hc_die "$cidr is not in the table 52 of nodes 1 and 2 (or theirs not in node $n's)"
		t_route=$(hc_since "$t0")
		hc_wait_daemon 30 "$(hcni_agent_label "$n")" "agent n$n ready" hcni_ready "$n" || hc_die "agent n$n not ready"
		ip=$(pod_add "$n" p1) || hc_die "ADD on node $n failed"
		wait_ping "$(pod_where 1 p1)" "$ip" 20 || hc_die "n1/p1 cannot reach the pod $ip on node $n"
		wait_ping "$(pod_where "$n" p1)" "$(pod_ip 2 p1)" 20 || hc_die "the pod on node $n cannot reach n2/p1"
		t_reach=$(hc_since "$t0")
		note "node-$n ($mode): advertised after $t_adv s, approved $t_appr s, in peers' table 52 $t_route s, pod reachable $t_reach s (from tailscaled start)"
		after=$(hs_rest_approved_all)
		local others_before others_after
		others_before=$(grep -v "^node-$n=" <<<"$before" || true)
		others_after=$(grep -v "^node-$n=" <<<"$after" || true)
		[[ "$others_before" == "$others_after" ]] ||
			hc_die "approving node-$n changed other nodes' approved routes: before [$others_before] after [$others_after]"
		[[ "$(hs_rest_approved "node-$n")" == "$cidr" ]] ||
			hc_die "node-$n's approved routes are [$(hs_rest_approved "node-$n")], expected exactly $cidr"
		! hs_rest_has_approved node-2 "$bait" || hc_die "node-$n's join approved node-2's $bait"
		note "other nodes' approvedRoutes unchanged: $(tr '\n' ' ' <<<"$others_after"); $bait of node-2 still pending"
	}
	_leave() { # N : the node leaves: agent --cleanup, tailscaled stops
		local n=$1 cidr ip
		cidr=$(node_pod_cidr "$n")
		ip=$(pod_ip "$n" p1)
		t0=$(hc_now)
		hcni_agent_stop "$n"
		hcni_agent_cleanup "$n" || hc_die "headcni agent --cleanup failed on node $n (logs/cleanup-n$n.log)"
		hc_wait_for 20 "node-$n withdraws $cidr" eval "! hs_rest_has_available node-$n $cidr" ||
			hc_die "node-$n still advertises $cidr after --cleanup"
		node_tailscaled_stop "$n"
		_gone() { ! node_route_in_table52 1 "$cidr" && ! node_route_in_table52 2 "$cidr"; }
		hc_wait_for 30 "$cidr gone from nodes 1 and 2" _gone || hc_die "$cidr still routed after node $n left"
		! ping_ok "$(pod_where 1 p1)" "$ip" 1 || hc_die "the pod $ip on the departed node $n still answers"
		note "node-$n left (agent --cleanup, tailscaled stopped): $cidr gone from the peers after $(hc_since "$t0") s"
		hs_cli nodes delete --identifier "$(hs_node_id "node-$n")" --force >/dev/null 2>&1 || true
	}

	hs_set_autoapprove 0
	_join 3 api
	_leave 3
	hs_set_autoapprove 1
	_join 4 auto
	_leave 4
	# the bait goes again; node 2's pod CIDR stays
	node_ts 2 set --advertise-routes "$(node_pod_cidr 2)" >/dev/null
	hs_rest_has_approved node-2 "$(node_pod_cidr 2)" || hc_die "node-2 lost its approval"
	pods_mesh 10 || hc_die "nodes 1 and 2 lost each other during the lifecycle test"
}

# (5) restarts of the agent, tailscaled and headscale under traffic.
t_restarts() {
	local i p before after ip2
	before=$(for i in 1 2; do for p in p1 p2; do printf '%s/%s=%s ' "$i" "$p" "$(pod_addr_now "$i" "$p")"; done; done)
	_direct_to() { # I J : node I's tailscaled talks to node J over a direct path
		node_ts "$1" status 2>/dev/null | awk -v h="$(node_hostname "$2")" '$2 == h && /; direct /' | grep -q .
	}
	_direct_both() { _direct_to 1 2 && _direct_to 2 1; }
	_under_traffic() { # NAME MAX_GAP_S CMD... : restart while pods ping both ways
		local name=$1 maxgap=$2 t0 f1=$HC_STATE_DIR/tests/ping-$1-a f2=$HC_STATE_DIR/tests/ping-$1-b
		shift 2
		pods_mesh 20 || hc_die "no connectivity before the $name restart"
		pinger_start "$(pod_where 1 p1)" "$(pod_ip 2 p1)" "$f1"
		pinger_start "$(pod_where 2 p2)" "$(pod_ip 1 p2)" "$f2"
		sleep 1
		t0=$(hc_now)
		"$@"
		local took
		took=$(hc_since "$t0")
		pods_mesh 90 || {
			pinger_stop "$f1"
			pinger_stop "$f2"
			hc_die "pod traffic did not come back after the $name restart"
		}
		local back
		back=$(hc_since "$t0")
		sleep 1
		pinger_stop "$f1"
		pinger_stop "$f2"
		read -r g1 ok1 n1 < <(pinger_gap "$f1")
		read -r g2 ok2 n2 < <(pinger_gap "$f2")
		note "$name restart: done in ${took} s, both directions answer ${back} s after it began; longest gap n1->n2 ${g1} s ($ok1/$n1 replies), n2->n1 ${g2} s ($ok2/$n2)"
		if [[ -n "$maxgap" ]]; then
			awk -v a="$g1" -v b="$g2" -v m="$maxgap" 'BEGIN { exit !(a <= m && b <= m) }' ||
				hc_die "pod traffic stalled for more than ${maxgap} s during the $name restart"
		fi
	}
	_restart_agent() {
		hcni_agent_stop 1
		hcni_agent_start 1
		hc_wait_daemon 60 "$(hcni_agent_label 1)" "agent n1 ready again" hcni_ready 1 || hc_die "agent n1 not ready after restart"
	}
	_restart_tailscaled() {
		node_tailscaled_restart 1
		_running() { [[ "$(node_ts_backend_state 1)" == Running ]]; }
		hc_wait_for 60 "node 1 Running again" _running || hc_die "tailscaled n1 not Running after restart"
	}
	_restart_headscale() {
		# The data plane does not need Headscale where nodes talk directly; relayed traffic
		# goes through the DERP server Headscale embeds. Right after the tailscaled restart the
		# nodes may still relay while they find the direct path again: wait for it first.
		hc_wait_for 60 "a direct path between node 1 and node 2, both ways" _direct_both ||
			hc_die "no direct path between the nodes before the Headscale restart"
		hs_restart
		hc_wait_for 60 "all nodes online in headscale again" hs_all_online 2 ||
			hc_die "nodes did not reconnect to headscale after its restart"
	}
	if [[ "$HC_JOIN" == agent ]]; then
		_under_traffic agent 2 _restart_agent
	else
		note "agent restart skipped (HC_JOIN=cli)"
	fi
	_under_traffic tailscaled "" _restart_tailscaled
	_under_traffic headscale 3 _restart_headscale
	if [[ "$HC_JOIN" == agent ]]; then
		for i in 1 2; do
			hc_wait_for 60 "agent n$i ready" hcni_ready "$i" || hc_die "agent n$i not ready after the restarts"
		done
	fi
	# the control plane works again: a new pod on node 2 is reachable from node 1
	ip2=$(pod_add 2 r1) || hc_die "ADD after the restarts failed"
	wait_ping "$(pod_where 1 p1)" "$ip2" 20 || hc_die "a pod added after the restarts is unreachable"
	pod_del 2 r1
	after=$(for i in 1 2; do for p in p1 p2; do printf '%s/%s=%s ' "$i" "$p" "$(pod_addr_now "$i" "$p")"; done; done)
	[[ "$before" == "$after" ]] || hc_die "pod addresses changed: before [$before] after [$after]"
	for i in 1 2; do
		for p in p1 p2; do
			hcni_ipam_holds "$i" "$(pod_ip "$i" "$p")" || hc_die "$(hcni_ipam_kind "$i") lost the record of n$i/$p"
		done
	done
	note "pod addresses unchanged and still held by $(hcni_ipam_kind 1): $after"
}

tr_run "${WANT[@]}"
rc=0
tr_summary "tests.sh: prefix $HC_PREFIX, join $HC_JOIN, IPAM $HC_IPAM, setup ${SETUP_S} s" || rc=1

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	cat <<EOF

Left running (--keep). Look around:
  nsenter -t $(node_ctx_pid 1) -n -m -- bash                     # a shell on node 1
  nsenter -t $(node_ctx_pid 1) -n -m -- ip netns exec pod-p1 ip addr   # pod p1 on node 1
  nsenter -t $(node_ctx_pid 1) -n -m -- $HC_BIN status
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
fi
tr_finish "$rc" tests.sh
exit "$TR_RC"
