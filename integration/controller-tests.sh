#!/usr/bin/env bash
# integration/controller-tests.sh: route approval by `headcni controller` on a real Kubernetes,
# with real Headscale (https, the run's private CA) and tailscaled (see integration/README.md).
#
# Setup: the cluster of kube-tests.sh (Kubernetes v1.37.2, 2 nodes, CoreDNS), but HeadCNI is
# first installed with the PREVIOUS chart (git commit $PREV_CHART_COMMIT: the API key on every
# agent, each agent approving its own route). Then, in order:
#
#   upgrade           `helm upgrade` to this chart: the controller takes over; no approval is
#                     ever missing while it rolls, and at the end no agent pod has the API key
#                     (spec, volumes, env) and no node holds it but where a controller runs
#   identity          each Node carries its node's node key (as tailscaled and Headscale know it)
#                     and the controller's "approved" status; the controller holds the Lease
#   chart_no_key      `helm template` with an API key: nothing of the DaemonSet names the key
#   admission         node 1's agent token: publishing on node 2's Node, changing a label, another
#                     annotation or a malformed key on its own Node are refused by the API
#                     server; a token without a node claim is refused; the controller's
#                     token may not change a label
#   spoofed_routes    node 1 advertises node 2's pod CIDR and default routes: never approved
#   duplicate_claim   node 1's agent token publishes node 2's key on node 1's Node: node 2 keeps
#                     exactly its route, node 1 gains nothing (loses its own until it republishes)
#   unbound           a tailnet node without a Kubernetes Node (the control-plane host) with a
#                     pod-space route approved by hand: left alone
#   latency           from an agent publishing its identity to its route approved: 10 times
#   leader_kill       the leading replica killed (SIGKILL): another takes the Lease and approves
#                     a new binding (the time is reported: the design bound is lease 10 s plus
#                     two retry periods, 13 s, see BENCHMARKS.md)
#   headscale_down    Headscale stopped for 60 s while a binding is pending: nothing withdrawn,
#                     caught up after it returns
#   apiserver_restart the API server down 10 s (the leader loses its Lease): nothing withdrawn,
#                     a leader again, new bindings approved
#
# usage: integration/controller-tests.sh [--prefix P] [--keep] [--list] [TEST...]
# env: HC_KEEP_STATE=1 (keep logs), HEADCNI_MUSL_BIN (use this static binary, no build),
#      CONTROLLER_LATENCY_RUNS (default 10)
# shellcheck disable=SC2317 # test functions and helpers are called by name
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ALL_TESTS=(upgrade identity chart_no_key admission spoofed_routes duplicate_claim unbound latency
	leader_kill headscale_down apiserver_restart)
# shellcheck source=lib/args.sh
source "$here/lib/args.sh"
declare -a WANT=()
tr_parse_args "$@"
# Every other test runs on the controller that the upgrade installs.
[[ " ${WANT[*]} " == *" upgrade "* ]] || WANT=(upgrade "${WANT[@]}")

export HC_PREFIX=${HC_PREFIX:-hcx}
export HC_NODES=2
export HC_HS_AUTOAPPROVE=0
# A chart from before the controller: the API key on the agents. The agents run this tree's
# image under it, so it must pass only flags this binary knows: the commit before the staged
# conflist, whose agent flags were renamed (--cni-conf-dir, --cni-bin-dir) before any release.
PREV_CHART_COMMIT=ee090a9
# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/kube.sh
source "$here/lib/kube.sh"
# shellcheck source=lib/testing.sh
source "$here/lib/testing.sh"

hc_require_root

# --- helpers ------------------------------------------------------------------------

CTL=$KUBE_HC_RELEASE-controller
KEY_ANN=headcni.io/node-key
STATUS_ANN=headcni.io/route-approval

