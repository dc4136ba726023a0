#!/usr/bin/env bash
# integration/kube-tests.sh: HeadCNI under a real Kubernetes (see integration/README.md).
#
# Setup: peers (Kubernetes v1.37.2 and the rest, built once), the images, the underlay,
# Headscale (https with the run's CA; no autoApprovers: routes are approved by the chart's route
# approval controller, the only holder of the API key), a control plane
# and 2 nodes with containerd, kubelet and kube-proxy; then HeadCNI as a user installs it:
# deploy-with-helm.sh of chart/, the DaemonSet's init container running `headcni install`
# into each node's CNI directories and the agent joining the tailnet; CoreDNS. Then, in order:
#
#   install           the conflist and binaries are where the kubelet's runtime looks; each agent
#                     read its Node's podCIDR, advertised it and had it approved; Ready nodes
#   ready_order       no node turns Ready before its plugin can attach pods (the agent's node file)
#   rbac              the agent's ServiceAccount may do what it needs and no more (real authorizer)
#   deployment        a Deployment spread over every node; pod to pod across nodes, the receiver
#                     sees the sender's own address
#   service           a ClusterIP Service through kube-proxy reaches the pods of every node
#   dns               CoreDNS answers a Service's name; a pod reaches it by name
#   hostport          a hostPort through the chained portmap plugin, from another node
#   first_packet      from a pod's creation to its first packet answered by a pod on another node
#   status            `kubectl exec ds/headcni -- headcni status` (the documented command) and on each
#                     node's agent; `headcni status --cluster` from an agent pod (each Node's
#                     InternalIP) and from the control-plane host with the admin kubeconfig (the API
#                     server's pod proxy): every node ready, approved, its peer reached directly
#   misconfig         on node 2 a leftover conflist that sorts first, then a pasted configuration with
#                     "mtu": 1420: the agent turns not ready, status and status --cluster exit 1
#                     naming it; once removed, ready again (times measured)
#   exclusive         a leftover conflist on node 2, then `helm upgrade --set cni.exclusive=true`: the
#                     installer sets it aside (NAME.headcni-aside, unchanged), the agent is ready;
#                     one dropped while the agent runs is set aside by the agent
#   netpol            NetworkPolicies enforced across nodes in both directions: ingress at the
#                     destination's node, egress at the source's; pods no policy isolates untouched
#   netpol_latency    from a policy written to its rules on both nodes (20 policies; median, max)
#   netpol_churn      100 updates of the policy that admits a flow, while it flows: nothing dropped
#   netpol_restart    node 2's agent replaced: its rules hold meanwhile, changes made meanwhile are
#                     enforced once it is back
#   netpol_scale      1,000 more pods and 1,000 policies followed: the agent's memory, enforcement
#   netpol_throughput pods no policy selects, across the tailnet and on one node: with 1,000
#                     policies in force (isolating the servers) and with none, taking turns
#   netpol_off        config.network.networkPolicy=false: no node keeps table inet headcni-policy,
#                     the policies no longer hold; then on again
#   upgrade           `helm upgrade` with a changed value rolls the agents one node at a time while
#                     cross-node traffic flows (longest gap measured)
#   apiserver_restart the API server restarted during a rollout; pods stay connected
#   kubelet_restart   a node's kubelet restarted; pods stay connected
#   token_rotation    the agent's service-account token rotates (new signing key, the old tokens
#                     refused); the agent takes the new one and keeps working
#   node_join         a third kubelet joins later; its pods reach the others
#   node_delete       a deleted Node's route is withdrawn
#   uninstall         `helm uninstall`: the pre-delete hook, every route withdrawn, HeadCNI's files
#                     gone from the nodes, what cni.exclusive set aside put back
#   helm_install      HeadCNI again with plain `helm upgrade --install` of chart/, the keys from
#                     an existing Secret; routes approved again, pods connected
#
# usage: integration/kube-tests.sh [--prefix P] [--keep] [--list] [TEST...]
# env: HC_KEEP_STATE=1 (keep logs), HEADCNI_MUSL_BIN (use this static binary, no build),
#      TR_STRICT=1 (the known failures listed below fail the run too)
# Exits non-zero when any test fails; tears down on exit, error and Ctrl-C, then checks that
# nothing of the run is left on the machine (namespaces, mounts, processes, cgroups, files).
# shellcheck disable=SC2317 # test functions and helpers are called by name (tr_run, hc_wait_for)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ALL_TESTS=(install ready_order rbac deployment service dns hostport first_packet status misconfig exclusive netpol netpol_latency netpol_churn netpol_restart netpol_scale netpol_throughput netpol_off upgrade
	apiserver_restart kubelet_restart token_rotation node_join node_delete uninstall helm_install)
# shellcheck source=lib/args.sh
source "$here/lib/args.sh"
declare -a WANT=()
tr_parse_args "$@"

export HC_PREFIX=${HC_PREFIX:-hck}
export HC_NODES=2
# Routes are approved by the controller (the API key), not by the policy.
export HC_HS_AUTOAPPROVE=0
# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/kube.sh
source "$here/lib/kube.sh"
# shellcheck source=lib/testing.sh
source "$here/lib/testing.sh"

hc_require_root

NS=hctest

# Tests that fail today because of a HeadCNI defect (see the test's comment); they run in full,
# show as XFAIL, and fail the run as XPASS once the defect is fixed. TR_STRICT=1: plain FAIL.
TR_KNOWN_FAILING=()

# --- helpers ------------------------------------------------------------------------

# kube_pod_node NS POD : the index of the node the pod runs on.
kube_pod_node() {
	local n
	n=$(kubectl -n "$1" get pod "$2" -o jsonpath='{.spec.nodeName}')
	printf '%s\n' "${n#node-}"
}

# kube_pod_where NS POD : "pod:I:NETNS", the pod's network namespace as the checks name it.
kube_pod_where() {
	local i id netns
	i=$(kube_pod_node "$1" "$2")
	id=$(node_crictl "$i" pods --namespace "$1" --name "^$2\$" --state ready -q)
	id=${id%%$'\n'*}
	[[ -n "$id" ]] || return 1
	netns=$(node_crictl "$i" inspectp "$id" |
		jq -er '.info.runtimeSpec.linux.namespaces[] | select(.type=="network") | .path')
	printf 'pod:%s:%s\n' "$i" "${netns##*/}"
}

# pods_on NS SELECTOR NODE_INDEX : names of the selected pods on that node.
pods_on() {
	kubectl -n "$1" get pods -l "$2" --field-selector "spec.nodeName=node-$3,status.phase=Running" \
		-o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}

# curl_from NS POD URL : GET from inside the pod (its own curl).
curl_from() { kube_exec "$1" "$2" curl -fsS --max-time 5 "$3"; }

# web_pair : sets A (a web pod on node 1), B (one on node 2) and their addresses.
web_pair() {
	# (no `| head`: with pipefail, kubectl's SIGPIPE would fail the assignment)
	A=$(pods_on "$NS" app=web 1)
	B=$(pods_on "$NS" app=web 2)
	A=${A%%$'\n'*} B=${B%%$'\n'*}
	[[ -n "$A" && -n "$B" ]] || hc_die "no web pod on node 1 or node 2"
	A_IP=$(kube_pod_ip "$NS" "$A")
	B_IP=$(kube_pod_ip "$NS" "$B")
}

# every web pod on node 1 reaches every web pod on node 2 (ICMP, from its own netns)
cross_node_ok() {
	local a b
	for a in $(pods_on "$NS" app=web 1); do
		for b in $(pods_on "$NS" app=web 2); do
			ping_ok "$(kube_pod_where "$NS" "$a")" "$(kube_pod_ip "$NS" "$b")" 1 || return 1
		done
	done
}

# hs views through the REST API the agent uses (camelCase)
hs_rest_nodes() { hs_api "$HC_STATE_DIR/apikey" GET node; }
hs_approved_of() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.approvedRoutes // [])[]] | sort | join(",")'
}
_approved_has() { [[ ",$(hs_approved_of "$1")," == *",$2,"* ]]; } # HOSTNAME CIDR
hs_available_of() {
	hs_rest_nodes | jq -r --arg h "$1" \
		'[.nodes[] | select(.givenName==$h or .name==$h) | (.availableRoutes // [])[]] | sort | join(",")'
}

