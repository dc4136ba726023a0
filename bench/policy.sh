#!/usr/bin/env bash
# The NetworkPolicy engine at scale. Not a test: it prints the figures recorded in
# BENCHMARKS.md (## NetworkPolicy).
#
#   sudo bench/policy.sh                       # 1,000 pods, 1,000 policies
#   sudo PODS=5000 POLICIES=2000 bench/policy.sh
#
# In namespaces of its own: two "nodes" joined by a veth (a plain routed link standing for the
# tailnet), pod A and pod B on node 1 and pod C on node 2, host ends named as the plugin names
# them. bench/policy_bench.rs (example policy-bench) builds a cluster of $PODS pods and
# $POLICIES policies that select other pods, and prints the time to compile the rule set, to
# replace a node's table, and to change one policy or one pod (compile, difference, commit),
# and its peak RSS. Then iperf3 (TCP, $SECS s) A -> B (one node) and A -> C (across the nodes),
# without the policy table and with each node's table, the two taking turns $ROUNDS times; in
# both, connection tracking is on (as on any node with kube-proxy or tailscaled).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PODS=${PODS:-1000}
POLICIES=${POLICIES:-1000}
RUNS=${RUNS:-5}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
P=hcpb$$

if [ "$(id -u)" != 0 ]; then
	echo "bench/policy.sh: run as root" >&2
	exit 1
fi
command -v iperf3 >/dev/null || apt-get install -y iperf3 >/dev/null

declare -a PIDS=()
cleanup() {
	local pid ns
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
	for ns in n1 n2 a b c; do ip netns del "$P-$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

(cd "$ROOT" && nice -n 19 cargo build --quiet --release --example policy-bench)
BENCH=$ROOT/target/release/examples/policy-bench

for ns in n1 n2 a b c; do
	ip netns add "$P-$ns"
	ip -n "$P-$ns" link set lo up
done
for n in n1 n2; do ip netns exec "$P-$n" sysctl -qw net.ipv4.ip_forward=1; done
# pod NAME NODE INDEX ADDRESS GATEWAY
pod() {
	ip -n "$P-$2" link add "hcpb$3" type veth peer name eth0 netns "$P-$1"
	ip -n "$P-$2" addr add "$5/32" dev "hcpb$3"
	ip -n "$P-$2" link set "hcpb$3" up
	ip -n "$P-$2" route add "$4/32" dev "hcpb$3"
	ip -n "$P-$1" addr add "$4/32" dev eth0
	ip -n "$P-$1" link set eth0 up
	ip -n "$P-$1" route add "$5" dev eth0 scope link
	ip -n "$P-$1" route add default via "$5" dev eth0
}
pod a n1 1 10.244.1.2 10.244.1.1
pod b n1 2 10.244.1.3 10.244.1.1
pod c n2 3 10.244.2.2 10.244.2.1
ip -n "$P-n1" link add tnl0 type veth peer name tnl0 netns "$P-n2"
ip -n "$P-n1" addr add 10.98.0.1/30 dev tnl0
ip -n "$P-n2" addr add 10.98.0.2/30 dev tnl0
ip -n "$P-n1" link set tnl0 up
ip -n "$P-n2" link set tnl0 up
ip -n "$P-n1" route add 10.244.2.0/24 via 10.98.0.2
ip -n "$P-n2" route add 10.244.1.0/24 via 10.98.0.1

echo "== engine: $PODS pods, $POLICIES policies"
"$BENCH" "/run/netns/$P-n1" "$PODS" "$POLICIES" "$RUNS" 10.244.1.2 10.244.1.3
# node 2's table (C is its pod), for the runs across nodes; its timings are not printed again
"$BENCH" "/run/netns/$P-n2" "$PODS" "$POLICIES" 1 10.244.2.2 >/dev/null
ip netns exec "$P-n1" nft list table inet headcni-policy >"/tmp/$P-n1.nft"
echo "node 1 table: $(grep -c . "/tmp/$P-n1.nft") lines ($(wc -c <"/tmp/$P-n1.nft") bytes as nft prints it)"
rm -f "/tmp/$P-n1.nft"

# throughput FROM TO : Gbit/s of one iperf3 run
throughput() {
	local pid
	ip netns exec "$P-$2" iperf3 -s -1 >/dev/null 2>&1 &
	pid=$!
	PIDS+=("$pid")
	sleep 0.3
	ip netns exec "$P-$1" iperf3 -c "$3" -t "$SECS" -J | jq -r '.end.sum_received.bits_per_second / 1e9'
	wait "$pid" 2>/dev/null || true
}
# A node of a cluster tracks connections anyway (kube-proxy's and tailscaled's rules use
# conntrack): so that both columns pay it, each node keeps a one-rule table that uses it.
for n in n1 n2; do
	ip netns exec "$P-$n" nft -f - <<'EOF'
table ip bench-conntrack {
	chain forward { type filter hook forward priority 10; policy accept; ct state invalid drop; }
}
EOF
done
printf '%-6s %-12s %-10s %s\n' round path table Gbit/s
for ((r = 1; r <= ROUNDS; r++)); do
	for table in none policies; do
		for n in n1 n2; do ip netns exec "$P-$n" nft delete table inet headcni-policy 2>/dev/null || true; done
		if [[ $table == policies ]]; then
			"$BENCH" "/run/netns/$P-n1" "$PODS" "$POLICIES" 1 10.244.1.2 10.244.1.3 >/dev/null
			"$BENCH" "/run/netns/$P-n2" "$PODS" "$POLICIES" 1 10.244.2.2 >/dev/null
		fi
		printf '%-6s %-12s %-10s %.2f\n' "$r" "one node" "$table" "$(throughput a b 10.244.1.3)"
		printf '%-6s %-12s %-10s %.2f\n' "$r" "two nodes" "$table" "$(throughput a c 10.244.2.2)"
	done
done
