#!/usr/bin/env bash
# Install or upgrade HeadCNI with Helm.
#
#   ./deploy-with-helm.sh -u https://headscale.example -k AUTH_KEY
#
# The keys never reach a command line: they are written into a Secret through a
# manifest file in a private temporary directory (removed on exit), and the chart
# is pointed at that Secret. Run with --help for every option.
set -euo pipefail
umask 077

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
Usage: $PROG -u URL [-k KEY | -K FILE] [options] [-- extra helm arguments]

Installs or upgrades the HeadCNI chart with 'helm upgrade --install'. The
pre-auth key and API key go into a Secret (never onto a command line); the
chart reads them as files.

Headscale:
  -u, --headscale-url URL     Headscale server URL (https://...). Required.
  -k, --auth-key KEY          Pre-auth key (reusable, tagged). Visible in your shell
                              history and the process list: prefer -K.
  -K, --auth-key-file FILE    Read the pre-auth key from FILE ('-' = stdin).
  -a, --api-key KEY           Headscale API key for route approval (optional).
  -A, --api-key-file FILE     Read the API key from FILE ('-' = stdin).
                              The environment variables HEADCNI_AUTH_KEY and
                              HEADCNI_API_KEY are used when no option is given.
      --allow-http            Accept an http:// URL (test servers only).

Network:
  -i, --ipam-type TYPE        headcni-ipam (default) or host-local.
  -s, --strategy NAME         headcni-ipam strategy: sequential (default), random, dense
                              (dense-pack is the same).
  -m, --mtu auto|N            Pod MTU: auto (default, from tailscale0) or 576..9000.
  -t, --tailscale-mode MODE   host (default: tailscaled runs on the nodes) or
                              sidecar (tailscaled runs in the HeadCNI pods).
      --tags TAGS             Tags the nodes advertise, comma list (e.g. tag:headcni).
      --cluster-cidr CIDRS    Cluster pod CIDR(s), comma list.
      --service-cidr CIDRS    Service CIDR(s), comma list.

Helm and Kubernetes:
  -n, --namespace NS          Namespace (default: kube-system). Created if missing,
                              labelled for Pod Security level "privileged".
  -r, --release NAME          Release name (default: headcni).
  -f, --values FILE           Extra values file (repeatable; the options above win).
  -c, --chart CHART           Chart path or reference (default: the chart/ next to
                              this script).
      --version VERSION       Chart version (with a repository chart reference).
      --secret-name NAME      Secret for the keys (default: RELEASE-headscale-keys).
      --kube-context CTX      Kubernetes context for helm and kubectl.
      --wait                  Wait until the agents are ready.
      --timeout DURATION      Helm timeout (default: 5m0s).
      --dry-run               Render with 'helm template' and print; change nothing,
                              contact no cluster.
  -h, --help                  Show this help.

Each run sets the whole configuration, as 'helm upgrade' does: repeat the
options (or keep them in a values file). Keys not given again are kept from
the Secret of the previous run. Anything after '--' is passed to helm
unchanged (never put a key there).

Examples:
  $PROG -u https://headscale.example -k "\$AUTH_KEY"
  $PROG -u https://headscale.example -K /root/headcni-authkey -A /root/headscale-apikey
  pass show headcni/authkey | $PROG -u https://headscale.example -K - -s dense -m 1280
  $PROG -u https://headscale.example -k KEY --dry-run > headcni.yaml
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
fail() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# ---------------------------------------------------------------- arguments
URL="" AUTH_KEY="" AUTH_KEY_FILE="" API_KEY="" API_KEY_FILE="" ALLOW_HTTP=false
AUTH_FROM_ARGV=false API_FROM_ARGV=false
IPAM_TYPE="" STRATEGY="" MTU="" TS_MODE="" TAGS="" CLUSTER_CIDR="" SERVICE_CIDR=""
NAMESPACE=kube-system RELEASE=headcni CHART="" CHART_VERSION="" SECRET_NAME=""
KUBE_CONTEXT="" WAIT=false TIMEOUT="" DRY_RUN=false
VALUES_FILES=() EXTRA_HELM_ARGS=()

need_value() { # option, remaining-argument-count, value
    [[ $2 -ge 2 ]] || die "option $1 needs a value (see --help)"
    [[ $3 == - || $3 != -* ]] || die "option $1 needs a value, got the option '$3' (see --help)"
}

while [[ $# -gt 0 ]]; do
    opt=$1
    # --long=value form
    if [[ $opt == --*=* ]]; then
        set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
        opt=$1
    fi
    case $opt in
        -u|--headscale-url)  need_value "$opt" $# "${2-}"; URL=$2; shift 2 ;;
        -k|--auth-key)       need_value "$opt" $# "${2-}"; AUTH_KEY=$2; AUTH_FROM_ARGV=true; shift 2 ;;
        -K|--auth-key-file)  need_value "$opt" $# "${2-}"; AUTH_KEY_FILE=$2; shift 2 ;;
        -a|--api-key)        need_value "$opt" $# "${2-}"; API_KEY=$2; API_FROM_ARGV=true; shift 2 ;;
        -A|--api-key-file)   need_value "$opt" $# "${2-}"; API_KEY_FILE=$2; shift 2 ;;
        --allow-http)        ALLOW_HTTP=true; shift ;;
        -i|--ipam-type)      need_value "$opt" $# "${2-}"; IPAM_TYPE=$2; shift 2 ;;
        -s|--strategy)       need_value "$opt" $# "${2-}"; STRATEGY=$2; shift 2 ;;
        -m|--mtu)            need_value "$opt" $# "${2-}"; MTU=$2; shift 2 ;;
        -t|--tailscale-mode) need_value "$opt" $# "${2-}"; TS_MODE=$2; shift 2 ;;
        --tags)              need_value "$opt" $# "${2-}"; TAGS=$2; shift 2 ;;
        --cluster-cidr)      need_value "$opt" $# "${2-}"; CLUSTER_CIDR=$2; shift 2 ;;
        --service-cidr)      need_value "$opt" $# "${2-}"; SERVICE_CIDR=$2; shift 2 ;;
        -n|--namespace)      need_value "$opt" $# "${2-}"; NAMESPACE=$2; shift 2 ;;
        -r|--release)        need_value "$opt" $# "${2-}"; RELEASE=$2; shift 2 ;;
        -f|--values)         need_value "$opt" $# "${2-}"; VALUES_FILES+=("$2"); shift 2 ;;
        -c|--chart)          need_value "$opt" $# "${2-}"; CHART=$2; shift 2 ;;
        --version)           need_value "$opt" $# "${2-}"; CHART_VERSION=$2; shift 2 ;;
        --secret-name)       need_value "$opt" $# "${2-}"; SECRET_NAME=$2; shift 2 ;;
        --kube-context)      need_value "$opt" $# "${2-}"; KUBE_CONTEXT=$2; shift 2 ;;
        --wait)              WAIT=true; shift ;;
        --timeout)           need_value "$opt" $# "${2-}"; TIMEOUT=$2; shift 2 ;;
        --dry-run)           DRY_RUN=true; shift ;;
        -h|--help)           usage; exit 0 ;;
        --)                  shift; EXTRA_HELM_ARGS=("$@"); break ;;
        *)                   die "unknown option '$opt' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- validation