# helm_upgrade ARGS... : `helm upgrade` of the release with its values and ARGS.
helm_upgrade() {
	helm upgrade "$KUBE_HC_RELEASE" "$HC_REPO_DIR/chart" -n "$KUBE_HC_NS" --reuse-values "$@" \
		>>"$HC_STATE_DIR/logs/helm.log" 2>&1
}

# web_deploy REPLICAS : the test Deployment (agnhost netexec) spread over the nodes, and its Service.
web_deploy() {
	kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $NS}
spec:
  replicas: $1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: web}}}
      containers:
      - name: web
        image: $KUBE_AGNHOST_IMAGE
        args: [netexec, --http-port=8080, --udp-port=8081]
        ports: [{containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $NS}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
EOF
}

# --- setup ----------------------------------------------------------------------------

kube_harness_up
kubectl create namespace "$NS" >/dev/null
READY_S=$KUBE_READY_S
SETUP_S=$KUBE_SETUP_S

# --- tests ----------------------------------------------------------------------------

t_install() {
	local i cidr pod
	for ((i = 1; i <= HC_NODES; i++)); do
		node_exec "$i" test -x /opt/cni/bin/headcni || hc_die "node $i: no /opt/cni/bin/headcni"
		node_exec "$i" test -L /opt/cni/bin/headcni-ipam || hc_die "node $i: no headcni-ipam link"
		node_exec "$i" jq -e '.plugins[0].type == "headcni"' "/etc/cni/net.d/$HC_CONFLIST" >/dev/null ||
			hc_die "node $i: no HeadCNI conflist"
		cidr=$(kube_node_pod_cidr "$i")
		cidr_has "$HC_CLUSTER_CIDR" "${cidr%/*}" || hc_die "node $i: podCIDR $cidr outside $HC_CLUSTER_CIDR"
		# the agent took the Node's podCIDR (no --pod-cidr in the chart's defaults)
		grep -qx "HEADCNI_POD_CIDRS=$cidr" "$(hcni_node_file "$i")" ||
			hc_die "node $i: node file does not carry the Node's podCIDR $cidr: $(cat "$(hcni_node_file "$i")")"
		hc_wait_for 30 "node-$i: $cidr approved by the controller" _approved_has "node-$i" "$cidr" ||
			hc_die "node-$i: $cidr not approved in Headscale"
		pod=$(kube_agent_pod "$i")
		note "node-$i: podCIDR $cidr, agent $pod, approved: $(hs_approved_of "node-$i")"
	done
	# each node reaches the other's pod CIDR through tailscale0 (table 52), and through nothing else
	for ((i = 1; i <= HC_NODES; i++)); do
		local j
		for ((j = 1; j <= HC_NODES; j++)); do
			((i == j)) && continue
			cidr=$(kube_node_pod_cidr "$j")
			hc_wait_for 20 "node $i has $cidr in table 52" node_route_in_table52 "$i" "$cidr" ||
				hc_die "node $i: no tailnet route to $cidr"
			ip -n "$(node_ns "$i")" route show table main | grep -q "^$cidr" &&
				hc_die "node $i: a main-table route to $cidr exists besides the tailnet's"
		done
	done
	note "nodes Ready ${READY_S}s after deploy-with-helm.sh started; setup ${SETUP_S}s"
}

