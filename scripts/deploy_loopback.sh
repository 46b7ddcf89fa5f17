#!/usr/bin/env bash
# The Flower Deployment Engine on this machine: one SuperLink, N SuperNodes (site i holds partition i of N
# of the corpus), then `flwr run` of this repository; every process started here is stopped by PID.
#
#   scripts/deploy_loopback.sh NUM_SITES 'HYDRA OVERRIDES' [OUT_DIR]
#   scripts/deploy_loopback.sh 2 'protocol=stats_sync pruner=wanda federation.num_clients=2' outputs/loop
#
# Results: OUT_DIR/metrics.json (default outputs/deployment). Logs: $WORK/logs (printed at the end).
# Set FEDPRUNE_DEPLOY_PORT for the SuperLink port (default 9190; SuperNodes use the next N ports + 4).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NUM_SITES=${1:?number of sites}
OVERRIDES=${2:?Hydra overrides, e.g. "protocol=stats_sync federation.num_clients=2"}
OUT_DIR=$(realpath -m "${3:-$ROOT/outputs/deployment}")
PORT=${FEDPRUNE_DEPLOY_PORT:-9190}
case "$OVERRIDES$OUT_DIR" in *'"'*) echo 'no double quotes in the overrides or OUT_DIR (use single quotes)' >&2; exit 2;; esac

[ -x "$ROOT/.venv/bin/flwr" ] && PATH="$ROOT/.venv/bin:$PATH"
WORK=$(mktemp -d /tmp/fedprune-deploy.XXXXXX)
export FLWR_HOME=$WORK/flwr_home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never `uv sync`, never download
mkdir -p "$FLWR_HOME" "$WORK/logs"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
TOML

PIDS=()
stop_all() {  # each launcher leads its own process group (setsid): stop the group, then make sure
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0; for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  echo "stopped process groups ${PIDS[*]}; logs in $WORK/logs"
}
trap stop_all EXIT

setsid flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 \
  --port "$PORT" > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 0.2; done
for ((i = 0; i < NUM_SITES; i++)); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 4 + i)) \
    --node-config "partition-id=$i num-partitions=$NUM_SITES" > "$WORK/logs/supernode$i.log" 2>&1 &
  PIDS+=($!)
done
touch "$WORK/started"
flwr run "$ROOT" loopback --stream --run-config "overrides=\"$OVERRIDES\" out-dir=\"$OUT_DIR\""
RC=$?
# flwr 1.42 exits 0 even when the ServerApp raised: a fresh metrics.json is the sign of success
if [ "$OUT_DIR/metrics.json" -nt "$WORK/started" ]; then
  echo "results: $OUT_DIR/metrics.json"
else
  echo "no new $OUT_DIR/metrics.json: the run failed (see the log above)" >&2
  RC=1
fi
exit $RC