[[ -n $URL ]] || die "--headscale-url is required, e.g. -u https://headscale.example"
host_re='([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])'
url_re="^(https?)://${host_re}(:([0-9]{1,5}))?(/[^[:space:]?#]*)?$"
if [[ $URL =~ ^([A-Za-z][-+.A-Za-z0-9]*):// ]]; then
    scheme=${BASH_REMATCH[1]}
    case $scheme in
        https) ;;
        http)  $ALLOW_HTTP || die "--headscale-url '$URL' uses plain http: keys and traffic would travel unencrypted; use https:// (or --allow-http for a test server)" ;;
        *)     die "--headscale-url '$URL' must start with https:// (scheme '$scheme' is not supported)" ;;
    esac
else
    die "--headscale-url '$URL' is not a URL: it must start with https://"
fi
[[ $URL =~ $url_re ]] || die "--headscale-url '$URL' is not a valid URL: expected https://HOST[:PORT][/PATH], without user info, query or fragment"
port=""
if [[ $URL =~ ^[a-z]+://[^/]*:([0-9]+)(/|$) ]]; then port=${BASH_REMATCH[1]}; fi
if [[ -n $port ]] && (( 10#$port < 1 || 10#$port > 65535 )); then
    die "--headscale-url '$URL' has an invalid port $port (1..65535)"
fi
URL=${URL%/}

if [[ -n $IPAM_TYPE ]]; then
    case $IPAM_TYPE in
        headcni-ipam|host-local) ;;
        *) die "--ipam-type '$IPAM_TYPE' is not supported: use headcni-ipam or host-local" ;;
    esac
fi
if [[ -n $STRATEGY ]]; then
    case $STRATEGY in
        sequential|random|dense|dense-pack|dense_pack) ;;
        *) die "--strategy '$STRATEGY' is not supported: use sequential, random or dense" ;;
    esac
    [[ $IPAM_TYPE != host-local ]] || die "--strategy applies to --ipam-type headcni-ipam only (host-local allocates sequentially)"
