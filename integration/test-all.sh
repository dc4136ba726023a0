#!/usr/bin/env bash
# The whole test suite, as root, on a fresh machine: installs what the tests need, builds
# HeadCNI, runs every test and check, prints a summary, and exits non-zero if anything failed.
#
#   sudo integration/test-all.sh [--skip STAGE]... [--only STAGE]...
#
# Stages, in order:
#   peers      apt packages and the pinned Go-built peers (tailscale, headscale, crictl, helm,
#              Kubernetes, etcd, CoreDNS)
#   lint       cargo fmt --check, cargo clippy -D warnings, the module boundaries, shellcheck
#   build      the static (musl) release build that every later stage uses (the host's
#              release build when the musl target cannot be installed)
#   cargo      unit, property and namespace tests, the agent against real Headscale/tailscaled
#   runtimes   podman, ctr and crictl attaching containers through the plugin
#   cluster    the multi-node tests over a real tailnet
#   chart      helm lint/template, schema validation, deploy-with-helm.sh
#   image      the FROM scratch image, built offline with podman, run
#   kubernetes HeadCNI installed with Helm on a real Kubernetes (kube-tests.sh)
#   sidecar    the same cluster with tailscaled in the agent's pod (config.tailscale.mode=sidecar):
#              install, pods across nodes, status, helm upgrade keeping each tailnet node
#   controller route approval by headcni controller: upgrade from the previous chart, the
#              admission policy, attacks and faults (controller-tests.sh)
#   conformance the upstream sig-network conformance tests on it (conformance.sh)
#   netpol     the upstream NetworkPolicy specs (Netpol, Feature:NetworkPolicy) on it; the SCTP
#              ones only where the kernel has SCTP
#
# Each stage runs even when an earlier one failed (when it can), so one run shows everything.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

all_stages=(peers lint build cargo runtimes cluster chart image kubernetes sidecar controller conformance netpol)
declare -a only=() skip=()
while (($#)); do
	case "$1" in
	--only) only+=("$2"); shift 2 ;;
	--skip) skip+=("$2"); shift 2 ;;
	-h | --help) sed -n '2,25p' "$0"; exit 0 ;;
	*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
	esac
done

if [[ $EUID -ne 0 ]]; then
	echo "integration/test-all.sh must run as root (network namespaces, runtimes)" >&2
	exit 2
fi

wanted() {
	local s=$1 x
	for x in "${skip[@]}"; do [[ $x == "$s" ]] && return 1; done
	((${#only[@]} == 0)) && return 0
	for x in "${only[@]}"; do [[ $x == "$s" ]] && return 0; done
	return 1
}

t_start=$(date +%s)
declare -a summary=()
failed=0
musl=x86_64-unknown-linux-musl

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

run_stage() {
	local name=$1 fn=$2 t0 rc
	wanted "$name" || { summary+=("$(printf '%-10s skipped' "$name")"); return 0; }
	say "$name"
	t0=$(date +%s)
	set +e
	("$fn")
	rc=$?
	set -e
	local took=$(($(date +%s) - t0))
	if ((rc == 0)); then
		summary+=("$(printf '%-10s ok      %4ss' "$name" "$took")")
	else
		summary+=("$(printf '%-10s FAILED  %4ss (exit %s)' "$name" "$took" "$rc")")
		failed=1
	fi
}

stage_peers() {
	set -e
	integration/lib/peers.sh ensure
	integration/lib/peers.sh kube
	# What the cargo tests and checks use beyond the harness's own list.
	local -a extra=(gcc python3 shellcheck iptables nftables)
	local -a missing=()
	local p
	for p in "${extra[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
	done
	if ((${#missing[@]})); then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; return 1; }
	if ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
		rustup target add "$musl" || echo "warning: could not add the $musl target; the static build and the image are skipped" >&2
	fi
	# The justfile's runner, for the documented `just build`.
	command -v just >/dev/null || cargo install --locked just
}

stage_lint() {
	set -e
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	# The module boundaries of ARCHITECTURE.md (which module may name which).
	cargo test --locked --test boundaries
	if command -v shellcheck >/dev/null; then
		shellcheck -x -P SCRIPTDIR integration/*.sh integration/lib/*.sh bench/*.sh deploy-with-helm.sh
	fi
	# The GitHub workflows, with actionlint (pinned and cached by lib/peers.sh; it runs
	# checks their run scripts with shellcheck too).
	# shellcheck source=lib/peers.sh
	source integration/lib/peers.sh
	peers_build_checkers
	"$ACTIONLINT_BIN" .github/workflows/*.yml
}

stage_build() {
	set -e
	# The static binary that ships serves every later stage (the harnesses pick it when the
	# target is installed); the host's release build only stands in without the target.
	if rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
		if command -v just >/dev/null; then just build; else cargo build --locked --release --target "$musl"; fi
		# A static (PIE) executable has no program interpreter.
		if readelf -l "target/$musl/release/headcni" | grep -q 'Requesting program interpreter'; then
			echo "the musl build is not static" >&2
			return 1
		fi
	else
		cargo build --locked --release
	fi
}

stage_cargo() {
	set -e
	# shellcheck source=lib/peers.sh
	eval "$(integration/lib/peers.sh print | sed 's/^/export /')"
	cargo test --locked --no-fail-fast
}

stage_runtimes() { integration/runtime-tests.sh; }
stage_cluster() { integration/tests.sh; }
stage_chart() { integration/chart-check.sh; }

stage_image() {
	if ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
		echo "skipped: no $musl target" >&2
		return 0
	fi
	integration/image-check.sh
}

stage_kubernetes() { integration/kube-tests.sh; }
stage_sidecar() { KUBE_TS_MODE=sidecar integration/kube-tests.sh --prefix hcs install deployment status upgrade; }
stage_controller() { integration/controller-tests.sh; }
stage_conformance() { integration/conformance.sh; }
stage_netpol() {
	local -a skip=()
	# SCTP sockets in a throwaway network namespace: without them the SCTP specs cannot run.
	unshare -n python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)' 2>/dev/null ||
		skip=(--skip SCTPConnectivity)
	integration/conformance.sh --prefix hcn --focus '\[sig-network\] (Netpol|NetworkPolicy)' "${skip[@]}"
}

for s in "${all_stages[@]}"; do
	run_stage "$s" "stage_$s"
done

printf '\n%s\n' "Summary (total $(($(date +%s) - t_start))s):"
printf '  %s\n' "${summary[@]}"
if ((failed)); then
	echo "FAILED"
	exit 1
fi
echo "all passed"