hs_rest_nodes() { hs_api "$HC_STATE_DIR/apikey" GET node; }
# hs_approved_of HOSTNAME : its approved routes, sorted, comma separated
hs_approved_of() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.approvedRoutes // [])[]] | sort | join(",")'
}
hs_available_of() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.availableRoutes // [])[]] | sort | join(",")'
}
hs_key_of() { hs_rest_nodes | jq -r --arg h "$1" '.nodes[] | select(.givenName==$h or .name==$h) | .nodeKey'; }
approved_is() { [[ "$(hs_approved_of "$1")" == "$2" ]]; } # HOSTNAME EXACT-LIST
node_ann() { kubectl get node "node-$1" -o json | jq -r --arg k "$2" '.metadata.annotations[$k] // empty'; }
ts_key() { node_ts_status_json "$1" | jq -r '.Self.PublicKey'; }

# The agent's and the controller's processes, found through the node's CRI (the harness's own
# cluster: nothing outside the run is touched). A stopped agent is resumed when the test ends.
_container_pid() { # NODE-INDEX POD-NAME CONTAINER
	local id
	id=$(node_crictl "$1" ps --label "io.kubernetes.pod.name=$2" --name "^$3\$" -q | head -n1)
	[[ -n "$id" ]] || return 1
	node_crictl "$1" inspect "$id" | jq -r '.info.pid'
}
agent_pid() { _container_pid "$1" "$(kube_agent_pod "$1")" agent; }
agent_stop() { kill -STOP "$(agent_pid "$1")"; }
agent_cont() { kill -CONT "$(agent_pid "$1")" 2>/dev/null || true; }

leader_identity() { kubectl -n "$KUBE_HC_NS" get lease "$CTL" -o jsonpath='{.spec.holderIdentity}'; }
leader_pod() { local id; id=$(leader_identity); printf '%s\n' "${id%_*}"; }
pod_node_index() { local n; n=$(kubectl -n "$KUBE_HC_NS" get pod "$1" -o jsonpath='{.spec.nodeName}'); printf '%s\n' "${n#node-}"; }

# pod_metric POD NAME-WITH-LABELS : the value on one controller pod (scraped from its node).
pod_metric() {
	local i ip
	i=$(pod_node_index "$1")
	ip=$(kubectl -n "$KUBE_HC_NS" get pod "$1" -o jsonpath='{.status.podIP}')
	node_exec "$i" curl -fsS --max-time 3 "http://$ip:9090/metrics" | awk -v m="$2" '$1 == m {print $2}'
}

# ctl_metric NAME-WITH-LABELS : the value on the leader.
ctl_metric() { pod_metric "$(leader_pod)" "$1"; }

# ctl_metric_all NAME-WITH-LABELS : the sum over every controller replica, for what any leader
# may have done: leadership can move (across an API server restart, either replica may win the
# Lease), and each process counts only its own.
ctl_metric_all() {
	local pod v sum=0
	for pod in $(kubectl -n "$KUBE_HC_NS" get pods -o jsonpath='{.items[*].metadata.name}' \
		-l "app.kubernetes.io/instance=$KUBE_HC_RELEASE,app.kubernetes.io/component=controller"); do
		v=$(pod_metric "$pod" "$1") || return 1
		sum=$(awk -v a="$sum" -v b="${v:-0}" 'BEGIN { print a + b }')
	done
	printf '%s\n' "$sum"
}

# A copy (0600, in the state dir) of the agent's token as the kubelet wrote it on node I: the
# projected volume is a mount in the node's mount namespace, read from there. The token never
# appears on a command line.
_agent_token_file() {
	local uid f
	uid=$(kubectl -n "$KUBE_HC_NS" get pod "$(kube_agent_pod "$1")" -o jsonpath='{.metadata.uid}')
	f=$(mktemp "$HC_STATE_DIR/tests/agent-token.XXXXXX")
	node_exec "$1" cat "$(kube_node_dir "$1")/root/pods/$uid/volumes/kubernetes.io~projected/kube-api-access/token" >"$f" ||
		hc_die "node $1: the agent's token is not where the kubelet puts it"
	printf '%s\n' "$f"
}
# kubeconfig_for TOKEN-FILE : a kubeconfig (0600, in the state dir) using that token file
kubeconfig_for() {
	local f
	f=$(mktemp "$HC_STATE_DIR/tests/kubeconfig.XXXXXX")
	cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "$(kube_api_url)", certificate-authority: "$KUBE_PKI/ca.crt"}}]
