"""Compile the Triton kernels for sm_90 and sm_80 (no GPU needed) and report what their code does.

For every autotune config of the kernels that stream the basis (project, reconstruct, the fused
step's two passes, the three orthogonalize passes) and every basis dtype, plus stage 2 of the
reductions, this compiles the kernel as a launch on an H100/H200 would (16-byte aligned
pointers, a row stride that is a multiple of 16 values, as ``ops.empty_basis`` makes it), and
the fp16 cases again for an A100, and reads the machine code with the ``cuobjdump`` shipped in
Triton's wheel: registers, local memory (stack) and the number of 16-byte global loads per
thread (``LDG.E.128``, or the asynchronous ``LDGSTS.E.128`` copies the compiler makes of a loop
it pipelines). Printed as JSON (``cases``, ``canaries``); ``tests/test_triton_codegen.py``
checks the numbers.

It also reads each case's Triton IR (TTIR and TTGIR) for addresses formed from 32-bit
products (``addr32`` in the JSON, see ``address_products``). Rule: no ``arith.muli`` (or
``arith.shli``) on an integer of 32 bits or fewer may reach, through any chain of SSA
definitions, the offset of a ``tt.addptr`` or the integer of a ``tt.int_to_ptr``, unless both
of its operands have a bound proved from compile-time values alone (``arith.constant``,
``tt.make_range`` and arithmetic on them) and the product of the bounds is below 2^31. Why
this rule: a kernel's scalar integer arguments are typed i32 whenever the launch passes
values below 2^31 (the signatures below say "i32" for exactly that reason), and so are program
ids and the counters of loops over them; a row index times a row stride, a program id times
a chunk, a block index times a block size are all such products, and each wraps at 2^31
although both factors fit, while k x D passes 2^31 at GPT-2 and ResNet-50 sizes. Which
values a runtime argument takes cannot be proved here, so every product with one is refused:
cast a factor to int64 first. Products of compile-time values only (``tl.arange(0, N) * 4``,
``BLOCK_K * BLOCK_D``) have a bound known here and pass when it is below 2^31. A loaded value
(``tl.load``), a comparison and a select's condition end a chain: they carry no product of
the address arithmetic into it. The walk is conservative where the IR has regions: a loop's
iteration arguments and results stand for their initial value and every yielded value, any
other region op's results for all its operands and yields. A call that was not inlined and a
block pointer (``tt.make_tensor_ptr``) are reported as not checked. The ``canaries`` below are
kernels with such products (and one without): the check must find exactly theirs.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces compiled kernels):
``python tests/triton_codegen.py``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
# (the package re-exports functions named like these modules)

import sass  # noqa: E402  (tests/sass.py)

from twa_kernels import _param_table as param_table  # noqa: E402
from twa_kernels._triton._common import pow2  # noqa: E402

project = importlib.import_module("twa_kernels._triton.project")
reconstruct = importlib.import_module("twa_kernels._triton.reconstruct")
step = importlib.import_module("twa_kernels._triton.step")
orth = importlib.import_module("twa_kernels._triton.orthogonalize")
subspace_step = importlib.import_module("twa_kernels._triton.subspace_step")

# orthogonalize_'s pass-2 tile depends on K: that of a full 301-sample basis.
ORTH_RANK = 301

# H100/H200 (every case), and A100 (fp16 basis: a portability check of the same code).
TARGETS = {90: GPUTarget("cuda", 90, 32), 80: GPUTarget("cuda", 80, 32)}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
STORAGE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _jit_function(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # an Autotuner wraps the JITFunction
    return kernel


def compile_kernel(cc: int, kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int):
    """``kernel`` compiled for sm_``cc`` as a launch with these arguments would compile it."""
    fn = _jit_function(kernel)
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGETS[cc], options={"num_warps": num_warps})


def compile_for(cc: int, kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int) -> dict:
    """Registers, stack bytes, shared memory and load instructions of ``kernel`` for sm_``cc``,
    its hot loop (``hot_loop``), and the 32-bit products that form its addresses (``addr32``,
    TTIR and TTGIR)."""
    compiled = compile_kernel(cc, kernel, signature, constexprs, aligned, num_warps)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True)
        listing = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True)
    regs = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    (code,) = sass.parse(listing.stdout).values()
    return {
        "regs": regs,
        "stack": int(re.search(r"STACK:(\d+)", usage.stdout).group(1)),
        "ldg128": sum(i.is_ldg128 for i in code),
        "ldgsts128": len(re.findall(r"\bLDGSTS\.E(?:\.BYPASS)?\.128\b", listing.stdout)),
        "shared": compiled.metadata.shared,
        "resident": sass.resident_blocks(regs, 32 * num_warps, compiled.metadata.shared),
        "hot_loop": hot_loop(code),
        "addr32": [f"{ir}: {p}" for ir in ("ttir", "ttgir") for p in address_products(compiled.asm[ir])],
    }


def _is_basis_load(ins: sass.Instr) -> bool:
    """The kernels read the basis, and nothing else, with evict-first 16-byte loads."""
    return ins.is_ldg128 and ".EF" in ins.opcode


def hot_loop(code: list[sass.Instr]) -> dict | None:
    """The innermost loop with the most basis loads (``LDG.E.EF.128``), or None: its basis loads
    (``basis_ldg128``), those issued before the first read of one (``basis_before_use``; other
    16-byte loads, of x or a grad, neither count nor end the run) and its ``BAR``s (``bar``)."""
    best = None
    for loop in sass.innermost(sass.loops(code)):
        body = sass.body(code, loop)
        n = sum(map(_is_basis_load, body))
        if n and (best is None or n > best["basis_ldg128"]):
            only_basis = [i for i in body if _is_basis_load(i) or not i.is_ldg128]
            best = {
                "basis_ldg128": n,
                "basis_before_use": sass.loads_before_first_use(only_basis),
                "bar": sum(i.is_bar for i in body),
                # The instruction mix of int8 dequantisation: byte permutes, or conversions.
                "prmt": sum(i.opcode.split(".")[0] == "PRMT" for i in body),
                "i2f": sum(i.opcode.split(".")[0] == "I2F" for i in body),
            }
    return best


# ---- 32-bit products that form addresses (TTIR / TTGIR) --------------------------------------

_VALUE = r"%[\w$.\-]+(?:#\d+)?"
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_FILE_LINE = re.compile(r'"([^"]+)":(\d+):\d+')
_INT_TYPE = re.compile(r"^\s*(?:tensor<(?:[\d?]+x)*)?i(\d+)\b")
_RESULT = re.compile(rf"^({_VALUE}(?::\d+)?(?:,\s*{_VALUE})*) = (\"?[\w.]+\"?)(.*)$")
_FOR = re.compile(rf"scf\.for ({_VALUE}) = ({_VALUE}) to ({_VALUE}) step ({_VALUE})")
_TERMINATOR = re.compile(r"^(scf\.yield|scf\.condition|tt\.reduce\.return|tt\.scan\.return)\b(.*)$")
# Ops whose result carries no arithmetic of the operands into an address (chains end there).
_CHAIN_ENDS = {
    "tt.load", "arith.cmpi", "arith.cmpf", "tt.get_program_id", "tt.get_num_programs",
    "arith.constant", "tt.make_range", "tt.atomic_rmw", "tt.atomic_cas", "arg",
}  # fmt: skip
# Ops whose result is bounded by their first operand's bound.
_SAME_BOUND = {
    "arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast", "tt.splat", "tt.broadcast",
    "tt.expand_dims", "tt.reshape", "tt.trans", "ttg.convert_layout", "arith.divsi", "arith.divui",
    "arith.shrsi", "arith.shrui",
}  # fmt: skip


class _Region:
    """A region op (loop, if, reduce): its operands, initial values and yielded values."""

    def __init__(self, op: str, operands: list[str]):
        self.op, self.operands = op, operands
        self.inits: list[str] = []
        self.yields: list[list[str]] = []


@dataclass
class _Def:
    op: str
    operands: list[str]
    text: str
    loc: str | None
    region: _Region | None = None
    index: int | None = None  # results / iteration arguments of a loop or an if

    def inputs(self) -> list[str]:
        """The values this definition's value is computed from (conservatively)."""
        if self.region is not None and self.index is not None:
            r = self.region
            first = [r.inits[self.index]] if self.index < len(r.inits) else []
            return first + [y[self.index] for y in r.yields if self.index < len(y)]
        if self.region is not None:
            return self.region.operands + [v for y in self.region.yields for v in y]
        if self.op in _CHAIN_ENDS:
            return []
        if self.op == "arith.select":
            return self.operands[1:]
        return self.operands

    def narrow_int(self) -> bool:
        """Result is an integer (or a tensor of integers) of at most 32 bits."""
        m = _INT_TYPE.match(self.text.rsplit(" : ", 1)[-1]) if " : " in self.text else None
        return m is not None and int(m[1]) <= 32


