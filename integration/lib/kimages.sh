# shellcheck shell=bash
# integration/lib/kimages.sh: the container images a real Kubernetes needs, built offline.
#
# No registry is reachable, so every image a pod references is built here and imported into
# each node's containerd, tagged exactly as referenced:
#
#   the sandbox (pause) image     busybox-static sleeping until signalled
#   the e2e images                agnhost (the Go-built one), and the images the conformance
#                                 tests ask for (`e2e.test --list-images`), each made of the
#                                 machine's own binaries and their libraries: bash as /bin/sh,
#                                 coreutils, dig, getent, curl, wget, nc.openbsd, ping, ...
#   CoreDNS                       the Go-built coredns
#   HeadCNI                       podman build of the repository's Dockerfile (kimg_headcni)
#
# The archives (docker-archive, one per image) are cached under
# $HC_PEERS_CACHE/kube-images-<key>/, the key naming the Kubernetes, CoreDNS and
# busybox versions and the digest of this file: change any and the images are made again.
# HeadCNI's image is made per run from the binary under test.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=peers.sh
source "$(dirname "${BASH_SOURCE[0]}")/peers.sh"

KUBE_PAUSE_IMAGE=${KUBE_PAUSE_IMAGE:-registry.k8s.io/pause:3.10.2} # the one e2e.test v1.37.2 names
KUBE_COREDNS_IMAGE=${KUBE_COREDNS_IMAGE:-registry.k8s.io/coredns/coredns:$COREDNS_VERSION}
KUBE_AGNHOST_IMAGE=${KUBE_AGNHOST_IMAGE:-} # from e2e.test --list-images (kimg_list)
export KUBE_PAUSE_IMAGE KUBE_COREDNS_IMAGE

# The machine's programs that make up the toolbox images (the e2e tests run shell scripts
# with these inside their pods).
KIMG_TOOLS=(bash sh cat echo ls mkdir rm cp mv ln chmod touch sleep seq test true false head tail
	wc tr cut sort uniq tee date env id hostname uname printf expr timeout kill ps grep sed awk
	getent dig nslookup host curl wget nc ping ip ss mount umount find xargs stat readlink basename
	dirname md5sum sha256sum dd yes nohup whoami)

_kimg_key() {
	local self
	self=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
	printf 'k%s-c%s-b%s-%s\n' "$KUBE_VERSION" "$COREDNS_VERSION" "$(busybox_version)" "$self"
}
kimg_dir() { printf '%s/kube-images-%s\n' "$HC_PEERS_CACHE" "$(_kimg_key)"; }

# kimg_list : the images e2e.test references (name=ref lines), cached next to the binary.
kimg_list() {
	local f=$KUBE_BIN_DIR/e2e-images.txt
	if [[ ! -s "$f" ]]; then
		"$KUBE_BIN_DIR/e2e.test" --list-images 2>/dev/null | grep -E '^[a-z0-9.-]+/' >"$f.tmp"
		mv "$f.tmp" "$f"
	fi
	cat "$f"
}

# the newest upstream agnhost (e2e.test also names an old one in a private registry, which
# must stay missing: a test checks that pulling it fails)
kimg_agnhost_ref() { kimg_list | grep -E '^registry\.k8s\.io/e2e-test-images/agnhost:' | sort -V | tail -n1; }

# _kimg_copy_with_libs ROOTFS PATH... : programs into ROOTFS/usr/bin (symlinks resolved) and
# their shared libraries (and the loader) at their own paths.
_kimg_copy_with_libs() {
	local root=$1 p real lib
	shift
	mkdir -p "$root/usr/bin"
	for p in "$@"; do
		real=$(readlink -f "$p")
		cp -n "$real" "$root/usr/bin/$(basename "$p")"
		while read -r lib; do
			[[ -n "$lib" && -e "$lib" ]] || continue
			mkdir -p "$root$(dirname "$lib")"
			[[ -e "$root$lib" ]] || cp -L "$lib" "$root$lib"
		done < <(ldd "$real" 2>/dev/null | awk '/=>/ {print $3} /^\t\/.*ld-linux/ {print $1}')
	done
}

