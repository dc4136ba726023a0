#!/usr/bin/env bash
# integration/teardown.sh [PREFIX...]: undo everything a harness run with that
# prefix (default: $HC_PREFIX or "hc") created, from its journal in the state
# dir. Safe to run more than once; use it after a run that was killed with
# SIGKILL or left running with HC_KEEP=1 / --keep.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if (($# == 0)); then set -- "${HC_PREFIX:-hc}"; fi
for prefix in "$@"; do
	(
		export HC_PREFIX=$prefix
		unset HC_STATE_DIR
		# shellcheck source=lib/common.sh
		source "$here/lib/common.sh"
		if [[ -f "$HC_STATE_DIR/owner.pid" ]]; then
			owner=$(<"$HC_STATE_DIR/owner.pid")
			if [[ "$owner" != "$$" ]] && kill -0 "$owner" 2>/dev/null &&
				grep -q 'smoke\|harness\|integration' "/proc/$owner/cmdline" 2>/dev/null; then
				echo "note: run $prefix is still owned by pid $owner; tearing down anyway" >&2
			fi
		fi
		if [[ ! -f "$HC_JOURNAL" ]]; then
			echo "nothing to tear down for prefix '$prefix' ($HC_JOURNAL absent)" >&2
			exit 0
		fi
		hc_teardown
	)
done
