"""The ``backend="auto"`` table entry of a card, from a benchmark run on it.

    python -m benchmarks.auto_table RESULTS.json [--margin 0.03]

Prints the card's entry for ``twa_kernels._auto_table.TABLE``: per op, ``(min K * D, backend)``
thresholds. At each measured basis size (K * D, single vector; int8 results are left out, as
"auto" takes an int8 basis's backend from the package's list of int8 kernels) the CUDA
extension is chosen when its median time beats Triton's by more than ``margin`` (3 %: about the
spread of two runs of the same kernel), else Triton, the default. A threshold is written where
the choice changes, so sizes between two measured ones take the smaller one's choice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import auto_entry, load

# Benchmark op name -> twa:: op name the table is keyed on.
OPS = {"project": "project", "reconstruct": "reconstruct_", "orthogonalize": "orthogonalize_"}
DEFAULT = "triton"
DEFAULT_MARGIN = 0.03


def entry(rows: list[dict], margin: float) -> dict[str, list[tuple[int, str]]]:
    """``{op: [(min size, backend), ...]}`` from report rows; ops without both backends left out."""
    times: dict[str, dict[int, dict[str, float]]] = {}
    for r in rows:
        op = OPS.get(r["op"])
        if op is None or r.get("B", 1) != 1 or r["provider"] not in ("triton", "cuda"):
            continue
        if r.get("basis") == "int8":  # the table is for float bases; int8 has its own backends
            continue
        times.setdefault(op, {}).setdefault(r["K"] * r["D"], {})[r["provider"]] = r["seconds"]
    table = {}
    for op, by_size in sorted(times.items()):
        rules: list[tuple[int, str]] = []
        for size in sorted(by_size):
            t = by_size[size]
            if len(t) < 2:
                continue
            choice = "cuda" if t["cuda"] < (1.0 - margin) * t["triton"] else DEFAULT
            if not rules:
                rules.append((0, choice))
            elif choice != rules[-1][1]:
                rules.append((size, choice))
        if rules and rules != [(0, DEFAULT)]:
            table[op] = rules
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    args = parser.parse_args(argv)
    meta, rows = load(args.results, "median")
    print("\n".join(auto_entry(meta, rows, args.margin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