# _kimg_toolbox ROOTFS : a small Debian-like userland from the machine's own binaries.
_kimg_toolbox() {
	local root=$1 t path
	local -a progs=()
	mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,run,var/run,root,results,lib64,usr/lib}
	chmod 1777 "$root/tmp"
	for t in "${KIMG_TOOLS[@]}"; do
		case "$t" in
		sh) continue ;;
		nc) path=$(command -v nc.openbsd) || hc_die "nc.openbsd missing (apt netcat-openbsd)" ;;
		*) path=$(command -v "$t") || hc_die "the image toolbox needs $t on this machine" ;;
		esac
		[[ "$path" == /* ]] || continue # a shell builtin only
		progs+=("$path")
	done
	_kimg_copy_with_libs "$root" "${progs[@]}"
	[[ -e "$root/usr/bin/nc.openbsd" ]] && mv "$root/usr/bin/nc.openbsd" "$root/usr/bin/nc"
	ln -sfn bash "$root/usr/bin/sh"
	# getent and dig resolve through NSS: files and dns
	local nss
	for nss in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
		/lib/x86_64-linux-gnu/libresolv.so.2; do
		[[ -e "$nss" ]] && mkdir -p "$root$(dirname "$nss")" && cp -L "$nss" "$root$nss"
	done
	# /bin and /lib point into /usr as on Debian
	rmdir "$root/bin"
	ln -s usr/bin "$root/bin"
	ln -s usr/bin "$root/usr/sbin"
	ln -s usr/bin "$root/sbin"
	[[ -d "$root/lib" ]] || ln -s usr/lib "$root/lib"
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
	printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
	printf 'hosts: files dns\npasswd: files\ngroup: files\n' >"$root/etc/nsswitch.conf"
	: >"$root/etc/hosts"
	: >"$root/etc/resolv.conf"
}

# _kimg_build OUT REF ROOTFS [--change ...]... : a one-layer image from ROOTFS, saved as a
# docker-archive at OUT (tagged REF).
_kimg_build() {
	local out=$1 ref=$2 root=$3
	shift 3
	local store
	store=$(mktemp -d "$HC_PEERS_CACHE/.kimg-store.XXXXXX")
	local -a pm=(podman --root "$store/root" --runroot "$store/run" --storage-driver vfs
		--cgroup-manager cgroupfs --events-backend none)
	tar -C "$root" --numeric-owner --owner 0 --group 0 -cf - . |
		"${pm[@]}" import "$@" - "$ref" >/dev/null
	"${pm[@]}" save --quiet --format docker-archive -o "$out.partial" "$ref"
	"${pm[@]}" rmi -a -f >/dev/null 2>&1 || true
	chmod -R u+rwX "$store" 2>/dev/null || true
	rm -rf "$store"
	mv "$out.partial" "$out"
}

# _kimg_file REF : the archive's file name for REF.
_kimg_file() { printf '%s.tar\n' "$(tr '/:@' '___' <<<"$1")"; }

# kimg_ensure : every image archive of the cluster and the e2e tests, built when missing.
# Prints nothing; sets KIMG_DIR and KUBE_AGNHOST_IMAGE.
kimg_ensure() {
	KIMG_DIR=$(kimg_dir)
	KUBE_AGNHOST_IMAGE=$(kimg_agnhost_ref)
	[[ -n "$KUBE_AGNHOST_IMAGE" ]] || hc_die "e2e.test --list-images names no agnhost image"
	export KIMG_DIR KUBE_AGNHOST_IMAGE
	# .used: when a run last took its images from here (see the pruning below)
	[[ -f "$KIMG_DIR/.complete" ]] && { touch "$KIMG_DIR/.used"; return 0; }
	local t0 tmp
	t0=$(hc_now)
	mkdir -p "$HC_PEERS_CACHE"
	exec {_kimg_lock}>"$HC_PEERS_CACHE/.kube-images.lock"
	flock "$_kimg_lock"
	if [[ -f "$KIMG_DIR/.complete" ]]; then
		exec {_kimg_lock}>&-
		return 0
	fi
	hc_log "kube images: building into $KIMG_DIR"
	rm -rf "$KIMG_DIR"
	mkdir -p "$KIMG_DIR"
	tmp=$(mktemp -d "$HC_PEERS_CACHE/.kimg.XXXXXX")

	# pause: busybox-static, PID 1 that exits on SIGTERM
	mkdir -p "$tmp/pause/bin"
	cp /bin/busybox "$tmp/pause/bin/busybox"
	ln -s busybox "$tmp/pause/bin/sh"
	ln -s busybox "$tmp/pause/bin/sleep"
	_kimg_build "$KIMG_DIR/$(_kimg_file "$KUBE_PAUSE_IMAGE")" "$KUBE_PAUSE_IMAGE" "$tmp/pause" \
		--change 'ENTRYPOINT ["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'

	# the toolbox every e2e image shares
	_kimg_toolbox "$tmp/toolbox"

	# agnhost: the toolbox plus /agnhost, as upstream (ENTRYPOINT agnhost, CMD pause)
	cp -a "$tmp/toolbox" "$tmp/agnhost"
	install -m 0755 "$KUBE_BIN_DIR/agnhost" "$tmp/agnhost/agnhost"
	# the porter subcommand serves TLS with these
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
		-subj /CN=localhost -addext subjectAltName=DNS:localhost \
		-keyout "$tmp/agnhost/localhost.key" -out "$tmp/agnhost/localhost.crt" 2>/dev/null
	local ref
	while read -r ref; do
		[[ "$ref" == registry.k8s.io/e2e-test-images/agnhost:* ]] || continue
		_kimg_build "$KIMG_DIR/$(_kimg_file "$ref")" "$ref" "$tmp/agnhost" \
			--change 'ENTRYPOINT ["/agnhost"]' --change 'CMD ["pause"]' --change 'ENV PATH=/usr/bin:/bin'
	done < <(kimg_list)

	# the other e2e images: the toolbox with a command that keeps the container up (tests
	# always give their own command to these; the web servers are served by agnhost)
	while read -r ref; do
		case "$ref" in
		*/agnhost:* | */pause:* | invalid.*) continue ;;
		*/httpd:* | */nginx:*)
			# a web server on port 80, like the real ones
			_kimg_build "$KIMG_DIR/$(_kimg_file "$ref")" "$ref" "$tmp/agnhost" \
				--change 'ENTRYPOINT ["/agnhost"]' --change 'CMD ["netexec","--http-port=80","--udp-port=-1"]' \
				--change 'ENV PATH=/usr/bin:/bin'
			;;
		*/e2e-test-images/busybox:* | */jessie-dnsutils:* | */glibc-dns-testing:* | */nautilus:* | */kitten:*)
			_kimg_build "$KIMG_DIR/$(_kimg_file "$ref")" "$ref" "$tmp/toolbox" \
				--change 'CMD ["/bin/sh"]' --change 'ENV PATH=/usr/bin:/bin'
			;;
		*) ;; # images of other suites (storage, GPUs, ...): not needed for sig-network
		esac
	done < <(kimg_list)
	# pause images the tests name themselves
	while read -r ref; do
		[[ "$ref" == */pause:* && "$ref" != "$KUBE_PAUSE_IMAGE" ]] || continue
		_kimg_build "$KIMG_DIR/$(_kimg_file "$ref")" "$ref" "$tmp/pause" \
			--change 'ENTRYPOINT ["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
	done < <(kimg_list)

	# CoreDNS
	mkdir -p "$tmp/coredns/etc"
	install -m 0755 "$COREDNS_BIN" "$tmp/coredns/coredns"
	printf 'root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$tmp/coredns/etc/passwd"
	_kimg_build "$KIMG_DIR/$(_kimg_file "$KUBE_COREDNS_IMAGE")" "$KUBE_COREDNS_IMAGE" "$tmp/coredns" \
		--change 'ENTRYPOINT ["/coredns"]'

	chmod -R u+rwX "$tmp" 2>/dev/null || true
	rm -rf "$tmp"
	touch "$KIMG_DIR/.complete" "$KIMG_DIR/.used"
	# the images of another key (another version or another revision of this file) are
	# removed once no run has used them for a day: a run of another revision on this
	# machine may be importing them right now
	local old
	for old in "$HC_PEERS_CACHE"/kube-images-*; do
		[[ "$old" == "$KIMG_DIR" || ! -d "$old" ]] && continue
		[[ -n $(find "$old" -maxdepth 1 -name .used -mmin -1440) ]] || rm -rf -- "$old"
	done
	exec {_kimg_lock}>&-
	hc_log "kube images: built in $(hc_since "$t0")s ($(du -sh "$KIMG_DIR" | cut -f1))"
}

