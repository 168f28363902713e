#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (issue 5, item 3), sized for one 10-minute command (BENCH_SECONDS plus
# TEST_SECONDS, 570 s by default): it records the card, times the training step on the GPU shapes against
# jax.experimental.rnn and PyTorch's cuDNN LSTM (with its fused Adam), then checks the recurrences' numerics on the
# GPU with whatever time is left. From the repository root:
#
#     OUT=some/folder bash benchmarks/gpu_check.sh
#
# Everything lands in $OUT (default ./gpu_out): card.txt, bench.log, bench.json (rewritten after every shape, so a
# run cut short keeps the shapes it finished; it holds every step's time, the rounds' medians, the 8192³ matmul
# ceiling's setup, each system's Adam, versions and thread counts) and tests.log. A step that fails does not stop
# the next one.
#
# The machine needs jax with CUDA, flax, optax and, for the PyTorch rows, torch with CUDA. datasets and tokenizers
# are needed only for SST2=path/to/sst2, which adds one SST-2 epoch through the real data pipeline.
# Other knobs: PYTHON (default python3), SHAPES (space-separated B,T,E,H), TESTS (pytest arguments),
# BENCH_SECONDS and TEST_SECONDS (each step's time limit), COMMIT (recorded where the copy has no .git).
set -u
out=${OUT:-gpu_out}
python=${PYTHON:-python3}
shapes=${SHAPES:-"64,128,128,256 256,256,256,512 16,512,128,256 128,64,300,1024 128,64,300,512"}
tests=${TESTS:-"tests/test_cells.py tests/test_recurrence.py tests/test_fused.py tests/test_regularisers.py"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$python" - <<'EOF'
import importlib

for name in ("jax", "jaxlib", "flax", "optax", "torch", "datasets", "tokenizers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "missing")
import jax

print("devices", jax.devices())
EOF
} > "$out/card.txt" 2>&1
cat "$out/card.txt"

shape_flags=()
for shape in $shapes; do shape_flags+=(--shape "$shape"); done
timeout "${BENCH_SECONDS:-420}" "$python" -m benchmarks.train_step --json "$out/bench.json" "${shape_flags[@]}" \
  ${SST2:+--sst2 "$SST2"} > "$out/bench.log" 2>&1
echo "benchmark exit status $?" | tee -a "$out/bench.log"

# Tests compare with float64 references: full float32 matmuls, not TF32. Workers share the GPU, so no preallocation.
# shellcheck disable=SC2086
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_SECONDS:-150}" \
  "$python" -m pytest -q -p no:cacheprovider -n 4 --maxfail 10 $tests > "$out/tests.log" 2>&1
echo "tests exit status $?" | tee -a "$out/tests.log"
tail -n 5 "$out/tests.log"
