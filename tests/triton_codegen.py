"""Compile the Triton kernels for sm_90 and sm_80 (no GPU needed) and report what their code does.

For every autotune config of the kernels that stream the basis (project, reconstruct, the fused
step's two passes, the three orthogonalize passes) and every basis dtype, plus stage 2 of the
reductions, this compiles the kernel as a launch on an H100/H200 would (16-byte aligned
pointers, a row stride that is a multiple of 16 values, as ``ops.empty_basis`` makes it), and
the fp16 cases again for an A100, and reads the machine code with the ``cuobjdump`` shipped in
Triton's wheel: registers, local memory (stack) and the number of 16-byte global loads per
thread (``LDG.E.128``, or the asynchronous ``LDGSTS.E.128`` copies the compiler makes of a loop
it pipelines). Printed as JSON; ``tests/test_triton_codegen.py`` checks the numbers.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces compiled kernels):
``python tests/triton_codegen.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# (the package re-exports functions named like these modules)

from twa_kernels._triton._common import pow2  # noqa: E402

project = importlib.import_module("twa_kernels._triton.project")
reconstruct = importlib.import_module("twa_kernels._triton.reconstruct")
step = importlib.import_module("twa_kernels._triton.step")
orth = importlib.import_module("twa_kernels._triton.orthogonalize")
subspace_step = importlib.import_module("twa_kernels._triton.subspace_step")

# orthogonalize_'s pass-2 tile and the [NT, BLOCK_K] accumulator of project and the fused step
# depend on K: that of a full 301-sample basis.
ORTH_RANK = STEP_K = 301

# H100/H200 (every case), and A100 (fp16 basis: a portability check of the same code).
TARGETS = {90: GPUTarget("cuda", 90, 32), 80: GPUTarget("cuda", 80, 32)}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
STORAGE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _jit_function(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # an Autotuner wraps the JITFunction
    return kernel


def compile_for(cc: int, kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int) -> dict:
    """Registers, stack bytes, shared memory and load instructions of ``kernel`` for sm_``cc``."""
    fn = _jit_function(kernel)
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGETS[cc], options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True)
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True)
    return {
        "regs": int(re.search(r"REG:(\d+)", usage.stdout).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage.stdout).group(1)),
        "ldg128": len(re.findall(r"\bLDG\.E\.128\b", sass.stdout)),
        "ldgsts128": len(re.findall(r"\bLDGSTS\.E(?:\.BYPASS)?\.128\b", sass.stdout)),
        "shared": compiled.metadata.shared,
    }


def basis_loads_per_thread(block_k: int, block_d: int, dtype: torch.dtype, num_warps: int) -> int:
    """16-byte loads each thread needs for one [block_k, block_d] basis tile."""
    return block_k * block_d * dtype.itemsize // (32 * num_warps * 16)


def cases():
    """``(name, kernel, signature, constexprs, aligned args, num_warps, tile (K, D))`` to compile."""
    for dtype, ptr in STORAGE.items():
        sig = {"basis_ptr": ptr, "row_stride": "i32", "x_ptr": "*fp32", "part_ptr": "*fp32",
               "K": "i32", "D": "i32", "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "x_ptr", "part_ptr", "CHUNK")
        for cfg in project._CONFIGS_1:
            kw = dict(cfg.kwargs, NT=pow2(-(-STEP_K // cfg.kwargs["BLOCK_K"])))
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield "project", project._project_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        sig = {"basis_ptr": ptr, "row_stride": "i32", "x_ptr": "*fp32", "x_stride": "i32",
               "part_ptr": "*fp32", "K": "i32", "D": "i32", "B": "i32", "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "x_ptr", "x_stride", "part_ptr", "CHUNK")
        for cfg in project._CONFIGS_B:
            kw = dict(cfg.kwargs)
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield (
                "project_batched",
                project._project_batched_kernel,
                sig,
                kw,
                aligned,
                cfg.num_warps,
                dtype,
                tile,
            )
        sig = {"out_ptr": "*fp32", "w0_ptr": "*fp32", "basis_ptr": ptr, "row_stride": "i32",
               "scales_ptr": "*fp32", "alpha_ptr": "*fp32", "K": "i32", "D": "i32"}  # fmt: skip
        aligned = ("out_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
        for cfg in reconstruct._CONFIGS:
            kw = dict(cfg.kwargs)
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield "reconstruct", reconstruct._reconstruct_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        common = {"FIELDS": step._FIELDS, "BLOCK_D": step.BLOCK}
        sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "basis_ptr": ptr, "row_stride": "i32",
               "part_ptr": "*fp32", "K": "i32", "NBLK": "i32", "PER": "i32"}  # fmt: skip
        aligned = ("ptab_ptr", "btab_ptr", "basis_ptr", "row_stride", "part_ptr")
        for cfg in step._CONFIGS:
            kw = dict(cfg.kwargs, NT=pow2(-(-STEP_K // cfg.kwargs["BLOCK_K"])), **common)
            tile = (kw["BLOCK_K"], step.BLOCK)
            yield "step_project", step._step_project_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "w0_ptr": "*fp32", "basis_ptr": ptr,
               "row_stride": "i32", "scales_ptr": "*fp32", "alpha_ptr": "*fp32", "K": "i32",
               "NBLK": "i32", "PER": "i32"}  # fmt: skip
        aligned = ("ptab_ptr", "btab_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
        for cfg in step._CONFIGS:
            kw = dict(cfg.kwargs, **common)
            tile = (kw["BLOCK_K"], step.BLOCK)
            yield "step_write", step._step_write_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        # orthogonalize_, once per sample: its three passes at their fixed tile shapes.
        tile = (orth._BLOCK_K, orth._BLOCK_D)
        kw = {"BLOCK_K": tile[0], "BLOCK_D": tile[1]}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "part_ptr": "*fp64",
               "vv_ptr": "*fp64", "R": "i32", "D": "i32", "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "part_ptr", "vv_ptr", "CHUNK")
        yield "orthogonalize_pass1", orth._orthogonalize_kernel, sig, kw, aligned, 4, dtype, tile
        nt, bk, bd = orth._remainder_blocks(ORTH_RANK, dtype.itemsize)
        kw = {"NT": nt, "BLOCK_K": bk, "BLOCK_D": bd}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "sc1_ptr": "*fp64",
               "part_ptr": "*fp64", "ss_ptr": "*fp64", "amax_ptr": "*fp64", "R": "i32", "D": "i32",
               "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "sc1_ptr", "part_ptr", "CHUNK")
        warps = orth.remainder_warps(bk, bd)
        yield (
            "orthogonalize_pass2",
            orth._orthogonalize_remainder_kernel,
            sig,
            kw,
            aligned,
            warps,
            dtype,
            (bk, bd),
        )
        kw = {"LIMIT": torch.finfo(dtype).max, "BLOCK_K": tile[0], "BLOCK_D": tile[1]}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "sh_ptr": "*fp64",
               "inv_ptr": "*fp64", "rank": "i32", "R": "i32", "D": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "sh_ptr", "inv_ptr")
        yield "orthogonalize_pass3", orth._orthogonalize_store_kernel, sig, kw, aligned, 4, dtype, tile
    # Stage 2 of the projection and the fused step's K-dimensional step read no basis (tile
    # (0, 0)): their entries check registers and local memory only, at small and large K.
    for K in (8, 64, 512):
        block_n = min(project._REDUCE_BLOCK_N, pow2(K))
        kw = {"BLOCK_S": project._REDUCE_TILE // block_n, "BLOCK_N": block_n}
        sig = {
            "part_ptr": "*fp32",
            "scales_ptr": "*fp32",
            "out_ptr": "*fp32",
            "S": "i32",
            "K": "i32",
            "N": "i32",
        }
        yield f"project_reduce_K{K}", project._project_reduce_kernel, sig, kw, (), 8, torch.float32, (0, 0)
        kw = dict(subspace_step.launch_constexprs(K), FROM_PARTIALS=True, HAS_WD=True, HAS_MOMENTUM=True,
                  NESTEROV=False)  # fmt: skip
        sig = {"alpha_ptr": "*fp32", "buf_ptr": "*fp32", "counters_ptr": "*i64", "grad_ptr": "*fp32",
               "part_ptr": "*fp32", "scales_ptr": "*fp32", "S": "i32", "gram_ptr": "*fp32",
               "pw0_ptr": "*fp32", "K": "i32", "lr": "fp32", "momentum": "fp32", "keep": "fp32",
               "weight_decay": "fp32"}  # fmt: skip
        warps = subspace_step.NUM_WARPS
        yield (
            f"subspace_step_K{K}",
            subspace_step._subspace_step_kernel,
            sig,
            kw,
            (),
            warps,
            torch.float32,
            (0, 0),
        )


def main() -> None:
    rows = []
    for cc in TARGETS:
        for name, kernel, sig, kw, aligned, warps, dtype, (bk, bd) in cases():
            if cc != 90 and dtype != torch.float16 and bk:
                continue
            info = compile_for(cc, kernel, sig, kw, aligned, warps)
            info.update(
                cc=cc,
                kernel=name,
                dtype=str(dtype).removeprefix("torch."),
                config={k: v for k, v in kw.items() if k.startswith(("BLOCK", "STAGES"))},
                num_warps=warps,
                basis_loads_needed=basis_loads_per_thread(bk, bd, dtype, warps),
            )
            rows.append(info)
    json.dump(rows, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
