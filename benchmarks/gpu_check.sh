#!/usr/bin/env bash
# One prepared GPU check: card and versions, install, the CUDA extension build, a short
# correctness stage, the speed measurements the targets are stated for (fp16 basis, then int8)
# and the training-step overhead, their report, then the larger test stages with the time that
# is left.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; OUT must be set)
#
# Made for a lent H200 (16 cores, torch 2.11 + triton 3.6.0 on the box's python3, no network).
# Stages, in order, each with its own limit (seconds), each writing to $OUT as it ends; the
# estimates are for an H200 (about 4.2 TB/s of copy bandwidth; Triton compiles a kernel config
# in about a second on one core):
#   card and versions (~5); install (60, ~10); CUDA extension build (150, ~30-60: ninja on 16
#     cores, bindings.cpp with the torch headers is the longest);
#   first (150, not yet timed on a GPU): 579 tests, the cuda-first subset of the op tests, the
#     CUDA and Triton fused steps and the extension loader checks, under xdist
#     -> tests_first.log;
#   bench: the speed targets, D = 25.6M (ResNet-50 size), fp16 basis, K = 8, 32, 101, 301, one
#     vector, providers naive-fp32, naive-fp16-upcast, torch, triton, cuda (and for the step
#     published, torch-fp32), each process measuring the copy bandwidth first:
#       project (75, ~40: 20 cases of ~0.4 s timed, 28 Triton configs compiled and autotuned),
#       reconstruct (50, ~25), step (75, ~45);
#   granularity (40, not yet timed on a GPU): the step with per-tensor coefficients (the fused
#     per-block step) beside one coefficient vector, ResNet-50's 161 tensors, K = 32, triton
#     and cuda (target: within 1.1x);
#   int8 (after those, or alone: TWA_GPU_STAGES=int8): the int8-basis targets, the same sizes,
#     providers triton and cuda over an int8 basis (one fp32 scale per 64 values; ids ending
#     -int8; a backend the package lists no int8 kernel for skips, named), each file in its own
#     process (not yet timed on a GPU):
#       project (50, ~30: the int8 Triton configs compiled and autotuned), reconstruct (40,
#       ~20), step (50, ~30); the fp16 and published steps they are compared with are the
#       bench stage's;
#   bench, continued: the training step, ResNet-50 batch 256 under bf16 autocast, K = 32 and 101,
#       sgd-fused, triton, cuda, published, torch (100, ~60: cuDNN autotuning on the first
#       step, then 10 cases of a model build and >= 13 steps of ~0.1-0.2 s);
#     the results of each file are merged into bench.json and report.md as soon as it ends;
#     -> bench.log, bench.json, report.md;
#   report (30, ~5): report.md and chart.png; the targets as pass / fail / not measured, the
#     backend="auto" entry and the training-step overheads also go to info.txt;
#   large (150): tests/test_large_basis.py, the ops on both backends and the fused step on a
#     basis of 2.45e9 elements (> 2^31), 5 GB -> tests_more.log;
#   tests (150): the rest of the suite, without what ran above -> tests_more.log;
#   more: orthogonalize at ResNet-50 size, project with a batch of 8, and GPT-2 size (D = 124M)
#     of project, reconstruct and step (40 each), then the report again.
# Memory: the largest cases are at K = 301, D = 25.6M: the 15.4 GB fp16 basis beside its 30.8 GB
# fp32 twin (naive-fp32) or a 30.8 GB upcast of it (naive-fp16-upcast; the twin is freed
# first): 46 GB of the 141; filling a basis takes milliseconds on the GPU (the int8 one, 7.7 GB
# at K = 301, is quantised row by row: about a second). Expected total to the end of the
# report: ~500 s (5 + 10 + 45 + 150 + 40 + 25 + 45 + 30 + 80 + 60 + 5).
# The whole run stays within TWA_GPU_BUDGET seconds (default 570, for a command limit of 600):
# a stage whose limit would pass it gets what is left (and is skipped under 20 s); benchmark
# files (fp16 and int8) keep 60 s for the training step and the report, the training step 20 s
# for the report. TWA_GPU_STAGES (default "first bench int8 large tests more") picks stages,
# e.g. TWA_GPU_STAGES="bench int8" for the measurements only, TWA_GPU_STAGES=int8 for the int8
# ones alone (the report then has no fp16 or published step: those int8 targets read not
# measured). Run it with timeout_s 600 and at least 13 minutes of device time left.
# Files left in $OUT (8 at most come back): info.txt,
# tests_first.log, bench.log, bench.json, report.md, chart.png, tests_more.log (install.log only
# when the install fails).
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
STAGES=" ${TWA_GPU_STAGES:-first bench int8 large tests more} "
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
# Built once here (ninja, cached in TORCH_EXTENSIONS_DIR) so the stages below time only tests.
timeout 150 "$PY" -c "import time; t = time.time(); from twa_kernels import _cuda; _cuda.load(); \
print('extension built/loaded in %.1f s' % (time.time() - t))" 2>&1 | tail -n 5 | tee -a "$OUT/info.txt"

