#!/usr/bin/env bash
# integration/runtime-tests.sh: the CNI plugin driven by real container
# runtimes on one node, no tailnet: podman 4.3 (CNI backend), containerd 1.6
# through `ctr run --cni` (which reads only /etc/cni/net.d and /opt/cni/bin:
# the node context has its own there) and through its CRI plugin (crictl).
# Each runtime, with each IPAM (host-local, and headcni-ipam when this build
# has it), must give the container an address from the node's pod CIDR and
# the node file's MTU, let it reach its gateway and the node, and leave
# nothing behind when the container is removed: no veth, no route, no IPAM
# record, no libcni cache entry, no network namespace.
#
# The node file the agent would write is written by the harness here (pod
# CIDR 10.244.1.0/24, MTU 1280): no tailnet is needed for these tests.
#
# usage: integration/runtime-tests.sh [--prefix P] [--keep] [--list] [TEST...]
# env: HEADCNI_BIN (skip the build), HC_KEEP_STATE=1 (keep the logs)
# Exits non-zero when any test fails; tears down on exit, error and Ctrl-C.
# shellcheck disable=SC2317 # test functions and helpers are called by name (tr_run, hc_wait_for)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ALL_TESTS=(podman_host_local ctr_host_local crictl_host_local
	podman_headcni_ipam ctr_headcni_ipam crictl_headcni_ipam)
# shellcheck source=lib/args.sh
source "$here/lib/args.sh"
declare -a WANT=()
tr_parse_args "$@"

export HC_PREFIX=${HC_PREFIX:-hcrt}
export HC_NODES=1
# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/headcni.sh
source "$here/lib/headcni.sh"
# shellcheck source=lib/testing.sh
source "$here/lib/testing.sh"

hc_require_root
N=1 # the node
CIDR=$(node_pod_cidr $N)
IPAM_GW=10.244.$N.1      # the range's gateway in the IPAM config: never a pod's address
GW=169.254.1.1           # the pod's gateway: link-local, the host end of its veth
NODE_ADDR=$(node_addr $N) # what a pod reaches through its gateway
MTU=1280
CTR_NS=hcrt # containerd namespace for `ctr run` (the CRI uses k8s.io)

# --- helpers ---------------------------------------------------------------------

# use_ipam KIND : (re)install HeadCNI with that IPAM plugin.
use_ipam() {
	if [[ "$1" == headcni-ipam ]] && ! hcni_has_ipam; then
		skip "this headcni-ipam does not allocate yet"
	fi
	hcni_install "$N" --ipam "$1"
	jq -e --arg k "$1" '.plugins[0].ipam.type == $k' <<<"$(hcni_conflist "$N")" >/dev/null ||
		hc_die "the installed conflist does not use $1"
}

# snapshot : what must come back after a container is removed.
snapshot() {
	{
		echo "# veths"
		node_veths "$N"
		echo "# pod routes"
		node_pod_routes "$N"
		echo "# netns"
		node_exec "$N" ls /run/netns
		echo "# libcni cache"
		node_exec "$N" sh -c 'ls /var/lib/cni/results 2>/dev/null || true'
	} 2>/dev/null
}

ipam_holds() { hcni_ipam_holds "$N" "$2"; }

# check_attached KIND IP MTU_SEEN : address in the pod CIDR, MTU, IPAM record.
check_attached() {
	local kind=$1 ip=$2 mtu=$3
	if [[ -z "$ip" || "$ip" == "$IPAM_GW" ]] || ! cidr_has "$CIDR" "$ip"; then
		hc_die "address '$ip' is not a pod address of $CIDR"
	fi
	[[ "$mtu" == "$MTU" ]] || hc_die "eth0 MTU is $mtu, the node file says $MTU"
	ipam_holds "$kind" "$ip" || hc_die "$kind has no record of $ip"
	node_pod_routes "$N" | grep -qx "$ip" || hc_die "the node has no route to $ip"
	hc_wait_for 5 "node reaches $ip" ping_ok "node:$N" "$ip" 1 || hc_die "the node cannot reach $ip"
}

# check_clean KIND IP BEFORE : nothing of the container is left.
check_clean() {
	local kind=$1 ip=$2 before=$3 after
	after=$(snapshot)
	if [[ "$after" != "$before" ]]; then
		hc_die "left behind: $(diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") | grep '^[<>]' | tr '\n' ' ')"
	fi
	! ipam_holds "$kind" "$ip" || hc_die "$kind still holds $ip"
	note "removed: no veth, route, netns, libcni cache entry or $kind record left for $ip"
}

node_ctr_ns() { node_exec "$N" ctr --address "$(ctd_sock "$N")" --namespace "$CTR_NS" "$@"; }

# --- the tests ---------------------------------------------------------------------

_podman() { # KIND
	local kind=$1 before ip mtu name=pm-${1%%-*}
	use_ipam "$kind"
	before=$(snapshot)
	HC_CNI_NET=$HC_NET pm_run "$N" "$name" >/dev/null
	ip=$(pm_ip "$N" "$name")
	mtu=$(node_podman "$N" exec "$name" cat /sys/class/net/eth0/mtu)
	check_attached "$kind" "$ip" "$mtu"
	node_podman "$N" exec "$name" ping -c 2 -W 2 "$NODE_ADDR" >/dev/null ||
		hc_die "the container cannot reach the node ($NODE_ADDR) through its gateway $GW"
	note "podman container $name: $ip/$MTU, reaches the node through its gateway $GW"
	pm_rm "$N" "$name" 2>/dev/null
	check_clean "$kind" "$ip" "$before"
}

