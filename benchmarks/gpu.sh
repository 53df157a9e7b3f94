#!/usr/bin/env bash
# The GPU checks of the Scale issues, as ONE call on one accelerator (≤ 8 min on an H200):
#   1. peer_train_step.py --config 1b --batch-size 8 (ours scanned + block remat, bf16, vs transformers + PEFT);
#   2. preset_step.py: the LLaVA-1.5-7B preset's SparseLoRA + KL step from random init (time, MFU, peak memory);
#   3. sparsevlm plan for the same step (compile time, XLA's per-device figures);
#   4. peer_prune.py --config 1b: whole-model Wanda and SparseGPT at 50% and 2:4 against the PyTorch reference
#      loops, then DSnoT and ECoFLaP (ours alone) at 50%;
#   5. prune_scale.py: the LLaVA-1.5-7B preset's language tower pruned block by block from random host
#      weights (Wanda and SparseGPT, 50%): time per phase and the device allocator's peak;
#   6. sparse_speedup.py --config 1b: 2:4 semi-structured vs dense matmuls and LM prefill (issue 22).
# The step limits add up to 480 s.
# JSON goes under $OUT (the device tool's output folder) or results/gpu/; nothing is committed by this script:
# copy the files into benchmarks/measured/ with the date and device. SMALL=1 runs tiny configs (a CPU try-out).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
OUT_DIR="${OUT:-results/gpu}"
mkdir -p "$OUT_DIR"
if [ "${SMALL:-0}" = 1 ]; then
  TINY=$(mktemp -d)  # the tiny config stays out of $OUT (the device tool brings back 8 files)
  CFG=quick BATCH=2 REPEATS=2 PRESET_ARGS=(--model "$TINY" --batch-size 2 --seq-len 40 --repeats 2)
  SCALE_ARGS=(--model "$TINY" --quick)
  python - "$TINY" <<'PY'
import json, pathlib, sys
from sparsevlm.config import VLMConfig
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
(d / "config.json").write_text(json.dumps(VLMConfig().to_dict()))
PY
else
  CFG=1b BATCH=8 REPEATS=8 PRESET_ARGS=(--model llava-1.5-7b --batch-size 8 --seq-len 624 --repeats 5)
  SCALE_ARGS=(--model llava-1.5-7b)
fi
status=0
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  local started=$SECONDS
  # One log for all steps: the device tool brings back at most 8 files (this log + the seven JSON files).
  timeout "$limit" "$@" > "$LOG.part" 2>&1
  local rc=$?
  cat "$LOG.part" >> "$LOG"; tail -n 25 "$LOG.part"; rm -f "$LOG.part"
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
  [ $rc = 0 ] || status=1
}
LOG="$OUT_DIR/gpu.log"
: > "$LOG"
python -c "import jax; print(jax.devices())" | tee -a "$LOG"
run peer_train_step 110 python benchmarks/peer_train_step.py --config $CFG --batch-size $BATCH --repeats $REPEATS \
  --dtype bfloat16 --scan-layers --remat block --json "$OUT_DIR/peer_train_step.json"
run preset_step 70 python benchmarks/preset_step.py "${PRESET_ARGS[@]}" --json "$OUT_DIR/preset_step.json"
run plan 30 python -m sparsevlm.cli plan "${PRESET_ARGS[@]:0:2}" --method sparselora --batch-size $BATCH --bf16 \
  --scan-layers --remat block --json "$OUT_DIR/plan.json"
run peer_prune 90 python benchmarks/peer_prune.py --config $CFG --methods wanda sparsegpt --repeats 1 \
  --json "$OUT_DIR/peer_prune.json"
run peer_prune_ours 60 python benchmarks/peer_prune.py --config $CFG --methods dsnot ecoflap-first ecoflap-zeroth \
  --patterns unstructured --scopes model --repeats 1 --json "$OUT_DIR/peer_prune_ours.json"
run prune_scale 70 python benchmarks/prune_scale.py "${SCALE_ARGS[@]}" --patterns unstructured \
  --json "$OUT_DIR/prune_scale.json"
run sparse_speedup 50 python benchmarks/sparse_speedup.py --config $CFG --repeats $((REPEATS * 2)) --e2e-layers 8 \
  --json "$OUT_DIR/sparse_speedup.json"
exit $status
