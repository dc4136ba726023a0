#!/usr/bin/env bash
# integration/kube-demo.sh (also `integration/demo.sh --kubernetes`): HeadCNI on a real
# Kubernetes on this machine, in one command (as root).
#
#   builds what is missing once (Kubernetes v1.37.2 and the rest, about 20 minutes the first
#   time; cached afterwards), starts Headscale, a control plane and two nodes (containerd,
#   kubelet, kube-proxy, tailscaled each), installs HeadCNI with deploy-with-helm.sh, runs a
#   Deployment of 4 pods spread over both nodes and prints `kubectl get nodes,pods -o wide`
#   and who pings whom across the tailnet. Everything lives in network namespaces; nothing of
#   the machine's own network is touched.
#
# usage: integration/kube-demo.sh [--keep] [--prefix P]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HC_PREFIX=${HC_PREFIX:-kdemo}
while (($#)); do
	case "$1" in
	--keep)
		export HC_KEEP=1
		shift
		;;
	--prefix)
		export HC_PREFIX=$2
		shift 2
		;;
	--kubernetes) shift ;; # (when started as demo.sh --kubernetes)
	-h | --help)
		awk 'NR > 1 && /^#/ && !/shellcheck/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "unknown argument: $1 (try --help)" >&2
		exit 2
		;;
	esac
done
export HC_NODES=2 HC_HS_AUTOAPPROVE=0
if [[ $EUID -ne 0 ]]; then
	echo "kube-demo.sh needs root (it creates network namespaces): sudo $0" >&2
	exit 1
fi

# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/kube.sh
source "$here/lib/kube.sh"

kube_harness_up
kubectl create namespace demo >/dev/null
kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: demo}
spec:
  replicas: 4
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
         labelSelector: {matchLabels: {app: hello}}}
      containers:
      - {name: hello, image: $KUBE_AGNHOST_IMAGE, args: [netexec, --http-port=8080]}
EOF
kubectl -n demo rollout status deployment/hello --timeout=90s >/dev/null || hc_die "the demo pods did not start"

printf '\n$ kubectl get nodes,pods -A -o wide\n'
kubectl get nodes,pods -A -o wide

printf '\nPod to pod across the nodes (ICMP from each pod to each pod of the other node):\n'
printf '%-24s %-7s %-12s -> %-12s %-7s %s\n' POD NODE ADDRESS PEER RESULT "RTT (ms)"
fails=0
mapfile -t rows < <(kubectl -n demo get pods -l app=hello -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{"\n"}{end}')
for a in "${rows[@]}"; do
	read -r an anode aip <<<"$a"
	for b in "${rows[@]}"; do
		read -r _ bnode bip <<<"$b"
		[[ "$anode" != "$bnode" ]] || continue
		if out=$(kubectl -n demo exec "$an" -- ping -n -q -c 3 -i 0.2 -W 2 "$bip" 2>/dev/null); then
			rtt=$(awk -F'/' '/^rtt/ {print $5}' <<<"$out") res=ok
		else
			rtt=- res=FAIL fails=$((fails + 1))
		fi
		printf '%-24s %-7s %-12s -> %-12s %-7s %s\n' "$an" "$anode" "$aip" "$bip" "$res" "$rtt"
	done
done
printf '\nHeadscale, approved routes: %s\n' \
	"$(hs_api "$HC_STATE_DIR/apikey" GET node | jq -r '[.nodes[] | "\(.givenName) \((.approvedRoutes // []) | join(","))"] | join("; ")')"
printf '%s pod-to-pod pairs failed; demo took %s s.\n' "$fails" "$(hc_since "$T_START")"

if [[ "${HC_KEEP:-0}" == 1 ]]; then
	cat <<EOF

Left running (--keep). Look around (as root):
  ip netns exec $(node_ns "$KUBE_CP") $KUBE_BIN_DIR/kubectl --kubeconfig $KUBE_ADMIN_KUBECONFIG get nodes,pods -A -o wide
  nsenter -t $(node_ctx_pid 1) -n -m -- bash           # a shell on node-1
Tear down:
  $here/teardown.sh $HC_PREFIX
EOF
fi
((fails == 0))
