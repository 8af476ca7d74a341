"""Every training task trained twice and once resumed with ``train.deterministic=true`` on one device, or on
``--nproc N`` devices under torchrun (DDP: NCCL on CUDA, gloo on the CPU), compared.

Driven by ``scripts/gpu/det_tasks.sh`` (one phase per process, so the two runs compared come from two processes)::

    python3 scripts/gpu/det_tasks.py data ROOT      # tests/assets/0ad_tiny.npz at 32³ with 2 renders, a random tiny
                                                    # SS-VAE and its latents (tests/models/dit/_data.py)
    python3 scripts/gpu/det_tasks.py train ROOT a   # each task once: ROOT/runs/<task>/a, checkpoints every STEPS/2
    python3 scripts/gpu/det_tasks.py train ROOT b   # each again (ROOT/runs/<task>/b), then resumed from a's mid-run
                                                    # checkpoint (ROOT/runs/<task>/resumed)
    python3 scripts/gpu/det_tasks.py compare ROOT   # PASS / FAIL per task, with the compared losses

With ``--nproc N`` (train and compare; e.g. 2 on nvidia-h200-x2) a train phase starts itself again under
``torchrun --standalone --nproc_per_node N`` (in place of this process, so a time limit's SIGTERM reaches torchrun,
which stops its ranks). Every task then trains with N times its config's micro-batches per step, each of at most
4/N items (the tiny sets have 4: each rank gets micro-batches of its own; N <= 4), and compare also checks that the
checkpoints were written by N processes and compares each rank's RNG states and log window: the resumed run must
restore every rank's data position and RNG streams. A smoke run on the CPU (gloo; 36 s on 2 shared cores)::

    DEVICE=cpu NPROC=2 bash scripts/gpu/det_tasks.sh

Environment: ``DEVICE`` (``cuda``, or ``cpu`` to try the script without a GPU), ``PARALLEL`` (``ddp`` or ``fsdp``:
``train.parallel`` under torchrun; FSDP shards each model whole), ``STEPS`` (6, even), ``TASKS``
(some of ``toy dense_vae dit_dense vae dit_sparse``, run in that order; default all; dit_dense needs dense_vae's
run a). Each run is ``d3s2 train`` (in-process ``d3s2.cli.main``) from the task's tiny debug config, with 2
DataLoader workers (per rank), every step logged, no validation. A failed run (e.g. an op without a deterministic
CUDA kernel raising) is recorded in ``ROOT/runs/<task>/<run>.error`` (``<run>.rank<r>.error`` under torchrun) and
reported by ``compare``. Under torchrun the ranks meet after each run (``<run>.rank<r>.done`` files): a rank whose run
failed alone can leave the others waiting in a collective of that run that nothing ends (NCCL does not notice a
peer that left it), so a rank that waits ``PEER_WAIT_S`` (60) seconds for the others exits with status 1, and
torchrun stops the rest (after its 30 s shutdown timeout at most): the phase ends then, not at the caller's time
limit, and the tasks left are reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("DEVICE", "cuda")
STEPS = int(os.environ.get("STEPS", "6"))
PARALLEL = os.environ.get("PARALLEL", "ddp")
# dense_vae before dit_dense: its run "a" export is the frozen encoder of every dit_dense run.
ALL_TASKS = ["toy", "dense_vae", "dit_dense", "vae", "dit_sparse"]
REQUESTED = os.environ.get("TASKS", " ".join(ALL_TASKS)).split()
TASKS = [task for task in ALL_TASKS if task in REQUESTED]
RANK = int(os.environ.get("RANK", "0"))  # set by torchrun
TINY_ITEMS = 4  # shapes in tests/assets/0ad_tiny.npz: the training items of every task but toy
TIMINGS = ("tokens_per_s", "step_time_s", "mem_peak_gib")  # not the same twice by nature
# The ranks of a healthy run finish it within seconds of each other (rank 0 exports last).
PEER_WAIT_S = float(os.environ.get("PEER_WAIT_S", "60"))


def _configs() -> Path:
    from d3s2.config import PACKAGED_CONFIGS

    return PACKAGED_CONFIGS / "debug"


def make_data(root: Path) -> None:
    sys.path.insert(0, str(REPO))  # the tests' tiny encoded fixture
    from tests.models.dit._data import build_encoded

    data, vae, latents = build_encoded(root)
    print(f"data {data}, random SS-VAE {vae}, latents {latents}")


def train_args(task: str, root: Path, nproc: int) -> list[str]:
    """``d3s2 train`` arguments of ``task`` (without ``--out``) for ``nproc`` processes."""
    from d3s2.config import load_yaml

    cfg = _configs()
    data, latents = root / "data", root / "latents"
    if task == "toy":
        config, extra = cfg / "tiny_toy.yaml", []
    else:
        model = {"vae": "tiny_vae", "dense_vae": "tiny_dense_vae", "dit_dense": "tiny_dit_dense",
                 "dit_sparse": "tiny_dit_sparse"}[task]
        paths = {"vae": {"data": data}, "dense_vae": {"latents": latents},
                 "dit_dense": {"latents": latents, "data": data,
                               "dense_vae": root / "runs" / "dense_vae" / "a" / "export"},
                 "dit_sparse": {"latents": latents, "data": data}}[task]
        config = cfg / f"tiny_{task}_train.yaml"
        extra = [f"--task.args.model_config={cfg / f'{model}.yaml'}",
                 *(f"--task.args.{key}={value}" for key, value in paths.items())]
    if nproc > 1:
        # The tiny sets pack into one or two micro-batches per epoch at the configs' sizes, too few for N ranks.
        micro_batches = (load_yaml(config).get("data") or {}).get("micro_batches_per_step", 1)
        extra += [f"--data.micro_batches_per_step={micro_batches * nproc}",
                  f"--data.max_batch_size={max(TINY_ITEMS // nproc, 1)}", f"--train.parallel={PARALLEL}"]
    return ["train", task, "--config", str(config), *extra, f"--train.max_steps={STEPS}",
            f"--train.ckpt_every={STEPS // 2}", "--train.keep_last=3", "--train.log_every=1", "--train.val_every=0",
            "--train.progress=false", "--train.deterministic=true", f"--train.device={DEVICE}",
            "--data.num_workers=2"]


def _train(args: list[str], run: Path, nproc: int) -> None:
    from d3s2.cli import main

    error = run.with_suffix(f".rank{RANK}.error" if nproc > 1 else ".error")
    error.unlink(missing_ok=True)
    try:
        rc = main([*args, "--out", str(run)])
    except Exception:  # an op without a deterministic kernel raises here: keep it for the report, go on
        rc = None
        error.write_text(traceback.format_exc())
    else:
        if rc != 0:
            error.write_text(f"d3s2 train exited with {rc} (its log above)\n")
    rank = f" (rank {RANK})" if nproc > 1 else ""
    print(f"{run}{rank}: {'ok' if not error.exists() else 'FAILED, see ' + str(error)}", flush=True)
    if rc is not None and rc > 128:  # stopped by a signal (the caller's time limit): leave the other runs
        raise SystemExit(rc)
    if nproc > 1:
        _meet_the_other_ranks(run, nproc)


def _done(run: Path, rank: int) -> Path:
    return run.with_suffix(f".rank{rank}.done")


def _meet_the_other_ranks(run: Path, nproc: int) -> None:
    """Mark ``run`` finished by this rank and wait until every rank has; exit with status 1 (torchrun then stops
    the others) when one has not after ``PEER_WAIT_S`` seconds: it waits in a collective of a run that failed
    here. The marks name torchrun's launch, so those of an earlier phase run in the same ROOT do not count."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID", "")
    _done(run, RANK).write_text(launch)
    deadline = time.monotonic() + PEER_WAIT_S
    while missing := [r for r in range(nproc) if not _done(run, r).is_file() or _done(run, r).read_text() != launch]:
        if time.monotonic() > deadline:
            print(f"{run} (rank {RANK}): rank(s) {', '.join(map(str, missing))} did not finish this run within "
                  f"{PEER_WAIT_S:g} s (waiting in a collective of a run that failed here?): stopping this phase; "
                  "torchrun stops the other ranks", flush=True)
            raise SystemExit(1)
        time.sleep(0.2)


