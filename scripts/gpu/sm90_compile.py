"""Compile a Triton kernel for sm_90 on a CPU box (no GPU) and report registers, spills and SASS.

Needs the device's Triton (3.6) in a side environment: ``python3 -m venv /work/tri36 && /work/tri36/bin/pip install
triton==3.6.0 torch==2.13.0 numpy``. Example (the selection forward at the v1.1 shape)::

    import sys; sys.path[:0] = ["scripts/gpu", "src"]
    from sm90_compile import compile_sm90, report
    from d3s2.ops.block_attn import triton as bt
    c = compile_sm90(bt.block_attn_fwd_kernel, {"Q": "*bf16", ...}, {"G": 16, "D": 32, ...},
                     div16=("Q", "K", ...), num_warps=4, num_stages=3, maxnreg=96)
    print(report(c)["res"])  # REG, STACK (spill bytes), SHARED

``types`` maps each runtime argument to a Triton signature type, ``consts`` each constexpr to its value, ``div16``
names the arguments the launch specialises as divisible by 16 (pointers, strides of 16-multiples). Registers and
spills matched the device's in sessions 9 and 10.
"""
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")  # cuobjdump, nvdisasm shipped with Triton


def compile_sm90(fn, types: dict, consts: dict, div16=(), source=ASTSource, **options):
    """``triton.compile`` of jit function ``fn`` for sm_90; options as a launch's (num_warps, num_stages, maxnreg);
    ``source`` ``GluonASTSource`` for a Gluon kernel."""
    names = list(inspect.signature(fn.fn).parameters)
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        else:
            signature[name] = types[name]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return triton.compile(source(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 3, **options})


def report(compiled, sass: bool = False) -> dict:
    """``res``: cuobjdump's resource line (REG registers per thread, STACK spill bytes, SHARED static bytes);
    ``regs``; with ``sass`` the disassembly (``nvdisasm -c``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    out = {"regs": int(regs.group(1)) if regs else None, "res": usage.strip().splitlines()[-1]}
    if sass:
        out["sass"] = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return out
