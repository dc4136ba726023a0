# shellcheck shell=bash
# integration/lib/kube.sh: a real Kubernetes on the harness's nodes.
#
#   <P>-n0   the control-plane host (10.99.0.10): etcd, kube-apiserver (Node,RBAC
#            authorization, NodeRestriction), kube-controller-manager (--allocate-node-cidrs
#            from 10.244.0.0/16: every node's pod CIDR comes from here) and kube-scheduler;
#            and a tailscaled that accepts the pod routes (as the control plane of a HeadCNI
#            cluster does, so that the API server reaches pods, e.g. its pod proxy)
#   <P>-nI   a node: tailscaled, containerd, kubelet and kube-proxy, all in the node context
#            (topology.sh: its network namespace and its own mount namespace, where
#            /etc/cni/net.d, /opt/cni/bin, /run/headcni, /var/lib/headcni, /run/tailscale,
#            ... are the node's own directories, so the DaemonSet's hostPath volumes land
#            there)
#
# Nodes reach each other's pod CIDRs only through the tailnet: the harness adds no route
# between them. HeadCNI itself arrives as a user installs it: `helm upgrade --install` of
# chart/ with deploy-with-helm.sh (kube_headcni_deploy below).
#
# Certificates are made with openssl (EC P-256): a CA, the service-account key pair, the API
# server's serving certificate, client certificates for the admin, the controller-manager,
# the scheduler, kube-proxy and each kubelet (system:node:NAME), the API server's client
# certificate towards the kubelets, and each kubelet's serving certificate.

# shellcheck source=headcni.sh
source "$(dirname "${BASH_SOURCE[0]}")/headcni.sh"
# shellcheck source=kimages.sh
source "$(dirname "${BASH_SOURCE[0]}")/kimages.sh"

KUBE_CP=0 # the control-plane host is "node 0" of the topology (no kubelet)
KUBE_DIR=$HC_STATE_DIR/kube
KUBE_PKI=$KUBE_DIR/pki
KUBE_SERVICE_CIDR=${KUBE_SERVICE_CIDR:-10.96.0.0/16}
KUBE_API_SERVICE_IP=10.96.0.1
KUBE_DNS_IP=${KUBE_DNS_IP:-10.96.0.10}
KUBE_CLUSTER_DOMAIN=cluster.local
KUBE_API_PORT=6443
KUBE_ADMIN_KUBECONFIG=$KUBE_DIR/admin.kubeconfig
# The registry that answers nothing: a closed port on the node's loopback. A pull of a
# missing image then fails at once instead of waiting for DNS.
KUBE_NO_REGISTRY=http://127.0.0.1:9
# overlayfs: a container's root file system is not a copy of its image (agnhost is 64 MB)
export HC_CTD_SNAPSHOTTER=${HC_CTD_SNAPSHOTTER:-overlayfs}

kube_api_addr() { node_addr "$KUBE_CP"; }
kube_api_url() { printf 'https://%s:%s\n' "$(kube_api_addr)" "$KUBE_API_PORT"; }
kube_node_name() { node_hostname "$1"; }
kube_node_dir() { printf '%s/kube\n' "$(node_dir "$1")"; }

# kubectl ARGS... : as the cluster admin, from the control-plane host's network namespace.
kubectl() {
	ip netns exec "$(node_ns "$KUBE_CP")" "$KUBE_BIN_DIR/kubectl" --kubeconfig "$KUBE_ADMIN_KUBECONFIG" "$@"
}

# --- certificates ------------------------------------------------------------------

_kube_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# _kube_cert NAME SUBJECT USAGE [SAN] : NAME.key and NAME.crt signed by the CA.
# USAGE: client, server or both.
_kube_cert() {
	local name=$1 subj=$2 usage=$3 san=${4:-} eku
	case "$usage" in
	client) eku=clientAuth ;;
	server) eku=serverAuth ;;
	*) eku=serverAuth,clientAuth ;;
	esac
	_kube_key "$KUBE_PKI/$name.key"
	{
		printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$eku"
		[[ -n "$san" ]] && printf 'subjectAltName=%s\n' "$san"
	} >"$KUBE_PKI/$name.ext"
	openssl req -new -key "$KUBE_PKI/$name.key" -subj "$subj" -out "$KUBE_PKI/$name.csr" 2>/dev/null
	openssl x509 -req -in "$KUBE_PKI/$name.csr" -CA "$KUBE_PKI/ca.crt" -CAkey "$KUBE_PKI/ca.key" \
		-CAcreateserial -days 2 -sha256 -extfile "$KUBE_PKI/$name.ext" -out "$KUBE_PKI/$name.crt" 2>/dev/null
	rm -f "$KUBE_PKI/$name.csr" "$KUBE_PKI/$name.ext"
}

