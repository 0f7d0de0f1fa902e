#!/usr/bin/env bash
# One prepared GPU check: card and versions, install, the tests least verified first, the
# benchmarks, the report.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; OUT must be set)
#
# Made for a lent H200 (16 cores, torch 2.11 + triton 3.6.0 on the box's python3, no network).
# Stages, in order, each with its own limit (seconds) and each writing its log to $OUT as it runs:
#   card and versions; install (60); CUDA extension build (150);
#   cuda-first (120): a representative subset of the backend-cuda tests of tests/test_op_*.py
#     (every op x storage dtype x awkward sizes and layouts, determinism, agreement with the
#     other backends, opcheck), the loader checks and the fused step (tests/test_triton_step.py),
#     never yet run on a GPU -> tests_first.log;
#   large-basis (150): tests/test_large_basis.py, all four ops on both backends and the fused
#     step on a basis of 2.45e9 elements (> 2^31), 5 GB -> tests_large.log;
#   tests (150): the rest of the suite as before, without what ran above -> tests.log;
#   benchmarks (project 100, reconstruct 60, step 60, orthogonalize 40, train_step 50) ->
#     bench.log, bench.json; report (30) -> report.md, chart.png.
# The whole run stays within TWA_GPU_BUDGET seconds (default 570, for a command limit of 600):
# a stage whose limit would pass it gets what is left (and is skipped under 20 s), so the
# benchmarks get the time the tests leave. TWA_GPU_STAGES (default "first large tests bench")
# picks stages, e.g. TWA_GPU_STAGES=bench for a second run of the benchmarks only. Run it with
# timeout_s 600 and at least 13 minutes of device time left. Files left in $OUT (8 at most come
# back): info.txt, tests_first.log, tests_large.log, tests.log, bench.log, bench.json,
# report.md, chart.png (install.log only when the install fails).
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
BUDGET=${TWA_GPU_BUDGET:-570}
STAGES=" ${TWA_GPU_STAGES:-first large tests bench} "
GRACE=30  # timeout -k: seconds between SIGINT and SIGKILL
# limit <seconds> [reserve]: the stage's limit, cut to what the budget leaves after the kill
# grace (and `reserve` seconds kept for later stages); prints nothing (and the caller skips the
# stage) when under 20 s are left.
limit() {
  local left=$((BUDGET - (SECONDS - start) - GRACE - ${2:-0}))
  if [ "$left" -lt 20 ]; then
    echo "    skipped: $((BUDGET - (SECONDS - start))) s of the $BUDGET s budget left" >>"$OUT/info.txt"
    return 1
  fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
wanted() { [[ "$STAGES" == *" $1 "* ]]; }

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
status=$?
echo "install exit $status" | tee -a "$OUT/info.txt"
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null && [ -d .wheels ]; then
  timeout 60 "$PY" -m pip install --no-index --find-links .wheels -q pytest pytest-benchmark \
    >>"$OUT/install.log" 2>&1
fi
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  # Only a failed install's log comes back (8 files at most do).
  if [ "$status" -eq 0 ]; then rm -f "$OUT/install.log"; fi
else
  echo "pytest-benchmark missing" | tee -a "$OUT/info.txt"
fi

stage "CUDA extension build"
# Built once here (ninja, cached in TORCH_EXTENSIONS_DIR) so the tests below time only tests.
timeout 150 "$PY" -c "import time; t = time.time(); from twa_kernels import _cuda; _cuda.load(); \
print('extension built/loaded in %.1f s' % (time.time() - t))" 2>&1 | tail -n 5 | tee -a "$OUT/info.txt"

# Most of the tests' time is compiling Triton kernels on the CPU: with pytest-xdist (on the box)
# they compile on several cores at once while sharing the one GPU.
WORKERS=""
if "$PY" -c "import xdist" 2>/dev/null; then WORKERS="-n ${TWA_GPU_TEST_WORKERS:-8}"; fi
# run_tests <log> <limit> <pytest args...>: one pytest under the stage's limit, its log in $OUT.
# Tests marked slow are CPU-bound scale checks that CI runs; they would only eat the limit here.
run_tests() {
  local log=$1 lim=$2
  shift 2
  TWA_TEST_DEVICE=cuda timeout -s INT -k $GRACE "$lim" "$PY" -m pytest -q -rs -p no:cacheprovider \
    -m "not slow" "$@" >"$OUT/$log" 2>&1
  echo "$log: exit $? (124: cut at its $lim s limit)" | tee -a "$OUT/info.txt"
  tail -n 3 "$OUT/$log" | tee -a "$OUT/info.txt"
}

# The CUDA extension's numerics have never run on a GPU: first a subset that covers, for
# backend cuda (ids cuda-cuda), every op x storage dtype x awkward sizes (D = 1, prime,
# 1_000_003; K = 1, 3, 301; batches 1 and 5 (and 0, 16, 17, 40); contiguous, aligned-slice and
# odd-slice rows), determinism, agreement with the other backends (torch, triton), opcheck,
# every orthogonalize_ (with the sharded all_reduce hook) and subspace_step_ test, the extension
# loader's checks, plus the fused step's oracle, non-finite and generic-path tests. 194 tests
# (173 cuda-cuda tests of tests/test_op_*.py, 5 of test_backend.py, 16 of test_triton_step.py);
# `TWA_TEST_DEVICE=cuda pytest --collect-only -q -k "$FIRST_K" $FIRST_FILES` lists them.
FIRST_FILES="tests/test_op_project.py tests/test_op_reconstruct.py tests/test_op_orthogonalize.py
  tests/test_op_subspace_step.py tests/test_backend.py tests/test_triton_step.py"
FIRST_K='(cuda-cuda and ((project_matches and (fp32-None-K1-D1] or fp32-None-K3-D2053] or fp32-5-K301-D4099] or fp32-5-K5-D1000003] or bf16-None-K301-D4099] or fp16-5-K3-D1009])) or (project_column_slices and (None-K301-D4099-odd-slice or 5-K3-D2053-aligned-slice)) or project_batch_sizes or project_deterministic or project_agrees or (reconstruct_matches and (fp32-K301-D4099-contiguous or fp32-K5-D1000003-odd-slice or bf16-K3-D2053-aligned-slice or fp16-K1-D1-contiguous or fp64-K301-D4099-aligned-slice)) or reconstruct_rounds or reconstruct_writes or reconstruct_deterministic or reconstruct_agrees or subspace_step or orthogonalize or opcheck)) or rejects or load_without or sources_ship or fused_step_matches_fp64_oracle or fused_step_skips_nonfinite or fused_step_matches_generic_path'
if wanted first; then
  stage "tests: cuda-first"
  if lim=$(limit "${TWA_GPU_FIRST_LIMIT:-120}"); then
    # shellcheck disable=SC2086
    run_tests tests_first.log "$lim" $WORKERS $FIRST_FILES -k "$FIRST_K"
  fi
fi

# Past 2^31 elements (k x D at ResNet-50 / GPT-2 sizes): all four ops on both backends and the
# fused step, oracle on slices, guard region after the basis. One process (5 GB of GPU memory).
if wanted large; then
  stage "tests: large-basis"
  if lim=$(limit "${TWA_GPU_LARGE_LIMIT:-150}"); then
    run_tests tests_large.log "$lim" tests/test_large_basis.py
  fi
fi

if wanted tests; then
  stage "tests"
  # The rest, in the order of what is least verified; TWA_GPU_TESTS overrides the list.
  TESTS=${TWA_GPU_TESTS:-"tests/test_op_project.py tests/test_op_reconstruct.py tests/test_op_orthogonalize.py
    tests/test_op_subspace_step.py tests/test_triton_step.py tests"}
  DESELECT=()
  if wanted first; then  # what the cuda-first stage ran
    # shellcheck disable=SC2086
    while read -r id; do DESELECT+=(--deselect "$id"); done < <(
      TWA_TEST_DEVICE=cuda "$PY" -m pytest --collect-only -q -p no:cacheprovider $FIRST_FILES \
        -k "$FIRST_K" 2>/dev/null | grep '::')
  fi
  if lim=$(limit "${TWA_GPU_TEST_LIMIT:-150}"); then
    # shellcheck disable=SC2086
    run_tests tests.log "$lim" $WORKERS --ignore=tests/test_large_basis.py "${DESELECT[@]}" $TESTS
  fi
fi

if wanted bench; then
stage "benchmarks"
# One pytest per file, each with its own limit (seconds): a slow file loses only its own results.
# SIGINT lets pytest-benchmark write what it measured; -k 30 leaves it time to free the large
# inputs and write the JSON (with -k 10 two files of a first H200 run came back empty).
# TWA_GPU_BENCH_K selects shapes (pytest -k); by default the sizes the targets are stated for.
# bench.log also gets each Triton kernel's autotuning choice per shape (TRITON_PRINT_AUTOTUNING).
JSONS=$(mktemp -d)
: >"$OUT/bench.log"
SELECT=${TWA_GPU_BENCH_K:-"resnet50 or gpt2"}
# Each file's limit is cut to the budget, keeping 60 s for the report.
for spec in ${TWA_GPU_BENCH_PLAN:-project:100 reconstruct:60 step:60 orthogonalize:40 train_step:50}; do
  name=${spec%%:*}
  lim=$(limit "${spec##*:}" 60) || { echo "bench_$name skipped (budget)" | tee -a "$OUT/info.txt"; continue; }
  TRITON_PRINT_AUTOTUNING=1 timeout -s INT -k $GRACE "$lim" "$PY" -m pytest -q -rs -s \
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
fi
stage "done"
