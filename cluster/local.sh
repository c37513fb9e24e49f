#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1, for tests and demos: a head and N worker nodes, token
# authentication on, the dashboard (and the job API) on 127.0.0.1 only, its own ports, a short temp dir.
#
#   cluster/local.sh up [N]   start a head and N workers (default 1) and print the client environment
#   cluster/local.sh status   `ray status` of the cluster
#   cluster/local.sh env      the exports that point `ray job submit`, `ray status` and ray.init() at it
#   cluster/local.sh down     stop every process of the cluster (and only those) and remove its directory
#
# Then, from the repository root:
#   eval "$(cluster/local.sh env)"
#   ray job submit --working-dir . -- python -m pipelines.backfill --config pipelines/sample_data/backfill.yaml
#
# Settings (environment):
#   VLM_EMBED_CLUSTER_DIR   state, logs, token and Ray temp dirs (default /tmp/vlmc; keep it short: socket paths)
#   VLM_EMBED_CLUSTER_PORT  the GCS port (default 6390); the dashboard is PORT+1, the client server PORT+2,
#                           node i uses PORT+10+10i.. and worker ports PORT+20000+200i..+199
#   VLM_EMBED_CLUSTER_CPUS  CPUs each node offers (default 2)
#   VLM_EMBED_CLUSTER_PIN   1: node i (the head is 0) runs on CPU core i mod the core count (taskset), so that
#                           nodes on one machine do not share cores (the scale benchmark's 1 vs 2 nodes)
#   RAY                     the ray executable (default: ray on PATH; jobs run the `python` on PATH)
set -euo pipefail

DIR=${VLM_EMBED_CLUSTER_DIR:-/tmp/vlmc}
PORT=${VLM_EMBED_CLUSTER_PORT:-6390}
CPUS=${VLM_EMBED_CLUSTER_CPUS:-2}
PIN=${VLM_EMBED_CLUSTER_PIN:-0}
RAY=${RAY:-ray}
GCS=$PORT
DASHBOARD=$((PORT + 1))
CLIENT=$((PORT + 2))
TOKEN="$DIR/auth_token"

export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"

say() { echo "local.sh: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ports() { # the per-node ports of node $1 (0: the head)
    local base=$((PORT + 10 + 10 * $1)) workers=$((PORT + 20000 + 200 * $1))
    echo "--node-manager-port=$base --object-manager-port=$((base + 1))" \
        "--dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))" \
        "--runtime-env-agent-port=$((base + 4)) --metrics-export-port=$((base + 5))" \
        "--min-worker-port=$workers --max-worker-port=$((workers + 199))"
}

start_node() { # name, node index, then ray start arguments; runs `ray start --block` in its own process group
    local name=$1 pin=()
    [ "$PIN" = 1 ] && pin=(taskset -c "$(($2 % $(nproc)))")
    shift 2
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$DIR/$name.pid" \
        "${pin[@]}" "$RAY" start --block --node-ip-address=127.0.0.1 --num-cpus="$CPUS" --disable-usage-stats "$@" \
        >"$DIR/$name.log" 2>&1 </dev/null &
}

nodes_up() { # succeeds when the GCS reports at least $1 nodes alive
    local n
    n=$("$RAY" status --address "127.0.0.1:$GCS" 2>/dev/null |
        awk '/^Active:/{a=1; next} /^Pending:/{a=0} a && /node_/{n++} END{print n+0}')
    [ "$n" -ge "$1" ]
}

wait_for() { # seconds, description, then a command that succeeds when ready
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then
            say "timed out waiting for $what (logs in $DIR)"
            return 1
        fi
        sleep 1
    done
}

print_env() {
    echo "export RAY_ADDRESS=127.0.0.1:$GCS"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$TOKEN"
}

dashboard_ready() {
    curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$TOKEN")" "http://127.0.0.1:$DASHBOARD/api/version"
}

up() {
    local workers=${1:-1}
    if alive "$DIR/head.pid"; then
        say "already up (head pid $(cat "$DIR/head.pid")); run: $0 down"
        return 1
    fi
    mkdir -p "$DIR"
    if [ ! -s "$TOKEN" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TOKEN")
    fi
    # shellcheck disable=SC2046  # node_ports is a list of flags
    start_node head 0 --head --port="$GCS" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD" \
        --ray-client-server-port="$CLIENT" --include-dashboard=true --temp-dir="$DIR/h" $(node_ports 0)
    wait_for 300 "the head node" nodes_up 1
    for i in $(seq 1 "$workers"); do
        # shellcheck disable=SC2046
        start_node "worker$i" "$i" --address="127.0.0.1:$GCS" $(node_ports "$i")
    done
    wait_for 300 "$workers worker node(s)" nodes_up $((workers + 1))
    wait_for 120 "the dashboard" dashboard_ready
    say "up: head + $workers worker(s) on 127.0.0.1, dashboard http://127.0.0.1:$DASHBOARD (token auth)"
    print_env
}

down() { # every node at once: TERM, wait up to 5 s for all of them, then KILL what is left
    local pidfile pid alive pids=()
    for pidfile in "$DIR"/worker*.pid "$DIR"/head.pid; do
        [ -f "$pidfile" ] && pids+=("$(cat "$pidfile")")
    done
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 10); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
    say "down"
}

case "${1:-}" in
up) up "${2:-1}" ;;
down) down ;;
status) "$RAY" status --address "127.0.0.1:$GCS" ;;
env) print_env ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
