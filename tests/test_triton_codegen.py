"""The Triton kernels that stream the basis, compiled for sm_90 and sm_80 on this (GPU-less)
machine, read the basis in 16-byte loads and keep (almost) nothing in local memory.

A column mask that is not constant over 8 values, or an offset the compiler cannot prove
aligned, silently turns every basis load into a 2-byte one (32 ``LDG.E.U16`` per thread for a
[16, 256] fp16 tile instead of 4 ``LDG.E.128``), and the kernels that run at the memory's speed
lose about half of it. Nothing else in a GPU-less CI would notice; this does.

The same compiles are read for addresses formed from 32-bit products (a row index times a row
stride, a program id times a chunk): they wrap past 2^31 elements, which k x D passes at real
sizes, and write outside the basis (see ``address_products`` in ``triton_codegen.py``).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SCRIPT = os.path.join(os.path.dirname(__file__), "triton_codegen.py")


@pytest.fixture(scope="module")
def output():
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("this triton wheel has no NVIDIA backend tools (cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def report(output):
    return output["cases"]


def test_every_config_of_every_hot_kernel_was_compiled(report):
    assert {r["cc"] for r in report} == {90, 80}
    kernels = {(r["kernel"], r["dtype"]) for r in report if r["cc"] == 90}
    assert {k for k, _ in kernels} == {
        "project", "project_batched", "reconstruct", "step_project", "step_write",
        "orthogonalize_pass1", "orthogonalize_pass2", "orthogonalize_pass3",
        *(
            f"{name}_K{K}"
            for name in ("project_reduce", "subspace_step", "orthogonalize_reduce1", "orthogonalize_reduce2")
            for K in (8, 64, 512)
        ),
    }  # fmt: skip
    assert {d for _, d in kernels} == {"float16", "bfloat16", "float32"}


def test_basis_tiles_are_read_in_16_byte_loads(report):
    short = [
        f"{r['kernel']} {r['dtype']} {r['config']} warps={r['num_warps']}: "
        f"sm_{r['cc']} {r['ldg128']} LDG.E.128 + {r['ldgsts128']} LDGSTS.E.128 < {r['basis_loads_needed']}"
        for r in report
        if r["ldg128"] + r["ldgsts128"] < r["basis_loads_needed"]
    ]
    assert not short, "\n".join(short)


def test_no_spills_in_local_memory(report):
    # 16 bytes are allowed: reconstruct's 8-warp configs keep 2-3 values across the masked /
    # unmasked branch (e.g. [32, 256] fp16: 3 STL before the loop, 3 LDL after it), nothing
    # inside the loop.
    # sm_90 only: on sm_80 (a portability check) reconstruct's first config keeps 32 bytes
    # outside its loop.
    heavy = [
        f"{r['kernel']} {r['dtype']} {r['config']}: {r['stack']} bytes"
        for r in report
        if r["cc"] == 90 and r["stack"] > 16
    ]
    assert not heavy, "\n".join(heavy)


def test_no_barrier_in_the_k_loop_of_the_weight_writers(report):
    """reconstruct and the fused step's write pass accumulate in registers and reduce once per
    column block: no ``BAR`` in their innermost (K) loop. Reducing every K tile put 3 there per
    tile copy of the loop (6 per config of reconstruct, and the write pass's likewise). The
    STAGES = 3 configs keep the 4 barriers of their shared-memory prefetch ring, and the write
    pass's block loop still holds the one reduction per block (not checked here)."""
    bad = [
        f"{r['kernel']} {r['dtype']} {r['config']} sm_{r['cc']}: {r['bars_in_loops']['inner']} BAR in K loop"
        for r in report
        if r["kernel"] in ("reconstruct", "step_write")
        and r["config"]["STAGES"] == 1
        and r["bars_in_loops"]["inner"] != 0
    ]
    assert not bad, "\n".join(bad)


def test_no_address_is_formed_from_a_32_bit_product(report):
    bad = [
        f"{r['kernel']} {r['dtype']} {r['config']} warps={r['num_warps']} sm_{r['cc']}: {p}"
        for r in report
        for p in r["addr32"]
    ]
    assert not bad, "\n".join(bad)


def test_the_address_check_finds_the_products_of_its_canaries(output):
    # Each canary forms one address from a 32-bit product the way a kernel could (the row
    # index times the stride of orthogonalize_'s old store pass, a loop counter, a program id,
    # a value carried by a loop, an integer turned into a pointer); "clean" widens first.
    canaries = output["canaries"]
    assert len(canaries) >= 9
    for c in canaries:
        for ir in ("ttir", "ttgir"):
            assert len(c[ir]) == c["expected"], (c["canary"], ir, c[ir])
