#!/usr/bin/env bash
# The main job on the embedded default: synthetic scroll fragments -> train -> post-processing chosen on
# the validation fragment(s) -> evaluate on the test fragments -> NIfTI export.
# Usage: bash scripts/demo.sh [key=value overrides for configs/demo.yaml]
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
CONFIG=configs/demo.yaml
RUN="$(python - "$CONFIG" "$@" <<'PY'
import sys
from vesuvius_monai.config import load_config
from vesuvius_monai.errors import VesuviusError
try:
    print(load_config(sys.argv[1], sys.argv[2:]).output_dir)
except VesuviusError as err:
    sys.exit(f"error: {err}")
PY
)"
if [[ -e "$RUN/checkpoints/last.pt" ]]; then
  echo "error: $RUN already holds a run; move it away or pass output_dir=<new folder>" >&2
  exit 2
fi
START=$(date +%s)
vesuvius-monai synth --config "$CONFIG" "$@"
vesuvius-monai train --config "$CONFIG" "$@"
vesuvius-monai tune-postprocess --config "$CONFIG" --checkpoint "$RUN/checkpoints/best.pt" "$@"
vesuvius-monai evaluate --config "$CONFIG" --checkpoint "$RUN/checkpoints/best.pt" "$@"
python - "$RUN/eval/metrics.json" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\nmean Dice on {m['n_fragments']} held-out fragments: {m['mean_dice']:.4f}")
for key in ("surface_dice", "voi_score", "topo_score", "leaderboard"):
    if key in m["mean"]:
        print(f"  {key}: {m['mean'][key]:.4f}")
print(f"metrics: {sys.argv[1]}   (demo took {sys.argv[2]} s)")
PY
