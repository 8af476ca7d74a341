"""Where a training step's time goes: data wait vs compute per step, per micro-batch size, and a profiler table.

Builds the real :class:`d3s2.train.trainer.Trainer` from a run config (same overrides as ``d3s2 train``), runs
``--warmup`` steps, then times ``--steps`` steps one by one (synchronised): seconds waiting for the DataLoader,
seconds in forward/backward/optimizer/EMA, and the micro-batches' token counts. Then records ``--profile-steps``
steps with ``torch.profiler`` and writes the top operators by self CPU and self device time.

    python benchmarks/profile_train_step.py --config configs/demo/ss_vae_train.yaml --task.args.data=DIR \\
        --out-dir $OUT
    python benchmarks/profile_train_step.py --config configs/debug/tiny_toy.yaml --steps 3 --profile-steps 1
    torchrun --nproc_per_node 2 benchmarks/profile_train_step.py --config ... --out-dir $OUT   # one report per rank
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from d3s2.config import Override
from d3s2.train.trainer import Trainer, load_train_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_step(trainer: Trainer, data) -> dict[str, float]:
    device = trainer.info.device
    t0 = time.perf_counter()
    epoch, s, micro, tokens = next(data)
    t1 = time.perf_counter()
    _, grad_norm = trainer._train_step(micro)
    _sync(device)
    t2 = time.perf_counter()
    trainer._optimizer_step(grad_norm)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update(trainer.module)
    _sync(device)
    t3 = time.perf_counter()
    trainer.step += 1
    # Decoded voxels (the SS-VAE's target rows): with tokens they explain a VAE step's time (see _fit_costs).
    decoded = sum(getattr(getattr(b, "target", None), "num_voxels", 0) for b in micro)
    return {"data_s": t1 - t0, "fwd_bwd_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "tokens": float(tokens), "micro_batches": float(len(micro)), "decoded": float(decoded)}


def _fit_costs(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """Least squares ``fwd_bwd_s ≈ a + b·tokens + c·decoded`` over the timed steps (this rank's micro-batches;
    single process: all of them); ``decode_cost = c / b`` is the value for ``task.args.decode_cost``."""
    import numpy as np

    if len(rows) < 4 or not any(r["decoded"] for r in rows):
        return None
    a = np.array([[1.0, r["tokens"], r["decoded"]] for r in rows])
    y = np.array([r["fwd_bwd_s"] for r in rows])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    pred = a @ coef
    r2 = 1 - float(((y - pred) ** 2).sum()) / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    return {"intercept_s": float(coef[0]), "s_per_token": float(coef[1]), "s_per_decoded": float(coef[2]),
            "decode_cost": float(coef[2] / coef[1]) if coef[1] > 0 else float("nan"), "r2": r2}


def _sync_report(trainer: Trainer, data) -> list[tuple[str, int]]:
    """Run one step under ``torch.cuda.set_sync_debug_mode("warn")``: (source line, host syncs) most first."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _one_step(trainer, data)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return where.most_common()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="where profile_train_step.{json,md} go (default: print only)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        ap.error(f"unexpected arguments {bad}: overrides look like --section.key=value")
    own = [Override(key, value, f"profile_train_step.py's own {key}={value}")
           for key, value in (("train.progress", "false"), ("train.ckpt_every", "0"), ("train.val_every", "0"))]
    cfg = load_train_config(args.config, [*overrides, *own])
    run_dir = Path(tempfile.mkdtemp(prefix="profile_train_"))
    trainer = Trainer(cfg, run_dir, command=["profile_train_step.py", *sys.argv[1:]])
    device = trainer.info.device
    data = trainer._steps()
    try:
        for _ in range(args.warmup):
            _one_step(trainer, data)
        rows = [_one_step(trainer, data) for _ in range(args.steps)]
        syncs = _sync_report(trainer, data) if device.type == "cuda" else []
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                _one_step(trainer, data)
    finally:
        data.close()
        trainer.close()
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {"self CPU": averages.table(sort_by="self_cpu_time_total", row_limit=30),
              "self device": averages.table(sort_by=device_key, row_limit=30)}
    summary = {k: statistics.median(r[k] for r in rows) for k in ("data_s", "fwd_bwd_s", "update_s", "step_s")}
    fit = _fit_costs(rows)
    result = {"config": args.config, "overrides": [*overrides, *(f"--{o.key}={o.value}" for o in own)],
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "median": summary, "cost_fit": fit,
              "host_syncs_per_step": sum(n for _, n in syncs), "host_sync_sources": syncs, "steps": rows}
    text = [f"# profile_train_step: {args.config} on {result['device']}", "",
            "median s per step: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()), ""]
    if fit is not None:
        text += ["fwd+bwd s ≈ {intercept_s:.4f} + {s_per_token:.3e}·tokens + {s_per_decoded:.3e}·decoded "
                 "(R² {r2:.2f}): decode_cost ≈ {decode_cost:.2f}".format(**fit), ""]
    if device.type == "cuda":
        text += [f"host syncs in one step (set_sync_debug_mode): {result['host_syncs_per_step']}", ""]
        text += [f"- {n} × {where}" for where, n in syncs[:20]] + [""]
    text += ["| step | data s | fwd+bwd s | update s | tokens | decoded |", "|---:|---:|---:|---:|---:|---:|"]
    text += [f"| {i} | {r['data_s']:.4f} | {r['fwd_bwd_s']:.4f} | {r['update_s']:.4f} | {int(r['tokens'])} | "
             f"{int(r['decoded'])} |" for i, r in enumerate(rows)]
    for name, table in tables.items():
        text += ["", f"## top operators by {name} time ({args.profile_steps} steps)", "", "```", table, "```"]
    report = "\n".join(text)
    print(report)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"profile_train_step_rank{trainer.info.rank}" if trainer.info.distributed else "profile_train_step"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
