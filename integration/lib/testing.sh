# shellcheck shell=bash
# integration/lib/testing.sh: the test runner of every script in integration/ (tests.sh,
# runtime-tests.sh, chart-check.sh, image-check.sh).
#
# A test is a shell function t_NAME. It runs in a subshell of its own (its
# variables do not leak; a failure ends only that test), with errexit on:
# any failing command or hc_die fails it, and the reason is kept. Tests
# report what they measured with `note TEXT` and skip with `skip REASON`.
# A test made of many small checks reports each with `ok TEXT` or `bad TEXT`:
# every check runs, and the test fails at its end when any was bad.
# Daemons a test starts are recorded in the run's journal like any other,
# so teardown stops them whatever happens.
#
#   tr_setup_begin      peers, the build, state dir and traps, the underlay
#   tr_run NAME...      run the tests in that order
#   tr_summary          print the table; returns non-zero if any test failed
#   tr_finish RC NAME   tear down now, check nothing is left; sets TR_RC, the final code
#
# Known failures: a script may name tests that fail today because of a known defect, with the
# defect, in TR_KNOWN_FAILING[NAME]="why". Such a test still runs in full; its failure is shown
# as XFAIL (with its reason) and does not fail the run, and its passing is shown as XPASS and
# does fail it (the defect is gone: take the test off the list). TR_STRICT=1 counts XFAIL as FAIL.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

declare -a TR_NAMES=() TR_RESULTS=() TR_TIMES=() TR_REASONS=()
TR_PASSED=0 TR_FAILED=0 TR_SKIPPED=0 TR_XFAILED=0
declare -A TR_KNOWN_FAILING=()

# note TEXT : a line for the summary under the current test.
note() { printf '%s\n' "$*" >>"$TR_NOTES"; hc_log "   $*"; }

# skip REASON : end the current test as skipped.
skip() {
	printf '%s\n' "$*" >"$TR_REASON"
	exit 77
}

# ok TEXT : one check of the current test passed.
ok() { hc_log "ok   $*"; }

# bad TEXT : one check of the current test failed; the test goes on and fails at its end.
bad() {
	printf '%s\n' "$*" >>"$TR_BAD"
	hc_log "FAIL $*"
}

# tr_exists NAME : t_NAME is defined.
tr_exists() { declare -F "t_$1" >/dev/null; }

_tr_one() {
	local name=$1 t0 rc=0
	TR_NOTES=$HC_STATE_DIR/tests/$name.notes
	TR_REASON=$HC_STATE_DIR/tests/$name.reason
	TR_BAD=$HC_STATE_DIR/tests/$name.bad
	mkdir -p "$HC_STATE_DIR/tests"
	: >"$TR_NOTES"
	: >"$TR_REASON"
	: >"$TR_BAD"
	hc_log "===== test $name"
	t0=$(hc_now)
	# A foreground subshell (a Ctrl-C reaches it and the harness alike), with
	# errexit switched on inside it: outside any condition, so it holds.
	set +e
	(
		set -eE
		trap 'printf "line %s: %s (exit %s)\n" "$LINENO" "$BASH_COMMAND" "$?" >"$TR_REASON"' ERR
		# stop at the next command on Ctrl-C/TERM (untrapped, bash would go on
		# when the interrupted child exits normally, e.g. ping); the harness
		# then tears down
		trap 'exit 130' INT
		trap 'exit 143' TERM HUP
		# shellcheck disable=SC2317 # called by the test and the library
		hc_die() {
			printf '%s\n' "$*" >"$TR_REASON"
			trap - ERR
			printf '[%6.1fs] FAIL: %s\n' "$(hc_elapsed)" "$*" >&2
			exit 1
		}
		"t_$name"
		if [[ -s "$TR_BAD" ]]; then
			printf '%s checks failed: %s\n' "$(wc -l <"$TR_BAD")" "$(paste -sd ';' "$TR_BAD")" >"$TR_REASON"
			exit 1
		fi
	)
	rc=$?
	set -e
	TR_NAMES+=("$name")
	TR_TIMES+=("$(hc_since "$t0")")
	# (the ERR trap also fires in command substitutions whose failure is
	# harmless: a reason counts only when the test failed or skipped)
	if ((rc == 0)); then
		TR_REASONS+=("")
	else
		TR_REASONS+=("$(head -c 300 "$TR_REASON" | tr '\n' ' ')")
	fi
	local known=${TR_KNOWN_FAILING[$name]:-}
	if [[ -n "$known" && "${TR_STRICT:-0}" != 1 ]]; then
		case $rc in
		0)
			rc=1
			printf 'XPASS: known to fail (%s), yet it passed: take it off the known failures\n' "$known" >"$TR_REASON"
			TR_REASONS[-1]=$(head -c 300 "$TR_REASON" | tr '\n' ' ')
			;;
		77) ;;
		*)
			TR_RESULTS+=(XFAIL)
			TR_XFAILED=$((TR_XFAILED + 1))
			TR_REASONS[-1]="known failure ($known): ${TR_REASONS[-1]}"
			hc_log "===== XFAIL $name (${TR_TIMES[-1]} s): ${TR_REASONS[-1]}"
			return 0
			;;
		esac
	fi
	case $rc in
	0)
		TR_RESULTS+=(PASS)
		TR_PASSED=$((TR_PASSED + 1))
		;;
	77)
		TR_RESULTS+=(SKIP)
		TR_SKIPPED=$((TR_SKIPPED + 1))
		;;
	*)
		TR_RESULTS+=(FAIL)
		TR_FAILED=$((TR_FAILED + 1))
		;;
	esac
	hc_log "===== ${TR_RESULTS[-1]} $name (${TR_TIMES[-1]} s)${TR_REASONS[-1]:+: ${TR_REASONS[-1]}}"
}

