# shellcheck shell=bash
# integration/lib/node.sh: tailscaled per node, and the CLI join path.
#
# tailscaled runs in the node context (see topology.sh) with
#   --statedir /var/lib/tailscale  --socket /run/tailscale/tailscaled.sock
#   --tun tailscale0               --port 41641
# Those paths are per-node bind mounts, so inside the node the defaults work
# (`node_exec I tailscale status`), and from the root namespace the socket is
# reachable at $(node_ts_socket I).
#
# Environment of every tailscaled:
#   SSL_CERT_FILE=$HC_HS_CA    trust the run's private CA (Headscale's https
#                              and its embedded DERP; see headscale.sh) and
#                              nothing else
#   --no-logs-no-support       never try to upload logs
# The join (`node_ts_up`) passes --accept-dns=false: tailscaled never touches
# DNS config (and /etc/resolv.conf is a per-node copy anyway).

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=topology.sh
source "$(dirname "${BASH_SOURCE[0]}")/topology.sh"
# shellcheck source=headscale.sh
source "$(dirname "${BASH_SOURCE[0]}")/headscale.sh"

HC_TS_PORT=${HC_TS_PORT:-41641}
HC_TS_ENV=${HC_TS_ENV:-}

node_hostname() { printf 'node-%s\n' "$1"; }
node_ts_socket() { printf '%s/mnt/run/tailscale/tailscaled.sock\n' "$(node_dir "$1")"; }

# node_ts I ARGS... : the tailscale CLI against node I's tailscaled, run
# inside the node (some subcommands, e.g. netcheck, send packets themselves).
node_ts() {
	local i=$1
	shift
	node_exec "$i" "$TAILSCALE_BIN" --socket /run/tailscale/tailscaled.sock "$@"
}

node_ts_status_json() { node_ts "$1" status --json; }
node_ts_backend_state() { node_ts_status_json "$1" 2>/dev/null | jq -r '.BackendState // empty'; }
node_ts_ip4() { node_ts "$1" ip -4 2>/dev/null | head -n1; }

_node_ts_socket_ok() { node_ts "$1" status --json >/dev/null 2>&1 || [[ "$(node_ts_backend_state "$1")" != "" ]]; }

# node_tailscaled_start I
node_tailscaled_start() {
	local i=$1 t0
	t0=$(hc_now)
	# shellcheck disable=SC2086
	node_spawn "$i" "tailscaled-n$i" \
		env SSL_CERT_FILE="$HC_HS_CA" $HC_TS_ENV \
		"$TAILSCALED_BIN" --statedir=/var/lib/tailscale \
		--socket=/run/tailscale/tailscaled.sock --tun=tailscale0 \
		--port="$HC_TS_PORT" --no-logs-no-support
	hc_wait_daemon 20 "tailscaled-n$i" "tailscaled n$i socket" test -S "$(node_ts_socket "$i")" ||
		hc_die "tailscaled on node $i did not create its socket"
	hc_wait_daemon 20 "tailscaled-n$i" "tailscaled n$i LocalAPI" _node_ts_socket_ok "$i" ||
		hc_die "tailscaled on node $i does not answer"
	hc_log "tailscaled n$i up ($(hc_since "$t0")s)"
}

node_tailscaled_stop() { hc_stop_label "tailscaled-n$1" 15; }

node_tailscaled_restart() {
	node_tailscaled_stop "$1"
	node_tailscaled_start "$1"
}

# node_ts_up I AUTHKEYFILE [EXTRA ARGS...] : join with the CLI (debug path;
# the HeadCNI agent does the same through the LocalAPI).
# No --advertise-tags: Headscale 0.29 rejects any registration with a
# pre-auth key that also requests tags ("requested tags [...] are invalid or
# not permitted"); a tagged key gives the node its tags. Pass
# --advertise-tags=... in EXTRA ARGS only for non-key registrations.
node_ts_up() {
	local i=$1 keyfile=$2
	shift 2
	node_ts "$i" up --login-server "$HC_HS_URL" --auth-key "file:$keyfile" \
		--hostname "$(node_hostname "$i")" \
		--advertise-routes "$(node_pod_cidr "$i")" --accept-routes \
		--snat-subnet-routes=false --accept-dns=false --timeout 60s "$@"
}

# node_ts_has_peer_route I CIDR : node I accepted CIDR from a peer (primary route).
node_ts_has_peer_route() {
	node_ts_status_json "$1" | jq -e --arg r "$2" \
		'[.Peer[]? | (.PrimaryRoutes // [])[]] | index($r) != null' >/dev/null
}

# node_route_in_table52 I CIDR : the kernel route is in place on node I.
node_route_in_table52() {
	ip -n "$(node_ns "$1")" route show table 52 | awk '{print $1}' | grep -x -- "$2" >/dev/null
}

# node_netfilter_summary I : what tailscaled installed in the node netns.
node_netfilter_summary() {
	local ns
	ns=$(node_ns "$1")
	printf 'nft tables: %s\n' "$(ip netns exec "$ns" nft list tables 2>/dev/null | tr '\n' ' ')"
	printf 'iptables ts-* chains: %s\n' "$(ip netns exec "$ns" iptables-save 2>/dev/null | grep -c '^:ts-' || true)"
	printf 'ip rules: %s\n' "$(ip -n "$ns" rule show | grep -c 'lookup 52' || true)"
}