def _strip_locs(line: str) -> tuple[str, str | None]:
    """``line`` without its ``loc(...)`` annotations (they hold ``%`` and ``:`` of their own),
    and the text inside the last of them (the op's location)."""
    out, i, last = [], 0, None
    while (j := line.find("loc(", i)) >= 0:
        out.append(line[i:j])
        depth, k = 0, j + 3
        while k < len(line):
            depth += (line[k] == "(") - (line[k] == ")")
            k += 1
            if depth == 0:
                break
        last, i = line[j + 4 : k - 1], k
    return "".join(out) + line[i:], last


def _parse(mlir: str):
    """``(locs, defs, roots)``: loc table, value name -> its definitions (names repeat across
    sibling regions, so a list), and the address operands (offsets of ``tt.addptr``, integers of
    ``tt.int_to_ptr``) with their op's text and loc."""
    locs: dict[str, str] = {}
    defs: dict[str, list[_Def]] = {}
    roots: list[tuple[str, str, str | None]] = []
    stack: list[_Region | None] = []

    def define(name, d):
        defs.setdefault(name, []).append(d)

    def loop(body, loc, region):
        """An scf.for: its induction variable and iteration arguments."""
        m = _FOR.search(body)
        define(m[1], _Def("scf.for.iv", [m[2], m[4]], body, loc))
        iters = re.findall(rf"({_VALUE}) = ({_VALUE})", body[m.end() :])
        region.inits = [init for _, init in iters]
        for i, (arg, _) in enumerate(iters):
            define(arg, _Def("iter_arg", [], body, loc, region, i))

    for raw in mlir.splitlines():
        line = raw.strip()
        if m := _LOC_DEF.match(line):
            locs[m[1]] = m[2]
            continue
        body, loc = _strip_locs(line)
        body = body.strip()
        opens = body.count("{") - body.count("}")
        region = None
        if body.startswith(("module", "tt.func")):
            for name in re.findall(rf"({_VALUE}):", body):
                define(name, _Def("arg", [], body, loc))
            region = _Region("func", [])
        elif body.startswith("^bb"):  # block arguments of a reduce / scan / while body
            for name in re.findall(rf"({_VALUE}):", body):
                define(name, _Def("block_arg", [], body, loc, stack[-1]))
        elif m := _TERMINATOR.match(body):
            stack[-1].yields.append(re.findall(_VALUE, m[2]))
        elif m := _RESULT.match(body):
            lhs, op, rest = m[1], m[2].strip('"'), m[3]
            names = []
            for item in (x.strip() for x in lhs.split(",")):
                base, _, count = item.partition(":")
                names += [f"{base}#{i}" for i in range(int(count))] if count else [base]
            operands = re.findall(_VALUE, rest)
            if opens > 0:
                region = _Region(op, [] if op == "scf.for" else operands)
                if op == "scf.for":
                    loop(body, loc, region)
                indexed = op in ("scf.for", "scf.if")
                for i, name in enumerate(names):
                    define(name, _Def(op, operands, body, loc, region, i if indexed else None))
            else:
                for name in names:
                    define(name, _Def(op, operands, body, loc))
            if op == "tt.addptr":
                roots.append((operands[1], body, loc))
            elif op == "tt.int_to_ptr":
                roots.append((operands[0], body, loc))
        elif opens > 0 and not body.startswith("}"):  # a region op without results
            region = _Region(body.split()[0], re.findall(_VALUE, body))
            if body.startswith("scf.for"):
                loop(body, loc, region)
        if region is not None:
            stack.append(region)
            opens -= 1
        if opens < 0:
            del stack[len(stack) + opens :]
        elif opens > 0:
            stack.extend([stack[-1]] * opens)
    return locs, defs, roots


