"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch, and with
``train.deterministic`` three train bit-identically twice and after a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import d3s2
from d3s2.train.checkpoint import CheckpointDir
from d3s2.train.trainer import Trainer

from ._runs import assert_same_state, train_rows
from .conftest import TINY, _merge


def _rows(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _torchrun(worker: str, *args: str, nproc: int = 2, timeout: float = 300) -> str:
    """Run ``worker`` (a script beside this file) with ``args`` in ``nproc`` processes under torchrun; returns its
    stdout."""
    src = str(Path(d3s2.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).with_name(worker)), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (each in a session of its own, out of reach of killpg)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{worker} {' '.join(args)} hung for {timeout} s: {out[-3000:]}{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def test_two_processes_match_one(tmp_path, tiny_cfg):
    data = _merge(TINY, {"train": {"max_steps": 3, "val_every": 3}, "data": {"micro_batches_per_step": 2}})
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    _torchrun("ddp_worker.py", str(tmp_path / "cfg.json"), str(tmp_path))

    single = Trainer(tiny_cfg(train={"max_steps": 3, "val_every": 3}, data={"micro_batches_per_step": 2}),
                     tmp_path / "one")
    single.run()
    ref = dict(single.module.named_parameters())

    r0, r1 = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "ddp_rank1.pt")
    for name, p in r0["local"].items():
        assert torch.equal(p, r1["local"][name]), f"DDP ranks differ in {name}"
        torch.testing.assert_close(p, ref[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    fsdp = torch.load(tmp_path / "fsdp_rank0.pt")["full"]
    assert set(fsdp) == set(ref)
    for name, p in fsdp.items():
        torch.testing.assert_close(p, ref[name].detach(), rtol=1e-5, atol=1e-6, msg=f"FSDP {name}")
    ref_val = _rows(tmp_path / "one", "val")
    for mode in ("ddp", "fsdp"):
        torch.testing.assert_close([r["loss"] for r in _rows(tmp_path / mode, "train")],
                                   [r["loss"] for r in _rows(tmp_path / "one", "train")], rtol=1e-5, atol=1e-6)
        val = _rows(tmp_path / mode, "val")  # both ranks validated their share, averaged
        assert len(val) == 1 and val[0]["mse"] == pytest.approx(ref_val[0]["mse"], rel=1e-4)
        assert (tmp_path / mode / "checkpoints" / "step_00000003.pt").is_file()
        assert (tmp_path / mode / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


def _draws(run_dir: Path, kind: str, rank: int) -> list[dict]:
    return json.loads((run_dir / f"draws_{kind}_rank{rank}.json").read_text())


@pytest.mark.slow
def test_three_processes_train_deterministically_and_resume_exactly(tmp_path):
    # 2 steps per epoch, 2 micro-batches per rank per step (accumulated), a DataLoader worker per rank, a loss that
    # draws from torch's, numpy's and python's RNGs: the step-3 checkpoint is inside an epoch and a log window.
    # Three ranks, since a sum of two ranks' gradients is the same in either order and of three it is not: DDP
    # re-buckets after a process's first step, and a resumed run's first step must still reduce as the full run's.
    ranks = range(3)
    data = _merge(TINY, {"task": {"name": "noisy_toy", "args": {"num_train": 27}},
                         "train": {"max_steps": 6, "ckpt_every": 3, "log_every": 2, "keep_last": 3,
                                   "deterministic": True},
                         "data": {"micro_batches_per_step": 2 * len(ranks), "num_workers": 1}})
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    modes = ("ddp", "fsdp")

    def runs(*names: str) -> None:
        _torchrun("ddp_resume_worker.py", str(tmp_path / "cfg.json"), str(tmp_path),
                  *(f"{mode}/{name}" for mode in modes for name in names), nproc=len(ranks))
    runs("a")
    runs("b", "killed:stop=5")  # dies after step 5; step 3 is its last checkpoint
    runs("killed:resume")  # new processes: every RNG stream and DataLoader worker starts anew

    for mode in modes:
        a, b, killed = tmp_path / mode / "a", tmp_path / mode / "b", tmp_path / mode / "killed"
        ckpt = CheckpointDir.load(killed / "checkpoints" / "step_00000003.pt")
        assert ckpt["world_size"] == len(ranks) and ckpt["data"] == {"epoch": 1, "step_in_epoch": 1}
        assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank has its own streams
        for rank in ranks:
            full = _draws(a, "first", rank)
            assert len(full) == 6 * 2 and _draws(b, "first", rank) == full, f"{mode} rank {rank}"
            assert _draws(killed, "first", rank) == full[: 5 * 2], f"{mode} rank {rank}"
            # Steps 4 to 6 again: this rank's micro-batches and noise continue where its step 3 left them.
            assert _draws(killed, "resumed", rank) == full[3 * 2:], f"{mode} rank {rank}"
        assert _draws(a, "first", 0) != _draws(a, "first", 1)  # the ranks trained on different data and noise

        want = train_rows(a)
        assert sorted(want) == [2, 4, 6] and want[6]["epoch"] == 2, json.dumps(want)
        assert train_rows(b) == want, mode
        assert train_rows(killed) == want, mode  # row 4 sums step 3 (before the kill) and step 4 (resumed)
        for other in (b, killed):
            for step in (3, 6):
                assert_same_state(*(run / "checkpoints" / f"step_{step:08d}.pt" for run in (a, other)))

    # DDP's rank-order reduce is a mean over ranks: it trains as FSDP, whose gradient reduce-scatter it leaves alone.
    assert _draws(tmp_path / "ddp" / "a", "first", 2) == _draws(tmp_path / "fsdp" / "a", "first", 2)
    ddp, fsdp = (CheckpointDir.load(tmp_path / mode / "a" / "checkpoints" / "step_00000006.pt") for mode in modes)
    for key, weight in ddp["model"].items():
        torch.testing.assert_close(weight, fsdp["model"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_process_joins_the_process_group_again_after_leaving_it():
    # As a process that trains one run after another does: each Trainer joins the group, close() leaves it.
    out = _torchrun("rejoin_worker.py", "20", timeout=60)
    assert sorted(out.splitlines()) == [f"rank {r}: joined and left 20 times" for r in (0, 1)]


def test_det_tasks_stops_a_phase_in_which_one_rank_failed_alone(tmp_path):
    # scripts/gpu/det_tasks.py: rank 1's run fails while rank 0 waits in a collective of it that nothing ends.
    # Rank 1 waits PEER_WAIT_S for rank 0 to finish the run, then exits 1, and torchrun stops rank 0: the phase
    # ends in seconds, not at the caller's time limit (nor at the collective's 30-minute timeout).
    src = str(Path(d3s2.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]), DEVICE="cpu",
               TASKS="toy", STEPS="2", PEER_WAIT_S="2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("det_tasks_worker.py")), "train", str(tmp_path), "b"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the phase did not stop: {out[-3000:]}{err[-3000:]}")
    runs = tmp_path / "runs" / "toy"
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "b (rank 1): rank(s) 0 did not finish this run within 2 s" in out
    assert (runs / "b.rank1.error").is_file() and "d3s2 train: error: injected failure of rank 1 alone" in err
    assert not list(runs.glob("resumed*"))  # rank 1 did not go on to the phase's next run


def _start_stop_case(tmp_path: Path, case: str, grace_s: float, *, val_every: int = 0, ckpt_every: int = 0,
                     config: dict | None = None, **env_extra: str) -> subprocess.Popen:
    """``stop_worker.py`` (STOP_CASE ``case``) training the toy task without end under torchrun, 2 processes
    (``config`` merged into the tiny config last: it may set an end)."""
    train = {"max_steps": 100_000, "log_every": 2, "val_every": val_every, "ckpt_every": ckpt_every,
             "stop_grace_s": grace_s}
    data = _merge(_merge(TINY, {"train": train}), config or {})
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    src = str(Path(d3s2.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]), STOP_CASE=case,
               STOP_DIR=str(tmp_path), **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("stop_worker.py")), "train", "toy", "--config", str(tmp_path / "cfg.json"),
           "--out", str(tmp_path / "run")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ended(proc: subprocess.Popen, timeout: float) -> str:
    """The stderr of ``proc`` once it has ended (failing after ``timeout`` seconds)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.terminate()
        pytest.fail(f"torchrun did not end in {timeout} s: {proc.communicate(timeout=60)[1][-3000:]}")


def _ended_by_the_watchdog(tmp_path: Path, proc: subprocess.Popen, unit: str) -> None:
    """Check that torchrun ended within 15 s of rank 1's death (the grace is 1 s; torchrun's SIGKILL
    comes after 30), rank 0 exited 143 with the watchdog's line naming ``unit``, and no temporary file is left."""
    err = _ended(proc, timeout=120)
    took = time.time() - float((tmp_path / "died").read_text())
    assert took < 15, f"{took:.1f} s from the death to the end:\n{err[-3000:]}"
    assert f"SIGTERM received, and no {unit} ended in the 1.0 s since" in err, err[-3000:]
    assert "exitcode  : 143" in err, err[-3000:]
    assert not list(tmp_path.joinpath("run").rglob("*.tmp"))


def test_a_rank_stuck_in_a_collective_whose_peer_died_exits_after_the_grace_period(tmp_path):
    # Rank 1 dies in step 4; torchrun sends SIGTERM to rank 0, which waits in step 4's all-reduce and never gets back
    # to Python. Its watchdog ends it train.stop_grace_s (1 s) later, not torchrun's SIGKILL 30 s later.
    _ended_by_the_watchdog(tmp_path, _start_stop_case(tmp_path, "dies", 1.0, DIE_AT_STEP="4"), "step")
    assert not (tmp_path / "run" / "checkpoints").exists()  # no checkpoint of a stuck state, not even a temporary


def test_a_rank_stuck_in_validation_whose_peer_died_exits_after_the_grace_period(tmp_path):
    # Rank 1 dies in the validation after step 2; rank 0 validates its share and waits in the all-reduce of the
    # validation metrics, where torchrun's SIGTERM finds it. Its watchdog ends it train.stop_grace_s (1 s) after the
    # signal, not torchrun's SIGKILL 30 s later; it exited in the all-reduce, not in the middle of a write.
    _ended_by_the_watchdog(tmp_path, _start_stop_case(tmp_path, "dies_in_validation", 1.0, val_every=2),
                           "validation batch")


def test_a_checkpoint_writer_whose_peer_died_exits_after_the_grace_period(tmp_path):
    # Rank 1 dies at the barrier where it waits for rank 0's write of step 3's checkpoint; torchrun's SIGTERM comes
    # while rank 0 writes. The write ends (unwatched: an exit would leave a temporary), then rank 0 waits at that
    # barrier for the dead rank: its watchdog ends it train.stop_grace_s (1 s) later, not torchrun's SIGKILL.
    _ended_by_the_watchdog(tmp_path, _start_stop_case(tmp_path, "dies_in_checkpoint", 1.0, ckpt_every=3),
                           "checkpoint barrier")
    checkpoints = CheckpointDir(tmp_path / "run" / "checkpoints")
    assert checkpoints.latest().name == "step_00000003.pt" and CheckpointDir.load(checkpoints.latest())["step"] == 3


def test_an_fsdp_export_whose_peer_died_exits_after_the_grace_period(tmp_path):
    # Under FSDP the final export gathers the weights on every rank; rank 1 dies as it begins, after the last
    # checkpoint. Rank 0 waits in the all-gathers, where torchrun's SIGTERM finds it: its watchdog ends it
    # train.stop_grace_s (1 s) later, not torchrun's SIGKILL 30 s later, and the last checkpoint stays whole.
    proc = _start_stop_case(tmp_path, "dies_in_export", 1.0, config={"train": {
        "max_steps": 3, "parallel": "fsdp", "fsdp_units": ["encoder", "decoder"]}})
    _ended_by_the_watchdog(tmp_path, proc, "checkpoint gather")
    assert CheckpointDir.load(CheckpointDir(tmp_path / "run" / "checkpoints").latest())["step"] == 3
    assert not (tmp_path / "run" / "export").exists()


def test_a_rank_with_the_smaller_validation_share_waits_for_the_other_after_a_signal(tmp_path):
    # The validation after step 1 in two shares of 653 and 104 tokens (5 shapes, batches of up to 4): rank 0 takes
    # ≈ 2.6 s, rank 1 ≈ 0.4 s, then waits ≈ 2.2 s for rank 0 in the metrics' all-reduce. SIGTERM comes in that
    # validation. The wait is longer than twice rank 1's own validation and the grace (0.5 s), but within twice
    # its validation scaled by the shares (653 / 104): both ranks finish it and stop with a checkpoint at the next
    # step where they agree on the signal (log_every 2).
    proc = _start_stop_case(tmp_path, "uneven_validation", 0.5, val_every=1, SLOW_PER_TOKEN="0.004",
                            config={"task": {"args": {"num_val": 5}}, "data": {"max_batch_size": 4,
                                                                               "max_tokens": 10_000}})
    err = _ended(proc, timeout=120)
    assert "interrupted at step 2, checkpoint saved" in err and "no validation batch ended" not in err, err[-3000:]
    assert CheckpointDir(tmp_path / "run" / "checkpoints").latest().name == "step_00000002.pt"


def test_slow_ranks_still_stop_with_a_checkpoint(tmp_path):
    # Each step of rank 1 takes 1 s more, and rank 0 waits for it in each step's all-reduce: longer than
    # train.stop_grace_s (0.5 s), but within twice the last step's time, so both ranks go on to the next log step.
    proc = _start_stop_case(tmp_path, "slow", 0.5, SLOW_S="1.0")
    log_file = tmp_path / "run" / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not log_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(0.5)  # into step 3: step 4 is the next log step
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    err = _ended(proc, timeout=60)
    stopped = json.loads(log_file.read_text().splitlines()[-1])["step"]
    assert f"interrupted at step {stopped}, checkpoint saved" in err and "no step ended" not in err, err[-3000:]
    assert CheckpointDir(tmp_path / "run" / "checkpoints").latest().name == f"step_{stopped:08d}.pt"