users: [{name: u, user: {tokenFile: "$1"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
EOF
	printf '%s\n' "$f"
}
# as_token TOKEN-FILE KUBECTL-ARGS... : kubectl with that token
as_token() {
	local kc tok=$1
	shift
	kc=$(kubeconfig_for "$tok")
	ip netns exec "$(node_ns "$KUBE_CP")" "$KUBE_BIN_DIR/kubectl" --kubeconfig "$kc" "$@"
}
# a token of a ServiceAccount with no pod (so no node claim), in a 0600 file
sa_token_file() {
	local f
	f=$(mktemp "$HC_STATE_DIR/tests/token.XXXXXX")
	kubectl -n "$KUBE_HC_NS" create token "$1" --duration=10m >"$f"
	printf '%s\n' "$f"
}

# unpublish_and_wait I : with node I's agent stopped, remove its annotation (as the admin) and
# wait until the controller withdrew its route. The caller resumes the agent.
unpublish_and_wait() {
	local i=$1 cidr
	cidr=$(kube_node_pod_cidr "$i")
	agent_stop "$i"
	kubectl annotate node "node-$i" "$KEY_ANN-" >/dev/null
	hc_wait_for 30 "node-$i's approval withdrawn" approved_is "node-$i" "" ||
		hc_die "node-$i: the controller did not withdraw $cidr after its identity was removed (approved: $(hs_approved_of "node-$i"))"
}

# watch_rebind I OUT : resumes node I's agent and records when its annotation is back (t_pub)
# and when its pod CIDR is approved (t_app), polling both; prints "t_cont t_pub t_app".
rebind_times() {
	local i=$1 cidr t_cont t_pub="" t_app="" deadline
	cidr=$(kube_node_pod_cidr "$i")
	t_cont=$(hc_now)
	agent_cont "$i"
	deadline=$(($(date +%s) + ${2:-30}))
	while [[ -z "$t_app" ]] && (($(date +%s) < deadline)); do
		if [[ -z "$t_pub" && -n "$(node_ann "$i" "$KEY_ANN")" ]]; then t_pub=$(hc_now); fi
		if approved_is "node-$i" "$cidr"; then
			t_app=$(hc_now)
			[[ -n "$t_pub" ]] || t_pub=$t_app
		fi
		sleep 0.05
	done
	[[ -n "$t_app" ]] || return 1
	printf '%s %s %s\n' "$t_cont" "$t_pub" "$t_app"
}

status_is() { [[ "$(node_ann "$1" "$STATUS_ANN" | jq -r '.state // empty' 2>/dev/null)" == "$2" ]]; } # I STATE
lease_fresh() { # the Lease renewed within the last 5 s
	kubectl -n "$KUBE_HC_NS" get lease "$CTL" -o json |
		jq -e '(.spec.renewTime | sub("\\.[0-9]+Z$"; "Z") | fromdate) > (now - 5)' >/dev/null
}

stats() { # values on stdin -> "median X s, p90 Y s, min, max (n)"
	sort -n | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; p=v[int(0.9*NR+0.999)];
		printf "median %.2f s, p90 %.2f s, min %.2f s, max %.2f s (n=%d)", m, p, v[1], v[NR], NR}'
}

all_approved() { # every node's pod CIDR approved, and only it
	local i
	for ((i = 1; i <= HC_NODES; i++)); do
		approved_is "node-$i" "$(kube_node_pod_cidr "$i")" || return 1
	done
}

# --- setup: the previous chart --------------------------------------------------------

KUBE_HC_CHART_COMMIT=$PREV_CHART_COMMIT kube_harness_up
PREV_SETUP_S=$KUBE_SETUP_S
hc_wait_for 60 "every route approved by the agents (previous chart)" all_approved ||
	hc_die "the previous chart's agents did not approve their routes"

# --- tests ----------------------------------------------------------------------------

t_upgrade() {
	local gaps=$HC_STATE_DIR/tests/upgrade.gaps t0 i pod apikey f bad_nodes=""
	: >"$gaps"
	# Watch every approval while the release is upgraded: any moment one is missing is a gap.
	(
		while [[ ! -e "$HC_STATE_DIR/tests/upgrade.stop" ]]; do
			all_approved || printf '%s\n' "$(hc_now)" >>"$gaps"
			sleep 0.2
		done
	) &
	local watcher=$!
	t0=$(hc_now)
	helm upgrade "$KUBE_HC_RELEASE" "$HC_REPO_DIR/chart" -n "$KUBE_HC_NS" \
		-f "$KUBE_DIR/headcni-values.yaml" --set config.headscale.url="$HC_HS_URL" \
		--set config.headscale.existingSecret="$KUBE_HC_RELEASE-headscale-keys" \
		--set config.headscale.existingSecretKeys.apiKey=apiKey \
		--set config.network.clusterCIDR="$HC_CLUSTER_CIDR" \
		--wait --timeout 5m >>"$HC_STATE_DIR/logs/helm.log" 2>&1 || hc_die "helm upgrade to this chart failed"
	kube_headcni_rollout_wait 180 || hc_die "the DaemonSet did not roll out"
	kube_controller_rollout_wait 120 || hc_die "the controller did not roll out"
	hc_wait_for 60 "every Node carries its identity" identities_published || hc_die "the agents did not publish their identities"
	sleep 5
	touch "$HC_STATE_DIR/tests/upgrade.stop"
	wait "$watcher" || true
	[[ ! -s "$gaps" ]] || hc_die "an approval was missing $(wc -l <"$gaps") times (0.2 s polls) during the upgrade"
	all_approved || hc_die "after the upgrade: approvals are $(hs_approved_of node-1) / $(hs_approved_of node-2)"
	# No agent pod has the key: not in the spec (volumes, env), not on its node.
	local ds
	ds=$(kubectl -n "$KUBE_HC_NS" get ds "$KUBE_HC_RELEASE" -o json)
	jq -e '[.. | objects | select(has("key")) | .key] | index("apiKey") == null' <<<"$ds" >/dev/null ||
		hc_die "the DaemonSet still maps the Secret's apiKey"
	! grep -qi 'api-key' <<<"$ds" || hc_die "the DaemonSet still names an api-key"
	for pod in $(kubectl -n "$KUBE_HC_NS" get pods -l app.kubernetes.io/component=agent -o name); do
		! kubectl -n "$KUBE_HC_NS" get "$pod" -o json | grep -qi 'apiKey\|api-key' || hc_die "$pod references the API key"
	done
	apikey=$(<"$HC_STATE_DIR/apikey")
	for ((i = 1; i <= HC_NODES; i++)); do
		# every file under the node's kubelet pod volumes holding the key's value
		while IFS= read -r f; do
			[[ -n "$f" ]] || continue
			pod=$(kubectl -n "$KUBE_HC_NS" get pods -o json |
				jq -r --arg u "$(sed -E 's#.*/pods/([^/]+)/.*#\1#' <<<"$f")" '.items[] | select(.metadata.uid==$u) | .metadata.name')
			[[ "$pod" == "$CTL"-* ]] || bad_nodes+=" node-$i:$f(${pod:-gone pod})"
		done < <(grep -rlsF -- "$apikey" "$(kube_node_dir "$i")/root/pods" 2>/dev/null || true)
	done
	unset apikey
	[[ -z "$bad_nodes" ]] || hc_die "the API key is on a node outside a controller pod:$bad_nodes"
	note "helm upgrade from the chart of $PREV_CHART_COMMIT ($(hc_since "$t0") s, previous setup ${PREV_SETUP_S} s): no approval missing in 0.2 s polls; no agent pod or node holds the API key (only the controller pods' volumes, on the nodes running them)"
}
identities_published() {
	local i
	for ((i = 1; i <= HC_NODES; i++)); do [[ -n "$(node_ann "$i" "$KEY_ANN")" ]] || return 1; done
}

t_identity() {
	local i k hk ts st
	for ((i = 1; i <= HC_NODES; i++)); do
		k=$(node_ann "$i" "$KEY_ANN")
		ts=$(ts_key "$i")
		hk=$(hs_key_of "node-$i")
		[[ -n "$k" && "$k" == "$ts" && "$k" == "$hk" ]] ||
			hc_die "node-$i: annotation '$k', tailscaled '$ts', Headscale '$hk'"
		hc_wait_for 30 "node-$i's status approved" status_is "$i" approved ||
			hc_die "node-$i: controller status is $(node_ann "$i" "$STATUS_ANN")"
		st=$(node_ann "$i" "$STATUS_ANN")
		note "node-$i: $KEY_ANN=${k:0:20}... = tailscaled's = Headscale's; status $st"
	done
	[[ "$(leader_pod)" == "$CTL"-* ]] || hc_die "no controller holds the Lease (holder '$(leader_identity)')"
	note "Lease $CTL held by $(leader_identity); $(kubectl -n "$KUBE_HC_NS" get deploy "$CTL" -o jsonpath='{.status.readyReplicas}') replicas ready"
}

t_chart_no_key() {
	local out ds
	out=$(helm template t "$HC_REPO_DIR/chart" -n kube-system --set config.headscale.url=https://hs.example \
		--set config.headscale.authKey=hskey-auth-visible --set config.headscale.apiKey=hskey-api-secret)
	ds=$(awk 'BEGIN{RS="\n---"} /\nkind: DaemonSet/' <<<"$out")
	[[ -n "$ds" ]] || hc_die "no DaemonSet rendered"
	! grep -qiE 'apiKey|api-key|hskey-api' <<<"$ds" || hc_die "the DaemonSet names the API key: $(grep -iE 'apiKey|api-key|hskey-api' <<<"$ds")"
	grep -q 'path: auth-key' <<<"$ds" || hc_die "the DaemonSet lost the pre-auth key"
	local dep
	dep=$(awk 'BEGIN{RS="\n---"} /\nkind: Deployment/' <<<"$out")
	grep -q 'key: apiKey' <<<"$dep" || hc_die "the controller does not mount the API key"
	# The chart's own Secret carries it base64-encoded; the plain value appears nowhere.
	! grep -q 'hskey-api-secret' <<<"$out" || hc_die "the key's plain value appears in the rendered manifests"
	note "helm template with an API key: the DaemonSet mounts the pre-auth key only; the controller Deployment alone maps apiKey"
}

t_admission() {
	local tok1 out kc_sa
	tok1=$(_agent_token_file 1)
	node_exec 1 test -s "$tok1" || hc_die "no projected token of node 1's agent at $tok1"
	# node 1's token may publish on node 1 (its own key again: no change)
	out=$(as_token "$tok1" annotate --overwrite node node-1 "$KEY_ANN=$(node_ann 1 "$KEY_ANN")" 2>&1) ||
		hc_die "node 1's agent token may not annotate its own Node: $out"
	# ...and nothing else
	out=$(as_token "$tok1" annotate --overwrite node node-2 "$KEY_ANN=$(node_ann 1 "$KEY_ANN")" 2>&1) &&
		hc_die "node 1's agent token published an identity on node-2's Node"
	grep -q "only on its own Node" <<<"$out" || hc_die "refused, but not by the policy: $out"
	note "node 1's token on node-2's Node: refused ($(grep -o 'an agent may publish[^"]*' <<<"$out" | head -n1))"
	out=$(as_token "$tok1" label --overwrite node node-1 evil=1 2>&1) && hc_die "node 1's agent token changed a label"
	grep -q "labels" <<<"$out" || hc_die "label refused, but not by the policy: $out"
	out=$(as_token "$tok1" annotate --overwrite node node-1 other=1 2>&1) && hc_die "node 1's agent token set another annotation"
	out=$(as_token "$tok1" annotate --overwrite node node-1 "$STATUS_ANN={\"state\":\"approved\"}" 2>&1) &&
		hc_die "node 1's agent token forged the controller's status"
	out=$(as_token "$tok1" annotate --overwrite node node-1 "$KEY_ANN=nodekey:xyz" 2>&1) && hc_die "a malformed key was accepted"
	grep -q "64 lowercase hex" <<<"$out" || hc_die "malformed key refused, but not by the policy: $out"
	out=$(as_token "$tok1" patch node node-1 --type=merge -p '{"spec":{"unschedulable":true}}' 2>&1) &&
		hc_die "node 1's agent token changed the spec"
	out=$(as_token "$tok1" delete node node-2 --wait=false 2>&1) && hc_die "node 1's agent token deleted a Node"
	# a token of the agent's ServiceAccount that is bound to no pod: no node claim
	kc_sa=$(sa_token_file "$KUBE_HC_RELEASE")
	out=$(as_token "$kc_sa" annotate --overwrite node node-1 "$KEY_ANN=$(node_ann 1 "$KEY_ANN")" 2>&1) &&
		hc_die "a token without a node claim published an identity"
	grep -q "claim is missing" <<<"$out" || hc_die "refused, but not for the missing claim: $out"
	# the controller's ServiceAccount: its status annotation only
	kc_sa=$(sa_token_file "$CTL")
	out=$(as_token "$kc_sa" label --overwrite node node-1 evil=1 2>&1) && hc_die "the controller's token changed a label"
	out=$(as_token "$kc_sa" annotate --overwrite node node-1 "$KEY_ANN=$(node_ann 2 "$KEY_ANN")" 2>&1) &&
		hc_die "the controller's token published an identity"
	rm -f "$HC_STATE_DIR"/tests/token.* "$HC_STATE_DIR"/tests/kubeconfig.*
	note "refused by the API server: node 1's token on node-2, a label, another annotation, the controller's status, a malformed key, the spec, a delete; a token without node claim; the controller's token on a label or the identity"
}