_ctr() { # KIND : ctr run --cni --rm in the foreground (run in the background
	# here), stopped with `ctr task kill`: ctr then removes the network itself.
	# (A detached `ctr run -d --cni` never calls DEL: ctr is a debug tool.)
	local kind=$1 before ip mtu id=ctr-${1%%-*} pid
	use_ipam "$kind"
	before=$(snapshot)
	local holder hst
	holder=$(node_ctx_pid "$N")
	hst=$(hc_pid_starttime "$holder")
	hc_record nscmd "$holder" "$hst" ctr --address "$(ctd_sock "$N")" --namespace "$CTR_NS" c rm "$id"
	hc_record nscmd "$holder" "$hst" ctr --address "$(ctd_sock "$N")" --namespace "$CTR_NS" task kill -s KILL "$id"
	node_ctr_ns run --cni --rm --snapshotter native --cgroup "/$(node_cgroup "$N")/$id" \
		"$HC_IMAGE_REF" "$id" >>"$HC_STATE_DIR/logs/ctr-$id.log" 2>&1 &
	pid=$!
	_running() { node_ctr_ns task ls | awk -v id="$1" '$1==id && $3=="RUNNING" {f=1} END {exit !f}'; }
	hc_wait_for 20 "ctr task $id running" _running "$id" || hc_die "ctr run --cni did not start $id"
	# the task runs before ctr attached the network: wait for eth0's address
	_ctr_ip() { node_ctr_ns task exec --exec-id "ip$RANDOM" "$id" ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1; }
	_ctr_has_ip() { [[ -n "$(_ctr_ip)" ]]; }
	hc_wait_for 10 "$id has an address" _ctr_has_ip || true
	ip=$(_ctr_ip)
	mtu=$(node_ctr_ns task exec --exec-id "mtu$RANDOM" "$id" cat /sys/class/net/eth0/mtu)
	check_attached "$kind" "$ip" "$mtu"
	node_ctr_ns task exec --exec-id "ping$RANDOM" "$id" ping -c 2 -W 2 "$NODE_ADDR" >/dev/null ||
		hc_die "the ctr container cannot reach the node ($NODE_ADDR) through its gateway $GW"
	note "ctr run --cni $id: $ip/$MTU, reaches the node through its gateway $GW"
	node_ctr_ns task kill "$id"
	local k
	for ((k = 0; k < 100; k++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	wait "$pid" || hc_die "ctr run exited with $? (see logs/ctr-$id.log)"
	check_clean "$kind" "$ip" "$before"
}

_crictl() { # KIND
	local kind=$1 before ip mtu pod name=cri-${1%%-*}
	use_ipam "$kind"
	before=$(snapshot)
	pod=$(ctd_run_pod "$N" "$name")
	ip=$(ctd_pod_ip "$N" "$pod")
	mtu=$(ctd_exec "$N" "$pod" cat /sys/class/net/eth0/mtu)
	check_attached "$kind" "$ip" "$mtu"
	ctd_exec "$N" "$pod" ping -c 2 -W 2 "$NODE_ADDR" >/dev/null ||
		hc_die "the crictl pod cannot reach the node ($NODE_ADDR) through its gateway $GW"
	note "crictl pod $name: $ip/$MTU, reaches the node through its gateway $GW"
	if [[ "$kind" == headcni-ipam ]]; then
		# the CRI passes K8S_POD_NAMESPACE/K8S_POD_NAME: the record names the pod
		hcni_ipam "$N" list --json | jq -e --arg ip "$ip" --arg n "$name" \
			'any(.allocations[]; (.address | split("/")[0]) == $ip and .podName == $n and .podNamespace == "default")' \
			>/dev/null || hc_die "headcni-ipam's record of $ip does not name the pod default/$name"
		note "headcni-ipam's record of $ip names the pod default/$name"
	fi
	ctd_rm_pod "$N" "$pod"
	check_clean "$kind" "$ip" "$before"
}

t_podman_host_local() { _podman host-local; }
t_ctr_host_local() { _ctr host-local; }
t_crictl_host_local() { _crictl host-local; }
t_podman_headcni_ipam() { _podman headcni-ipam; }
t_ctr_headcni_ipam() { _ctr headcni-ipam; }
t_crictl_headcni_ipam() { _crictl headcni-ipam; }

# --- setup ---------------------------------------------------------------------------

tr_setup_begin
# the node file the agent would write (no tailnet here)
node_exec "$N" mkdir -p "$HC_RUN_DIR"
printf 'HEADCNI_NODE_NAME=node-%s\nHEADCNI_POD_CIDRS=%s\nHEADCNI_CLUSTER_CIDRS=%s\nHEADCNI_MTU=%s\n' \
	"$N" "$CIDR" "$HC_CLUSTER_CIDR" "$MTU" >"$(hcni_node_file "$N")"
hcni_install "$N" --ipam host-local
ctd_start "$N"
node_ctr_ns images import --snapshotter native "$HC_IMAGE_ARCHIVE" >/dev/null
pm_prepare "$N"
SETUP_S=$(hc_since "$T_SETUP")
hc_log "== setup done in ${SETUP_S}s"

tr_run "${WANT[@]}"
rc=0
tr_summary "runtime-tests.sh: prefix $HC_PREFIX, headcni-ipam $(hcni_has_ipam && echo available || echo 'not available'), setup ${SETUP_S} s" || rc=1
if [[ "${HC_KEEP:-0}" == 1 ]]; then
	printf '\nLeft running (--keep). A shell on the node: nsenter -t %s -n -m -- bash\nTear down: %s/teardown.sh %s\n' \
		"$(node_ctx_pid "$N")" "$here" "$HC_PREFIX"
fi
tr_finish "$rc" runtime-tests.sh
exit "$TR_RC"
