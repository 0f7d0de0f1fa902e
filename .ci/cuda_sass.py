"""SASS checks of the CUDA kernels that stream the basis (sm_90, no GPU needed).

Compiles every csrc/*.cu to an sm_90 cubin (``nvcc -cubin``, the flags of .ci/check_cuda.sh
and of torch's extension build), disassembles it (``cuobjdump -sass``, ``-res-usage``) and
reads the code with tests/sass.py. For each kernel of ``CHECKED`` (every template instance):

- no local memory (``LOCAL:0``, no ``STL``/``LDL``): no spills;
- its hot loop (the innermost loop with the most 16-byte loads ``LDG.E*.128``), and every other
  innermost loop holding one, issues at least ``MIN_LOADS`` of them before the first
  instruction that reads one (``loads_before_first_use``);
- no barrier (``BAR``) in those loops;
- for the kernels of ``INT8`` (an int8 basis), in each of those loops: no ``I2F`` and at least
  one ``PRMT`` per int8 value its evict-first basis loads bring (16 per ``LDG.E.EF.128``; for
  the kernels of ``INT8_CACHED``, a loop without one counts its cached 16-byte loads): the
  values are dequantised with byte permutes (``int8x4_to_float``, ``int8x4_to_double``), never
  a conversion per value;
- resident blocks per SM from its registers and static shared memory (sm_90: 64 Ki registers
  allocated 8 per thread, 228 KiB of shared memory) at least the blocks per SM the launch
  relies on: the larger of ``CHECKED[kernel]`` and its ``__launch_bounds__`` minimum
  (``.minnctapersm`` in the PTX). The registers column prints the most that allow it.

With ``--keep-dir`` it reads the sm_90 cubins and PTX that check_cuda.sh's ``nvcc -keep``
left instead of compiling. Kernels not in ``CHECKED`` are printed for information.
``--report-only`` prints without failing. Exit status 1 lists every failed check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import sass  # noqa: E402

MIN_LOADS = 4
THREADS = 256  # kThreads (csrc/twa_common.h): every kernel here runs 256-thread blocks
# Kernels that stream the basis with 16-byte loads, and the blocks per SM their launch relies
# on (0: only what __launch_bounds__ states). Not checked: project_stage2, orth_reduce,
# orth_finalize* (no basis stream: K or splits elements). The fused step's two kernels
# (csrc/step.cu) stream the basis too and are checked.
# project_stage1 and reconstruct_kernel size their grids from the runtime's resident blocks per
# SM for the compiled kernel, so what the launch relies on is their __launch_bounds__ minimum.
# (Before that change, project_stage1's grid assumed 4 blocks per SM, kBlocksPerSM, and was
# checked against 4.) orth_pass sizes its split the same way (the fewer resident blocks of its
# two passes); orth_store (one block per 256 groups) relies on no occupancy beyond the minimum.
CHECKED = {
    "project_stage1": 0,
    "reconstruct_kernel": 0,
    "project_int8_stage1": 0,
    "reconstruct_int8_kernel": 0,
    "orth_pass": 0,
    "orth_store": 0,
    "orth_pass_int8": 0,
    "orth_store_int8": 0,
    "step_project_kernel": 0,
    "step_write_kernel": 0,
    "step_project_int8_kernel": 0,
    "step_write_int8_kernel": 0,
}
# Kernels over an int8 basis: their streaming loops dequantise with PRMT, never I2F.
INT8 = (
    "project_int8_stage1",
    "reconstruct_int8_kernel",
    "step_project_int8_kernel",
    "step_write_int8_kernel",
    "orth_pass_int8",
    "orth_store_int8",
)
# int8 kernels with a streaming loop whose basis loads are cached, not evict-first (orthogonalize_
# pass 2's residual: the dot products re-read the tile right after). In a loop without an
# evict-first load, their 16-byte loads count as the basis's.
INT8_CACHED = ("orth_pass_int8",)
INT8_VALUES_PER_LOAD = 16
FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]  # fmt: skip
_ENTRY = re.compile(r"\.entry\s+(\S+?)\s*\(")
_MINNCTA = re.compile(r"\.minnctapersm\s+(\d+)")
_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def find_cuobjdump(cuda_home: str) -> str:
    path = os.path.join(cuda_home, "bin", "cuobjdump")
    if os.access(path, os.X_OK):
        return path
    try:  # the cuobjdump shipped in Triton's wheel
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        path = shutil.which("cuobjdump") or ""
    if not path or not os.access(path, os.X_OK):
        sys.exit("cuda_sass: no cuobjdump (CUDA_HOME/bin or triton's)")
    return path


def kernel_name(mangled: str) -> str:
    """``project_stage1`` of ``_ZN3twa<anonymous namespace>14project_stage1IfLi16EEEv...``: the
    last name of the nested name, before its template arguments or parameters."""
    if not mangled.startswith("_ZN"):
        return mangled
    pos, name = 3, mangled
    while pos < len(mangled) and mangled[pos].isdigit():
        m = re.match(r"\d+", mangled[pos:])
        n = int(m[0])
        pos += len(m[0])
        name = mangled[pos : pos + n]
        pos += n
    return name


def instance(mangled: str) -> str:
    """Short template instance of a mangled name: the basis type and the integer and bool
    arguments (``project_int8_stage1<2, true>``: ``2,T``)."""
    t = "f32" if "IfL" in mangled or "IfE" in mangled else ""
    t = t or ("f16" if "I6__half" in mangled else ("bf16" if "nv_bfloat16" in mangled else ""))
    args = [v if k == "i" else "TF"[v == "0"] for k, v in re.findall(r"L([ib])(\d+)E", mangled)]
    return ",".join([t] + args if t else args) if t or args else "-"


def compile_one(nvcc: str, src: str, out_dir: str) -> tuple[str, str, str]:
    base = os.path.join(out_dir, os.path.basename(src))
    cmd = [nvcc, "-cubin", "-arch=sm_90", *FLAGS, "-Icsrc", src, "-o", base + ".cubin"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    ptx = [nvcc, "-ptx", "-arch=sm_90", *FLAGS, "-Icsrc", src, "-o", base + ".ptx"]
    subprocess.run(ptx, check=True, cwd=ROOT)
    return src, base + ".cubin", base + ".ptx"


def min_blocks_from_ptx(ptx: str) -> dict[str, int]:
    out, current = {}, None
    for line in ptx.splitlines():
        if m := _ENTRY.search(line):
            current = m[1]
            out[current] = 0
        elif current and (m := _MINNCTA.search(line)):
            out[current] = int(m[1])
        elif line.startswith("{"):
            current = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--keep-dir",
        help="read <name>.compute_90.cubin and .ptx left by nvcc -keep (check_cuda.sh) instead of compiling",
    )
    ap.add_argument("sources", nargs="*", help="default: csrc/*.cu")
    args = ap.parse_args()
    nvcc = os.path.join(args.cuda_home, "bin", "nvcc")
    cuobjdump = find_cuobjdump(args.cuda_home)
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))

    failures, rows = [], []
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(2) as pool:
        if args.keep_dir:
            stems = [os.path.join(args.keep_dir, os.path.basename(s)[: -len(".cu")]) for s in sources]
            built = [
                (s, t + ".compute_90.cubin", t + ".compute_90.ptx")
                for s, t in zip(sources, stems, strict=True)
            ]
        else:
            built = pool.map(lambda s: compile_one(nvcc, s, tmp), sources)
        for src, cubin, ptx in built:
            text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True)
            usage = subprocess.run(
                [cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True
            )
            funcs = sass.parse(text.stdout)
            res = {m[1]: tuple(map(int, m.groups()[1:])) for m in _USAGE.finditer(usage.stdout)}
            with open(ptx) as f:
                bounds = min_blocks_from_ptx(f.read())
            for mangled, code in funcs.items():
                name = kernel_name(mangled)
                regs, stack, shared, local = res.get(mangled, (0, 0, 0, 0))
                # cuobjdump's SHARED already holds the 1 KiB sm_90 reserves per block.
                blocks = sass.resident_blocks(regs, THREADS, shared, shared_reserved=0)
                need = max(CHECKED.get(name, 0), bounds.get(mangled, 0))
                hot = sass.hot_loop(code)
                spills = sass.count(code, "STL") + sass.count(code, "LDL")
                row = {
                    "src": os.path.basename(src), "kernel": name, "inst": instance(mangled), "regs": regs,
                    "shared": shared, "blocks": blocks, "need": need, "lb": bounds.get(mangled, 0),
                    "maxregs": sass.max_regs_for(THREADS, need) if need else 255,
                    "ldg": hot.ldg128 if hot else 0, "first_use": hot.loads_before_first_use if hot else 0,
                    "bar": hot.bar if hot else 0, "checked": name in CHECKED, "bad": [],
                    "prmt": hot.prmt if hot else 0, "i2f": hot.i2f if hot else 0,
                }  # fmt: skip
                if name in CHECKED:
                    bad = row["bad"]
                    if local or stack or spills:
                        bad.append(f"local memory (LOCAL {local}, STACK {stack}, {spills} STL/LDL)")
                    if hot is None:
                        bad.append("no 16-byte basis load in any innermost loop")
                    for lp in sass.streaming_loops(code) if hot else []:
                        where = "hot loop" if (lp.lo, lp.hi) == (hot.lo, hot.hi) else "streaming loop"
                        if lp.loads_before_first_use < MIN_LOADS:
                            bad.append(
                                f"{lp.loads_before_first_use} 16-byte load(s) before the first use in the"
                                f" {where} [{lp.lo:#x}, {lp.hi:#x}] (need {MIN_LOADS})"
                            )
                        if lp.bar:
                            bad.append(f"{lp.bar} BAR in the {where} [{lp.lo:#x}, {lp.hi:#x}]")
                        loads = lp.ldg128_ef or (lp.ldg128 if name in INT8_CACHED else 0)
                        values = INT8_VALUES_PER_LOAD * loads
                        if name in INT8 and (lp.i2f or lp.prmt < values or not loads):
                            bad.append(
                                f"{lp.i2f} I2F and {lp.prmt} PRMT for the {values} int8 values of"
                                f" {loads} basis loads in the {where} [{lp.lo:#x},"
                                f" {lp.hi:#x}] (need no I2F, a PRMT per value)"
                            )
                    if need and blocks < need:
                        bad.append(
                            f"{blocks} resident blocks per SM ({regs} registers, {shared} B shared),"
                            f" the launch relies on {need} (<= {row['maxregs']} registers)"
                        )
                    failures += [f"{name}<{row['inst']}>: {b}" for b in bad]
                rows.append(row)

    print(
        f"{'kernel':24} {'inst':10} {'regs':>4} {'max':>4} {'smem':>6} {'blk/SM':>6} {'need':>4} "
        f"{'LDG128':>6} {'1st use':>7} {'BAR':>3} {'PRMT':>4} {'I2F':>3}  check"
    )
    for r in sorted(rows, key=lambda r: (not r["checked"], r["src"], r["kernel"], r["inst"])):
        verdict = ("FAIL" if r["bad"] else "ok") if r["checked"] else "-"
        print(
            f"{r['kernel']:24} {r['inst']:10} {r['regs']:>4} {r['maxregs']:>4} {r['shared']:>6} "
            f"{r['blocks']:>6} {r['need']:>4} {r['ldg']:>6} {r['first_use']:>7} {r['bar']:>3} "
            f"{r['prmt']:>4} {r['i2f']:>3}  {verdict}"
        )
    checked = sum(r["checked"] for r in rows)
    if not checked:
        print("cuda_sass: no checked kernel found")
        return 1
    if failures:
        print(f"cuda_sass: {len(failures)} failed check(s):")
        for f in failures:
            print("  " + f)
        return 0 if args.report_only else 1
    print(
        f"cuda_sass: {checked} kernel instances checked: >= {MIN_LOADS} loads before first use, no BAR, fit;"
        " int8: a PRMT per value, no I2F"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
