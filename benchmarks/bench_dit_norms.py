"""Micro-benchmark of the fused DiT-block norms (d3s2.ops.dit_norm) against the torch expressions they replace.

Per op, GPU ms (``triton.testing.do_bench`` median, L2 flushed between calls) at the shapes of one sampling
step: dense DiT (CFG pair, 2 × 4096 tokens, C 1024, 16 heads × 64), sparse 512³ (2 × 6090 tokens: equal lengths,
modulation rows per sample) and a ragged sparse batch (6090 + 4000 tokens: a sample index per token). "torch"
is the block's autograd (training) path, "fused" its inference path:

- ``modulate``: LN1 + adaLN modulation, ``addcmul(shift, LN(x), 1 + scale)``;
- ``gate_affine``: gated residual + affine LN2, ``r = addcmul(x, gate, u)``, ``LN(r)·w + b``;
- ``add_modulate``: residual + LN3 + modulation;
- ``gated_residual``: ``addcmul(x, gate, u)``;
- ``qk_rms_norm`` (dense only): the per-head RMS norm of q and k (two MultiHeadRMSNorm calls vs one in-place
  launch on the qkv projection output);
- ``ffn`` (GEMM C → 4C + GELU(tanh)): torch (GEMM, then a GELU pass) vs the cuBLASLt GELU epilogue
  (``d3s2.ops.linear_gelu``, backend ``cublaslt``; off in auto until these rows show it faster);
- ``block``: one whole dense block (C 1024, full size) under no_grad with the ``dit_norm`` backend torch vs triton.

The per-step saving is the per-block sum × 24 blocks.

    PYTHONPATH=src python benchmarks/bench_dit_norms.py [--out-dir DIR]     # CUDA
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/bench_dit_norms.py --tiny --device cpu   # smoke run

Writes ``dit_norms_<label>.json`` / ``.md`` to ``--out-dir`` (default $OUT, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _common import default_out_dir, environment, write_outputs  # puts src on sys.path first

from d3s2.models.dit import ConditionTokens
from d3s2.models.dit.blocks import ModulatedCrossBlock, MultiHeadRMSNorm, SelfAttention, layer_norm32
from d3s2.ops import use_backend
from d3s2.ops.dit_norm import add_norm, qk_rms_norm_
from d3s2.ops.linear_gelu import linear_gelu

NUM_BLOCKS = 24


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device.startswith("cuda"):
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e3

    return cpu


def _norm_ops(b: int, t: int, c: int, device: str, dtype: torch.dtype, lengths: tuple[int, ...] | None):
    """{op: (torch fn, fused fn)} on B samples of T rows (equal lengths) or of ``lengths`` rows (ragged)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    m = sum(lengths) if lengths else b * t
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, u, mod, w, bias = mk(m, c), mk(m, c), mk(b, 6 * c) * 0.1, mk(c), mk(c)
    shift, scale, gate = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    if lengths:
        sample = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lengths, device=device))
        rows = lambda v: v.index_select(0, sample)  # noqa: E731 - the torch path's per-token modulation rows
        view = lambda v: v  # noqa: E731
    else:
        sample = t
        rows = lambda v: v[:, None, :]  # noqa: E731
        view = lambda v: v.view(b, t, c)  # noqa: E731
    eps = 1e-6
    xs, us = view(x), view(u)
    sh, sc, ga = rows(shift), rows(scale), rows(gate)  # gathered once, outside the timed torch calls
    return {
        "modulate": (lambda: torch.addcmul(sh, layer_norm32(xs, (c,), eps=eps), 1 + sc),
                     lambda: add_norm(x, shift=shift, scale=scale, eps=eps, sample=sample)),
        "gate_affine": (lambda: layer_norm32(torch.addcmul(xs, ga, us), (c,), w, bias, eps),
                        lambda: add_norm(x, u, gate, weight=w, bias=bias, eps=eps, sample=sample)),
        "add_modulate": (lambda: torch.addcmul(sh, layer_norm32(xs + us, (c,), eps=eps), 1 + sc),
                         lambda: add_norm(x, u, shift=shift, scale=scale, eps=eps, sample=sample)),
        "gated_residual": (lambda: torch.addcmul(xs, ga, us),
                           lambda: add_norm(x, u, gate, normalize=False, sample=sample)),
    }


def _qk_ops(b: int, t: int, h: int, d: int, device: str, dtype: torch.dtype):
    norm_q, norm_k = MultiHeadRMSNorm(d, h).to(device, dtype), MultiHeadRMSNorm(d, h).to(device, dtype)
    qkv = torch.randn(b, t, 3 * h * d, device=device, dtype=dtype).view(b, t, 3, h, d)

    def before() -> object:
        q, k, _ = qkv.unbind(2)
        return norm_q(q), norm_k(k)

    # In place on a scratch copy would time the copy too; normalising the same buffer again is the same work.
    return before, lambda: qk_rms_norm_(qkv, norm_q.gamma, norm_k.gamma)


