"""Top-k selection of an old ``triton_compress.py`` (copied into the package as ``_old_compress.py`` by the device
script) against this tree's, under config overrides of this tree's, interleaved in one process; the selected blocks
compared with the old kernel's (fraction of entries that differ). Usage (device)::

    cp .gpu/old/triton_compress.py src/d3s2/ops/ssa/_old_compress.py
    PYTHONPATH=src python3 scripts/gpu/topk_old_new.py --layouts .gpu/layouts/latent_layouts_1024.npz --m-cmp 4 \\
        --variants '{"new": {}, "ms4": {"m_split": 4}}'
"""

import argparse
import json
import sys
from pathlib import Path

from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_ssa as b  # noqa: E402

import d3s2.ops.ssa._old_compress as old  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--size", default="131072")
    ap.add_argument("--m-cmp", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--variants", required=True, help="JSON: name → overrides of this tree's top-k config")
    args = ap.parse_args()
    import torch

    b.DEV, b.DTYPE = "cuda", torch.bfloat16
    st = b.v11_state(args.layouts, args.size, args.m_cmp)
    layout, q, kc, lse, scale = (st[n] for n in ("layout", "q", "kc", "lse", "scale"))
    key = "topk" if layout.m_cmp == layout.m_slc else "topk_seg"
    saved = dict(b.tc.CONFIG[key])
    fns = {"old": lambda: old.cmp_select_topk(q, kc, lse, layout, args.topk, scale)}
    overrides = json.loads(args.variants)
    for name in overrides:
        fns[name] = lambda: b.tc.cmp_select_topk(q, kc, lse, layout, args.topk, scale)

    def use(name: str) -> None:
        b.tc.CONFIG[key] = {**saved, **overrides.get(name, {})}

    ref = fns["old"]()
    for name, fn in fns.items():
        use(name)
        print(f"{name}: entries differing from old {(fn() != ref).float().mean():.2e}", flush=True)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            use(name)
            times[name].append(do_bench(fn, rep=100, return_mode="median"))
    use("old")
    print(json.dumps({"m_cmp": args.m_cmp, "topk": args.topk, "N": int(q.shape[0]), "compressed_blocks": int(kc.shape[0]),
                      "overrides": overrides, "ms": times}))
    print("| " + " | ".join(fns) + " |")
    print("|" + "---|" * len(fns))
    print("| " + " | ".join(" / ".join(f"{t:.3f}" for t in times[n]) for n in fns) + " |")


if __name__ == "__main__":
    main()
