#!/usr/bin/env bash
# Image check: builds the HeadCNI image offline with podman exactly as the
# README tells a user to (`podman build -t IMAGE .` from the repository root,
# after the static musl build) and runs it: `headcni version`, `headcni` on
# PATH, entrypoint, labels, the files in it, and `headcni install` and
# `--uninstall` into a temporary directory with the chart's container settings
# (no capability, read-only root filesystem).
#
# Podman runs with private storage under the cache directory (HEADCNI_CACHE,
# default /var/cache/headcni-peers) and the settings these machines need: vfs
# storage, runc, cgroupfs, no network. The checks run as tests of
# integration/lib/testing.sh's runner; exits non-zero when any fails.

# 'cond && ok ... || bad ...' is safe here: ok always returns 0.
# shellcheck disable=SC2015
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${HEADCNI_CACHE:-/var/cache/headcni-peers}
TARGET=x86_64-unknown-linux-musl
# The Dockerfile's default BINARY: what `cargo build --release --target x86_64-unknown-linux-musl` makes.
BIN=$ROOT/target/$TARGET/release/headcni
IMAGE=localhost/headcni-image-check:$$

command -v podman >/dev/null || { echo "podman is needed (apt-get install podman)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/headcni-image-check.XXXXXXXX")
export HC_STATE_DIR=$WORK/state
# shellcheck source=lib/testing.sh
source "$ROOT/integration/lib/testing.sh"
say() { hc_log "$*"; }

# ------------------------------------------------------------------ binary
if [[ ! -x $BIN ]]; then
	say "building $BIN"
	(cd "$ROOT" && CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
		cargo build --release --locked --target "$TARGET")
fi

# ------------------------------------------------------------------ podman
PODMAN_DIR=$CACHE/podman
mkdir -p "$PODMAN_DIR/root" "$PODMAN_DIR/runroot"
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=4096:4096"]
[network]
network_backend = "cni"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
pm() {
	CONTAINERS_CONF=$WORK/containers.conf podman --root "$PODMAN_DIR/root" --runroot "$PODMAN_DIR/runroot" \
		--storage-driver vfs --cgroup-manager cgroupfs --runtime runc "$@"
}
cleanup() {
	pm rm -f headcni-image-check-$$ >/dev/null 2>&1 || true
	pm rmi -f "$IMAGE" >/dev/null 2>&1 || true
	pm image prune -f >/dev/null 2>&1 || true
	rm -rf -- "$WORK"
}
trap cleanup EXIT

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)

run() { pm run --rm --network none --cap-drop ALL --read-only --security-opt no-new-privileges "$@"; }

# The binary is static: a FROM scratch image has no loader.
t_static() {
	if readelf -lW "$BIN" 2>/dev/null | grep -q 'INTERP'; then
		bad "$BIN is dynamically linked: a FROM scratch image cannot run it"
	else
		ok "binary is static ($(du -h "$BIN" | cut -f1))"
	fi
}

# podman build from the repository root, as the README says (FROM scratch: no
# registry, no network). The release workflow passes VERSION, REVISION and
# CREATED; the defaults must already name this version.
t_build() {
	if (cd "$ROOT" && pm build -t "$IMAGE" .) >"$WORK/build.log" 2>&1; then
		ok "podman build -t IMAGE . from the repository root (offline, FROM scratch)"
	else
		sed 's/^/    /' "$WORK/build.log"
		hc_die "podman build failed"
	fi
	touch "$WORK/image-built"
}

# needs_image : skip the test when the image could not be built.
needs_image() { [[ -f "$WORK/image-built" ]] || skip "no image (t_build failed)"; }

# The image runs: version, entrypoint, labels, and nothing in it but the binary and its link.
t_image() {
	needs_image
	want=$("$BIN" version)
	got=$(run "$IMAGE" 2>&1) && [[ $got == "$want" ]] && ok "default command prints the version: $got" ||
		bad "default command: got '$got', want '$want'"
	got=$(run "$IMAGE" version 2>&1) && [[ $got == "$want" ]] && ok "headcni version" || bad "headcni version: '$got'"
	[[ $want == *"$VERSION"* ]] && ok "version matches Cargo.toml ($VERSION)" || bad "version '$want' lacks $VERSION"

	got=$(run --entrypoint headcni "$IMAGE" version 2>&1) && [[ $got == "$want" ]] &&
		ok "headcni is on the image's PATH (what kubectl exec ds/headcni -- headcni status needs)" ||
		bad "headcni by name: '$got'"
	entry=$(pm image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.User}}' "$IMAGE")
	[[ $entry == '["/bin/headcni"] ["version"] 0:0' ]] && ok "entrypoint /bin/headcni, command version, user 0:0" ||
		bad "entrypoint/cmd/user: $entry"
	label=$(pm image inspect --format '{{index .Labels "org.opencontainers.image.version"}} {{index .Labels "org.opencontainers.image.licenses"}}' "$IMAGE")
	[[ $label == "$VERSION MIT" ]] && ok "OCI labels (version, licence)" || bad "labels: $label"

	pm create --name headcni-image-check-$$ "$IMAGE" >/dev/null
	pm export headcni-image-check-$$ >"$WORK/rootfs.tar"
	pm rm -f headcni-image-check-$$ >/dev/null
	tar -tvf "$WORK/rootfs.tar" >"$WORK/files" 2>/dev/null || true
	grep -Eq '^-rwxr-xr-x .* bin/headcni$' "$WORK/files" && ok "bin/headcni is executable" ||
		{ bad "bin/headcni mode"; sed 's/^/    /' "$WORK/files"; }
	tar -xOf "$WORK/rootfs.tar" bin/headcni | cmp -s - "$BIN" &&
		ok "the image holds target/$TARGET/release/headcni" || bad "the image's binary is not $BIN"
	names=$(awk '{ if ($1 ~ /^l/) print $(NF-2); else print $NF }' "$WORK/files" | sed 's|/$||' | sort)
	say "     files: $(tr '\n' ' ' <<<"$names")"
	extra=$(grep -Ev '^(bin|bin/headcni)$' <<<"$names" || true)
	[[ -z $extra ]] && ok "nothing else in the image" || bad "unexpected files: $extra"
	size=$(pm image inspect --format '{{.Size}}' "$IMAGE")
	say "     image size: $((size / 1024)) KiB"
}

