#!/usr/bin/env bash
# CUDA build checks that need no GPU (run from the repo root with the project venv active):
#   1. every csrc/*.cu compiles for sm_90 and sm_80 with warnings as errors, and ptxas reports
#      no register spills (per-kernel registers/spills are printed); the PTX of both forms no
#      global address from a 32-bit product (.ci/ptx_addr32.py), which must in turn catch the
#      products of csrc/tests/addr32_canary.cu; the sm_90 SASS of the kernels that stream the
#      basis keeps >= 4 16-byte loads in flight and no barrier in its hot loop, and fits the
#      blocks per SM its launch relies on; the int8 kernels' hot loops have no I2F and a PRMT
#      per int8 value (.ci/cuda_sass.py);
#   2. csrc/tests/host_test.cu (the kernels' index/tiling/mask/reduction helpers and the int8
#      dequantisation against plain loops) and csrc/tests/step_host_test.cu (the fused step's
#      splits and, over an int8 basis, its lanes' columns and block scales) build with nvcc and
#      run on the CPU;
#   3. the torch glue compiles (syntax only) against the project's torch;
#   4. the whole extension JIT-builds, links and imports against the torch 2.14.1 CUDA wheel in
#      .venv-cuda (created when missing and the disk has room), and calling an op on CPU tensors
#      raises the extension's own error.
# TWA_CI_EAGER_BUILD=1 also builds twa_kernels._C through setup.py (about 45 s more).
# Without nvcc the script fails under CI=true and skips otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export CUDA_HOME
NVCC="$CUDA_HOME/bin/nvcc"
PY="${PYTHON:-python}"
# torch 2.14.1 + its CUDA wheels: 5.5 GB installed; ask for 8 GB free before creating it.
NEED_GB=8
ARCHS=(-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80)
# The defines torch's extension builder passes to nvcc, so this compile matches the real one.
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)

t_start=$(date +%s.%N)
t_step=$t_start
step() {
  local now
  now=$(date +%s.%N)
  awk -v a="$t_step" -v b="$now" -v n="$1" 'BEGIN { printf "check_cuda: %-44s %6.1f s\n", n, b - a }'
  t_step=$now
}

if [ ! -x "$NVCC" ]; then
  echo "check_cuda: no nvcc at $NVCC (set CUDA_HOME)"
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "check_cuda: SKIPPED"
  exit 0