t_spoofed_routes() {
	local c1 c2 avail
	c1=$(kube_node_pod_cidr 1)
	c2=$(kube_node_pod_cidr 2)
	# shellcheck disable=SC2064 # c1 expanded now: the trap runs after this function's locals are gone
	trap "node_ts 1 set --advertise-routes='$c1' >/dev/null 2>&1 || true" EXIT
	node_ts 1 set --advertise-routes="$c1,$c2,0.0.0.0/0,::/0" >/dev/null
	hc_wait_for 20 "Headscale sees node-1 advertise $c2" _avail_has node-1 "$c2" ||
		hc_die "node-1's spoofed routes never reached Headscale"
	avail=$(hs_available_of node-1)
	# wake the controller (a Node event) and give it two passes
	kubectl annotate --overwrite node node-1 headcni-test/poke="$(date +%s%N)" >/dev/null
	sleep 3
	kubectl annotate --overwrite node node-2 headcni-test/poke="$(date +%s%N)" >/dev/null
	sleep 3
	approved_is node-1 "$c1" || hc_die "node-1 advertises $avail; approved: $(hs_approved_of node-1)"
	approved_is node-2 "$c2" || hc_die "node-2's approval changed: $(hs_approved_of node-2)"
	kubectl annotate node node-1 node-2 headcni-test/poke- >/dev/null
	node_ts 1 set --advertise-routes="$c1" >/dev/null
	trap - EXIT
	note "node-1 advertises $avail: approved only $c1; node-2 keeps $c2"
}
_avail_has() { [[ ",$(hs_available_of "$1")," == *",$2,"* ]]; }

