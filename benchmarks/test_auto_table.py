"""The backend="auto" table entry written from benchmark rows."""

from __future__ import annotations

import json

from twa_kernels import _auto_table

from .auto_table import entry, main


def _row(op, provider, K, D, seconds, B=1):
    return dict(op=op, provider=provider, K=K, D=D, B=B, seconds=seconds)


def test_cuda_is_chosen_only_where_it_is_faster_by_the_margin():
    rows = [
        # small basis: CUDA 10 % faster; middle: 1 % faster (within the margin); large: slower
        _row("project", "triton", 8, 1000, 1.0), _row("project", "cuda", 8, 1000, 0.9),
        _row("project", "triton", 32, 1000, 1.0), _row("project", "cuda", 32, 1000, 0.99),
        _row("project", "triton", 301, 1000, 1.0), _row("project", "cuda", 301, 1000, 1.5),
        _row("project", "naive-fp32", 301, 1000, 0.1),  # other providers never enter
        _row("project", "cuda", 8, 1000, 0.1, B=8),  # batched rows neither
        _row("reconstruct", "triton", 8, 1000, 1.0), _row("reconstruct", "cuda", 8, 1000, 2.0),
        _row("orthogonalize", "triton", 8, 1000, 2.0), _row("orthogonalize", "cuda", 8, 1000, 1.0),
        _row("step", "triton", 8, 1000, 2.0), _row("step", "cuda", 8, 1000, 1.0),
    ]  # fmt: skip
    table = entry(rows, margin=0.03)
    assert table == {"project": [(0, "cuda"), (32_000, "triton")], "orthogonalize_": [(0, "cuda")]}
    # The table reads back as measured: sizes between two measured ones take the smaller's choice.
    _auto_table.TABLE["test card"] = table
    try:
        assert _auto_table.choose("project", 8_000, "test card") == "cuda"
        assert _auto_table.choose("project", 31_999, "test card") == "cuda"
        assert _auto_table.choose("project", 301_000, "test card") == "triton"
        assert _auto_table.choose("reconstruct_", 8_000, "test card") is None
    finally:
        del _auto_table.TABLE["test card"]


def test_int8_results_do_not_enter_the_float_table():
    rows = [_row("project", "triton", 8, 1000, 1.0), _row("project", "cuda", 8, 1000, 2.0)]
    int8 = [dict(_row("project", p, 8, 1000, t), basis="int8") for p, t in (("triton", 5.0), ("cuda", 0.1))]
    assert entry(rows + int8, margin=0.03) == {}  # Triton, from the fp16 times alone
    assert entry(int8, margin=0.03) == {}


def test_command_prints_a_table_entry(tmp_path, capsys):
    bench = [
        {"name": f"test_project[{p}]", "group": "g", "stats": {"median": s, "min": s, "rounds": 3},
         "extra_info": dict(op="project", provider=p, model="m", K=8, D=1000, B=1)}
        for p, s in (("triton", 2.0), ("cuda", 1.0))
    ]  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {"card": "X1", "commit": "abc"}, "benchmarks": bench}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "'X1': {'project': [(0, 'cuda')]}," in out and "abc" in out
