"""What ``backend="auto"`` picks on a GPU, per op and size, from committed measurements.

The choice is read from this table, never timed at run time (timing would make the first steps
slow and the choice noisy). Each card maps each op to thresholds on the basis size ``K * D``:
the entry with the largest threshold not above the size wins. Entries come from the benchmark
report (``benchmarks/report.py``) of a run on that card; a card or op without entries falls back
to Triton, the default on CUDA.
"""

from __future__ import annotations

# card name (torch.cuda.get_device_name) -> op -> [(min K*D, backend), ...]
TABLE: dict[str, dict[str, list[tuple[int, str]]]] = {}


def choose(op: str, size: int, card: str) -> str | None:
    """The measured faster backend for ``op`` on ``card`` at basis size ``size``, if known."""
    rules = TABLE.get(card, {}).get(op, [])
    best = None
    for threshold, backend in sorted(rules):
        if size >= threshold:
            best = backend
    return best
