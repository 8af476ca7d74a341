"""Issue 4 experiment (session 25): the compressed branch's exp passes as hand-written CUDA compiled at run time by
NVRTC (``scripts/gpu/nvrtc25.cu``), against the Triton kernels on the same inputs (v1.1, N = 133,758, bf16).

Checks each variant first (the LSE probe against ``cmp_attention_fwd``'s LSE; the top-k's blocks against
``cmp_select_topk``'s, counting rows whose sets differ beyond score ties), then times everything in alternating
rounds in one process. Compiles with the NVRTC that PyTorch loads; ``--cubins DIR`` loads CUBINs built elsewhere
(``--build DIR`` on a box with NVRTC but no GPU). Usage (device)::

    PYTHONPATH=src python3 scripts/gpu/nvrtc25.py --layouts .gpu/layouts/latent_layouts_1024.npz [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("nvrtc25.cu")
LOG2E = 1.4426950408889634

# (name, kernel, macros): WARPS, TOK, CK, STAGES, MINB, POLY_EVERY, KT_UNROLL, TOPK; first run (session 25,
# H200): w4 t4 1.49 ms, ck128 1.46, w8 / t2 / t8 1.53-1.69, poly4 1.50, poly2 1.87; the top-k 2.91-3.43 (one
# warp-wide insertion per hit)
BASE = {"WARPS": 4, "TOK": 4, "CK": 64, "STAGES": 3, "MINB": 2, "POLY_EVERY": 0, "KT_UNROLL": 2, "TOPK": 8, "SYNTH": 0}
VARIANTS = [
    ("lse w4 t4", "lse_probe", {}),
    ("lse w4 t4 ck128", "lse_probe", {"CK": 128}),
    ("lse w4 t4 ck128 s2", "lse_probe", {"CK": 128, "STAGES": 2}),
    ("lse w4 t4 ck128 s4", "lse_probe", {"CK": 128, "STAGES": 4}),
    ("lse w4 t4 ck256 s2", "lse_probe", {"CK": 256, "STAGES": 2}),
    ("lse w4 t4 ck256 s3", "lse_probe", {"CK": 256, "STAGES": 3}),
    ("lse w4 t4 ck128 u1", "lse_probe", {"CK": 128, "KT_UNROLL": 1}),
    ("lse w4 t4 ck128 u4", "lse_probe", {"CK": 128, "KT_UNROLL": 4}),
    ("lse w4 t3 ck128", "lse_probe", {"CK": 128, "TOK": 3, "MINB": 4}),
    ("lse w2 t4 ck128", "lse_probe", {"CK": 128, "WARPS": 2, "MINB": 8}),
    ("lse w4 t4 ck128 poly4", "lse_probe", {"CK": 128, "POLY_EVERY": 4}),
    ("lse w4 t4 ck128 poly8", "lse_probe", {"CK": 128, "POLY_EVERY": 8}),
    ("lse w4 t4 ck256 s3 poly8", "lse_probe", {"CK": 256, "POLY_EVERY": 8}),
    ("topk w4 t2", "topk", {"TOK": 2}),
    # where the probe's time goes (timing only, wrong LSE): no shared memory and barriers; also no tensor cores
    ("lse w4 t4 ck128 synth-regs", "lse_probe", {"CK": 128, "SYNTH": 1}),
    ("lse w4 t4 ck128 synth-ffma", "lse_probe", {"CK": 128, "SYNTH": 2}),
    ("lse w4 t4 ck128 poly4 synth-ffma", "lse_probe", {"CK": 128, "SYNTH": 2, "POLY_EVERY": 4}),
    ("lse w8 t4 ck128 synth-ffma", "lse_probe", {"CK": 128, "SYNTH": 2, "WARPS": 8}),
]


def source_for(macros: dict) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in {**BASE, **macros}.items()) + SOURCE.read_text()


def nvrtc_cubin(lib, src: str, name: str, arch: str = "sm_90") -> tuple[bytes, str]:
    """CUBIN of ``src`` for ``arch`` and ptxas's -v log (registers, spills)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"nvrtc25.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v", b"-std=c++17"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode()
    if res:
        raise RuntimeError(f"NVRTC failed for {name}:\n{text}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, buf)
    # ptxas reports every kernel of the source: keep the lines of `name`'s entry
    block = text.split(f"entry function '{name}'")[-1].split("Compiling entry function")[0]
    lines = [ln.strip() for ln in block.splitlines() if "registers" in ln or "spill" in ln]
    return buf.raw, " ".join(lines)


def build(lib, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for label, kernel, macros in VARIANTS:
        cubin, log = nvrtc_cubin(lib, source_for(macros), kernel)
        (out / f"{label.replace(' ', '_')}.cubin").write_bytes(cubin)
        print(f"{label}: {log}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cubins", help="load CUBINs from this folder instead of compiling")
    ap.add_argument("--build", help="only compile every variant's CUBIN into this folder (no GPU needed)")
    ap.add_argument("--nvrtc", help="path of libnvrtc (default: the one PyTorch loads)")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args()
    if args.build:
        build(ctypes.CDLL(args.nvrtc), Path(args.build))
        return

    import torch
    from torch.cuda._utils import _cuda_load_module
    from triton.testing import do_bench

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_ssa as b

    from d3s2.ops.block_attn.triton import segment_max_norm

    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts)
    layout, q, kc, vc, scale, lse_ref, idx_ref = (st[n] for n in ("layout", "q", "kc", "vc", "scale", "lse", "idx"))
    assert q.is_contiguous() and kc.stride(2) == 1 and kc.stride(1) == 32, "the CUDA kernels expect [N, H, 32] rows"
    n = q.shape[0]
    print(f"N = {n}, {layout.batch_size} sample(s), {int(layout.cu_cmp[-1])} compressed blocks, "
          f"{torch.cuda.get_device_name()}")
    lib = None
    if not args.cubins:
        from torch.cuda._utils import _get_gpu_rtc_library
        lib = ctypes.CDLL(args.nvrtc) if args.nvrtc else _get_gpu_rtc_library()
    sl = torch.tensor([scale * LOG2E], dtype=torch.float32, device="cuda")
    kmax = segment_max_norm(kc, layout.cu_cmp).contiguous()
    cu_seq = layout.cu_seqlens.to(torch.int32).contiguous()
    cu_cmp = layout.cu_cmp.to(torch.int32).contiguous()
    max_seqlen = int(layout.max_seqlen)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from exp_pass_probe import lse_pass

    fns = {"triton cmp_fwd": lambda: b.tc.cmp_attention_fwd(q, kc, vc, layout, scale),
           "triton topk": lambda: b.tc.cmp_select_topk(q, kc, lse_ref, layout, 8, scale),
           # the session-19 Triton LSE probes (exp_pass_probe.py): the same work as lse_probe
           "triton lse probe mufu w4": lambda: lse_pass(q, kc, layout, scale, 64, "mufu", 80, 3, 4),
           "triton lse probe mix4 w8": lambda: lse_pass(q, kc, layout, scale, 64, "mix4", 80, 3, 8)}
    results = {"device": torch.cuda.get_device_name(), "n": n, "variants": {}}
    # the Triton top-k's ids: global selection-block ids; the CUDA kernel's are local to the sample
    slc_start = layout.cu_slc[:-1].long()
    sample_of = torch.repeat_interleave(torch.arange(layout.batch_size, device="cuda"),
                                        (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long())
    for label, kernel, macros in VARIANTS:
        cfg = {**BASE, **macros}
        try:
            if args.cubins:
                cubin = (Path(args.cubins) / f"{label.replace(' ', '_')}.cubin").read_bytes()
                log = ""
            else:
                cubin, log = nvrtc_cubin(lib, source_for(macros), kernel)
            fn_k = _cuda_load_module(cubin, [kernel])[kernel]
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            print(f"{label}: build/load failed: {e}")
            results["variants"][label] = {"error": str(e)}
            continue
        grid = ((max_seqlen + cfg["WARPS"] * cfg["TOK"] - 1) // (cfg["WARPS"] * cfg["TOK"]), layout.batch_size, 2)
        block = (cfg["WARPS"] * 32, 1, 1)
        if kernel == "lse_probe":
            out = torch.empty(n, 32, dtype=torch.float32, device="cuda")

            def call(fn_k=fn_k, out=out, grid=grid, block=block):
                fn_k(grid=grid, block=block, args=[q, kc, out, cu_seq, cu_cmp, kmax, sl, q.stride(0), kc.stride(0)])
                return out
            err = (call() - lse_ref).abs().max().item()
            check = {"max_abs_lse_err": err}
        else:
            out = torch.empty(n, 2, cfg["TOPK"], dtype=torch.int32, device="cuda")

            def call(fn_k=fn_k, out=out, grid=grid, block=block):
                fn_k(grid=grid, block=block, args=[q, kc, lse_ref, out, cu_seq, cu_cmp, sl, q.stride(0), kc.stride(0)])
                return out
            got = call().long()
            got_global = torch.where(got >= 0, got + slc_start[sample_of][:, None, None], got)
            same = (got_global.sort(-1).values == idx_ref.long().sort(-1).values).all(-1)
            order_same = (got_global == idx_ref.long()).all(-1)
            check = {"rows_same_set": float(same.float().mean()), "rows_same_order": float(order_same.float().mean()),
                     "rows": int(same.numel())}
        torch.cuda.synchronize()
        print(f"{label}: {check} {log}")
        results["variants"][label] = {"check": check, "ptxas": log, "config": cfg}
        fns[label] = call
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(do_bench(fn, rep=100, return_mode="median"))
    print("| kernel | ms (rounds) |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | " + " / ".join(f"{t:.3f}" for t in ts) + " |")
        results.setdefault("times_ms", {})[name] = ts
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "nvrtc25.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
