#!/usr/bin/env bash
# integration/conformance.sh: the upstream Kubernetes conformance tests of sig-network
# (e2e.test of the same release) against HeadCNI on the harness's cluster: a control plane
# and 2 nodes that reach each other's pods only through the tailnet.
#
# Setup as kube-tests.sh (HeadCNI installed with deploy-with-helm.sh, CoreDNS, kube-proxy on
# every node), with every image the tests use imported into every node. Then, from the
# control-plane host:
#
#   e2e.test --provider=local --kubeconfig=... --ginkgo.focus='\[sig-network\].*\[Conformance\]'
#
# usage: integration/conformance.sh [--prefix P] [--keep] [--focus REGEX] [--skip REGEX]
# env: HC_KEEP_STATE=1 (keep the logs and the e2e report), E2E_EXTRA (more e2e.test flags)
# Prints the upstream summary and a line "N passed, N failed"; exits non-zero when any test
# failed or none ran. Tears down on exit, error and Ctrl-C, and checks nothing is left.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FOCUS='\[sig-network\].*\[Conformance\]'
SKIP=''
while (($#)); do
	case "$1" in
	--prefix)
		export HC_PREFIX=$2
		shift 2
		;;
	--keep)
		export HC_KEEP=1
		shift
		;;
	--focus)
		FOCUS=$2
		shift 2
		;;
	--skip)
		SKIP=$2
		shift 2
		;;
	-h | --help)
		sed -n '2,17p' "$0"
		exit 0
		;;
	*)
		echo "unknown argument: $1 (see --help)" >&2
		exit 2
		;;
	esac
done

export HC_PREFIX=${HC_PREFIX:-hcc}
export HC_NODES=2
export HC_HS_AUTOAPPROVE=0
export KUBE_IMAGES=all
# shellcheck source=lib/peers.sh
source "$here/lib/peers.sh"
# shellcheck source=lib/kube.sh
source "$here/lib/kube.sh"
# shellcheck source=lib/testing.sh
source "$here/lib/testing.sh"

hc_require_root

kube_harness_up

report=$HC_STATE_DIR/e2e
# e2e.test makes temporary kubeconfig directories (test-kuberc*) and leaves them: in the state
# dir, they go with it.
mkdir -p "$report" "$HC_STATE_DIR/e2e-tmp"
t0=$(hc_now)
hc_log "== e2e.test $KUBE_VERSION --ginkgo.focus=\"$FOCUS\" --ginkgo.skip=\"$SKIP\""
rc=0
# shellcheck disable=SC2086 # E2E_EXTRA is a list of flags
(cd "$report" && TMPDIR=$HC_STATE_DIR/e2e-tmp ip netns exec "$(node_ns "$KUBE_CP")" "$KUBE_BIN_DIR/e2e.test" \
	--provider=local --kubeconfig="$KUBE_ADMIN_KUBECONFIG" \
	--ginkgo.focus="$FOCUS" ${SKIP:+--ginkgo.skip="$SKIP"} \
	--ginkgo.no-color --ginkgo.timeout=60m --ginkgo.junit-report="$report/junit.xml" \
	--report-dir="$report" --e2e-output-dir="$report" \
	--dump-logs-on-failure=false ${E2E_EXTRA:-}) >"$report/e2e.log" 2>&1 || rc=$?
took=$(hc_since "$t0")

# The upstream summary: "Ran N of M Specs in S seconds", then "N Passed | N Failed | ..."
summary=$(grep -E '^Ran [0-9]+ of [0-9]+ Specs|Passed \| [0-9]+ Failed' "$report/e2e.log" | tail -n 2 || true)
printf '%s\n' "$summary"
passed=$(grep -oE '[0-9]+ Passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
failed=$(grep -oE '[0-9]+ Failed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
if ((failed > 0 || rc != 0)); then
	hc_warn "failures:"
	grep -E '^\s*\[FAIL\]|^  \[FAIL\]|• \[FAILED\]' "$report/e2e.log" | sort -u >&2 || true
	[[ "${HC_KEEP_STATE:-0}" == 1 ]] || cp "$report/e2e.log" "/tmp/headcni-e2e-$HC_PREFIX.log" 2>/dev/null &&
		hc_warn "full log: /tmp/headcni-e2e-$HC_PREFIX.log"
fi
hc_log "e2e.test: ${passed} passed, ${failed} failed in ${took}s (setup ${KUBE_SETUP_S}s; exit $rc)"
((passed > 0)) || rc=1

tr_finish "$rc" conformance.sh
printf 'conformance: %d passed, %d failed\n' "$passed" "$failed"
exit "$TR_RC"
