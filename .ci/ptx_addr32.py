"""Find global-memory addresses formed from 32-bit products in PTX (``nvcc -ptx`` output).

    python .ci/ptx_addr32.py [--expect-kernels NAME,...] file.ptx ...

A row index times a row stride (or a block index times a block size) multiplied in 32 bits
wraps once the product passes 2^31, and k x D passes 2^31 at GPT-2 and ResNet-50 sizes: the
kernel then reads or writes outside the basis. In PTX such a product is a ``mul.lo`` /
``mad.lo`` / ``mul24`` / ``mad24`` or a ``shl`` (a multiply by a power of two) on a 32-bit
type; ``mul.wide.{s,u}32`` (32 x 32 -> 64 bits) cannot wrap and is fine. In a loop the compiler
may strength-reduce ``k * stride`` into a running 32-bit sum, ``add.s32 %r5, %r5, %r4``: a
register stepped by itself plus a step that is not a small compile-time value counts too.

Rule: for every address of a global or generic memory access (``ld``, ``st``, ``atom``,
``red``, ``cp.async``, ``prefetch``, and the operand of ``cvta.to.global``), walk back over
every instruction that writes a register it is computed from (PTX is not SSA: a register
written in several places, a loop counter for example, stands for all of them). Every 32-bit
product met on the way is reported unless interval arithmetic proves its value within
[-2^31, 2^31) from what is known at compile time: immediates, ``%tid`` / ``%ntid`` /
``%laneid`` / ``%warpid`` (at most 1024), ``%ctaid`` (below 2^31) and the type of a register
where an op narrows it (``x >> 7`` of any 32-bit x times 128 fits; ``lane * 8`` fits; a
parameter, a loaded value or a loop-carried register times anything does not: form that
product in 64 bits). A chain ends at values that a wrapped input cannot push out of their
range: a loaded value, a cvt from 64 to fewer bits (nvcc computes a 64-bit ``i % K`` or
``i / K`` in 32-bit registers when a run-time test shows both fit; the low 32 bits of a
product are exact), a remainder and an ``and`` with a constant mask. Predicates are not
followed. Shared, local, param and const accesses do not address the basis and are not
checked.

Prints one line per finding (kernel, instruction, the access it feeds) and exits 1 unless the
kernels with findings are exactly ``--expect-kernels`` (default: none; the canary
``csrc/tests/addr32_canary.cu`` names the kernels that must be caught).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)")
_REG = re.compile(r"%[a-zA-Z_$][\w$]*(?:\.[xyz])?")
_PRODUCT = re.compile(r"^(?:mul|mad)(?:\.lo)?\.[su]32$|^(?:mul|mad)24(?:\.lo|\.hi)?\.[su]32$|^shl\.b32$")
_CHECKED_SPACES = {"global", None}  # generic addresses may point to global memory
_SMALL_SPECIAL = {
    "%tid.x": 1023, "%tid.y": 1023, "%tid.z": 63, "%ntid.x": 1024, "%ntid.y": 1024,
    "%ntid.z": 64, "%laneid": 31, "%warpid": 63, "%nwarpid": 64,
}  # fmt: skip
_SPACES = ("global", "shared", "local", "param", "const", "generic")


class Instr:
    __slots__ = ("opcode", "dst", "src", "text", "line")

    def __init__(self, opcode: str, dst: list[str], src: list[str], text: str, line: int):
        self.opcode, self.dst, self.src, self.text, self.line = opcode, dst, src, text, line


def _space(opcode: str) -> str | None:
    for part in opcode.split(".")[1:]:
        if part in _SPACES:
            return part
    return None


def _operands(rest: str) -> list[str]:
    """Operands split at top-level commas (``{..}`` vectors and ``[..]`` addresses kept whole)."""
    out, depth, cur = [], 0, []
    for ch in rest:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _regs(operand: str) -> list[str]:
    return [r for r in _REG.findall(operand) if not r.startswith("%p")] if operand else []


def functions(ptx: str) -> dict[str, list[Instr]]:
    """Instructions of each ``.entry`` / ``.func`` body."""
    funcs: dict[str, list[Instr]] = {}
    name, depth, body = None, 0, None
    for no, raw in enumerate(ptx.splitlines(), 1):
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if depth == 0 and (m := _ENTRY.match(line)):
            name = m[1]
            continue
        if name is not None and line.startswith("{") and depth == 0:
            depth, body = 1, funcs.setdefault(name, [])
            continue
        if depth == 0:
            continue
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            name, depth = None, 0
            continue
        if line.startswith((".", "$")) or line.endswith(":"):
            continue  # declarations, labels
        for stmt in filter(None, (s.strip() for s in line.split(";"))):
            if stmt.startswith("@"):
                stmt = stmt.split(None, 1)[1] if " " in stmt else ""
            parts = stmt.split(None, 1)
            if not parts:
                continue
            opcode, rest = parts[0], parts[1] if len(parts) > 1 else ""
            ops = _operands(rest)
            base = opcode.split(".")[0]
            if base in ("st", "red", "prefetch", "prefetchu", "bra", "bar", "barrier", "ret", "exit", "cp"):
                dst, src = [], ops
            elif base == "setp" or base == "set":
                dst, src = [], []  # predicates are not followed
            elif base == "selp":
                dst, src = _regs(ops[0]) if ops else [], ops[1:3]
            else:
                dst, src = (_regs(ops[0]) if ops else []), ops[1:]
            body.append(Instr(opcode, dst, src, stmt, no))
    return funcs


def _addresses(ins: Instr) -> list[str]:
    """Registers that form the global/generic address(es) of ``ins``."""
    base = ins.opcode.split(".")[0]
    if ins.opcode.startswith("cvta.to.global"):
        return _regs(ins.src[0]) if ins.src else []
    if base in ("ld", "ldu", "st", "atom", "red", "prefetch", "prefetchu", "cp"):
        space = _space(ins.opcode)
        if base == "cp":  # cp.async.*.shared.global [dst], [src], ...: the global side
            space = "global"
            ops = [o for o in ins.src if o.startswith("[")][1:2]
        else:
            ops = [o for o in ins.src if o.startswith("[")][:1]
        if space in _CHECKED_SPACES:
            return [r for o in ops for r in _regs(o)]
    return []


Interval = tuple[int, int]
_I32 = (-(2**31), 2**31 - 1)
_TYPE_RANGE = {
    "s8": (-128, 127), "u8": (0, 255), "s16": (-32768, 32767), "u16": (0, 65535), "b16": (0, 65535),
    "s32": _I32, "u32": (0, 2**32 - 1), "b32": _I32,
}  # fmt: skip
_UNBOUNDED_LEAVES = ("ld", "ldu", "atom", "shfl", "vote", "call", "tex", "suld", "activemask")


def _range(reg: str, defs: dict[str, list[Instr]], memo: dict[str, Interval | None]) -> Interval | None:
    """``(lo, hi)`` of ``reg`` provable from compile-time-bounded values, else None."""
    if reg in _SMALL_SPECIAL:
        return 0, _SMALL_SPECIAL[reg]
    if reg.startswith("%ctaid."):
        return 0, 2**31 - 1
    if reg not in memo:
        memo[reg] = None  # a cycle (loop-carried register) is unbounded
        ranges = [_instr_range(i, defs, memo) for i in defs.get(reg, [])]
        if ranges and None not in ranges:
            memo[reg] = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return memo[reg]


def _operand_range(op: str, defs, memo) -> Interval | None:
    op = op.strip()
    if re.fullmatch(r"-?\d+", op):
        return int(op), int(op)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", op):
        return int(op, 16), int(op, 16)
    return _range(op, defs, memo) if _REG.fullmatch(op) else None


def _corners(a: Interval, b: Interval, f) -> Interval:
    values = [f(x, y) for x in a for y in b]
    return min(values), max(values)


def _instr_range(ins: Instr, defs, memo) -> Interval | None:
    parts = ins.opcode.split(".")
    base, typ = parts[0], parts[-1]
    if base in _UNBOUNDED_LEAVES:
        return None
    rs = [_operand_range(o, defs, memo) for o in ins.src]
    whole = _TYPE_RANGE.get(typ)
    imm = [int(o) for o in ins.src if re.fullmatch(r"\d+", o.strip())]
    if base == "and" and imm:  # a non-negative constant mask bounds the result
        return 0, min(imm)
    if base == "rem" and len(rs) == 2 and rs[1] is not None and rs[1][0] > 0:
        top = rs[1][1] - 1
        return (0, top) if typ.startswith("u") else (-top, top)
    if base == "shr" and len(rs) == 2 and len(imm) == 1 and ins.src[1].strip() == str(imm[0]):
        src = rs[0] or whole
        return (src[0] >> imm[0], src[1] >> imm[0]) if src else None
    if base == "cvt" and len(parts) >= 3:
        src = rs[0] if rs else None
        src = src or _TYPE_RANGE.get(parts[-1])  # an 8 to 32-bit source type bounds it
        dst = _TYPE_RANGE.get(parts[-2])
        if src and dst and not (dst[0] <= src[0] and src[1] <= dst[1]):
            return dst  # a truncation: any value of the narrower type
        return src
    if not rs or None in rs:
        return None
    if base == "mov":
        return rs[0]
    if base in ("add", "sub"):
        return _corners(rs[0], rs[1], (lambda x, y: x + y) if base == "add" else (lambda x, y: x - y))
    if base in ("mul", "mul24"):
        return _corners(rs[0], rs[1], lambda x, y: x * y)
    if base in ("mad", "mad24"):
        p = _corners(rs[0], rs[1], lambda x, y: x * y)
        return p[0] + rs[2][0], p[1] + rs[2][1]
    if base == "shl" and rs[1][0] >= 0 and rs[1][1] < 64:
        return _corners(rs[0], rs[1], lambda x, y: x * 2**y)
    if base == "div" and rs[1][0] > 0:
        return _corners(rs[0], rs[1], lambda x, y: int(x / y))
    if base == "neg":
        return -rs[0][1], -rs[0][0]
    if base == "not":
        return -rs[0][1] - 1, -rs[0][0] - 1
    if base in ("min", "max"):
        f = min if base == "min" else max
        return f(rs[0][0], rs[1][0]), f(rs[0][1], rs[1][1])
    if base == "selp":
        return min(rs[0][0], rs[1][0]), max(rs[0][1], rs[1][1])
    if base in ("or", "xor") and rs[0][0] >= 0 and rs[1][0] >= 0:
        return 0, (1 << max(rs[0][1], rs[1][1]).bit_length()) - 1
    return None


def _accumulated_step(ins: Instr) -> str | None:
    """The step of a 32-bit register stepped by itself plus a step (``add.s32 %r5, %r5, %r4``),
    else None. With a run-time step that is a loop's ``row * stride`` strength-reduced into a
    running sum; a small constant step is a loop counter."""
    parts = ins.opcode.split(".")
    if parts[0] not in ("add", "sub") or parts[-1] not in ("s32", "u32", "b32") or len(ins.src) != 2:
        return None
    a, b = (o.strip() for o in ins.src)
    if not ins.dst or ins.dst[0] not in (a, b):
        return None
    return b if ins.dst[0] == a else a


def _ends_chain(ins: Instr) -> bool:
    """A value that a wrapped input cannot push out of its range: a cvt from 64 bits to fewer
    (only the low bits of its source count, and a 32-bit product computes those exactly), a
    remainder (within the divisor), an ``and`` with a constant mask (within the mask)."""
    parts = ins.opcode.split(".")
    if parts[0] == "cvt":
        return len(parts) >= 3 and parts[-1][1:] == "64" and parts[-2] in _TYPE_RANGE
    if parts[0] == "rem":
        return True
    return parts[0] == "and" and any(re.fullmatch(r"\d+", o.strip()) for o in ins.src)


def findings(ptx: str) -> list[str]:
    out = []
    for name, body in functions(ptx).items():
        defs: dict[str, list[Instr]] = {}
        for ins in body:
            for d in ins.dst:
                defs.setdefault(d, []).append(ins)
        memo: dict[str, Interval | None] = {}
        reported: set[int] = set()
        for ins in body:
            work, seen = list(_addresses(ins)), set()
            while work:
                reg = work.pop()
                if reg in seen:
                    continue
                seen.add(reg)
                for d in defs.get(reg, []):
                    if d.opcode.split(".")[0] in _UNBOUNDED_LEAVES or _ends_chain(d):
                        continue
                    if id(d) in reported:
                        pass
                    elif _PRODUCT.match(d.opcode):
                        r = _instr_range(d, defs, memo)
                        if r is None or r[0] < _I32[0] or r[1] > _I32[1]:
                            reported.add(id(d))
                            out.append(f"{name}: line {d.line}: {d.text} -> line {ins.line}: {ins.text}")
                    elif (step := _accumulated_step(d)) is not None:
                        r = _operand_range(step, defs, memo)
                        if r is None or max(-r[0], r[1]) >= 2**16:
                            reported.add(id(d))
                            out.append(f"{name}: line {d.line}: {d.text} -> line {ins.line}: {ins.text}")
                    for op in d.src:
                        work.extend(_regs(op))
    return out


def _demangle(lines: list[str]) -> list[str]:
    if not lines or not shutil.which("c++filt"):
        return lines
    done = subprocess.run(["c++filt"], input="\n".join(lines), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ptx", nargs="+")
    parser.add_argument(
        "--expect-kernels", default="", help="comma-separated kernels that must have findings (no others)"
    )
    args = parser.parse_args()
    expected = {k for k in args.expect_kernels.split(",") if k}
    flagged: set[str] = set()
    total = 0
    for path in args.ptx:
        with open(path) as f:
            found = findings(f.read())
        total += len(found)
        names = _demangle([f.split(":", 1)[0] for f in found])
        for name, f in zip(names, found, strict=True):
            short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", ""))
            flagged.add(short.removeprefix("void ").split("<")[0].rsplit("::", 1)[-1])
            print(f"ptx_addr32: {os.path.basename(path)}: {short}:{f.split(':', 1)[1]}")
    ok = flagged == expected
    print(
        f"ptx_addr32: {total} address(es) from 32-bit products in {len(flagged)} kernel(s) of "
        f"{len(args.ptx)} file(s); expected in {len(expected)} kernel(s): {'OK' if ok else 'FAILED'}"
    )
    for name in sorted(expected - flagged):
        print(f"ptx_addr32: MISSED: {name} was expected to be caught")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
