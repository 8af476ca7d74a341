"""Session 27: a rank stuck in an NCCL all-reduce after its peer died, under torchrun on two GPUs.

``tests/train/test_torchrun.py`` checks ``train.stop_grace_s`` on the CPU with gloo, where rank 1's sockets are held
open by a child so that rank 0 hangs as it would under NCCL. This runs the same worker (``stop_worker.py``, cases
``dies``: the death in step 4, and ``dies_in_validation``: in the first validation) with ``train.device: cuda``, so
DDP reduces over NCCL, and reports the time from rank 1's death to torchrun's end, rank 0's exit code and whether
the watchdog spoke; ``grace_s`` 1000 stands for the trainer before the watchdog (torchrun's SIGKILL, 30 s after its
SIGTERM, or NCCL's own error handling, whichever comes first).

Session 28 adds ``--cases checkpoint``: ``dies_in_checkpoint``, rank 1 dead at the barrier where it waits for rank
0's 2 s write of step 3's checkpoint; rank 0 then waits at that barrier (watched since session 28: "checkpoint
barrier"). The row says whether that checkpoint is complete.

    PYTHONPATH=src python3 scripts/gpu/stop27.py --out DIR [--cases step,validation,checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.train.conftest import TINY, _merge  # noqa: E402


def run(grace_s: float, case: str = "dies", die_at_step: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = {"max_steps": 100_000, "log_every": 2, "stop_grace_s": grace_s, "device": "cuda"}
        if case == "dies_in_validation":
            train["val_every"] = 2
        if case == "dies_in_checkpoint":
            train["ckpt_every"] = 3
        data = _merge(TINY, {"train": train})
        (tmp / "cfg.json").write_text(json.dumps(data))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", STOP_CASE=case, STOP_DIR=str(tmp), DIE_AT_STEP=str(die_at_step))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests/train/stop_worker.py"), "train", "toy", "--config", str(tmp / "cfg.json"),
               "--out", str(tmp / "run")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        ended = time.time()
        died = float((tmp / "died").read_text())
        err = proc.stderr
        spoke = any(f"received, and no {unit} ended in the" in err
                    for unit in ("step", "validation batch", "checkpoint barrier"))
        complete = None
        if case == "dies_in_checkpoint":
            from d3s2.train.checkpoint import CheckpointDir
            ckpt = tmp / "run" / "checkpoints" / "step_00000003.pt"
            complete = ckpt.is_file() and CheckpointDir.load(ckpt)["step"] == 3
        return {"case": case, "grace_s": grace_s, "seconds_from_death_to_end": round(ended - died, 2),
                "torchrun_rc": proc.returncode,
                "rank0_exitcode": re.findall(r"rank\s*:\s*0.*?exitcode\s*:\s*(-?\d+)", err, re.S)[:1]
                or re.findall(r"exitcode\s*:\s*(-?\d+)", err),
                "watchdog_spoke": spoke, "nccl_backend": "nccl" in err.lower(),
                "checkpoints": (tmp / "run" / "checkpoints").exists(), "checkpoint_complete": complete,
                "stderr_tail": err[-2500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default="step,validation", help="of step, validation, checkpoint")
    args = ap.parse_args()
    plan = {"step": [("dies", g) for g in (1.0, 10.0, 1000.0)],
            "validation": [("dies_in_validation", g) for g in (1.0, 1000.0)],
            "checkpoint": [("dies_in_checkpoint", g) for g in (1.0, 10.0, 1000.0)]}
    rows = [run(g, case) for name in args.cases.split(",") for case, g in plan[name]]
    for r in rows:
        print({k: v for k, v in r.items() if k != "stderr_tail"})
    print(rows[-1]["stderr_tail"][-1500:])
    if args.out:
        name = "stop27.json" if args.cases == "step,validation" else f"stop_{args.cases.replace(',', '_')}.json"
        Path(args.out, name).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
