# shellcheck shell=bash
# integration/lib/topology.sh: the underlay, made of network namespaces.
#
#   <P>-ul    the underlay: bridge br0 (10.99.0.1/24) and the router to <P>-inet
#   <P>-hs    Headscale, eth0 10.99.0.2/24 (no default route: it talks only to nodes)
#   <P>-nI    node I, eth0 10.99.0.(10+I)/24, default route via 10.99.0.1
#   <P>-inet  a host outside the cluster, eth0 10.99.1.2/24; knows only the
#             route back to 10.99.0.0/24 (so it sees node underlay addresses as
#             sources and can not answer un-masqueraded pod addresses)
#
# Every link is created directly inside its namespaces (`ip -n A link add X
# type veth peer name Y netns B`), so nothing ever appears in the root
# namespace; its routes, firewall and sysctls are never touched.
#
# Each node also gets a "node context": a holder process (sleep) that sits in
# the node's network namespace and in a mount namespace of its own, in which
# per-node directories are bind-mounted over the well-known paths
# (/etc/cni/net.d, /opt/cni/bin, /var/lib/cni, /run/tailscale,
# /var/lib/tailscale, /run/headcni, /var/lib/headcni, /var/log/headcni,
# /run/containerd, /run/netns, /etc/resolv.conf). /run/netns is per node so
# that the sandboxes a runtime makes (cni-*) never show up in the root namespace. Every per-node
# command (tailscaled, runtimes, later the agent) runs via `node_exec I ...`
# (nsenter into both namespaces), so default paths are per node and nothing a
# node writes to those paths reaches the root file system. Mount propagation
# is slave: mounts of the root namespace reach the node, never the reverse.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HC_NODES=${HC_NODES:-2}
HC_UL_NET=${HC_UL_NET:-10.99.0}    # underlay /24 (first three octets)
HC_INET_NET=${HC_INET_NET:-10.99.1} # link to the "internet" host /24
HC_NS_UL=$HC_PREFIX-ul
HC_NS_HS=$HC_PREFIX-hs
HC_NS_INET=$HC_PREFIX-inet
HC_HS_ADDR=$HC_UL_NET.2
HC_UL_GW=$HC_UL_NET.1
HC_INET_ADDR=$HC_INET_NET.2

# Paths bind-mounted per node (created as empty mount points in the root file
# system only when missing, and removed again by teardown if still empty).
HC_NODE_BIND_DIRS=${HC_NODE_BIND_DIRS:-/etc/cni/net.d /opt/cni/bin /var/lib/cni /run/tailscale /var/lib/tailscale /run/headcni /var/lib/headcni /var/log/headcni /run/containerd /run/netns}

node_ns() { printf '%s-n%s\n' "$HC_PREFIX" "$1"; }
node_addr() { printf '%s.%s\n' "$HC_UL_NET" "$((10 + $1))"; }
node_dir() { printf '%s/nodes/n%s\n' "$HC_STATE_DIR" "$1"; }
node_pod_cidr() { printf '10.244.%s.0/24\n' "$1"; }

# nsx NS CMD... : run CMD in network namespace NS.
nsx() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}

_topo_netns_add() {
	hc_record netns "$1"
	ip netns add "$1"
	ip -n "$1" link set lo up
}

# _topo_attach MEMBER_NS ULNAME ADDR/LEN : veth from br0 to MEMBER_NS's eth0.
_topo_attach() {
	local ns=$1 ulname=$2 addr=$3
	ip -n "$HC_NS_UL" link add "$ulname" type veth peer name eth0 netns "$ns"
	ip -n "$HC_NS_UL" link set "$ulname" master br0 up
	ip -n "$ns" addr add "$addr" dev eth0
	ip -n "$ns" link set eth0 up
}