fi
echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/twa_check_cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---- 1. kernels: sm_90 + sm_80, warnings as errors, no spills, 64-bit addresses ------------
: > "$WORK/ptxas.log"
mkdir -p "$WORK/keep"
for f in csrc/*.cu; do
  echo "check_cuda: nvcc $f"
  if ! "$NVCC" -c -std=c++17 -O3 -lineinfo "${ARCHS[@]}" "${TORCH_NVCC_DEFINES[@]}" \
      -Xptxas -v -Werror all-warnings -Xcompiler -fPIC,-Wall,-Werror -keep -keep-dir "$WORK/keep" \
      "$f" -o "$WORK/$(basename "$f").o" 2> "$WORK/nvcc.log"; then
    cat "$WORK/nvcc.log"
    echo "check_cuda: FAILED to compile $f"
    exit 1
  fi
  cat "$WORK/nvcc.log" >> "$WORK/ptxas.log"
done
"$PY" - "$WORK/ptxas.log" <<'EOF'
import re
import shutil
import subprocess
import sys

entry = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
props = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
regs = re.compile(r"Used (\d+) registers")
rows, cur = [], None
for line in open(sys.argv[1]):
    if m := entry.search(line):
        cur = {"name": m[1], "arch": m[2], "stack": 0, "st": 0, "ld": 0, "regs": 0}
        rows.append(cur)
    elif cur and (m := props.search(line)):
        cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
    elif cur and (m := regs.search(line)):
        cur["regs"] = int(m[1])
names = [r["name"] for r in rows]
if shutil.which("c++filt") and names:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    names = out.stdout.splitlines() if out.returncode == 0 else names
bad = 0
print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
for r, name in zip(rows, names):
    short = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    short = re.sub(r"\(.*", "", short)
    spill = f"{r['st']}/{r['ld']}"
    print(f"{r['arch']:6} {r['regs']:>4} {r['stack']:>5} {spill:>11}  {short}")
    bad += r["st"] > 0 or r["ld"] > 0
if not rows:
    sys.exit("check_cuda: ptxas printed no kernel statistics")
if bad:
    sys.exit(f"check_cuda: {bad} kernel(s) spill registers")
print(f"check_cuda: {len(rows)} kernel builds, no spills")
EOF
step "kernels (sm_90 + sm_80, -Werror, spills)"
# Addresses from 32-bit products (row * stride wraps past 2^31): none in the kernels' PTX (both
# architectures), and the check still catches every BAD kernel of the canary.
"$PY" .ci/ptx_addr32.py "$WORK"/keep/*.compute_*.ptx
"$NVCC" -ptx -std=c++17 -O3 -arch=compute_90 csrc/tests/addr32_canary.cu -o "$WORK/canary.ptx"
"$PY" .ci/ptx_addr32.py "$WORK/canary.ptx" --expect-kernels \
  store_row_times_stride,widened_after_product,block_times_size,loop_row_times_stride,rolled_loop_running_sum \
  | tail -n 1
step "PTX: no address from a 32-bit product"
# SASS of the basis-streaming kernels (sm_90): >= 4 16-byte loads in flight in the hot loop, no
# BAR there, no local memory, registers and shared memory that fit the blocks per SM the launch
# relies on; int8 dequantisation by PRMT, no I2F (.ci/cuda_sass.py, analysis in tests/sass.py).
"$PY" .ci/cuda_sass.py --keep-dir "$WORK/keep"
step "SASS: loads in flight, barriers, occupancy"

# ---- 2. host test of the shared __host__ __device__ helpers ----------------------------------
"$NVCC" -std=c++17 -O2 -Werror all-warnings -Xcompiler -Wall,-Werror \
  csrc/tests/host_test.cu -o "$WORK/host_test"
"$WORK/host_test"
"$NVCC" -std=c++17 -O2 -Werror all-warnings -Xcompiler -Wall,-Werror \
  csrc/tests/step_host_test.cu -o "$WORK/step_host_test"
"$WORK/step_host_test"
step "host tests (index/tiling/masks/reduction, step splits)"

# ---- 3. torch glue against the project's torch (syntax only) ----------------------------------
# CPU wheels lack the CMake-generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stub stands in.
mkdir -p "$WORK/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t INC < <("$PY" -c "
import sysconfig
from torch.utils import cpp_extension as c
for p in c.include_paths() + [sysconfig.get_paths()['include']]:
    print('-isystem'); print(p)
")
g++ -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=twa_check \
  -DTORCH_API_INCLUDE_EXTENSION_H "${INC[@]}" -isystem "$WORK/stub" \
  -isystem "$CUDA_HOME/include" -Icsrc csrc/bindings.cpp
step "glue syntax ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"

# ---- 4. full build + link + import against the CUDA wheel ------------------------------------
VENV=.venv-cuda
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, ninja" 2>/dev/null; then
  free_gb=$(df -Pk . | awk 'NR == 2 { printf "%d", $4 / 1048576 }')
  if [ "$free_gb" -lt "$NEED_GB" ]; then
    echo "check_cuda: $free_gb GB free, $NEED_GB GB needed for $VENV (torch 2.14.1 CUDA wheel)"
    if [ "${CI:-}" = "true" ]; then exit 1; fi
    echo "check_cuda: link check SKIPPED"
    exit 0
  fi
  echo "check_cuda: creating $VENV with torch==2.14.1 ninja numpy ($free_gb GB free; ~5.5 GB)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 ninja numpy \
    2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, ninja" || { echo "check_cuda: $VENV install failed"; exit 1; }
  step "create $VENV"
fi
echo "check_cuda: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

export TORCH_EXTENSIONS_DIR="$WORK/ext"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
PATH="$PWD/$VENV/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TWA_KERNELS_FORCE_JIT=1 \
  "$VENV/bin/python" - <<'EOF'
import time

import torch

from twa_kernels import _cuda

t = time.time()
mod = _cuda.load()
print(f"check_cuda: built and imported {mod.__file__} in {time.time() - t:.1f} s")
for op in (
    "project", "reconstruct_", "orthogonalize_", "orthogonalize_workspace", "orthogonalize_phase_",
    "subspace_step_", "step_sizes", "step_project_", "fused_step_", "step_write_",
    "step_blocks_sizes", "step_project_blocks_", "block_step_", "fused_block_step_",
):
    assert hasattr(torch.ops.twa_cuda, op), op

basis, scales, x = torch.randn(3, 10).half(), torch.ones(3), torch.randn(10)
try:
    _cuda.project(basis, scales, x)
except RuntimeError as exc:
    msg = str(exc)
else:
    raise SystemExit("check_cuda: project on CPU tensors did not raise")
assert "twa_cuda::project runs on CUDA tensors only" in msg, msg
print("check_cuda: CPU tensors ->", msg.splitlines()[0])
EOF
step "JIT build + link + import (torch CUDA wheel)"

if [ "${TWA_CI_EAGER_BUILD:-0}" = "1" ]; then
  PATH="$PWD/$VENV/bin:$PATH" TWA_KERNELS_BUILD_CUDA=1 "$VENV/bin/python" setup.py -q build_ext \
    --build-lib "$WORK/eager" --build-temp "$WORK/eager-tmp"
  ls "$WORK"/eager/twa_kernels/_C*.so
  step "eager setup.py build of twa_kernels._C"
fi

awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "check_cuda: OK in %.1f s\n", b - a }'
