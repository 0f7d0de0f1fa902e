"""PNG plots of test accuracy against epochs for ``twa_kernels.demo``.

matplotlib draws the plot when it imports. Without it a small built-in rasteriser (numpy, zlib)
writes the same two panels with a 5x7 pixel font, so the demo never needs more than torch, numpy
and mlxtend: matplotlib and its 9 dependencies are about 40 MB, for a picture of a few lines.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PLOTTERS = ("auto", "matplotlib", "builtin")

# RGB of matplotlib's "tab10" cycle, so both plotters colour the runs alike.
COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
    (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
)  # fmt: skip


@dataclass
class Series:
    """One run on the plot: a line through ``points`` (epoch, accuracy %), or markers only."""

    label: str
    points: Sequence[tuple[float, float]]
    line: bool = True


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(path: str, series: Sequence[Series], title: str, zoom_from: float, plotter="auto") -> str:
    """Write the plot to ``path``: all epochs on the left, epochs >= ``zoom_from`` on the right.

    Returns the plotter used (``"matplotlib"`` or ``"builtin"``).
    """
    if plotter not in PLOTTERS:
        raise ValueError(f"plotter must be one of {PLOTTERS}, got {plotter!r}")
    if plotter == "auto":
        plotter = "matplotlib" if matplotlib_available() else "builtin"
    if plotter == "matplotlib":
        _write_matplotlib(path, series, title, zoom_from)
    else:
        _write_builtin(path, series, title, zoom_from)
    return plotter


# ---------------------------------------------------------------------------------------------


def _write_matplotlib(path, series, title, zoom_from) -> None:
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, lo in zip(axes, (None, zoom_from), strict=True):
        for i, s in enumerate(series):
            pts = [(x, y) for x, y in s.points if lo is None or x >= lo]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            color = tuple(c / 255 for c in COLORS[i % len(COLORS)])
            if s.line:
                ax.plot(xs, ys, "-o", color=color, markersize=3, linewidth=1.5, label=s.label)
            else:
                ax.plot(xs, ys, "s", color=color, markersize=8, label=s.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.set_title(title if lo is None else f"zoom: epochs >= {lo:g}")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------
# Built-in rasteriser.

# 5x7 glyphs, one 5-bit row per entry, top row first.
_FONT = {
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "-": (0, 0, 0, 0x1F, 0, 0, 0), "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0), "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02), ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    ">": (0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08), "<": (0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02),
}  # fmt: skip
_SCALE = 2  # font pixels per glyph pixel: 10x14 characters, readable at 100% zoom
_ADVANCE = 6 * _SCALE


def _text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0)) -> None:
    """Draw ``s`` with its top-left corner at (x, y); unknown characters are blanks."""
    for ch in s.upper():
        rows = _FONT.get(ch)
        if rows is not None:
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits >> (4 - c) & 1:
                        y0, x0 = y + r * _SCALE, x + c * _SCALE
                        img[max(y0, 0) : y0 + _SCALE, max(x0, 0) : x0 + _SCALE] = color
        x += _ADVANCE


def _text_width(s: str) -> int:
    return len(s) * _ADVANCE - _SCALE


def _box(img, x, y, half, color) -> None:
    h, w = img.shape[:2]
    img[max(y - half, 0) : min(y + half + 1, h), max(x - half, 0) : min(x + half + 1, w)] = color


def _segment(img, p0, p1, color, half=1) -> None:
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    for t in np.linspace(0.0, 1.0, n):
        _box(img, round(p0[0] + t * (p1[0] - p0[0])), round(p0[1] + t * (p1[1] - p0[1])), half, color)


def _nice_step(span: float, most: int, mantissas=(1, 2, 2.5, 5)) -> float:
    """The smallest m x 10^n step (m in ``mantissas``) that cuts ``span`` into <= ``most`` parts."""
    span = max(span, 1e-9)
    base = 10 ** math.floor(math.log10(span / most))
    for m in (*mantissas, 10):
        if span / (m * base) <= most:
            return m * base
    return 10 * base


def _decimals(step: float) -> int:
    """Digits after the point that write every multiple of ``step`` exactly (0.25 -> 2)."""
    for d in range(8):
        if abs(step * 10**d - round(step * 10**d)) < 1e-6:
            return d
    return 8


def _panel(img, left, top, width, height, series, lo, title) -> None:
    pts = [(x, y) for s in series for x, y in s.points if lo is None or x >= lo]
    xmin, xmax = min(x for x, _ in pts), max(x for x, _ in pts)
    ymin, ymax = min(y for _, y in pts), max(y for _, y in pts)
    if xmax == xmin:
        xmax = xmin + 1
    ypad = max((ymax - ymin) * 0.08, 0.05)
    ymin, ymax = ymin - ypad, min(ymax + ypad, 100.0 + ypad)
    ml, mb, mt, mr = 78, 44, 30, 14  # margins: tick labels left, axis label below, title above
    x0, x1, y0, y1 = left + ml, left + width - mr, top + mt, top + height - mb

    def px(x, y):
        return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

    grid, axis = (225, 225, 225), (0, 0, 0)
    ystep = _nice_step(ymax - ymin, 6)
    yd = _decimals(ystep)
    yt = math.ceil(ymin / ystep) * ystep
    while yt <= ymax + 1e-9:
        _, py = px(xmin, yt)
        img[round(py), x0:x1] = grid
        label = f"{yt:.{yd}f}"
        _text(img, x0 - 8 - _text_width(label), round(py) - 7, label)
        yt += ystep
    xstep = max(1.0, _nice_step(xmax - xmin, 8, (1, 2, 5)))  # whole epochs
    xt = math.ceil(xmin / xstep) * xstep
    while xt <= xmax + 1e-9:
        pxx, _ = px(xt, ymin)
        img[y0:y1, round(pxx)] = grid
        label = f"{xt:g}"
        _text(img, round(pxx) - _text_width(label) // 2, y1 + 6, label)
        xt += xstep
    img[y0 : y1 + 1, x0] = axis
    img[y0 : y1 + 1, x1] = axis
    img[y0, x0 : x1 + 1] = axis
    img[y1, x0 : x1 + 1] = axis
    _text(img, (x0 + x1 - _text_width("EPOCH")) // 2, y1 + 26, "EPOCH")
    _text(img, x0, top + 8, title)

    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        spts = [px(x, y) for x, y in s.points if lo is None or x >= lo]
        if s.line:
            for a, b in zip(spts, spts[1:], strict=False):
                _segment(img, a, b, color)
            for p in spts:
                _box(img, round(p[0]), round(p[1]), 2, color)
        else:
            for p in spts:
                _box(img, round(p[0]), round(p[1]), 5, color)


def _write_builtin(path, series, title, zoom_from) -> None:
    width, panel_h, legend_row = 1300, 480, 22
    rows = math.ceil(len(series) / 3)
    height = panel_h + rows * legend_row + 16
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    _panel(img, 0, 0, width // 2, panel_h, series, None, title + " (%)")
    _panel(img, width // 2, 0, width // 2, panel_h, series, zoom_from, f"ZOOM: EPOCHS >= {zoom_from:g}")
    for i, s in enumerate(series):
        x, y = 90 + (i % 3) * 400, panel_h + 6 + (i // 3) * legend_row
        _box(img, x, y + 7, 5, COLORS[i % len(COLORS)])
        _text(img, x + 14, y, s.label)
    _save_png(path, img)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _save_png(path: str, img: np.ndarray) -> None:
    """An 8-bit RGB PNG: one filter byte (0, none) before each row, then zlib."""
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(_chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(_chunk(b"IEND", b""))
