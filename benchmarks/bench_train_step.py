"""Training throughput (tokens/s) of one process vs ``torchrun --nproc_per_node N``, with the same global batch.

Runs the real trainer through the CLI (``d3s2 train TASK --config CONFIG``) once per process count, skips
the warmup steps and reports global tokens/s, seconds per step and peak memory from ``train_log.jsonl``.
A token is what the task's dataset counts (active voxels for the VAE, latent tokens for the DiT).

    python benchmarks/bench_train_step.py --task toy --config configs/debug/tiny_toy.yaml --nproc 1 2
    python benchmarks/bench_train_step.py --task vae --config configs/demo/ss_vae_train.yaml --nproc 1 2 \\
        --steps 30 --warmup 10 --data.num_workers=4          # on nvidia-h200-x2

Extra ``--section.key=value`` arguments are passed to every run as config overrides.
``data.micro_batches_per_step`` must be divisible by every process count (the global batch stays the same).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(nproc: int, args: argparse.Namespace, overrides: list[str], out: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    # torchrun sets 1 thread per process when N > 1; do the same for N = 1 so the runs compare like for like.
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "d3s2.cli", "train", args.task, "--config", args.config, "--out", str(out),
           f"--train.max_steps={args.warmup + args.steps}", f"--train.log_every={args.log_every}",
           "--train.ckpt_every=0", "--train.val_every=0", "--train.progress=false", *overrides]
    print(f"[{nproc} process{'es' if nproc > 1 else ''}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"run with {nproc} processes failed (exit {proc.returncode})")
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train" and r["step"] > args.warmup]
    tokens = sum(r["tokens_per_step"] for r in rows)
    seconds = sum(r["step_time_s"] for r in rows)
    # Every row averages a window of log_every steps (equal windows: warmup and steps are multiples of it).
    result = {"nproc": nproc, "steps": len(rows) * args.log_every, "tokens_per_s": tokens / seconds,
              "step_time_s": seconds / len(rows),
              "tokens_per_step": tokens / len(rows), "final_loss": rows[-1]["loss"]}
    if "mem_peak_gib" in rows[-1]:
        result["mem_peak_gib"] = max(r["mem_peak_gib"] for r in rows)
    return result


def _environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                     else f"cpu ({os.cpu_count()} cores)")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="task name or family for `d3s2 train` (toy, vae, ...)")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps not measured (compilation, allocator warmup)")
    parser.add_argument("--log-every", type=int, default=5,
                        help="train.log_every of the runs (a log syncs the host: 1 would add a sync per step)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train_step_<task>.json)")
    args, overrides = parser.parse_known_args()
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    if args.log_every < 1 or args.steps % args.log_every or args.warmup % args.log_every:
        parser.error(f"--steps ({args.steps}) and --warmup ({args.warmup}) must be multiples of --log-every "
                     f"({args.log_every})")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for nproc in args.nproc:
            results.append(_run(nproc, args, overrides, Path(tmp) / f"p{nproc}"))
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base
    report = {"task": args.task, "config": args.config, "overrides": overrides, "warmup": args.warmup,
              "log_every": args.log_every, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              **_environment(), "results": results}
    print(f"\n{'procs':>5} {'tokens/s':>12} {'s/step':>9} {'tokens/step':>12} {'speedup':>8} {'peak GiB':>9}")
    for r in results:
        mem = f"{r['mem_peak_gib']:9.2f}" if "mem_peak_gib" in r else f"{'-':>9}"
        print(f"{r['nproc']:5d} {r['tokens_per_s']:12.0f} {r['step_time_s']:9.4f} {r['tokens_per_step']:12.0f} "
              f"{r['speedup']:8.2f} {mem}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_step_{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
