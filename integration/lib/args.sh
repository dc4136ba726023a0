# shellcheck shell=bash
# integration/lib/args.sh: the command line shared by tests.sh and runtime-tests.sh. Sourced
# before anything else (it sets HC_PREFIX, which common.sh reads when it is sourced).
#
#   tr_parse_args "$@"   with ALL_TESTS set: fills WANT (the tests to run, all by default),
#                        INJECT (--inject CODE, only where TR_ALLOW_INJECT=1), HC_PREFIX, HC_KEEP

# shellcheck disable=SC2034 # WANT and INJECT are read by the calling script
tr_parse_args() {
	WANT=()
	INJECT=""
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
		--list)
			printf '%s\n' "${ALL_TESTS[@]}"
			exit 0
			;;
		--inject)
			[[ ${TR_ALLOW_INJECT:-0} == 1 ]] || {
				echo "unknown option: $1" >&2
				exit 2
			}
			INJECT=$2
			shift 2
			;;
		-h | --help)
			awk 'NR > 1 && /^#/ && !/shellcheck/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
			exit 0
			;;
		-*)
			echo "unknown option: $1" >&2
			exit 2
			;;
		*)
			WANT+=("$1")
			shift
			;;
		esac
	done
	((${#WANT[@]})) || WANT=("${ALL_TESTS[@]}")
	local t
	for t in "${WANT[@]}"; do
		[[ " ${ALL_TESTS[*]} " == *" $t "* ]] || {
			echo "unknown test: $t (--list shows them)" >&2
			exit 2
		}
	done
}