def _bound(name: str, defs, memo) -> int | None:
    """Largest |value| of ``name`` provable from compile-time values alone, else None."""
    if name not in memo:
        memo[name] = None  # a cycle (loop-carried value) is unbounded
        bounds = [_def_bound(d, defs, memo) for d in defs.get(name, [])]
        memo[name] = max(bounds) if bounds and None not in bounds else None
    return memo[name]


def _def_bound(d: _Def, defs, memo) -> int | None:
    if d.region is not None:
        return None
    if d.op == "arith.constant":
        m = re.match(r"arith\.constant (?:dense<)?(-?\d+)>?\s*:", d.text.split(" = ", 1)[1])
        return abs(int(m[1])) if m else None
    if d.op == "tt.make_range":
        m = re.search(r"end = (\d+) : i32, start = (\d+) : i32", d.text)
        return max(int(m[1]) - 1, int(m[2])) if m else None
    bs = [_bound(o, defs, memo) for o in d.operands]
    if not bs or None in bs:
        return None
    if d.op in _SAME_BOUND:
        return bs[0]
    if d.op in ("arith.addi", "arith.subi"):
        return bs[0] + bs[1]
    if d.op == "arith.muli":
        return bs[0] * bs[1]
    if d.op == "arith.shli":
        return bs[0] << bs[1] if bs[1] < 64 else None
    if d.op in ("arith.remsi", "arith.remui", "arith.andi", "arith.minsi", "arith.minui"):
        return min(bs)
    if d.op in ("arith.maxsi", "arith.maxui", "arith.select"):
        return max(bs)
    return None


