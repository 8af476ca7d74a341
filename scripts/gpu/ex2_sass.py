"""Which SASS the half-precision exps compile to on sm_90 (no GPU needed): ``ex2.approx.ftz.bf16x2``,
``ex2.approx.f16x2`` and float32 ``exp2``, 8 values per thread each. Prints the MUFU opcodes and their count, and the
packing / conversion instructions around them. Usage (CPU box, Triton 3.6 venv, see ``sm90_compile.py``)::

    TRITON_ALWAYS_COMPILE=1 /work/tri36/bin/python scripts/gpu/ex2_sass.py

Session 21: bf16x2 → 8 ``MUFU.EX2.BF16`` (one per value), f16x2 → 8 ``MUFU.EX2.F16``, float32 → 8 ``MUFU.EX2``.
"""
import re
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_compile import compile_sm90, report  # noqa: E402

MODES = {0: "ex2.approx.ftz.bf16x2", 1: "ex2.approx.f16x2", 2: "float32 exp2"}


@triton.jit
def _exp_kernel(X, Y, N: tl.constexpr, MODE: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    if MODE == 0:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x], dtype=tl.bfloat16,
                                      is_pure=True, pack=2)
    elif MODE == 1:
        y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                      is_pure=True, pack=2).to(tl.bfloat16)
    else:
        y = tl.math.exp2(x.to(tl.float32)).to(tl.bfloat16)
    tl.store(Y + offs, y)


def main() -> None:
    for mode, name in MODES.items():
        compiled = compile_sm90(_exp_kernel, {"X": "*bf16", "Y": "*bf16"}, {"N": 1024, "MODE": mode},
                                div16=("X", "Y"), num_warps=4)
        sass = report(compiled, sass=True)["sass"]
        print(f"{name:22s} MUFU ops {sorted(set(re.findall(r'MUFU[.A-Z0-9_]*', sass)))} × "
              f"{len(re.findall(r'MUFU', sass))} for 8 values per thread; packs/conversions "
              f"{len(re.findall(r'F2FP|PRMT|HADD2|HMUL2', sass))}")


if __name__ == "__main__":
    main()
