#!/usr/bin/env bash
# Chart checks: helm lint --strict, helm template for several value sets,
# validation of every rendered manifest against the Kubernetes schemas of 1.20
# and of the newest release kubernetes-validate ships, no secret in any pod
# spec, argument or ConfigMap, the values schema rejecting bad input, NOTES.txt,
# and deploy-with-helm.sh (--dry-run, argument validation, and a full run
# against stand-in helm and kubectl that record what they were given).
#
# Installs what it needs into a cache directory (HEADCNI_CACHE, default
# /var/cache/headcni-peers): helm built with 'go install', kubernetes-validate
# from PyPI in two virtualenvs (one release that still ships the 1.20 schemas,
# and a current one). The checks run as tests of integration/lib/testing.sh's runner;
# exits non-zero when any fails.

# 'cond && ok ... || bad ...' is safe here: ok always returns 0.
# shellcheck disable=SC2015
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HEADCNI_CACHE:-/var/cache/headcni-peers}
HELM_VERSION=v3.22.0
KV_OLD=1.28.3   # a kubernetes-validate release that still ships the 1.20 schemas (checked below)
KV_NEW=1.37.0   # a current release; its newest schema version is found at run time
OLDEST_K8S=1.20
WORK=$(mktemp -d "${TMPDIR:-/tmp}/headcni-chart-check.XXXXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
export HC_STATE_DIR=$WORK/state
# shellcheck source=lib/testing.sh
source "$ROOT/integration/lib/testing.sh"
say() { hc_log "$*"; }

# ------------------------------------------------------------------ tools
mkdir -p "$CACHE"
HELM=$CACHE/helm-$HELM_VERSION/helm
if [[ ! -x $HELM ]]; then
	say "building helm $HELM_VERSION into $CACHE/helm-$HELM_VERSION (a few minutes)"
	command -v go >/dev/null || { say "go is needed to build helm"; exit 1; }
	mkdir -p "$CACHE/helm-$HELM_VERSION"
	(
		flock 9
		[[ -x $HELM ]] || GOBIN=$CACHE/helm-$HELM_VERSION GOFLAGS=-buildvcs=false \
			nice -n 10 go install -p 1 "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	) 9>"$CACHE/helm-$HELM_VERSION.lock"
fi
"$HELM" version --short >/dev/null

venv_for() { # version -> path of a virtualenv with kubernetes-validate==version
	local v=$1 dir=$CACHE/kubernetes-validate-$1
	if [[ ! -f $dir/.complete ]]; then
		say "installing kubernetes-validate $v into $dir" >&2
		rm -rf -- "$dir"
		python3 -m venv "$dir" >&2
		"$dir/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$v" >&2
		touch "$dir/.complete"
	fi
	printf '%s' "$dir"
}
KV_OLD_DIR=$(venv_for "$KV_OLD")
KV_NEW_DIR=$(venv_for "$KV_NEW")
NEWEST_K8S=$("$KV_NEW_DIR/bin/python" -c 'import kubernetes_validate.utils as u; print(u.major_minor(u.latest_version()))')
OLD_HAS=$("$KV_OLD_DIR/bin/python" -c 'import kubernetes_validate.utils as u; print(" ".join(u.major_minor(v) for v in u.all_versions()))')
[[ " $OLD_HAS " == *" $OLDEST_K8S "* ]] || { say "kubernetes-validate $KV_OLD lacks the $OLDEST_K8S schemas"; exit 1; }
say "helm $("$HELM" version --short); schemas: Kubernetes $OLDEST_K8S (kubernetes-validate $KV_OLD) and $NEWEST_K8S (kubernetes-validate $KV_NEW)"

# ------------------------------------------------------------------ validator
# Validates a multi-document manifest file against one Kubernetes version and
# asserts what the chart promises about secrets, privileges and host paths.
cat >"$WORK/check_manifests.py" <<'PY'
import base64, json, sys
import yaml
import kubernetes_validate.utils as kv

path, version = sys.argv[1], sys.argv[2]
secrets = [s for s in sys.argv[3:] if s]
errors = []
with open(path) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
if not docs:
    errors.append("no manifests rendered")

def walk(node, trail=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{trail}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{trail}[{i}]")
    else:
        yield trail, node

def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return spec["template"]["spec"]
    return None

NEEDS_1_30 = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "PodDisruptionBudget")

needles = []
for s in secrets:
    needles += [s, base64.b64encode(s.encode()).decode()]

for doc in docs:
    name = f'{doc.get("kind")}/{doc.get("metadata", {}).get("name")}'
    if doc.get("kind") == "ServiceMonitor":
        # A CRD: no schema in kubernetes-validate; check the parts that matter.
        ep = doc["spec"]["endpoints"]
        if doc["apiVersion"] != "monitoring.coreos.com/v1" or not ep or ep[0].get("port") != "metrics":
            errors.append(f"{name}: unexpected ServiceMonitor shape")
        svc = [d for d in docs if d["kind"] == "Service"]
        sel = doc["spec"]["selector"]["matchLabels"]
        if not any(all(s["metadata"]["labels"].get(k) == v for k, v in sel.items()) for s in svc):
            errors.append(f"{name}: selector matches no rendered Service")
    elif doc.get("kind") == "PrometheusRule":
        # A CRD as well: groups of named rules with an expression each.
        groups = doc.get("spec", {}).get("groups") or []
        if doc["apiVersion"] != "monitoring.coreos.com/v1" or not groups or not all(
                g.get("name") and g.get("rules") and all(r.get("expr") and (r.get("alert") or r.get("record"))
                                                         for r in g["rules"]) for g in groups):
            errors.append(f"{name}: unexpected PrometheusRule shape")
    elif doc.get("kind") in NEEDS_1_30 and tuple(int(x) for x in version.split(".")) < (1, 30):
        # The controller mode's objects: that mode needs Kubernetes 1.30 (chart/README.md).
        pass
    else:
        try:
            kv.validate(doc, version, strict=True)
        except Exception as e:  # noqa: BLE001 - report every kind of failure
            errors.append(f"{name}: invalid for Kubernetes {version}: {getattr(e, 'message', e)}")

    # No secret value outside a Secret, in any form.
    if doc.get("kind") != "Secret":
        for trail, value in walk(doc):
            if isinstance(value, str) and any(n in value for n in needles):
                errors.append(f"{name}{trail}: contains a secret value")
    else:
        for k, v in (doc.get("stringData") or {}).items():
            errors.append(f"{name}: stringData.{k} would hold a plain value")

    spec = pod_spec(doc)
    if spec is None:
        continue
    containers = spec.get("initContainers", []) + spec["containers"]
    for c in containers:
        cname = f"{name} container {c['name']}"
        for e in c.get("env", []):
            if "value" in e and any(n in str(e["value"]) for n in needles):
                errors.append(f"{cname}: env {e['name']} holds a secret value")
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
                errors.append(f"{cname}: env {e['name']} is fed from a Secret (keys are files only)")
        for a in c.get("args", []) + c.get("command", []):
            if any(n in a for n in needles):
                errors.append(f"{cname}: argument holds a secret value")
            if a.startswith(("--auth-key=", "--api-key=")):
                errors.append(f"{cname}: key passed as an argument value")
        if "resources" not in c or not c["resources"].get("requests"):
            errors.append(f"{cname}: no resource requests")
        sc = c.get("securityContext", {})
        if not sc.get("privileged"):
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cname}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                errors.append(f"{cname}: capabilities not dropped")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{cname}: root filesystem writable")
    for v in spec.get("volumes", []):
        if "hostPath" in v and not v["hostPath"].get("type"):
            errors.append(f"{name}: hostPath volume {v['name']} has no type")
        if "secret" in v:
            users = [c["name"] for c in containers
                     if any(m["name"] == v["name"] for m in c.get("volumeMounts", []))]
            paths = sorted(i["path"] for i in v["secret"].get("items", []))
            if doc["kind"] == "DaemonSet":
                # The nodes get the pre-auth key, never the API key.
                if v["secret"].get("defaultMode") != 0o400:
                    errors.append(f"{name}: secret volume {v['name']} mode is not 0400")
                if users != ["agent"]:
                    errors.append(f"{name}: secret volume {v['name']} mounted into {users}, want the agent only")
                if paths != ["auth-key"]:
                    errors.append(f"{name}: secret volume {v['name']} maps {paths}, want the pre-auth key only")
            elif name.endswith("-controller") and doc["kind"] == "Deployment":
                # The API key: group-readable for the controller's group (it runs as 65534).
                psc = spec.get("securityContext", {})
                if v["secret"].get("defaultMode") != 0o440 or psc.get("fsGroup") != 65534 or psc.get("runAsUser") != 65534:
                    errors.append(f"{name}: secret volume {v['name']} is not 0440 for group 65534 of a uid 65534 pod")
                if users != ["controller"] or paths != ["api-key"]:
                    errors.append(f"{name}: secret volume {v['name']} mounted into {users} with {paths}, want the API key in the controller only")
                if spec.get("hostNetwork") or not psc.get("runAsNonRoot"):
                    errors.append(f"{name}: the controller must be non-root, off the host network")
            else:
                errors.append(f"{name}: unexpected secret volume {v['name']}")
    if doc["kind"] == "DaemonSet":
        if not spec.get("hostNetwork"):
            errors.append(f"{name}: not on the host network")
        if not any(t.get("operator") == "Exists" and not t.get("key") for t in spec.get("tolerations", [])):
            errors.append(f"{name}: does not tolerate every taint")
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"{name}: every container gets an API token")

# RBAC: nodes read, and "patch" only where the node-identity policy narrows it (controller
# mode), for the two service accounts the policy names; NetworkPolicies, Pods and Namespaces
# followed (list, watch) for NetworkPolicy enforcement. Nothing else.
policy = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
narrowed = " ".join(c["expression"] for d in policy for c in d["spec"].get("matchConditions", []))
bindings = {d["roleRef"]["name"]: d["subjects"] for d in docs if d["kind"] == "ClusterRoleBinding"}
allowed = {
    ("", "nodes"): (["get", "list", "watch"], ["get", "list", "patch", "watch"]),
    ("", "pods"): (["list", "watch"],),
    ("", "namespaces"): (["list", "watch"],),
    ("networking.k8s.io", "networkpolicies"): (["list", "watch"],),
}
for doc in docs:
    if doc["kind"] == "ClusterRole":
        cr = doc["metadata"]["name"]
        for r in doc["rules"]:
            verbs = sorted(r["verbs"])
            for group in r.get("apiGroups", []):
                for res in r.get("resources", []):
                    if verbs not in allowed.get((group, res), ()) or r.get("resourceNames"):
                        errors.append(f"ClusterRole/{cr}: rule beyond what HeadCNI needs: {r}")
            if "patch" in verbs:
                for sub in bindings.get(cr, []):
                    user = f"system:serviceaccount:{sub['namespace']}:{sub['name']}"
                    if f"'{user}'" not in narrowed:
                        errors.append(f"ClusterRole/{cr}: patch on nodes for {user}, which no admission policy narrows")

for e in errors:
    print(f"    {e}")
sys.exit(1 if errors else 0)
PY

# ------------------------------------------------------------------ value sets
AUTH_KEY=hskey-auth-TESTAUTHKEY0123456789abcdef
API_KEY=hskey-api-TESTAPIKEY9876543210fedcba
VS=$WORK/values
mkdir -p "$VS"
cat >"$VS/defaults.yaml" <<'EOF'
{}
EOF
cat >"$VS/keys.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
    apiKey: $API_KEY
  network:
    clusterCIDR: 10.244.0.0/16
    serviceCIDR: 10.96.0.0/12
EOF
cat >"$VS/sidecar.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example:8443/
    authKey: $AUTH_KEY
  tailscale:
    mode: sidecar
    hostname: "k8s-\$(NODE_NAME)"
    tags: [tag:headcni]
    sidecar:
      extraArgs: [--verbose=1]
      extraEnv: [{name: TS_DEBUG_FIREWALL_MODE, value: auto}]
  network:
    clusterCIDR: [10.244.0.0/16, "fd00:10:244::/56"]
EOF
cat >"$VS/sidecar-privileged.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
  tailscale:
    mode: sidecar
    sidecar:
      privileged: true
EOF
cat >"$VS/existing-secret.yaml" <<'EOF'
config:
  headscale:
    url: https://headscale.example
    existingSecret: my-headscale-keys
    existingSecretKeys:
      authKey: preauth
      apiKey: api
EOF
cat >"$VS/ipam-dense.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
  ipam:
    type: headcni-ipam
    strategy: dense
  network:
    mtu: 1280
    masquerade: false
  dns:
    nameservers: [10.96.0.10]
    search: [default.svc.cluster.local, svc.cluster.local, cluster.local]
    options: ["ndots:5"]
EOF
cat >"$VS/exclusive.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
  ipam:
    strategy: dense-pack
cni:
  exclusive: true
EOF
cat >"$VS/host-local.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
  ipam:
    type: host-local
  plugins:
    portmap: false
    bandwidth: false
cni:
  binDir: /var/lib/example/cni/bin
  confDir: /var/lib/example/cni/net.d
  conflistName: 05-headcni.conflist
EOF
cat >"$VS/servicemonitor.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
metrics:
  port: 9153
  path: /custom-metrics
  serviceMonitor:
    enabled: true
    interval: 15s
    labels: {release: kube-prometheus-stack}
    metricRelabelings:
      - sourceLabels: [__name__]
        regex: go_.*
        action: drop
EOF
# The shipped k3s values, as a user passes them (with keys for a complete install).
{ cat "$ROOT/chart/values-k3s.yaml"; printf 'config:\n  headscale:\n    url: https://headscale.example\n    authKey: %s\n' "$AUTH_KEY"; } >"$VS/k3s.yaml"

cat >"$VS/monitoring.yaml" <<EOF
config:
  headscale:
    url: https://headscale.example
    authKey: $AUTH_KEY
metrics:
  serviceMonitor:
    enabled: true
  prometheusRule:
    enabled: true
    labels: {release: kube-prometheus-stack}
  dashboard:
    enabled: true
    namespace: monitoring
logFormat: json
EOF
cat >"$VS/custom-resources.yaml" <<EOF
fullnameOverride: cni
image:
  repository: registry.example/headcni
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
imagePullSecrets: [{name: regcred}]
config:
  headscale:
    url: https://headscale.example
    apiKey: $API_KEY
    caCert: |
      -----BEGIN CERTIFICATE-----
      MIIBszCCAVmgAwIBAgIUTESTONLY
      -----END CERTIFICATE-----
  network:
    podCIDR: "10.244.7.0/24, fd00:10:244:7::/64"
    networkPolicy: false
agent:
  privileged: true
  resources:
    requests: {cpu: 100m, memory: 64Mi}
    limits: {cpu: "1", memory: 256Mi}
  readinessProbe: {periodSeconds: 5, failureThreshold: 3}
install:
  resources:
    requests: {cpu: 5m, memory: 8Mi}
metrics:
  bind: 127.0.0.1
uninstall:
  teardown:
    enabled: false
nodeSelector: {kubernetes.io/hostname: node-7}
tolerations:
  - {key: example.com/dedicated, operator: Equal, value: net, effect: NoSchedule}
priorityClassName: system-cluster-critical
updateStrategy:
  rollingUpdate: {maxUnavailable: 20%}
podAnnotations: {example.com/owner: netops}
logLevel: debug
EOF

render() { # set-name, kube-version, out
	"$HELM" template headcni "$ROOT/chart" --namespace kube-system \
		-f "$VS/$1.yaml" --kube-version "$2" >"$3" 2>"$3.err"
}

# helm lint --strict, and every value set rendered for the oldest and the newest Kubernetes and validated
t_render() {
	for vs in "$VS"/*.yaml; do
		name=$(basename "$vs" .yaml)
		if "$HELM" lint --strict "$ROOT/chart" -f "$vs" >"$WORK/lint.out" 2>&1; then
			ok "helm lint --strict ($name)"
		else
			bad "helm lint --strict ($name)"; sed 's/^/    /' "$WORK/lint.out"
		fi
		for pair in "$OLDEST_K8S:$KV_OLD_DIR" "$NEWEST_K8S:$KV_NEW_DIR"; do
			k8s=${pair%%:*} venv=${pair#*:}
			out=$WORK/render-$name-$k8s.yaml
			if ! render "$name" "$k8s.0" "$out"; then
				bad "helm template ($name, Kubernetes $k8s)"; sed 's/^/    /' "$out.err"; continue
			fi
			if grep -qF -e "$AUTH_KEY" -e "$API_KEY" "$out"; then
				bad "plain key text in the rendered manifests ($name)"
			fi
			if "$venv/bin/python" "$WORK/check_manifests.py" "$out" "$k8s" "$AUTH_KEY" "$API_KEY" >"$WORK/check.out" 2>&1; then
				ok "rendered manifests valid for Kubernetes $k8s, no secret outside the Secret ($name)"
			else
				bad "rendered manifests ($name, Kubernetes $k8s)"; cat "$WORK/check.out"
			fi
		done
	done
}

# Facts of specific value sets (newest render).
expect_in() { # set, description, fixed string
	if grep -qF -- "$3" "$WORK/render-$1-$NEWEST_K8S.yaml"; then ok "$2 ($1)"; else bad "$2 ($1): '$3' not rendered"; fi
}
expect_not_in() {
	if grep -qF -- "$3" "$WORK/render-$1-$NEWEST_K8S.yaml"; then bad "$2 ($1): '$3' rendered"; else ok "$2 ($1)"; fi
}

# facts of specific value sets (newest render)
t_render_facts() {
	expect_in defaults "host mode uses the host tailscaled socket" "--tailscale-socket=/var/run/tailscale/tailscaled.sock"
	expect_not_in defaults "no key: no Secret rendered" "kind: Secret"
	expect_not_in defaults "no key: no key file flag" "--auth-key-file"
	expect_in keys "auth key passed as a file" "--auth-key-file=/etc/headcni/keys/auth-key"
	expect_in keys "API key passed as a file" "--api-key-file=/etc/headcni/keys/api-key"
	expect_not_in keys "https: the API key needs no clear-text permission" "--allow-http-api-key"
	expect_in keys "checksum annotation restarts agents on key change" "checksum/secret:"
	expect_in keys "pre-delete hook" "helm.sh/hook: pre-delete"
	expect_in keys "agent watches the teardown signal" "--teardown-configmap=kube-system/headcni-teardown"
	expect_in keys "install init container" "- install"
	expect_in keys "install stages the conflist for the agent" "--stage-dir=/run/headcni/staged"
	expect_in keys "the agent publishes it into the conf dir" "--publish-conflist=/run/headcni/staged/10-headcni.conflist"
	expect_in k3s "k3s: the agent publishes into k3s's conf dir" "--conf-dir=/var/lib/rancher/k3s/agent/etc/cni/net.d"
	expect_in k3s "k3s: binaries into k3s's CNI bin dir" "--bin-dir=/var/lib/rancher/k3s/data/cni"
	expect_in k3s "k3s: the host's k3s conf dir is mounted" "path: /var/lib/rancher/k3s/agent/etc/cni/net.d"
	expect_in keys "system-node-critical" 'priorityClassName: "system-node-critical"'
	expect_in keys "maxUnavailable" "maxUnavailable: 1"
	expect_in sidecar "sidecar tailscaled container" "name: tailscaled"
	expect_in sidecar "sidecar socket shared with the agent" "--socket=/run/headcni/tailscale/tailscaled.sock"
	expect_in sidecar "sidecar state on the node" "path: /var/lib/headcni/tailscale"
	expect_in sidecar "TUN device" "type: CharDevice"
	# shellcheck disable=SC2016 # a literal $(NODE_NAME), expanded by the kubelet
	expect_in sidecar "per-node hostname" '--hostname=k8s-$(NODE_NAME)'
	expect_in sidecar "dual-stack cluster CIDR list" "--cluster-cidr=fd00:10:244::/56"
	expect_not_in sidecar "sidecar unprivileged by default" "privileged: true"
	expect_in sidecar-privileged "sidecar privileged on request" "privileged: true"
	expect_in existing-secret "existing Secret mounted" "secretName: my-headscale-keys"
	expect_in existing-secret "existing Secret key mapping" "key: preauth"
	expect_not_in existing-secret "no chart Secret with existingSecret" "kind: Secret"
	expect_in ipam-dense "dense strategy passed to install" "--strategy=dense"
	expect_in ipam-dense "fixed MTU" "--mtu=1280"
	expect_in ipam-dense "DNS options" "--dns-option=ndots:5"
	expect_in exclusive "the seed's strategy name dense-pack passes the schema to install" "--strategy=dense-pack"
	expect_in exclusive "exclusive mode passed to install" "- --exclusive"
	expect_not_in defaults "not exclusive by default" "--exclusive"
	expect_in host-local "host-local IPAM" "--ipam=host-local"
	expect_not_in host-local "no strategy with host-local" "--strategy="
	expect_in host-local "portmap off" "--portmap=false"
	expect_in host-local "custom CNI dir" "path: /var/lib/example/cni/net.d"
	# the default image is the one the release workflow publishes for this version
	local app owner
	app=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/chart/Chart.yaml")
	owner=$(sed -n 's|^repository = "https://github.com/\([^/]*\)/.*"$|\1|p' "$ROOT/Cargo.toml")
	expect_in defaults "default image = what the release publishes (ghcr.io/$owner/headcni:$app)" \
		"image: \"ghcr.io/$owner/headcni:$app\""
	# shellcheck disable=SC2016 # the workflow's own shell variable, literally
	grep -qF 'echo "image=ghcr.io/$owner/headcni"' "$ROOT/.github/workflows/release.yml" &&
		ok "the release workflow publishes ghcr.io/<owner>/headcni" || bad "release.yml does not publish ghcr.io/<owner>/headcni"
	expect_in servicemonitor "ServiceMonitor rendered" "kind: ServiceMonitor"
	expect_not_in defaults "no PrometheusRule by default" "kind: PrometheusRule"
	expect_not_in defaults "no dashboard by default" "headcni.json"
	expect_in monitoring "PrometheusRule rendered" "kind: PrometheusRule"
	expect_in monitoring "the rule's labels" "release: kube-prometheus-stack"
	expect_in monitoring "dashboard ConfigMap for Grafana's sidecar" 'grafana_dashboard: "1"'
	expect_in monitoring "dashboard in the sidecar's namespace" "namespace: monitoring"
	expect_in monitoring "JSON logs" 'value: "json"'
	# what kubectl exec ds/headcni -- headcni status needs in the agent container
	expect_in defaults "exec lands in the agent" "kubectl.kubernetes.io/default-container: agent"
	expect_in defaults "the agent reads the CNI configuration" "--conf-dir=/etc/cni/net.d"
	expect_in servicemonitor "metrics port" "--metrics-port=9153"
	expect_in servicemonitor "metrics path" "path: /custom-metrics"
	expect_in custom-resources "digest image" "registry.example/headcni@sha256:"
	expect_in custom-resources "custom CPU limit" 'cpu: "1"'
	expect_in custom-resources "pod CIDR override" "--pod-cidr=fd00:10:244:7::/64"
	expect_in custom-resources "probe host follows a loopback bind" 'host: "127.0.0.1"'
	expect_in custom-resources "CA file" "--headscale-ca-file=/etc/headcni/ca/ca.crt"
	expect_in custom-resources "extra toleration kept" "example.com/dedicated"
	expect_not_in custom-resources "teardown disabled" "helm.sh/hook"
	expect_not_in custom-resources "privileged agent needs no /proc/sys mount" "--proc-sys-dir"
	expect_in defaults "NetworkPolicy enforcement on by default" "--enable-network-policy=true"
	expect_in defaults "the agent follows NetworkPolicies" 'resources: ["networkpolicies"]'
	expect_in custom-resources "NetworkPolicy enforcement off" "--enable-network-policy=false"
	expect_not_in custom-resources "no NetworkPolicy RBAC when off" "networkpolicies"
	expect_not_in custom-resources "no Pod RBAC when off" '"pods"'
}

# `kubectl exec ds/headcni -- headcni status` in every mode: the agent container's environment
# names the socket, run, conf and /proc/sys directories the agent itself uses, and the conf
# dir is mounted where the environment says, writable (the agent publishes the conflist there)
t_agent_env() {
	local vs
	for vs in defaults sidecar host-local custom-resources; do
		if "$KV_NEW_DIR/bin/python" - "$WORK/render-$vs-$NEWEST_K8S.yaml" >"$WORK/env.out" 2>&1 <<'PY'; then
import sys, yaml
ds = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
agent = pod["containers"][0]
assert agent["name"] == "agent", agent["name"]
assert ds["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "agent"
env = {e["name"]: e.get("value") for e in agent.get("env", [])}
args = dict(a[2:].split("=", 1) for a in agent["args"][1:] if a.startswith("--") and "=" in a)
mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
pairs = [("HEADCNI_TAILSCALE_SOCKET", "tailscale-socket"), ("HEADCNI_RUN_DIR", "run-dir"),
         ("HEADCNI_CONF_DIR", "conf-dir"), ("HEADCNI_CONFLIST_NAME", "conflist-name"),
         ("HEADCNI_METRICS_PORT", "metrics-port")]
if "proc-sys-dir" in args:
    pairs.append(("HEADCNI_PROC_SYS_DIR", "proc-sys-dir"))
for var, flag in pairs:
    assert env.get(var) == args[flag], f"{var}={env.get(var)!r} but --{flag}={args[flag]!r}"
conf = mounts.get(env["HEADCNI_CONF_DIR"])
# Writable: the agent publishes the staged conflist there and the uninstall removes it.
assert conf and not conf.get("readOnly"), f"conf dir not mounted writable: {conf}"
assert args.get("publish-conflist", "").endswith("/" + env["HEADCNI_CONFLIST_NAME"]), "the agent publishes no conflist"
assert mounts.get(args["bin-dir"]) and not mounts[args["bin-dir"]].get("readOnly"), "bin dir not mounted writable"
sock_dir = env["HEADCNI_TAILSCALE_SOCKET"].rsplit("/", 1)[0]
assert sock_dir in mounts, f"no mount at the socket's directory {sock_dir}"
assert env["HEADCNI_RUN_DIR"] in mounts, "run dir not mounted"
print(f'socket {env["HEADCNI_TAILSCALE_SOCKET"]}, conf {env["HEADCNI_CONF_DIR"]}/{env["HEADCNI_CONFLIST_NAME"]}')
PY
			ok "agent environment for headcni status ($vs): $(cat "$WORK/env.out")"
		else
			bad "agent environment for headcni status ($vs)"; sed 's/^/    /' "$WORK/env.out"
		fi
	done
}

# the binary accepts every flag the chart passes (subcommands that exist)
t_flags() {
	BIN=${HEADCNI_BIN:-$ROOT/target/x86_64-unknown-linux-musl/release/headcni}
	[[ -x $BIN ]] || BIN=$ROOT/target/release/headcni
	"$KV_NEW_DIR/bin/python" - "$WORK"/render-*-"$NEWEST_K8S".yaml >"$WORK/chart-flags" <<'PY'
import sys, yaml
seen = set()
for path in sys.argv[1:]:
    for d in yaml.safe_load_all(open(path)):
        if not d or d["kind"] not in ("DaemonSet", "Job"):
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            args = c.get("args", [])
            if c.get("command") or not args:
                continue  # not the headcni image (tailscaled)
            for a in args[1:]:
                if a.startswith("--"):
                    seen.add((args[0], a.split("=", 1)[0]))
for sub, flag in sorted(seen):
    print(sub, flag)
PY
	if [[ ! -x $BIN ]]; then
		skip "no headcni binary built ($BIN)"
	else
		mapfile -t subs < <(cut -d' ' -f1 "$WORK/chart-flags" | sort -u)
		for sub in "${subs[@]}"; do
			help=$("$BIN" "$sub" --help 2>&1 || true)
			if ! grep -q -- "--help" <<<"$help"; then
				say "skip: headcni $sub has no --help yet"
				continue
			fi
			missing=""
			while read -r s flag; do
				[[ $s == "$sub" ]] || continue
				grep -qE -- "(^|[^-[:alnum:]])${flag}([^-[:alnum:]]|$)" <<<"$help" || missing+=" $flag"
			done <"$WORK/chart-flags"
			[[ -z $missing ]] && ok "headcni $sub knows every flag the chart passes" ||
				bad "headcni $sub lacks flags the chart passes:$missing"
		done
	fi
}

mutate() { # description, python expression applied to the DaemonSet document d
	"$KV_NEW_DIR/bin/python" - "$WORK/render-keys-$NEWEST_K8S.yaml" "$WORK/mutated.yaml" "$2" <<'PY'
import sys, yaml
src, dst, expr = sys.argv[1:4]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
for d in docs:
    if d["kind"] == "DaemonSet":
        exec(expr, {"d": d, "c": d["spec"]["template"]["spec"]["containers"][0]})
yaml.safe_dump_all(docs, open(dst, "w"))
PY
	if "$KV_NEW_DIR/bin/python" "$WORK/check_manifests.py" "$WORK/mutated.yaml" "$NEWEST_K8S" "$AUTH_KEY" "$API_KEY" >/dev/null 2>&1; then
		bad "validator misses $1"
	else
		ok "validator catches $1"
	fi
}

# the validator itself catches faults
t_validator() {
	mutate "a key in an env value" "c['env'].append({'name': 'HEADSCALE_AUTH_KEY', 'value': '$AUTH_KEY'})"
	mutate "a key fed from a Secret into env" "c['env'].append({'name': 'K', 'valueFrom': {'secretKeyRef': {'name': 's', 'key': 'k'}}})"
	mutate "a key as an argument" "c['args'].append('--auth-key=x')"
	mutate "a misspelt field" "d['spec']['template']['spec']['hostNetwrk'] = True"
	mutate "a secret volume readable by all" "[v['secret'].__setitem__('defaultMode', 0o644) for v in d['spec']['template']['spec']['volumes'] if 'secret' in v]"
	mutate "a hostPath without type" "d['spec']['template']['spec']['volumes'][0]['hostPath'].pop('type')"
	mutate "a container without dropped capabilities" "c['securityContext']['capabilities'].pop('drop')"
}

reject() { # description, expected message fragment, helm --set arguments...
	local what=$1 want=$2; shift 2
	if "$HELM" template headcni "$ROOT/chart" "$@" >/dev/null 2>"$WORK/reject.err"; then
		bad "rejects $what: rendered"
	elif grep -qF -- "$want" "$WORK/reject.err"; then
		ok "rejects $what"
	else
		bad "rejects $what: message lacks '$want'"; sed 's/^/    /' "$WORK/reject.err"
	fi
}

# the values schema and the chart's own checks reject bad input
t_schema() {
	reject "MTU below 576" "/config/network/mtu" --set config.network.mtu=575
	reject "MTU above 9000" "/config/network/mtu" --set config.network.mtu=9001
	reject "MTU word other than auto" "/config/network/mtu" --set config.network.mtu=automatic
	reject "unknown strategy" "/config/ipam/strategy" --set config.ipam.strategy=dence
	reject "unknown IPAM type" "/config/ipam/type" --set config.ipam.type=calico-ipam
	reject "unknown tailscaled mode" "/config/tailscale/mode" --set config.tailscale.mode=daemon
	reject "metrics port 0" "/metrics/port" --set metrics.port=0
	reject "metrics port 65536" "/metrics/port" --set metrics.port=65536
	reject "misspelt key" "additional properties" --set config.ipam.stratgy=dense
	reject "misspelt top-level key" "additional properties" --set nodeselector.a=b
	reject "bad CIDR" "/config/network/clusterCIDR" --set config.network.clusterCIDR=10.244.0.0/33
	reject "URL without scheme" "/config/headscale/url" --set config.headscale.url=headscale.example
	reject "unknown log level" "/logLevel" --set logLevel=verbose
	reject "tag without tag: prefix" "/config/tailscale/tags" --set "config.tailscale.tags={headcni}"
	reject "bad resource quantity" "/agent/resources" --set agent.resources.requests.memory=lots
	reject "existingSecret together with a key" "leave config.headscale.authKey" \
		--set config.headscale.url=https://h.example --set config.headscale.existingSecret=s --set config.headscale.authKey=k
	reject "key without URL" "config.headscale.url is required" --set config.headscale.authKey=k
	reject "API key over plain http" "over https only" \
		--set config.headscale.url=http://h.example:8080 --set config.headscale.apiKey=k
	reject "hostname shared by every node" "/config/tailscale/hostname" --set config.tailscale.hostname=node
	reject "ServiceMonitor without Service" "needs metrics.service.enabled" \
		--set metrics.serviceMonitor.enabled=true --set metrics.service.enabled=false
	reject "sidecar socket in the host tailscaled's directory" "sidecar mode must not" \
		--set config.tailscale.mode=sidecar --set config.tailscale.socket=/var/run/tailscale/tailscaled.sock
	reject "Kubernetes older than 1.20" "kubeVersion" --kube-version 1.19.0
}

# the alerts: promtool check rules and test rules on fixtures, and the chart ships exactly
# that file; the dashboard's queries parse; the agent's own exposition passes promtool check
# metrics and has every series the alerts and the dashboard use
t_monitoring() {
	# promtool, pinned and cached by lib/peers.sh (built once)
	"$ROOT/integration/lib/peers.sh" checkers >"$WORK/peers.log" 2>&1 ||
		{ bad "promtool could not be built"; tail -n 20 "$WORK/peers.log"; return; }
	PROMTOOL=$("$ROOT/integration/lib/peers.sh" print | sed -n 's/^PROMTOOL_BIN=//p')
	local rules=$ROOT/chart/files/alerts.yaml tests=$ROOT/integration/fixtures/alerts.test.yaml
	"$PROMTOOL" check rules "$rules" >"$WORK/promtool.out" 2>&1 &&
		ok "promtool check rules: $(grep -o '[0-9]* rules found' "$WORK/promtool.out")" ||
		{ bad "promtool check rules"; sed 's/^/    /' "$WORK/promtool.out"; }
	"$PROMTOOL" test rules "$tests" >"$WORK/promtool.out" 2>&1 &&
		ok "promtool test rules on the fixtures (every alert fires for a broken node only, after its for)" ||
		{ bad "promtool test rules"; sed 's/^/    /' "$WORK/promtool.out"; }
	"$KV_NEW_DIR/bin/python" - "$WORK/render-monitoring-$NEWEST_K8S.yaml" "$rules" "$ROOT/chart/dashboards/headcni.json" \
		"$WORK/dashboard-rules.yaml" "$WORK/used-metrics" >"$WORK/mon.out" 2>&1 <<'PY' &&
import json, re, sys, yaml
rendered, rules, dashboard, out, used = sys.argv[1:6]
rule = next(d for d in yaml.safe_load_all(open(rendered)) if d and d["kind"] == "PrometheusRule")
shipped = yaml.safe_load(open(rules))
assert rule["spec"] == shipped, "the rendered PrometheusRule differs from files/alerts.yaml"
cm = next(d for d in yaml.safe_load_all(open(rendered)) if d and d["kind"] == "ConfigMap" and "headcni.json" in d["data"])
assert json.loads(cm["data"]["headcni.json"]) == json.load(open(dashboard)), "the rendered dashboard differs"
exprs = [t["expr"] for p in json.load(open(dashboard))["panels"] for t in p["targets"]]
# The dashboard's queries as recording rules, so that promtool parses them ($__rate_interval: 5m).
records = [{"record": f"headcni:dashboard_{i}", "expr": e.replace("$__rate_interval", "5m")} for i, e in enumerate(exprs)]
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}, open(out, "w"))
names = set()
for e in exprs + [r["expr"] for g in shipped["groups"] for r in g["rules"]]:
    names |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bheadcni_[a-z0-9_]+", e)}
open(used, "w").write("\n".join(sorted(names)) + "\n")
print(f"{len(exprs)} dashboard queries, {len(names)} metrics used")
PY
		ok "the chart ships files/alerts.yaml and dashboards/headcni.json as they are: $(cat "$WORK/mon.out")" ||
		{ bad "rendered rules and dashboard"; sed 's/^/    /' "$WORK/mon.out"; return; }
	"$PROMTOOL" check rules "$WORK/dashboard-rules.yaml" >"$WORK/promtool.out" 2>&1 &&
		ok "every dashboard query parses (promtool)" || { bad "dashboard queries"; sed 's/^/    /' "$WORK/promtool.out"; }

	# The agent's exposition, from a real agent in a network namespace of its own (it touches
	# nothing else: no tailscaled, a static pod CIDR, its rules and tables die with the namespace).
	BIN=${HEADCNI_BIN:-$ROOT/target/x86_64-unknown-linux-musl/release/headcni}
	[[ -x $BIN ]] || BIN=$ROOT/target/release/headcni
	if [[ ! -x $BIN ]]; then skip "no headcni binary built"; fi
	if ((EUID != 0)); then skip "the agent's exposition needs root (a network namespace of its own)"; fi
	local d=$WORK/agent
	mkdir -p "$d/run" "$d/state" "$d/net.d"
	# An IPAM pool with an address in use, as headcni-ipam leaves it after an ADD, so that the
	# pool's series exist (the peers' need a tailnet: tests.sh metrics_status checks those).
	printf '{"cniVersion":"1.0.0","name":"headcni","plugins":[{"type":"headcni","ipam":{"type":"headcni-ipam","dataDir":"%s/ipam"}}]}\n' \
		"$d" >"$d/net.d/10-headcni.conflist"
	ln -s "$BIN" "$d/headcni-ipam"
	printf '{"cniVersion":"1.0.0","name":"headcni","run_dir":"%s/run","log_file":"%s/ipam.log","ipam":{"type":"headcni-ipam","subnet":"10.244.1.0/24","dataDir":"%s/ipam"}}' \
		"$d" "$d" "$d" | CNI_COMMAND=ADD CNI_CONTAINERID=chartcheck CNI_IFNAME=eth0 CNI_NETNS=/nonexistent CNI_PATH="$d" \
		"$d/headcni-ipam" >"$d/ipam-add.json" 2>>"$d/ipam.log" ||
		{ bad "headcni-ipam ADD for the pool"; sed 's/^/    /' "$d/ipam-add.json" "$d/ipam.log"; return; }
	# shellcheck disable=SC2016 # expanded by the inner shell
	unshare --net -- bash -c '
		ip link set lo up
		"$1" agent --node-name n1 --pod-cidr 10.244.1.0/24 --tailscale-socket "$2/ts.sock" --run-dir "$2/run" \
			--state-dir "$2/state" --conf-dir "$2/net.d" --metrics-bind 127.0.0.1 --metrics-port 9402 \
			>"$2/agent.log" 2>&1 &
		agent=$!
		for _ in $(seq 50); do curl -fsS -o /dev/null http://127.0.0.1:9402/healthz 2>/dev/null && break; sleep 0.1; done
		curl -fsS -D "$2/text.headers" -o "$2/metrics.txt" http://127.0.0.1:9402/metrics
		curl -fsS -D "$2/om.headers" -o "$2/metrics.om" \
			-H "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5" \
			http://127.0.0.1:9402/metrics
		kill "$agent"; wait "$agent"' _ "$BIN" "$d" >"$WORK/agent.out" 2>&1 ||
		{ bad "the agent in its own network namespace"; sed 's/^/    /' "$WORK/agent.out" "$d/agent.log"; return; }
	grep -qi '^content-type: text/plain; version=0.0.4' "$d/text.headers" &&
		grep -qi '^content-type: application/openmetrics-text; version=1.0.0' "$d/om.headers" &&
		ok "the exposition follows the Accept header (text 0.0.4 by default, OpenMetrics when preferred)" ||
		bad "content types: $(grep -hi content-type "$d/text.headers" "$d/om.headers" | tr -d '\r' | tr '\n' ' ')"
	"$PROMTOOL" check metrics <"$d/metrics.txt" >"$WORK/promtool.out" 2>&1 &&
		ok "promtool check metrics: the agent's exposition passes ($(grep -c '^# TYPE' "$d/metrics.txt") families)" ||
		{ bad "promtool check metrics"; sed 's/^/    /' "$WORK/promtool.out"; }
	local m unexported=""
	while read -r m; do
		[[ $m == headcni_tailnet_peer_path ]] && continue # one series per peer: needs a tailnet
		grep -q "^# TYPE $m\(_total\)\? " "$d/metrics.txt" || unexported+=" $m"
	done <"$WORK/used-metrics"
	[[ -z $unexported ]] && ok "every metric the alerts and the dashboard use is exported (peer paths: tests.sh)" ||
		bad "used but not exported:$unexported"
	grep -qF 'headcni_ipam_addresses_used{network="headcni",pool="10.244.1.0/24"} 1' "$d/metrics.txt" &&
		ok "the IPAM pool's addresses in use, from the store" || bad "headcni_ipam_addresses_used: $(grep ipam_addresses "$d/metrics.txt")"
	local c missing_counters=""
	for c in 'headcni_network_errors_total{operation="add"}' 'headcni_reconcile_failures_total{step="approval"}' \
		'headcni_headscale_api_errors_total{operation="approve_routes"}' \
		'headcni_kubernetes_api_errors_total{operation="watch_node"}'; do
		grep -qF "$c 0" "$d/metrics.txt" || missing_counters+=" $c"
	done
	[[ -z $missing_counters ]] && ok "error counters are there from the start, at 0" ||
		bad "absent at start:$missing_counters"
}

# NOTES.txt renders
t_notes() {
	cp -r "$ROOT/chart" "$WORK/notes-chart"
	printf 'notes: |\n{{ include (print $.Template.BasePath "/NOTES.txt") . | indent 2 }}\n' \
		>"$WORK/notes-chart/templates/zz-notes.yaml"
	for name in defaults keys sidecar existing-secret custom-resources; do
		if "$HELM" template headcni "$WORK/notes-chart" -f "$VS/$name.yaml" \
			--show-only templates/zz-notes.yaml >"$WORK/notes.out" 2>&1 &&
			grep -q "rollout status daemonset/" "$WORK/notes.out" &&
			! grep -qF -e "$AUTH_KEY" -e "$API_KEY" "$WORK/notes.out"; then
			ok "NOTES.txt ($name)"
		else
			bad "NOTES.txt ($name)"; sed 's/^/    /' "$WORK/notes.out"
		fi
	done
	grep -q "autoApprovers" <("$HELM" template headcni "$WORK/notes-chart" -f "$VS/sidecar.yaml" --show-only templates/zz-notes.yaml) &&
		ok "NOTES.txt explains autoApprovers without an API key" || bad "NOTES.txt lacks the autoApprovers hint"
}

# deploy-with-helm.sh against a helm that records its arguments, then runs the real one.
DEPLOY=$ROOT/deploy-with-helm.sh
# A helm that records its arguments, then runs the real one.
mkdir -p "$WORK/bin"
cat >"$WORK/bin/helm" <<EOF
#!/usr/bin/env bash
printf '%s\n' "\$*" >>"$WORK/helm-argv.log"
for a in "\$@"; do [[ -f \$a ]] && cp -- "\$a" "$WORK/helm-file.\$RANDOM" 2>/dev/null; done
exec "$HELM" "\$@"
EOF
chmod +x "$WORK/bin/helm"
export HELM_WRAPPED=$WORK/bin/helm

deploy() { # runs the script; stdout -> $WORK/deploy.out, stderr -> $WORK/deploy.err
	HELM=$HELM_WRAPPED KUBECTL=${KUBECTL_STUB:-/nonexistent} TMPDIR=$WORK/tmp "$DEPLOY" "$@" \
		>"$WORK/deploy.out" 2>"$WORK/deploy.err"
}
mkdir -p "$WORK/tmp"

refuse() { # description, expected stderr fragment, arguments...
	local what=$1 want=$2; shift 2
	if deploy "$@" </dev/null; then
		bad "refuses $what: exited 0"
	elif grep -qF -- "$want" "$WORK/deploy.err"; then
		ok "refuses $what: $(head -n1 "$WORK/deploy.err" | cut -c1-110)"
	else
		bad "refuses $what: message lacks '$want'"; sed 's/^/    /' "$WORK/deploy.err"
	fi
}

# deploy-with-helm.sh: --help, a dry run, no key in any argument or file, refusals
t_deploy() {
	if deploy --help && grep -q -- "--dry-run" "$WORK/deploy.out"; then ok "--help"; else bad "--help"; fi

	: >"$WORK/helm-argv.log"
	if deploy -u https://headscale.example -k "$AUTH_KEY" --dry-run; then
		if "$KV_NEW_DIR/bin/python" "$WORK/check_manifests.py" "$WORK/deploy.out" "$NEWEST_K8S" "$AUTH_KEY" >"$WORK/check.out" 2>&1 &&
			"$KV_OLD_DIR/bin/python" "$WORK/check_manifests.py" "$WORK/deploy.out" "$OLDEST_K8S" "$AUTH_KEY" >>"$WORK/check.out" 2>&1; then
			ok "--dry-run renders valid manifests for $OLDEST_K8S and $NEWEST_K8S"
		else
			bad "--dry-run manifests"; cat "$WORK/check.out"
		fi
		grep -q "secretName: headcni-headscale-keys" "$WORK/deploy.out" && ok "--dry-run points the chart at the Secret" ||
			bad "--dry-run does not use the Secret"
		grep -q "^# Secret kube-system/headcni-headscale-keys (keys: authKey)" "$WORK/deploy.out" &&
			ok "--dry-run names the Secret it would create" || bad "--dry-run does not mention the Secret"
		grep -q "^template " "$WORK/helm-argv.log" && ok "--dry-run uses helm template" || bad "--dry-run did not use helm template"
	else
		bad "--dry-run failed"; sed 's/^/    /' "$WORK/deploy.err"
	fi

	printf '%s\n' "$AUTH_KEY" >"$WORK/authkey"; chmod 600 "$WORK/authkey"
	deploy -u https://headscale.example -K "$WORK/authkey" -i host-local -m 1400 --dry-run &&
		grep -q -- "--ipam=host-local" "$WORK/deploy.out" && grep -q -- "--mtu=1400" "$WORK/deploy.out" &&
		ok "--dry-run with -K FILE, -i host-local, -m 1400" || { bad "-K FILE dry run"; sed 's/^/    /' "$WORK/deploy.err"; }
	printf '%s\n' "$API_KEY" | deploy -u https://headscale.example -K "$WORK/authkey" -A - -s random -t sidecar --dry-run &&
		grep -q -- "--api-key-file=" "$WORK/deploy.out" && grep -q -- "--strategy=random" "$WORK/deploy.out" &&
		grep -q "name: tailscaled" "$WORK/deploy.out" &&
		ok "--dry-run with the API key from stdin, -s random, -t sidecar" || { bad "stdin dry run"; sed 's/^/    /' "$WORK/deploy.err"; }
	deploy -u https://headscale.example -K <(printf '%s\n' "$AUTH_KEY") --dry-run &&
		grep -q -- "--auth-key-file=" "$WORK/deploy.out" && ok "--dry-run with the key from a pipe (-K <(...))" ||
		{ bad "-K <(...) dry run"; sed 's/^/    /' "$WORK/deploy.err"; }
	HEADCNI_AUTH_KEY=$AUTH_KEY deploy -u https://headscale.example --dry-run &&
		grep -q -- "--auth-key-file=" "$WORK/deploy.out" && ok "--dry-run with the key from HEADCNI_AUTH_KEY" ||
		bad "HEADCNI_AUTH_KEY dry run"
	if grep -qF -e "$AUTH_KEY" -e "$API_KEY" "$WORK/helm-argv.log" "$WORK"/helm-file.* 2>/dev/null; then
		bad "a key reached helm's arguments or values files"
	else
		ok "no key in any helm argument or values file"
	fi
	if [[ -z $(ls -A "$WORK/tmp") ]]; then ok "temporary directory removed"; else bad "temporary files left: $(ls -A "$WORK/tmp")"; fi

	U=(-u https://headscale.example -k "$AUTH_KEY" --dry-run)
	refuse "a missing URL" "--headscale-url is required" -k "$AUTH_KEY" --dry-run
	refuse "an ftp:// URL" "must start with https://" -u ftp://headscale.example -k "$AUTH_KEY" --dry-run
	refuse "a URL without scheme" "must start with https://" -u headscale.example -k "$AUTH_KEY" --dry-run
	refuse "plain http" "uses plain http" -u http://headscale.example -k "$AUTH_KEY" --dry-run
	refuse "a URL with user info" "not a valid URL" -u https://admin@headscale.example -k "$AUTH_KEY" --dry-run
	refuse "a URL with a bad port" "invalid port" -u https://headscale.example:70000 -k "$AUTH_KEY" --dry-run
	refuse "MTU 575" "out of range" "${U[@]}" -m 575
	refuse "MTU 9001" "out of range" "${U[@]}" -m 9001
	refuse "MTU 'big'" "must be 'auto' or a number" "${U[@]}" -m big
	refuse "an unknown strategy" "--strategy 'dence' is not supported" "${U[@]}" -s dence
	deploy "${U[@]}" -s dense-pack && grep -q -- "--strategy=dense-pack" "$WORK/deploy.out" &&
		ok "-s dense-pack (the seed's name) is accepted" || { bad "-s dense-pack"; sed 's/^/    /' "$WORK/deploy.err"; }
	refuse "an unknown IPAM type" "--ipam-type 'calico' is not supported" "${U[@]}" -i calico
	refuse "a strategy with host-local" "applies to --ipam-type headcni-ipam only" "${U[@]}" -i host-local -s dense
	refuse "an unknown tailscaled mode" "--tailscale-mode 'daemon' is not supported" "${U[@]}" -t daemon
	refuse "a bad namespace" "not a valid namespace name" "${U[@]}" -n Kube_System
	refuse "a bad tag" "is not a tag" "${U[@]}" --tags headcni
	refuse "a bad CIDR" "is not a CIDR" "${U[@]}" --cluster-cidr 10.244.0.0
	refuse "an unknown option" "unknown option '--mtu-size'" "${U[@]}" --mtu-size 1280
	refuse "an option as a key value" "needs a value, got the option" -u https://headscale.example -k --dry-run
	refuse "two sources for one key" "not both" "${U[@]}" -K "$WORK/authkey"
	refuse "a key with spaces" "spaces or control characters" -u https://headscale.example -k "two words" --dry-run
	: >"$WORK/empty-key"
	refuse "an empty key file" "is empty" -u https://headscale.example -K "$WORK/empty-key" --dry-run
	refuse "a missing key file" "not a readable file" -u https://headscale.example -K "$WORK/nope" --dry-run
	refuse "a missing values file" "not a readable file" "${U[@]}" -f "$WORK/nope.yaml"
	refuse "a key after --" "refusing to pass a key" "${U[@]}" -- --set config.headscale.apiKey=x
	refuse "sidecar mode without a key" "sidecar mode needs a pre-auth key" -u https://headscale.example -t sidecar --dry-run
}

# deploy-with-helm.sh: full runs against a stand-in cluster (Secret, digest, rotation)
t_deploy_full() {
	# A full (not dry) run against a stand-in kubectl that plays a cluster and
	# records everything it is given, and the recording helm (its upgrade fails
	# without a cluster, so the stand-in answers 'upgrade' itself).
	cat >"$WORK/bin/kubectl" <<EOF
#!/usr/bin/env bash
printf '%s\n' "\$*" >>"$WORK/kubectl-argv.log"
args=" \$* "
case \$args in
  *" get --raw /version "*) echo '{"major":"1","minor":"30"}' ;;
  *" get namespace "*) exit 0 ;;
  *" get secret "*"go-template={{index .data "*)
     [[ -f $WORK/secret-exists ]] || exit 1
     key=\$(sed -n 's/.*index .data "\([a-zA-Z]*\)".*/\1/p' <<<"\$args")
     sed -n "s/^  \$key: //p" "$WORK/secret-created.yaml" | tr -d '\n' ;;
  *" get secret "*"go-template="*)
     [[ -f $WORK/secret-exists ]] || exit 1
     sed -n 's/^  \([a-zA-Z]*\): .*/\1/p' "$WORK/secret-created.yaml" | sed -n '/^\(authKey\|apiKey\)$/p' | tr '\n' ' ' ;;
  *" get secret "*"jsonpath="*) [[ -f $WORK/secret-exists ]] && echo deploy-with-helm.sh ;;
  *" get secret "*) [[ -f $WORK/secret-exists ]] ;;
  *" create -f "*|*" replace -f "*)
     f=\${args##* -f }; f=\${f%% *}
     stat -c %a "\$f" >"$WORK/secret-file-mode"
     cp "\$f" "$WORK/secret-created.yaml"; touch "$WORK/secret-exists"
     echo "\$args" | grep -q " create " && echo created >>"$WORK/secret-ops" || echo replaced >>"$WORK/secret-ops" ;;
  *) echo "stand-in kubectl: unexpected: \$*" >&2; exit 1 ;;
