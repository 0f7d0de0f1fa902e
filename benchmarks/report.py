"""Turn pytest-benchmark JSONs of this suite into a markdown report and a PNG chart.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--out DIR] [--stat median|min]
                                [--merged MERGED.json] [--no-chart]

Several JSONs (one per benchmark file of a run, as ``gpu_check.sh`` writes them) are merged into
one set of results (``--merged`` writes it as one JSON). Writes ``DIR/report.md`` (default: the
first JSON's folder) with one table per operation, then:

- the speed targets, each stated as pass / fail / not measured for every (op, K, backend) at
  D >= 25M with an fp16 basis (``target_checks``): ``project`` and ``reconstruct`` at >= 90 % of
  the copy bandwidth; the whole step within 1.2x its floor at K >= 32 and 1.35x at K < 32, and
  >= 2.5x faster than the published step at K >= 32;
- the int8-basis targets, the same way (``int8_target_checks``): ``project`` and ``reconstruct``
  over an int8 basis at >= 85 % of the copy bandwidth (bytes: 1 per value and 4 per 64 values);
  the int8 step >= 1.7x faster than the fp16 step of the same backend and >= 4x faster than the
  published step, at K >= 101;
- the ``backend="auto"`` table entry of the card (``benchmarks/auto_table.py``) from the same
  results;
- the TWA overhead on a whole training step over ``torch.optim.SGD(fused=True)``, in ms and % of
  that step, per K and backend (``train_overheads``);

and prints these four to stdout. Then ``DIR/chart.png``, drawn with matplotlib: achieved GB/s
per operation, shape and provider against the copy bandwidth measured in the same run. Without
matplotlib (or with ``--no-chart``) the markdown is still written; without matplotlib the
command says what the chart needs and exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

OP_ORDER = ("project", "reconstruct", "orthogonalize", "step", "step-ratio", "train-step")
PROVIDER_ORDER = (
    "sgd-fused", "sgd", "published", "naive-fp32", "naive-fp16-upcast", "torch-fp32", "torch", "triton",
    "cuda",
)  # fmt: skip
# Greys for the baselines, Okabe-Ito colours (told apart with any colour vision) for the rest.
COLORS = {
    "published": "#3c3c3c", "naive-fp32": "#787878", "naive-fp16-upcast": "#bebebe",
    "torch-fp32": "#e69f00", "torch": "#56b4e9", "triton": "#009e73", "cuda": "#cc79a7",
}  # fmt: skip
COPY_COLOR = "#d55e00"
# int8-basis results: the provider's colour, hatched.
INT8_HATCH = "///"
MATPLOTLIB_INSTALL = "pip install matplotlib"
# The speed targets: at D >= 25M, fp16 basis, one vector, for each K and backend below.
TARGET_MIN_D = 25_000_000
TARGET_K = (8, 32, 101, 301)
TARGET_BACKENDS = ("triton", "cuda")
OP_TARGET_PCT = 90.0  # project and reconstruct: % of the copy bandwidth, at least
STEP_X_FLOOR = 1.2  # the whole step: time / floor, at most, at K >= LARGE_K
STEP_X_FLOOR_SMALL_K = 1.35  # the same below LARGE_K (stated at K = 8)
STEP_SPEEDUP = 2.5  # published step's time / the step's, at least, at K >= LARGE_K
LARGE_K = 32
# The int8-basis targets (one fp32 scale per 64 values), at the same sizes and backends.
INT8_OP_TARGET_PCT = 85.0  # project and reconstruct over int8: % of the copy bandwidth, at least
INT8_STEP_OVER_FP16 = 1.7  # the fp16 step's time / the int8 step's (same backend), at least
INT8_STEP_OVER_PUBLISHED = 4.0  # the published step's time / the int8 step's, at least
# Both step targets are stated from K = 101: below, the 12D bytes of gradients, w0 and weights
# every step moves bound the int8 step's gain over fp16 (at most 1.75x at K = 32, 1.84x at 101).
INT8_STEP_MIN_K = 101
# CPU: the reference step over an fp16 basis within this factor of the same over an fp32 basis.
CPU_FP16_OVER_FP32 = 1.5
# The training step every other optimizer's overhead is measured against.
TRAIN_REFERENCE = "sgd-fused"


def merge(datas: list[dict]) -> dict:
    """One pytest-benchmark JSON from several (e.g. one per benchmark file of a run): the
    benchmarks concatenated; machine_info, commit_info and datetime from the first;
    ``merged_from`` lists each part's datetime, copy bandwidth and number of results."""
    merged = dict(datas[0])
    merged["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    merged["merged_from"] = [
        {
            "datetime": d.get("datetime", ""),
            "copy_gbps": d.get("machine_info", {}).get("copy_gbps"),
            "results": len(d.get("benchmarks", [])),
        }
        for d in datas
    ]
    return merged


