# shellcheck shell=bash
# integration/lib/headcni.sh: HeadCNI itself on the harness's nodes.
#
#  * hcni_build              the binary from this repository (the static one
#                            that ships when the musl target is installed,
#                            else the host's release build; niced, one build
#                            at a time), or $HEADCNI_BIN; a copy lands in the
#                            state dir so a rebuild during a run changes nothing
#  * hcni_install I          `headcni install` inside node I's context: the
#                            node's own /opt/cni/bin and /etc/cni/net.d (the
#                            reference network is removed first)
#  * hcni_agent_start I      `headcni agent` on node I (node_spawn): the
#                            zero-config join through the LocalAPI with the
#                            pre-auth key FILE, pod CIDR 10.244.I.0/24,
#                            approval by API key (--api-key-file) or by the
#                            policy's autoApprovers
#  * hcni_join_cli I         debug aid only (HC_JOIN=cli): the tailscale CLI
#                            joins and the harness writes the node file the
#                            agent would write; no masquerade, no metrics
#  * pod_add I NAME          a "pod": a network namespace inside node I,
#                            attached to the node's conflist by cnitool
#                            (libcni: chain, cniVersions, result cache,
#                            prevResult on DEL), i.e. through the real plugin
#  * hcni_metrics I, hcni_status I [--json], hcni_ipam I ARGS...
#
# Nothing here touches the root namespace: every command that configures
# something runs inside a node's context (node_exec) or a pod netns in it.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=topology.sh
source "$(dirname "${BASH_SOURCE[0]}")/topology.sh"
# shellcheck source=headscale.sh
source "$(dirname "${BASH_SOURCE[0]}")/headscale.sh"
# shellcheck source=node.sh
source "$(dirname "${BASH_SOURCE[0]}")/node.sh"
# shellcheck source=runtimes.sh
source "$(dirname "${BASH_SOURCE[0]}")/runtimes.sh"
# shellcheck source=checks.sh
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"

HC_REPO_DIR=${HC_REPO_DIR:-$(cd "$HC_LIB_DIR/../.." && pwd)}
HC_NET=${HC_NET:-headcni}                 # network name in the conflist
HC_CONFLIST=${HC_CONFLIST:-10-headcni.conflist}
HC_METRICS_PORT=${HC_METRICS_PORT:-9402}
HC_RUN_DIR=${HC_RUN_DIR:-/run/headcni}    # per node (bind mount in the node context)
HC_TS_SOCKET_IN_NODE=/run/tailscale/tailscaled.sock
# HC_JOIN: agent (default when the binary has `headcni agent`) or cli.
# HC_IPAM: headcni-ipam (default when the binary's IPAM allocates) or host-local.

# --- the binary ---------------------------------------------------------------