# _kube_kubeconfig FILE CERTNAME : a kubeconfig for the client certificate CERTNAME.
_kube_kubeconfig() {
	local file=$1 name=$2
	(
		umask 077
		cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster:
    server: $(kube_api_url)
    certificate-authority: $KUBE_PKI/ca.crt
users:
- name: $name
  user:
    client-certificate: $KUBE_PKI/$name.crt
    client-key: $KUBE_PKI/$name.key
contexts:
- name: harness
  context: {cluster: harness, user: $name}
current-context: harness
EOF
	)
}

kube_pki() {
	local t0
	t0=$(hc_now)
	mkdir -p "$KUBE_PKI"
	chmod 0700 "$KUBE_PKI"
	_kube_key "$KUBE_PKI/ca.key"
	openssl req -x509 -new -key "$KUBE_PKI/ca.key" -subj "/CN=headcni-harness-ca" -days 2 \
		-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
		-out "$KUBE_PKI/ca.crt" 2>/dev/null
	_kube_key "$KUBE_PKI/sa.key"
	openssl pkey -in "$KUBE_PKI/sa.key" -pubout -out "$KUBE_PKI/sa.pub" 2>/dev/null
	_kube_cert apiserver "/CN=kube-apiserver" server \
		"IP:$(kube_api_addr),IP:$KUBE_API_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$KUBE_CLUSTER_DOMAIN,DNS:localhost"
	_kube_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
	_kube_cert admin "/O=system:masters/CN=kubernetes-admin" client
	_kube_cert controller-manager "/CN=system:kube-controller-manager" client
	_kube_cert scheduler "/CN=system:kube-scheduler" client
	_kube_cert kube-proxy "/CN=system:kube-proxy" client
	_kube_kubeconfig "$KUBE_ADMIN_KUBECONFIG" admin
	_kube_kubeconfig "$KUBE_DIR/controller-manager.kubeconfig" controller-manager
	_kube_kubeconfig "$KUBE_DIR/scheduler.kubeconfig" scheduler
	_kube_kubeconfig "$KUBE_DIR/kube-proxy.kubeconfig" kube-proxy
	hc_log "kube: certificates ($(hc_since "$t0")s)"
}

# kube_pki_node I : node I's client (system:node:node-I) and serving certificates.
kube_pki_node() {
	local i=$1 name
	name=$(kube_node_name "$i")
	_kube_cert "kubelet-$name" "/O=system:nodes/CN=system:node:$name" client
	_kube_cert "kubelet-serving-$name" "/O=system:nodes/CN=system:node:$name" server \
		"IP:$(node_addr "$i"),DNS:$name"
	_kube_kubeconfig "$KUBE_DIR/kubelet-$name.kubeconfig" "kubelet-$name"
}

# --- the control plane -----------------------------------------------------------

_kube_api_ready() {
	kubectl get --raw /readyz >/dev/null 2>&1
}

kube_etcd_start() {
	mkdir -p "$KUBE_DIR/etcd"
	chmod 0700 "$KUBE_DIR/etcd"
	node_spawn "$KUBE_CP" etcd env -u ETCD_BIN "$ETCD_BIN" --name harness --data-dir "$KUBE_DIR/etcd" \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster harness=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
		--unsafe-no-fsync --log-level warn
	hc_wait_daemon 30 etcd "etcd healthy" node_exec "$KUBE_CP" curl -fsS --max-time 1 http://127.0.0.1:2381/health ||
		hc_die "etcd did not become healthy"
}

