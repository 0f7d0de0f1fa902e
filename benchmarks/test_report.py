"""The report command on a small pytest-benchmark JSON of this suite's shape."""

from __future__ import annotations

import json
import struct
import zlib

from .report import main


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


def test_report_writes_markdown_and_png(tmp_path):
    path = _write(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "test card" in md
    # project, torch: 20 MiB in 1 ms = 21.0 GB/s = 104.9 % of 20 GB/s
    assert "| m K=8 | 1,048,576 | torch | 1.000 | 21.0 | 104.9 |" in md
    assert "2.00x" in md  # the step's speedup over the published step
    assert "+10.00 ms (+10.0%)" in md  # train-step overhead over sgd
    assert "interleaved: fp16 basis / fp32 basis = 1.30x" in md
    png = (tmp_path / "out" / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 0 and height > 0
    # The one IDAT chunk decompresses to height rows of 1 filter byte + 3 bytes per pixel.
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    assert len(zlib.decompress(png[41 : 41 + length])) == height * (1 + 3 * width)


def test_report_min_statistic_and_empty_input(tmp_path, capsys):
    path = _write(tmp_path)
    assert main([str(path), "--stat", "min"]) == 0
    assert "| m K=8 | 1,048,576 | torch | 0.900 |" in (tmp_path / "report.md").read_text()
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert main([str(empty)]) == 1
    assert "no benchmark of this suite" in capsys.readouterr().err
