#!/usr/bin/env bash
# The common cluster path in one place: start a cluster, copy datasets, submit a search, watch
# it through SSH tunnels (nothing on the cluster is opened to the internet), fetch results.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/cluster.sh [--config FILE] COMMAND [ARGS]

  token                    make the cluster's Ray token, ~/.ray/t2sda-auth/auth_token (outside
                           the repo), unless it exists; `up` copies it to every node
  up                       start or update the cluster (ray up): syncs this checkout, installs it
  sync-data DIR            copy a local dataset directory (gta5/, cityscapes/, ...) to the head's
                           data directory (T2SDA_DATA in the config; shared when it is EFS/NFS)
  submit [TUNE ARGS...]    run `python tune.py TUNE ARGS` on the head as a Ray job with this
                           checkout's code; streams its logs (Ctrl-C detaches, the job goes on).
                           The token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if set, else the file
                           `token` made (sent with RAY_AUTH_MODE=token unless you set it)
  dashboard                forward the Ray dashboard to http://127.0.0.1:8265 (Ctrl-C to stop);
                           the page asks for the token once (the token file's contents)
  tensorboard LOGDIR       run TensorBoard on the head, forwarded to http://127.0.0.1:6006
                           (LOGDIR: <storage>/<name>, e.g. s3://BUCKET/t2sda/pull_loss)
  fetch SRC [DEST]         copy results here: s3://... with `aws s3 sync`, a path on the head
                           with `ray rsync-down` (DEST defaults to ./cluster-results)
  down                     terminate the cluster (ray down)

--config FILE   a `ray up` config (default: cluster/gpu.yaml, or $T2SDA_CLUSTER)
T2SDA_DASHBOARD_PORT   the local port of the dashboard tunnel (default 8265)
Example:
  scripts/cluster.sh token
  scripts/cluster.sh up
  scripts/cluster.sh submit --space pull_loss --preset gta2cs_daformer \
      --storage s3://BUCKET/t2sda --workers-per-trial 1 --gpu
  scripts/cluster.sh tensorboard s3://BUCKET/t2sda/pull_loss
EOF
}

die() { echo "cluster.sh: error: $*" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"   # file_mounts in the configs and --working-dir are relative to the repo root

config="${T2SDA_CLUSTER:-cluster/gpu.yaml}"
if [ "${1:-}" = "--config" ]; then
    [ $# -ge 2 ] || die "--config needs a file"
    config="$2"
    shift 2
fi
command="${1:-}"
[ -n "$command" ] || { usage >&2; exit 2; }
shift
case "$command" in -h|--help|help) usage; exit 0 ;; esac

# Token authentication (docs/cluster.md#authentication): the configs run Ray with
# RAY_AUTH_MODE=token, and `ray up` copies this directory to every node (their file_mounts);
# for KubeRay, a Secret is made from the same file.
token_dir="$HOME/.ray/t2sda-auth"
token_file="$token_dir/auth_token"
no_token="no Ray token at $token_file: scripts/cluster.sh token makes one (docs/cluster.md#authentication)"
if [ "$command" = token ]; then
    [ $# -eq 0 ] || die "token takes no arguments"
    if [ -s "$token_file" ]; then
        echo "Ray token: $token_file (exists, kept)"
    else
        # 256 random bits in hex, as `ray get-auth-token --generate` makes them; only you can read it.
        (umask 077 && mkdir -p "$token_dir" && od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$token_file")
        echo "Ray token written to $token_file (scripts/cluster.sh up copies it to every node)"
    fi
    exit 0
fi

[ -f "$config" ] || die "no cluster config $config"
if grep -q '^kind: RayCluster' "$config"; then
    die "$config is a KubeRay manifest: kubectl apply -f $config (docs/cluster.md, 'Kubernetes')"
fi

# The ray CLI of the project's venv when there is one: its version is the one the configs pin.
ray_cli="ray"
if [ -x .venv/bin/ray ]; then ray_cli=".venv/bin/ray"; fi
command -v "$ray_cli" >/dev/null || die "the ray CLI is not installed (pip install 'ray[default]' boto3)"

dashboard_port="${T2SDA_DASHBOARD_PORT:-8265}"   # the local end of the tunnel

# Any HTTP answer will do: with token authentication most paths answer 401 without the token.
dashboard_up() { curl -s -o /dev/null "http://127.0.0.1:$dashboard_port/api/version"; }

# Whether the config is one of ours, with token authentication (a config of your own may not be).
token_auth() { grep -q '/home/ray/t2sda-auth' "$config"; }

# The token for the Jobs API (which reads RAY_AUTH_MODE and RAY_AUTH_TOKEN[_PATH] as Ray does):
# the caller's RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH when set, else the token file.
use_token() {
    token_auth || return 0
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        [ -s "$token_file" ] || die "$no_token"
        export RAY_AUTH_TOKEN_PATH="$token_file"
    fi
}

# One line, not Ray's traceback, when the dashboard refuses the token (the header goes through
# stdin: the token never shows in the process list).
check_token() {
    local token="" code
    if [ "${RAY_AUTH_MODE:-}" = token ]; then
        token="${RAY_AUTH_TOKEN:-}"
        [ -n "$token" ] || token="$(cat "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" 2>/dev/null)" || true
    fi
    code="$(printf 'Authorization: Bearer %s\n' "$token" | curl -s -o /dev/null -w '%{http_code}' -H @- \
        "http://127.0.0.1:$dashboard_port/api/version")" || true
    case "$code" in
        401|403) die "the cluster refused the Ray token (HTTP $code): set RAY_AUTH_MODE=token and" \
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the token it started with (default: $token_file)" ;;
    esac
}

# Opens the dashboard tunnel in the background unless one is already there; the tunnel dies with
# this script.
with_dashboard() {
    dashboard_up && return 0
    command -v curl >/dev/null || die "curl is needed to wait for the dashboard tunnel"
    "$ray_cli" dashboard --port "$dashboard_port" "$config" >/dev/null 2>&1 &
    tunnel=$!
    trap 'kill "$tunnel" 2>/dev/null || true' EXIT
    for _ in $(seq 60); do
        dashboard_up && return 0
        kill -0 "$tunnel" 2>/dev/null || die "could not open an SSH tunnel to the head; is the cluster up?"
        sleep 1
    done
    die "the dashboard did not answer on 127.0.0.1:$dashboard_port within 60 s"
}

case "$command" in
    up)
        ! token_auth || [ -s "$token_file" ] || die "$no_token"
        exec "$ray_cli" up -y "$config" "$@"
        ;;
    sync-data)
        [ $# -eq 1 ] || die "sync-data takes one directory (holding gta5/, cityscapes/, ...)"
        [ -d "$1" ] || die "sync-data: no directory $1"
        dest="$(sed -n 's/.*T2SDA_DATA=\([^ "]*\).*/\1/p' "$config" | head -n 1)"
        [ -n "$dest" ] || die "$config sets no T2SDA_DATA (docker run_options); copy the data yourself"
        exec "$ray_cli" rsync-up "$config" "${1%/}/" "$dest/"
        ;;
    submit)
        [ -f tune.py ] || die "no tune.py in $root"
        use_token
        with_dashboard
        check_token
        "$ray_cli" job submit --address "http://127.0.0.1:$dashboard_port" --working-dir . \
            -- python tune.py "$@"
        ;;
    dashboard)
        echo "Ray dashboard: http://127.0.0.1:$dashboard_port  (Ctrl-C to stop)"
        exec "$ray_cli" dashboard --port "$dashboard_port" "$config"
        ;;
    tensorboard)
        [ $# -eq 1 ] || die "tensorboard takes one LOGDIR (<storage>/<name>)"
        echo "TensorBoard: http://127.0.0.1:6006  (Ctrl-C to stop)"
        # Bound to the head's loopback: only the SSH tunnel reaches it.
        exec "$ray_cli" exec "$config" --port-forward 6006 \
            "tensorboard --logdir '$1' --host 127.0.0.1 --port 6006"
        ;;
    fetch)
        [ $# -ge 1 ] && [ $# -le 2 ] || die "fetch takes SRC [DEST]"
        dest="${2:-cluster-results}"
        case "$1" in
            s3://*)
                command -v aws >/dev/null || die "fetching from S3 needs the aws CLI"
                exec aws s3 sync "$1" "$dest"
                ;;
            *://*) die "fetch: only s3:// URIs and paths on the head are supported, not $1" ;;
            *) mkdir -p "$dest" && exec "$ray_cli" rsync-down "$config" "${1%/}/" "$dest/" ;;
        esac
        ;;
    down)
        exec "$ray_cli" down -y "$config" "$@"
        ;;
    *)
        die "unknown command '$command' (token, up, sync-data, submit, dashboard, tensorboard, fetch, down)"
        ;;
esac