# KUBE_SA_VERIFY_KEYS, KUBE_SA_SIGNING_KEY: the service-account keys (the token-rotation test
# restarts it with a new signing key)
kube_apiserver_start() {
	# The audit log records what the service accounts of kube-system do (the token-rotation
	# test reads which token the agents authenticated with, and when).
	[[ -f "$KUBE_DIR/audit-policy.yaml" ]] || cat >"$KUBE_DIR/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:$KUBE_HC_NS"]
- level: None
EOF
	local sa_keys=${KUBE_SA_VERIFY_KEYS:-$KUBE_PKI/sa.pub} sign=${KUBE_SA_SIGNING_KEY:-$KUBE_PKI/sa.key}
	node_spawn "$KUBE_CP" kube-apiserver "$KUBE_BIN_DIR/kube-apiserver" \
		--etcd-servers=http://127.0.0.1:2379 \
		--bind-address=0.0.0.0 --secure-port="$KUBE_API_PORT" --advertise-address="$(kube_api_addr)" \
		--service-cluster-ip-range="$KUBE_SERVICE_CIDR" \
		--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
		--allow-privileged=true \
		--client-ca-file="$KUBE_PKI/ca.crt" \
		--tls-cert-file="$KUBE_PKI/apiserver.crt" --tls-private-key-file="$KUBE_PKI/apiserver.key" \
		--kubelet-client-certificate="$KUBE_PKI/apiserver-kubelet-client.crt" \
		--kubelet-client-key="$KUBE_PKI/apiserver-kubelet-client.key" \
		--kubelet-certificate-authority="$KUBE_PKI/ca.crt" \
		--kubelet-preferred-address-types=InternalIP \
		--service-account-issuer="https://kubernetes.default.svc.$KUBE_CLUSTER_DOMAIN" \
		--service-account-key-file="$sa_keys" --service-account-signing-key-file="$sign" \
		--audit-policy-file="$KUBE_DIR/audit-policy.yaml" --audit-log-path="$KUBE_DIR/audit.log" \
		--audit-log-format=json --audit-log-maxsize=100 \
		--profiling=false --event-ttl=30m --v="${KUBE_LOG_V:-1}"
	hc_wait_daemon 60 kube-apiserver "kube-apiserver /readyz" _kube_api_ready ||
		hc_die "kube-apiserver did not become ready"
}

# (it stops listening at once on SIGTERM, yet its process may take over 20 s to exit)
kube_apiserver_stop() { hc_stop_label kube-apiserver 5; }

kube_controllers_start() {
	node_spawn "$KUBE_CP" kube-controller-manager "$KUBE_BIN_DIR/kube-controller-manager" \
		--kubeconfig="$KUBE_DIR/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$KUBE_DIR/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$KUBE_DIR/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false \
		--allocate-node-cidrs --cluster-cidr="$HC_CLUSTER_CIDR" --node-cidr-mask-size=24 \
		--service-cluster-ip-range="$KUBE_SERVICE_CIDR" \
		--use-service-account-credentials \
		--service-account-private-key-file="$KUBE_PKI/sa.key" --root-ca-file="$KUBE_PKI/ca.crt" \
		--cluster-signing-cert-file="$KUBE_PKI/ca.crt" --cluster-signing-key-file="$KUBE_PKI/ca.key" \
		--node-monitor-grace-period=20s --v="${KUBE_LOG_V:-1}"
	node_spawn "$KUBE_CP" kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" \
		--kubeconfig="$KUBE_DIR/scheduler.kubeconfig" \
		--authentication-kubeconfig="$KUBE_DIR/scheduler.kubeconfig" \
		--authorization-kubeconfig="$KUBE_DIR/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --v="${KUBE_LOG_V:-1}"
}

# kube_cp_up [nowait] : the control plane on the control-plane host (node 0 of the topology,
# made by topo_up's caller); without nowait, until the controllers made the default
# ServiceAccount (the last thing a pod needs from them).
kube_cp_up() {
	local t0
	t0=$(hc_now)
	mkdir -p "$KUBE_DIR"
	kube_pki
	kube_etcd_start
	kube_apiserver_start
	hc_log "kube: API server ready at $(kube_api_url) ($(hc_since "$t0")s)"
	kube_controllers_start
	[[ "${1:-}" == nowait ]] || kube_cp_wait_serviceaccount
}