# A node must not turn Ready (containerd 1.6: as soon as a conflist is in its conf dir) before
# the plugin can attach pods (the agent's node file, which the plugin's STATUS checks). Watched
# during the setup's deploy (kube_harness_up).
t_ready_order() {
	((${#KUBE_READY_EARLY[@]} == 0)) ||
		hc_die "Ready before the plugin's STATUS was good (the conflist is written before the agent has joined): ${KUBE_READY_EARLY[*]}"
	note "every node turned Ready only once its agent had written the node file"
}

t_rbac() {
	local sa="system:serviceaccount:$KUBE_HC_NS:$KUBE_HC_RELEASE" td="$KUBE_HC_RELEASE-teardown" v
	# "patch nodes": its node key on its own Node; the admission policy refuses anything else
	# (controller-tests.sh, admission). Pods, Namespaces and NetworkPolicies: followed by the
	# NetworkPolicy engine.
	local -a yes=("get nodes" "list nodes" "watch nodes" "patch nodes"
		"get configmaps/$td -n $KUBE_HC_NS" "watch configmaps/$td -n $KUBE_HC_NS"
		"list pods -A" "watch pods -A" "list namespaces" "watch namespaces"
		"list networkpolicies.networking.k8s.io -A" "watch networkpolicies.networking.k8s.io -A")
	local -a no=("update nodes" "delete nodes" "create nodes" "patch nodes --subresource=status" "update nodes --subresource=status" "create pods"
		"get secrets -n $KUBE_HC_NS" "list secrets -A" "get configmaps/kube-root-ca.crt -n $KUBE_HC_NS"
		"patch configmaps/$td -n $KUBE_HC_NS" "create configmaps -n $KUBE_HC_NS" "get pods -A"
		"create networkpolicies.networking.k8s.io -n default" "delete pods -n default" "update namespaces"
		"get daemonsets -n $KUBE_HC_NS" "create serviceaccounts/token -n $KUBE_HC_NS"
		"get leases -n $KUBE_HC_NS" "get configmaps/$KUBE_HC_RELEASE-approvals -n $KUBE_HC_NS")
	for v in "${yes[@]}"; do
		# shellcheck disable=SC2086 # the verb lines are split on purpose
		kubectl auth can-i $v --as="$sa" >/dev/null 2>&1 || hc_die "the agent may not: $v"
	done
	for v in "${no[@]}"; do
		# shellcheck disable=SC2086
		! kubectl auth can-i $v --as="$sa" >/dev/null 2>&1 || hc_die "the agent may, and must not: $v"
	done
	note "${#yes[@]} needed verbs allowed, ${#no[@]} others refused (kubectl auth can-i --as=$sa)"
}

t_deployment() {
	local n=$((2 * HC_NODES)) i a b seen
	web_deploy "$n"
	kubectl -n "$NS" rollout status deployment/web --timeout=90s >/dev/null || hc_die "web did not roll out"
	for ((i = 1; i <= HC_NODES; i++)); do
		[[ -n "$(pods_on "$NS" app=web "$i")" ]] || hc_die "no web pod on node $i"
	done
	for a in $(pods_on "$NS" app=web 1); do
		for b in $(pods_on "$NS" app=web 2); do
			seen=$(curl_from "$NS" "$a" "http://$(kube_pod_ip "$NS" "$b"):8080/clientip") ||
				hc_die "$a -> $b failed"
			[[ "${seen%:*}" == "$(kube_pod_ip "$NS" "$a")" ]] ||
				hc_die "$b saw $a as ${seen%:*}, not its own address $(kube_pod_ip "$NS" "$a")"
			seen=$(curl_from "$NS" "$b" "http://$(kube_pod_ip "$NS" "$a"):8080/clientip") ||
				hc_die "$b -> $a failed"
			[[ "${seen%:*}" == "$(kube_pod_ip "$NS" "$b")" ]] ||
				hc_die "$a saw $b as ${seen%:*}, not its own address"
		done
	done
	note "$n web pods over $HC_NODES nodes; every pair across nodes connects both ways, with the pods' own source addresses"
}

t_service() {
	local ip k host
	local -A nodes_seen=()
	web_pair
	ip=$(kubectl -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
	cidr_has "$KUBE_SERVICE_CIDR" "$ip" || hc_die "ClusterIP $ip outside $KUBE_SERVICE_CIDR"
	for ((k = 0; k < 30; k++)); do
		host=$(curl_from "$NS" "$A" "http://$ip/hostname") || hc_die "GET http://$ip/hostname from $A failed"
		nodes_seen[$(kube_pod_node "$NS" "$host")]=1
	done
	((${#nodes_seen[@]} == HC_NODES)) || hc_die "30 requests to $ip reached pods of nodes ${!nodes_seen[*]} only"
	note "ClusterIP $ip: 30 requests from node 1 answered by pods of nodes ${!nodes_seen[*]}"
}

t_dns() {
	local ip got
	web_pair
	ip=$(kubectl -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')
	got=$(kube_exec "$NS" "$A" dig +short +search "web.$NS.svc.$KUBE_CLUSTER_DOMAIN" | tail -n1)
	[[ "$got" == "$ip" ]] || hc_die "web.$NS.svc resolves to '$got', not $ip"
	got=$(kube_exec "$NS" "$B" getent hosts web | awk '{print $1}')
	[[ "$got" == "$ip" ]] || hc_die "'web' (search path) resolves to '$got' on node 2, not $ip"
	curl_from "$NS" "$B" "http://web/hostname" >/dev/null || hc_die "http://web/ failed from $B"
	note "CoreDNS ($KUBE_DNS_IP) answers web.$NS.svc = $ip from pods on both nodes"
}

t_hostport() {
	local seen
	kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: hostport, namespace: $NS}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: $KUBE_AGNHOST_IMAGE
    args: [netexec, --http-port=8080]
    ports: [{containerPort: 8080, hostPort: 18080}]
    readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
EOF
	kubectl -n "$NS" wait --for=condition=Ready pod/hostport --timeout=60s >/dev/null || hc_die "hostport pod not ready"
	seen=$(node_exec 2 curl -fsS --max-time 5 "http://$(node_addr 1):18080/clientip") ||
		hc_die "node 2 -> node 1's hostPort 18080 failed"
	note "node-2 -> $(node_addr 1):18080 answered by the pod (it saw ${seen%:*})"
	web_pair
	seen=$(curl_from "$NS" "$B" "http://$(node_addr 1):18080/hostname") || hc_die "pod on node 2 -> hostPort failed"
	[[ "$seen" == hostport ]] || hc_die "hostPort answered by '$seen'"
	kubectl -n "$NS" delete pod hostport --wait=false >/dev/null
}

# The time from `kubectl create` of a pod on node 1 until its first ICMP echo to a pod on
# node 2 is answered (measured in the pod: the same clock as the harness).
t_first_packet() {
	local k n=${KUBE_FIRST_PACKET_PODS:-10} t0 t1 name
	local -a ds=()
	web_pair
	for ((k = 1; k <= n; k++)); do
		name=fp$k
		t0=$(date +%s.%N)
		kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $NS}
spec:
  nodeName: node-1
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: probe
    image: $KUBE_AGNHOST_IMAGE
    command: [/bin/bash, -c, 'until ping -n -c1 -W1 -i0.05 $B_IP >/dev/null 2>&1; do :; done; date +%s.%N']
EOF
		kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$name" --timeout=60s >/dev/null ||
			hc_die "pod $name never reached $B_IP"
		t1=$(kubectl -n "$NS" logs "$name" | tail -n1)
		ds+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')")
		kubectl -n "$NS" delete pod "$name" --wait=false >/dev/null
	done
	local stats
	stats=$(printf '%s\n' "${ds[@]}" | sort -n | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; p=v[int(0.9*NR+0.999)]; printf "median %.2f s, p90 %.2f s, min %.2f s, max %.2f s (n=%d)", m, p, v[1], v[NR], NR}')
	note "pod created -> first packet answered across nodes: $stats"
}

# _rollout_one_at_a_time : the agents' new pods were created one after the other, each only
# once the previous one was Ready (maxUnavailable 1).
_rollout_one_at_a_time() {
	local lines prev_ready="" c r
	lines=$(kubectl -n "$KUBE_HC_NS" get pods -l app.kubernetes.io/component=agent -o json |
		jq -r '.items[] | [.metadata.creationTimestamp, ((.status.conditions // [])[] | select(.type=="Ready") | .lastTransitionTime)] | @tsv' | sort)
	while IFS=$'\t' read -r c r; do
		if [[ -n "$prev_ready" && "$c" < "$prev_ready" ]]; then
			hc_warn "an agent pod was created at $c, before the previous one was Ready ($prev_ready)"
			return 1
		fi
		prev_ready=$r
	done <<<"$lines"
}

# the static binary the image was built from, run as a user would on a workstation
status_bin() { printf '%s\n' "${HEADCNI_MUSL_BIN:-$HC_REPO_DIR/target/$HC_MUSL_TARGET/release/headcni}"; }

# status_cluster_cp ARGS... : `headcni status --cluster` on the control-plane host with the admin
# kubeconfig (no pod: the API server's proxy to the agent pods)
status_cluster_cp() {
	ip netns exec "$(node_ns "$KUBE_CP")" "$(status_bin)" status --cluster --kubeconfig "$KUBE_ADMIN_KUBECONFIG" "$@"
}

# agent_ready I : node I's agent container is ready (its readiness probe)
agent_ready() {
	[[ "$(kubectl -n "$KUBE_HC_NS" get pod "$(kube_agent_pod "$1")" \
		-o jsonpath='{.status.containerStatuses[?(@.name=="agent")].ready}')" == true ]]
}
agent_not_ready() { ! agent_ready "$1"; }

t_status() {
	local i pod out=$HC_STATE_DIR/tests/status cidr t0
	mkdir -p "$out"
	# the documented command, as written
	kubectl -n "$KUBE_HC_NS" exec "ds/$KUBE_HC_RELEASE" -- headcni status >"$out/ds.txt" 2>&1 ||
		hc_die "kubectl exec ds/$KUBE_HC_RELEASE -- headcni status: $(cat "$out/ds.txt")"
	grep -q '^All good\.' "$out/ds.txt" || hc_die "headcni status through kubectl exec is not all good: $(cat "$out/ds.txt")"
	for ((i = 1; i <= HC_NODES; i++)); do
		pod=$(kube_agent_pod "$i")
		cidr=$(kube_node_pod_cidr "$i")
		kubectl -n "$KUBE_HC_NS" exec "$pod" -- headcni status --json >"$out/node-$i.json" 2>"$out/node-$i.err" ||
			hc_die "node $i: headcni status exits non-zero: $(jq -c '.problems' "$out/node-$i.json" 2>/dev/null) $(cat "$out/node-$i.err")"
		jq -e --arg c "$cidr" --arg f "$HC_CONFLIST" '.backendState == "Running" and .podCidrs == [$c]
			and .cniConfigInUse == $f and .conflistPresent and .nodeFilePresent and (.problems | length == 0)
			and any(.routes[]; .cidr == $c and .advertised and .approved)' "$out/node-$i.json" >/dev/null ||
			hc_die "node $i: status --json in the agent pod: $(jq -c '{backendState, podCidrs, cniConfigInUse, routes, problems}' "$out/node-$i.json")"
		note "node-$i: kubectl exec $pod -- headcni status: all good ($(jq -r '.ipam.plugin + " " + (.ipam.used|tostring) + " in use"' "$out/node-$i.json"), MTU $(jq -r '.podMtu' "$out/node-$i.json"))"
	done
	# every node, from an agent pod (direct to the Nodes' InternalIPs) and from the
	# control-plane host with a kubeconfig (the API server's proxy). Traffic between the nodes
	# first (tailscale ping until a direct path), so that each kubelet node shows the other as
	# reached directly (the path shows in the agent's next pass: a few seconds).
	local j
	for ((i = 1; i <= HC_NODES; i++)); do
		for ((j = 1; j <= HC_NODES; j++)); do
			((i == j)) || node_ts "$i" ping --c 10 --timeout 2s "$(kube_node_name "$j")" >/dev/null 2>&1 || true
		done
	done
	_cluster_direct() {
		status_cluster_cp --json >"$out/cluster-cp.json" 2>"$out/cluster-cp.err" &&
			jq -e --argjson n "$HC_NODES" '(.nodes | length) == $n and all(.nodes[];
				.agent == "ready" and .approval == "approved"
				and ([.peers[] | select(.peer | startswith("node-"))] | length) == $n - 1
				and all(.peers[] | select(.peer | startswith("node-")); .path == "direct"))' \
				"$out/cluster-cp.json" >/dev/null
	}
	t0=$(hc_now)
	hc_wait_for 30 "status --cluster: every node ready, approved, peers direct" _cluster_direct ||
		hc_die "status --cluster from the control-plane host: $(cat "$out/cluster-cp.err") $(jq -c '.nodes[] | {name, agent, approval, peers, problems}' "$out/cluster-cp.json" 2>/dev/null)"
	status_cluster_cp >"$out/cluster-cp.txt" 2>&1 || hc_die "status --cluster (text) exits non-zero: $(cat "$out/cluster-cp.txt")"
	kubectl -n "$KUBE_HC_NS" exec "ds/$KUBE_HC_RELEASE" -- headcni status --cluster >"$out/cluster-pod.txt" 2>&1 ||
		hc_die "kubectl exec ds/$KUBE_HC_RELEASE -- headcni status --cluster: $(cat "$out/cluster-pod.txt")"
	for ((i = 1; i <= HC_NODES; i++)); do
		grep -Eq "^$(kube_node_name "$i") +ready +[^ ]+ +$(kube_node_pod_cidr "$i") +approved" "$out/cluster-pod.txt" ||
			hc_die "status --cluster in a pod lacks node $i: $(cat "$out/cluster-pod.txt")"
	done
	grep -q "^All $HC_NODES nodes good\." "$out/cluster-pod.txt" || hc_die "status --cluster in a pod: $(cat "$out/cluster-pod.txt")"
	note "status --cluster (control-plane host, API server proxy; and in an agent pod, InternalIPs): $HC_NODES nodes ready, approved, node peers direct after $(hc_since "$t0") s"
	sed 's/^/      /' "$out/cluster-pod.txt" >&2
}

t_misconfig() {
	local out=$HC_STATE_DIR/tests/misconfig t0 took pod file
	mkdir -p "$out"
	pod=$(kube_agent_pod 2)
	_broken() { # FILE CONTENT NEEDLE LABEL
		local file=$1 content=$2 needle=$3 label=$4
		node_exec 2 sh -c "cat > /etc/cni/net.d/$file" <<<"$content"
		t0=$(hc_now)
		hc_wait_for 60 "node 2's agent not ready ($label)" agent_not_ready 2 ||
			hc_die "node 2's agent stays ready with $file"
		took=$(hc_since "$t0")
		if kubectl -n "$KUBE_HC_NS" exec "$pod" -- headcni status >"$out/$label.txt" 2>&1; then
			hc_die "headcni status on node 2 exits 0 with $file: $(cat "$out/$label.txt")"
		fi
		grep -qF -- "$needle" "$out/$label.txt" || hc_die "headcni status on node 2 does not say '$needle': $(cat "$out/$label.txt")"
		if status_cluster_cp >"$out/$label-cluster.txt" 2>&1; then
			hc_die "status --cluster exits 0 with $file on node 2: $(cat "$out/$label-cluster.txt")"
		fi
		{ grep -qF -- "$(kube_node_name 2): " "$out/$label-cluster.txt" && grep -qF -- "$needle" "$out/$label-cluster.txt"; } ||
			hc_die "status --cluster does not name node 2's problem: $(cat "$out/$label-cluster.txt")"
		node_exec 2 rm -f "/etc/cni/net.d/$file"
		t0=$(hc_now)
		hc_wait_for 60 "node 2's agent ready again" agent_ready 2 || hc_die "node 2's agent not ready after $file was removed"
		note "$label: node 2's agent not ready ${took} s after $file appeared; status and status --cluster exit 1 naming it ('$needle'); ready $(hc_since "$t0") s after its removal"
	}
	_broken 05-flannel.conflist '{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel"}]}' \
		"uses 05-flannel.conflist" leftover
	_broken 05-tailscale-cni.conf '{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni","mtu":1420,"ipam":{"type":"host-local","subnet":"10.244.0.0/24"}}' \
		"1420" mtu
	status_cluster_cp >/dev/null 2>&1 || hc_die "status --cluster still finds a problem: $(status_cluster_cp 2>&1)"
}

t_exclusive() {
	local leftover=05-flannel.conflist content='{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel"}]}' t0
	node_exec 2 sh -c "cat > /etc/cni/net.d/$leftover" <<<"$content"
	hc_wait_for 60 "node 2's agent not ready with $leftover" agent_not_ready 2 || hc_die "node 2's agent stays ready with $leftover"
	t0=$(hc_now)
	helm_upgrade --set cni.exclusive=true || hc_die "helm upgrade --set cni.exclusive=true failed"
	kube_headcni_rollout_wait 180 || hc_die "the DaemonSet did not roll out with cni.exclusive=true"
	hc_wait_for 60 "node 2's agent ready" agent_ready 2 || hc_die "node 2's agent not ready after the exclusive install"
	node_exec 2 test ! -e "/etc/cni/net.d/$leftover" || hc_die "node 2: $leftover is still in place"
	[[ "$(node_exec 2 cat "/etc/cni/net.d/$leftover.headcni-aside")" == "$content" ]] ||
		hc_die "node 2: $leftover.headcni-aside missing or changed"
	kubectl -n "$KUBE_HC_NS" logs "$(kube_agent_pod 2)" -c install-cni >"$HC_STATE_DIR/tests/exclusive-install.log" 2>&1 || true
	note "cni.exclusive=true: node 2's $leftover set aside as $leftover.headcni-aside by the installer; agent ready $(hc_since "$t0") s after helm upgrade began"
	# Another network's file that appears while the agent runs goes aside too.
	local late=07-late.conf late_content='{"cniVersion":"0.3.1","name":"late","type":"bridge"}'
	t0=$(hc_now)
	node_exec 2 sh -c "cat > /etc/cni/net.d/$late" <<<"$late_content"
	hc_wait_for 30 "node 2's agent sets $late aside" node_exec 2 test -e "/etc/cni/net.d/$late.headcni-aside" ||
		hc_die "node 2: the agent left $late in place under cni.exclusive=true"
	node_exec 2 test ! -e "/etc/cni/net.d/$late" || hc_die "node 2: $late is still in place"
	[[ "$(node_exec 2 cat "/etc/cni/net.d/$late.headcni-aside")" == "$late_content" ]] ||
		hc_die "node 2: $late.headcni-aside changed"
	agent_ready 2 || hc_die "node 2's agent not ready after setting $late aside"
	note "a network configuration dropped on node 2 while its agent runs: set aside after $(hc_since "$t0") s (the agent's next pass)"
	# Back to the default; the set-aside files stay: the uninstall puts them back.
	helm_upgrade --set cni.exclusive=false || hc_die "helm upgrade --set cni.exclusive=false failed"
	kube_headcni_rollout_wait 180 || hc_die "the DaemonSet did not roll out with cni.exclusive=false"
}

# node_key I : the tailnet node key node I's agent published on its Node (controller mode).
node_key() { kubectl get node "node-$1" -o json | jq -r '.metadata.annotations["headcni.io/node-key"] // empty'; }
node_key_published() { [[ -n "$(node_key "$1")" ]]; }

t_upgrade() {
	local f=$HC_STATE_DIR/tests/upgrade.ping gap before after i k
	local -A keys=()
	web_pair
	for ((i = 1; i <= HC_NODES; i++)); do keys[$i]=$(node_key "$i"); done
	before=$(kubectl -n "$KUBE_HC_NS" get ds "$KUBE_HC_RELEASE" -o jsonpath='{.metadata.generation}')
	pinger_start "$(kube_pod_where "$NS" "$A")" "$B_IP" "$f"
	helm_upgrade --set logLevel=debug || hc_die "helm upgrade failed"
	kube_headcni_rollout_wait 180 || hc_die "the upgraded DaemonSet did not roll out"
	sleep 2
	pinger_stop "$f"
	after=$(kubectl -n "$KUBE_HC_NS" get ds "$KUBE_HC_RELEASE" -o jsonpath='{.metadata.generation}')
	((after > before)) || hc_die "helm upgrade did not change the DaemonSet"
	_rollout_one_at_a_time || hc_die "the agents were not rolled one node at a time"
	gap=$(pinger_gap "$f")
	read -r g ok sent <<<"$gap"
	((ok > 0)) || hc_die "no ping answered during the upgrade"
	cross_node_ok || hc_die "pods across nodes disconnected after the upgrade"
	# Every node comes back as the same tailnet node (in sidecar mode its tailscaled restarted
	# with the pod, from the state directory on the node).
	for ((i = 1; i <= HC_NODES; i++)); do
		[[ -n "${keys[$i]}" ]] || continue
		hc_wait_for 60 "node-$i's identity published again" node_key_published "$i" ||
			hc_die "node-$i: no identity published after the upgrade"
		k=$(node_key "$i")
		[[ "$k" == "${keys[$i]}" ]] || hc_die "node-$i joined as a new tailnet node across the upgrade: ${keys[$i]:0:24}... -> ${k:0:24}..."
	done
	note "helm upgrade --set logLevel=debug ($KUBE_TS_MODE mode): agents rolled one at a time, each node kept its tailnet node key; pod traffic across nodes: longest gap ${g}s ($ok of $sent answered)"
}

t_apiserver_restart() {
	local f=$HC_STATE_DIR/tests/apiserver.ping
	web_pair
	pinger_start "$(kube_pod_where "$NS" "$A")" "$B_IP" "$f"
	kubectl -n "$KUBE_HC_NS" rollout restart "daemonset/$KUBE_HC_RELEASE" >/dev/null
	sleep 2
	kube_apiserver_stop
	sleep 5
	kube_apiserver_start
	kube_headcni_rollout_wait 180 || hc_die "the rollout did not complete after the API server restart"
	pinger_stop "$f"
	read -r g ok sent <<<"$(pinger_gap "$f")"
	cross_node_ok || hc_die "pods across nodes disconnected"
	note "API server down 5 s during a rollout: rollout completed; pod traffic longest gap ${g}s ($ok of $sent)"
}

t_kubelet_restart() {
	local f=$HC_STATE_DIR/tests/kubelet.ping
	web_pair
	pinger_start "$(kube_pod_where "$NS" "$A")" "$B_IP" "$f"
	kube_kubelet_stop 1
	sleep 3
	kube_kubelet_start 1
	hc_wait_for 60 "node-1 Ready again" kube_node_ready 1 || hc_die "node-1 not Ready after its kubelet restarted"
	sleep 2
	pinger_stop "$f"
	read -r g ok sent <<<"$(pinger_gap "$f")"
	cross_node_ok || hc_die "pods across nodes disconnected"
	# a new pod on the restarted node works
	kubectl -n "$NS" scale deployment/web --replicas=$((2 * HC_NODES + 1)) >/dev/null
	kubectl -n "$NS" rollout status deployment/web --timeout=60s >/dev/null || hc_die "scale-up after the restart failed"
	kubectl -n "$NS" scale deployment/web --replicas=$((2 * HC_NODES)) >/dev/null
	note "kubelet of node 1 down 3 s: pod traffic longest gap ${g}s ($ok of $sent); new pods start"
}

# the agent's projected token file on node I, as the kubelet wrote it
_agent_token_file() {
	local uid
	uid=$(kubectl -n "$KUBE_HC_NS" get pod "$(kube_agent_pod "$1")" -o jsonpath='{.metadata.uid}')
	printf '%s/root/pods/%s/volumes/kubernetes.io~projected/kube-api-access/token\n' "$(kube_node_dir "$1")" "$uid"
}

# the token's digest; the volume is a tmpfs the kubelet mounted in the node's mount namespace
_token_digest() { node_exec "$1" sha256sum "$(_agent_token_file "$1")" | cut -d' ' -f1; } # I
# _audit_has USER SOURCE-IP SINCE : the audit log has a request by USER from SOURCE-IP, received
# after SINCE (UTC, seconds) and answered 2xx.
_audit_has() {
	jq -e -s --arg u "$1" --arg ip "$2" --arg t "$3" \
		'any(.[]; .user.username == $u and ((.sourceIPs // [])[0]) == $ip and .requestReceivedTimestamp[0:19] > $t
		     and ((.responseStatus.code // 0) >= 200 and (.responseStatus.code // 0) < 300))' \
		"$KUBE_DIR/audit.log" >/dev/null 2>&1
}
_token_changed() { local d; d=$(_token_digest "$1") && [[ -n "$d" && "$d" != "$2" ]]; }    # I OLD-DIGEST

t_token_rotation() {
	local i since
	local -A before=()
	for ((i = 1; i <= HC_NODES; i++)); do
		before[$i]=$(_token_digest "$i") || hc_die "node $i: no projected token at $(_agent_token_file "$i")"
	done
	# A new signing key, and only it verifies: every token issued so far is refused.
	_kube_key "$KUBE_PKI/sa2.key"
	openssl pkey -in "$KUBE_PKI/sa2.key" -pubout -out "$KUBE_PKI/sa2.pub" 2>/dev/null
	since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
	kube_apiserver_stop
	KUBE_SA_VERIFY_KEYS=$KUBE_PKI/sa2.pub KUBE_SA_SIGNING_KEY=$KUBE_PKI/sa2.key kube_apiserver_start
	# The kubelets fetch new tokens when they start (their token cache is in memory).
	for ((i = 1; i <= HC_NODES; i++)); do
		kube_kubelet_stop "$i"
		kube_kubelet_start "$i"
	done
	for ((i = 1; i <= HC_NODES; i++)); do
		hc_wait_for 90 "node $i: a new token in the agent's volume" _token_changed "$i" "${before[$i]}" ||
			hc_die "node $i: the kubelet did not rotate the agent's token"
	done
	# The agents must now use the new token: each makes a request the API server
	# authenticates as the agent's ServiceAccount, after its new token was written (the
	# audit log records the user and the node's address).
	local t_new sa="system:serviceaccount:$KUBE_HC_NS:$KUBE_HC_RELEASE"
	t_new=$(date -u +%Y-%m-%dT%H:%M:%S)
	for ((i = 1; i <= HC_NODES; i++)); do
		hc_wait_for 90 "node $i: the agent authenticated with its new token" \
			_audit_has "$sa" "$(node_addr "$i")" "$t_new" ||
			hc_die "node $i: the agent made no authenticated request in the 90 s after its token was rotated (old tokens are refused since $since)"
		local pod n401
		pod=$(kube_agent_pod "$i")
		n401=$(kubectl -n "$KUBE_HC_NS" logs "$pod" -c agent --since-time="$since" 2>/dev/null |
			grep -ciE '401|unauthori[sz]ed' || true)
		note "node $i: the agent authenticated with the new token; $n401 of its log lines name a 401 since the key change"
	done
	cross_node_ok || hc_die "pods across nodes disconnected"
}

t_node_join() {
	local i=3 pod ip k
	topo_node_add "$i"
	kube_node_up "$i"
	hc_wait_for 90 "node-3 Ready" kube_node_ready "$i" || hc_die "node-3 did not turn Ready"
	kube_headcni_rollout_wait 90 || hc_die "no agent on node-3"
	kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: n3, namespace: $NS, labels: {app: n3}}
spec:
  nodeName: node-3
  terminationGracePeriodSeconds: 1
  containers:
  - {name: probe, image: $KUBE_AGNHOST_IMAGE, args: [pause]}
EOF
	kubectl -n "$NS" wait --for=condition=Ready pod/n3 --timeout=60s >/dev/null || hc_die "pod n3 not ready"
	web_pair
	for ip in "$A_IP" "$B_IP"; do
		hc_wait_for 30 "n3 reaches $ip" ping_ok "$(kube_pod_where "$NS" n3)" "$ip" 1 ||
			hc_die "pod on node-3 does not reach $ip"
	done
	ip=$(kube_pod_ip "$NS" n3)
	for k in "$A" "$B"; do
		kube_exec "$NS" "$k" ping -n -c1 -W2 "$ip" >/dev/null || hc_die "$k does not reach node-3's pod $ip"
	done
	note "node-3 joined (podCIDR $(kube_node_pod_cidr 3)); its pod $ip reaches and is reached by nodes 1 and 2"
}

t_node_delete() {
	kubectl get node node-3 >/dev/null 2>&1 || skip "needs node-3 (node_join)"
	local cidr
	cidr=$(kube_node_pod_cidr 3)
	# the node is decommissioned: its kubelet stops, its Node is deleted (its agent's container
	# and its tailscaled are still there, as on a machine not yet switched off)
	kubectl -n "$NS" delete pod n3 --wait=false >/dev/null 2>&1 || true
	kube_kubelet_stop 3
	kubectl delete node node-3 >/dev/null
	hc_wait_for 60 "node-1 loses the route to $cidr" bash -c "! ip -n '$(node_ns 1)' route show table 52 | grep -q '^$cidr'" ||
		hc_die "node-3's $cidr still routed on node 1 60 s after its Node was deleted (approved: $(hs_approved_of node-3))"
	note "Node node-3 deleted: $cidr withdrawn from the others' tables"
}

t_uninstall() {
	local i out f
	local -A cidrs=() aside=()
	for ((i = 1; i <= HC_NODES; i++)); do
		cidrs[$i]=$(kube_node_pod_cidr "$i")
		# What cni.exclusive set aside (the exclusive test leaves two on node 2).
		aside[$i]=$(node_exec "$i" sh -c 'ls /etc/cni/net.d/*.headcni-aside 2>/dev/null' || true)
	done
	out=$(helm uninstall "$KUBE_HC_RELEASE" -n "$KUBE_HC_NS" --wait --timeout 5m 2>&1) ||
		hc_die "helm uninstall failed: $out"
	grep -qi 'uninstalled' <<<"$out" || hc_die "helm uninstall said: $out"
	for ((i = 1; i <= HC_NODES; i++)); do
		[[ -z "$(hs_approved_of "node-$i")" ]] || hc_die "node-$i: still approved in Headscale: $(hs_approved_of "node-$i")"
		[[ -z "$(hs_available_of "node-$i")" ]] || hc_die "node-$i: still advertises $(hs_available_of "node-$i")"
		local j
		for ((j = 1; j <= HC_NODES; j++)); do
			((i == j)) && continue
			hc_wait_for 20 "node $i drops ${cidrs[$j]}" bash -c "! ip -n '$(node_ns "$i")' route show table 52 | grep -q '^${cidrs[$j]}'" ||
				hc_die "node $i still routes ${cidrs[$j]} after the uninstall"
		done
	done
	note "helm uninstall: pre-delete hook ran; every node's route withdrawn and unapproved"
	local -a left=()
	for ((i = 1; i <= HC_NODES; i++)); do
		local f
		for f in /opt/cni/bin/headcni /opt/cni/bin/headcni-ipam "/etc/cni/net.d/$HC_CONFLIST"; do
			node_exec "$i" test -e "$f" && left+=("node-$i:$f")
		done
		ip netns exec "$(node_ns "$i")" nft list table inet headcni-policy >/dev/null 2>&1 &&
			left+=("node-$i:table inet headcni-policy")
	done
	((${#left[@]} == 0)) || hc_die "HeadCNI's files are still on the nodes after helm uninstall: ${left[*]}"
	local restored=()
	for ((i = 1; i <= HC_NODES; i++)); do
		for f in ${aside[$i]}; do
			node_exec "$i" test ! -e "$f" -a -e "${f%.headcni-aside}" ||
				hc_die "node-$i: $f was not put back as ${f%.headcni-aside} by the uninstall"
			restored+=("node-$i:${f##*/}")
			# They are leftovers of the exclusive test: out of the way of the reinstall.
			node_exec "$i" rm -f "${f%.headcni-aside}"
		done
	done
	note "configurations set aside by cni.exclusive put back: ${restored[*]:-none (the exclusive test did not run)}"
}

# After the uninstall: HeadCNI again with plain `helm upgrade --install` of chart/ (no script),
# its keys from the Secret deploy-with-helm.sh made (helm uninstall leaves it: not the chart's).
t_helm_install() {
	local secret="$KUBE_HC_RELEASE-headscale-keys" i cidr
	kubectl -n "$KUBE_HC_NS" get secret "$secret" >/dev/null || skip "needs the Secret of deploy-with-helm.sh"
	! helm status "$KUBE_HC_RELEASE" -n "$KUBE_HC_NS" >/dev/null 2>&1 || skip "the release is installed (run after uninstall)"
	helm upgrade --install "$KUBE_HC_RELEASE" "$HC_REPO_DIR/chart" -n "$KUBE_HC_NS" \
		-f "$KUBE_DIR/headcni-values.yaml" \
		--set config.headscale.url="$HC_HS_URL" \
		--set config.headscale.existingSecret="$secret" \
		--set config.headscale.existingSecretKeys.apiKey=apiKey \
		--wait --timeout 3m >>"$HC_STATE_DIR/logs/helm.log" 2>&1 || hc_die "helm upgrade --install failed"
	kube_headcni_rollout_wait 120 || hc_die "the DaemonSet did not roll out"
	for ((i = 1; i <= HC_NODES; i++)); do
		cidr=$(kube_node_pod_cidr "$i")
		hc_wait_for 30 "node-$i: $cidr approved again" _approved_has "node-$i" "$cidr" ||
			hc_die "node-$i: $cidr not approved after the reinstall"
	done
	hc_wait_for 30 "pods across nodes connected again" cross_node_ok || hc_die "pods across nodes not connected after the reinstall"
	note "plain helm upgrade --install (keys from an existing Secret): routes approved again, pods connected"
}

# --- NetworkPolicy -------------------------------------------------------------------

NP_NS=hcnetpol

# np_pods : in $NP_NS, on each node I: sI (app=server), cI (role=client), oI (role=other), each
# serving HTTP on 8080 (agnhost netexec, the port named http) with a readiness probe.
np_pods() {
	local i name labels
	kubectl get namespace "$NP_NS" >/dev/null 2>&1 && return 0
	kubectl create namespace "$NP_NS" >/dev/null
	for ((i = 1; i <= HC_NODES; i++)); do
		for name in s c o; do
			case $name in s) labels="app: server" ;; c) labels="role: client" ;; *) labels="role: other" ;; esac
			kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name$i, namespace: $NP_NS, labels: {$labels}}
spec:
  nodeName: node-$i
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: $KUBE_AGNHOST_IMAGE
    args: [netexec, --http-port=8080, --udp-port=8081]
    ports: [{containerPort: 8080, name: http}]
    readinessProbe:
      httpGet: {path: /healthz, port: 8080}
      periodSeconds: 1
EOF
		done
	done
	kubectl -n "$NP_NS" wait --for=condition=Ready pod --all --timeout=90s >/dev/null ||
		hc_die "the policy test pods are not Ready"
}

# np_reach FROM TO : whether pod FROM gets an HTTP answer from pod TO (a new connection, 2 s).
np_reach() {
	kube_exec "$NP_NS" "$1" curl -fsS --max-time 2 -o /dev/null \
		"http://$(kube_pod_ip "$NP_NS" "$2"):8080/hostname" 2>/dev/null
}
np_denied() { ! np_reach "$@"; }

# np_expect FROM TO yes|no WHY
np_expect() {
	if np_reach "$1" "$2"; then
		[[ $3 == yes ]] || hc_die "$1 -> $2 passed, must be denied: $4"
	else
		[[ $3 == no ]] || hc_die "$1 -> $2 denied, must pass: $4"
	fi
}

# np_policies : servers accept clients on their port named http; clients may reach servers only.
np_policies() {
	kubectl apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: $NP_NS}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{protocol: TCP, port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: $NP_NS}
spec:
  podSelector: {matchLabels: {role: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: server}}}]
EOF
}

# np_engine_on I : node I's engine reports itself on and synced (its status file).
np_engine_on() {
	node_exec "$1" cat "$HC_RUN_DIR/policy.json" | jq -e '.enabled and .synced' >/dev/null
}

# Policies across nodes, both directions: each node enforces the ingress of its own pods and
# the egress of its own pods.
t_netpol() {
	local t0 denied_s i
	((HC_NODES >= 2)) || skip "needs two nodes"
	np_pods
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	# Without policies everything passes (so that a refusal below is a policy's).
	np_expect o1 s2 yes "no policy yet"
	np_expect c2 o1 yes "no policy yet"
	t0=$(hc_now)
	np_policies
	hc_wait_for 10 "o1 -> s2 denied" np_denied o1 s2 || hc_die "o1 -> s2 still passes 10 s after the policies"
	denied_s=$(hc_since "$t0")
	np_expect c1 s2 yes "node 1 client -> node 2 server: ingress (named port) and egress allow"
	np_expect c2 s1 yes "node 2 client -> node 1 server"
	np_expect o1 s2 no "ingress enforced at node 2"
	np_expect o2 s1 no "ingress enforced at node 1"
	np_expect c1 o2 no "egress enforced at node 1"
	np_expect c2 o1 no "egress enforced at node 2"
	np_expect o1 o2 yes "pods no policy isolates"
	np_expect o2 o1 yes "pods no policy isolates"
	np_expect s1 o2 yes "a server's own egress is not isolated"
	np_expect s2 c1 yes "a server's own egress is not isolated"
	kubectl -n "$NP_NS" get pods -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
		grep -qv '^True$' && hc_die "a pod turned unready: the kubelet's probes must pass"
	for ((i = 1; i <= HC_NODES; i++)); do
		np_engine_on "$i" || hc_die "node $i: the engine does not report itself on and synced"
	done
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	hc_wait_for 10 "o1 -> s2 allowed again" np_reach o1 s2 || hc_die "o1 -> s2 still denied after the policies went"
	note "ingress and egress enforced across nodes both ways (10 checks, probes pass); o1 -> s2 denied ${denied_s}s after kubectl apply (curl timeouts included); allowed again after delete"
}

# 100 updates of the policy that lets the traffic in, while the traffic flows: no allowed
# request may fail (every update is one atomic batch, established connections pass first).
t_netpol_churn() {
	local i log=$HC_STATE_DIR/tests/netpol-churn.log fails total pid
	((HC_NODES >= 2)) || skip "needs two nodes"
	np_pods
	np_policies
	hc_wait_for 10 "o1 -> s2 denied" np_denied o1 s2 || hc_die "the policies are not enforced to begin with"
	mkdir -p "$(dirname "$log")"
	# c1 (node 1) -> s2 (node 2): a new connection every 0.1 s, each allowed by the policies
	kube_exec "$NP_NS" c1 rm -f /tmp/churn-done
	kube_exec "$NP_NS" c1 sh -c "until [ -e /tmp/churn-done ]; do curl -fsS --max-time 1 -o /dev/null \
		http://$(kube_pod_ip "$NP_NS" s2):8080/hostname && echo ok || echo FAIL; sleep 0.1; done" >"$log" 2>&1 &
	pid=$!
	for ((i = 1; i <= 100; i++)); do
		kubectl apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: $NP_NS}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{protocol: TCP, port: http}, {protocol: TCP, port: $((9000 + i))}]
  - from: [{ipBlock: {cidr: 10.$((i % 200)).0.0/16}}]
EOF
	done
	kube_exec "$NP_NS" c1 touch /tmp/churn-done
	wait "$pid" || true
	fails=$(grep -c FAIL "$log" || true)
	total=$(grep -cE '^(ok|FAIL)$' "$log" || true)
	((total > 50)) || hc_die "too few requests during the churn ($total)"
	((fails == 0)) || hc_die "$fails of $total allowed requests failed during 100 policy updates"
	np_expect o1 s2 no "still denied after the churn"
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	note "100 updates of the policy admitting the traffic: $total requests c1 -> s2 across nodes during them, none failed"
	note "engine latency from a change seen to its rules in force: node 1 $(np_latency 1); node 2 $(np_latency 2)"
}

