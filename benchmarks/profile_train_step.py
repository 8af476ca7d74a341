"""Where a training step's time goes: data wait vs compute per step, per micro-batch size, and a profiler table.

Builds the real :class:`d3s2.train.trainer.Trainer` from a run config (same overrides as ``d3s2 train``), runs
``--warmup`` steps, then times ``--steps`` steps one by one (synchronised): seconds waiting for the DataLoader,
seconds in forward/backward/optimizer/EMA, and the micro-batches' token counts. Then records ``--profile-steps``
steps with ``torch.profiler`` and writes the top operators by self CPU and self device time.

    python benchmarks/profile_train_step.py --config configs/demo/ss_vae_train.yaml --task.args.data=DIR \\
        --out-dir $OUT
    python benchmarks/profile_train_step.py --config configs/debug/tiny_toy.yaml --steps 3 --profile-steps 1
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
    if torch.isfinite(grad_norm):
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    if trainer.ema is not None:
        trainer.ema.update(trainer.module)
    _sync(device)
    t3 = time.perf_counter()
    trainer.step += 1
    return {"data_s": t1 - t0, "fwd_bwd_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "tokens": float(tokens), "micro_batches": float(len(micro))}


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
    overrides += ["--train.progress=false", "--train.ckpt_every=0", "--train.val_every=0"]
    cfg = load_train_config(args.config, overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="profile_train_"))
    trainer = Trainer(cfg, run_dir, command=["profile_train_step.py", *sys.argv[1:]])
    device = trainer.info.device
    data = trainer._steps()
    try:
        for _ in range(args.warmup):
            _one_step(trainer, data)
        rows = [_one_step(trainer, data) for _ in range(args.steps)]
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
    result = {"config": args.config, "overrides": overrides, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "median": summary, "steps": rows}
    text = [f"# profile_train_step: {args.config} on {result['device']}", "",
            "median s per step: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()), "",
            "| step | data s | fwd+bwd s | update s | tokens |", "|---:|---:|---:|---:|---:|"]
    text += [f"| {i} | {r['data_s']:.4f} | {r['fwd_bwd_s']:.4f} | {r['update_s']:.4f} | {int(r['tokens'])} |"
             for i, r in enumerate(rows)]
    for name, table in tables.items():
        text += ["", f"## top operators by {name} time ({args.profile_steps} steps)", "", "```", table, "```"]
    report = "\n".join(text)
    print(report)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_train_step.json").write_text(json.dumps(result, indent=1))
        (out / "profile_train_step.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