def read(paths: list[Path]) -> dict:
    """The JSONs at ``paths`` merged; a file that is not a benchmark JSON is skipped, named on
    stderr (a stage cut at its time limit may leave none, or a partial one)."""
    datas = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: skipped ({exc})", file=sys.stderr)
            continue
        if isinstance(data, dict):
            datas.append(data)
    return merge(datas) if datas else {"benchmarks": []}


def load(paths: Path | list[Path], stat: str, data: dict | None = None) -> tuple[dict, list[dict]]:
    """``(meta, rows)``: the run's machine info and one row per result of this suite.

    A row is the result's extra_info plus ``seconds`` (the ``stat`` over rounds) and, from it,
    ``gbps``, ``pct`` (% of the copy bandwidth its own process measured) and ``x_floor``.
    """
    if data is None:
        data = read([paths] if isinstance(paths, Path) else list(paths))
    meta = dict(data.get("machine_info", {}))
    meta["datetime"] = data.get("datetime", "")
    meta["stat"] = stat
    meta["parts"] = data.get("merged_from", [])
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        seconds = b["stats"][stat]
        row = dict(info, name=b["name"], group=b.get("group") or "", seconds=seconds)
        row["rounds"] = b["stats"]["rounds"]
        copy = info.get("copy_gbps") or meta.get("copy_gbps")
        row["copy_gbps"] = copy
        row["gbps"] = row["pct"] = row["x_floor"] = None
        if info.get("bytes_moved") and seconds > 0:
            row["gbps"] = info["bytes_moved"] / seconds / 1e9
            row["pct"] = 100 * row["gbps"] / copy if copy else None
        row["x_floor"] = _x_floor(row, copy)
        rows.append(row)
    return meta, rows


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _int8(row: dict) -> bool:
    return row.get("basis") == "int8"


def _label(row: dict) -> str:
    """The provider, with " int8" for an int8-basis result (the same provider's fp16 one is
    another result of the same shape)."""
    return row["provider"] + (" int8" if _int8(row) else "")


def _key(row: dict):
    op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    return (op, row["op"], row["D"], row["K"], row.get("B", 1), _int8(row), _provider_rank(row["provider"]))


def _fmt(x, digits=1, suffix=""):
    return "" if x is None else f"{x:.{digits}f}{suffix}"


def _shape(row: dict) -> str:
    b = f" B={row['B']}" if row.get("B", 1) != 1 else ""
    return f"{row['model']} K={row['K']}{b}"


def _by_group(rows: list[dict]) -> dict:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["model"], r["D"], r["K"], r.get("B", 1))][_label(r)] = r
    return groups


