# shellcheck shell=bash
# integration/lib/common.sh: logging, the run's state dir and its undo journal.
#
# Every resource the harness creates (namespace, process, mount, file, dir) is
# written to the journal *before or right after* it is created; teardown replays
# the journal backwards. The journal lives in the state dir, so a run that was
# killed with SIGKILL can still be cleaned up later by integration/teardown.sh
# (or automatically by the next run with the same prefix).
#
# Sourced by the other lib/*.sh files; not meant to be executed.

[[ -n "${_HC_COMMON_SH:-}" ]] && return 0
_HC_COMMON_SH=1
# errexit also inside $(...), so a failing helper fails its caller
shopt -s inherit_errexit

# HC_PREFIX names every namespace of a run; two runs with different prefixes
# do not collide. Short, because it ends up in interface and namespace names.
HC_PREFIX=${HC_PREFIX:-hc}
if [[ ! "$HC_PREFIX" =~ ^[a-z][a-z0-9]{0,5}$ ]]; then
	echo "HC_PREFIX must match ^[a-z][a-z0-9]{0,5}\$ (got '$HC_PREFIX')" >&2
	exit 2
fi
HC_STATE_ROOT=${HC_STATE_ROOT:-/var/tmp/headcni-it}
HC_STATE_DIR=${HC_STATE_DIR:-$HC_STATE_ROOT/$HC_PREFIX}
HC_JOURNAL=$HC_STATE_DIR/journal
HC_LIB_DIR=${HC_LIB_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
HC_T0=${HC_T0:-$(date +%s.%N)}

hc_log() { printf '[%6.1fs] %s\n' "$(hc_elapsed)" "$*" >&2; }
hc_warn() { printf '[%6.1fs] WARN: %s\n' "$(hc_elapsed)" "$*" >&2; }
hc_die() {
	printf '[%6.1fs] FAIL: %s\n' "$(hc_elapsed)" "$*" >&2
	exit 1
}
hc_elapsed() { awk -v a="$HC_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
hc_now() { date +%s.%N; }
# hc_since T0 -> seconds elapsed since T0 (two decimals)
hc_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}'; }

hc_require_root() { [[ $EUID -eq 0 ]] || hc_die "must run as root"; }

# hc_wait_for TIMEOUT_S DESCRIPTION CMD... : poll CMD every 0.2 s until it succeeds.
hc_wait_for() {
	local timeout=$1 what=$2
	shift 2
	local deadline
	deadline=$(($(date +%s%N) + timeout * 1000000000))
	until "$@" >/dev/null 2>&1; do
		if (($(date +%s%N) > deadline)); then
			hc_warn "timed out after ${timeout}s waiting for: $what"
			return 1
		fi
		sleep 0.2
	done
}

# hc_label_alive LABEL : the process started by hc_spawn as LABEL still runs.
hc_label_alive() {
	local pidfile="$HC_STATE_DIR/$1.pid" pid st
	[[ -f "$pidfile" ]] || return 1
	pid=$(<"$pidfile")
	st=$(awk -F'\t' -v p="$pid" '$1=="pid" && $2==p {s=$3} END{print s}' "$HC_JOURNAL")
	[[ -n "$st" ]] && hc_pid_alive "$pid" "$st"
}

# hc_wait_daemon TIMEOUT_S LABEL DESCRIPTION CMD... : like hc_wait_for, but
# gives up at once (showing the log) when the daemon LABEL has exited.
hc_wait_daemon() {
	local timeout=$1 label=$2 what=$3
	shift 3
	local deadline
	deadline=$(($(date +%s%N) + timeout * 1000000000))
	until "$@" >/dev/null 2>&1; do
		if ! hc_label_alive "$label"; then
			hc_warn "$label exited while waiting for: $what"
			tail -n 15 "$HC_STATE_DIR/logs/$label.log" >&2 2>/dev/null || true
			return 1
		fi
		if (($(date +%s%N) > deadline)); then
			hc_warn "timed out after ${timeout}s waiting for: $what"
			return 1
		fi
		sleep 0.2
	done
}

# --- state dir and journal -------------------------------------------------

hc_state_init() {
	hc_require_root
	mkdir -p "$HC_STATE_ROOT"
	chmod 0700 "$HC_STATE_ROOT"
	if [[ -s "$HC_JOURNAL" ]]; then
		hc_warn "a previous run with prefix '$HC_PREFIX' left a journal; tearing it down first"
		hc_teardown
	fi
	# a state dir kept by HC_KEEP_STATE=1 (logs, Headscale's database): start afresh
	if [[ -d "$HC_STATE_DIR" ]]; then
		case "$HC_STATE_DIR" in
		"$HC_STATE_ROOT"/?*) rm -rf --one-file-system -- "$HC_STATE_DIR" ;;
		esac
	fi
	mkdir -p "$HC_STATE_DIR"
	chmod 0700 "$HC_STATE_DIR"
	: >"$HC_JOURNAL"
	printf '%s\n' "$$" >"$HC_STATE_DIR/owner.pid"
}