# hcni_build : sets HEADCNI_BIN (the built or given binary) and HC_BIN (its
# copy in the state dir, used for the whole run).
hcni_build() {
	local t0
	t0=$(hc_now)
	if [[ -n "${HEADCNI_BIN:-}" ]]; then
		[[ -x "$HEADCNI_BIN" ]] || hc_die "HEADCNI_BIN=$HEADCNI_BIN is not an executable"
		hc_log "headcni: using HEADCNI_BIN=$HEADCNI_BIN"
	else
		command -v cargo >/dev/null || hc_die "cargo is needed to build headcni (or set HEADCNI_BIN)"
		# One heavy build at a time on this machine, niced.
		# The lock and the log live with the build output (target/, ignored by git).
		local out=$HC_REPO_DIR/target
		mkdir -p "$out"
		exec {_hc_buildfd}>"$out/.harness-build.lock"
		flock "$_hc_buildfd"
		# The binary that ships (and that the Kubernetes harness puts in its image) when the
		# static target is there: one release build serves every stage of the suite.
		local musl=x86_64-unknown-linux-musl
		local -a target=()
		rustup target list --installed 2>/dev/null | grep -qx "$musl" && target=(--target "$musl")
		hc_log "headcni: cargo build --release ${target[*]} in $HC_REPO_DIR (niced; log: $out/harness-build.log)"
		if ! (cd "$HC_REPO_DIR" && CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
			nice -n 10 cargo build --release --locked "${target[@]}") >"$out/harness-build.log" 2>&1; then
			tail -n 30 "$out/harness-build.log" >&2
			exec {_hc_buildfd}>&-
			hc_die "cargo build failed"
		fi
		exec {_hc_buildfd}>&-
		HEADCNI_BIN=$HC_REPO_DIR/target/release/headcni
		((${#target[@]} == 0)) || HEADCNI_BIN=$HC_REPO_DIR/target/$musl/release/headcni
	fi
	export HEADCNI_BIN
	hc_log "headcni: $("$HEADCNI_BIN" version 2>/dev/null || echo '?') ($(hc_since "$t0")s)"
}

# hcni_stage : copy the binary into the state dir (after hc_state_init).
hcni_stage() {
	mkdir -p "$HC_STATE_DIR/bin"
	install -m 0755 "$HEADCNI_BIN" "$HC_STATE_DIR/bin/headcni"
	HC_BIN=$HC_STATE_DIR/bin/headcni
	export HC_BIN
	hcni_pick_modes
}

hcni_has_agent() { "${HC_BIN:-$HEADCNI_BIN}" agent --help >/dev/null 2>&1; }
hcni_has_status() { "${HC_BIN:-$HEADCNI_BIN}" status --help >/dev/null 2>&1; }
hcni_has_ipam_cli() { "${HC_BIN:-$HEADCNI_BIN}" ipam --help >/dev/null 2>&1; }
# The IPAM plugin allocates (the early builds answer every verb with an error).
hcni_has_ipam() {
	local out
	out=$(printf '{"cniVersion":"1.1.0","name":"probe","type":"headcni-ipam"}' |
		CNI_COMMAND=STATUS CNI_PATH=/nonexistent HEADCNI_LOG_FILE=/dev/null \
			bash -c 'exec -a headcni-ipam "$0"' "${HC_BIN:-$HEADCNI_BIN}" 2>/dev/null) || true
	! grep -q 'not available in this build' <<<"$out" && hcni_has_ipam_cli
}

# hcni_pick_modes : HC_JOIN and HC_IPAM from the environment or the binary.
hcni_pick_modes() {
	if [[ -z "${HC_JOIN:-}" ]]; then
		if hcni_has_agent; then HC_JOIN=agent; else
			HC_JOIN=cli
			hc_warn "this headcni has no 'agent' subcommand: joining with the tailscale CLI (debug path)"
		fi
	fi
	[[ "$HC_JOIN" == agent || "$HC_JOIN" == cli ]] || hc_die "HC_JOIN must be agent or cli (got '$HC_JOIN')"
	[[ "$HC_JOIN" == cli ]] || hcni_has_agent || hc_die "HC_JOIN=agent, but $HC_BIN has no 'agent' subcommand"
	if [[ -z "${HC_IPAM:-}" ]]; then
		if hcni_has_ipam; then HC_IPAM=headcni-ipam; else
			HC_IPAM="host-local"
			hc_warn "this headcni-ipam does not allocate yet: using host-local"
		fi
	fi
	export HC_JOIN HC_IPAM
	hc_log "headcni: join via $HC_JOIN, IPAM $HC_IPAM"
}

# --- install --------------------------------------------------------------------

# hcni_install I [--ipam KIND] [INSTALL FLAGS...] : HeadCNI into node I's bin
# and conf dirs, with the standard plugins (host-local, portmap, bandwidth,
# ...) next to it. The IPAM is $HC_IPAM unless given.
hcni_install() {
	local i=$1 ipam=${HC_IPAM:-host-local}
	shift
	if [[ "${1:-}" == --ipam ]]; then
		ipam=$2
		shift 2
	fi
	rt_ref_plugins "$i"
	rt_ref_remove "$i"
	node_exec "$i" "$HC_BIN" install --ipam "$ipam" --run-dir "$HC_RUN_DIR" "$@" \
		>>"$HC_STATE_DIR/logs/install-n$i.log" 2>&1 ||
		{
			tail -n 5 "$HC_STATE_DIR/logs/install-n$i.log" >&2
			hc_die "headcni install failed on node $i"
		}
	node_exec "$i" test -x /opt/cni/bin/headcni || hc_die "node $i: /opt/cni/bin/headcni missing after install"
	node_exec "$i" test -f "/etc/cni/net.d/$HC_CONFLIST" || hc_die "node $i: conflist missing after install"
}

# hcni_conflist I : the conflist as installed on node I.
hcni_conflist() { cat "$(node_dir "$1")/mnt/etc/cni/net.d/$HC_CONFLIST"; }

# --- the agent -------------------------------------------------------------------

hcni_agent_label() { printf 'agent-n%s\n' "$1"; }

# hcni_agent_args I [api] : the agent's flags for node I (secrets as files only).
hcni_agent_args() {
	local i=$1 mode=${2:-auto}
	HC_AGENT_ARGS=(agent --node-name "$(node_hostname "$i")" --hostname "$(node_hostname "$i")"
		--pod-cidr "$(node_pod_cidr "$i")" --cluster-cidr "$HC_CLUSTER_CIDR"
		--tailscale-socket "$HC_TS_SOCKET_IN_NODE" --headscale-url "$HC_HS_URL" --headscale-ca-file "$HC_HS_CA"
		--auth-key-file "$HC_STATE_DIR/authkey"
		--run-dir "$HC_RUN_DIR" --metrics-port "$HC_METRICS_PORT")
	# Headscale is plain http inside the harness's namespaces: the API key may travel in clear.
	if [[ "$mode" == api ]]; then HC_AGENT_ARGS+=(--api-key-file "$HC_STATE_DIR/apikey" --allow-http-api-key); fi
	printf '%s\n' "$mode" >"$(node_dir "$i")/agent.mode"
}

# hcni_agent_start I [api|auto] : start the agent (api: approves its own
# route with the API key; auto: relies on the policy's autoApprovers).
hcni_agent_start() {
	local i=$1 mode=${2:-}
	[[ -n "$mode" ]] || mode=$(cat "$(node_dir "$i")/agent.mode" 2>/dev/null || echo auto)
	hcni_agent_args "$i" "$mode"
	node_spawn "$i" "$(hcni_agent_label "$i")" env HEADCNI_LOG_LEVEL="${HC_AGENT_LOG_LEVEL:-info}" \
		"$HC_BIN" "${HC_AGENT_ARGS[@]}"
}

hcni_agent_stop() { hc_stop_label "$(hcni_agent_label "$1")" 15; }

# hcni_agent_cleanup I : `headcni agent --cleanup` with the node's flags
# (withdraws the routes it advertised and approved, removes its rules and
# nft table). The agent must be stopped first.
hcni_agent_cleanup() {
	local i=$1 mode
	mode=$(cat "$(node_dir "$i")/agent.mode" 2>/dev/null || echo auto)
	hcni_agent_args "$i" "$mode"
	node_exec "$i" "$HC_BIN" "${HC_AGENT_ARGS[@]}" --cleanup >>"$HC_STATE_DIR/logs/cleanup-n$i.log" 2>&1
}

hcni_http() { # I PATH : GET from the agent's metrics server, inside node I
	node_exec "$1" curl -fsS --max-time 3 "http://127.0.0.1:$HC_METRICS_PORT$2"
}
hcni_ready() { hcni_http "$1" /readyz >/dev/null 2>&1; }
hcni_metrics() { hcni_http "$1" /metrics; }

# hcni_metric I NAME_WITH_LABELS : one sample's value (0 when absent).
hcni_metric() {
	hcni_metrics "$1" | awk -v m="$2" '$1==m {v=$2} END {print (v=="" ? 0 : v+0)}'
}

hcni_node_file() { printf '%s/mnt%s/subnet.env\n' "$(node_dir "$1")" "$HC_RUN_DIR"; }

# hcni_node_up I [api|auto] : tailscaled, then the agent (or the CLI join),
# and wait until the node is ready (node file written, route advertised).
hcni_node_up() {
	local i=$1 mode=${2:-auto} t0
	t0=$(hc_now)
	node_tailscaled_start "$i"
	if [[ "$HC_JOIN" == agent ]]; then
		hcni_agent_start "$i" "$mode"
		hc_wait_daemon 60 "$(hcni_agent_label "$i")" "agent n$i ready" hcni_ready "$i" ||
			hc_die "the agent on node $i did not become ready"
	else
		hcni_join_cli "$i" "$mode"
	fi
	[[ -s "$(hcni_node_file "$i")" ]] || hc_die "node $i: no node file after the join"
	hc_log "node $i joined and ready via $HC_JOIN ($mode approval) in $(hc_since "$t0")s"
}

# hcni_join_cli I [api|auto] : DEBUG AID. What the agent does, with the CLI:
# join, advertise, accept routes, no SNAT; approve by API if asked; write
# the node file. (No masquerade, no policy rule, no metrics.)
hcni_join_cli() {
	local i=$1 mode=${2:-auto} cidr
	cidr=$(node_pod_cidr "$i")
	node_ts_up "$i" "$HC_STATE_DIR/authkey" >>"$HC_STATE_DIR/logs/join-n$i.log" 2>&1 ||
		hc_die "node $i failed to join (see $HC_STATE_DIR/logs/join-n$i.log)"
	if [[ "$mode" == api ]]; then
		hc_wait_for 10 "node-$i advertises $cidr" hs_node_available "node-$i" "$cidr" ||
			hc_die "node-$i does not advertise $cidr"
		local -a have
		mapfile -t have < <(hs_node_field "node-$i" '(.approved_routes // [])[]' | tr -d '"')
		hs_approve_routes "$HC_STATE_DIR/apikey" "node-$i" "${have[@]}" "$cidr" >/dev/null
	fi
	local mtu
	mtu=$(node_exec "$i" cat /sys/class/net/tailscale0/mtu)
	node_exec "$i" mkdir -p "$HC_RUN_DIR"
	printf 'HEADCNI_NODE_NAME=%s\nHEADCNI_POD_CIDRS=%s\nHEADCNI_CLUSTER_CIDRS=%s\nHEADCNI_MTU=%s\n' \
		"node-$i" "$cidr" "$HC_CLUSTER_CIDR" "$mtu" >"$(hcni_node_file "$i").tmp"
	mv -f "$(hcni_node_file "$i").tmp" "$(hcni_node_file "$i")"
	printf '%s\n' "$mode" >"$(node_dir "$i")/agent.mode"
}

# hcni_status I [--json]
hcni_status() {
	local i=$1
	shift
	node_exec "$i" "$HC_BIN" status --tailscale-socket "$HC_TS_SOCKET_IN_NODE" --run-dir "$HC_RUN_DIR" "$@"
}

# hcni_ipam I ARGS... : `headcni ipam ARGS` on node I (its own data dir).
hcni_ipam() {
	local i=$1
	shift
	node_exec "$i" "$HC_BIN" ipam "$@"
}

# hcni_ipam_kind I : the IPAM plugin of node I's conflist.
hcni_ipam_kind() { hcni_conflist "$1" | jq -r '.plugins[0].ipam.type'; }

# hcni_ipam_holds I IP : node I's IPAM store has IP allocated (host-local: its
# file per address; headcni-ipam: `headcni ipam list --json`).
hcni_ipam_holds() {
	local i=$1 ip=$2
	case "$(hcni_ipam_kind "$i")" in
	host-local) [[ -e "$(node_dir "$i")/mnt/var/lib/cni/networks/$HC_NET/$ip" ]] ;;
	headcni-ipam)
		hcni_ipam "$i" list --json 2>/dev/null |
			jq -e --arg ip "$ip" 'any(.allocations[]; (.address | split("/")[0]) == $ip)' >/dev/null
		;;
	*) return 2 ;;
	esac
}

