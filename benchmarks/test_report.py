"""The report command on a small pytest-benchmark JSON of this suite's shape."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from .report import COLORS, MATPLOTLIB_INSTALL, chart, load, main


def _bench(op, provider, seconds, **info):
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
        _bench("train-step", "sgd", 0.1),
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
    assert "| m K=8 | 1,048,576 | torch | 1.000 | 21.0 | 104.9 |" in md
    assert "2.00x" in md  # the step's speedup over the published step
    assert "+10.00 ms (+10.0%)" in md  # train-step overhead over sgd
    assert "interleaved: fp16 basis / fp32 basis = 1.30x" in md
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
    assert "| m K=8 | 1,048,576 | torch | 1.000 |" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "chart.png").exists()
    assert "chart.png not drawn: the chart needs matplotlib" in capsys.readouterr().err


def test_report_min_statistic_and_empty_input(tmp_path, capsys):
    path = _write(tmp_path)
    assert main([str(path), "--stat", "min"]) == 0
    assert "| m K=8 | 1,048,576 | torch | 0.900 |" in (tmp_path / "report.md").read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert main([str(empty)]) == 1
    assert "no benchmark of this suite" in capsys.readouterr().err