t_duplicate_claim() {
	local tok1 c1 c2 k2 t
	c1=$(kube_node_pod_cidr 1)
	c2=$(kube_node_pod_cidr 2)
	k2=$(node_ann 2 "$KEY_ANN")
	tok1=$(_agent_token_file 1)
	trap 'agent_cont 1' EXIT
	agent_stop 1
	# A compromised node 1 publishes node 2's key on its own Node: the API server allows it.
	as_token "$tok1" annotate --overwrite node node-1 "$KEY_ANN=$k2" >/dev/null ||
		hc_die "node 1's token could not write its own Node"
	hc_wait_for 20 "node-1's tailnet node unapproved" approved_is node-1 "" ||
		hc_die "node-1 still approved: $(hs_approved_of node-1)"
	sleep 2
	approved_is node-2 "$c2" || hc_die "node-2's approval changed under a duplicate claim: $(hs_approved_of node-2)"
	node_ann 1 "$STATUS_ANN" | grep -q "published the same node key" ||
		hc_die "node-1's status does not name the duplicate claim: $(node_ann 1 "$STATUS_ANN")"
	local dup
	dup=$(ctl_metric 'headcni_controller_mismatches{reason="duplicate_claim"}')
	[[ "${dup:-0}" -ge 1 ]] || hc_die "headcni_controller_mismatches{reason=\"duplicate_claim\"} is '${dup}'"
	rm -f "$HC_STATE_DIR"/tests/kubeconfig.*
	t=$(rebind_times 1 30) || hc_die "node-1 did not get its route back after its agent resumed"
	read -r tc tp ta <<<"$t"
	trap - EXIT
	note "node-1 claiming node-2's key: node-2 kept exactly $c2, node-1 lost $c1 (self-harm only) and gained nothing; mismatch metric $dup"
	note "node-1's agent resumed: own key republished $(awk -v a="$tc" -v b="$tp" 'BEGIN{printf "%.2f", b-a}') s later, $c1 approved $(awk -v a="$tp" -v b="$ta" 'BEGIN{printf "%.2f", b-a}') s after that"
}

