#!/usr/bin/env bash
# The `small` quality report: generate data, train `small` with Ray Train in a stated budget, then
# closed-loop success on the held-out splits next to the scripted expert on the same seeds.
#
#   bash benchmarks/quality_small.sh                     # defaults below, in ./.mobile_vla/quality
#   EPISODES=200 EPOCHS=4 EVAL_EPISODES=50 bash benchmarks/quality_small.sh      # a quicker, weaker run
#   TRAIN_ARGS="optim.lr=2e-4" bash benchmarks/quality_small.sh      # extra train overrides
#
# CPU time is read from /proc/stat around each stage (whole machine, all cores): run it on an
# otherwise idle box. Writes benchmarks/results/quality_small.json (stage times, CPU seconds, the
# run's validation metrics) beside closed_loop_small.json (the closed-loop benchmark's output).
set -euo pipefail
cd "$(dirname "$0")/.."

EPISODES=${EPISODES:-400}
EPOCHS=${EPOCHS:-8}
WORKERS=${WORKERS:-2}
# half a logical CPU per worker: 2 workers share the 2 cores and leave CPU slots to the Ray Data
# pipeline (the preflight refuses workers that take every CPU of the cluster)
WORKER_CPUS=${WORKER_CPUS:-0.5}
EVAL_EPISODES=${EVAL_EPISODES:-150}
HOME_DIR=${QUALITY_HOME:-$PWD/.mobile_vla/quality}
PY=.venv/bin/python
export MOBILE_VLA_HOME=$HOME_DIR MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
unset MLFLOW_TRACKING_URI RAY_ADDRESS
mkdir -p "$HOME_DIR" benchmarks/results
DATA=$HOME_DIR/data
RUN=quality-small-$(date +%Y%m%d-%H%M%S)

cpu_seconds() {  # busy jiffies of the whole machine / clock ticks
  awk -v hz="$(getconf CLK_TCK)" '/^cpu /{print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat
}
stage() {  # stage NAME COMMAND...: wall and CPU seconds into $HOME_DIR/stages
  local name=$1; shift
  local c0 w0; c0=$(cpu_seconds); w0=$(date +%s.%N)
  "$@"
  echo "$name $(echo "$(date +%s.%N) - $w0" | bc) $(echo "$(cpu_seconds) - $c0" | bc)" >> "$HOME_DIR/stages"
}
[ -f "$DATA/manifest.json" ] || rm -f "$HOME_DIR/stages"   # a rerun on the same data keeps the generate line

[ -f "$DATA/manifest.json" ] || stage generate $PY -m mobile_vla.cli data generate --out "$DATA" --episodes "$EPISODES"
stage train $PY -m mobile_vla.cli train --config jobs/configs/small.yaml data.path="$DATA" run.name="$RUN" \
  train.epochs="$EPOCHS" scaling.num_workers="$WORKERS" scaling.resources_per_worker.CPU="$WORKER_CPUS" ${TRAIN_ARGS:-}
stage closed_loop $PY benchmarks/closed_loop.py --model "models:/mobile-vla-policy@challenger" --data "$DATA" \
  --splits unseen_layout unseen_pair unseen_paraphrase --episodes "$EVAL_EPISODES" \
  --out benchmarks/results/closed_loop_small.json

$PY - "$HOME_DIR/stages" "$RUN" "$EPISODES" "$EPOCHS" "$WORKERS" <<'EOF'
import json, os, sys
import mlflow
from mobile_vla.tracking import get_version_by_alias
stages_file, run_name, episodes, epochs, workers = sys.argv[1:6]
stages = {}
for line in open(stages_file):
    name, wall, cpu = line.split()
    stages[name] = {"wall_s": round(float(wall), 1), "cpu_s": round(float(cpu), 1)}
version = get_version_by_alias("mobile-vla-policy", "challenger")
client = mlflow.MlflowClient()
mv = client.get_model_version("mobile-vla-policy", version)
run = client.get_run(mv.run_id)
val = {k: round(v, 4) for k, v in run.data.metrics.items() if k.startswith("val_") or k.startswith("best_")}
report = {"benchmark": "quality_small", "machine": f"{os.cpu_count()}-core CPU box", "run_name": run_name,
          "episodes": int(episodes), "epochs": int(epochs), "train_workers": int(workers),
          "model_version": version, "stages": stages, "validation": val,
          "closed_loop": "benchmarks/results/closed_loop_small.json"}
open("benchmarks/results/quality_small.json", "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
