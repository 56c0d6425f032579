#!/usr/bin/env bash
# Run SmartFed on Flower's *deployment* engine, entirely on this machine (loopback only).
#
# Usage:
#   scripts/deploy_local.sh [N_SUPERNODES] [-- RUN_CONFIG_OVERRIDE ...]
#
#   N_SUPERNODES   number of SuperNodes (= num-clients; default $SMARTFED_SUPERNODES or 2).
#   overrides      `flwr run --run-config` strings, TOML values (strings need quotes), e.g.
#                  scripts/deploy_local.sh 2 -- 'num-rounds=2 sample-clients=2' \
#                      'model-name-or-path="/abs/model" lora-pool="/abs/a,/abs/b" energy="none"'
#                  num-clients is always set to N_SUPERNODES. Relative paths (output-dir,
#                  model, adapters) resolve against the repository root.
#
# Environment (all optional):
#   SMARTFED_SUPERNODES        N_SUPERNODES when no positional argument is given (default 2).
#   SMARTFED_RUN_CONFIG        one more override string, applied before the arguments.
#   SMARTFED_DEPLOY_TIMEOUT    seconds to wait for the run to finish (default 3600).
#   SMARTFED_STARTUP_TIMEOUT   seconds for the SuperLink to listen and SuperNodes to connect (default 120).
#   SMARTFED_DEPLOY_LOGS       log folder (default: a new ${TMPDIR:-/tmp}/smartfed-deploy.XXXXXX).
#   SMARTFED_VENV              virtualenv whose bin/ provides flwr (default: <repo>/.venv if present).
#   SMARTFED_DEPLOY_TAG        tag exported to every process started here (default: random);
#                              used to find and stop all of them, orphans included.
#
# What it does: private FLWR_HOME (temp dir, removed at exit) with a `smartfed-local`
# SuperLink connection; `flower-superlink --insecure` on 127.0.0.1:<free port>; N
# `flower-supernode --insecure` with `--node-config "partition-id=i num-partitions=N"`,
# each with its own Runtime API port; `flwr run . smartfed-local --stream`; waits for the
# run (bounded), checks its final status with `flwr ls`, then stops every process it
# started. Exit status: 0 iff the run finished as `finished:completed`.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONNECTION="smartfed-local"

usage() { sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

N="${SMARTFED_SUPERNODES:-2}"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    case "$1" in
        -h|--help) usage; exit 0 ;;
    esac
    N="$1"
    shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "deploy_local.sh: N_SUPERNODES must be a positive integer, got '$N'" >&2
    exit 2
fi
OVERRIDES=()
if [[ -n "${SMARTFED_RUN_CONFIG:-}" ]]; then OVERRIDES+=("$SMARTFED_RUN_CONFIG"); fi
OVERRIDES+=("$@")

RUN_TIMEOUT="${SMARTFED_DEPLOY_TIMEOUT:-3600}"
STARTUP_TIMEOUT="${SMARTFED_STARTUP_TIMEOUT:-120}"

VENV="${SMARTFED_VENV:-$REPO/.venv}"
if [[ -x "$VENV/bin/flower-superlink" ]]; then
    # SuperLink/SuperNode start flower-superexec, flwr-serverapp, flwr-clientapp from PATH.
    export PATH="$VENV/bin:$PATH"
fi
PY="$(command -v python || command -v python3 || true)"
if [[ -z "$PY" ]]; then echo "deploy_local.sh: no python on PATH" >&2; exit 2; fi
for tool in flower-superlink flower-supernode flwr setsid timeout; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "deploy_local.sh: '$tool' not found on PATH (install flwr, or set SMARTFED_VENV)" >&2
        exit 2
    fi
done

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export PYTHONUNBUFFERED=1
SMARTFED_DEPLOY_TAG="${SMARTFED_DEPLOY_TAG:-smartfed-deploy-$$-$RANDOM$RANDOM}"
export SMARTFED_DEPLOY_TAG

FLWR_HOME="$(mktemp -d "${TMPDIR:-/tmp}/smartfed-flwr-home.XXXXXX")"
export FLWR_HOME
if [[ -n "${SMARTFED_DEPLOY_LOGS:-}" ]]; then
    LOGS="$SMARTFED_DEPLOY_LOGS"
    mkdir -p "$LOGS"
else
    LOGS="$(mktemp -d "${TMPDIR:-/tmp}/smartfed-deploy.XXXXXX")"
fi
LOGS="$(cd "$LOGS" && pwd)"

PIDS=()  # process-group leaders started here (each via setsid)

log() { printf '[deploy_local %(%H:%M:%S)T] %s\n' -1 "$*"; }

# PIDs of live processes whose environment carries our tag (catches detached children,
# e.g. the SuperExec that flower-superlink starts in its own session).
tagged_pids() {
    local f pid stat
    # grep runs without the tag; the subshell bash may fork for it (our child) is skipped
    for f in $(env -u SMARTFED_DEPLOY_TAG grep -lzxF "SMARTFED_DEPLOY_TAG=$SMARTFED_DEPLOY_TAG" \
            /proc/[0-9]*/environ 2>/dev/null); do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        { stat="$(<"/proc/$pid/stat")"; } 2>/dev/null || continue
        stat="${stat##*) }"; stat="${stat#* }"  # fields after "pid (comm) state"
        [[ "${stat%% *}" == "$BASHPID" ]] || echo "$pid"
    done
}