# np_latency I : "count, p50 <= X s, p99 <= Y s" of node I's engine from a change seen to the
# rules in force (headcni_policy_enforce_latency_seconds, the upper bounds of its buckets).
np_latency() {
	node_exec "$1" curl -fsS --max-time 5 http://127.0.0.1:8080/metrics |
		awk -F'[{}" ]+' '/^headcni_policy_enforce_latency_seconds_bucket/ { le[n] = $3; c[n++] = $NF }
			END { total = c[n-1]; p50 = p99 = "?";
				for (i = 0; i < n; i++) {
					if (p50 == "?" && c[i] >= 0.5 * total) p50 = le[i]
					if (p99 == "?" && c[i] >= 0.99 * total) p99 = le[i]
				}
				printf "%d changes, p50 <= %s s, p99 <= %s s", total, p50, p99 }'
}

# The agent of node 2 restarted: its table holds while it is away, and what changed meanwhile
# is enforced once it is back.
t_netpol_restart() {
	local old new
	((HC_NODES >= 2)) || skip "needs two nodes"
	np_pods
	np_policies
	hc_wait_for 10 "o1 -> s2 denied" np_denied o1 s2 || hc_die "the policies are not enforced to begin with"
	old=$(kube_agent_pod 2)
	kubectl -n "$KUBE_HC_NS" delete pod "$old" --wait=false >/dev/null
	ip netns exec "$(node_ns 2)" nft list table inet headcni-policy >/dev/null ||
		hc_die "node 2's table went with its agent"
	np_expect o1 s2 no "node 2's agent restarting: its rules stay in force"
	kubectl -n "$NP_NS" delete networkpolicy server-ingress >/dev/null
	kube_headcni_rollout_wait 120 || hc_die "node 2's agent did not come back"
	new=$(kube_agent_pod 2)
	[[ $new != "$old" ]] || hc_die "node 2's agent was not replaced"
	hc_wait_for 15 "o1 -> s2 allowed" np_reach o1 s2 || hc_die "the policy deleted while node 2's agent was away is still enforced"
	np_expect c1 o2 no "node 1 (not restarted) still enforces the egress policy"
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	note "node 2's agent replaced ($old -> $new): its table and rules held meanwhile; a policy deleted meanwhile is no longer enforced once it is back"
}

