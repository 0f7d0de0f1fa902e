"""Turn a pytest-benchmark JSON of this suite into a markdown report and a PNG chart.

    python -m benchmarks.report RESULTS.json [--out DIR] [--stat median|min]

Writes ``DIR/report.md`` (default: the JSON's folder) with one table per operation and the checks
against DESIGN.md section 6, then ``DIR/chart.png``, drawn with matplotlib: achieved GB/s per
operation, shape and provider against the copy bandwidth measured in the same run. Without
matplotlib the markdown is still written and the command says what the chart needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

OP_ORDER = ("project", "reconstruct", "orthogonalize", "step", "step-ratio", "train-step")
PROVIDER_ORDER = (
    "sgd", "published", "naive-fp32", "naive-fp16-upcast", "torch-fp32", "torch", "triton", "cuda",
)  # fmt: skip
# Greys for the baselines, Okabe-Ito colours (told apart with any colour vision) for the rest.
COLORS = {
    "published": "#3c3c3c", "naive-fp32": "#787878", "naive-fp16-upcast": "#bebebe",
    "torch-fp32": "#e69f00", "torch": "#56b4e9", "triton": "#009e73", "cuda": "#cc79a7",
}  # fmt: skip
COPY_COLOR = "#d55e00"
MATPLOTLIB_INSTALL = "pip install matplotlib"
# DESIGN.md section 6.
OP_TARGET_PCT = 90.0
OP_TARGET_MIN_D = 25_000_000
STEP_TARGET_X_FLOOR = 1.2
STEP_TARGET_SPEEDUP = 3.0
CPU_FP16_OVER_FP32 = 1.5


def load(path: Path, stat: str) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        seconds = b["stats"][stat]
        row = dict(info, name=b["name"], group=b.get("group") or "", seconds=seconds)
        row["rounds"] = b["stats"]["rounds"]
        copy = info.get("copy_gbps")
        if info.get("bytes_moved") and seconds > 0:
            row["gbps"] = info["bytes_moved"] / seconds / 1e9
            row["pct"] = 100 * row["gbps"] / copy if copy else None
        rows.append(row)
    meta = dict(data.get("machine_info", {}))
    meta["datetime"] = data.get("datetime", "")
    meta["stat"] = stat
    return meta, rows


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _key(row: dict):
    op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    return (op, row["op"], row["D"], row["K"], row.get("B", 1), _provider_rank(row["provider"]))


def _fmt(x, digits=1, suffix=""):
    return "" if x is None else f"{x:.{digits}f}{suffix}"


def _shape(row: dict) -> str:
    b = f" B={row['B']}" if row.get("B", 1) != 1 else ""
    return f"{row['model']} K={row['K']}{b}"


def _by_group(rows: list[dict]) -> dict:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["model"], r["D"], r["K"], r.get("B", 1))][r["provider"]] = r
    return groups


def markdown(meta: dict, rows: list[dict]) -> str:
    copy = meta.get("copy_gbps")
    out = [
        "# twa_kernels benchmarks",
        "",
        f"- card: {meta.get('card', '?')}; torch {meta.get('torch', '?')} "
        f"(CUDA {meta.get('cuda', '?')}); triton {meta.get('triton', '?')}",
        f"- commit: {meta.get('commit', '?')}; run: {meta.get('datetime', '?')}",
        f"- measured copy bandwidth: {copy} GB/s (read + write, {meta.get('copy_device', '?')}); "
        f"times are the {meta['stat']} over rounds",
        "- GB/s = the least bytes the provider's layout must move / time; x floor = time / "
        "(bytes an fp16-basis op must move / copy bandwidth); a read-mostly op can pass 100 % "
        "of a copy, which also writes what it reads",
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
                "| model | D | K | provider | ms | overhead over sgd |",
                "|---|---:|---:|---|---:|---:|",
            ]
            for r in mine:
                sgd = groups[(op, r["model"], r["D"], r["K"], r.get("B", 1))].get("sgd")
                over = ""
                if sgd and r["provider"] != "sgd":
                    extra = r["seconds"] - sgd["seconds"]
                    over = f"{extra * 1e3:+.2f} ms ({100 * extra / sgd['seconds']:+.1f}%)"
                out.append(
                    f"| {r['model']} | {r['D']:,} | {r['K']} | {r['provider']} | "
                    f"{r['seconds'] * 1e3:.3f} | {over} |"
                )
            out.append("")
            continue
        extra_col = " vs published |" if op == "step" else ""
        out += [
            f"| shape | D | provider | ms | GB/s | % copy | x floor |{extra_col}",
            "|---|---:|---|---:|---:|---:|---:|" + ("---:|" if extra_col else ""),
        ]
        for r in mine:
            line = (
                f"| {_shape(r)} | {r['D']:,} | {r['provider']} | {r['seconds'] * 1e3:.3f} | "
                f"{_fmt(r.get('gbps'))} | {_fmt(r.get('pct'))} | "
                f"{_fmt(_x_floor(r, copy), 2)} |"
            )
            if extra_col:
                pub = groups[(op, r["model"], r["D"], r["K"], 1)].get("published")
                line += f" {pub['seconds'] / r['seconds']:.2f}x |" if pub else " |"
            out.append(line)
        out.append("")
    out += checks(groups, copy)
    return "\n".join(out) + "\n"


def _x_floor(row: dict, copy_gbps) -> float | None:
    """time / (bytes an fp16-basis op must move / copy bandwidth)."""
    if not copy_gbps or not row.get("floor_bytes"):
        return None
    return row["seconds"] / (row["floor_bytes"] / (copy_gbps * 1e9))


def checks(groups: dict, copy) -> list[str]:
    out = ["## Against the targets (DESIGN.md section 6)", ""]
    lines = []
    for (op, model, D, K, _), provs in sorted(groups.items(), key=lambda kv: kv[0][1:]):
        if op in ("project", "reconstruct", "orthogonalize") and D >= OP_TARGET_MIN_D:
            for name in ("triton", "cuda", "torch"):
                r = provs.get(name)
                if r and r.get("pct") is not None:
                    ok = "meets" if r["pct"] >= OP_TARGET_PCT else "misses"
                    lines.append(
                        f"- {op} {_shape(r)} {name}: {r['pct']:.1f}% of copy bandwidth "
                        f"({ok} >= {OP_TARGET_PCT:.0f}%)"
                    )
        if op == "step":
            pub = provs.get("published")
            for name in ("triton", "cuda", "torch"):
                r = provs.get(name)
                if not r:
                    continue
                xf = _x_floor(r, copy)
                msg = f"- step {model} K={K} {name}: {_fmt(xf, 2)}x its two-pass floor"
                if xf is not None:
                    msg += " (meets" if xf <= STEP_TARGET_X_FLOOR else " (misses"
                    msg += f" <= {STEP_TARGET_X_FLOOR}x)"
                if pub:
                    speed = pub["seconds"] / r["seconds"]
                    ok = "meets" if speed >= STEP_TARGET_SPEEDUP else "misses"
                    msg += f"; {speed:.2f}x faster than published ({ok} >= {STEP_TARGET_SPEEDUP}x)"
                lines.append(msg)
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
            continue
        if op == "step":
            f16, f32 = provs.get("torch"), provs.get("torch-fp32")
            if f16 and f32:
                ratio = f16["seconds"] / f32["seconds"]
                ok = "meets" if ratio <= CPU_FP16_OVER_FP32 else "misses"
                lines.append(
                    f"- step {model} K={K} reference backend: fp16 basis / fp32 basis = "
                    f"{ratio:.2f}x ({ok} <= {CPU_FP16_OVER_FP32}x on CPU)"
                )
    return out + (lines or ["- nothing to check in this run"]) + [""]


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
            name = r["provider"]
            bars = ax.barh(y, r["gbps"], height=0.8, color=COLORS.get(name, "black"), label=name)
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
    handles = [legend[name] for name in sorted(legend, key=_provider_rank)]
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
    parser.add_argument("json", type=Path, help="pytest-benchmark output (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: the JSON's)")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"{args.json} does not exist")
    meta, rows = load(args.json, args.stat)
    if not rows:
        print(f"{args.json}: no benchmark of this suite (nothing ran, or all skipped)", file=sys.stderr)
        return 1
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(meta, rows))
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