# hc_record KIND ARGS... : append one undo entry. Kinds (see hc_undo_entry):
#   pid PID STARTTIME LABEL   mntns INODE   netns NAME   umount PATH
#   rmdir PATH   rm PATH   rmtree PATH   nscmd HOLDERPID STARTTIME CMD...
#   cgroup NAME (a cgroup we made under every hierarchy: kill its procs, rmdir)
hc_record() {
	[[ -f "$HC_JOURNAL" ]] || hc_die "state not initialised (hc_state_init)"
	local IFS=$'\t'
	printf '%s\n' "$*" >>"$HC_JOURNAL"
}

# /proc/PID/stat: prints "STATE STARTTIME" (fields 3 and 22). The start time
# (clock ticks since boot) identifies a process even when its PID is reused.
_hc_pid_stat() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	local -a f
	read -r -a f <<<"$stat"
	printf '%s %s\n' "${f[0]}" "${f[19]}"
}

hc_pid_starttime() {
	local s
	s=$(_hc_pid_stat "$1") || return 1
	printf '%s\n' "${s#* }"
}

# hc_pid_alive PID STARTTIME : true if that very process exists and is no zombie.
hc_pid_alive() {
	local s
	s=$(_hc_pid_stat "$1") || return 1
	[[ "${s#* }" == "$2" && "${s%% *}" != Z ]]
}

# hc_spawn LABEL LOGFILE CMD... : start CMD in the background in a session of
# its own (so a Ctrl-C of the harness reaches the harness, which then stops it
# in order) and record its PID. Sets HC_SPAWNED_PID. Call it directly, never
# in $(...): the harness shell must stay the parent (it reaps the children).
hc_spawn() {
	local label=$1 logfile=$2
	shift 2
	# The daemon gets none of the harness's other descriptors: not the saved
	# stdout/stderr (a pipe to `| tee` would never close while it runs).
	if [[ -n "${HC_ORIG_STDOUT:-}" ]]; then
		setsid "$@" </dev/null >>"$logfile" 2>&1 {HC_ORIG_STDOUT}>&- {HC_ORIG_STDERR}>&- &
	else
		setsid "$@" </dev/null >>"$logfile" 2>&1 &
	fi
	HC_SPAWNED_PID=$!
	local st
	st=$(hc_pid_starttime "$HC_SPAWNED_PID") || {
		wait "$HC_SPAWNED_PID" 2>/dev/null || true
		hc_die "$label exited at once; see $logfile"
	}
	hc_record pid "$HC_SPAWNED_PID" "$st" "$label"
	printf '%s\n' "$HC_SPAWNED_PID" >"$HC_STATE_DIR/$label.pid"
}

