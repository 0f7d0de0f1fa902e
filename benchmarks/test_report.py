"""The report command on a small pytest-benchmark JSON of this suite's shape."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from .report import (
    COLORS,
    MATPLOTLIB_INSTALL,
    TARGET_BACKENDS,
    TARGET_K,
    chart,
    int8_target_checks,
    load,
    main,
    markdown,
    summarize,
    target_checks,
    train_overheads,
)


def _bench(op, provider, seconds, **info):
    info.setdefault(
        "basis", "float32" if provider in ("naive-fp32", "published", "torch-fp32") else "float16"
    )
    extra = dict(op=op, provider=provider, model="m", D=1 << 20, K=8, B=1, copy_gbps=20.0, **info)
    return {
        "group": f"{op} m-K8",
        "name": f"test_{op}[m-K8-{provider}]",
        "extra_info": extra,
        "stats": {"median": seconds, "min": seconds * 0.9, "rounds": 5},
    }


def _write(tmp_path):
    floor = 2 * 8 * (1 << 20) + 4 * (1 << 20)
    benchmarks = [
        _bench("project", "naive-fp32", 2e-3, bytes_moved=2 * floor, floor_bytes=floor),
        _bench("project", "torch", 1e-3, bytes_moved=floor, floor_bytes=floor),
        _bench("step", "published", 8e-3, bytes_moved=10 * floor, floor_bytes=5 * floor),
        _bench("step", "torch", 4e-3, bytes_moved=5 * floor, floor_bytes=5 * floor),
        _bench("step", "torch-fp32", 3e-3, bytes_moved=10 * floor, floor_bytes=5 * floor),
        _bench("step-ratio", "fp16/fp32", 7e-3, ratio_of_mins=1.3, median_round_ratio=1.35),
        _bench("train-step", "sgd-fused", 0.1, basis=None),
        _bench("train-step", "torch", 0.11),
    ]
    data = {
        "machine_info": {"card": "test card", "torch": "t", "triton": "x", "copy_gbps": 20.0},
        "benchmarks": benchmarks + [{"name": "foreign", "extra_info": {}, "stats": {}}],
        "datetime": "2026-01-01T00:00:00",
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def _imread(path):
    try:
        from matplotlib.image import imread
    except ImportError:
        pytest.fail(f"the report's chart needs matplotlib: {MATPLOTLIB_INSTALL}")
    return imread(path)


def test_report_writes_markdown_and_chart(tmp_path):
    path = _write(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "test card" in md
    # project, torch: 20 MiB in 1 ms = 21.0 GB/s = 104.9 % of 20 GB/s
    assert "| m K=8 | 1,048,576 | torch | float16 | 1.000 | 21.0 | 104.9 |" in md
    assert "2.00x" in md  # the step's speedup over the published step
    assert "+10.00 ms (+10.0%)" in md  # train-step overhead over sgd-fused
    assert "| m | 8 | torch | 110.00 | 100.00 | +10.00 | +10.00 % |" in md
    assert "interleaved: fp16 basis / fp32 basis = 1.30x" in md
    # D = 2^20 < 25M: every speed target is listed as not measured, none as met.
    assert "**speed targets: not all met: 0 pass, 0 fail, 30 not measured, of 30**" in md
    assert "'test card': {}," in md  # the auto entry: no op with both backends
    img = _imread(tmp_path / "out" / "chart.png")
    height, width = img.shape[:2]
    assert width == 1100 and 200 < height < 1000
    # Each provider's bars are drawn: more pixels of its colour than its legend key has (~150;
    # the narrowest bar here, naive-fp32's, has about 4,000).
    from matplotlib.colors import to_rgb

    for name in ("published", "naive-fp32", "torch-fp32", "torch"):
        color = np.asarray(to_rgb(COLORS[name]))
        pixels = np.all(np.abs(img[..., :3] - color) < 0.02, axis=-1).sum()
        assert pixels > 1000, f"{name}: {pixels} pixels of its colour"


def test_chart_has_a_bar_per_result_with_gbps(tmp_path):
    meta, rows = load(_write(tmp_path), "median")
    fig = chart(meta, rows)
    (ax,) = fig.axes
    # project: naive-fp32, torch; step: published, torch-fp32, torch (step-ratio and train-step
    # have no GB/s). Widths are GB/s: 40, 20 MiB in 2, 1 ms; 200, 200, 100 MiB in 8, 3, 4 ms.
    floor_gb = (2 * 8 + 4) * (1 << 20) / 1e9
    expected = [2 * floor_gb / 2e-3, floor_gb / 1e-3, 10 * floor_gb / 8e-3, 10 * floor_gb / 3e-3,
                5 * floor_gb / 4e-3]  # fmt: skip
    assert [p.get_width() for p in ax.patches] == pytest.approx(expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["project m K=8", "step m K=8"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "published", "naive-fp32", "torch-fp32", "torch", "copy bandwidth 20 GB/s",
    ]  # fmt: skip
    assert [tuple(line.get_xdata()) for line in ax.lines][-1] == (20.0, 20.0)  # the copy line
    assert "test card" in fig.get_suptitle() and ax.get_xlabel().startswith("achieved GB/s")
    # Results without GB/s only: an empty chart, not an error.
    assert not chart(meta, [r for r in rows if r["op"] == "train-step"]).axes[0].patches


def test_without_matplotlib_the_markdown_is_written_and_the_chart_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = _write(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 1
    assert "| m K=8 | 1,048,576 | torch | float16 | 1.000 |" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "chart.png").exists()
    assert "chart.png not drawn: the chart needs matplotlib" in capsys.readouterr().err


def test_report_min_statistic_and_empty_input(tmp_path, capsys):
    path = _write(tmp_path)
    assert main([str(path), "--stat", "min"]) == 0
    assert "| m K=8 | 1,048,576 | torch | float16 | 0.900 |" in (tmp_path / "report.md").read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert main([str(empty)]) == 1
    assert "no benchmark of this suite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the speed targets, on synthetic rows

D50 = 25_557_032


def _row(op, provider, K, seconds, D=D50, B=1, basis="float16", **extra):
    row = dict(op=op, provider=provider, model="resnet50", D=D, K=K, B=B, basis=basis, seconds=seconds)
    return row | extra


def _passing_rows():
    """Rows that meet every target by a margin, for each K and backend."""
    rows = []
    for K in TARGET_K:
        rows.append(_row("step", "published", K, 3.0, basis="float32"))
        for b in TARGET_BACKENDS:
            rows.append(_row("project", b, K, 1.0, pct=95.0))
            rows.append(_row("reconstruct", b, K, 1.0, pct=92.0))
            rows.append(_row("step", b, K, 1.0, x_floor=1.1))
    return rows


def _verdicts(rows):
    return {(c.op, c.K, c.provider, c.target.split()[0]): c.verdict for c in target_checks(rows)}


def test_every_target_is_checked_and_met_by_passing_rows():
    checks = target_checks(_passing_rows())
    # project and reconstruct: K x backend; step: x floor at every K, speedup at K >= 32.
    assert len(checks) == 2 * 4 * 2 + 4 * 2 + 3 * 2
    assert {c.verdict for c in checks} == {"pass"}
    assert summarize(checks).startswith("speed targets: all met: 30 pass, 0 fail, 0 not measured")


@pytest.mark.parametrize(
    "op, K, field, value, verdict",
    [
        ("project", 32, "pct", 90.0, "pass"),  # the bound itself meets the target
        ("project", 32, "pct", 89.9, "FAIL"),
        ("reconstruct", 301, "pct", 89.99, "FAIL"),
        ("reconstruct", 8, "pct", 100.5, "pass"),
        ("step", 32, "x_floor", 1.2, "pass"),
        ("step", 101, "x_floor", 1.21, "FAIL"),
        ("step", 8, "x_floor", 1.3, "pass"),  # K = 8 has the looser bound, 1.35
        ("step", 8, "x_floor", 1.35, "pass"),
        ("step", 8, "x_floor", 1.36, "FAIL"),
    ],
)
def test_each_bound(op, K, field, value, verdict):
    rows = _passing_rows()
    for r in rows:
        if (r["op"], r["K"], r["provider"]) == (op, K, "cuda"):
            r[field] = value
    got = _verdicts(rows)
    target = "%" if field == "pct" else "x"
    assert got[(op, K, "cuda", target)] == verdict
    assert got[(op, K, "triton", target)] == "pass"  # the other backend is judged on its own
    assert sum(v == "FAIL" for v in got.values()) == (verdict == "FAIL")


@pytest.mark.parametrize(
    "K, published_s, verdict", [(32, 2.5, "pass"), (32, 2.49, "FAIL"), (301, 10.0, "pass")]
)
def test_speedup_over_published(K, published_s, verdict):
    rows = _passing_rows()
    for r in rows:
        if r["op"] == "step" and r["K"] == K and r["provider"] == "published":
            r["seconds"] = published_s  # the backends take 1.0 s
    got = _verdicts(rows)
    assert got[("step", K, "triton", "speedup")] == got[("step", K, "cuda", "speedup")] == verdict


def test_no_speedup_target_at_k8():
    rows = _passing_rows()
    for r in rows:
        if r["op"] == "step" and r["K"] == 8 and r["provider"] == "published":
            r["seconds"] = 1.1  # 1.1x: would fail a speedup target
    assert not any(key[3] == "speedup" and key[1] == 8 for key in _verdicts(rows))
    assert {c.verdict for c in target_checks(rows)} == {"pass"}


def test_missing_results_are_not_measured_never_met():
    rows = [r for r in _passing_rows() if not (r["provider"] == "cuda" and r["K"] == 301)]
    rows = [r for r in rows if not (r["provider"] == "published" and r["K"] == 101)]
    got = _verdicts(rows)
    missing = {k for k, v in got.items() if v == "not measured"}
    assert missing == {
        ("project", 301, "cuda", "%"), ("reconstruct", 301, "cuda", "%"),
        ("step", 301, "cuda", "x"), ("step", 301, "cuda", "speedup"),
        ("step", 101, "triton", "speedup"), ("step", 101, "cuda", "speedup"),
    }  # fmt: skip
    assert "not all met: 24 pass, 0 fail, 6 not measured" in summarize(target_checks(rows))


def test_only_large_fp16_single_vector_results_count():
    rows = _passing_rows()
    # Failing values where no target is stated: D < 25M, a batch of 8, an fp32 basis, torch.
    rows += [
        _row("project", "triton", 8, 1.0, D=11_689_512, pct=10.0),
        _row("project", "triton", 8, 1.0, B=8, pct=10.0),
        _row("project", "torch", 8, 1.0, pct=10.0),
        _row("step", "torch", 32, 9.0, x_floor=9.0),
        _row("orthogonalize", "cuda", 32, 1.0, pct=10.0),
    ]
    small = [_row("project", "triton", 8, 1.0, D=11_689_512, pct=10.0)]
    assert {c.verdict for c in target_checks(rows)} == {"pass"}
    # Nothing at D >= 25M: every target is not measured.
    assert {c.verdict for c in target_checks(small)} == {"not measured"}
    assert len(target_checks(small)) == 30


def test_two_sizes_are_checked_each():
    rows = _passing_rows() + [dict(r, D=124_439_808, model="gpt2") for r in _passing_rows()]
    checks = target_checks(rows)
    assert len(checks) == 60 and {c.model for c in checks} == {"resnet50", "gpt2"}


def test_train_overheads_against_fused_sgd_per_k():
    rows = [
        _row("train-step", "sgd-fused", 32, 0.100, basis=None),
        _row("train-step", "triton", 32, 0.102, step_floor_bytes=4_240_000_000, copy_gbps=4240.0),
        _row("train-step", "cuda", 32, 0.0995),
        _row("train-step", "sgd-fused", 101, 0.101, basis=None),
        _row("train-step", "triton", 101, 0.106),
        _row("train-step", "published", 301, 0.2),  # no reference at K = 301: left out
    ]
    got = {(o.K, o.provider): o for o in train_overheads(rows)}
    assert set(got) == {(32, "triton"), (32, "cuda"), (101, "triton")}
    assert got[(32, "triton")].ms == pytest.approx(2.0)
    assert got[(32, "triton")].pct == pytest.approx(2.0)
    assert got[(32, "triton")].floor_ms == pytest.approx(1.0)
    assert got[(32, "cuda")].ms == pytest.approx(-0.5)  # faster than the reference: said so
    assert got[(101, "triton")].ms == pytest.approx(5.0)
    assert got[(101, "triton")].pct == pytest.approx(100 * 5 / 101)


def test_several_jsons_are_merged_and_checked(tmp_path, capsys):
    """Two files of one run (as gpu_check.sh writes them): one report, one merged JSON, the
    targets judged from both, each result against its own process's copy bandwidth."""
    D = D50

    def bench(op, provider, K, seconds, copy, floor):
        extra = dict(op=op, provider=provider, model="resnet50", D=D, K=K, B=1, copy_gbps=copy,
                     basis="float32" if provider == "published" else "float16",
                     bytes_moved=floor, floor_bytes=floor)  # fmt: skip
        return {"group": f"{op} K{K}", "name": f"test_{op}[{K}-{provider}]", "extra_info": extra,
                "stats": {"median": seconds, "min": seconds, "rounds": 3}}  # fmt: skip

    proj_floor = 2 * 32 * D + 4 * D
    step_floor = 4 * 32 * D + 12 * D
    # project at 95 % of 4000 GB/s (its process's), the step at 1.1x its floor at 4200 GB/s.
    ops_json = {"machine_info": {"card": "H", "copy_gbps": 4000.0}, "datetime": "t0", "benchmarks": [
        bench("project", b, 32, proj_floor / (0.95 * 4000e9), 4000.0, proj_floor) for b in ("triton", "cuda")
    ]}  # fmt: skip
    step_s = 1.1 * step_floor / 4200e9
    step_json = {"machine_info": {"card": "H", "copy_gbps": 4200.0}, "datetime": "t1", "benchmarks": [
        bench("step", "triton", 32, step_s, 4200.0, step_floor),
        bench("step", "published", 32, 3 * step_s, 4200.0, step_floor),
    ]}  # fmt: skip
    paths = []
    for name, data in (("a.json", ops_json), ("b.json", step_json)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    (tmp_path / "cut.json").write_text("{")  # a stage cut while writing: skipped, named
    merged = tmp_path / "out" / "bench.json"
    args = [*map(str, paths), str(tmp_path / "cut.json"), "--out", str(tmp_path / "out")]
    assert main([*args, "--merged", str(merged), "--no-chart"]) == 0
    captured = capsys.readouterr()
    assert "cut.json: skipped" in captured.err
    data = json.loads(merged.read_text())
    assert len(data["benchmarks"]) == 4 and [p["copy_gbps"] for p in data["merged_from"]] == [4000.0, 4200.0]
    assert not (tmp_path / "out" / "chart.png").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(4000.0-4200.0 GB/s over all" in md
    assert "| project | resnet50 K=32 | triton | % of copy bandwidth >= 90 | 95.0 % | pass |" in md
    assert "| step | resnet50 K=32 | triton | x floor <= 1.2 | 1.10x | pass |" in md
    assert "| step | resnet50 K=32 | triton | speedup over published >= 2.5 | 3.00x | pass |" in md
    assert "| step | resnet50 K=32 | cuda | x floor <= 1.2 | - | not measured |" in md
    assert "  not measured: step resnet50 K=32 cuda: x floor <= 1.2 (-)" in captured.out
    assert "  pass:" not in captured.out  # only what is not met is named


# ---------------------------------------------------------------------------------------------
# the int8-basis targets


def _passing_int8_rows():
    """fp16, int8 and published rows that meet every int8 target by a margin: int8 project and
    reconstruct at 90 / 88 % of the copy bandwidth; the int8 step 1.0 s against 2.5 s (fp16,
    2.5x) and 5.0 s (published, 5x)."""
    rows = []
    for K in TARGET_K:
        rows.append(_row("step", "published", K, 5.0, basis="float32"))
        for b in TARGET_BACKENDS:
            rows.append(_row("project", b, K, 1.0, pct=95.0))
            rows.append(_row("project", b, K, 0.55, basis="int8", pct=90.0))
            rows.append(_row("reconstruct", b, K, 0.55, basis="int8", pct=88.0))
            rows.append(_row("step", b, K, 2.5, x_floor=1.1))
            rows.append(_row("step", b, K, 1.0, basis="int8", x_floor=1.1))
    return rows


def _int8_verdicts(rows):
    return {(c.op, c.K, c.provider, c.target): c.verdict for c in int8_target_checks(rows)}


OVER_FP16, OVER_PUB = "speedup over the fp16 step >= 1.7", "speedup over published >= 4"


def test_every_int8_target_is_checked_and_met_by_passing_rows():
    checks = int8_target_checks(_passing_int8_rows())
    # project and reconstruct: K x backend; the step: two targets at K = 101 and 301 per backend.
    assert len(checks) == 2 * 4 * 2 + 2 * 2 * 2
    assert {c.verdict for c in checks} == {"pass"} and {c.basis for c in checks} == {"int8"}
    assert {(c.op, c.K) for c in checks if c.op == "step"} == {("step", 101), ("step", 301)}
    assert summarize(checks, "int8 speed targets").startswith("int8 speed targets: all met: 24 pass, 0 fail")
    # int8 rows, failing any fp16 target, do not enter the fp16 targets.
    int8 = [dict(r, pct=1.0, x_floor=9.0, seconds=99.0) for r in _passing_int8_rows() if r["basis"] == "int8"]
    assert {c.verdict for c in target_checks(_passing_rows() + int8)} == {"pass"}


PCT85 = "% of copy bandwidth >= 85"


@pytest.mark.parametrize(
    "op, K, basis, field, value, target, verdict",
    [
        ("project", 8, "int8", "pct", 85.0, PCT85, "pass"),  # the bound itself meets the target
        ("project", 32, "int8", "pct", 84.99, PCT85, "FAIL"),
        ("reconstruct", 301, "int8", "pct", 84.9, PCT85, "FAIL"),
        ("reconstruct", 101, "int8", "pct", 86.0, PCT85, "pass"),
        # the fp16 step's time over the int8 step's 1.0 s
        ("step", 101, "float16", "seconds", 1.7, OVER_FP16, "pass"),
        ("step", 101, "float16", "seconds", 1.69, OVER_FP16, "FAIL"),
        # the published step's 5.0 s over the int8 step's time (2.5 s for the fp16 step)
        ("step", 301, "int8", "seconds", 1.25, OVER_PUB, "pass"),
        ("step", 301, "int8", "seconds", 1.26, OVER_PUB, "FAIL"),
    ],
)
def test_each_int8_bound(op, K, basis, field, value, target, verdict):
    rows = _passing_int8_rows()
    for r in rows:
        if (r["op"], r["K"], r["provider"], r["basis"]) == (op, K, "cuda", basis):
            r[field] = value
    got = _int8_verdicts(rows)
    assert got[(op, K, "cuda", target)] == verdict
    assert got[(op, K, "triton", target)] == "pass"  # the other backend is judged on its own
    assert sum(v == "FAIL" for v in got.values()) == (verdict == "FAIL")


def test_int8_step_is_compared_with_the_fp16_step_of_its_backend():
    rows = _passing_int8_rows()
    for r in rows:
        if (r["op"], r["K"], r["provider"], r["basis"]) == ("step", 101, "triton", "float16"):
            r["seconds"] = 1.5  # triton's fp16 step faster: its int8 step gains 1.5x, under 1.7x
    got = _int8_verdicts(rows)
    assert got[("step", 101, "triton", OVER_FP16)] == "FAIL"
    assert got[("step", 101, "cuda", OVER_FP16)] == "pass"
    assert got[("step", 101, "triton", OVER_PUB)] == "pass"


def test_int8_step_targets_start_at_k101():
    rows = _passing_int8_rows()
    for r in rows:
        if r["op"] == "step" and r["K"] in (8, 32) and r["basis"] == "int8":
            r["seconds"] = 2.4  # 1.04x the fp16 step, 2.1x the published one: no target there
    assert {c.verdict for c in int8_target_checks(rows)} == {"pass"}


def test_missing_int8_results_are_not_measured_never_met():
    # int8 project at K = 32 gone (the fp16 one, at 95 %, must not stand in for it); the cuda
    # fp16 step at K = 301 gone; the published step at K = 101 gone.
    rows = [r for r in _passing_int8_rows() if (r["op"], r["K"], r["basis"]) != ("project", 32, "int8")]
    rows = [
        r for r in rows if (r["op"], r["K"], r["provider"], r["basis"]) != ("step", 301, "cuda", "float16")
    ]
    rows = [r for r in rows if (r["provider"], r["K"]) != ("published", 101)]
    got = _int8_verdicts(rows)
    missing = {k for k, v in got.items() if v == "not measured"}
    assert missing == {
        ("project", 32, "triton", PCT85), ("project", 32, "cuda", PCT85),
        ("step", 301, "cuda", OVER_FP16), ("step", 101, "triton", OVER_PUB), ("step", 101, "cuda", OVER_PUB),
    }  # fmt: skip
    # Only fp16 results at D >= 25M: every int8 target not measured at that size.
    fp16_only = [r for r in _passing_int8_rows() if r["basis"] != "int8"]
    assert {c.verdict for c in int8_target_checks(fp16_only)} == {"not measured"}
    assert len(int8_target_checks(fp16_only)) == 24
    # Nothing at D >= 25M: one set of targets, all not measured, no size named.
    small = [dict(r, D=11_689_512) for r in _passing_int8_rows()]
    assert [c.D for c in int8_target_checks(small)] == [None] * 24


def test_int8_targets_from_a_bench_json(tmp_path, capsys):
    """A pytest-benchmark JSON as a GPU run writes it: the report computes each int8 op's % of the
    copy bandwidth from its bytes (1 per value + 4 per 64 values) and states every int8 target."""
    D, copy = D50, 4000.0
    int8_basis = {K: K * D + 4 * K * -(-D // 64) for K in TARGET_K}

    def bench(op, provider, K, seconds, basis, nbytes):
        extra = dict(op=op, provider=provider, model="resnet50", D=D, K=K, B=1, copy_gbps=copy,
                     basis=basis, bytes_moved=nbytes, floor_bytes=nbytes)  # fmt: skip
        suffix = "-int8" if basis == "int8" else ""
        return {"group": f"{op} K{K}", "name": f"test_{op}[resnet50-K{K}-{provider}{suffix}]",
                "extra_info": extra, "stats": {"median": seconds, "min": seconds, "rounds": 3}}  # fmt: skip

    benchmarks = []
    for K in TARGET_K:
        proj, recon = int8_basis[K] + 4 * D, int8_basis[K] + 8 * D
        step16, step8 = 4 * K * D + 12 * D, 2 * int8_basis[K] + 12 * D
        for b in TARGET_BACKENDS:
            # triton: project at 86 %, reconstruct at 84 %; cuda: not run (skipped: no kernels)
            if b == "triton":
                benchmarks.append(bench("project", b, K, proj / (0.86 * copy * 1e9), "int8", proj))
                benchmarks.append(bench("reconstruct", b, K, recon / (0.84 * copy * 1e9), "int8", recon))
            t16 = step16 / (copy * 1e9)
            benchmarks.append(bench("step", b, K, t16, "float16", step16))
            if b == "triton":
                benchmarks.append(bench("step", b, K, t16 / 1.8, "int8", step8))  # 1.8x fp16
        benchmarks.append(bench("step", "published", K, 6 * step16 / (copy * 1e9), "float32", 2 * step16))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {"card": "H", "copy_gbps": copy}, "benchmarks": benchmarks}))
    assert main([str(path), "--out", str(tmp_path), "--no-chart"]) == 0
    md = (tmp_path / "report.md").read_text()
    out = capsys.readouterr().out
    assert "## Speed targets, int8 basis" in md
    assert "| project | resnet50 K=101 | triton | % of copy bandwidth >= 85 | 86.0 % | pass |" in md
    assert "| reconstruct | resnet50 K=8 | triton | % of copy bandwidth >= 85 | 84.0 % | FAIL |" in md
    assert "| project | resnet50 K=8 | cuda | % of copy bandwidth >= 85 | - | not measured |" in md
    assert f"| step | resnet50 K=101 | triton | {OVER_FP16} | 1.80x | pass |" in md
    assert f"| step | resnet50 K=301 | triton | {OVER_PUB} | 10.80x | pass |" in md  # 6 x 1.8
    assert f"| step | resnet50 K=301 | cuda | {OVER_PUB} | - | not measured |" in md
    # triton: 4 project pass, 4 reconstruct fail, 4 step pass; cuda: 12 not measured
    line = "int8 speed targets: not all met: 8 pass, 4 fail, 12 not measured, of 24"
    assert f"**{line}**" in md and line in out
    assert "  FAIL: reconstruct resnet50 K=8 triton int8: % of copy bandwidth >= 85 (84.0 %)" in out
    assert "  not measured: step resnet50 K=101 cuda int8: speedup over the fp16 step >= 1.7 (-)" in out
    # Each table lists the int8 rows after the fp16 ones of the shape, with their basis.
    step_101 = [
        line for line in md.splitlines() if line.startswith("| resnet50 K=101 |") and "step" not in line
    ]
    assert any("| triton | int8 |" in line for line in step_101)


def test_int8_rows_beside_fp16_keep_the_cpu_check_on_fp16():
    """An int8 result of the same provider and shape is its own entry: the CPU fp16/fp32 check
    still compares the fp16 step with the fp32 one."""
    rows = [
        _row("step", "torch", 8, 2.0, D=1 << 20, model="m"),
        _row("step", "torch-fp32", 8, 1.6, D=1 << 20, model="m", basis="float32"),
        _row("step", "torch", 8, 9.0, D=1 << 20, model="m", basis="int8"),
    ]
    meta = {"stat": "median", "copy_device": "cpu", "copy_gbps": 20.0}
    md = markdown(meta, [dict(r, name="x", group="g", rounds=3) for r in rows])
    assert "reference backend: fp16 basis / fp32 basis = 1.25x" in md
    table = [line for line in md.splitlines() if line.startswith("| m K=8 |")]
    assert [line.split("|")[3:5] for line in table] == [
        [" torch-fp32 ", " float32 "], [" torch ", " float16 "], [" torch ", " int8 "],
    ]  # fmt: skip
