"""The suite's JSON as a run writes it: every bench file timed (``--benchmark-only``) on tiny CPU
shapes in a child pytest, then every result's ``extra_info`` and the report made from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .harness import REPO, RESULT_KEYS
from .report import main

BENCH_FILES = ["project", "reconstruct", "orthogonalize", "step", "train_step"]
FP32_BASIS = ("naive-fp32", "published", "torch-fp32")
# Ops measured against a byte floor: pct_copy_bw and x_floor are numbers; the others have none.
FLOOR_OPS = ("project", "reconstruct", "orthogonalize", "step", "step-granularity")


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, TWA_BENCH_DEVICE="cpu", TWA_BENCH_SHAPES="smoke", TWA_BENCH_THREADS="1")
    env["TWA_BENCH_TIME_S"] = "0.002"  # a few rounds of each: enough to fill every field
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={out}", *(f"benchmarks/bench_{name}.py" for name in BENCH_FILES)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_result_records_its_keys(bench_json):
    results = json.loads(bench_json.read_text())["benchmarks"]
    ops = {r["extra_info"]["op"] for r in results}
    assert ops == {*FLOOR_OPS, "step-ratio", "train-step"}
    for r in results:
        info = r["extra_info"]
        missing = [k for k in RESULT_KEYS if k not in info]
        assert not missing, f"{r['name']}: no {missing} in extra_info"
        for key in ("op", "provider", "D", "K", "B"):
            assert info[key] is not None, f"{r['name']}: {key} is None"
        provider, op = info["provider"], info["op"]
        if provider == "sgd-fused":
            expected = None  # no basis at all
        elif provider in FP32_BASIS:
            expected = "float32"
        elif r["name"].endswith("-int8]"):
            expected = "int8"
        else:
            expected = "float16"
        assert info["basis"] == expected, r["name"]
        if op in FLOOR_OPS:
            assert info["pct_copy_bw"] > 0 and info["x_floor"] > 0, r["name"]
        else:
            assert info["pct_copy_bw"] is None and info["x_floor"] is None, r["name"]
        for key in ("card", "torch", "triton", "commit", "copy_gbps"):
            assert info[key], f"{r['name']}: no {key}"


@pytest.mark.slow
def test_int8_results_beside_fp16(bench_json):
    """The backend providers' int8 cases (only the reference runs on the CPU): one per fp16 case
    of the same op and shape, their bytes counted at 1 byte per value and 4 per 64 values, and
    measured against their own floor."""
    results = [r["extra_info"] for r in json.loads(bench_json.read_text())["benchmarks"]]
    ops = ("project", "reconstruct", "orthogonalize", "step")

    def key(i):
        return (i["op"], i["D"], i["K"], i["B"])

    int8 = {key(i): i for i in results if i["basis"] == "int8"}
    fp16 = {key(i): i for i in results if i["provider"] == "torch" and i["basis"] == "float16"}
    assert {k[0] for k in int8} == set(ops)
    assert set(int8) == {k for k in fp16 if k[0] in ops}
    for (op, D, K, B), info in int8.items():
        assert info["provider"] == "torch"
        basis = K * D + 4 * K * -(-D // 64)  # int8 values and fp32 block scales
        expected = {
            "project": basis + 4 * B * D,
            "reconstruct": basis + 8 * D,
            "orthogonalize": 3 * ((K - 1) * D + 4 * (K - 1) * -(-D // 64) + 4 * D) + D + 4 * -(-D // 64),
            "step": 2 * basis + 12 * D,
        }[op]
        assert info["bytes_moved"] == info["floor_bytes"] == expected, (op, K)
        assert fp16[(op, D, K, B)]["bytes_moved"] > info["bytes_moved"]


@pytest.mark.slow
def test_report_of_the_run(bench_json, tmp_path, capsys):
    assert main([str(bench_json), "--out", str(tmp_path), "--no-chart"]) == 0
    md = (tmp_path / "report.md").read_text()
    for section in ("## project", "## step", "## train-step", "## Speed targets", '## backend="auto" entry',
                    "## Training step: overhead over torch.optim.SGD(fused=True)"):  # fmt: skip
        assert section in md
    out = capsys.readouterr().out
    # Tiny CPU shapes: the targets (D >= 25M) are not measured, and the report says so.
    assert "speed targets: not all met: 0 pass, 0 fail, 30 not measured" in out
    assert "train step lm-" in out and "of the sgd-fused step" in out
