"""The Triton kernels that stream the basis, compiled for sm_90 and sm_80 on this (GPU-less)
machine, read the basis in 16-byte loads, keep nothing in local memory, and loop the way a
split-K GEMV at the bandwidth limit must: several basis loads in flight per thread, no barrier
in the hot loop, and registers that let the grid's programs per SM be resident.

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
    assert {d for _, d in kernels} == {"float16", "bfloat16", "float32", "int8"}
    assert {k for k, d in kernels if d == "int8"} >= {
        "project", "project_batched", "reconstruct", "step_project", "step_write"
    }  # fmt: skip


def test_basis_tiles_are_read_in_16_byte_loads(report):
    short = [
        f"{r['kernel']} {r['dtype']} {r['config']} warps={r['num_warps']}: "
        f"sm_{r['cc']} {r['ldg128']} LDG.E.128 + {r['ldgsts128']} LDGSTS.E.128 < {r['basis_loads_needed']}"
        for r in report
        if r["ldg128"] + r["ldgsts128"] < r["basis_loads_needed"]
    ]
    assert not short, "\n".join(short)


# Known local memory, in bytes, that must not grow: orthogonalize_'s int8 pass 2 (64 int8 values
# per thread and slab in fp64 products, with v1's 16-column state) keeps 416 bytes, nearly all
# in its masked last slab (0 STL/LDL in the hot loop). A pass-2 structure without it is open work.
KNOWN_STACK = {("orthogonalize_pass2", "int8"): 416}


def test_no_spills_in_local_memory(report):
    # sm_90 only (sm_80 is a portability check). Before the register-prefetch loops,
    # reconstruct's 8-warp configs kept 16 bytes in local memory across its masked / unmasked
    # branch.
    heavy = [
        f"{r['kernel']} {r['dtype']} {r['config']}: {r['stack']} bytes"
        for r in report
        if r["cc"] == 90 and r["stack"] > KNOWN_STACK.get((r["kernel"], r["dtype"]), 0)
    ]
    assert not heavy, "\n".join(heavy)


# The kernels that stream the basis once per step or per call, and the loop structure each must
# compile to (sm_90, every autotune config and basis dtype).
STREAMING = (
    "project", "reconstruct", "step_project", "step_write",
    "orthogonalize_pass1", "orthogonalize_pass2", "orthogonalize_pass3",
)  # fmt: skip


def _streaming(report):
    rows = [r for r in report if r["cc"] == 90 and r["kernel"] in STREAMING]
    assert len(rows) >= 3 * len(STREAMING)
    return rows


def _name(r):
    return f"{r['kernel']} {r['dtype']} {r['config']} warps={r['num_warps']}"


def test_the_basis_is_streamed_by_a_loop_of_evict_first_16_byte_loads(report):
    """Each streaming kernel has an innermost loop of ``LDG.E.EF.128`` (basis loads marked
    evict-first, so the basis does not push x, w0 and the outputs out of L2)."""
    bad = [_name(r) for r in _streaming(report) if r["hot_loop"] is None]
    assert not bad, "no loop of evict-first 16-byte basis loads:\n" + "\n".join(bad)


def test_several_basis_loads_are_in_flight_before_any_is_used(report):
    """At least 4 16-byte basis loads issued before the first instruction that reads one, in the
    hot loop (register prefetch of the next tile, or a tile of 4+ loads per thread). Before:
    project's [8, 256] tile issued 2, the STAGES = 3 configs of project, reconstruct and the
    step issued none in their loop (asynchronous copies into shared memory instead)."""
    bad = [
        f"{_name(r)}: {r['hot_loop']['basis_before_use']}"
        for r in _streaming(report)
        if r["hot_loop"] and r["hot_loop"]["basis_before_use"] < 4
    ]
    assert not bad, "\n".join(bad)


def test_no_barrier_in_the_hot_loop(report):
    """No ``BAR`` (a cross-warp reduction or a shared-memory staging step) in the loop that
    streams the basis: register accumulators, reduced once per program. Before: 4-10 per
    config of project and the step's projection (a reduction per K tile and the gradient moved
    through shared memory), 4 in the STAGES = 3 configs of reconstruct and the write pass."""
    bad = [
        f"{_name(r)}: {r['hot_loop']['bar']} BAR"
        for r in _streaming(report)
        if r["hot_loop"] and r["hot_loop"]["bar"] != 0
    ]
    assert not bad, "\n".join(bad)


def test_registers_allow_the_programs_per_sm_the_grid_assumes(report):
    """A grid of PROGRAMS_PER_SM x SMs programs is one wave only if that many fit on an SM (by
    registers, shared memory and warps). Before: a fixed 4 per SM for every config, where 15 of
    the 21 sm_90 configs of project and the step's projection fit 1-3 (e.g. the step's
    [32, 512] tile, 155 registers at 8 warps: 1); orthogonalize_'s passes 1 and 2 too."""
    rows = [r for r in _streaming(report) if "assumed_per_sm" in r]
    assert {r["kernel"] for r in rows} == {
        "project", "step_project", "orthogonalize_pass1", "orthogonalize_pass2"
    }  # fmt: skip
    bad = [
        f"{_name(r)}: {r['resident']} resident ({r['regs']} registers, {r['shared']} B shared)"
        f" < {r['assumed_per_sm']}"
        for r in rows
        if r["resident"] < r["assumed_per_sm"]
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


def test_int8_values_are_dequantised_by_byte_permutes(report):
    """An int8 basis (project, reconstruct, the fused step's two passes): no ``I2F`` in the hot
    loop (a quarter-rate conversion per value would cap the read below the memory bandwidth)
    and a byte permute (``PRMT``, ``_common.int8_to_float``) per value read: 16 per 16-byte
    basis load."""
    rows = [r for r in _streaming(report) if r["dtype"] == "int8"]
    assert {r["kernel"] for r in rows} >= {"project", "reconstruct", "step_project", "step_write"}
    bad = [
        f"{_name(r)}: {r['hot_loop']['i2f']} I2F, {r['hot_loop']['prmt']} PRMT for "
        f"{r['hot_loop']['basis_ldg128']} basis loads"
        for r in rows
        if r["hot_loop"]
        and (r["hot_loop"]["i2f"] or r["hot_loop"]["prmt"] < 16 * r["hot_loop"]["basis_ldg128"])
    ]
    assert not bad, "\n".join(bad)


def test_int8_orthogonalize_passes_are_compiled_without_i2f(report):
    """orthogonalize_'s three passes over an int8 basis are among the streaming cases (checked
    like the float ones above) and dequantise with byte permutes, no ``I2F`` in their hot loops."""
    rows = [r for r in _streaming(report) if r["dtype"] == "int8" and r["kernel"].startswith("orthogonalize")]
    assert {r["kernel"] for r in rows} == {f"orthogonalize_pass{i}" for i in (1, 2, 3)}
    bad = [f"{_name(r)}: {r['hot_loop']['i2f']} I2F" for r in rows if r["hot_loop"] and r["hot_loop"]["i2f"]]
    assert not bad, "\n".join(bad)