def _where(loc: str | None, locs: dict[str, str], depth: int = 0) -> str:
    """``file:line`` of a location (``#loc12``, ``"file":3:4``, a call site: the callee's)."""
    text = locs.get(loc, loc) if loc and loc.startswith("#loc") else (loc or "")
    if m := _FILE_LINE.search(text):
        return f"{os.path.basename(m[1])}:{m[2]}"
    for ref in re.findall(r"#loc\d*", text) if depth < 32 else ():
        if (found := _where(ref, locs, depth + 1)) != "?":
            return found
    return "?"


def address_products(mlir: str) -> list[str]:
    """The 32-bit products that reach an address in ``mlir`` (TTIR or TTGIR text), as
    ``file:line: %x = arith.muli %a, %b : i32 -> %p = tt.addptr ...`` (see the module
    docstring for the rule)."""
    locs, defs, roots = _parse(mlir)
    memo: dict[str, int | None] = {}
    found: dict[str, str] = {}
    # Addresses this walk cannot follow: arguments of a call that was not inlined, block
    # pointers. No kernel uses them; one that does fails the check until the walk learns them.
    for d in (d for ds in defs.values() for d in ds):
        if d.op in ("tt.call", "tt.make_tensor_ptr", "tt.advance"):
            key = f"{_where(d.loc, locs)}: {d.text.strip()}"
            found.setdefault(key, f"{key} -> not checked: {d.op} is not followed")
    seen: set[str] = set()
    for offset, use, _ in roots:
        work = [offset]
        while work:
            name = work.pop()
            if name in seen:
                continue
            seen.add(name)
            for d in defs.get(name, []):
                if d.op in ("arith.muli", "arith.shli") and d.region is None and d.narrow_int():
                    bs = [_bound(o, defs, memo) for o in d.operands]
                    small = None not in bs and _def_bound(d, defs, memo) < 2**31
                    if not small:
                        key = f"{_where(d.loc, locs)}: {d.text.strip()}"
                        found.setdefault(key, f"{key} -> {use.strip()}")
                work.extend(d.inputs())
    return sorted(found.values())


def basis_loads_per_thread(block_k: int, block_d: int, dtype: torch.dtype, num_warps: int) -> int:
    """16-byte loads each thread needs for one [block_k, block_d] basis tile."""
    return block_k * block_d * dtype.itemsize // (32 * num_warps * 16)