tr_run() {
	local name
	for name in "$@"; do
		tr_exists "$name" || hc_die "no such test: $name"
	done
	for name in "$@"; do _tr_one "$name"; done
}

# tr_summary TITLE : the table (with each test's notes); 1 if anything failed.
tr_summary() {
	local k name total=0
	printf '\n===== %s\n' "$1"
	for k in "${!TR_NAMES[@]}"; do
		name=${TR_NAMES[k]}
		printf '%-5s %-18s %7s s  %s\n' "${TR_RESULTS[k]}" "$name" "${TR_TIMES[k]}" "${TR_REASONS[k]}"
		sed 's/^/                                  /' "$HC_STATE_DIR/tests/$name.notes" 2>/dev/null || true
		total=$(awk -v a="$total" -v b="${TR_TIMES[k]}" 'BEGIN{printf "%.1f", a+b}')
	done
	local xf=""
	((TR_XFAILED == 0)) || xf="$TR_XFAILED known failures (XFAIL), "
	printf '\n%d passed, %d failed, %d skipped (%stests %s s, whole run so far %s s)\n' \
		"$TR_PASSED" "$TR_FAILED" "$TR_SKIPPED" "$xf" "$total" "$(hc_elapsed)"
	((TR_FAILED == 0))
}

# tr_setup_begin : what every scenario starts with: the peers and the build, the run's state dir
# and traps, the staged binary, and the underlay. Sets T_START (the run), T_SETUP (the
# scenario's own setup) and ROOT_BEFORE (the root namespace as it was, for tr_finish).
# shellcheck disable=SC2034 # T_START, T_SETUP and ROOT_BEFORE are read by the scripts
tr_setup_begin() {
	T_START=$(hc_now)
	hc_log "== setup"
	peers_ensure
	hcni_build
	ROOT_BEFORE=$(topo_root_view)
	hc_state_init
	hc_install_traps
	hcni_stage
	T_SETUP=$(hc_now)
	topo_up
}

# tr_finish RC SCRIPT : unless --keep, tear down now and check that nothing of the run is left in
# the root namespace (the exit trap's teardown then finds no journal; a Ctrl-C meanwhile still
# tears down). Sets TR_RC to the exit code to use: RC, or 1 when something was left.
# shellcheck disable=SC2034 # TR_RC is the calling script's exit code
tr_finish() {
	local rc=$1 script=$2 t
	if [[ "${HC_KEEP:-0}" != 1 ]]; then
		t=$(hc_now)
		if ((rc != 0)) && [[ "${HC_DUMP_LOGS:-1}" == 1 ]]; then hc_dump_logs; fi
		HC_DUMP_LOGS=0
		hc_teardown
		if topo_leak_check "$ROOT_BEFORE"; then
			hc_log "teardown: nothing of the run is left in the root namespace ($(hc_since "$t") s)"
		else
			hc_warn "teardown left something behind"
			rc=1
		fi
	fi
	hc_log "$script finished in $(hc_since "$T_START") s"
	TR_RC=$rc
}
