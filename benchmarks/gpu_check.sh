#!/usr/bin/env bash
# One prepared GPU check: card and versions, install, the test suite, the benchmarks, the report.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from anywhere; OUT must be set)
#
# Made for a lent H200 (16 cores, torch 2.11 + triton 3.6.0 on the box's python3, no network):
# every stage has its own timeout and the next stage runs whatever happened, so the whole fits
# in about 9 minutes (15 + 150 + 330 + 30 s of limits). Files left in $OUT (8 at most come
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

stage "tests"
timeout -s INT -k 15 150 "$PY" -m pytest -q -rs tests >"$OUT/tests.log" 2>&1
echo "tests exit $? (124: timed out)" | tee -a "$OUT/info.txt"
tail -n 3 "$OUT/tests.log" | tee -a "$OUT/info.txt"

stage "benchmarks"
# One pytest per file, each with its own limit (seconds; 330 in all): a slow file loses only its
# own results. SIGINT lets pytest-benchmark write what it measured before the limit.
JSONS=$(mktemp -d)
: >"$OUT/bench.log"
for spec in project:90 reconstruct:45 orthogonalize:55 step:75 train_step:65; do
  name=${spec%%:*}
  limit=${spec##*:}
  timeout -s INT -k 15 "$limit" "$PY" -m pytest -q -rs "benchmarks/bench_$name.py" \
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
fi
stage "done"