t_unbound() {
	local id r=10.244.250.0/24 before after
	trap 'node_ts "$KUBE_CP" set --advertise-routes= >/dev/null 2>&1 || true' EXIT
	node_ts "$KUBE_CP" set --advertise-routes="$r" >/dev/null
	hc_wait_for 20 "control-plane advertises $r" _avail_has control-plane "$r" || hc_die "no route from the control plane"
	id=$(hs_rest_nodes | jq -r '.nodes[] | select(.givenName=="control-plane") | .id')
	hs_api "$HC_STATE_DIR/apikey" POST "node/$id/approve_routes" "{\"routes\":[\"$r\"]}" >/dev/null
	before=$(hs_approved_of control-plane)
	kubectl annotate --overwrite node node-1 headcni-test/poke="$(date +%s%N)" >/dev/null
	sleep 5
	kubectl annotate node node-1 headcni-test/poke- >/dev/null
	sleep 3
	after=$(hs_approved_of control-plane)
	[[ "$before" == "$r" && "$after" == "$r" ]] || hc_die "the control-plane's approval changed: '$before' -> '$after'"
	hs_api "$HC_STATE_DIR/apikey" POST "node/$id/approve_routes" '{"routes":[]}' >/dev/null
	note "tailnet node control-plane (no Kubernetes Node), $r approved by hand inside the pod space: left alone over two passes"
}