# topo_up : create the whole underlay with $HC_NODES nodes.
topo_up() {
	local t0 i
	t0=$(hc_now)
	mkdir -p "$HC_STATE_DIR/logs" "$HC_STATE_DIR/nodes"
	_topo_netns_add "$HC_NS_UL"
	nsx "$HC_NS_UL" sysctl -qw net.ipv4.ip_forward=1
	# A fixed address: a bridge without one takes the lowest of its ports' addresses and
	# changes it as ports join, which leaves the nodes' ARP entry for the router stale (frames
	# to a port's address are not routed).
	ip -n "$HC_NS_UL" link add br0 address 02:48:43:00:00:01 type bridge
	ip -n "$HC_NS_UL" addr add "$HC_UL_GW/24" dev br0
	ip -n "$HC_NS_UL" link set br0 up

	_topo_netns_add "$HC_NS_HS"
	_topo_attach "$HC_NS_HS" hs "$HC_HS_ADDR/24"

	_topo_netns_add "$HC_NS_INET"
	ip -n "$HC_NS_UL" link add inet type veth peer name eth0 netns "$HC_NS_INET"
	ip -n "$HC_NS_UL" addr add "$HC_INET_NET.1/24" dev inet
	ip -n "$HC_NS_UL" link set inet up
	ip -n "$HC_NS_INET" addr add "$HC_INET_ADDR/24" dev eth0
	ip -n "$HC_NS_INET" link set eth0 up
	ip -n "$HC_NS_INET" route add "$HC_UL_NET.0/24" via "$HC_INET_NET.1"

	for ((i = 1; i <= HC_NODES; i++)); do
		topo_node_add "$i"
	done
	hc_log "topology: underlay $HC_UL_NET.0/24 with headscale, internet and $HC_NODES nodes ($(hc_since "$t0")s)"
}

# topo_node_add I : node namespace, underlay link, node context.
topo_node_add() {
	local i=$1 ns
	ns=$(node_ns "$i")
	_topo_netns_add "$ns"
	_topo_attach "$ns" "n$i" "$(node_addr "$i")/24"
	ip -n "$ns" route add default via "$HC_UL_GW"
	nsx "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
	_topo_node_ctx "$i"
}

# The holder of node I's mount namespace: nsenter enters the netns, unshare
# makes a mount namespace that we keep, with slave propagation. Not `ip netns
# exec`: it remounts all of /sys, which hides the cgroup mounts (runc then
# fails with "no cgroup mount found in mountinfo"). Instead only the net parts
# of sysfs are replaced by a sysfs mounted inside the netns.
_topo_node_ctx() {
	local i=$1 ns dir pid ino myino d
	ns=$(node_ns "$i")
	dir=$(node_dir "$i")
	mkdir -p "$dir/mnt" "$HC_STATE_DIR/logs"
	hc_spawn "ctx-n$i" "$HC_STATE_DIR/logs/ctx-n$i.log" \
		nsenter --net="/run/netns/$ns" -- unshare --mount --propagation slave -- sleep infinity
	pid=$HC_SPAWNED_PID
	myino=$(stat -L -c %i /proc/self/ns/mnt)
	hc_wait_for 10 "node $i context" _ctx_ready "$pid" "$myino" || hc_die "node $i context did not start"
	ino=$(stat -L -c %i "/proc/$pid/ns/mnt")
	hc_record mntns "$ino"
	printf '%s\n' "$pid" >"$dir/ctx.pid"

	mkdir -p "$dir/sysfs"
	node_exec "$i" mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$dir/sysfs"
	node_exec "$i" mount --bind "$dir/sysfs/class/net" /sys/class/net
	node_exec "$i" mount --bind "$dir/sysfs/devices/virtual/net" /sys/devices/virtual/net

	# Pass 1: make every missing mount point exist, in the node's view only.
	local -A overlaid=()
	local a
	for d in $HC_NODE_BIND_DIRS; do
		mkdir -p "$dir/mnt$d"
		node_exec "$i" test -e "$d" && continue
		a=$(_topo_existing_ancestor "$i" "$d")
		if [[ -z "${overlaid[$a]:-}" ]]; then
			if _topo_overlay_ok "$i" "$a"; then
				_topo_overlay "$i" "$a"
			else
				_topo_mountpoint_dir "$d"
				continue
			fi
			overlaid[$a]=1
		fi
		node_exec "$i" mkdir -p "$d"
	done
	# Pass 2: the per-node directories over them.
	for d in $HC_NODE_BIND_DIRS; do
		node_exec "$i" mount --bind "$dir/mnt$d" "$d"
	done
	# A private /dev/shm: podman keeps its lock table in /dev/shm/libpod_lock,
	# which must not be shared with any other podman on the machine.
	node_exec "$i" mount -t tmpfs -o nosuid,nodev,size=64m,mode=1777 shm /dev/shm
	# tailscaled (and anything else) may rewrite resolv.conf: give it a copy.
	cp /etc/resolv.conf "$dir/mnt/resolv.conf" 2>/dev/null || : >"$dir/mnt/resolv.conf"
	node_exec "$i" mount --bind "$dir/mnt/resolv.conf" /etc/resolv.conf
}