# kimg_archives [all|core] : the archives to import (core: what the cluster itself and the
# kubernetes tests use; all: also every e2e image).
kimg_archives() {
	local which=${1:-core} ref
	printf '%s/%s\n' "$KIMG_DIR" "$(_kimg_file "$KUBE_PAUSE_IMAGE")"
	printf '%s/%s\n' "$KIMG_DIR" "$(_kimg_file "$KUBE_COREDNS_IMAGE")"
	printf '%s/%s\n' "$KIMG_DIR" "$(_kimg_file "$KUBE_AGNHOST_IMAGE")"
	if [[ "$which" == all ]]; then
		while read -r ref; do
			[[ -f "$KIMG_DIR/$(_kimg_file "$ref")" && "$ref" != "$KUBE_AGNHOST_IMAGE" && "$ref" != "$KUBE_PAUSE_IMAGE" ]] &&
				printf '%s/%s\n' "$KIMG_DIR" "$(_kimg_file "$ref")"
		done < <(kimg_list)
	fi
}

# --- tailscaled as the chart's sidecar (KUBE_TS_MODE=sidecar) ----------------------

# kimg_tailscale : an image with the pinned tailscaled and tailscale (static Go binaries) on
# PATH, what the chart's sidecar runs; saved in the state dir. Sets HC_IMAGE_TAILSCALE and
# HC_IMAGE_TAILSCALE_ARCHIVE.
kimg_tailscale() {
	local root=$HC_STATE_DIR/images/tailscale-rootfs
	HC_IMAGE_TAILSCALE=localhost/headcni-tailscale:${TAILSCALE_VERSION}
	HC_IMAGE_TAILSCALE_ARCHIVE=$HC_STATE_DIR/images/tailscale.tar
	export HC_IMAGE_TAILSCALE HC_IMAGE_TAILSCALE_ARCHIVE
	mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/var/lib/tailscale" "$root/run"
	install -m 0755 "$TAILSCALED_BIN" "$root/bin/tailscaled"
	install -m 0755 "$TAILSCALE_BIN" "$root/bin/tailscale"
	printf 'root:x:0:0:root:/:/bin/false\n' >"$root/etc/passwd"
	_kimg_build "$HC_IMAGE_TAILSCALE_ARCHIVE" "$HC_IMAGE_TAILSCALE" "$root" --change 'ENV PATH=/bin'
	rm -rf "$root"
}