t_latency() {
	local n=${CONTROLLER_LATENCY_RUNS:-10} k t tc tp ta
	local -a pub=() cont=()
	trap 'agent_cont 2' EXIT
	for ((k = 1; k <= n; k++)); do
		unpublish_and_wait 2
		t=$(rebind_times 2 30) || hc_die "run $k: node-2's route not approved 30 s after its agent resumed"
		read -r tc tp ta <<<"$t"
		pub+=("$(awk -v a="$tp" -v b="$ta" 'BEGIN{printf "%.3f", b-a}')")
		cont+=("$(awk -v a="$tc" -v b="$ta" 'BEGIN{printf "%.3f", b-a}')")
	done
	trap - EXIT
	note "identity published -> route approved in Headscale: $(printf '%s\n' "${pub[@]}" | stats)"
	note "agent resumed (re-publishes at once) -> approved: $(printf '%s\n' "${cont[@]}" | stats)"
}

t_leader_kill() {
	local pod i pid t0 t_app old new c2
	c2=$(kube_node_pod_cidr 2)
	trap 'agent_cont 2' EXIT
	unpublish_and_wait 2
	old=$(leader_identity)
	pod=${old%_*}
	i=$(pod_node_index "$pod")
	pid=$(_container_pid "$i" "$pod" controller) || hc_die "no controller process of $pod on node $i"
	t0=$(hc_now)
	kill -KILL "$pid"
	agent_cont 2
	hc_wait_for 30 "node-2 approved by a new leader" approved_is node-2 "$c2" ||
		hc_die "no replica approved node-2 within 30 s of the leader's death"
	t_app=$(hc_since "$t0")
	new=$(leader_identity)
	[[ "$new" != "$old" ]] || hc_die "the Lease is still held by the killed $old"
	trap - EXIT
	kube_controller_rollout_wait 60 || true
	note "leader $old killed (SIGKILL): $new leads; node-2's new binding approved ${t_app} s after the kill"
}