# Most of the tests' time is compiling Triton kernels on the CPU: with pytest-xdist (on the box)
# they compile on several cores at once while sharing the one GPU.
WORKERS=""
if "$PY" -c "import xdist" 2>/dev/null; then WORKERS="-n ${TWA_GPU_TEST_WORKERS:-8}"; fi
# run_tests <log> <limit> <pytest args...>: one pytest under the stage's limit, appended to its
# log in $OUT. Tests marked slow are CPU-bound scale checks that CI runs; they would only eat the
# limit here.
run_tests() {
  local log=$1 lim=$2
  shift 2
  echo "=== pytest $* (limit $lim s)" >>"$OUT/$log"
  TWA_TEST_DEVICE=cuda timeout -s INT -k $GRACE "$lim" "$PY" -m pytest -q -rs -p no:cacheprovider \
    -m "not slow" "$@" >>"$OUT/$log" 2>&1
  echo "$log: exit $? (124: cut at its $lim s limit)" | tee -a "$OUT/info.txt"
  tail -n 3 "$OUT/$log" | tee -a "$OUT/info.txt"
}

# The CUDA extension's numerics have never run on a GPU: first a subset that covers, for
# backend cuda (ids cuda-cuda), every op x storage dtype x awkward sizes (D = 1, prime,
# 1_000_003; K = 1, 3, 301; batches 1 and 5 (and 0, 16, 17, 40); contiguous, aligned-slice and
# odd-slice rows), determinism, agreement with the other backends (torch, triton), opcheck,
# every orthogonalize_ (with the sharded all_reduce hook) and subspace_step_ test, the CUDA
# fused step (step_ and project_grads: fp64 oracles at awkward sizes, reference steps,
# determinism, opcheck, CUDA graph replay, launch count), the extension loader's checks, plus
# the Triton fused step's oracle, non-finite, generic-path and launch-count tests, and
# tests/test_cuda_step.py (the CUDA step's splits, largest rank, argument messages), TWA on an
# FSDP2 model over NCCL (one process per GPU, tests/test_fsdp.py), and every
# autotune config of the Triton project, reconstruct and fused-step kernels against the fp64
# oracle (test_every_*_config_matches_fp64_oracle: the kernels rebuilt since the last GPU run).
# The per-block ops (tests/test_cuda_blocks.py, tests/test_blocks_fused.py: the CUDA and Triton
# per-row projection, [L, K] step, per-row write and fused per-block step) join them.
# 579 tests in all (78 of them on an int8 basis, whose CUDA kernels have never run on a GPU);
# `TWA_TEST_DEVICE=cuda pytest --collect-only -q -k "$FIRST_K" $FIRST_FILES` lists them.
FIRST_FILES="tests/test_op_project.py tests/test_op_reconstruct.py tests/test_op_orthogonalize.py
  tests/test_op_subspace_step.py tests/test_fused_step_op.py tests/test_backend.py tests/test_triton_step.py
  tests/test_cuda_step.py tests/test_cuda_blocks.py tests/test_blocks_fused.py tests/test_fsdp.py"