# headcni install and --uninstall from the image, with the chart's container settings.
t_install() {
	needs_image
	# The chained plugins of a node whose CNI plugins come from the upstream releases (static, spec
	# 1.1.0); integration/lib/peers.sh builds them.
	PLUGINS=${CNI_PLUGINS_DIR:-$CACHE/cni-plugins-v1.10.0}
	if [[ ! -x $PLUGINS/portmap || ! -x $PLUGINS/bandwidth ]]; then
		bad "static portmap and bandwidth missing in $PLUGINS (integration/lib/peers.sh ensure builds them)"
	else
		H=$WORK/host
		mkdir -p "$H/opt/cni/bin" "$H/etc/cni/net.d"
		cp "$PLUGINS/portmap" "$PLUGINS/bandwidth" "$H/opt/cni/bin/"
		printf '{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}\n' >"$H/etc/cni/net.d/20-other.conflist"
		cp "$H/etc/cni/net.d/20-other.conflist" "$WORK/other.orig"
		# The chart's default install arguments, with the host directories mounted
		# at the same paths inside the container as the chart does.
		install_run() {
			run -v "$H/opt/cni/bin:/opt/cni/bin" -v "$H/etc/cni/net.d:/etc/cni/net.d" --user 0:0 "$IMAGE" \
				install --bin-dir=/opt/cni/bin --conf-dir=/etc/cni/net.d --conflist-name=10-headcni.conflist \
				--network-name=headcni --ipam=headcni-ipam --strategy=sequential --mtu=auto --run-dir=/run/headcni \
				--portmap=true --bandwidth=true "$@"
		}
		if install_run >"$WORK/install.log" 2>&1; then
			ok "headcni install (no capability, read-only root)"
			cmp -s "$BIN" "$H/opt/cni/bin/headcni" && [[ -x $H/opt/cni/bin/headcni ]] &&
				ok "binary installed" || bad "installed binary differs or is not executable"
			[[ $(readlink "$H/opt/cni/bin/headcni-ipam") == headcni ]] && ok "headcni-ipam link is relative" ||
				bad "headcni-ipam link: $(readlink "$H/opt/cni/bin/headcni-ipam" || echo missing)"
			python3 - "$H/etc/cni/net.d/10-headcni.conflist" <<'PY' && ok "conflist parses, network headcni, plugin headcni" || bad "conflist content"
import json, sys
c = json.load(open(sys.argv[1]))
assert c["name"] == "headcni", c
assert c["plugins"][0]["type"] == "headcni", c
assert c["plugins"][0]["ipam"]["type"] == "headcni-ipam", c
assert "1.1.0" in c["cniVersions"], c  # the static plugins were asked from inside the image
PY
			cmp -s "$WORK/other.orig" "$H/etc/cni/net.d/20-other.conflist" && ok "other conflist untouched" || bad "other conflist changed"
			before=$(stat -c %Y.%i "$H/etc/cni/net.d/10-headcni.conflist")
			sleep 1
			install_run >>"$WORK/install.log" 2>&1 && [[ $(stat -c %Y.%i "$H/etc/cni/net.d/10-headcni.conflist") == "$before" ]] &&
				ok "second install leaves an unchanged conflist alone" || bad "second install rewrote the conflist"
			if install_run --uninstall >>"$WORK/install.log" 2>&1 &&
				[[ ! -e $H/etc/cni/net.d/10-headcni.conflist && ! -e $H/opt/cni/bin/headcni && ! -L $H/opt/cni/bin/headcni-ipam ]] &&
				cmp -s "$WORK/other.orig" "$H/etc/cni/net.d/20-other.conflist"; then
				ok "install --uninstall removes exactly what it installed"
			else
				bad "install --uninstall"; find "$H" -mindepth 1 | sed 's/^/    /'
			fi
		else
			bad "headcni install"; sed 's/^/    /' "$WORK/install.log"
		fi
	fi
}

tr_run static build image install
tr_summary "image-check: $IMAGE"