# --- pods: network namespaces attached through the real plugin -----------------

pod_ns() { printf 'pod-%s\n' "$1"; }
pod_where() { printf 'pod:%s:%s\n' "$1" "$(pod_ns "$2")"; }
pod_dir() { printf '%s/pods\n' "$(node_dir "$1")"; }

# cnitool inside node I, against the node's conflist and plugins.
node_cnitool() {
	local i=$1
	shift
	node_exec "$i" env CNI_PATH=/opt/cni/bin NETCONFPATH=/etc/cni/net.d "$CNITOOL_BIN" "$@"
}

# pod_add I NAME : a pod netns on node I, ADD through the node's conflist;
# prints the pod's IPv4 address. The result is kept in pods/NAME.json.
pod_add() {
	local i=$1 name=$2 ns holder hst out
	ns=$(pod_ns "$name")
	mkdir -p "$(pod_dir "$i")"
	holder=$(node_ctx_pid "$i")
	hst=$(hc_pid_starttime "$holder")
	# undo: netns delete last, DEL first (the journal is replayed backwards)
	hc_record nscmd "$holder" "$hst" ip netns delete "$ns"
	node_exec "$i" ip netns add "$ns"
	node_exec "$i" ip -n "$ns" link set lo up
	hc_record nscmd "$holder" "$hst" env CNI_PATH=/opt/cni/bin NETCONFPATH=/etc/cni/net.d \
		"$CNITOOL_BIN" del "$HC_NET" "/run/netns/$ns"
	if ! out=$(node_cnitool "$i" add "$HC_NET" "/run/netns/$ns" 2>>"$HC_STATE_DIR/logs/cnitool-n$i.log"); then
		hc_warn "ADD of pod $name on node $i failed: $out $(tail -n 3 "$HC_STATE_DIR/logs/cnitool-n$i.log")"
		return 1
	fi
	printf '%s\n' "$out" >"$(pod_dir "$i")/$name.json"
	jq -er '[.ips[] | select(.address | test("^[0-9.]+/")) | .address][0] | split("/")[0]' \
		<<<"$out"
}

