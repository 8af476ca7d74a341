"""Host cost of SS-VAE training micro-batches: core-seconds of the DataLoader work per micro-batch (dataset items
+ collate, structure included) and, with a GPU, of the main process (pin, copy, expansion on the device).

The micro-batches are the trainer's own plan (``pack_batches`` over the task's item costs, seed 0, epoch 0) for
the given config overrides. CPU time is ``time.process_time`` of one process with one torch thread, as in a
DataLoader worker. ``--src`` runs the measurement once per source tree (``PYTHONPATH=SRC``) in fresh processes,
alternating ``--rounds`` times, so an A/B on a busy machine sees the same load:

    git archive 723d709 src | tar -x -C /tmp/base        # the tree to compare with
    PYTHONPATH=src python benchmarks/bench_batch_prep.py --data /work/main/.data/0ad256 --src /tmp/base/src src \\
        --max-tokens 3000000 --batches 4 --rounds 3 --out benchmarks/results/batch_prep_cpu.json

Without ``--src`` it measures the tree it runs from. Results: JSON (per source: median core-seconds per micro-batch
and per million band voxels, split into items / collate / main process, and the bytes of each micro-batch's tensors,
what the main process pins and copies) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d3s2.config import PACKAGED_CONFIGS as CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def batch_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors in a batch (dataclass fields, SparseTensor feats, coords and structure cache,
    tuples, lists, dicts): what ``pin_memory`` copies and the main process sends to the GPU."""
    import dataclasses

    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if hasattr(obj, "_cache") and hasattr(obj, "coords"):  # SparseTensor
        return sum(batch_bytes(v, seen) for v in (obj.feats, obj.coords, *obj._cache.values()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(batch_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, tuple | list):
        return sum(batch_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(batch_bytes(v, seen) for v in obj.values())
    return 0


def measure(args: argparse.Namespace) -> dict:
    """One source tree, in this process: core-seconds of each planned micro-batch (after a warm-up batch)."""
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    from d3s2.models.vae.task import SparseVAETask, SparseVAETaskConfig
    from d3s2.train.data import pack_batches
    from d3s2.train.task import item_costs

    cfg = SparseVAETaskConfig(data=args.data, resolutions=[args.resolution], model_config=args.model_config,
                              val_fraction=0.0, test_fraction=0.0)
    task = SparseVAETask(cfg)
    train, _ = task.build_datasets()
    lengths = train.token_counts
    names = train.parts[0].names
    if args.plan:  # the micro-batches the first run measured: a folder still being built keeps growing
        index = {n: i for i, n in enumerate(names)}
        batches = [[index[n] for n in b] for b in json.loads(Path(args.plan).read_text())]
    else:
        plan = pack_batches(item_costs(train, lengths), max_tokens=args.max_tokens,
                            groups=[args.resolution] * len(train), seed=0, epoch=0, step_size=2)
        batches = plan[:args.batches + 1]
    cuda = torch.cuda.is_available()
    rows = []
    for k, b in enumerate(batches):
        t0 = time.process_time()
        items = [train[i] for i in b]
        t1 = time.process_time()
        batch = task.collate(items)
        t2 = time.process_time()
        main = 0.0
        if cuda:  # what the trainer's main process does per micro-batch before the model runs
            t3 = time.process_time()
            on_device = batch.pin_memory().to("cuda", non_blocking=True)
            main = time.process_time() - t3
            torch.cuda.synchronize()  # outside the timing: a waiting sync spins a core
            del on_device
        if k == 0:
            continue  # warm-up: imports, allocator, page cache
        rows.append({"voxels": sum(lengths[i] for i in b), "items": len(b), "items_s": t1 - t0, "collate_s": t2 - t1,
                     "main_s": main, "bytes": batch_bytes(batch)})
    return {"rows": rows, "cuda": cuda, "plan": [[names[i] for i in b] for b in batches]}


def _summary(runs: list[dict]) -> dict:
    """Medians over rounds of the per-micro-batch sums, and the per-million-voxel cost."""
    voxels = sum(r["voxels"] for r in runs[0]["rows"])
    n = len(runs[0]["rows"])
    out = {"micro_batches": n, "voxels_per_micro_batch": voxels / n, "rounds": len(runs)}
    for key in ("items_s", "collate_s", "main_s", "bytes"):
        out[key] = statistics.median(sum(r[key] for r in run["rows"]) / n for run in runs)
    out["worker_s"] = out["items_s"] + out["collate_s"]
    out["worker_s_per_mvoxel"] = out["worker_s"] / (out["voxels_per_micro_batch"] / 1e6)
    out["host_s_per_mvoxel"] = (out["worker_s"] + out["main_s"]) / (out["voxels_per_micro_batch"] / 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a built data folder (d3s2 data build)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--model-config", default=str(CONFIGS / "demo/ss_vae.yaml"))
    p.add_argument("--max-tokens", type=int, default=3_000_000)
    p.add_argument("--batches", type=int, default=4, help="micro-batches measured (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--src", nargs="+", default=None, help="source trees to compare (default: this one)")
    p.add_argument("--out", default=None, help="JSON path (a .md summary is written beside it)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    sources = args.src or [str(ROOT / "src")]
    runs: dict[str, list[dict]] = {s: [] for s in sources}
    child = [a for a in sys.argv[1:] if a not in sources and a != "--src"]
    plan_file = Path(tempfile.mkdtemp()) / "plan.json"
    for r in range(args.rounds):
        for src in sources:  # interleaved: every round measures every tree under the same background load
            # The tree first (it shadows any other d3s2 on the path); the rest of the path keeps carried packages.
            path = os.pathsep.join(p for p in (str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")) if p)
            env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
            extra = ["--plan", str(plan_file)] if plan_file.exists() else []
            proc = subprocess.run([sys.executable, __file__, *child, "--child", *extra], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"measurement with {src} failed:\n{proc.stderr[-3000:]}")
            runs[src].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not plan_file.exists():
                plan_file.write_text(json.dumps(runs[src][-1]["plan"]))
            print(f"round {r} {src}: {_summary(runs[src][-1:])}", flush=True)
    result = {
        "data": args.data, "resolution": args.resolution, "max_tokens": args.max_tokens,
        "machine": f"{platform.node()} {os.cpu_count()} cores", "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "results": {src: _summary(r) for src, r in runs.items()},
        "micro_batches": runs[sources[0]][0]["plan"],  # item names; the first one is the warm-up
    }
    lines = ["| source | µ-batch voxels | items s | collate s | main s | worker core-s / M voxels | vs first | "
             "MB to pin |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    first = next(iter(result["results"].values()))
    for src, s in result["results"].items():
        lines.append(f"| {src} | {s['voxels_per_micro_batch']:,.0f} | {s['items_s']:.3f} | {s['collate_s']:.3f} | "
                     f"{s['main_s']:.3f} | {s['worker_s_per_mvoxel']:.3f} | "
                     f"{first['worker_s_per_mvoxel'] / s['worker_s_per_mvoxel']:.2f}x | {s['bytes'] / 1e6:.0f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((out, json.dumps(result, indent=2) + "\n"),
                           (out.with_suffix(".md"), "\n".join([f"`{result['command']}`", "", *lines]) + "\n")):
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                f.write(text)
            os.replace(f.name, path)


if __name__ == "__main__":
    main()