def cases():
    """``(name, kernel, signature, constexprs, aligned args, num_warps, tile (K, D))`` to compile."""
    for dtype, ptr in STORAGE.items():
        size = dtype.itemsize
        sig = {"basis_ptr": ptr, "row_stride": "i32", "x_ptr": "*fp32", "part_ptr": "*fp32",
               "K": "i32", "D": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "x_ptr", "part_ptr")
        for cfg in project._CONFIGS_1:
            kw = dict(cfg.kwargs, BLOCK_D=cfg.kwargs["ROW_BYTES"] // size, GROUP=16 // size)
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield "project", project._project_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        sig = {"basis_ptr": ptr, "row_stride": "i32", "x_ptr": "*fp32", "x_stride": "i32",
               "part_ptr": "*fp32", "K": "i32", "D": "i32", "B": "i32", "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "x_ptr", "x_stride", "part_ptr", "CHUNK")
        for cfg in project._CONFIGS_B:
            kw = dict(cfg.kwargs)
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield (
                "project_batched",
                project._project_batched_kernel,
                sig,
                kw,
                aligned,
                cfg.num_warps,
                dtype,
                tile,
            )
        sig = {"out_ptr": "*fp32", "w0_ptr": "*fp32", "basis_ptr": ptr, "row_stride": "i32",
               "scales_ptr": "*fp32", "alpha_ptr": "*fp32", "K": "i32", "D": "i32"}  # fmt: skip
        aligned = ("out_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
        for cfg in reconstruct._CONFIGS:
            kw = dict(cfg.kwargs, BLOCK_D=cfg.kwargs["ROW_BYTES"] // size)
            tile = (kw["BLOCK_K"], kw["BLOCK_D"])
            yield "reconstruct", reconstruct._reconstruct_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        common = {
            "FIELDS": param_table.FIELDS,
            "BLOCK_FIELDS": param_table.BLOCK_FIELDS,
            "BLOCK_D": param_table.BLOCK,
        }
        sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "basis_ptr": ptr, "row_stride": "i32",
               "part_ptr": "*fp32", "seg_ptr": "*i64", "L": "i32", "K": "i32", "NBLK": "i32"}  # fmt: skip
        aligned = ("ptab_ptr", "btab_ptr", "basis_ptr", "row_stride", "part_ptr")
        # Grads of one dtype (fp32, a typed load), and of mixed dtypes (three masked loads).
        for cfg, grad_code in itertools.product(step._PROJECT_CONFIGS, (0, -1)):
            kw = dict(cfg.kwargs, GROUP=16 // size, GRAD_CODE=grad_code, SEGMENTED=False, **common)
            tile = (kw["BLOCK_K"], param_table.BLOCK)
            yield "step_project", step._step_project_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "w0_ptr": "*fp32", "basis_ptr": ptr,
               "row_stride": "i32", "scales_ptr": "*fp32", "alpha_ptr": "*fp32", "seg_ptr": "*i64",
               "K": "i32", "NBLK": "i32"}  # fmt: skip
        aligned = ("ptab_ptr", "btab_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
        # One coefficient vector, and one row per parameter (per-block coordinates).
        for cfg, segmented in itertools.product(step._WRITE_CONFIGS, (False, True)):
            kw = dict(cfg.kwargs, SEGMENTED=segmented, **common)
            tile = (kw["BLOCK_K"], param_table.BLOCK)
            yield "step_write", step._step_write_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
        # orthogonalize_, once per sample: its three passes at their fixed tile shapes.
        bk, bd, group = orth.pass1_blocks(size)
        tile = (bk, bd)
        kw = {"BLOCK_K": bk, "BLOCK_D": bd, "GROUP": group}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "part_ptr": "*fp64",
               "vv_ptr": "*fp64", "R": "i32", "D": "i32", "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "part_ptr", "vv_ptr", "CHUNK")
        yield "orthogonalize_pass1", orth._orthogonalize_kernel, sig, kw, aligned, 4, dtype, tile
        nt, bk, bd = orth._remainder_blocks(ORTH_RANK, dtype.itemsize)
        rows = orth.remainder_rows(bk, bd, size)
        kw = {"NT": nt, "BLOCK_K": bk, "BLOCK_D": bd, "GROUP": 16 // size, "ROWS": rows}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "sc1_ptr": "*fp64",
               "part_ptr": "*fp64", "ss_ptr": "*fp64", "amax_ptr": "*fp64", "R": "i32", "D": "i32",
               "CHUNK": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "sc1_ptr", "part_ptr", "CHUNK")
        warps = orth.remainder_warps(bk, bd, size)
        yield (
            "orthogonalize_pass2",
            orth._orthogonalize_remainder_kernel,
            sig,
            kw,
            aligned,
            warps,
            dtype,
            (bk, bd),
        )
        tile = orth.store_blocks(size)
        kw = {"LIMIT": torch.finfo(dtype).max, "BLOCK_K": tile[0], "BLOCK_D": tile[1]}
        sig = {"basis_ptr": ptr, "row_stride": "i32", "sample_ptr": "*fp32", "sh_ptr": "*fp64",
               "inv_ptr": "*fp64", "rank": "i32", "R": "i32", "D": "i32"}  # fmt: skip
        aligned = ("basis_ptr", "row_stride", "sample_ptr", "sh_ptr", "inv_ptr")
        warps = orth._STORE_WARPS
        yield "orthogonalize_pass3", orth._orthogonalize_store_kernel, sig, kw, aligned, warps, dtype, tile
    yield from int8_cases()
    yield from orthogonalize_int8_cases()
    # Stage 2 of the projection, the fused step's K-dimensional step and orthogonalize_'s
    # reduces read no basis (tile (0, 0)): their entries check registers, local memory and
    # addresses only, at small and large K.
    for K in (8, 64, 512):
        block_n = min(project._REDUCE_BLOCK_N, pow2(K))
        kw = {"BLOCK_S": project._REDUCE_TILE // block_n, "BLOCK_N": block_n}
        sig = {
            "part_ptr": "*fp32",
            "scales_ptr": "*fp32",
            "out_ptr": "*fp32",
            "S": "i32",
            "K": "i32",
            "N": "i32",
        }
        yield f"project_reduce_K{K}", project._project_reduce_kernel, sig, kw, (), 8, torch.float32, (0, 0)
        kw = dict(subspace_step.launch_constexprs(K), FROM_PARTIALS=True, HAS_WD=True, HAS_MOMENTUM=True,
                  NESTEROV=False)  # fmt: skip
        sig = {"alpha_ptr": "*fp32", "buf_ptr": "*fp32", "counters_ptr": "*i64", "grad_ptr": "*fp32",
               "part_ptr": "*fp32", "scales_ptr": "*fp32", "S": "i32", "gram_ptr": "*fp32",
               "pw0_ptr": "*fp32", "K": "i32", "lr_ptr": "*fp32", "momentum": "fp32", "keep": "fp32",
               "weight_decay": "fp32"}  # fmt: skip
        warps = subspace_step.NUM_WARPS
        yield (
            f"subspace_step_K{K}",
            subspace_step._subspace_step_kernel,
            sig,
            kw,
            (),
            warps,
            torch.float32,
            (0, 0),
        )
        # orthogonalize_'s two one-program reduces (KP = next power of two of the rank).
        kw = {"KP": K, "BLOCK_S": orth._BLOCK_S, "FOLD": True, "FINISH": True}
        warps = 4 if K <= 64 else 8
        sig = {"part_ptr": "*fp64", "vv_ptr": "*fp64", "scales_ptr": "*fp32", "sums_ptr": "*fp64",
               "c1_ptr": "*fp64", "sc1_ptr": "*fp64", "S": "i32", "R": "i32"}  # fmt: skip
        kernel = orth._orthogonalize_reduce1_kernel
        yield f"orthogonalize_reduce1_K{K}", kernel, sig, kw, (), warps, torch.float32, (0, 0)
        kw = dict(kw, ROW_AMAX=orth.ROW_AMAX, WRITE_ROW=True)
        sig = {"part_ptr": "*fp64", "ss_ptr": "*fp64", "amax_ptr": "*fp64", "scales_ptr": "*fp32",
               "sums1_ptr": "*fp64", "sums_ptr": "*fp64", "c1_ptr": "*fp64", "out_ptr": "*fp64",
               "sh_ptr": "*fp64", "inv_ptr": "*fp64", "S": "i32", "R": "i32", "rank": "i32"}  # fmt: skip
        kernel = orth._orthogonalize_reduce2_kernel
        yield f"orthogonalize_reduce2_K{K}", kernel, sig, kw, (), warps, torch.float32, (0, 0)


def int8_cases():
    """The int8 kernels of ``cases``: project (one vector and batched) and reconstruct, with the
    [K, ceil(D / 64)] fp32 scales (their row stride ceil(D / 64), not a multiple of 16)."""
    dtype, ptr = torch.int8, "*i8"
    sig = {"basis_ptr": ptr, "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32",
           "x_ptr": "*fp32", "part_ptr": "*fp32", "K": "i32", "D": "i32"}  # fmt: skip
    aligned = ("basis_ptr", "row_stride", "scales_ptr", "x_ptr", "part_ptr")
    for cfg in project._CONFIGS_Q:
        tile = (cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_D"])
        yield "project", project._project_int8_kernel, sig, cfg.kwargs, aligned, cfg.num_warps, dtype, tile
    sig = {"basis_ptr": ptr, "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32",
           "x_ptr": "*fp32", "x_stride": "i32", "part_ptr": "*fp32", "K": "i32", "D": "i32", "B": "i32",
           "CHUNK": "i32"}  # fmt: skip
    aligned = ("basis_ptr", "row_stride", "scales_ptr", "x_ptr", "x_stride", "part_ptr", "CHUNK")
    for cfg in project._CONFIGS_B:
        kernel = project._project_batched_int8_kernel
        tile = (cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_D"])
        yield "project_batched", kernel, sig, cfg.kwargs, aligned, cfg.num_warps, dtype, tile
    sig = {"out_ptr": "*fp32", "w0_ptr": "*fp32", "basis_ptr": ptr, "row_stride": "i32",
           "scales_ptr": "*fp32", "scale_stride": "i32", "alpha_ptr": "*fp32", "K": "i32",
           "D": "i32"}  # fmt: skip
    aligned = ("out_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
    for cfg in reconstruct._CONFIGS_Q:
        kernel = reconstruct._reconstruct_int8_kernel
        tile = (cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_D"])
        yield "reconstruct", kernel, sig, cfg.kwargs, aligned, cfg.num_warps, dtype, tile
    yield from step_int8_cases()


def step_int8_cases():
    """The fused step's two int8 kernels, with grads of one dtype (fp32) and of mixed dtypes."""
    dtype, ptr = torch.int8, "*i8"
    common = {
        "FIELDS": param_table.FIELDS,
        "BLOCK_FIELDS": param_table.BLOCK_FIELDS,
        "BLOCK_D": param_table.BLOCK,
    }
    sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "basis_ptr": ptr, "row_stride": "i32",
           "scales_ptr": "*fp32", "scale_stride": "i32", "part_ptr": "*fp32", "seg_ptr": "*i64",
           "L": "i32", "K": "i32", "NBLK": "i32"}  # fmt: skip
    aligned = ("ptab_ptr", "btab_ptr", "basis_ptr", "row_stride", "scales_ptr", "part_ptr")
    for cfg, grad_code in itertools.product(step._PROJECT_CONFIGS_Q, (0, -1)):
        kw = dict(cfg.kwargs, GRAD_CODE=grad_code, SEGMENTED=False, **common)
        tile = (kw["BLOCK_K"], param_table.BLOCK)
        yield "step_project", step._step_project_int8_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile
    sig = {"ptab_ptr": "*i64", "btab_ptr": "*i64", "w0_ptr": "*fp32", "basis_ptr": ptr,
           "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32", "alpha_ptr": "*fp32",
           "seg_ptr": "*i64", "K": "i32", "NBLK": "i32"}  # fmt: skip
    aligned = ("ptab_ptr", "btab_ptr", "w0_ptr", "basis_ptr", "row_stride", "scales_ptr", "alpha_ptr")
    for cfg, segmented in itertools.product(step._WRITE_CONFIGS_Q, (False, True)):
        kw = dict(cfg.kwargs, SEGMENTED=segmented, **common)
        tile = (kw["BLOCK_K"], param_table.BLOCK)
        yield "step_write", step._step_write_int8_kernel, sig, kw, aligned, cfg.num_warps, dtype, tile


def orthogonalize_int8_cases():
    """orthogonalize_'s three passes over an int8 basis with its [K, ceil(D / 64)] fp32 scales
    (their row stride ceil(D / 64), not a multiple of 16): passes 1 and 3 walk [BLOCK_K, 2048]
    tiles row by row, pass 2 reads [K, 128] slabs at the rank of the float cases."""
    dtype, ptr = torch.int8, "*i8"
    tile = (orth._INT8_PASS1_BLOCK_K, orth._INT8_BLOCK_D)
    kw = {"BLOCK_K": tile[0], "BLOCK_D": tile[1]}
    sig = {"basis_ptr": ptr, "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32",
           "sample_ptr": "*fp32", "part_ptr": "*fp64", "vv_ptr": "*fp64", "R": "i32", "D": "i32",
           "CHUNK": "i32"}  # fmt: skip
    aligned = ("basis_ptr", "row_stride", "scales_ptr", "sample_ptr", "part_ptr", "vv_ptr", "CHUNK")
    yield "orthogonalize_pass1", orth._orthogonalize_int8_kernel, sig, kw, aligned, 4, dtype, tile
    nt, bk, bd = orth._remainder_blocks(ORTH_RANK, 1)
    kw = {"NT": nt, "BLOCK_K": bk, "BLOCK_D": bd, "GROUP": 16, "ROWS": orth.remainder_rows(bk, bd, 1)}
    sig = {"basis_ptr": ptr, "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32",
           "sample_ptr": "*fp32", "sc1_ptr": "*fp64", "part_ptr": "*fp64", "ss_ptr": "*fp64",
           "amax_ptr": "*fp64", "R": "i32", "D": "i32", "CHUNK": "i32"}  # fmt: skip
    aligned = ("basis_ptr", "row_stride", "scales_ptr", "sample_ptr", "sc1_ptr", "part_ptr", "CHUNK")
    warps = orth.remainder_warps(bk, bd, 1)
    kernel = orth._orthogonalize_remainder_int8_kernel
    yield "orthogonalize_pass2", kernel, sig, kw, aligned, warps, dtype, (bk, bd)
    tile = (orth._INT8_STORE_BLOCK_K, orth._INT8_BLOCK_D)
    kw = {"BLOCK_K": tile[0], "BLOCK_D": tile[1]}
    sig = {"basis_ptr": ptr, "row_stride": "i32", "scales_ptr": "*fp32", "scale_stride": "i32",
           "sample_ptr": "*fp32", "sh_ptr": "*fp64", "norm_ptr": "*fp64", "rank": "i32", "R": "i32",
           "D": "i32"}  # fmt: skip
    aligned = ("basis_ptr", "row_stride", "scales_ptr", "sample_ptr", "sh_ptr")
    yield "orthogonalize_pass3", orth._orthogonalize_store_int8_kernel, sig, kw, aligned, 4, dtype, tile


# ---- canaries: kernels the address check must refuse (and one it must pass) -----------------
# Each forms an address the way a real kernel could get wrong; ``main`` reports what the check
# finds in them, and the test asserts it finds exactly the products marked below.


@triton.jit
def _canary_row_times_stride(ptr, rank, row_stride, BLOCK: tl.constexpr):
    # orthogonalize_'s store pass before the fix: basis_ptr + rank * row_stride + offs_d
    tl.store(ptr + rank * row_stride + tl.arange(0, BLOCK), 0.0)


@triton.jit
def _canary_widened_after_product(ptr, rank, row_stride, BLOCK: tl.constexpr):
    tl.store(ptr + (rank * row_stride).to(tl.int64) + tl.arange(0, BLOCK), 0.0)


@triton.jit
def _canary_loop_row_times_stride(ptr, K, row_stride, BLOCK: tl.constexpr):
    for k in range(0, K):
        tl.store(ptr + k * row_stride + tl.arange(0, BLOCK), 0.0)


@triton.jit
def _canary_program_times_chunk(ptr, CHUNK, BLOCK: tl.constexpr):
    tl.store(ptr + tl.program_id(0) * CHUNK + tl.arange(0, BLOCK), 0.0)


@triton.jit
def _canary_rows_times_stride(ptr, row_stride, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    tl.store(ptr + rows[:, None] * row_stride + tl.arange(0, BLOCK)[None, :], 0.0)


@triton.jit
def _canary_carried_by_loop(ptr, K, rank, row_stride, BLOCK: tl.constexpr):
    off = rank * row_stride
    for _ in range(0, K):
        tl.store(ptr + off + tl.arange(0, BLOCK), 0.0)
        off += BLOCK


@triton.jit
def _canary_integer_address(table_ptr, rank, row_stride, BLOCK: tl.constexpr):
    addr = tl.load(table_ptr) + rank * row_stride
    tl.store(addr.to(tl.pointer_type(tl.float32)) + tl.arange(0, BLOCK), 0.0)


@triton.jit
def _canary_large_constants(ptr, BLOCK: tl.constexpr):
    tl.store(ptr + tl.arange(0, BLOCK) * 4194304, 0.0)  # 1023 * 2^22 >= 2^31


@triton.jit
def _canary_clean(ptr, rank, row_stride, K, CHUNK, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + rank.to(tl.int64) * row_stride + pid * CHUNK + offs, 0.0)
    for k in range(0, K):
        tl.store(ptr + k.to(tl.int64) * row_stride + offs * 4, 0.0)
    tl.store(ptr + offs[:, None] * BLOCK + offs[None, :], 0.0)


def canaries():
    """``(name, kernel, signature, products the check must report)``; every case has BLOCK=1024."""
    ptr, i32 = "*fp32", "i32"
    yield "row_times_stride", _canary_row_times_stride, {"ptr": ptr, "rank": i32, "row_stride": i32}, 1
    yield (
        "widened_after_product",
        _canary_widened_after_product,
        {"ptr": ptr, "rank": i32, "row_stride": i32},
        1,
    )
    yield "loop_row_times_stride", _canary_loop_row_times_stride, {"ptr": ptr, "K": i32, "row_stride": i32}, 1
    yield "program_times_chunk", _canary_program_times_chunk, {"ptr": ptr, "CHUNK": i32}, 1
    yield "rows_times_stride", _canary_rows_times_stride, {"ptr": ptr, "row_stride": i32}, 1
    sig = {"ptr": ptr, "K": i32, "rank": i32, "row_stride": i32}
    yield "carried_by_loop", _canary_carried_by_loop, sig, 1
    sig = {"table_ptr": "*i64", "rank": i32, "row_stride": i32}
    yield "integer_address", _canary_integer_address, sig, 1
    yield "large_constants", _canary_large_constants, {"ptr": ptr}, 1
    sig = {"ptr": ptr, "rank": i32, "row_stride": i32, "K": i32, "CHUNK": i32}
    yield "clean", _canary_clean, sig, 0


def canary_report() -> list[dict]:
    rows = []
    for name, kernel, sig, expected in canaries():
        compiled = compile_kernel(90, kernel, sig, {"BLOCK": 1024}, (), 4)
        found = {ir: address_products(compiled.asm[ir]) for ir in ("ttir", "ttgir")}
        rows.append({"canary": name, "expected": expected, **found})
    return rows


def main() -> None:
    rows = []
    for cc in TARGETS:
        for name, kernel, sig, kw, aligned, warps, dtype, (bk, bd) in cases():
            if cc != 90 and dtype != torch.float16 and bk:
                continue
            info = compile_for(cc, kernel, sig, kw, aligned, warps)
            info.update(
                cc=cc,
                kernel=name,
                dtype=str(dtype).removeprefix("torch."),
                config={k: v for k, v in kw.items() if k.startswith(("BLOCK", "ROW", "PROGRAMS", "GRAD"))},
                num_warps=warps,
                basis_loads_needed=basis_loads_per_thread(bk, bd, dtype, warps),
            )
            # Programs per SM the launch's grid is one wave of (where it assumes one).
            if "PROGRAMS_PER_SM" in kw:
                info["assumed_per_sm"] = kw["PROGRAMS_PER_SM"]
            elif name in ("orthogonalize_pass1", "orthogonalize_pass2"):
                info["assumed_per_sm"] = orth.PROGRAMS_PER_SM
            rows.append(info)
    json.dump({"cases": rows, "canaries": canary_report()}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