# --- HeadCNI's own image ---------------------------------------------------------

HC_MUSL_TARGET=x86_64-unknown-linux-musl

# kimg_headcni : the static binary (cargo build --target musl, niced, under the harness's
# build lock, or $HEADCNI_MUSL_BIN), then `podman build` of the Dockerfile, offline. Sets
# HC_IMAGE_HEADCNI (localhost/headcni:<digest of the binary>) and HC_IMAGE_HEADCNI_ARCHIVE
# (in the state dir).
kimg_headcni() {
	local t0 bin out=$HC_REPO_DIR/target
	t0=$(hc_now)
	if [[ -n "${HEADCNI_MUSL_BIN:-}" ]]; then
		bin=$HEADCNI_MUSL_BIN
	else
		mkdir -p "$out"
		exec {_hc_buildfd}>"$out/.harness-build.lock"
		flock "$_hc_buildfd"
		hc_log "headcni: cargo build --release --target $HC_MUSL_TARGET (niced; log: $out/harness-build-musl.log)"
		if ! (cd "$HC_REPO_DIR" && CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
			nice -n 10 cargo build --release --locked --target "$HC_MUSL_TARGET") >"$out/harness-build-musl.log" 2>&1; then
			tail -n 30 "$out/harness-build-musl.log" >&2
			exec {_hc_buildfd}>&-
			hc_die "cargo build --target $HC_MUSL_TARGET failed"
		fi
		exec {_hc_buildfd}>&-
		bin=$out/$HC_MUSL_TARGET/release/headcni
	fi
	[[ -x "$bin" ]] || hc_die "no static headcni binary at $bin"
	HC_IMAGE_HEADCNI=localhost/headcni:$(sha256sum "$bin" | cut -c1-12)
	HC_IMAGE_HEADCNI_ARCHIVE=$HC_STATE_DIR/images/headcni.tar
	export HC_IMAGE_HEADCNI HC_IMAGE_HEADCNI_ARCHIVE
	# A context of the binary alone (it may be $HEADCNI_MUSL_BIN, outside the repository),
	# named by the Dockerfile's BINARY.
	mkdir -p "$HC_STATE_DIR/images/context" "$HC_STATE_DIR/logs"
	install -m 0755 "$bin" "$HC_STATE_DIR/images/context/headcni"
	local store=$HC_STATE_DIR/images/podman
	mkdir -p "$store"
	cat >"$HC_STATE_DIR/images/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:4096", "nproc=4096:4096"]
[network]
network_backend = "cni"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
	local -a pm=(env CONTAINERS_CONF="$HC_STATE_DIR/images/containers.conf" podman --root "$store/root"
		--runroot "$store/run" --storage-driver vfs --cgroup-manager cgroupfs --events-backend none)
	local version
	version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$HC_REPO_DIR/Cargo.toml" | head -n1)
	"${pm[@]}" build --network=none --pull=never -f "$HC_REPO_DIR/Dockerfile" -t "$HC_IMAGE_HEADCNI" \
		--build-arg BINARY=headcni --build-arg VERSION="$version" --build-arg REVISION="$(git -C "$HC_REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)" \
		"$HC_STATE_DIR/images/context" >"$HC_STATE_DIR/logs/image-build.log" 2>&1 ||
		{
			tail -n 20 "$HC_STATE_DIR/logs/image-build.log" >&2
			hc_die "podman build of the HeadCNI image failed"
		}
	"${pm[@]}" save --quiet --format docker-archive -o "$HC_IMAGE_HEADCNI_ARCHIVE" "$HC_IMAGE_HEADCNI"
	"${pm[@]}" rmi -a -f >/dev/null 2>&1 || true
	chmod -R u+rwX "$store" 2>/dev/null || true
	rm -rf "$store" "$HC_STATE_DIR/images/context"
	hc_log "headcni image $HC_IMAGE_HEADCNI built ($(hc_since "$t0")s)"
}