t_headscale_down() {
	local c1 c2 w0 w1 e0 e1 t0 t
	c1=$(kube_node_pod_cidr 1)
	c2=$(kube_node_pod_cidr 2)
	trap 'agent_cont 2; hs_healthy || hs_start' EXIT
	# Counted before the unpublishing: its withdrawal is counted once the write is done, which
	# may be just after Headscale shows it.
	w0=$(ctl_metric_all headcni_controller_withdrawals_total)
	unpublish_and_wait 2
	e0=$(ctl_metric 'headcni_controller_headscale_errors_total{operation="list"}')
	hs_stop
	agent_cont 2 # re-publishes now; the controller cannot reach Headscale
	sleep 60
	e1=$(ctl_metric 'headcni_controller_headscale_errors_total{operation="list"}')
	t0=$(hc_now)
	hs_start
	hc_wait_for 60 "node-2 approved after Headscale is back" approved_is node-2 "$c2" ||
		hc_die "node-2 not approved 60 s after Headscale came back"
	t=$(hc_since "$t0")
	approved_is node-1 "$c1" || hc_die "node-1's approval was lost: $(hs_approved_of node-1)"
	w1=$(ctl_metric_all headcni_controller_withdrawals_total)
	((${w1%.*} == ${w0%.*} + 1)) || hc_die "withdrawals went from $w0 to $w1: not only node-2's unpublished binding"
	((${e1%.*} > ${e0%.*})) || hc_die "no Headscale error counted during the outage ($e0 -> $e1)"
	trap - EXIT
	note "Headscale down 60 s with node-2's binding pending: $((${e1%.*} - ${e0%.*})) failed lists counted, no withdrawal but the unpublished binding's ($w0 -> $w1), node-1 kept $c1; node-2 approved ${t} s after Headscale started"
}

t_apiserver_restart() {
	local w0 w1 t0 t_lead t c2
	c2=$(kube_node_pod_cidr 2)
	w0=$(ctl_metric_all headcni_controller_withdrawals_total)
	kube_apiserver_stop
	sleep 10
	t0=$(hc_now)
	kube_apiserver_start
	hc_wait_for 60 "a controller leads again" lease_fresh ||
		hc_die "no controller renewed the Lease after the API server came back"
	t_lead=$(hc_since "$t0")
	all_approved || hc_die "approvals changed across the API server's restart: $(hs_approved_of node-1) / $(hs_approved_of node-2)"
	w1=$(ctl_metric_all headcni_controller_withdrawals_total)
	[[ "$w0" == "$w1" ]] || hc_die "withdrawals went from $w0 to $w1 across the restart"
	trap 'agent_cont 2' EXIT
	unpublish_and_wait 2
	t=$(rebind_times 2 30) || hc_die "node-2 not approved after the API server restart"
	read -r tc tp ta <<<"$t"
	trap - EXIT
	note "API server down 10 s: the Lease renewed ${t_lead} s after it was back, nothing withdrawn; a new binding approved $(awk -v a="$tp" -v b="$ta" 'BEGIN{printf "%.2f", b-a}') s after publishing"
}

tr_run "${WANT[@]}"
rc=0
tr_summary "controller-tests.sh: prefix $HC_PREFIX, Kubernetes $KUBE_VERSION, setup ${PREV_SETUP_S} s" || rc=1

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	cat <<EOF

Left running (--keep). Look around:
  ip netns exec $(node_ns "$KUBE_CP") $KUBE_BIN_DIR/kubectl --kubeconfig $KUBE_ADMIN_KUBECONFIG get nodes,pods,lease -A -o wide
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
fi
tr_finish "$rc" controller-tests.sh
exit "$TR_RC"