fi
if [[ -n $MTU && $MTU != auto ]]; then
    [[ $MTU =~ ^[0-9]{1,5}$ ]] || die "--mtu '$MTU' must be 'auto' or a number from 576 to 9000"
    (( 10#$MTU >= 576 && 10#$MTU <= 9000 )) || die "--mtu $MTU is out of range: use 576..9000 (tailscale0 itself defaults to 1280) or 'auto'"
    MTU=$((10#$MTU))
fi
if [[ -n $TS_MODE ]]; then
    case $TS_MODE in
        host|sidecar) ;;
        *) die "--tailscale-mode '$TS_MODE' is not supported: use host or sidecar" ;;
    esac
fi
tag_re='^tag:[A-Za-z0-9][-A-Za-z0-9]*$'
TAG_LIST=()
if [[ -n $TAGS ]]; then
    IFS=',' read -r -a TAG_LIST <<<"$TAGS"
    for t in "${TAG_LIST[@]}"; do
        [[ $t =~ $tag_re ]] || die "--tags: '$t' is not a tag: expected tag:NAME (letters, digits, '-')"
    done
fi
cidr_re='^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/[0-9]{1,3})$'
check_cidrs() { # option, value
    local c
    local -a list
    IFS=',' read -r -a list <<<"$2"
    for c in "${list[@]}"; do
        c=${c// /}
        [[ $c =~ $cidr_re ]] || die "$1: '$c' is not a CIDR (e.g. 10.244.0.0/16 or fd00:10:244::/56)"
    done
}
[[ -z $CLUSTER_CIDR ]] || check_cidrs --cluster-cidr "$CLUSTER_CIDR"
[[ -z $SERVICE_CIDR ]] || check_cidrs --service-cidr "$SERVICE_CIDR"

label_re='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
[[ $NAMESPACE =~ $label_re && ${#NAMESPACE} -le 63 ]] || die "--namespace '$NAMESPACE' is not a valid namespace name (lower-case letters, digits, '-', at most 63)"
[[ $RELEASE =~ $label_re && ${#RELEASE} -le 53 ]] || die "--release '$RELEASE' is not a valid release name (lower-case letters, digits, '-', at most 53)"
SECRET_NAME=${SECRET_NAME:-$RELEASE-headscale-keys}
[[ $SECRET_NAME =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ && ${#SECRET_NAME} -le 253 ]] || die "--secret-name '$SECRET_NAME' is not a valid Secret name"
if [[ -n $TIMEOUT && ! $TIMEOUT =~ ^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$ ]]; then
    die "--timeout '$TIMEOUT' is not a duration (e.g. 300s, 5m, 1h)"
fi
for f in "${VALUES_FILES[@]+"${VALUES_FILES[@]}"}"; do
    [[ -f $f && -r $f ]] || die "--values '$f' is not a readable file"
done
for a in "${EXTRA_HELM_ARGS[@]+"${EXTRA_HELM_ARGS[@]}"}"; do
    case $a in
        *authKey*|*apiKey*|*auth-key*|*api-key*)
            die "refusing to pass a key on the helm command line ('$a'): use -k/-K/-a/-A, which go through a Secret" ;;
    esac
done
CHART=${CHART:-$SCRIPT_DIR/chart}

# ---------------------------------------------------------------- keys
[[ -n $AUTH_KEY && -n $AUTH_KEY_FILE ]] && die "give the pre-auth key once: -k or -K, not both"
[[ -n $API_KEY && -n $API_KEY_FILE ]] && die "give the API key once: -a or -A, not both"
[[ $AUTH_KEY_FILE == - && $API_KEY_FILE == - ]] && die "only one key can come from stdin"

read_key_file() { # file ('-' = stdin) -> stdout-free: sets REPLY
    local src=$1 data
    if [[ $src == - ]]; then
        [[ ! -t 0 ]] || note "reading a key from stdin (end with Ctrl-D)"
        IFS= read -r -d '' data || true
    else
        # A regular file, or a pipe such as -K <(pass show headscale/key).
        [[ -e $src && -r $src && ! -d $src ]] || die "key file '$src' is not a readable file"
        if [[ -f $src && -n $(find "$src" -maxdepth 0 -perm -o=r 2>/dev/null) ]]; then
            note "warning: key file '$src' is readable by every user; chmod 600 it"
        fi
        IFS= read -r -d '' data <"$src" || true
    fi
    # Trailing newlines and carriage returns from editors or 'echo'.
    data=${data%%[$'\r\n']*}
    REPLY=$data
}
check_key() { # what, value
    [[ -n $2 ]] || die "the $1 is empty"
    [[ $2 =~ ^[[:graph:]]+$ ]] || die "the $1 contains spaces or control characters; is it the right value or file?"
    (( ${#2} <= 4096 )) || die "the $1 is implausibly long (${#2} characters)"
}

if [[ -n $AUTH_KEY_FILE ]]; then read_key_file "$AUTH_KEY_FILE"; AUTH_KEY=$REPLY; fi
if [[ -n $API_KEY_FILE ]]; then read_key_file "$API_KEY_FILE"; API_KEY=$REPLY; fi
if [[ -z $AUTH_KEY && -z $AUTH_KEY_FILE && -n ${HEADCNI_AUTH_KEY:-} ]]; then AUTH_KEY=$HEADCNI_AUTH_KEY; fi
if [[ -z $API_KEY && -z $API_KEY_FILE && -n ${HEADCNI_API_KEY:-} ]]; then API_KEY=$HEADCNI_API_KEY; fi
if [[ -n $AUTH_KEY_FILE || -n $AUTH_KEY ]]; then check_key "pre-auth key" "$AUTH_KEY"; fi
if [[ -n $API_KEY_FILE || -n $API_KEY ]]; then check_key "API key" "$API_KEY"; fi
if $AUTH_FROM_ARGV || $API_FROM_ARGV; then
    note "note: a key given with -k/-a is visible in your shell history and the process list; -K FILE or -K - (stdin) avoids that"
fi

# ---------------------------------------------------------------- tools
HELM=${HELM:-helm}
KUBECTL=${KUBECTL:-kubectl}
command -v "$HELM" >/dev/null 2>&1 || fail "helm not found (set HELM=/path/to/helm)"
if ! $DRY_RUN; then
    command -v "$KUBECTL" >/dev/null 2>&1 || fail "kubectl not found (set KUBECTL=/path/to/kubectl)"
fi
HELM_CTX=() KUBECTL_CTX=()
if [[ -n $KUBE_CONTEXT ]]; then HELM_CTX=(--kube-context "$KUBE_CONTEXT"); KUBECTL_CTX=(--context "$KUBE_CONTEXT"); fi
kc() { "$KUBECTL" "${KUBECTL_CTX[@]+"${KUBECTL_CTX[@]}"}" "$@"; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/headcni-deploy.XXXXXXXX")
cleanup() { rm -rf -- "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# Keys as files in the private directory (printf is a shell builtin: no argv).
[[ -z $AUTH_KEY ]] || printf '%s' "$AUTH_KEY" >"$TMP/authKey"
[[ -z $API_KEY ]] || printf '%s' "$API_KEY" >"$TMP/apiKey"
unset AUTH_KEY API_KEY HEADCNI_AUTH_KEY HEADCNI_API_KEY

# ---------------------------------------------------------------- cluster side
SECRET_KEYS=()   # keys the Secret will hold
if ! $DRY_RUN; then
    kc get --raw /version >/dev/null 2>&1 ||
        fail "cannot reach the Kubernetes API with kubectl; check KUBECONFIG or --kube-context (or use --dry-run)"
    if ! kc get namespace "$NAMESPACE" >/dev/null 2>&1; then
        note "creating namespace $NAMESPACE (Pod Security level: privileged)"
        kc create namespace "$NAMESPACE" >/dev/null
        kc label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged \
            pod-security.kubernetes.io/warn=privileged pod-security.kubernetes.io/audit=privileged >/dev/null
    else
        enforce=$(kc get namespace "$NAMESPACE" -o 'jsonpath={.metadata.labels.pod-security\.kubernetes\.io/enforce}' 2>/dev/null || true)
        if [[ -n $enforce && $enforce != privileged ]]; then
            fail "namespace $NAMESPACE enforces Pod Security level '$enforce'; HeadCNI needs 'privileged' (host network, host paths, NET_ADMIN). Label it: kubectl label namespace $NAMESPACE --overwrite pod-security.kubernetes.io/enforce=privileged"
        fi
    fi

    existing_keys=""
    if kc -n "$NAMESPACE" get secret "$SECRET_NAME" >/dev/null 2>&1; then
        owner=$(kc -n "$NAMESPACE" get secret "$SECRET_NAME" -o 'jsonpath={.metadata.labels.app\.kubernetes\.io/managed-by}')
        [[ $owner == deploy-with-helm.sh ]] || fail "Secret $NAMESPACE/$SECRET_NAME exists and was not created by $PROG; choose another --secret-name"
        # Key names only; never the values.
        # shellcheck disable=SC2016 # a Go template, not shell
        existing_keys=$(kc -n "$NAMESPACE" get secret "$SECRET_NAME" -o 'go-template={{range $k, $v := .data}}{{$k}} {{end}}')
    fi
    # A key not given now is kept from the existing Secret (fetched into the private directory).
    for k in authKey apiKey; do
        if [[ ! -f $TMP/$k && " $existing_keys " == *" $k "* ]]; then
            kc -n "$NAMESPACE" get secret "$SECRET_NAME" -o "go-template={{index .data \"$k\"}}" >"$TMP/$k.b64"
        fi
    done
    for k in authKey apiKey; do
        if [[ -f $TMP/$k ]]; then
            base64 <"$TMP/$k" | tr -d '\n' >"$TMP/$k.b64"
        fi
        [[ ! -s $TMP/$k.b64 ]] || SECRET_KEYS+=("$k")
    done
    if [[ ${#SECRET_KEYS[@]} -gt 0 ]]; then
        {
            printf 'apiVersion: v1\nkind: Secret\ntype: Opaque\nmetadata:\n'
            printf '  name: %s\n  namespace: %s\n  labels:\n' "$SECRET_NAME" "$NAMESPACE"
            printf '    app.kubernetes.io/name: headcni\n    app.kubernetes.io/instance: %s\n' "$RELEASE"
            printf '    app.kubernetes.io/part-of: headcni\n    app.kubernetes.io/managed-by: deploy-with-helm.sh\n'
            printf 'data:\n'
            for k in "${SECRET_KEYS[@]}"; do
                printf '  %s: ' "$k"; cat "$TMP/$k.b64"; printf '\n'
            done
        } >"$TMP/secret.yaml"
        # create/replace rather than apply: apply would copy the data into an annotation.
        if [[ -n $existing_keys ]] || kc -n "$NAMESPACE" get secret "$SECRET_NAME" >/dev/null 2>&1; then
            kc replace -f "$TMP/secret.yaml" >/dev/null
            note "updated Secret $NAMESPACE/$SECRET_NAME (keys: ${SECRET_KEYS[*]})"
        else
            kc create -f "$TMP/secret.yaml" >/dev/null
            note "created Secret $NAMESPACE/$SECRET_NAME (keys: ${SECRET_KEYS[*]})"
        fi
    fi
else
    for k in authKey apiKey; do
        if [[ -f $TMP/$k ]]; then
            base64 <"$TMP/$k" | tr -d '\n' >"$TMP/$k.b64"
            SECRET_KEYS+=("$k")
        fi
    done
fi
# A digest of the keys for a pod annotation, so that changed keys roll the
# agents (they read the key files at start). Only the digest leaves this script.
KEYS_DIGEST=""
if [[ ${#SECRET_KEYS[@]} -gt 0 ]]; then
    KEYS_DIGEST=$(for k in "${SECRET_KEYS[@]}"; do printf '%s=' "$k"; cat "$TMP/$k.b64"; printf '\n'; done |
        sha256sum | cut -d' ' -f1)
fi
rm -f -- "$TMP"/authKey "$TMP"/apiKey "$TMP"/*.b64 "$TMP"/secret.yaml

has_key() { [[ " ${SECRET_KEYS[*]-} " == *" $1 "* ]]; }
if ! has_key authKey; then
    [[ $TS_MODE != sidecar ]] || die "sidecar mode needs a pre-auth key (-k or -K): the tailscaled in the pod must log in"
    note "note: no pre-auth key: every node's tailscaled must already be logged in to $URL"
fi

# ---------------------------------------------------------------- values
json_list() { # comma list -> ["a","b"]
    local out="" item
    local -a items
    IFS=',' read -r -a items <<<"$1"
    for item in "${items[@]}"; do
        item=${item// /}
        [[ -z $item ]] || out+="${out:+, }\"$item\""
    done
    printf '[%s]' "$out"
}
{
    printf '# Written by %s; holds no secret.\n' "$PROG"
    if [[ -n $KEYS_DIGEST ]]; then
        printf 'podAnnotations:\n  checksum/headscale-keys: "%s"\n' "$KEYS_DIGEST"
    fi
    printf 'config:\n  headscale:\n    url: "%s"\n' "$URL"
    if [[ ${#SECRET_KEYS[@]} -gt 0 ]]; then
        printf '    existingSecret: "%s"\n    existingSecretKeys:\n' "$SECRET_NAME"
        if has_key authKey; then printf '      authKey: authKey\n'; else printf '      authKey: ""\n'; fi
        if has_key apiKey; then printf '      apiKey: apiKey\n'; else printf '      apiKey: ""\n'; fi
    fi
    if [[ -n $TS_MODE || -n $TAGS ]]; then
        printf '  tailscale:\n'
        [[ -z $TS_MODE ]] || printf '    mode: %s\n' "$TS_MODE"
        [[ -z $TAGS ]] || printf '    tags: %s\n' "$(json_list "$TAGS")"
    fi
    if [[ -n $MTU || -n $CLUSTER_CIDR || -n $SERVICE_CIDR ]]; then
        printf '  network:\n'
        [[ -z $MTU ]] || { if [[ $MTU == auto ]]; then printf '    mtu: auto\n'; else printf '    mtu: %d\n' "$MTU"; fi; }
        [[ -z $CLUSTER_CIDR ]] || printf '    clusterCIDR: %s\n' "$(json_list "$CLUSTER_CIDR")"
        [[ -z $SERVICE_CIDR ]] || printf '    serviceCIDR: %s\n' "$(json_list "$SERVICE_CIDR")"
    fi
    if [[ -n $IPAM_TYPE || -n $STRATEGY ]]; then
        printf '  ipam:\n'
        [[ -z $IPAM_TYPE ]] || printf '    type: %s\n' "$IPAM_TYPE"
        [[ -z $STRATEGY ]] || printf '    strategy: %s\n' "$STRATEGY"
    fi
} >"$TMP/deploy-values.yaml"

HELM_ARGS=(--namespace "$NAMESPACE")
for f in "${VALUES_FILES[@]+"${VALUES_FILES[@]}"}"; do HELM_ARGS+=(-f "$f"); done
HELM_ARGS+=(-f "$TMP/deploy-values.yaml")
[[ -z $CHART_VERSION ]] || HELM_ARGS+=(--version "$CHART_VERSION")

if $DRY_RUN; then
    if [[ ${#SECRET_KEYS[@]} -gt 0 ]]; then
        printf '# Secret %s/%s (keys: %s) is created by %s at deploy time; not shown.\n' \
            "$NAMESPACE" "$SECRET_NAME" "${SECRET_KEYS[*]}" "$PROG"
    fi
    "$HELM" template "$RELEASE" "$CHART" "${HELM_ARGS[@]}" \
        "${EXTRA_HELM_ARGS[@]+"${EXTRA_HELM_ARGS[@]}"}"
    exit 0
fi

[[ -z $TIMEOUT ]] || HELM_ARGS+=(--timeout "$TIMEOUT")
! $WAIT || HELM_ARGS+=(--wait)
note "running helm upgrade --install $RELEASE in namespace $NAMESPACE"
"$HELM" "${HELM_CTX[@]+"${HELM_CTX[@]}"}" upgrade --install "$RELEASE" "$CHART" "${HELM_ARGS[@]}" \
    "${EXTRA_HELM_ARGS[@]+"${EXTRA_HELM_ARGS[@]}"}"