# hc_kill_pid PID STARTTIME LABEL [GRACE_S]: TERM, wait, then KILL.
hc_kill_pid() {
	local pid=$1 st=$2 label=${3:-process} grace=${4:-10}
	hc_pid_alive "$pid" "$st" || return 0
	kill -TERM "$pid" 2>/dev/null || true
	local i
	for ((i = 0; i < grace * 10; i++)); do
		hc_pid_alive "$pid" "$st" || return 0
		sleep 0.1
	done
	hc_warn "$label (pid $pid) ignored SIGTERM for ${grace}s; sending SIGKILL"
	kill -KILL "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		hc_pid_alive "$pid" "$st" || return 0
		sleep 0.1
	done
	hc_warn "$label (pid $pid) still alive after SIGKILL"
}

# hc_stop_label LABEL : stop a process started by hc_spawn, by its recorded PID.
hc_stop_label() {
	local label=$1 pidfile="$HC_STATE_DIR/$1.pid" pid st
	[[ -f "$pidfile" ]] || return 0
	pid=$(<"$pidfile")
	st=$(awk -F'\t' -v p="$pid" '$1=="pid" && $2==p {s=$3} END{print s}' "$HC_JOURNAL")
	[[ -n "$st" ]] && hc_kill_pid "$pid" "$st" "$label" "${2:-10}"
	rm -f "$pidfile"
}

# PIDs of processes whose mount namespace has inode $1.
hc_pids_in_mntns() {
	local p ino
	for p in /proc/[0-9]*; do
		ino=$(stat -L -c %i "$p/ns/mnt" 2>/dev/null) || continue
		[[ "$ino" == "$1" ]] && printf '%s\n' "${p#/proc/}"
	done
}

# Kill every process in a namespace we created (they are ours by construction).
hc_kill_pids() { # LABEL PID...
	local label=$1 pid st
	shift
	for pid in "$@"; do
		[[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
		st=$(hc_pid_starttime "$pid") || continue
		hc_kill_pid "$pid" "$st" "$label:$(tr -d '\0' <"/proc/$pid/comm" 2>/dev/null)" 5
	done
}

hc_undo_entry() {
	local kind=$1
	shift
	case "$kind" in
	pid) hc_kill_pid "$1" "$2" "$3" ;;
	mntns)
		# shellcheck disable=SC2046
		hc_kill_pids "mntns" $(hc_pids_in_mntns "$1")
		;;
	netns)
		if ip netns list | awk '{print $1}' | grep -x -- "$1" >/dev/null; then
			# shellcheck disable=SC2046
			hc_kill_pids "netns $1" $(ip netns pids "$1" 2>/dev/null)
			ip netns delete "$1" 2>/dev/null || hc_warn "could not delete netns $1"
		fi
		;;
	umount)
		if mountpoint -q "$1" 2>/dev/null; then
			umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || hc_warn "could not unmount $1"
		fi
		;;
	rmdir) [[ -d "$1" ]] && { rmdir "$1" 2>/dev/null || hc_warn "left non-empty dir $1"; } ;;
	rm) rm -f -- "$1" ;;
	rmtree)
		# only ever below the state root, never anything else
		case "$1" in
		"$HC_STATE_ROOT"/?*) [[ -e "$1" ]] && rm -rf --one-file-system -- "$1" ;;
		*) hc_warn "refusing to remove $1 (outside $HC_STATE_ROOT)" ;;
		esac
		;;
	nscmd)
		# nscmd HOLDERPID STARTTIME CMD... : run CMD in the holder's network and
		# mount namespaces, only if that very holder still lives.
		local hp=$1 hst=$2
		shift 2
		if hc_pid_alive "$hp" "$hst"; then
			timeout 60 nsenter -t "$hp" -n -m -- "$@" >/dev/null 2>&1 || true
		fi
		;;
	cgroup) hc_cgroup_purge "$1" ;;
	*) hc_warn "unknown journal entry: $kind $*" ;;
	esac
	return 0
}

