#!/usr/bin/env bash
# Training tokens/s and MFU of a DeepSeek-V2-Lite-shaped model on one GPU (written for an
# H100/H200; MFU against the bf16 dense peak from jaxmoe/train/metrics.py's table).
#
#   bash bench/gpu_train.sh                      # 6 of V2-Lite's 27 layers, batch 4 x 2048
#   LAYERS=8 BATCH=8 SEQ=4096 bash bench/gpu_train.sh --out BENCHMARKS.md
#
# V2-Lite's own widths (D 2048, 16 heads, 64 routed + 2 shared experts of 1408, 6 active,
# vocab 102400); the layer count is cut so float32 master weights + AdamW moments fit one
# device (the full 15.7B model needs ~250 GB: shard it with a mesh preset instead). bf16
# compute, each layer rematerialised, the trainer's exact step (bench/bench_train.py).
# Needs jax with CUDA in the environment (pip install -e ".[gpu]" on a machine with internet).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" - <<'PYEOF'
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"no GPU visible to jax (backend {jax.default_backend()}): install jax[cuda12]")
print("devices:", jax.devices())
PYEOF
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$PY" bench/bench_train.py --preset deepseek_v2_lite --layers "${LAYERS:-6}" \
  --batch "${BATCH:-4}" --seq "${SEQ:-2048}" --dtype bfloat16 --remat --repeats "${REPEATS:-10}" "$@"
