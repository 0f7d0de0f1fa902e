"""A minimal RGB canvas written as PNG with the standard library (zlib): bars, lines, text.

The report's chart needs filled rectangles and short labels, nothing more; writing them here
keeps the report runnable on machines without network access or plotting packages (the GPU
machines have neither matplotlib nor pip access). Text uses a 3x5 pixel font, upper case.
"""

from __future__ import annotations

import struct
import zlib

# 3x5 glyphs, rows top to bottom, 3 bits each; unknown characters draw as a space.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
    "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101",
    "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    "-": "000000111000000", ".": "000000000000010", "%": "101001010100101",
    "/": "001001010100100", "^": "010101000000000", "=": "000111000111000",
    "(": "001010010010001", ")": "100010010010100", ":": "000010000010000",
    "_": "000000000000111", "+": "000010111010000", ",": "000000000010100",
    "[": "011010010010011", "]": "110010010010110",
}  # fmt: skip


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, w: int, h: int, color) -> None:
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(self.width, x0 + max(0, int(w))), min(self.height, y0 + max(0, int(h)))
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = 3 * (y * self.width + x0)
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y); returns the x after the last glyph."""
        for ch in s.upper():
            bits = _GLYPHS.get(ch)
            if bits:
                for i, bit in enumerate(bits):
                    if bit == "1":
                        self.rect(x + (i % 3) * scale, y + (i // 3) * scale, scale, scale, color)
            x += 4 * scale
        return x

    @staticmethod
    def text_width(s: str, scale: int = 2) -> int:
        return 4 * scale * len(s)

    def to_png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )
