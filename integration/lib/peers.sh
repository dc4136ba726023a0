#!/usr/bin/env bash
# integration/lib/peers.sh: install the real components the harness runs.
#
#  * Debian packages (only those missing; apt-get update once, only if needed).
#  * Go-built peers at pinned versions, into a cache that survives runs:
#      $HC_PEERS_CACHE/tailscale-<ver>/{tailscaled,tailscale}
#      $HC_PEERS_CACHE/headscale-<ver>/headscale
#      $HC_PEERS_CACHE/crictl-<ver>/crictl
#      $HC_PEERS_CACHE/cnitool-<ver>/cnitool   (libcni's own runner: the
#                                             stand-in for a kubelet's runtime)
#      $HC_PEERS_CACHE/actionlint-<ver>/actionlint, promtool-<ver>/promtool
#                                             (checkers of the workflow, metrics, alerts)
#    Each is built only when its binary is missing. Builds run one at a time
#    (a lock), niced, and land atomically (build into a temp dir, then rename).
#  * A tiny busybox-static image archive (docker-archive) for podman and
#    containerd, built without any registry.
#
# Sourced: defines peers_* functions and exports TAILSCALED_BIN, TAILSCALE_BIN,
# HEADSCALE_BIN, CRICTL_BIN, HC_IMAGE_ARCHIVE, HC_IMAGE_REF.
# Executed: `peers.sh [ensure]` installs everything; `peers.sh print` shows paths.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	set -euo pipefail
fi

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TAILSCALE_VERSION=${TAILSCALE_VERSION:-v1.102.3}
HEADSCALE_VERSION=${HEADSCALE_VERSION:-v0.29.2}
CRICTL_VERSION=${CRICTL_VERSION:-v1.37.0}
CNITOOL_VERSION=${CNITOOL_VERSION:-v1.3.1}
HC_PEERS_CACHE=${HC_PEERS_CACHE:-/var/cache/headcni-peers}

TAILSCALED_BIN=$HC_PEERS_CACHE/tailscale-$TAILSCALE_VERSION/tailscaled
TAILSCALE_BIN=$HC_PEERS_CACHE/tailscale-$TAILSCALE_VERSION/tailscale
HEADSCALE_BIN=$HC_PEERS_CACHE/headscale-$HEADSCALE_VERSION/headscale
CRICTL_BIN=$HC_PEERS_CACHE/crictl-$CRICTL_VERSION/crictl
CNITOOL_BIN=$HC_PEERS_CACHE/cnitool-$CNITOOL_VERSION/cnitool
# Static builds of the standard plugins HeadCNI chains (spec 1.1.0), as a node that takes its
# plugins from the upstream releases has them; Debian's 1.1.1 stop at spec 1.0.0.
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.10.0}
CNI_PLUGINS_DIR=$HC_PEERS_CACHE/cni-plugins-$CNI_PLUGINS_VERSION
HELM_VERSION=${HELM_VERSION:-v3.22.0}
HELM_BIN=$HC_PEERS_CACHE/helm-$HELM_VERSION/helm
export TAILSCALED_BIN TAILSCALE_BIN HEADSCALE_BIN CRICTL_BIN CNITOOL_BIN CNI_PLUGINS_DIR HELM_BIN

# A real Kubernetes for the `kubernetes` stage (lib/kube.sh), built only by
# `peers_ensure_kube` (the other stages do not need it):
#   $HC_PEERS_CACHE/kubernetes-<ver>/{kube-apiserver,kube-controller-manager,
#       kube-scheduler,kubelet,kube-proxy,kubectl,e2e.test,agnhost}
#   $HC_PEERS_CACHE/etcd-<ver>/etcd
#   $HC_PEERS_CACHE/coredns-<ver>/coredns
KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
KUBE_BIN_DIR=$HC_PEERS_CACHE/kubernetes-$KUBE_VERSION
ETCD_BIN=$HC_PEERS_CACHE/etcd-$ETCD_VERSION/etcd
COREDNS_BIN=$HC_PEERS_CACHE/coredns-$COREDNS_VERSION/coredns
KUBE_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
export KUBE_VERSION KUBE_BIN_DIR ETCD_BIN COREDNS_BIN

# Debian package -> a file that proves it is installed (dpkg -s is the truth;
# the file is only used in messages).
HC_APT_PACKAGES=(
	iproute2 nftables iptables
	podman containerd runc containernetworking-plugins
	busybox-static iperf3 socat iputils-ping jq curl util-linux
	ca-certificates
)

