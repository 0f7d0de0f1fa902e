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
    load,
    main,
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