# np_agent_rss I : the resident memory (KiB) of node I's agent process.
np_agent_rss() {
	local id pid
	id=$(node_crictl "$1" ps --name '^agent$' --state running -q)
	id=${id%%$'\n'*}
	pid=$(node_crictl "$1" inspect "$id" | jq -er '.info.pid')
	awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"
}

# np_watched I KIND : how many objects of KIND node I's engine follows.
np_watched() {
	node_exec "$1" curl -fsS --max-time 5 http://127.0.0.1:8080/metrics |
		awk -v k="$2" -F'[{}" ]+' '$1 == "headcni_policy_watched_objects" && $3 == k { print $NF }'
}
np_watching_all() { (($(np_watched 1 Pod) >= $1 && $(np_watched 1 NetworkPolicy) >= $2)); }

# 1,000 more pods (never scheduled: their nodeSelector matches no node) and 1,000 policies:
# the agent's memory with them followed, and a policy change still enforced at once.
t_netpol_scale() {
	local ns=hcscale f=$HC_STATE_DIR/tests/scale.yaml i rss0 rss1 pods0 pols0 t0 took
	mkdir -p "$(dirname "$f")"
	np_pods
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	pods0=$(np_watched 1 Pod)
	pols0=$(np_watched 1 NetworkPolicy)
	rss0=$(np_agent_rss 1)
	{
		printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s, labels: {team: scale}}\n' "$ns"
		for ((i = 0; i < 1000; i++)); do
			printf -- '---\napiVersion: v1\nkind: Pod\nmetadata: {name: p%d, namespace: %s, labels: {app: a%d, tier: t%d}}\n' \
				"$i" "$ns" $((i % 50)) $((i % 3))
			printf 'spec: {nodeSelector: {headcni-test: nowhere}, containers: [{name: c, image: %s, ports: [{containerPort: 80, name: http}]}]}\n' \
				"$KUBE_AGNHOST_IMAGE"
			printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: pol%d, namespace: %s}\n' "$i" "$ns"
			printf 'spec: {podSelector: {matchLabels: {app: a%d}}, ingress: [{from: [{podSelector: {matchLabels: {tier: t%d}}}, {namespaceSelector: {matchLabels: {team: scale}}}], ports: [{port: http}, {port: %d}]}]}\n' \
				$((i % 50)) $((i % 3)) $((8000 + i))
		done
	} >"$f"
	kubectl apply -f "$f" >/dev/null || hc_die "creating 1,000 pods and 1,000 policies failed"
	hc_wait_for 120 "node 1's engine follows them all" np_watching_all $((pods0 + 1000)) $((pols0 + 1000)) ||
		hc_die "node 1's engine follows $(np_watched 1 Pod) pods and $(np_watched 1 NetworkPolicy) policies"
	sleep 5
	rss1=$(np_agent_rss 1)
	# Enforcement still immediate with all of them followed.
	t0=$(hc_now)
	np_policies
	hc_wait_for 10 "o1 -> s2 denied" np_denied o1 s2 || hc_die "o1 -> s2 still passes 10 s after the policies"
	took=$(hc_since "$t0")
	np_expect c1 s2 yes "the client still reaches the server"
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	kubectl delete namespace "$ns" --wait=false >/dev/null
	note "node 1's agent: RSS $((rss0 / 1024)) MiB following $pods0 pods and $pols0 policies, $((rss1 / 1024)) MiB following $((pods0 + 1000)) pods and $((pols0 + 1000)) policies; a new policy then denied the next connection ${took}s after kubectl apply (curl timeouts included)"
}