signal_all() {  # signal_all SIG: our process groups, then every tagged process
    local sig="$1" pid
    for pid in "${PIDS[@]}"; do kill "-$sig" -- "-$pid" 2>/dev/null || true; done
    for pid in $(tagged_pids); do kill "-$sig" "$pid" 2>/dev/null || true; done
}

CLEANED=0
cleanup() {
    local rc=$?
    [[ $CLEANED == 1 ]] && return
    CLEANED=1
    trap - EXIT INT TERM
    set +e
    log "stopping SuperLink, SuperNodes and their children"
    signal_all TERM
    local deadline=$((SECONDS + 15))
    while [[ -n "$(tagged_pids)" && $SECONDS -lt $deadline ]]; do sleep 0.5; done
    if [[ -n "$(tagged_pids)" ]]; then
        log "some processes ignored SIGTERM; sending SIGKILL"
        signal_all KILL
        deadline=$((SECONDS + 10))
        while [[ -n "$(tagged_pids)" && $SECONDS -lt $deadline ]]; do sleep 0.2; done
    fi
    [[ -z "$(tagged_pids)" ]] && wait 2>/dev/null  # reap our children (all dead by now)
    local left
    left="$(tagged_pids)"
    if [[ -n "$left" ]]; then
        log "WARNING: processes still alive: ${left//$'\n'/ }"
        ps -o pid,ppid,stat,args -p "${left//$'\n'/,}" >&2 || true
        [[ $rc == 0 ]] && rc=1
    fi
    rm -rf "$FLWR_HOME"
    log "logs: $LOGS"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# N+1 distinct free loopback ports (sockets held open together, then released).
read -r -a PORTS <<<"$("$PY" - "$((N + 1))" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
)"
LINK_PORT="${PORTS[0]}"

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

log "logs: $LOGS"
log "FLWR_HOME: $FLWR_HOME"

cd "$REPO"  # relative paths in the run config resolve here (the ServerApp/ClientApp cwd)

log "starting flower-superlink on 127.0.0.1:$LINK_PORT"
setsid flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" \
    --disable-runtime-dependency-installation \
    >"$LOGS/superlink.log" 2>&1 </dev/null &
LINK_PID=$!
PIDS+=("$LINK_PID")

deadline=$((SECONDS + STARTUP_TIMEOUT))
until "$PY" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
        "$LINK_PORT" 2>/dev/null; do
    if ! kill -0 "$LINK_PID" 2>/dev/null; then
        log "flower-superlink exited early; see $LOGS/superlink.log"
        tail -n 20 "$LOGS/superlink.log" >&2 || true
        exit 1
    fi
    if [[ $SECONDS -ge $deadline ]]; then
        log "flower-superlink did not listen within ${STARTUP_TIMEOUT}s"
        exit 1
    fi
    sleep 0.5
done

for ((i = 0; i < N; i++)); do
    port="${PORTS[$((i + 1))]}"
    log "starting flower-supernode $i (partition-id=$i num-partitions=$N, runtime API 127.0.0.1:$port)"
    setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" \
        --host 127.0.0.1 --port "$port" --max-wait-time "$STARTUP_TIMEOUT" \
        --node-config "partition-id=$i num-partitions=$N" \
        >"$LOGS/supernode-$i.log" 2>&1 </dev/null &
    PIDS+=("$!")
done

RUN_ARGS=(run . "$CONNECTION" --stream)
for o in "${OVERRIDES[@]}"; do RUN_ARGS+=(--run-config "$o"); done
RUN_ARGS+=(--run-config "num-clients=$N")  # last: wins over any other num-clients

log "flwr ${RUN_ARGS[*]}"
START=$SECONDS
setsid timeout --kill-after=10 "$RUN_TIMEOUT" flwr "${RUN_ARGS[@]}" >"$LOGS/flwr-run.log" 2>&1 </dev/null &
RUN_PID=$!
PIDS+=("$RUN_PID")
tail -n +1 -F --pid="$RUN_PID" "$LOGS/flwr-run.log" 2>/dev/null &
TAIL_PID=$!
stream_rc=0
wait "$RUN_PID" || stream_rc=$?
wait "$TAIL_PID" 2>/dev/null || true

RUN_ID="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$LOGS/flwr-run.log" | head -n 1)"
if [[ -z "$RUN_ID" ]]; then
    log "flwr run did not start a run (exit $stream_rc); see $LOGS/flwr-run.log"
    exit 1
fi

run_status() {
    timeout 120 flwr ls "$CONNECTION" --run-id "$RUN_ID" --format json 2>/dev/null | "$PY" -c '
import json, sys
try:
    runs = json.load(sys.stdin)["runs"]
    print(runs[0]["status"] if runs else "unknown")
except Exception:
    print("unknown")'
}

# The stream ends with the run; poll in case it ended early (bounded by the same timeout).
STATUS="$(run_status)"
while [[ "$STATUS" != finished* ]]; do
    if ((SECONDS - START >= RUN_TIMEOUT)); then
        log "run $RUN_ID still '$STATUS' after ${RUN_TIMEOUT}s; giving up"
        timeout 60 flwr stop "$RUN_ID" "$CONNECTION" >/dev/null 2>&1 || true
        exit 1
    fi
    sleep 2
    STATUS="$(run_status)"
done

log "run $RUN_ID: $STATUS after $((SECONDS - START))s"
if [[ "$STATUS" != "finished:completed" ]]; then
    exit 1
fi
