"""Loop analysis of NVIDIA SASS as ``cuobjdump -sass`` prints it (standard library only).

Used on cubins of the CUDA kernels (``.ci/cuda_sass.py``) and usable on Triton's (its
``compiled.asm["cubin"]``). ``parse`` splits the text into functions (``Function : <mangled>``)
of instructions (``/*0a30*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;``). ``loops`` finds the
loops: a backward branch at address ``hi`` to ``lo`` makes the loop ``[lo, hi]`` (a branch to
itself, the trap after ``EXIT``, is none); an innermost loop has no other loop inside.
``loop_report`` gives, for one loop:

- ``ldg128``: 16-byte global loads (``LDG.E[.hint...].128[.CONSTANT]``);
- ``bar``: barriers (``BAR.*``), each one executed per iteration;
- ``ldg128_ef``: those of them with the evict-first hint (``LDG.E.EF.128...``: the CUDA
  kernels' streamed basis, ``ld.global.cs``), apart from the cached ones (x, w0);
- ``prmt``, ``i2f``: byte permutes and integer-to-float conversions (the instruction mix of int8
  dequantisation: a ``PRMT`` per value, no ``I2F``);
- ``loads_before_first_use``: 16-byte loads issued before the first instruction that reads
  the destination of an earlier one (``LDG.E.128 R8`` writes R8..R11; a source ``R10`` or
  ``R10.64`` reads it). The body is walked in address order as a cycle starting at its first
  16-byte load, because compilers rotate loops: the consumer of the last iteration's loads may
  sit at the top of the body, before the next iteration's loads. A predicated instruction
  (``@P0``) counts as a read or a load like any other.

``hot_loop`` picks the innermost loop with the most 16-byte loads (the streaming loop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_LINE = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P(?:T|\d+)\s+")
_LDG128 = re.compile(r"^LDG\.E(?:\.\w+)*?\.128(?:\.\w+)*$")
_BRANCH_TARGET = re.compile(r"0x([0-9a-fA-F]+)")
# A register operand: R12, R12.64, R12.reuse, -R12, |R12|, R12.H1, ...; RZ is no register.
_REG = re.compile(r"(?<![\w.])R(\d+)((?:\.\w+)*)")
# Opcodes whose first operand is read, not written (no register destination).
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BAR", "BRA", "BRX", "EXIT", "RET", "CALL", "MEMBAR",
            "BSYNC", "BSSY", "WARPSYNC", "NOP", "DEPBAR", "ERRBAR", "CCTL", "JMP", "JMX", "YIELD",
            "FENCE", "ARRIVES", "SYNCS", "UTMASTG", "UBLKCP", "REDUX_NODEST")  # fmt: skip
# Opcodes whose register operands are fp64 register pairs (R4 means R4:R5).
_PAIR_OPS = ("DADD", "DFMA", "DMUL", "DSETP", "DMNMX", "DMMA")


@dataclass
class Instr:
    addr: int
    text: str  # without the address and the trailing ';'
    opcode: str  # e.g. LDG.E.128 (predicate stripped)
    dests: set[int] = field(default_factory=set)
    srcs: set[int] = field(default_factory=set)

    @property
    def is_ldg128(self) -> bool:
        return bool(_LDG128.match(self.opcode))

    @property
    def is_bar(self) -> bool:
        return self.opcode.split(".")[0] == "BAR"

    @property
    def is_evict_first(self) -> bool:
        return "EF" in self.opcode.split(".")

    @property
    def base(self) -> str:
        """The opcode without its modifiers: ``PRMT``, ``I2F``, ``LDG``."""
        return self.opcode.split(".")[0]


def _width(opcode: str, suffix: str, dest: bool, address: bool, last: bool) -> int:
    """Registers covered by a register operand (1, 2 or 4)."""
    if ".128" in suffix:
        return 4
    if ".64" in suffix:
        return 2
    if address:
        return 1
    parts = opcode.split(".")
    base = parts[0]
    if base in _PAIR_OPS:
        return 2
    # The data register of a 64/128-bit load (destination) or store (source) spans 2 or 4.
    if (dest and base.startswith("LD")) or base.startswith("ST") or base in ("RED", "ATOMS", "ATOMG"):
        if "128" in parts:
            return 4
        if "64" in parts:
            return 2
    if "WIDE" in parts and (dest or last):
        return 2  # IMAD.WIDE R2, R5, 0x2, R2: a 64-bit result and addend
    if base == "F2F" and len(parts) >= 3:
        # F2F.<dst type>.<src type>: a 64-bit source or destination is a pair.
        kind = parts[1] if dest else parts[2]
        return 2 if kind.endswith("64") else 1
    return 1


def _operand_regs(opcode: str, operand: str, dest: bool, last: bool) -> set[int]:
    regs = set()
    address = "[" in operand
    for m in _REG.finditer(operand):
        n = int(m[1])
        regs.update(range(n, n + _width(opcode, m[2], dest, address, last)))
    return regs


def _split_operands(rest: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in rest:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch in "[{"
        depth -= ch in "]}"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_instr(addr: int, text: str) -> Instr:
    body = _PRED.sub("", text.strip())
    opcode, _, rest = body.partition(" ")
    operands = _split_operands(rest)
    ins = Instr(addr, text.strip(), opcode)
    base = opcode.split(".")[0]
    has_dest = base not in _NO_DEST and not base.startswith("ST")
    for i, op in enumerate(operands):
        dest = has_dest and i == 0 and "[" not in op
        regs = _operand_regs(opcode, op, dest, last=i == len(operands) - 1)
        if dest:
            ins.dests |= regs
        else:
            ins.srcs |= regs
    return ins


def parse(sass: str) -> dict[str, list[Instr]]:
    """Functions of a ``cuobjdump -sass`` listing, each a list of instructions in address order."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in sass.splitlines():
        if m := _FUNCTION.match(line):
            current = funcs.setdefault(m[1], [])
            continue
        if current is not None and (m := _LINE.search(line)):
            current.append(parse_instr(int(m[1], 16), m[2]))
    return funcs