# np_has_rule I TEXT : node I's policy table holds a rule whose comment has TEXT.
np_has_rule() { ip netns exec "$(node_ns "$1")" nft list table inet headcni-policy 2>/dev/null | grep -qF "$2"; }

# From a NetworkPolicy written (kubectl apply returned) to its rules in the tables of both
# nodes (each node has a pod it selects): 20 policies one after the other, median and max.
t_netpol_latency() {
	local i t0 t1 n ms
	local -a all=()
	((HC_NODES >= 2)) || skip "needs two nodes"
	np_pods
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	for ((i = 1; i <= 20; i++)); do
		kubectl apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lat-$i, namespace: $NP_NS}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: $((9000 + i))}]}]
EOF
		t0=$(date +%s%N)
		for n in 1 2; do
			until np_has_rule "$n" "$NP_NS/lat-$i ingress"; do
				(($(date +%s%N) - t0 < 10000000000)) || hc_die "node $n: lat-$i not in its table after 10 s"
				sleep 0.01
			done
		done
		t1=$(date +%s%N)
		all+=($(((t1 - t0) / 1000000)))
		kubectl -n "$NP_NS" delete networkpolicy "lat-$i" >/dev/null
	done
	mapfile -t all < <(printf '%s\n' "${all[@]}" | sort -n)
	ms="median ${all[9]} ms, p90 ${all[17]} ms, max ${all[19]} ms (min ${all[0]} ms)"
	note "from a policy written (kubectl apply returned) to its rules in both nodes' tables, 20 policies: $ms"
}

# np_iperf FROM TO : Gbit/s of one iperf3 TCP run (5 s) from pod FROM to pod TO, each run in
# the pod's network namespace.
np_iperf() {
	local to_where srv rate
	to_where=$(kube_pod_where "$NP_NS" "$2")
	hc_in "$to_where" timeout 20 iperf3 -s -1 >/dev/null 2>&1 &
	srv=$!
	sleep 0.5
	rate=$(hc_in "$(kube_pod_where "$NP_NS" "$1")" iperf3 -c "$(kube_pod_ip "$NP_NS" "$2")" -t 5 -J |
		jq -r '.end.sum_received.bits_per_second / 1e9')
	wait "$srv" 2>/dev/null || true
	printf '%.3f\n' "$rate"
}

# np_both_follow N : both nodes' engines follow at least N policies.
np_both_follow() { (($(np_watched 1 NetworkPolicy) >= $1 && $(np_watched 2 NetworkPolicy) >= $1)); }

# np_in_force I : how many policies isolate a pod of node I (its engine's gauge).
np_in_force() {
	node_exec "$1" curl -fsS --max-time 5 http://127.0.0.1:8080/metrics |
		awk '$1 == "headcni_policy_in_force" { print $2 }'
}
np_both_in_force() { (($(np_in_force 1) == $1 && $(np_in_force 2) == $1)); }