kube_cp_wait_serviceaccount() {
	hc_wait_for 60 "default service account" kubectl -n default get serviceaccount default ||
		hc_die "the controller-manager made no default ServiceAccount"
	hc_log "kube: control plane up"
}

# kube_cp_tailnet : the control-plane host joins the tailnet and accepts the pod routes
# (the API server's pod proxy, e2e's webhook and aggregator tests reach pods so).
kube_cp_tailnet() {
	node_tailscaled_start "$KUBE_CP"
	node_ts "$KUBE_CP" up --login-server "$HC_HS_URL" --auth-key "file:$HC_STATE_DIR/authkey" \
		--hostname control-plane --accept-routes --accept-dns=false --timeout 60s \
		>>"$HC_STATE_DIR/logs/join-n$KUBE_CP.log" 2>&1 || hc_die "the control-plane host did not join the tailnet"
}

# --- nodes -----------------------------------------------------------------------

# kube_ctd_config I : containerd for a kubelet: the harness's config (runtimes.sh) with the
# pause image as sandbox, no registry, and pods under the node's cgroup.
kube_ctd_config() {
	local i=$1 d
	d=$(ctd_dir "$i")
	HC_CTD_SANDBOX_IMAGE=$KUBE_PAUSE_IMAGE ctd_write_config "$i"
	cat >>"$d/config.toml" <<EOF
  [plugins."io.containerd.grpc.v1.cri".registry]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."registry.k8s.io"]
      endpoint = ["$KUBE_NO_REGISTRY"]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["$KUBE_NO_REGISTRY"]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."ghcr.io"]
      endpoint = ["$KUBE_NO_REGISTRY"]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."localhost"]
      endpoint = ["$KUBE_NO_REGISTRY"]
EOF
}

# kube_images_import I [core|all] : the cluster's images (and HeadCNI's) into node I's containerd.
kube_images_import() {
	local i=$1 which=${2:-core} a t0
	t0=$(hc_now)
	local -a archives
	mapfile -t archives < <(kimg_archives "$which")
	archives+=("$HC_IMAGE_HEADCNI_ARCHIVE")
	[[ "$KUBE_TS_MODE" != sidecar ]] || archives+=("$HC_IMAGE_TAILSCALE_ARCHIVE")
	for a in "${archives[@]}"; do
		node_ctr "$i" images import --snapshotter "$HC_CTD_SNAPSHOTTER" "$a" >/dev/null ||
			hc_die "node $i: importing $a failed"
	done
	hc_log "node $i: ${#archives[@]} images imported ($(hc_since "$t0")s)"
}

