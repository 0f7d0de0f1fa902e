#!/usr/bin/env bash
# One prepared GPU check: card and versions, install, the test suite, the benchmarks, the report.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; OUT must be set)
#
# Made for a lent H200 (16 cores, torch 2.11 + triton 3.6.0 on the box's python3, no network):
# every stage has its own timeout and the next stage runs whatever happened, so the whole fits
# in about 11 minutes (60 + 150 + 150 + 310 + 30 s of limits, plus the kill grace): run it with
# timeout_s 600 and at least 13 minutes of device time left. Files left in $OUT (8 at most come
# back): info.txt, install.log, tests.log, bench.log, bench.json, report.md, chart.png.
# Without .git on the box the commit is unknown: pass TWA_GIT_COMMIT=<sha> to record it.
# Without pytest-benchmark on the box: carry its wheels in .wheels/ (pip download -d .wheels
# pytest-benchmark py-cpuinfo) and they are installed from there.

set -u
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Benchmarks and GPU tests run the real kernels, never Triton's interpreter.
unset TRITON_INTERPRET
start=$SECONDS
stage() { echo "=== $1 ($((SECONDS - start)) s)" | tee -a "$OUT/info.txt"; }

stage "card and versions"
{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| triton', triton.__version__, '| device', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible to torch')"
  nproc
} 2>&1 | tee -a "$OUT/info.txt"

stage "install"
timeout 60 "$PY" -m pip install -e . --no-build-isolation --no-deps -q >"$OUT/install.log" 2>&1
echo "install exit $?" | tee -a "$OUT/info.txt"
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null && [ -d .wheels ]; then
  timeout 60 "$PY" -m pip install --no-index --find-links .wheels -q pytest pytest-benchmark \
    >>"$OUT/install.log" 2>&1
fi
"$PY" -c "import pytest_benchmark" 2>/dev/null || echo "pytest-benchmark missing" | tee -a "$OUT/info.txt"

stage "CUDA extension build"
# Built once here (ninja, cached in TORCH_EXTENSIONS_DIR) so the tests below time only tests.
timeout 150 "$PY" -c "import time; t = time.time(); from twa_kernels import _cuda; _cuda.load(); \
print('extension built/loaded in %.1f s' % (time.time() - t))" 2>&1 | tail -n 5 | tee -a "$OUT/info.txt"

stage "tests"
# What is least verified first: the CUDA extension's numerics, then the Triton kernels on CUDA
# (all passed on an H200 at 8e833c9), then the rest. TWA_GPU_TESTS overrides the list.
TESTS=${TWA_GPU_TESTS:-"tests/test_cuda_ops.py tests/test_triton_step.py tests/test_triton_ops.py tests"}
# Most of the tests' time is compiling Triton kernels on the CPU: with pytest-xdist (on the box)
# they compile on several cores at once while sharing the one GPU.
WORKERS=""
if "$PY" -c "import xdist" 2>/dev/null; then WORKERS="-n ${TWA_GPU_TEST_WORKERS:-8}"; fi
# Tests marked slow are CPU-bound scale checks that CI runs; they would only eat the limit here.
TWA_TEST_DEVICE=cuda timeout -s INT -k 30 ${TWA_GPU_TEST_LIMIT:-150} "$PY" -m pytest -q -rs \
  -p no:cacheprovider -m "not slow" $WORKERS $TESTS >"$OUT/tests.log" 2>&1
echo "tests exit $? (124: timed out)" | tee -a "$OUT/info.txt"
tail -n 3 "$OUT/tests.log" | tee -a "$OUT/info.txt"

stage "benchmarks"
# One pytest per file, each with its own limit (seconds): a slow file loses only its own results.
# SIGINT lets pytest-benchmark write what it measured; -k 30 leaves it time to free the large
# inputs and write the JSON (with -k 10 two files of a first H200 run came back empty).
# TWA_GPU_BENCH_K selects shapes (pytest -k); by default the sizes the targets are stated for.
# bench.log also gets each Triton kernel's autotuning choice per shape (TRITON_PRINT_AUTOTUNING).
JSONS=$(mktemp -d)
: >"$OUT/bench.log"
SELECT=${TWA_GPU_BENCH_K:-"resnet50 or gpt2"}
for spec in ${TWA_GPU_BENCH_PLAN:-project:100 reconstruct:60 step:60 orthogonalize:40 train_step:50}; do
  name=${spec%%:*}
  limit=${spec##*:}
  TRITON_PRINT_AUTOTUNING=1 timeout -s INT -k 30 "$limit" "$PY" -m pytest -q -rs -s \
    -p no:cacheprovider "benchmarks/bench_$name.py" -k "$SELECT" \
    --benchmark-only --benchmark-json="$JSONS/$name.json" \
    --benchmark-columns=min,median,rounds >>"$OUT/bench.log" 2>&1
  echo "bench_$name exit $? (124: timed out)" | tee -a "$OUT/info.txt"
done
"$PY" - "$OUT/bench.json" "$JSONS"/*.json <<'EOF' 2>&1 | tee -a "$OUT/info.txt"
import json, sys
out, paths = sys.argv[1], sys.argv[2:]
merged = None
for path in paths:
    try:
        data = json.load(open(path))
    except (OSError, ValueError) as exc:
        print("skipping", path, exc)
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is None:
    print("no benchmark results")
else:
    json.dump(merged, open(out, "w"), indent=1)
    print(len(merged["benchmarks"]), "results in", out)
EOF

stage "report"
if [ -s "$OUT/bench.json" ]; then
  timeout 30 "$PY" -m benchmarks.report "$OUT/bench.json" --out "$OUT" 2>&1 | tee -a "$OUT/info.txt"
  # The card's backend="auto" entry for twa_kernels/_auto_table.py, from the same run.
  timeout 30 "$PY" -m benchmarks.auto_table "$OUT/bench.json" 2>&1 | tee -a "$OUT/info.txt"
fi
stage "done"