def train(root: Path, phase: str, nproc: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc > 1 and world == 1:
        # torchrun in place of this process: a time limit's SIGTERM reaches it, and it stops the ranks.
        # Without --nproc, which torchrun's own parser would take for its --nproc-per-node: each rank reads WORLD_SIZE.
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={nproc}", __file__, "train", str(root), phase])
    if world != nproc:
        raise SystemExit(f"--nproc {nproc}, but this process is one of {world} (WORLD_SIZE)")
    for task in TASKS:
        runs = root / "runs" / task
        runs.mkdir(parents=True, exist_ok=True)
        args = train_args(task, root, nproc)
        _train(args, runs / phase, nproc)
        if phase == "b":
            ckpt = runs / "a" / "checkpoints" / f"step_{STEPS // 2:08d}.pt"
            _train([*args, "--resume", str(ckpt)], runs / "resumed", nproc)


def _rows(run: Path) -> dict[int, dict]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS}
            for r in map(json.loads, lines) if r["split"] == "train"}


def _differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoint entries differ (tensors bit for bit), with the largest difference of each tensor."""
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path} {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"]
        if torch.equal(a, b):
            return []
        gap = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("nan")
        return [f"{path} (max |diff| {gap:.3g})"]
    if isinstance(a, np.ndarray):
        return [] if np.array_equal(a, b) else [path]
    if isinstance(a, dict):
        return [d for k in a for d in _differences(a[k], b.get(k), f"{path}.{k}".lstrip("."))]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{path} length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path} {a!r} vs {b!r}"]


def _state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / f"step_{STEPS:08d}.pt", map_location="cpu", weights_only=False)
    state = {k: ckpt[k] for k in ("model", "ema", "optimizer", "scheduler", "data", "rng", "world_size")}
    # Each rank's open log window and skipped-step counts, without the window's elapsed seconds (a timing).
    state["log"] = [{k: v for k, v in rank.items() if k != "seconds"} for rank in ckpt["log"]]
    return state


def _row_diff(row: dict, other: dict | None) -> str:
    """``key a vs b`` for each logged value that differs between two rows of one step."""
    if other is None:
        return "not logged"
    return ", ".join(f"{k} {row.get(k)!r} vs {other.get(k)!r}" for k in sorted(row.keys() | other.keys())
                     if row.get(k) != other.get(k))


def _losses(rows: dict[int, dict], steps) -> str:
    return " ".join(f"{rows[s]['loss']!r}" if s in rows else "-" for s in steps)


def _run_failures(runs: Path) -> list[str]:
    """Each run of a task that failed or left no log, with the last line of its error."""
    out = []
    for name in ("a", "b", "resumed"):
        errors = sorted(runs.glob(f"{name}.error")) + sorted(runs.glob(f"{name}.rank*.error"))
        if errors:
            out += [f"run {name} ({e.stem.partition('.')[2] or 'its process'}): "
                    f"{e.read_text().strip().splitlines()[-1]}" for e in errors]
        elif not (runs / name / "train_log.jsonl").exists():
            out.append(f"run {name}: no train_log.jsonl (not run: out of time, or its phase stopped after a rank "
                       "failed alone)")
    return out


def compare(root: Path, nproc: int) -> int:
    failed = 0
    half, steps = STEPS // 2, range(1, STEPS + 1)
    for task in TASKS:
        runs = root / "runs" / task
        problems = _run_failures(runs)
        if problems:
            failed += 1
            print(f"FAIL {task}: " + "; ".join(problems))
            continue
        a, b, resumed = (_rows(runs / name) for name in ("a", "b", "resumed"))
        if sorted(a) != list(steps):
            problems.append(f"run a logged steps {sorted(a)}")
        problems += [f"b differs at step {s}: {_row_diff(a[s], b.get(s))}" for s in a if b.get(s) != a[s]][:2]
        problems += [f"resumed differs at step {s}: {_row_diff(a[s], resumed.get(s))}"
                     for s in a if s > half and resumed.get(s) != a[s]][:2]
        state_a = _state(runs / "a")
        if state_a["world_size"] != nproc:
            problems.append(f"run a's checkpoint was written by {state_a['world_size']} processes, expected {nproc}")
        for name in ("b", "resumed"):
            diffs = _differences(state_a, _state(runs / name))
            if diffs:
                problems.append(f"{name}'s step-{STEPS} checkpoint differs in {len(diffs)} entries: "
                                + ", ".join(diffs[:4]))
        print(f"{'FAIL' if problems else 'PASS'} {task}: loss a {_losses(a, steps)} | b {_losses(b, steps)} | "
              f"resumed at {half} {_losses(resumed, range(half + 1, STEPS + 1))}")
        for problem in problems:
            print(f"    {problem}")
        if not problems:
            rng = "RNG states (CUDA's too)" if DEVICE.startswith("cuda") else "RNG states"
            ranks = f" of each of the {nproc} ranks" if nproc > 1 else ""
            print(f"    logged rows identical (loss terms, grad_norm, lr, epoch); step-{STEPS} weights, EMA, AdamW "
                  f"state, scheduler, data position, {rng} and log window{ranks} identical")
        failed += bool(problems)
    where = f"{nproc} processes on {DEVICE} (torchrun, {PARALLEL})" if nproc > 1 else DEVICE
    print(f"{len(TASKS) - failed}/{len(TASKS)} tasks deterministic and resume-exact on {where}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["data", "train", "compare"])
    parser.add_argument("root", type=Path, help="holds the data (data) and the runs (train, compare)")
    parser.add_argument("phase", nargs="?", choices=["a", "b"], help="train only: the first runs, or the second "
                        "runs and the resumed ones")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes per run (train, compare; default 1, or WORLD_SIZE under torchrun)")
    args = parser.parse_args(argv)
    if (args.command == "train") != (args.phase is not None):
        parser.error("a phase (a or b) goes with train, and only with train")
    nproc = args.nproc if args.nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        parser.error(f"--nproc must be >= 1, got {nproc}")
    if PARALLEL not in ("ddp", "fsdp"):
        raise SystemExit(f"PARALLEL: expected ddp or fsdp, got {PARALLEL!r}")
    if STEPS < 2 or STEPS % 2:
        raise SystemExit(f"STEPS must be even and >= 2, got {STEPS}")
    unknown = sorted(set(REQUESTED) - set(ALL_TASKS))
    if unknown:
        raise SystemExit(f"TASKS: unknown {unknown}; expected some of {' '.join(ALL_TASKS)}")
    if args.command == "data":
        make_data(args.root)
    elif args.command == "train":
        train(args.root, args.phase, nproc)
    else:
        return compare(args.root, nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