@dataclass(frozen=True)
class Loop:
    lo: int  # address of the branch target (loop head)
    hi: int  # address of the backward branch


def loops(code: list[Instr]) -> list[Loop]:
    found = set()
    for ins in code:
        if ins.opcode.split(".")[0] != "BRA":
            continue
        targets = _BRANCH_TARGET.findall(_PRED.sub("", ins.text).partition(" ")[2])
        if targets and int(targets[-1], 16) < ins.addr:
            found.add(Loop(int(targets[-1], 16), ins.addr))
    return sorted(found, key=lambda lp: (lp.lo, lp.hi))


def innermost(all_loops: list[Loop]) -> list[Loop]:
    return [a for a in all_loops if not any(b != a and a.lo <= b.lo and b.hi <= a.hi for b in all_loops)]


def body(code: list[Instr], loop: Loop) -> list[Instr]:
    return [i for i in code if loop.lo <= i.addr <= loop.hi]


def loads_before_first_use(instrs: list[Instr]) -> int:
    """16-byte loads of a loop body issued before any earlier one's destination is read (the
    body as a cycle starting at its first 16-byte load; 0 when it has none)."""
    first = next((i for i, ins in enumerate(instrs) if ins.is_ldg128), None)
    if first is None:
        return 0
    pending: set[int] = set()
    count = 0
    for ins in instrs[first:] + instrs[:first]:
        if ins.srcs & pending:
            return count
        if ins.is_ldg128:
            count += 1
            pending |= ins.dests
        else:
            pending -= ins.dests  # overwritten before being read: no longer that load's value
    return count


@dataclass
class LoopReport:
    lo: int
    hi: int
    instructions: int
    ldg128: int
    bar: int
    loads_before_first_use: int
    ldg128_ef: int = 0
    prmt: int = 0
    i2f: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def loop_report(code: list[Instr], loop: Loop) -> LoopReport:
    b = body(code, loop)
    return LoopReport(
        lo=loop.lo,
        hi=loop.hi,
        instructions=len(b),
        ldg128=sum(i.is_ldg128 for i in b),
        bar=sum(i.is_bar for i in b),
        loads_before_first_use=loads_before_first_use(b),
        ldg128_ef=sum(i.is_ldg128 and i.is_evict_first for i in b),
        prmt=sum(i.base == "PRMT" for i in b),
        i2f=sum(i.base == "I2F" for i in b),
    )


def hot_loop(code: list[Instr]) -> LoopReport | None:
    """The innermost loop with the most 16-byte loads (the first such), or None."""
    reports = [loop_report(code, lp) for lp in innermost(loops(code))]
    reports = [r for r in reports if r.ldg128 > 0]
    if not reports:
        return None
    return max(reports, key=lambda r: (r.ldg128, -r.lo))


def streaming_loops(code: list[Instr]) -> list[LoopReport]:
    """Every innermost loop that holds a 16-byte load, in address order."""
    return [r for r in (loop_report(code, lp) for lp in innermost(loops(code))) if r.ldg128 > 0]


def count(code: list[Instr], prefix: str) -> int:
    """Instructions whose opcode starts with ``prefix`` (``STL``, ``LDL``: local memory)."""
    return sum(i.opcode.startswith(prefix) for i in code)


def max_regs_for(threads: int, blocks_per_sm: int, regs_per_sm: int = 65536) -> int:
    """Most registers per thread that keep ``blocks_per_sm`` blocks of ``threads`` resident:
    registers are allocated per warp in units of 256 (8 per thread), at most 255 per thread."""
    warps = -(-threads // 32) * blocks_per_sm
    per_thread = regs_per_sm // (warps * 32)
    return min(255, per_thread // 8 * 8)


def resident_blocks(
    regs: int,
    threads: int,
    shared: int,
    *,
    regs_per_sm: int = 65536,
    shared_per_sm: int = 233472,
    shared_reserved: int = 1024,
    max_threads: int = 2048,
    max_blocks: int = 32,
) -> int:
    """Blocks of a kernel resident on one SM (defaults: sm_90, H100/H200: 228 KiB of shared
    memory per SM, 1 KiB of it reserved per block)."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // per_warp) // warps
    by_shared = shared_per_sm // (shared + shared_reserved) if shared + shared_reserved else max_blocks
    return min(by_regs, by_shared, max_threads // (warps * 32), max_blocks)
