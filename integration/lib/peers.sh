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
export TAILSCALED_BIN TAILSCALE_BIN HEADSCALE_BIN CRICTL_BIN CNITOOL_BIN CNI_PLUGINS_DIR

# Debian package -> a file that proves it is installed (dpkg -s is the truth;
# the file is only used in messages).
HC_APT_PACKAGES=(
	iproute2 nftables iptables
	podman containerd runc containernetworking-plugins
	busybox-static iperf3 socat iputils-ping jq curl util-linux
	ca-certificates
)

peers_missing_apt() {
	local p
	for p in "${HC_APT_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep '^install ok installed$' >/dev/null ||
			printf '%s\n' "$p"
	done
}

peers_install_apt() {
	local -a missing
	mapfile -t missing < <(peers_missing_apt)
	if ((${#missing[@]} == 0)); then
		hc_log "apt: all ${#HC_APT_PACKAGES[@]} packages present"
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

peers_build_go() {
	_peers_locked_build "tailscale-$TAILSCALE_VERSION" "$TAILSCALED_BIN" _build_tailscale
	[[ -x "$TAILSCALE_BIN" ]] || hc_die "tailscale CLI missing next to $TAILSCALED_BIN"
	_peers_locked_build "headscale-$HEADSCALE_VERSION" "$HEADSCALE_BIN" _build_headscale
	_peers_locked_build "crictl-$CRICTL_VERSION" "$CRICTL_BIN" _build_crictl
	_peers_locked_build "cnitool-$CNITOOL_VERSION" "$CNITOOL_BIN" _build_cnitool
	_peers_locked_build "cni-plugins-$CNI_PLUGINS_VERSION" "$CNI_PLUGINS_DIR/bandwidth" _build_cni_plugins
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
	printf 'HC_IMAGE_ARCHIVE=%s\nHC_IMAGE_REF=%s\n' \
		"$HC_PEERS_CACHE/image-$(busybox_version)/busybox.tar" "$HC_IMAGE_REF"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	case "${1:-ensure}" in
	ensure) peers_ensure ;;
	checkers) peers_build_checkers ;;
	print) peers_print ;;
	*)
		echo "usage: $0 [ensure|checkers|print]" >&2
		exit 2
		;;
	esac
fi
