"""tests/sass.py on hand-written SASS: loops, 16-byte loads in flight, barriers, occupancy."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import sass  # noqa: E402


def listing(name: str, lines: list[str]) -> str:
    """A cuobjdump-style function: one instruction per 16 bytes from 0x0000, with encodings."""
    out = [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for i, text in enumerate(lines):
        out.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000fe20000000f00 */")
        out.append(
            "                                                                 /* 0x000fe20000000f00 */"
        )
    return "\n".join(out) + "\n"


def addr(i: int) -> str:
    return f"0x{16 * i:x}"


HEAD = ["S2R R0, SR_TID.X", "IMAD.WIDE R2, R0, 0x10, R2"]


def loop(body: list[str]) -> list[str]:
    """HEAD, then ``body`` as a loop closed by a backward branch to its first instruction."""
    start = len(HEAD)
    return HEAD + body + [f"@P0 BRA {addr(start)}", "EXIT", f"BRA {addr(start + len(body) + 2)}"]


def hot(lines: list[str]) -> sass.LoopReport:
    funcs = sass.parse(listing("_Z1kv", lines))
    report = sass.hot_loop(funcs["_Z1kv"])
    assert report is not None
    return report


# Four loads issued (two with cache hints, one predicated), then consumed: passes.
GOOD = loop(
    [
        "LDG.E.128 R4, desc[UR6][R2.64]",
        "LDG.E.EF.128.CONSTANT R8, desc[UR6][R2.64+0x200]",
        "@!P1 LDG.E.128 R12, desc[UR6][R2.64+0x400]",
        "LDG.E.LU.128 R16, desc[UR6][R2.64+0x600]",
        "IADD3 R2, P2, R2, 0x800, RZ",
        "IADD3.X R3, RZ, R3, RZ, P2, !PT",
        "FFMA R20, R4, R24, R20",
        "FFMA R20, R5, R25, R20",
        "HADD2.F32 R26, -RZ, R10.H0_H0",
        "FFMA R20, R26, R24, R20",
        "FFMA R20, R15, R24, R20",
        "FFMA R20, R19, R24, R20",
        "ISETP.NE.AND P0, PT, R2, R28, PT",
    ]
)


def test_good_loop_passes():
    r = hot(GOOD)
    assert (r.ldg128, r.bar, r.loads_before_first_use) == (4, 0, 4)
    assert r.lo == 16 * len(HEAD)


def test_load_consumed_right_after_issue():
    r = hot(
        loop(
            [
                "LDG.E.128 R4, desc[UR6][R2.64]",
                "FFMA R20, R4, R24, R20",
                "LDG.E.128 R4, desc[UR6][R2.64+0x200]",
                "FFMA R20, R7, R24, R20",
                "IADD3 R2, P2, R2, 0x400, RZ",
                "ISETP.NE.AND P0, PT, R2, R28, PT",
            ]
        )
    )
    assert (r.ldg128, r.loads_before_first_use) == (2, 1)


def test_three_loads_then_use():
    r = hot(
        loop(
            [
                "LDG.E.128 R4, desc[UR6][R2.64]",
                "LDG.E.128 R8, desc[UR6][R2.64+0x200]",
                "LDG.E.128 R12, desc[UR6][R2.64+0x400]",
                "FFMA R20, R11, R24, R20",  # reads the second load (R8..R11)
                "LDG.E.128 R16, desc[UR6][R2.64+0x600]",
                "FFMA R20, R16, R24, R20",
                "ISETP.NE.AND P0, PT, R2, R28, PT",
            ]
        )
    )
    assert (r.ldg128, r.loads_before_first_use) == (4, 3)


def test_pair_operand_reads_the_load():
    # R6.64 is R6:R7, inside the first load's R4..R7; a store's data register spans 4.
    r = hot(
        loop(
            ["LDG.E.128 R4, desc[UR6][R2.64]", "LDG.E.128 R8, desc[UR6][R2.64+0x10]", "DADD R30, R6.64, R30"]
        )
    )
    assert r.loads_before_first_use == 2
    r = hot(
        loop(["LDG.E.128 R4, desc[UR6][R2.64]", "STS.128 [R0], R4", "LDG.E.128 R8, desc[UR6][R2.64+0x10]"])
    )
    assert r.loads_before_first_use == 1
    r = hot(
        loop(["LDG.E.128 R4, desc[UR6][R2.64]", "F2F.F64.F32 R30, R7", "LDG.E.128 R8, desc[UR6][R2.64+0x10]"])
    )
    assert r.loads_before_first_use == 1
    # An address formed from a loaded value is a use too.
    r = hot(loop(["LDG.E.128 R4, desc[UR6][R2.64]", "LDG.E.128 R8, desc[UR6][R4.64]"]))
    assert r.loads_before_first_use == 1


def test_rotated_loop_use_at_the_top():
    # The previous iteration's loads are consumed at the top of the body, before this
    # iteration's loads: walking from the first load, the use wraps around after 2 loads.
    r = hot(
        loop(
            [
                "FFMA R20, R4, R24, R20",
                "FFMA R20, R9, R24, R20",
                "LDG.E.128 R4, desc[UR6][R2.64]",
                "LDG.E.128 R8, desc[UR6][R2.64+0x200]",
                "IADD3 R2, P2, R2, 0x400, RZ",
                "ISETP.NE.AND P0, PT, R2, R28, PT",
            ]
        )
    )
    assert (r.ldg128, r.loads_before_first_use) == (2, 2)


def test_instruction_mix_of_int8_dequantisation():
    # One evict-first basis load and one cached x load; its 4 words: a LOP3 and 4 PRMT + 4 FADD
    # each (only two written out here), and one stray I2F.
    r = hot(
        loop(
            [
                "LDG.E.EF.128.CONSTANT R4, desc[UR6][R2.64]",
                "LDG.E.128.CONSTANT R8, desc[UR6][R12.64]",
                "LDG.E.128 R16, desc[UR6][R12.64+0x10]",
                "LOP3.LUT R20, R4, 0x80808080, RZ, 0x3c, !PT",
                "PRMT R21, R20, 0x7440, R22",
                "PRMT R23, R20, 0x7441, R22",
                "FADD R21, R21, -8388736",
                "I2F.S8 R24, R5",
                "FFMA R30, R21, R8, R30",
            ]
        )
    )
    assert (r.ldg128, r.ldg128_ef, r.prmt, r.i2f) == (3, 1, 2, 1)
    assert r.loads_before_first_use == 3
    assert sass.parse_instr(0, "I2F.F64.S64 R4, R2").base == "I2F"
    assert not sass.parse_instr(0, "LDG.E.128.CONSTANT R8, desc[UR6][R12.64]").is_evict_first


def test_bar_in_loop():
    body = GOOD[len(HEAD) : -3]
    r = hot(loop(body[:6] + ["BAR.SYNC.DEFER_BLOCKING 0x0"] + body[6:]))
    assert (r.bar, r.loads_before_first_use) == (1, 4)


def test_innermost_and_hot_loop():
    # An outer loop with a BAR around an inner streaming loop, then a one-load remainder loop.
    lines = [
        "S2R R0, SR_TID.X",  # 0
        "BAR.SYNC.DEFER_BLOCKING 0x0",  # 1: outer head
        "LDG.E.128 R4, desc[UR6][R2.64]",  # 2: inner head
        "LDG.E.128 R8, desc[UR6][R2.64+0x10]",  # 3
        "FFMA R20, R4, R24, R20",  # 4
        f"@P0 BRA {addr(2)}",  # 5: inner
        f"@P1 BRA {addr(1)}",  # 6: outer
        "LDG.E.128 R4, desc[UR6][R2.64]",  # 7: remainder
        "FFMA R20, R4, R24, R20",  # 8
        f"@P2 BRA {addr(7)}",  # 9
        "EXIT",  # 10
        f"BRA {addr(11)}",  # 11: the trap after EXIT is no loop
    ]
    code = sass.parse(listing("_Z1kv", lines))["_Z1kv"]
    found = sass.loops(code)
    assert [(lp.lo, lp.hi) for lp in found] == [(16, 96), (32, 80), (112, 144)]
    assert [(lp.lo, lp.hi) for lp in sass.innermost(found)] == [(32, 80), (112, 144)]
    r = sass.hot_loop(code)
    assert (r.lo, r.ldg128, r.bar, r.loads_before_first_use) == (32, 2, 0, 2)
    assert [s.ldg128 for s in sass.streaming_loops(code)] == [2, 1]
    assert sass.loop_report(code, found[0]).bar == 1


def test_parse_functions_and_operands():
    text = listing("_Z1av", ["EXIT"]) + listing("_Z1bv", ["MOV R1, c[0x0][0x28]", "EXIT"])
    funcs = sass.parse(text)
    assert list(funcs) == ["_Z1av", "_Z1bv"]
    ins = sass.parse_instr(0, "@!P0 LDG.E.EF.128.CONSTANT R8, desc[UR4][R2.64+0x10]")
    assert ins.is_ldg128 and ins.dests == {8, 9, 10, 11} and ins.srcs == {2, 3}
    assert not sass.parse_instr(0, "LDG.E.64 R8, desc[UR4][R2.64]").is_ldg128
    ins = sass.parse_instr(0, "STG.E.128 desc[UR4][R2.64], R8")
    assert ins.dests == set() and ins.srcs == {2, 3, 8, 9, 10, 11}
    ins = sass.parse_instr(0, "IMAD.WIDE.U32 R4, R0, 0x100, R6")
    assert ins.dests == {4, 5} and ins.srcs == {0, 6, 7}
    assert sass.parse_instr(0, "S2R R0, SR_TID.X").srcs == set()
    assert sass.parse_instr(0, "IADD3 R9, P0, P1, R2, UR4, RZ").srcs == {2}


def test_occupancy_arithmetic():
    assert sass.max_regs_for(256, 2) == 128
    assert sass.max_regs_for(256, 3) == 80
    assert sass.max_regs_for(256, 4) == 64
    assert sass.max_regs_for(128, 1) == 255
    assert sass.resident_blocks(123, 256, 41984) == 2
    assert sass.resident_blocks(80, 256, 0) == 3
    assert sass.resident_blocks(64, 256, 0) == 4
    assert sass.resident_blocks(32, 256, 0) == 8
    assert sass.resident_blocks(64, 256, 60000) == 3  # shared memory bound
    # No static shared memory and no reserve (as .ci/cuda_sass.py counts): registers bound it.
    assert sass.resident_blocks(128, 256, 0, shared_reserved=0) == 2
