"""Turn a pytest-benchmark JSON of this suite into a markdown report and a PNG chart.

    python -m benchmarks.report RESULTS.json [--out DIR] [--stat median|min]

Writes ``DIR/report.md`` (default: the JSON's folder) with one table per operation, the checks
against DESIGN.md section 6, and ``DIR/chart.png``: achieved GB/s per operation, shape and
provider against the copy bandwidth measured in the same run. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from .png import Canvas

OP_ORDER = ("project", "reconstruct", "orthogonalize", "step", "step-ratio", "train-step")
PROVIDER_ORDER = (
    "sgd", "published", "naive-fp32", "naive-fp16-upcast", "torch-fp32", "torch", "triton", "cuda",
)  # fmt: skip
COLORS = {
    "published": (60, 60, 60), "naive-fp32": (120, 120, 120),
    "naive-fp16-upcast": (190, 190, 190), "torch-fp32": (230, 159, 0), "torch": (86, 180, 233),
    "triton": (0, 158, 115), "cuda": (204, 121, 167),
}  # fmt: skip
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


def _key(row: dict):
    op = OP_ORDER.index(row["op"]) if row["op"] in OP_ORDER else len(OP_ORDER)
    prov = row["provider"]
    p = PROVIDER_ORDER.index(prov) if prov in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return (op, row["op"], row["D"], row["K"], row.get("B", 1), p)


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


def chart(meta: dict, rows: list[dict]) -> bytes:
    """Horizontal bars: GB/s per (op, shape) group and provider, with the copy bandwidth line."""
    rows = [r for r in sorted(rows, key=_key) if r.get("gbps") is not None]
    copy = meta.get("copy_gbps") or 0.0
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], _shape(r))].append(r)
    bar, gap, pad = 10, 3, 8
    label_w, plot_w, value_w, top = 330, 560, 150, 70
    height = top + sum(len(g) * (bar + gap) + pad for g in groups.values()) + 40
    c = Canvas(label_w + plot_w + value_w, max(height, 120))
    top_gbps = max([copy] + [r["gbps"] for r in rows]) * 1.05 or 1.0
    scale = plot_w / top_gbps

    title = f"GB/S VS COPY BANDWIDTH {copy:.0f} GB/S - {meta.get('card', '?')}"
    c.text(8, 6, title[:140])
    x = 8
    for name in PROVIDER_ORDER:
        if name in COLORS and any(r["provider"] == name for r in rows):
            c.rect(x, 26, 12, 12, COLORS[name])
            x = c.text(x + 16, 28, name) + 14
    # gridlines at 25 % steps of the copy bandwidth, the bandwidth itself in red
    for frac in (0.25, 0.5, 0.75):
        gx = label_w + int(frac * copy * scale)
        c.rect(gx, top - 8, 1, height - top - 24, (225, 225, 225))
        c.text(gx - 12, top - 22, f"{frac:.0%}", (150, 150, 150))
    c.rect(label_w + int(copy * scale), top - 8, 2, height - top - 24, (213, 94, 0))
    c.text(label_w + int(copy * scale) - 40, top - 22, "COPY BW", (213, 94, 0))

    y = top
    for (op, shape), members in groups.items():
        c.text(8, y + 1, f"{op} {shape}"[:40])
        for r in members:
            c.rect(label_w, y, int(r["gbps"] * scale), bar, COLORS.get(r["provider"], (0, 0, 0)))
            pct = f" {r['pct']:.0f}%" if r.get("pct") is not None else ""
            c.text(label_w + plot_w + 6, y, f"{r['gbps']:.1f}{pct}")
            y += bar + gap
        y += pad
        c.rect(0, y - pad // 2, c.width, 1, (240, 240, 240))
    return c.to_png()


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
    (out / "chart.png").write_bytes(chart(meta, rows))
    print(f"wrote {out / 'report.md'} and {out / 'chart.png'} ({len(rows)} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