# true once the holder has exec'd sleep in a mount namespace other than ours
_ctx_ready() {
	[[ "$(cat "/proc/$1/comm" 2>/dev/null)" == sleep ]] &&
		[[ "$(stat -L -c %i "/proc/$1/ns/mnt" 2>/dev/null)" != "$2" ]]
}

# The deepest ancestor of $2 that exists in node $1's view.
_topo_existing_ancestor() {
	local p
	p=$(dirname "$2")
	until node_exec "$1" test -d "$p"; do p=$(dirname "$p"); done
	printf '%s\n' "$p"
}

# A directory may get an overlay in the node when it is not / and nothing
# is mounted below it except what the node context replaces anyway
# (/run/netns). An overlay hides the mounts below its lower dir.
_topo_overlay_ok() {
	local i=$1 a=$2 m
	[[ "$a" != / ]] || return 1
	while read -r m; do
		case "$m" in
		"$a"/*)
			[[ "$m" == /run/netns || "$m" == /run/netns/* ]] || return 1
			;;
		esac
	done < <(node_exec "$i" findmnt -rn -o TARGET)
	return 0
}

# _topo_overlay I DIR : overlayfs over DIR in node I's mount namespace, with
# DIR itself as the lower layer and an upper layer in the node's state dir.
# Directories the node needs (e.g. /opt/cni/bin) are then made in the upper
# layer: the root file system is never written.
_topo_overlay() {
	local i=$1 a=$2 o
	o="$(node_dir "$i")/overlay/$(tr '/' '_' <<<"$a")"
	mkdir -p "$o/upper" "$o/work"
	node_exec "$i" mount -t overlay overlay \
		-o "lowerdir=$a,upperdir=$o/upper,workdir=$o/work" "$a"
}

# Fallback when no overlay is possible: create a missing mount point in the
# root file system (recorded: removed at teardown if still empty). Parents
# created too, each recorded.
_topo_mountpoint_dir() {
	local d=$1 missing=() p
	p=$d
	while [[ ! -e "$p" ]]; do
		missing+=("$p")
		p=$(dirname "$p")
	done
	local k
	for ((k = ${#missing[@]} - 1; k >= 0; k--)); do
		hc_record rmdir "${missing[k]}"
		mkdir "${missing[k]}"
	done
}

node_ctx_pid() { cat "$(node_dir "$1")/ctx.pid"; }

# node_exec I CMD... : run CMD in node I's network and mount namespaces.
node_exec() {
	local i=$1
	shift
	nsenter -t "$(node_ctx_pid "$i")" -n -m -- "$@"
}

# node_spawn I LABEL CMD... : start a daemon on node I (in its context),
# logging to logs/LABEL.log, recorded for teardown; stop it with
# hc_stop_label LABEL. Sets HC_SPAWNED_PID. (The HeadCNI agent starts so.)
node_spawn() {
	local i=$1 label=$2
	shift 2
	hc_spawn "$label" "$HC_STATE_DIR/logs/$label.log" \
		nsenter -t "$(node_ctx_pid "$i")" -n -m -- "$@"
}

# pod_netns_add I K : a bare "pod" network namespace on node I with a veth to
# the node (the routed model: node side holds the gateway 10.244.I.1, the pod
# gets 10.244.I.(10+K)). Stand-in for the CNI plugin until headcni exists.
# Prints the pod's address.
pod_netns_add() {
	local i=$1 k=$2 ns pns gw addr
	ns=$(node_ns "$i")
	pns="$ns-p$k"
	gw=10.244.$i.1
	addr=10.244.$i.$((10 + k))
	_topo_netns_add "$pns"
	ip -n "$ns" link add "pod$k" type veth peer name eth0 netns "$pns"
	ip -n "$ns" addr add "$gw/32" dev "pod$k" 2>/dev/null || true
	ip -n "$ns" link set "pod$k" up
	ip -n "$ns" route add "$addr/32" dev "pod$k"
	ip -n "$pns" addr add "$addr/32" dev eth0
	ip -n "$pns" link set eth0 up
	ip -n "$pns" route add "$gw/32" dev eth0 scope link
	ip -n "$pns" route add default via "$gw" dev eth0
	printf '%s\n' "$addr"
}

# topo_root_view : everything of this run that could be visible from the root
# namespace (taken before the run and after teardown; see topo_leak_check).
topo_root_view() {
	{
		echo "# netns"
		ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$HC_PREFIX-" || true
		echo "# links"
		ip -br link | awk '{print $1}' | sort
		echo "# routes"
		ip route show table all | sort
		echo "# rules"
		ip rule show
		echo "# nft"
		nft list tables 2>/dev/null | sort
		echo "# mounts of the run"
		findmnt -rn -o TARGET | grep -E "^$HC_STATE_ROOT/$HC_PREFIX(/|$)|^/run/netns/$HC_PREFIX-" || true
		echo "# processes of the run (daemons, containerd shims: their command lines name the state dir)"
		pgrep -a -f "$HC_STATE_ROOT/$HC_PREFIX/" | cut -d' ' -f2- || true
		echo "# cgroups of the run"
		ls -d /sys/fs/cgroup/*/"$HC_PREFIX"-n* /sys/fs/cgroup/"$HC_PREFIX"-n* 2>/dev/null || true
		echo "# mount points"
		for d in $HC_NODE_BIND_DIRS; do [[ -e "$d" ]] && echo "$d"; done
		echo "# resolver"
		md5sum /etc/resolv.conf
		echo "# sysctls"
		sysctl -n net.ipv4.ip_forward net.ipv4.conf.all.rp_filter 2>/dev/null
	} 2>/dev/null
}

# topo_leak_check BEFORE : after teardown, nothing of the run is visible in
# the root namespace and its state dir is gone. Lines that changed but do not
# name this run are reported, not failed (the machine is shared).
topo_leak_check() {
	local before=$1 after leakdiff
	after=$(topo_root_view)
	if ! leakdiff=$(diff <(printf '%s\n' "$before") <(printf '%s\n' "$after")); then
		if grep -E "^>.*($HC_PREFIX-|$HC_STATE_ROOT/$HC_PREFIX)" <<<"$leakdiff"; then
			hc_warn "teardown left something behind (see above)"
			return 1
		fi
		hc_warn "the root namespace changed during the run, but not by this run:"
		grep -E '^[<>]' <<<"$leakdiff" >&2 || true
	fi
	[[ "${HC_KEEP_STATE:-0}" == 1 || ! -e "$HC_STATE_DIR" ]] || {
		hc_warn "state dir $HC_STATE_DIR left behind"
		return 1
	}
}