# pod_ip I NAME : the IPv4 address from the ADD result.
pod_ip() {
	jq -er '[.ips[] | select(.address | test("^[0-9.]+/")) | .address][0] | split("/")[0]' \
		"$(pod_dir "$1")/$2.json"
}

# pod_del I NAME : DEL through the conflist, then the netns goes.
pod_del() {
	local i=$1 name=$2 ns
	ns=$(pod_ns "$name")
	node_cnitool "$i" del "$HC_NET" "/run/netns/$ns" >/dev/null 2>>"$HC_STATE_DIR/logs/cnitool-n$i.log" || return 1
	node_exec "$i" ip netns delete "$ns"
	rm -f "$(pod_dir "$i")/$name.json"
}

# pod_exec I NAME CMD... : run CMD in the pod's network namespace.
pod_exec() {
	local i=$1 name=$2
	shift 2
	hc_in "$(pod_where "$i" "$name")" "$@"
}

# pod_addr_now I NAME : the IPv4 address eth0 has right now (from the kernel).
pod_addr_now() {
	pod_exec "$1" "$2" ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1
}

# node_veths I : the host ends of HeadCNI's veth pairs on node I (hc + hex).
node_veths() {
	ip -n "$(node_ns "$1")" -o link show type veth | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^hc[0-9a-f]+$' || true
}

# node_pod_routes I : /32 routes to pods in node I's main table.
node_pod_routes() {
	ip -n "$(node_ns "$1")" -4 route show table main | awk '$1 ~ /^10\.244\./ && $1 !~ /\// {print $1}'
}