# Throughput between pods no policy selects, across the tailnet and on one node, with 1,000
# policies in force on both nodes (isolating the servers) and with none, taking turns 3 times:
# the policies stay written, the servers' label turns them on and off.
t_netpol_throughput() {
	local f=$HC_STATE_DIR/tests/np-throughput.yaml i r state
	local -A across=() same=()
	command -v iperf3 >/dev/null || skip "no iperf3"
	np_pods
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	mkdir -p "$(dirname "$f")"
	for ((i = 0; i < 1000; i++)); do
		printf -- '---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: tp%d, namespace: %s}\n' "$i" "$NP_NS"
		printf 'spec: {podSelector: {matchLabels: {tier: server}}, ingress: [{from: [{podSelector: {matchLabels: {role: client}}}, {ipBlock: {cidr: 10.%d.0.0/16}}], ports: [{port: %d}]}]}\n' \
			$((i % 200)) $((9000 + i))
	done >"$f"
	kubectl apply -f "$f" >/dev/null
	hc_wait_for 120 "both engines follow the 1,000 policies" np_both_follow 1000 ||
		hc_die "the engines do not follow the 1,000 policies"
	for ((r = 1; r <= 3; r++)); do
		for state in none policies; do
			if [[ $state == policies ]]; then
				kubectl -n "$NP_NS" label pod s1 s2 tier=server --overwrite >/dev/null
				hc_wait_for 30 "1,000 policies in force on both nodes" np_both_in_force 1000 || hc_die "the policies are not in force"
				np_expect o1 s2 no "the servers are isolated"
			else
				kubectl -n "$NP_NS" label pod s1 s2 tier- >/dev/null 2>&1 || true
				hc_wait_for 30 "no policy in force" np_both_in_force 0 || hc_die "policies still in force"
			fi
			across[$state]+=" $(np_iperf o1 o2)"
			same[$state]+=" $(np_iperf o1 c1)"
		done
	done
	# The namespace's deletion removes the policies together (the namespace controller), and the
	# next test makes the pods again.
	kubectl delete namespace "$NP_NS" --timeout=180s >/dev/null || hc_die "$NP_NS was not deleted"
	note "iperf3 Gbit/s, o1 -> o2 across the tailnet: none${across[none]}; with 1,000 policies in force${across[policies]}"
	note "iperf3 Gbit/s, o1 -> c1 on node 1: none${same[none]}; with 1,000 policies in force${same[policies]}"
}

t_netpol_off() {
	local i
	((HC_NODES >= 2)) || skip "needs two nodes"
	np_pods
	np_policies
	hc_wait_for 10 "o1 -> s2 denied" np_denied o1 s2 || hc_die "the policies are not enforced to begin with"
	helm_upgrade --set config.network.networkPolicy=false || hc_die "helm upgrade failed"
	kube_headcni_rollout_wait 180 || hc_die "the DaemonSet did not roll out"
	for ((i = 1; i <= HC_NODES; i++)); do
		ip netns exec "$(node_ns "$i")" nft list table inet headcni-policy >/dev/null 2>&1 &&
			hc_die "node $i: table inet headcni-policy is still there with enforcement off"
		node_exec "$i" cat "/etc/cni/net.d/$HC_CONFLIST" | jq -e '.plugins[0].enable_network_policy == false' >/dev/null ||
			hc_die "node $i: the conflist does not say enable_network_policy false"
		node_exec "$i" cat "$HC_RUN_DIR/policy.json" | jq -e '.enabled == false' >/dev/null ||
			hc_die "node $i: the engine does not report itself off"
	done
	np_expect o1 s2 yes "enforcement off"
	np_expect c1 o2 yes "enforcement off"
	helm_upgrade --set config.network.networkPolicy=true || hc_die "helm upgrade failed"
	kube_headcni_rollout_wait 180 || hc_die "the DaemonSet did not roll out"
	hc_wait_for 15 "o1 -> s2 denied again" np_denied o1 s2 || hc_die "enforcement did not come back"
	kubectl -n "$NP_NS" delete networkpolicy --all >/dev/null
	note "networkPolicy=false: no node has table inet headcni-policy, every conflist and engine says off, the policies no longer hold; back on: enforced again"
}

tr_run "${WANT[@]}"
rc=0
tr_summary "kube-tests.sh: prefix $HC_PREFIX, Kubernetes $KUBE_VERSION, setup ${SETUP_S} s" || rc=1

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	cat <<EOF

Left running (--keep). Look around:
  ip netns exec $(node_ns "$KUBE_CP") $KUBE_BIN_DIR/kubectl --kubeconfig $KUBE_ADMIN_KUBECONFIG get nodes,pods -A -o wide
  nsenter -t $(node_ctx_pid 1) -n -m -- bash                     # a shell on node 1
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
fi
tr_finish "$rc" kube-tests.sh
exit "$TR_RC"