FIRST_K='(cuda-cuda and ((project_matches and (fp32-None-K1-D1] or fp32-None-K3-D2053] or fp32-5-K301-D4099] or fp32-5-K5-D1000003] or bf16-None-K301-D4099] or fp16-5-K3-D1009])) or (project_column_slices and (None-K301-D4099-odd-slice or 5-K3-D2053-aligned-slice)) or project_batch_sizes or project_deterministic or project_agrees or (reconstruct_matches and (fp32-K301-D4099-contiguous or fp32-K5-D1000003-odd-slice or bf16-K3-D2053-aligned-slice or fp16-K1-D1-contiguous or fp64-K301-D4099-aligned-slice)) or reconstruct_rounds or reconstruct_writes or reconstruct_deterministic or reconstruct_agrees or subspace_step or orthogonalize or opcheck or one_step or reference_steps or project_grads or fused_step)) or (graph_replays and cuda]) or (launches_at_most and cuda]) or rejects or load_without or sources_ship or fused_step_matches_fp64_oracle or fused_step_skips_nonfinite or fused_step_matches_generic_path or test_cuda_step or test_cuda_blocks or (test_blocks_fused and cuda) or config_matches_fp64_oracle or fsdp_twa_on_cuda'
if wanted first; then
  stage "tests: cuda-first"
  if lim=$(limit "${TWA_GPU_FIRST_LIMIT:-150}"); then
    # shellcheck disable=SC2086
    run_tests tests_first.log "$lim" $WORKERS $FIRST_FILES -k "$FIRST_K"
  fi
fi