peers_missing_apt() { # [PACKAGE...] (default: HC_APT_PACKAGES)
	local p
	(($#)) || set -- "${HC_APT_PACKAGES[@]}"
	for p in "$@"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep '^install ok installed$' >/dev/null ||
			printf '%s\n' "$p"
	done
}

peers_install_apt() { # [PACKAGE...] (default: HC_APT_PACKAGES)
	local -a missing
	(($#)) || set -- "${HC_APT_PACKAGES[@]}"
	mapfile -t missing < <(peers_missing_apt "$@")
	if ((${#missing[@]} == 0)); then
		hc_log "apt: all $# packages present"
		return 0
	fi
	hc_log "apt: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

peers_require_go() {
	command -v go >/dev/null 2>&1 || hc_die "go is not installed (needed once, to build the pinned peers)"
}

# _peers_locked_build NAME DEST_BIN FUNCTION : build under a lock unless DEST_BIN exists.
_peers_locked_build() {
	local name=$1 dest=$2 fn=$3
	[[ -x "$dest" ]] && return 0
	mkdir -p "$HC_PEERS_CACHE"
	local lock=$HC_PEERS_CACHE/.build.lock
	exec {_hc_lockfd}>"$lock"
	hc_log "peers: waiting for the build lock ($lock)"
	flock "$_hc_lockfd"
	if [[ -x "$dest" ]]; then # someone else built it meanwhile
		exec {_hc_lockfd}>&-
		return 0
	fi
	peers_require_go
	local t0 tmp
	t0=$(hc_now)
	tmp=$(mktemp -d "$HC_PEERS_CACHE/.build-$name.XXXXXX")
	hc_log "peers: building $name (log: $tmp/build.log); this takes minutes, once"
	if ! "$fn" "$tmp" >"$tmp/build.log" 2>&1; then
		tail -n 30 "$tmp/build.log" >&2
		exec {_hc_lockfd}>&-
		hc_die "peers: building $name failed (log kept in $tmp/build.log)"
	fi
	local destdir
	destdir=$(dirname "$dest")
	rm -rf "$destdir.partial"
	mkdir -p "$destdir.partial"
	cp -a "$tmp"/bin/. "$destdir.partial/"
	cp "$tmp/build.log" "$destdir.partial/build.log"
	rm -rf "$destdir"
	mv "$destdir.partial" "$destdir"
	rm -rf "$tmp"
	exec {_hc_lockfd}>&-
	hc_log "peers: built $name in $(hc_since "$t0")s -> $destdir"
}

# Go builds: niced, one at a time, no VCS stamping, toolchain from the proxy if
# the module asks for a newer Go than the installed one.
_peers_go() {
	env GOFLAGS=-buildvcs=false CGO_ENABLED=0 nice -n 10 go "$@"
}

_build_tailscale() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install \
		"tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION" \
		"tailscale.com/cmd/tailscale@$TAILSCALE_VERSION"
}

# headscale: `go install module@version` fails here (the module proxy refuses
# the module's version list, needed for the deprecation check), so build it
# from a throwaway module that requires the exact version.
_build_headscale() { # TMP
	local tmp=$1
	mkdir -p "$tmp/bin" "$tmp/mod"
	(
		cd "$tmp/mod"
		_peers_go mod init headcni.invalid/peers
		_peers_go get "github.com/juanfont/headscale/cmd/headscale@$HEADSCALE_VERSION"
		_peers_go build -trimpath -o "$tmp/bin/headscale" github.com/juanfont/headscale/cmd/headscale
	)
	rm -rf "$tmp/mod"
}

_build_crictl() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

# cnitool: libcni's reference runner (conflist chains, cniVersions, the
# result cache in /var/lib/cni, prevResult on DEL), exactly what a runtime
# does around the plugins. The harness attaches its bare "pods" with it.
_build_cni_plugins() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install \
		"github.com/containernetworking/plugins/plugins/meta/portmap@$CNI_PLUGINS_VERSION" \
		"github.com/containernetworking/plugins/plugins/meta/bandwidth@$CNI_PLUGINS_VERSION"
}

_build_cnitool() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install "github.com/containernetworking/cni/cnitool@$CNITOOL_VERSION"
}

_build_helm() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# --- Kubernetes, etcd, CoreDNS -------------------------------------------------
#
# k8s.io/kubernetes can not be `go install`ed: its go.mod replaces its staging
# modules (k8s.io/api, k8s.io/client-go, ...) by local directories and
# requires them as v0.0.0. A throwaway main module requires it and replaces
# every staging module by its published release (v0.MINOR.PATCH), read from
# the module's own go.mod. All of it builds with a module and build cache of
# its own (about 6 GB), removed afterwards: only the binaries are kept.

# _kube_staging_version v1.37.2 -> v0.37.2
_kube_staging_version() { printf 'v0.%s\n' "${1#v1.}"; }

# _kube_ldflags : the version every binary reports (kubectl version, the
# Node's kubeletVersion), as the release build stamps it.
_kube_ldflags() {
	local v=$KUBE_VERSION minor
	minor=${v#v1.}
	minor=${minor%%.*}
	local p
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		printf -- ' -X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=1970-01-01T00:00:00Z' \
			"$p" "$v" "$p" "$p" "$minor" "$p" "$p"
	done
}

# _build_kube TMP : every command, e2e.test and agnhost into TMP/bin.
# (Builders run as a condition, where errexit does not hold: every step
# checks its own status.)
_build_kube() {
	local tmp=$1 stage gomod ld c
	stage=$(_kube_staging_version "$KUBE_VERSION")
	ld="-s -w$(_kube_ldflags)"
	mkdir -p "$tmp/bin" "$tmp/mod"
	cd "$tmp/mod" || return 1
	_peers_go mod init headcni.invalid/kube || return 1
	gomod=$(_peers_go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | jq -er .GoMod) || return 1
	{
		printf 'require k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
		# only the staging modules it requires (sample-controller and
		# sample-cli-plugin are replaced but never required, nor published
		# for every release)
		awk '$2 == "v0.0.0" {req[$1] = 1}
			$2 == "=>" && $3 ~ /^\.\/staging\// && req[$1] {printf "\t%s => %s %s\n", $1, $1, v}' v="$stage" "$gomod"
		printf ')\n'
	} >>go.mod
	grep -q 'k8s.io/client-go => k8s.io/client-go' go.mod || {
		echo "no staging replacements found in $gomod" >&2
		return 1
	}
	cat go.mod
	# -mod=mod: the go.mod above lists only k8s.io/kubernetes; the rest of
	# the requirements come from its go.mod (minimal version selection).
	for c in "${KUBE_COMMANDS[@]/#/cmd/}" test/images/agnhost; do
		echo "== $c"
		_peers_go build -mod=mod -trimpath -ldflags "$ld" -o "$tmp/bin/${c##*/}" "k8s.io/kubernetes/$c" || return 1
	done
	echo "== e2e.test"
	_peers_go test -mod=mod -c -trimpath -ldflags "$ld" -o "$tmp/bin/e2e.test" k8s.io/kubernetes/test/e2e || return 1
	cd "$tmp" && rm -rf "$tmp/mod"
}

# _build_from_module TMP MODULE VERSION PACKAGE BIN : a main package of a module
# that carries replace directives of its own, built from a throwaway module.
_build_from_module() {
	local tmp=$1 module=$2 version=$3 pkg=$4 bin=$5
	mkdir -p "$tmp/bin" "$tmp/mod"
	cd "$tmp/mod" || return 1
	_peers_go mod init headcni.invalid/peer || return 1
	_peers_go get "$module@$version" || return 1
	_peers_go build -trimpath -ldflags "-s -w" -o "$tmp/bin/$bin" "$pkg" || return 1
	cd "$tmp" && rm -rf "$tmp/mod"
}

_build_etcd() { _build_from_module "$1" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 etcd; }
_build_coredns() { _build_from_module "$1" github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns coredns; }

# peers_build_kube : the Kubernetes peers, with a throwaway Go module and
# build cache (removed when done, also on failure).
peers_build_kube() {
	local c absent=0
	for c in "${KUBE_COMMANDS[@]}" e2e.test agnhost; do [[ -x "$KUBE_BIN_DIR/$c" ]] || absent=1; done
	[[ -x "$ETCD_BIN" && -x "$COREDNS_BIN" ]] || absent=1
	((absent)) || return 0
	mkdir -p "$HC_PEERS_CACHE"
	local gotmp
	gotmp=$(mktemp -d "$HC_PEERS_CACHE/.gocache-kube.XXXXXX")
	local rc=0
	(
		export GOCACHE=$gotmp/build GOMODCACHE=$gotmp/mod GOPATH=$gotmp/path GOTMPDIR=$gotmp/tmp
		mkdir -p "$GOTMPDIR"
		_peers_locked_build "etcd-$ETCD_VERSION" "$ETCD_BIN" _build_etcd
		_peers_locked_build "kubernetes-$KUBE_VERSION" "$KUBE_BIN_DIR/e2e.test" _build_kube
		_peers_locked_build "coredns-$COREDNS_VERSION" "$COREDNS_BIN" _build_coredns
	) || rc=$?
	# the module cache is read-only by design
	chmod -R u+w "$gotmp" 2>/dev/null || true
	rm -rf "$gotmp"
	return "$rc"
}

# Debian packages only the kubernetes stage needs: certificates, kube-proxy's conntrack, and
# the programs the e2e images are made of (lib/kimages.sh).
HC_KUBE_APT_PACKAGES=(openssl conntrack bind9-dnsutils netcat-openbsd wget procps)

# peers_ensure_kube : what the kubernetes stage needs on top of peers_ensure.
peers_ensure_kube() {
	hc_require_root
	local t0
	t0=$(hc_now)
	peers_install_apt "${HC_KUBE_APT_PACKAGES[@]}"
	peers_build_kube
	_peers_locked_build "helm-$HELM_VERSION" "$HELM_BIN" _build_helm
	hc_log "kubernetes peers ready in $(hc_since "$t0")s: kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, coredns $COREDNS_VERSION, helm $HELM_VERSION"
}

peers_build_go() {
	_peers_locked_build "tailscale-$TAILSCALE_VERSION" "$TAILSCALED_BIN" _build_tailscale
	[[ -x "$TAILSCALE_BIN" ]] || hc_die "tailscale CLI missing next to $TAILSCALED_BIN"
	_peers_locked_build "headscale-$HEADSCALE_VERSION" "$HEADSCALE_BIN" _build_headscale
	_peers_locked_build "crictl-$CRICTL_VERSION" "$CRICTL_BIN" _build_crictl
	_peers_locked_build "cnitool-$CNITOOL_VERSION" "$CNITOOL_BIN" _build_cnitool
	_peers_locked_build "cni-plugins-$CNI_PLUGINS_VERSION" "$CNI_PLUGINS_DIR/bandwidth" _build_cni_plugins
	_peers_locked_build "helm-$HELM_VERSION" "$HELM_BIN" _build_helm
}

# --- checkers: actionlint (the release workflow), promtool (metrics and alerts) ---
#
#   $HC_PEERS_CACHE/actionlint-<ver>/actionlint   lint stage: .github/workflows/*.yml
#   $HC_PEERS_CACHE/promtool-<ver>/promtool       chart stage: the alert rules and their tests;
#                                                 cluster stage: the agent's exposition
ACTIONLINT_VERSION=${ACTIONLINT_VERSION:-v1.7.12}
ACTIONLINT_BIN=$HC_PEERS_CACHE/actionlint-$ACTIONLINT_VERSION/actionlint
PROMTOOL_VERSION=${PROMTOOL_VERSION:-v0.316.0}
PROMTOOL_BIN=$HC_PEERS_CACHE/promtool-$PROMTOOL_VERSION/promtool
export ACTIONLINT_BIN PROMTOOL_BIN

_build_actionlint() { # TMP
	mkdir -p "$1/bin"
	GOBIN="$1/bin" _peers_go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
}

# promtool: the prometheus module carries replace directives, which `go install
# module@version` refuses; a throwaway module that requires the exact version builds it.
_build_promtool() { # TMP
	local tmp=$1
	mkdir -p "$tmp/bin" "$tmp/mod"
	(
		cd "$tmp/mod" &&
			_peers_go mod init headcni.invalid/promtool &&
			_peers_go get "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" &&
			_peers_go build -trimpath -ldflags "-s -w" -o "$tmp/bin/promtool" \
				github.com/prometheus/prometheus/cmd/promtool
	) || return 1
	rm -rf "$tmp/mod"
}

# peers_build_checkers : actionlint and promtool (each only when missing).
peers_build_checkers() {
	_peers_locked_build "actionlint-$ACTIONLINT_VERSION" "$ACTIONLINT_BIN" _build_actionlint
	_peers_locked_build "promtool-$PROMTOOL_VERSION" "$PROMTOOL_BIN" _build_promtool
}

# --- the image: busybox-static in a rootfs, no registry --------------------

busybox_version() { dpkg-query -W -f='${Version}' busybox-static | tr -c 'A-Za-z0-9.\n' '_'; }

HC_IMAGE_REF=${HC_IMAGE_REF:-localhost/headcni-busybox:1}
export HC_IMAGE_REF

# peers_build_image : $HC_PEERS_CACHE/image-<busybox ver>/busybox.tar, a
# docker-archive tagged $HC_IMAGE_REF that both `podman load` and
# `ctr images import` accept. Its default command serves as the pause
# process (PID 1 that exits on SIGTERM).
peers_build_image() {
	local dir
	dir=$HC_PEERS_CACHE/image-$(busybox_version)
	HC_IMAGE_ARCHIVE=$dir/busybox.tar
	export HC_IMAGE_ARCHIVE
	[[ -s "$HC_IMAGE_ARCHIVE" ]] && return 0
	hc_log "peers: building the busybox image archive"
	local tmp
	tmp=$(mktemp -d "$HC_PEERS_CACHE/.image.XXXXXX")
	mkdir -p "$tmp/rootfs/bin" "$tmp/rootfs/etc" "$tmp/rootfs/tmp" "$tmp/rootfs/proc" \
		"$tmp/rootfs/sys" "$tmp/rootfs/dev" "$tmp/rootfs/run"
	cp /bin/busybox "$tmp/rootfs/bin/busybox"
	local applet
	for applet in $(/bin/busybox --list); do
		[[ "$applet" == busybox ]] || ln -s busybox "$tmp/rootfs/bin/$applet"
	done
	printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$tmp/rootfs/etc/passwd"
	printf 'root:x:0:\nnobody:x:65534:\n' >"$tmp/rootfs/etc/group"
	# A throwaway podman store only for building, removed right after.
	local -a pm=(podman --root "$tmp/store" --runroot "$tmp/run" --storage-driver vfs
		--cgroup-manager cgroupfs --events-backend none)
	tar -C "$tmp/rootfs" --numeric-owner --owner 0 --group 0 -cf - . |
		"${pm[@]}" import \
			--change 'ENV PATH=/bin' \
			--change 'CMD ["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' \
			- "$HC_IMAGE_REF" >/dev/null 2>&1
	"${pm[@]}" save --quiet --format docker-archive -o "$tmp/busybox.tar" "$HC_IMAGE_REF"
	"${pm[@]}" rmi -a -f >/dev/null 2>&1 || true
	mkdir -p "$dir"
	mv "$tmp/busybox.tar" "$HC_IMAGE_ARCHIVE.partial"
	mv "$HC_IMAGE_ARCHIVE.partial" "$HC_IMAGE_ARCHIVE"
	rm -rf "$tmp" 2>/dev/null || {
		# vfs layers may carry immutable-looking perms; retry after chmod
		chmod -R u+rwX "$tmp" 2>/dev/null
		rm -rf "$tmp"
	}
}

# peers_ensure : everything the harness needs, idempotent.
peers_ensure() {
	hc_require_root
	local t0
	t0=$(hc_now)
	peers_install_apt
	peers_build_go
	peers_build_checkers
	peers_build_image
	hc_log "peers ready in $(hc_since "$t0")s: tailscale $TAILSCALE_VERSION, headscale $HEADSCALE_VERSION, crictl $CRICTL_VERSION, cnitool $CNITOOL_VERSION"
}

peers_print() {
	printf 'TAILSCALED_BIN=%s\nTAILSCALE_BIN=%s\nHEADSCALE_BIN=%s\nCRICTL_BIN=%s\nCNITOOL_BIN=%s\nCNI_PLUGINS_DIR=%s\n' \
		"$TAILSCALED_BIN" "$TAILSCALE_BIN" "$HEADSCALE_BIN" "$CRICTL_BIN" "$CNITOOL_BIN" "$CNI_PLUGINS_DIR"
	printf 'HELM_BIN=%s\nKUBE_BIN_DIR=%s\nETCD_BIN=%s\nCOREDNS_BIN=%s\n' \
		"$HELM_BIN" "$KUBE_BIN_DIR" "$ETCD_BIN" "$COREDNS_BIN"
	printf 'ACTIONLINT_BIN=%s\nPROMTOOL_BIN=%s\n' "$ACTIONLINT_BIN" "$PROMTOOL_BIN"
	printf 'HC_IMAGE_ARCHIVE=%s\nHC_IMAGE_REF=%s\n' \
		"$HC_PEERS_CACHE/image-$(busybox_version)/busybox.tar" "$HC_IMAGE_REF"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	case "${1:-ensure}" in
	ensure) peers_ensure ;;
	checkers) peers_build_checkers ;;
	kube) peers_ensure_kube ;;
	print) peers_print ;;
	*)
		echo "usage: $0 [ensure|checkers|kube|print]" >&2
		exit 2
		;;
	esac
fi
