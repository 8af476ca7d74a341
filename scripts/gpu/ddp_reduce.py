"""DDP's gradient reduce with and without ``train.deterministic``'s rank-order hook, under torchrun (NCCL or gloo).

For each reduce (DDP's all-reduce, the rank-order hook) and bucket size, a stack of linear layers is wrapped, and
``--steps`` forward/backward passes on fixed per-rank inputs are timed (CUDA events around each pass after two
warm-up passes; the first pass uses DDP's initial single bucket, the later ones its rebuilt buckets). Rank 0 reports
the median ms per pass, whether the mean gradient came out bit-identical on the first pass and the last, and over
the bucket sizes (the hook's must; DDP's all-reduce may differ from 3 ranks on), and the largest difference of the
hook's gradient from DDP's all-reduce, relative to the gradient's largest magnitude.

    torchrun --standalone --nproc_per_node 2 scripts/gpu/ddp_reduce.py --out $OUT/ddp_reduce.json
    DEVICE=cpu torchrun --standalone --nproc_per_node 3 scripts/gpu/ddp_reduce.py --width 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from d3s2.train import distributed as D


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu()


def _run(info: D.DistInfo, args: argparse.Namespace, rank_order: bool, bucket_mb: float) -> dict:
    torch.manual_seed(0)  # the same weights on every rank
    layers = [m for _ in range(args.layers) for m in (nn.Linear(args.width, args.width), nn.GELU())]
    model = D.parallelize(nn.Sequential(*layers).to(info.device), info, bucket_mb=bucket_mb,
                          rank_order_reduce=rank_order)
    torch.manual_seed(1 + info.rank)  # each rank its own batch
    x = torch.randn(args.batch, args.width, device=info.device)
    times, grads = [], []
    for step in range(args.steps + 2):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        model(x).square().mean().backward()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append((time.perf_counter() - start) * 1e3)
        if step in (0, args.steps + 1):
            grads.append(_flat_grads(model))
    return {"ms": statistics.median(times), "first": grads[0], "last": grads[1]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--buckets", type=float, nargs="+", default=[25.0, 8.0], help="DDP bucket sizes in MB")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    info = D.init_distributed(os.environ.get("DEVICE", "auto"))
    results = {}
    for rank_order in (False, True):
        runs = [_run(info, args, rank_order, mb) for mb in args.buckets]
        results["rank_order" if rank_order else "all_reduce"] = {
            "ms_per_pass": {str(mb): round(run["ms"], 3) for mb, run in zip(args.buckets, runs, strict=True)},
            "first_equals_last": all(torch.equal(r["first"], r["last"]) for r in runs),
            "equal_over_bucket_sizes": all(torch.equal(r["last"], runs[0]["last"]) for r in runs),
            "grad": runs[0]["last"],
        }
    reference, hooked = results["all_reduce"].pop("grad"), results["rank_order"].pop("grad")
    report = {"device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
              "world_size": info.world_size, "parameters": reference.numel(), "width": args.width,
              "layers": args.layers, "batch": args.batch, "steps": args.steps, **results,
              "rank_order_vs_all_reduce_max_rel": float((hooked - reference).abs().max() / reference.abs().max())}
    if info.rank == 0:
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    D.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