def _ffn_ops(m: int, c: int, device: str, dtype: torch.dtype):
    x = torch.randn(m, c, device=device, dtype=dtype)
    w = torch.randn(4 * c, c, device=device, dtype=dtype) * 0.03
    b = torch.randn(4 * c, device=device, dtype=dtype)
    epilogue = "cublaslt" if device.startswith("cuda") else "torch"  # the epilogue backend is CUDA-only
    return lambda: linear_gelu(x, w, b, backend="torch"), lambda: linear_gelu(x, w, b, backend=epilogue)


def _block_ops(b: int, t: int, c: int, heads: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    block = ModulatedCrossBlock(c, c, heads, SelfAttention(c, heads, qk_rms_norm=True)).to(device, dtype)
    for p in block.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(b, t, c, device=device, dtype=dtype)
    t_emb = torch.randn(b, c, device=device, dtype=dtype)
    cond = ConditionTokens(torch.randn(b, 257 if t > 64 else 5, c, device=device, dtype=dtype))

    def run(name: str) -> Callable[[], object]:
        def fn() -> object:
            with torch.no_grad(), use_backend("dit_norm", name):
                return block(x, t_emb, cond)
        return fn

    return run("torch"), run("triton")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--label", default="", help="appended to the output file names")
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    dev, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.tiny:
        dense, sparse, ragged, heads = (2, 64, 64), (2, 40, 64), (37, 21), 4
    else:
        dense, sparse, ragged, heads = (2, 4096, 1024), (2, 6090, 1024), (6090, 4000), 16
    timer = _timer(dev)
    cases: dict[str, dict[str, tuple[Callable, Callable]]] = {
        "dense": _norm_ops(*dense, dev, dtype, None),
        "sparse_512": _norm_ops(*sparse, dev, dtype, None),
        "sparse_ragged": _norm_ops(2, 0, sparse[2], dev, dtype, ragged),
    }
    cases["dense"]["qk_rms_norm"] = _qk_ops(dense[0], dense[1], heads, dense[2] // heads, dev, dtype)
    cases["dense"]["ffn"] = _ffn_ops(dense[0] * dense[1], dense[2], dev, dtype)
    cases["sparse_512"]["ffn"] = _ffn_ops(sparse[0] * sparse[1], sparse[2], dev, dtype)
    rows = []
    for case, ops in cases.items():
        for op, (before, after) in ops.items():
            with use_backend("dit_norm", "triton"):  # explicit: on the CPU auto would pick torch
                t_before, t_after = timer(before), timer(after)
            rows.append({"case": case, "op": op, "torch_ms": round(t_before, 4), "fused_ms": round(t_after, 4),
                         "speedup": round(t_before / t_after, 2) if t_after else None})
    block_before, block_after = _block_ops(*dense[:2], dense[2], heads, dev, dtype)
    t_before, t_after = timer(block_before), timer(block_after)
    rows.append({"case": "dense", "op": "block", "torch_ms": round(t_before, 4), "fused_ms": round(t_after, 4),
                 "speedup": round(t_before / t_after, 2) if t_after else None})
    per_block = {case: sum(r["torch_ms"] - r["fused_ms"] for r in rows
                           if r["case"] == case and r["op"] not in ("block", "ffn")) for case in cases}
    result = {**environment(dev), "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
              "shapes": {"dense": dense, "sparse_512": sparse, "sparse_ragged": ragged, "heads": heads},
              "rows": rows, "saved_ms_per_block": {k: round(v, 4) for k, v in per_block.items()},
              "saved_ms_per_step": {k: round(v * NUM_BLOCKS, 3) for k, v in per_block.items()}}
    md = [f"# Fused DiT norms ({result['device']})\n", f"`{result['command']}`\n",
          f"commit {result['commit'][:10]}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
          f"dtype {result['dtype']}\n", "| case | op | torch ms | fused ms | speedup |", "|---|---|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['op']} | {r['torch_ms']:.4f} | {r['fused_ms']:.4f} | {r['speedup']} |" for r in rows]
    md += ["", "Saved per step by the norms (per-block sum × 24; ffn and block rows excluded): "
           + ", ".join(f"{k} {v} ms" for k, v in result["saved_ms_per_step"].items()), ""]
    stem = "dit_norms" + (f"_{args.label}" if args.label else "")
    for path in write_outputs(args.out_dir or default_out_dir(), stem, result, "\n".join(md)):
        print(path)
    print("\n".join(md))


if __name__ == "__main__":
    main()