def markdown(meta: dict, rows: list[dict]) -> str:
    copy = meta.get("copy_gbps")
    parts = [part["copy_gbps"] for part in meta.get("parts", []) if part.get("copy_gbps")]
    copy_note = ""
    if len(parts) > 1:
        copy_note = (
            f" in the first of {len(parts)} processes ({min(parts)}-{max(parts)} GB/s over all; "
            "each result is compared with its own process's)"
        )
    out = [
        "# twa_kernels benchmarks",
        "",
        f"- card: {meta.get('card', '?')}; torch {meta.get('torch', '?')} "
        f"(CUDA {meta.get('cuda', '?')}); triton {meta.get('triton', '?')}",
        f"- commit: {meta.get('commit', '?')}; run: {meta.get('datetime', '?')}",
        f"- measured copy bandwidth: {copy} GB/s (read + write, {meta.get('copy_device', '?')})"
        f"{copy_note}; times are the {meta['stat']} over rounds",
        "- GB/s = the least bytes the provider's layout must move / time; x floor = time / "
        "(bytes an fp16-basis op must move / copy bandwidth; an int8-basis op's own bytes for the "
        "int8 results: 1 per value and 4 per 64 values); a read-mostly op can pass 100 % of a "
        "copy, which also writes what it reads",
        "",
    ]
    rows = sorted(rows, key=_key)
    groups = _by_group(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        out += [f"## {op}", ""]
        if op == "step-ratio":
            out += [
                "Steps over an fp16 and an fp32 basis (reference backend), interleaved round by "
                "round; times are each one's fastest round.",
                "",
                "| shape | D | fp16 ms | fp32 ms | ratio of mins | median of round ratios |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in mine:
                out.append(
                    f"| {_shape(r)} | {r['D']:,} | {r.get('fp16_min_ms', '')} | "
                    f"{r.get('fp32_min_ms', '')} | {r.get('ratio_of_mins', '')} | "
                    f"{r.get('median_round_ratio', '')} |"
                )
            out.append("")
            continue
        if op == "train-step":
            out += [
                f"| model | D | K | provider | basis | ms | overhead over {TRAIN_REFERENCE} |",
                "|---|---:|---:|---|---|---:|---:|",
            ]
            over = {(o.model, o.K, o.provider): o for o in train_overheads(mine)}
            for r in mine:
                o = over.get((r["model"], r["K"], r["provider"]))
                cell = f"{o.ms:+.2f} ms ({o.pct:+.1f}%)" if o else ""
                out.append(
                    f"| {r['model']} | {r['D']:,} | {r['K']} | {r['provider']} | {r.get('basis') or '-'} | "
                    f"{r['seconds'] * 1e3:.3f} | {cell} |"
                )
            out.append("")
            continue
        extra_col = " vs published |" if op == "step" else ""
        out += [
            f"| shape | D | provider | basis | ms | GB/s | % copy | x floor |{extra_col}",
            "|---|---:|---|---|---:|---:|---:|---:|" + ("---:|" if extra_col else ""),
        ]
        for r in mine:
            line = (
                f"| {_shape(r)} | {r['D']:,} | {r['provider']} | {r.get('basis') or '-'} | "
                f"{r['seconds'] * 1e3:.3f} | {_fmt(r.get('gbps'))} | {_fmt(r.get('pct'))} | "
                f"{_fmt(r.get('x_floor'), 2)} |"
            )
            if extra_col:
                pub = groups[(op, r["model"], r["D"], r["K"], 1)].get("published")
                line += f" {pub['seconds'] / r['seconds']:.2f}x |" if pub else " |"
            out.append(line)
        out.append("")
    out += targets_section(rows, meta["stat"])
    out += int8_targets_section(rows, meta["stat"])
    out += auto_section(meta, rows)
    out += train_section(rows)
    if not str(meta.get("copy_device", "cpu")).startswith("cuda"):  # a target for CPU runs only
        out += cpu_checks(groups)
    return "\n".join(out) + "\n"


def _x_floor(row: dict, copy_gbps) -> float | None:
    """time / (bytes an fp16-basis op must move / copy bandwidth)."""
    if not copy_gbps or not row.get("floor_bytes"):
        return None
    return row["seconds"] / (row["floor_bytes"] / (copy_gbps * 1e9))


# ---------------------------------------------------------------------------------------------
# the speed targets


@dataclass(frozen=True)
class Check:
    """One target for one (op, D, K, backend): ``passed`` None when it was not measured."""

    target: str
    op: str
    model: str
    D: int | None
    K: int
    provider: str
    value: float | None
    limit: float
    passed: bool | None
    basis: str = "fp16"

    @property
    def verdict(self) -> str:
        return "not measured" if self.passed is None else ("pass" if self.passed else "FAIL")


def _target_rows(rows: list[dict]) -> dict:
    """``{(op, D, K, provider): row}`` of the results the targets are stated for."""
    found = {}
    for r in rows:
        if r.get("D", 0) < TARGET_MIN_D or r.get("B", 1) != 1:
            continue
        if r["op"] not in ("project", "reconstruct", "step"):
            continue
        if r["provider"] != "published" and r.get("basis", "float16") != "float16":
            continue
        found[(r["op"], r["D"], r["K"], r["provider"])] = r
    return found


def target_checks(rows: list[dict]) -> list[Check]:
    """Every speed target at every measured D >= 25M, for K in ``TARGET_K`` and both backends.

    A target whose result is missing (skipped, cut by a time limit, or D >= 25M not measured at
    all) is listed as not measured, never as met.
    """
    found = _target_rows(rows)
    sizes = sorted({(D, r["model"]) for (_, D, _, _), r in found.items()})
    if not sizes:
        sizes = [(None, f"D >= {TARGET_MIN_D:,}")]
    checks = []
    for D, model in sizes:
        for op in ("project", "reconstruct", "step"):
            for K in TARGET_K:
                for backend in TARGET_BACKENDS:
                    r = found.get((op, D, K, backend))
                    if op != "step":
                        pct = r.get("pct") if r else None
                        ok = pct is not None and pct >= OP_TARGET_PCT
                        target = (f"% of copy bandwidth >= {OP_TARGET_PCT:g}", pct, OP_TARGET_PCT, ok)
                        checks.append(_check(target, op, model, D, K, backend))
                        continue
                    limit = STEP_X_FLOOR if K >= LARGE_K else STEP_X_FLOOR_SMALL_K
                    xf = r.get("x_floor") if r else None
                    ok = xf is not None and xf <= limit
                    checks.append(_check((f"x floor <= {limit:g}", xf, limit, ok), op, model, D, K, backend))
                    if K >= LARGE_K:
                        pub = found.get(("step", D, K, "published"))
                        speed = pub["seconds"] / r["seconds"] if (r and pub) else None
                        ok = speed is not None and speed >= STEP_SPEEDUP
                        target = (f"speedup over published >= {STEP_SPEEDUP:g}", speed, STEP_SPEEDUP, ok)
                        checks.append(_check(target, op, model, D, K, backend))
    return checks


def _check(
    target: tuple, op: str, model: str, D: int | None, K: int, backend: str, basis: str = "fp16"
) -> Check:
    """``target`` = (what, value, limit, passed); a missing value makes it not measured."""
    what, value, limit, passed = target
    return Check(what, op, model, D, K, backend, value, limit, None if value is None else passed, basis)


def _at_least(what: str, value: float | None, limit: float) -> tuple:
    """A target ``value >= limit``, as ``_check`` takes it."""
    return (f"{what} >= {limit:g}", value, limit, value is not None and value >= limit)


def int8_target_checks(rows: list[dict]) -> list[Check]:
    """The int8-basis targets at every measured D >= 25M, for K in ``TARGET_K`` and both backends:
    project and reconstruct over int8 at >= ``INT8_OP_TARGET_PCT`` % of the copy bandwidth; at
    K >= ``INT8_STEP_MIN_K`` the int8 step >= ``INT8_STEP_OVER_FP16``x faster than the fp16
    step of the same backend and >= ``INT8_STEP_OVER_PUBLISHED``x faster than the published step.

    A size counts as measured when any result of these ops is there (fp16, int8 or published):
    an int8 result missing there (skipped, cut by a time limit, not run) is not measured.
    """
    found, sizes = {}, set()
    for r in rows:
        if r.get("D", 0) < TARGET_MIN_D or r.get("B", 1) != 1 or r["op"] not in _TARGET_OPS:
            continue
        sizes.add((r["D"], r["model"]))
        kind = "published" if r["provider"] == "published" else r.get("basis")
        found[(r["op"], r["D"], r["K"], r["provider"], kind)] = r
    checks = []
    for D, model in sorted(sizes) or [(None, f"D >= {TARGET_MIN_D:,}")]:
        for op in _TARGET_OPS:
            for K in TARGET_K:
                for backend in TARGET_BACKENDS:
                    r = found.get((op, D, K, backend, "int8"))
                    if op != "step":
                        pct = r.get("pct") if r else None
                        targets = [_at_least("% of copy bandwidth", pct, INT8_OP_TARGET_PCT)]
                    elif K >= INT8_STEP_MIN_K:
                        over16 = _speedup(found.get((op, D, K, backend, "float16")), r)
                        overpub = _speedup(found.get((op, D, K, "published", "published")), r)
                        targets = [
                            _at_least("speedup over the fp16 step", over16, INT8_STEP_OVER_FP16),
                            _at_least("speedup over published", overpub, INT8_STEP_OVER_PUBLISHED),
                        ]
                    else:
                        targets = []
                    checks += [_check(t, op, model, D, K, backend, "int8") for t in targets]
    return checks


_TARGET_OPS = ("project", "reconstruct", "step")


def _speedup(base: dict | None, row: dict | None) -> float | None:
    """``base``'s time over ``row``'s; None when either is missing."""
    return base["seconds"] / row["seconds"] if (base and row) else None


def summarize(checks: list[Check], what: str = "speed targets") -> str:
    n = {v: sum(c.verdict == v for c in checks) for v in ("pass", "FAIL", "not measured")}
    verdict = "all met" if n["pass"] == len(checks) else "not all met"
    return (
        f"{what}: {verdict}: {n['pass']} pass, {n['FAIL']} fail, {n['not measured']} not "
        f"measured, of {len(checks)}"
    )


def _value(c: Check) -> str:
    if c.value is None:
        return "-"
    return f"{c.value:.1f} %" if c.target.startswith("%") else f"{c.value:.2f}x"


def targets_section(rows: list[dict], stat: str) -> list[str]:
    checks = target_checks(rows)
    out = [
        "## Speed targets",
        "",
        f"At D >= {TARGET_MIN_D:,}, fp16 basis, one vector, K in {', '.join(map(str, TARGET_K))}, "
        f"backends {' and '.join(TARGET_BACKENDS)}, from the {stat} times of this run: project and "
        f"reconstruct at >= {OP_TARGET_PCT:g} % of the copy bandwidth; the whole step within "
        f"{STEP_X_FLOOR:g}x its floor at K >= {LARGE_K} and {STEP_X_FLOOR_SMALL_K:g}x below, and "
        f">= {STEP_SPEEDUP:g}x faster than the published step at K >= {LARGE_K}.",
        "",
        f"**{summarize(checks)}**",
        "",
    ]
    return out + _checks_table(checks)


def _checks_table(checks) -> list[str]:
    """The markdown table of target checks (one row each), then a blank line."""
    head = ["| op | shape | backend | target | value | verdict |", "|---|---|---|---|---:|---|"]
    rows = [
        f"| {c.op} | {c.model} K={c.K} | {c.provider} | {c.target} | {_value(c)} | {c.verdict} |"
        for c in checks
    ]
    return head + rows + [""]


INT8_WHAT = "int8 speed targets"


def int8_targets_section(rows: list[dict], stat: str) -> list[str]:
    checks = int8_target_checks(rows)
    out = [
        "## Speed targets, int8 basis",
        "",
        f"At D >= {TARGET_MIN_D:,}, int8 basis (one fp32 scale per 64 values), one vector, backends "
        f"{' and '.join(TARGET_BACKENDS)}, from the {stat} times of this run: project and reconstruct "
        f"at >= {INT8_OP_TARGET_PCT:g} % of the copy bandwidth (K in {', '.join(map(str, TARGET_K))}; "
        f"bytes: 1 per value and 4 per 64 values); at K >= {INT8_STEP_MIN_K} the int8 step "
        f">= {INT8_STEP_OVER_FP16:g}x faster than the fp16 step of the same backend and "
        f">= {INT8_STEP_OVER_PUBLISHED:g}x faster than the published step.",
        "",
        f"**{summarize(checks, INT8_WHAT)}**",
        "",
    ]
    return out + _checks_table(checks)


# ---------------------------------------------------------------------------------------------
# backend="auto" and the training step


def auto_entry(meta: dict, rows: list[dict], margin: float | None = None) -> list[str]:
    """The lines ``python -m benchmarks.auto_table`` prints for these results."""
    from .auto_table import DEFAULT_MARGIN, entry

    card = meta.get("card", "unknown card")
    table = entry(rows, DEFAULT_MARGIN if margin is None else margin)
    when = f"commit {meta.get('commit', '?')} ({meta.get('datetime', '')})"
    lines = [f"# backend='auto' entry measured at {when}"]
    if not table:
        lines.append(f"# {card}: Triton everywhere (or no size with both backends measured)")
    return lines + [f"{card!r}: {table!r},"]


def auto_section(meta: dict, rows: list[dict]) -> list[str]:
    return [
        '## backend="auto" entry',
        "",
        f"For `twa_kernels/_auto_table.py`'s `TABLE`, from the {meta['stat']} times above "
        "(`benchmarks/auto_table.py`: CUDA where it beats Triton by more than 3 %):",
        "",
        "```python",
        *auto_entry(meta, rows),
        "```",
        "",
    ]


@dataclass(frozen=True)
class Overhead:
    """A training step's time over the reference's (same model and K): ms and % of it."""

    model: str
    K: int
    provider: str
    seconds: float
    reference_seconds: float
    floor_ms: float | None  # the TWA step's own floor at the copy bandwidth, if recorded

    @property
    def ms(self) -> float:
        return (self.seconds - self.reference_seconds) * 1e3

    @property
    def pct(self) -> float:
        return 100 * (self.seconds - self.reference_seconds) / self.reference_seconds


def train_overheads(rows: list[dict]) -> list[Overhead]:
    """Each train-step row over the ``TRAIN_REFERENCE`` row of its model and K."""
    train = [r for r in rows if r["op"] == "train-step"]
    ref = {(r["model"], r["K"]): r for r in train if r["provider"] == TRAIN_REFERENCE}
    out = []
    for r in train:
        base = ref.get((r["model"], r["K"]))
        if r["provider"] == TRAIN_REFERENCE or base is None:
            continue
        floor = None
        if r.get("step_floor_bytes") and r.get("copy_gbps"):
            floor = r["step_floor_bytes"] / (r["copy_gbps"] * 1e9) * 1e3
        out.append(Overhead(r["model"], r["K"], r["provider"], r["seconds"], base["seconds"], floor))
    return sorted(out, key=lambda o: (o.model, o.K, _provider_rank(o.provider)))


def train_section(rows: list[dict]) -> list[str]:
    overheads = train_overheads(rows)
    if not overheads:
        return []
    out = [
        "## Training step: overhead over torch.optim.SGD(fused=True)",
        "",
        f"Forward, backward and optimizer step; overhead = step time - the `{TRAIN_REFERENCE}` "
        "step's time at the same K (the reference is measured once per K).",
        "",
        f"| model | K | optimizer | step ms | {TRAIN_REFERENCE} ms | overhead ms | % of the "
        f"{TRAIN_REFERENCE} step | TWA step floor ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for o in overheads:
        out.append(
            f"| {o.model} | {o.K} | {o.provider} | {o.seconds * 1e3:.2f} | {o.reference_seconds * 1e3:.2f} | "
            f"{o.ms:+.2f} | {o.pct:+.2f} % | {_fmt(o.floor_ms, 2)} |"
        )
    return out + [""]


def cpu_checks(groups: dict) -> list[str]:
    """The CPU target: the reference step over an fp16 basis within 1.5x of an fp32 basis."""
    lines = []
    for (op, model, _D, K, _), provs in sorted(groups.items(), key=lambda kv: kv[0][1:]):
        if op == "step-ratio":
            r = provs.get("fp16/fp32")
            if r and "ratio_of_mins" in r:
                ratio = r["ratio_of_mins"]
                ok = "meets" if ratio <= CPU_FP16_OVER_FP32 else "misses"
                lines.append(
                    f"- step {model} K={K}, interleaved: fp16 basis / fp32 basis = {ratio:.2f}x "
                    f"(median round {r.get('median_round_ratio', '?')}x; {ok} <= "
                    f"{CPU_FP16_OVER_FP32}x on CPU)"
                )
        if op == "step":
            f16, f32 = provs.get("torch"), provs.get("torch-fp32")
            if f16 and f32:
                ratio = f16["seconds"] / f32["seconds"]
                ok = "meets" if ratio <= CPU_FP16_OVER_FP32 else "misses"
                lines.append(
                    f"- step {model} K={K} reference backend: fp16 basis / fp32 basis = "
                    f"{ratio:.2f}x ({ok} <= {CPU_FP16_OVER_FP32}x on CPU)"
                )
    if not lines:
        return []
    return ["## fp16 basis against fp32 basis (reference backend)", "", *lines, ""]


def summary_lines(meta: dict, rows: list[dict]) -> list[str]:
    """What the command prints: the fp16 and the int8 targets (failures and missing ones named),
    the auto entry, and the training-step overheads."""
    out = []
    for checks, what, basis in (
        (target_checks(rows), "speed targets", "an fp16"),
        (int8_target_checks(rows), INT8_WHAT, "any"),
    ):
        out.append(summarize(checks, what))
        if all(c.D is None for c in checks):
            out.append(f"  nothing measured at D >= {TARGET_MIN_D:,} with {basis} basis")
            continue
        out += [
            f"  {c.verdict}: {c.op} {c.model} K={c.K} {c.provider}"
            f"{' int8' if c.basis == 'int8' else ''}: {c.target} ({_value(c)})"
            for c in checks
            if c.verdict != "pass"
        ]
    out += auto_entry(meta, rows)
    for o in train_overheads(rows):
        out.append(
            f"train step {o.model} K={o.K} {o.provider}: {o.ms:+.2f} ms ({o.pct:+.2f} % of the "
            f"{TRAIN_REFERENCE} step, {o.reference_seconds * 1e3:.2f} ms)"
        )
    return out


def chart(meta: dict, rows: list[dict]):
    """Horizontal bars, a matplotlib ``Figure``: GB/s per (op, shape) group and provider, each
    bar labelled with its GB/s and % of the copy bandwidth, which is the vertical line.

    Drawn on matplotlib's Agg canvas, without pyplot: no display, no global backend switch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in sorted(rows, key=_key) if r.get("gbps") is not None]
    copy = meta.get("copy_gbps") or 0.0
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], _shape(r))].append(r)

    height = 1.6 + 0.17 * len(rows) + 0.12 * len(groups)
    fig = Figure(figsize=(11, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    legend = {}  # provider -> its bars, for the legend
    y, centres = 0.0, []
    for members in groups.values():
        first = y
        for r in members:
            name = _label(r)
            hatch = INT8_HATCH if _int8(r) else None
            bars = ax.barh(y, r["gbps"], height=0.8, color=COLORS.get(r["provider"], "black"), label=name,
                           hatch=hatch, edgecolor="white" if hatch else None)  # fmt: skip
            legend.setdefault(name, bars)
            pct = f" ({r['pct']:.0f}%)" if r.get("pct") is not None else ""
            ax.annotate(f"{r['gbps']:.1f}{pct}", (r["gbps"], y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)  # fmt: skip
            y += 1
        centres.append((first + y - 1) / 2)
        y += 0.6  # gap between groups
    ax.set_yticks(centres, [f"{op} {shape}" for op, shape in groups])
    ax.tick_params(axis="y", length=0, labelsize=8)
    ax.set_ylim(y - 0.4, -0.8)  # first group on top
    top = max([copy] + [r["gbps"] for r in rows])
    ax.set_xlim(0, 1.18 * top if top > 0 else 1.0)  # room for the bars' labels
    ax.set_xlabel("achieved GB/s (the least bytes the provider must move / time)")
    order = sorted(legend, key=lambda name: (name.endswith(" int8"), _provider_rank(name.split()[0])))
    handles = [legend[name] for name in order]
    if copy:
        for frac in (0.25, 0.5, 0.75):
            ax.axvline(frac * copy, color="0.88", linewidth=0.8, zorder=0)
        line = ax.axvline(copy, color=COPY_COLOR, linewidth=1.5, label=f"copy bandwidth {copy:.0f} GB/s")
        handles.append(line)
        pct_axis = ax.secondary_xaxis("top", functions=(lambda g: 100 * g / copy, lambda p: p * copy / 100))
        pct_axis.set_xticks([0, 25, 50, 75, 100])
        pct_axis.set_xlabel("% of the copy bandwidth")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    card = meta.get("card", "?")
    fig.suptitle(f"twa_kernels benchmarks: GB/s against the copy bandwidth, {card} ({meta['stat']} times)")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark outputs (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the first JSON's)")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--merged", type=Path, default=None, help="also write the merged results here")
    parser.add_argument("--no-chart", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)
    for path in args.json:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    data = read(args.json)
    if args.merged is not None:
        args.merged.parent.mkdir(parents=True, exist_ok=True)
        args.merged.write_text(json.dumps(data, indent=1))
    meta, rows = load(args.json, args.stat, data)
    names = ", ".join(str(p) for p in args.json)
    if not rows:
        print(f"{names}: no benchmark of this suite (nothing ran, or all skipped)", file=sys.stderr)
        return 1
    out = args.out or args.json[0].parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(meta, rows))
    print("\n".join(summary_lines(meta, rows)))
    if args.no_chart:
        print(f"wrote {out / 'report.md'} ({len(rows)} results)")
        return 0
    if importlib.util.find_spec("matplotlib") is None:
        print(
            f"wrote {out / 'report.md'} ({len(rows)} results); chart.png not drawn: the chart needs "
            f"matplotlib, which is not installed (`{MATPLOTLIB_INSTALL}`)",
            file=sys.stderr,
        )
        return 1
    chart(meta, rows).savefig(out / "chart.png")
    print(f"wrote {out / 'report.md'} and {out / 'chart.png'} ({len(rows)} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