# bench <file> <limit> <reserve> <pytest -k>: one benchmark file in its own pytest (a slow file
# loses only its own results), then everything measured so far merged into $OUT/bench.json and
# report.md, so that a run stopped later keeps it. SIGINT lets pytest-benchmark write what it
# measured; -k 30 leaves it time to free the large inputs and write the JSON (with -k 10 two
# files of a first H200 run came back empty). bench.log also gets each Triton kernel's
# autotuning choice per shape (TRITON_PRINT_AUTOTUNING).
JSONS=$(mktemp -d)
NJSON=0
bench() {
  local name=$1 lim rc
  lim=$(limit "$2" "$3") || { echo "bench_$name -k '$4' skipped (budget)" | tee -a "$OUT/info.txt"; return; }
  NJSON=$((NJSON + 1))
  echo "=== bench_$name -k '$4' (limit $lim s)" >>"$OUT/bench.log"
  TRITON_PRINT_AUTOTUNING=1 timeout -s INT -k $GRACE "$lim" "$PY" -m pytest -q -rs -s \
    -p no:cacheprovider "benchmarks/bench_$name.py" -k "$4" \
    --benchmark-only --benchmark-json="$JSONS/$NJSON-$name.json" \
    --benchmark-columns=min,median,rounds >>"$OUT/bench.log" 2>&1
  rc=$?
  echo "bench_$name -k '$4': exit $rc (124: cut at its $lim s limit) at $((SECONDS - start)) s" \
    | tee -a "$OUT/info.txt"
  merge_results --no-chart >/dev/null
}
# merge_results [report options]: bench.json and report.md from every benchmark JSON so far.
merge_results() {
  local files=("$JSONS"/*.json)
  [ -e "${files[0]}" ] || return 0
  timeout 60 "$PY" -m benchmarks.report "${files[@]}" --merged "$OUT/bench.json" --out "$OUT" "$@" \
    2>>"$OUT/bench.log"
}

if wanted bench; then
  stage "benchmarks: speed targets (D = 25.6M, K = 8, 32, 101, 301, fp16 basis, one vector)"
  # Each file keeps 60 s for the training step and the report.
  for spec in ${TWA_GPU_BENCH_PLAN:-project:75 reconstruct:50 step:75}; do
    bench "${spec%%:*}" "${spec##*:}" 60 "${TWA_GPU_BENCH_K:-resnet50 and not B8 and not int8}"
  done
fi
if wanted bench; then
  stage "benchmarks: per-tensor coefficients beside one vector (ResNet-50's 161 tensors, K = 32)"
  bench step "${TWA_GPU_GRANULARITY_LIMIT:-40}" 60 "granularity and not torch"
fi
if wanted int8; then
  stage "benchmarks: int8 speed targets (D = 25.6M, K = 8, 32, 101, 301, int8 basis, one vector)"
  # The kernel backends' int8 cases (the reference's are left to CPU runs); each file keeps
  # 60 s for the training step and the report.
  for spec in ${TWA_GPU_INT8_PLAN:-project:50 reconstruct:40 step:50}; do
    bench "${spec%%:*}" "${spec##*:}" 60 "${TWA_GPU_INT8_K:-resnet50 and not B8 and int8 and not torch-int8}"
  done
fi
if wanted bench; then
  stage "benchmarks: training step (ResNet-50, bf16 autocast, K = 32 and 101, against SGD fused)"
  bench train_step "${TWA_GPU_TRAIN_LIMIT:-100}" 20 "${TWA_GPU_TRAIN_K:-resnet50}"
fi
if wanted bench || wanted int8; then
  stage "report"
  merge_results 2>&1 | tee -a "$OUT/info.txt"
fi

# Past 2^31 elements (k x D at ResNet-50 / GPT-2 sizes): all four ops on both backends and the
# fused step, oracle on slices, guard region after the basis. One process (5 GB of GPU memory).
if wanted large; then
  stage "tests: large-basis"
  if lim=$(limit "${TWA_GPU_LARGE_LIMIT:-150}"); then
    run_tests tests_more.log "$lim" tests/test_large_basis.py
  fi
fi

if wanted tests; then
  stage "tests"
  # The rest, in the order of what is least verified; TWA_GPU_TESTS overrides the list.
  TESTS=${TWA_GPU_TESTS:-"tests/test_op_project.py tests/test_op_reconstruct.py tests/test_op_orthogonalize.py
    tests/test_op_subspace_step.py tests/test_triton_step.py tests"}
  DESELECT=()
  # Listing what the cuda-first stage ran takes ~10 s: only when the stage can run after it.
  if limit 150 20 >/dev/null; then
    if wanted first; then
      # shellcheck disable=SC2086
      while read -r id; do DESELECT+=(--deselect "$id"); done < <(
        TWA_TEST_DEVICE=cuda "$PY" -m pytest --collect-only -q -p no:cacheprovider $FIRST_FILES \
          -k "$FIRST_K" 2>/dev/null | grep '::')
    fi
    if lim=$(limit "${TWA_GPU_TEST_LIMIT:-150}"); then
      # shellcheck disable=SC2086
      run_tests tests_more.log "$lim" $WORKERS --ignore=tests/test_large_basis.py "${DESELECT[@]}" $TESTS
    fi
  fi
fi

if wanted more; then
  stage "benchmarks: more sizes (only with time left)"
  before=$NJSON
  bench orthogonalize 40 20 "resnet50 and not int8"
  bench project 40 20 "resnet50 and B8 and not int8"
  for name in project reconstruct step; do bench "$name" 40 20 "gpt2 and not int8"; done
  if [ "$NJSON" -gt "$before" ]; then
    stage "report (again)"
    merge_results 2>&1 | tee -a "$OUT/info.txt"
  fi
fi
stage "done"