# Where the pods' cgroups go. With KUBE_CGROUPS_PER_QOS=true the kubelet puts every pod under
# the node's cgroup (<P>-nI/kubepods/...), which teardown empties and removes; with false,
# containerd puts them at the top (k8s.io/<id>) and removes them with the containers.
KUBE_CGROUPS_PER_QOS=${KUBE_CGROUPS_PER_QOS:-true}
_kube_cgroup_config() {
	local i=$1 d
	if [[ "$KUBE_CGROUPS_PER_QOS" == true ]]; then
		_rt_cgroup_record "$i"
		for d in /sys/fs/cgroup/*/; do
			[[ -f "$d/cgroup.procs" ]] && mkdir -p "$d$(node_cgroup "$i")"
		done
		# a new cpuset cgroup starts with no CPU and no memory node: give it the machine's
		d=/sys/fs/cgroup/cpuset/$(node_cgroup "$i")
		if [[ -f "$d/cpuset.cpus" && -z "$(<"$d/cpuset.cpus")" ]]; then
			cat /sys/fs/cgroup/cpuset/cpuset.cpus >"$d/cpuset.cpus"
			cat /sys/fs/cgroup/cpuset/cpuset.mems >"$d/cpuset.mems"
		fi
		printf 'cgroupsPerQOS: true\ncgroupRoot: /%s\n' "$(node_cgroup "$i")"
	else
		printf 'cgroupsPerQOS: false\n'
	fi
}

# kube_kubelet_config I : node I's kubelet configuration.
kube_kubelet_config() {
	local i=$1 d name
	d=$(kube_node_dir "$i")
	name=$(kube_node_name "$i")
	mkdir -p "$d/root" "$d/pod-logs"
	cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $KUBE_PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $KUBE_PKI/kubelet-serving-$name.crt
tlsPrivateKeyFile: $KUBE_PKI/kubelet-serving-$name.key
containerRuntimeEndpoint: unix://$(ctd_sock "$i")
cgroupDriver: cgroupfs
$(_kube_cgroup_config "$i")
enforceNodeAllocatable: []
failCgroupV1: false
failSwapOn: false
clusterDNS: [$KUBE_DNS_IP]
clusterDomain: $KUBE_CLUSTER_DOMAIN
resolvConf: /etc/resolv.conf
podLogsDir: $d/pod-logs
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
localStorageCapacityIsolation: false
maxPods: 110
EOF
}

_kube_node_registered() { kubectl get node "$1" >/dev/null 2>&1; }

kube_kubelet_start() {
	local i=$1 d name
	d=$(kube_node_dir "$i")
	name=$(kube_node_name "$i")
	node_spawn "$i" "kubelet-n$i" "$KUBE_BIN_DIR/kubelet" --config="$d/kubelet.yaml" \
		--kubeconfig="$KUBE_DIR/kubelet-$name.kubeconfig" --hostname-override="$name" \
		--node-ip="$(node_addr "$i")" --root-dir="$d/root" --v="${KUBE_LOG_V:-1}"
}

kube_kubelet_stop() { hc_stop_label "kubelet-n$1" 20; }

kube_proxy_start() {
	local i=$1 d name
	d=$(kube_node_dir "$i")
	name=$(kube_node_name "$i")
	cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $KUBE_DIR/kube-proxy.kubeconfig}
hostnameOverride: $name
mode: iptables
clusterCIDR: $HC_CLUSTER_CIDR
bindAddress: 0.0.0.0
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# The conntrack table size is the machine's (a global sysctl): leave it, and the timeouts.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
	node_spawn "$i" "kube-proxy-n$i" "$KUBE_BIN_DIR/kube-proxy" --config="$d/kube-proxy.yaml" --v="${KUBE_LOG_V:-1}"
}

# kube_node_prepare I : node I's certificates, standard plugins, tailscaled and containerd.
kube_node_prepare() {
	local i=$1 p bin
	mkdir -p "$(kube_node_dir "$i")"
	kube_pki_node "$i"
	# what a node's package of the standard CNI plugins installs (containerd calls loopback,
	# HeadCNI chains portmap and bandwidth)
	bin="$(node_dir "$i")/mnt/opt/cni/bin"
	for p in loopback host-local; do ln -sfn "$HC_REF_CNI_DIR/$p" "$bin/$p"; done
	for p in portmap bandwidth; do install -m 0755 "$CNI_PLUGINS_DIR/$p" "$bin/$p"; done
	# KUBE_TS_MODE=sidecar: no tailscaled on the node, the chart runs it in the agent's pod
	[[ "$KUBE_TS_MODE" == sidecar ]] || node_tailscaled_start "$i"
	kube_ctd_config "$i"
	ctd_start "$i"
}

# kube_node_start I : node I's kubelet and kube-proxy.
kube_node_start() {
	kube_kubelet_config "$1"
	kube_kubelet_start "$1"
	kube_proxy_start "$1"
}

kube_node_wait_registered() {
	hc_wait_daemon 30 "kubelet-n$1" "node-$1 registered" _kube_node_registered "$(kube_node_name "$1")" ||
		hc_die "node $1 did not register"
}

# kube_node_up I : tailscaled, containerd with the images, kubelet and kube-proxy on node I.
# HeadCNI's DaemonSet does the rest (the node turns Ready once its conflist is there).
kube_node_up() {
	local i=$1 t0
	t0=$(hc_now)
	kube_node_prepare "$i"
	kube_images_import "$i" "${KUBE_IMAGES:-core}"
	kube_node_start "$i"
	kube_node_wait_registered "$i"
	hc_log "node $i: kubelet registered ($(hc_since "$t0")s)"
}

# kube_node_pod_cidr I : the pod CIDR the controller-manager gave node I.
kube_node_pod_cidr() { kubectl get node "$(kube_node_name "$1")" -o jsonpath='{.spec.podCIDR}'; }

# kube_node_ready I : the node's Ready condition is True.
kube_node_ready() {
	[[ "$(kubectl get node "$(kube_node_name "$1")" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

# --- cluster add-ons -----------------------------------------------------------------

# kube_coredns : CoreDNS as a Deployment with the Service $KUBE_DNS_IP (needs the pod network).
kube_coredns() {
	kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes $KUBE_CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 30
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
      - name: coredns
        image: $KUBE_COREDNS_IMAGE
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {containerPort: 53, name: dns, protocol: UDP}
        - {containerPort: 53, name: dns-tcp, protocol: TCP}
        securityContext:
          capabilities: {add: [NET_BIND_SERVICE], drop: [ALL]}
          readOnlyRootFilesystem: true
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
        livenessProbe:
          httpGet: {path: /health, port: 8080}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes:
      - name: config
        configMap: {name: coredns, items: [{key: Corefile, path: Corefile}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: $KUBE_DNS_IP
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

# --- the whole cluster -------------------------------------------------------------

# kube_prepare : peers, images and the HeadCNI image (before the state dir exists, apart
# from the HeadCNI image, which is per run: call kimg_headcni after hc_state_init).
kube_prepare() {
	peers_ensure_kube
	kimg_ensure
}

# kube_cluster_up N : control plane and N nodes with kubelets (topology and Headscale up).
# The nodes are prepared while the controllers start, and their images are imported side by
# side (the longest step: about 3 s per node for the 4 images the cluster needs, 12 s for all
# 12 of the conformance tests).
kube_cluster_up() {
	local n=$1 i t0
	t0=$(hc_now)
	kube_cp_up nowait
	kube_cp_tailnet
	for ((i = 1; i <= n; i++)); do kube_node_prepare "$i"; done
	local -a pids=()
	for ((i = 1; i <= n; i++)); do
		kube_images_import "$i" "${KUBE_IMAGES:-core}" &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || hc_die "importing the images failed"; done
	for ((i = 1; i <= n; i++)); do kube_node_start "$i"; done
	for ((i = 1; i <= n; i++)); do kube_node_wait_registered "$i"; done
	kube_cp_wait_serviceaccount
	hc_log "kube: control plane and $n kubelets up ($(hc_since "$t0")s)"
}

# --- HeadCNI, as a user installs it ----------------------------------------------------

KUBE_HC_NS=${KUBE_HC_NS:-kube-system}
# Where the nodes' tailscaled runs: host (started by the harness on each node, as a package
# would) or sidecar (the chart's tailscaled container in the agent's pod).
KUBE_TS_MODE=${KUBE_TS_MODE:-host}
KUBE_HC_RELEASE=${KUBE_HC_RELEASE:-headcni}

# kube_user_env CMD... : CMD as the cluster's admin user would run it: from the control-plane
# host, with kubectl and helm on PATH and the admin kubeconfig; helm keeps its own files in
# the state dir.
kube_user_env() {
	local h=$KUBE_DIR/helm
	mkdir -p "$h"
	ip netns exec "$(node_ns "$KUBE_CP")" env PATH="$KUBE_BIN_DIR:$(dirname "$HELM_BIN"):$PATH" \
		KUBECONFIG="$KUBE_ADMIN_KUBECONFIG" HELM_CACHE_HOME="$h/cache" HELM_CONFIG_HOME="$h/config" \
		HELM_DATA_HOME="$h/data" TMPDIR="$KUBE_DIR" "$@"
}

helm() { kube_user_env "$HELM_BIN" "$@"; }

# kube_headcni_values : the values a user of this cluster gives (their image, the private
# CA of their Headscale).
kube_headcni_values() {
	{
		cat <<EOF
image:
  repository: ${HC_IMAGE_HEADCNI%:*}
  tag: "${HC_IMAGE_HEADCNI##*:}"
  pullPolicy: IfNotPresent
config:
  headscale:
    caCert: |
EOF
		sed 's/^/      /' "$HC_HS_CA"
	} >"$KUBE_DIR/headcni-values.yaml"
	if [[ "$KUBE_TS_MODE" == sidecar ]]; then
		# tailscaled in the agent's pod: it trusts Headscale's CA through the chart's caCert
		# (above), and the image has no iptables binary (tailscaled programs nf_tables over
		# netlink)
		cat >>"$KUBE_DIR/headcni-values.yaml" <<EOF
  tailscale:
    mode: sidecar
    sidecar:
      image:
        repository: ${HC_IMAGE_TAILSCALE%:*}
        tag: "${HC_IMAGE_TAILSCALE##*:}"
        pullPolicy: IfNotPresent
      extraEnv:
        - {name: TS_DEBUG_FIREWALL_MODE, value: nftables}
EOF
	fi
	printf '%s\n' "$KUBE_DIR/headcni-values.yaml"
}

# kube_headcni_deploy [DEPLOY-WITH-HELM ARGS...] : deploy-with-helm.sh of this repository (of the
# chart at git commit $KUBE_HC_CHART_COMMIT when set, e.g. an earlier release's), with
# the run's pre-auth key and API key as files: with an API key the chart's default is the route
# approval controller, which alone gets the key (the harness's Headscale policy has no
# autoApprovers in the kubernetes stage).
kube_headcni_deploy() {
	local t0 KUBE_HC_CHART=""
	t0=$(hc_now)
	if [[ -n "${KUBE_HC_CHART_COMMIT:-}" ]]; then
		# In the run's state directory, so that the teardown removes it with the rest.
		local at=$HC_STATE_DIR/chart-at-$KUBE_HC_CHART_COMMIT
		if [[ ! -d "$at/chart" ]]; then
			mkdir -p "$at"
			git -C "$HC_REPO_DIR" archive "$KUBE_HC_CHART_COMMIT" chart | tar -x -C "$at" ||
				hc_die "cannot extract the chart of commit $KUBE_HC_CHART_COMMIT"
		fi
		KUBE_HC_CHART=$at/chart
	fi
	kube_user_env "$HC_REPO_DIR/deploy-with-helm.sh" -u "$HC_HS_URL" \
		-K "$HC_STATE_DIR/authkey" -A "$HC_STATE_DIR/apikey" \
		--cluster-cidr "$HC_CLUSTER_CIDR" --service-cidr "$KUBE_SERVICE_CIDR" \
		-n "$KUBE_HC_NS" -r "$KUBE_HC_RELEASE" -f "$(kube_headcni_values)" ${KUBE_HC_CHART:+-c "$KUBE_HC_CHART"} "$@" \
		>>"$HC_STATE_DIR/logs/deploy-with-helm.log" 2>&1 ||
		{
			tail -n 20 "$HC_STATE_DIR/logs/deploy-with-helm.log" >&2
			hc_die "deploy-with-helm.sh failed"
		}
	hc_log "kube: deploy-with-helm.sh done ($(hc_since "$t0")s)"
}

# kube_headcni_rollout_wait [TIMEOUT_S] : the DaemonSet rolled out and every agent ready.
kube_headcni_rollout_wait() {
	kubectl -n "$KUBE_HC_NS" rollout status "daemonset/$KUBE_HC_RELEASE" --timeout="${1:-120}s" >/dev/null
}

# kube_controller_rollout_wait [TIMEOUT_S] : the route approval controller rolled out.
kube_controller_rollout_wait() {
	kubectl -n "$KUBE_HC_NS" rollout status "deployment/$KUBE_HC_RELEASE-controller" --timeout="${1:-120}s" >/dev/null
}

# kube_agent_pod I : the name of node I's HeadCNI pod.
kube_agent_pod() {
	kubectl -n "$KUBE_HC_NS" get pods -l app.kubernetes.io/component=agent,app.kubernetes.io/instance="$KUBE_HC_RELEASE" \
		--field-selector "spec.nodeName=$(kube_node_name "$1")" -o jsonpath='{.items[0].metadata.name}'
}

# kube_wait_nodes_ready N TIMEOUT_S
kube_wait_nodes_ready() {
	local n=$1 timeout=$2 i
	for ((i = 1; i <= n; i++)); do
		hc_wait_for "$timeout" "node-$i Ready" kube_node_ready "$i" || return 1
	done
}

# --- workloads --------------------------------------------------------------------------

# kube_pod_ip NS NAME
kube_pod_ip() { kubectl -n "$1" get pod "$2" -o jsonpath='{.status.podIP}'; }

# kube_exec NS POD CMD... : CMD in the pod's first container.
kube_exec() {
	local ns=$1 pod=$2
	shift 2
	kubectl -n "$ns" exec "$pod" -- "$@"
}

# --- the whole harness, as the scripts start it -------------------------------------------

# kube_harness_up : everything up to a cluster with HeadCNI and CoreDNS: peers and images,
# the run's state dir and traps, the HeadCNI image, underlay, Headscale, control plane,
# $HC_NODES nodes, `deploy-with-helm.sh`, CoreDNS. Sets T_START, T_SETUP, ROOT_BEFORE (for
# tr_finish), KUBE_KUBELETS_S (kubelets registered), KUBE_READY_S (deploy until every node
# Ready), KUBE_READY_EARLY (the nodes that turned Ready while the plugin could not attach a pod
# yet: no node file) and KUBE_SETUP_S (the whole setup after the builds).
# shellcheck disable=SC2034 # read by the calling scripts
kube_harness_up() {
	local i t_deploy
	T_START=$(hc_now)
	hc_log "== setup"
	peers_ensure
	kube_prepare
	ROOT_BEFORE=$(topo_root_view)
	hc_state_init
	hc_install_traps
	kimg_headcni
	[[ "$KUBE_TS_MODE" != sidecar ]] || kimg_tailscale
	T_SETUP=$(hc_now)
	topo_up
	topo_node_add "$KUBE_CP"
	hs_up_with_keys
	kube_cluster_up "$HC_NODES"
	KUBE_KUBELETS_S=$(hc_since "$T_SETUP")
	# No node is Ready before HeadCNI: its runtime has no network config yet.
	for ((i = 1; i <= HC_NODES; i++)); do
		! kube_node_ready "$i" || hc_die "node-$i is Ready before any CNI network exists"
	done
	t_deploy=$(hc_now)
	kube_headcni_deploy --wait &
	local deploy_pid=$! left
	# Watch each node turn Ready, and whether the plugin could already attach pods then (the
	# node file the agent writes once it has joined: what the plugin's STATUS checks).
	KUBE_READY_EARLY=()
	local -A seen=()
	local deadline=$(($(date +%s) + 90))
	while :; do
		left=0
		for ((i = 1; i <= HC_NODES; i++)); do
			[[ -n "${seen[$i]:-}" ]] && continue
			if kube_node_ready "$i"; then
				seen[$i]=1
				[[ -s "$(hcni_node_file "$i")" ]] || KUBE_READY_EARLY+=("node-$i")
			else
				left=1
			fi
		done
		((left)) || break
		(($(date +%s) < deadline)) || hc_die "the nodes did not turn Ready after HeadCNI was installed"
		sleep 0.2
	done
	KUBE_READY_S=$(hc_since "$t_deploy")
	wait "$deploy_pid" || hc_die "deploy-with-helm.sh failed"
	kube_headcni_rollout_wait 90 || hc_die "the HeadCNI DaemonSet did not roll out"
	if kubectl -n "$KUBE_HC_NS" get deployment "$KUBE_HC_RELEASE-controller" >/dev/null 2>&1; then
		kube_controller_rollout_wait 90 || hc_die "the route approval controller did not roll out"
	fi
	kube_coredns
	kubectl -n kube-system rollout status deployment/coredns --timeout=90s >/dev/null ||
		hc_die "CoreDNS did not become ready"
	KUBE_SETUP_S=$(hc_since "$T_SETUP")
	hc_log "setup: kubelets registered after ${KUBE_KUBELETS_S}s, nodes Ready ${KUBE_READY_S}s after deploy-with-helm.sh started, whole setup ${KUBE_SETUP_S}s"
}