# hc_cgroup_purge NAME : kill every process in cgroup NAME (in any hierarchy,
# recursively; the cgroup is ours by construction), then remove the cgroups.
hc_cgroup_purge() {
	local name=$1 d
	[[ "$name" =~ ^[a-z0-9][a-z0-9_.-]*$ ]] || return 0
	local -a dirs=()
	for d in /sys/fs/cgroup/*/"$name" /sys/fs/cgroup/"$name"; do
		[[ -d "$d" ]] && dirs+=("$d")
	done
	((${#dirs[@]})) || return 0
	for _ in 1 2 3; do
		local -a pids=()
		mapfile -t pids < <(find "${dirs[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
		((${#pids[@]})) || break
		hc_kill_pids "cgroup $name" "${pids[@]}"
	done
	for d in "${dirs[@]}"; do
		find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
	done
}

# hc_teardown : undo everything in the journal, newest first. Idempotent.
hc_teardown() {
	[[ -f "$HC_JOURNAL" ]] || return 0
	hc_log "teardown of '$HC_PREFIX' ($(wc -l <"$HC_JOURNAL") journal entries)"
	local line
	local -a f
	while IFS= read -r line; do
		[[ -n "$line" ]] || continue
		IFS=$'\t' read -r -a f <<<"$line"
		hc_undo_entry "${f[@]}"
	done < <(tac "$HC_JOURNAL")
	if [[ "${HC_KEEP_STATE:-0}" == 1 ]]; then
		mv "$HC_JOURNAL" "$HC_JOURNAL.done"
		hc_log "state kept in $HC_STATE_DIR (HC_KEEP_STATE=1)"
	else
		case "$HC_STATE_DIR" in
		"$HC_STATE_ROOT"/?*)
			rm -rf --one-file-system -- "$HC_STATE_DIR"
			rmdir "$HC_STATE_ROOT" 2>/dev/null || true # when no other run is using it
			;;
		*) rm -f "$HC_JOURNAL" ;;
		esac
	fi
	hc_log "teardown done"
}

# hc_install_traps : teardown on any exit, including errors and signals.
# The signal traps may fire while a command with redirected output runs (its
# redirections then apply to the trap too): keep the original stdout/stderr
# and restore them for the teardown.
hc_install_traps() {
	exec {HC_ORIG_STDOUT}>&1 {HC_ORIG_STDERR}>&2
	trap '_hc_on_exit $?' EXIT
	trap 'hc_warn "interrupted (SIGINT)"; exit 130' INT
	trap 'hc_warn "terminated (SIGTERM)"; exit 143' TERM
	trap 'hc_warn "hangup"; exit 129' HUP
}

_hc_on_exit() {
	local rc=$1
	trap - EXIT INT TERM HUP
	set +e
	exec 1>&"$HC_ORIG_STDOUT" 2>&"$HC_ORIG_STDERR"
	if [[ "${HC_KEEP:-0}" == 1 && $rc -eq 0 ]]; then
		hc_log "HC_KEEP=1: leaving everything running; tear down with: $HC_LIB_DIR/../teardown.sh $HC_PREFIX"
	else
		if ((rc != 0)) && [[ "${HC_DUMP_LOGS:-1}" == 1 ]]; then hc_dump_logs; fi
		hc_teardown
	fi
	exit "$rc"
}

# On failure, show the tail of every daemon log of the run.
hc_dump_logs() {
	local f
	for f in "$HC_STATE_DIR"/logs/*.log; do
		[[ -s "$f" ]] || continue
		printf '\n===== tail of %s =====\n' "$f" >&2
		tail -n 25 "$f" >&2
	done
}

# hc_write_secret PATH : stdin -> PATH with mode 0600 (never on a command line).
hc_write_secret() {
	(
		umask 077
		cat >"$1.tmp"
	)
	mv -f "$1.tmp" "$1"
}