esac
EOF
	chmod +x "$WORK/bin/kubectl"
	cat >"$WORK/bin/helm-full" <<EOF
#!/usr/bin/env bash
printf '%s\n' "\$*" >>"$WORK/helm-argv.log"
if [[ \$1 == upgrade ]]; then
  for a in "\$@"; do [[ -f \$a ]] && cp -- "\$a" "$WORK/helm-file.\$RANDOM"; done
  # Render what the real upgrade would install, with the same arguments.
  shift 2; exec "$HELM" template "\$@" >"$WORK/full-render.yaml"
fi
exec "$HELM" "\$@"
EOF
	chmod +x "$WORK/bin/helm-full"
	: >"$WORK/helm-argv.log"; : >"$WORK/kubectl-argv.log"
	full_run() {
		HELM=$WORK/bin/helm-full KUBECTL=$WORK/bin/kubectl TMPDIR=$WORK/tmp "$DEPLOY" "$@" \
			>"$WORK/deploy.out" 2>"$WORK/deploy.err"
	}
	if printf '%s\n' "$API_KEY" | full_run -u https://headscale.example -K "$WORK/authkey" -A - -n kube-system -r net; then
		ok "full run (stand-in cluster) succeeds"
		expected=$(printf '%s' "$AUTH_KEY" | base64 | tr -d '\n')
		grep -q "^  authKey: $expected\$" "$WORK/secret-created.yaml" &&
			grep -q "^  apiKey: $(printf '%s' "$API_KEY" | base64 | tr -d '\n')\$" "$WORK/secret-created.yaml" &&
			ok "Secret manifest holds both keys" || bad "Secret manifest content"
		[[ $(cat "$WORK/secret-file-mode") == 600 ]] && ok "Secret manifest written 0600" || bad "Secret manifest mode $(cat "$WORK/secret-file-mode")"
		grep -q "^upgrade --install net " "$WORK/helm-argv.log" && ok "helm upgrade --install" || bad "no helm upgrade --install"
		"$KV_NEW_DIR/bin/python" "$WORK/check_manifests.py" "$WORK/full-render.yaml" "$NEWEST_K8S" "$AUTH_KEY" "$API_KEY" >"$WORK/check.out" 2>&1 &&
			grep -q "secretName: net-headscale-keys" "$WORK/full-render.yaml" &&
			grep -q -- "--api-key-file=" "$WORK/full-render.yaml" &&
			grep -q -- "--publish-identity=true" "$WORK/full-render.yaml" &&
			ok "installed manifests use the Secret, valid, no key outside it" || { bad "full-run manifests"; cat "$WORK/check.out"; }
	else
		bad "full run failed"; sed 's/^/    /' "$WORK/deploy.err"
	fi
	digest() { sed -n 's/^ *checksum\/headscale-keys: *//p' "$WORK/full-render.yaml" | tr -d '"' | head -n1; }
	digest1=$(digest)
	[[ $digest1 =~ ^[0-9a-f]{64}$ ]] && ok "pod annotation carries a digest of the keys" || bad "no keys digest annotation"
	# Second run without keys: the existing Secret is reused, both keys kept.
	if full_run -u https://headscale.example -n kube-system -r net -m 1280; then
		[[ $(tail -n1 "$WORK/secret-ops") == replaced ]] &&
			grep -q "^  apiKey: $(printf '%s' "$API_KEY" | base64 | tr -d '\n')\$" "$WORK/secret-created.yaml" &&
			grep -q -- "--api-key-file=" "$WORK/full-render.yaml" &&
			grep -q -- "--publish-identity=true" "$WORK/full-render.yaml" &&
			ok "a re-run without keys keeps the Secret's keys" || bad "re-run lost the keys"
		[[ $(digest) == "$digest1" ]] && ok "unchanged keys: same digest, no restart" || bad "digest changed without a key change"
	else
		bad "re-run failed"; sed 's/^/    /' "$WORK/deploy.err"
	fi
	# Third run with a new pre-auth key: the digest changes, so the agents restart.
	if printf '%s\n' "${AUTH_KEY}2" | full_run -u https://headscale.example -K - -n kube-system -r net; then
		[[ $(digest) != "$digest1" ]] &&
			grep -q "^  apiKey: $(printf '%s' "$API_KEY" | base64 | tr -d '\n')\$" "$WORK/secret-created.yaml" &&
			ok "a new key changes the digest and keeps the other key" || bad "new key: digest unchanged or API key lost"
	else
		bad "third run failed"; sed 's/^/    /' "$WORK/deploy.err"
	fi
	if grep -qF -e "$AUTH_KEY" -e "$API_KEY" "$WORK/helm-argv.log" "$WORK/kubectl-argv.log" "$WORK"/helm-file.* "$WORK/deploy.out" "$WORK/deploy.err"; then
		bad "a key reached an argument list, a values file or the output"
	else
		ok "no key in kubectl/helm arguments, values files or output"
	fi
	if [[ -z $(ls -A "$WORK/tmp") ]]; then ok "temporary directory removed after full runs"; else bad "temporary files left"; fi
}

tr_run render render_facts agent_env flags validator schema notes monitoring deploy deploy_full
tr_summary "chart-check: Kubernetes $OLDEST_K8S and $NEWEST_K8S, helm $HELM_VERSION"
