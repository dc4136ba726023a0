# shellcheck shell=bash
# integration/lib/checks.sh: small probes used by the smoke run and the tests.
# All traffic stays inside the harness's namespaces.
#
# Every probe takes WHERE it runs as its first argument(s):
#   NAME          a network namespace of the root's /run/netns (ip netns exec)
#   node:I        node I's context (its netns and mount namespace)
#   pod:I:NAME    the pod netns NAME that lives in node I's context (a pod
#                 attached through the CNI plugin; see lib/headcni.sh)

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# hc_in WHERE CMD... : run CMD there (see above).
hc_in() {
	local where=$1
	shift
	case "$where" in
	node:*) node_exec "${where#node:}" "$@" ;;
	pod:*:*)
		local rest=${where#pod:}
		node_exec "${rest%%:*}" ip netns exec "${rest#*:}" "$@"
		;;
	*) ip netns exec "$where" "$@" ;;
	esac
}

# cidr_has CIDR IP : the IPv4 address IP lies inside CIDR.
cidr_has() {
	awk -v c="$1" -v ip="$2" 'function n(a,  p) { split(a, p, "."); return ((p[1]*256+p[2])*256+p[3])*256+p[4] }
		BEGIN { split(c, q, "/"); m = 2^(32-q[2]); exit !(int(n(ip)/m) == int(n(q[1])/m)) }'
}

# ping_ok NS DST [COUNT] : ICMP from namespace NS (ip netns name) to DST.
ping_ok() {
	hc_in "$1" ping -n -q -c "${3:-2}" -i 0.2 -W 2 "$2" >/dev/null 2>&1
}

# ping_rtt NS DST : average RTT in ms of 3 pings, or "-" when unreachable.
ping_rtt() {
	local out
	if out=$(hc_in "$1" ping -n -q -c 3 -i 0.2 -W 2 "$2" 2>/dev/null); then
		awk -F'/' '/^rtt|^round-trip/ {print $5; found=1} END {if (!found) print "-"}' <<<"$out"
	else
		echo "-"
	fi
}

# df_probe NS DST SIZE : one DF ping with SIZE bytes of payload; prints
# "ok", "frag-needed (mtu N)" or "lost".
df_probe() {
	local out
	out=$(hc_in "$1" ping -n -c 1 -W 2 -M "do" -s "$3" "$2" 2>&1 || true)
	if grep -q ' 0% packet loss' <<<"$out"; then
		echo ok
	elif grep -qi 'frag needed\|message too long' <<<"$out"; then
		echo "frag-needed ($(grep -o 'mtu *= *[0-9]*' <<<"$out" | head -n1 || true))"
	else
		echo lost
	fi
}

# _wait_listener NS PORT : until a TCP listener on PORT exists in NS (at most 5 s).
_wait_listener() {
	local ns=$1 port=$2 k
	for ((k = 0; k < 50; k++)); do
		[[ -n "$(hc_in "$ns" ss -Hltn "sport = :$port" 2>/dev/null)" ]] && return 0
		sleep 0.1
	done
}

# tcp_seen_source SRC_NS DST_NS DST_ADDR PORT : open a TCP connection from
# SRC_NS to DST_ADDR:PORT served in DST_NS; the server answers with the peer
# address it sees. Prints that address (empty on failure).
tcp_seen_source() {
	local src=$1 dst=$2 addr=$3 port=$4 srv seen
	# shellcheck disable=SC2016 # expanded by the shell socat starts
	hc_in "$dst" timeout 10 socat -T 5 \
		"TCP-LISTEN:$port,bind=$addr,reuseaddr" \
		SYSTEM:'echo "$SOCAT_PEERADDR"' >/dev/null 2>&1 &
	srv=$!
	_wait_listener "$dst" "$port"
	seen=$(hc_in "$src" timeout 5 socat -T 5 - "TCP:$addr:$port,connect-timeout=3" </dev/null 2>/dev/null || true)
	wait "$srv" 2>/dev/null || true
	printf '%s\n' "$seen"
}

# tcp_bulk SRC_NS DST_NS DST_ADDR PORT MIB : send MIB MiB over TCP; true if
# all of it arrived (a path MTU black hole makes this hang and fail).
tcp_bulk() {
	local src=$1 dst=$2 addr=$3 port=$4 mib=$5 srv got
	local out
	out=$(mktemp)
	hc_in "$dst" timeout 30 socat -u "TCP-LISTEN:$port,bind=$addr,reuseaddr" \
		SYSTEM:"wc -c >$out" >/dev/null 2>&1 &
	srv=$!
	_wait_listener "$dst" "$port"
	head -c "$((mib * 1048576))" /dev/zero |
		hc_in "$src" timeout 25 socat -u - "TCP:$addr:$port,connect-timeout=3" >/dev/null 2>&1 || true
	wait "$srv" 2>/dev/null || true
	got=$(tr -d '[:space:]' <"$out" 2>/dev/null)
	rm -f "$out"
	[[ "$got" == "$((mib * 1048576))" ]]
}

# background pinger with timestamps, for restarts: pinger_start WHERE DST FILE
pinger_start() {
	local where=$1 dst=$2 file=$3
	: >"$file"
	# shellcheck disable=SC2016,SC2094 # $$ is the inner shell's; it writes FILE.pid, ping writes FILE
	hc_in "$where" sh -c 'echo $$ >"$1.pid"; exec ping -n -D -O -i 0.2 -W 1 "$2"' sh "$file" "$dst" >"$file" 2>&1 &
	local k
	for ((k = 0; k < 50; k++)); do
		[[ -s "$file.pid" ]] && break
		sleep 0.1
	done
}
pinger_stop() { # FILE
	local pid
	pid=$(cat "$1.pid" 2>/dev/null) || return 0
	[[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == ping ]] && kill -INT "$pid" 2>/dev/null
	local k
	for ((k = 0; k < 30; k++)); do
		[[ -d "/proc/$pid" ]] || break
		sleep 0.1
	done
	rm -f "$1.pid"
}
# pinger_gap FILE : "longest gap between replies (s), replies, sent"
pinger_gap() {
	awk '
		/bytes from/ { t = substr($1, 2, length($1) - 2) + 0; if (last) { g = t - last; if (g > max) max = g } last = t; ok++ }
		/no answer yet|bytes from/ { n++ }
		END { printf "%.1f %d %d\n", max, ok, n }' "$1"
}
